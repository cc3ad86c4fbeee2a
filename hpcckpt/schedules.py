"""Checkpoint schedules: when `hpcckpt run` takes its next periodic checkpoint.

A schedule is chosen by a *spec*, either inline (``every=30m``, ``young-daly mtbf=24h``,
``adaptive overhead=0.02 max-size=2G``) or by the name of a file in a schedules
directory (``hourly``, ``daly-24h``; extra ``key=value`` words after the name override
the file's). Files hold the same ``key=value`` words, one or more a line, ``#`` comments;
``policy=`` names the kind. docs/schedules.md has the formulas.

Why policies rather than one interval: the best interval depends on what a checkpoint
costs (measured by the supervisor on every dump) and how often the job is lost (the
MTBF of its nodes, or the chance of preemption). Young/Daly give the interval that
minimises expected lost time; the adaptive policy keeps the overhead and checkpoint size
bounded when the job's dirty rate changes. The walltime-aware last checkpoint applies to
every policy and lives in the supervisor (runner.py), since it needs the job's end time.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import HpcckptError

#: Where named schedules are looked up, first match wins: $HPCCKPT_SCHEDULES (colon
#: separated), the site's /etc/hpcckpt/schedules, then the repository's schedules/.
SITE_DIR = Path("/etc/hpcckpt/schedules")
REPO_DIR = Path(__file__).resolve().parent.parent / "schedules"
SITE_CONF = Path("/etc/hpcckpt/site.conf")

_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZES = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20,
          "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


class ScheduleError(HpcckptError):
    """A schedule spec or file that cannot be understood (names the word at fault)."""


def parse_duration(text: str) -> float:
    """'90' / '90s' / '30m' / '1.5h' / '1d' / '1h30m' -> seconds."""
    s = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise ScheduleError(f"bad duration {text!r}: use e.g. 90s, 30m, 1.5h, 1d")
    total = 0.0
    for num, unit in parts:
        if unit not in _UNITS:
            raise ScheduleError(f"bad duration {text!r}: unknown unit {unit!r} (s, m, h, d, w)")
        total += float(num) * _UNITS[unit]
    return total


def parse_size(text: str) -> int:
    """'512M' / '2G' / '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZES:
        raise ScheduleError(f"bad size {text!r}: use e.g. 512M, 2G")
    return int(float(m.group(1)) * _SIZES[m.group(2).lower()])


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g}h"
    if seconds >= 60:
        return f"{seconds / 60:.3g}m"
    return f"{seconds:.3g}s"


# -- the formulas -----------------------------------------------------------------------

def young_interval(cost: float, mtbf: float) -> float:
    """Young (1974): tau = sqrt(2 C M), first-order optimum."""
    return math.sqrt(2 * cost * mtbf)


def daly_interval(cost: float, mtbf: float) -> float:
    """Daly (2006), higher-order optimum of compute time between checkpoints:
    tau = sqrt(2CM) [1 + (1/3) sqrt(C/2M) + (1/9) (C/2M)] - C   for C < 2M, else M."""
    if cost <= 0:
        return 0.0
    if cost >= 2 * mtbf:
        return mtbf
    r = cost / (2 * mtbf)
    return math.sqrt(2 * cost * mtbf) * (1 + math.sqrt(r) / 3 + r / 9) - cost


# -- what the supervisor measures -------------------------------------------------------

@dataclass
class Measurement:
    """One checkpoint as the supervisor saw it."""
    at: float                 # wall clock (time.time()) when it finished
    frozen_s: float           # how long the job could not run: Daly's C
    total_s: float            # freeze + write + publish: what a final checkpoint needs
    pages_bytes: int          # bytes of memory written
    since_previous_s: float | None = None   # job run time since the previous checkpoint

    @property
    def dirty_rate(self) -> float | None:
        """Bytes written per second of run time since the previous checkpoint."""
        if not self.since_previous_s:
            return None
        return self.pages_bytes / self.since_previous_s


# -- the policies -----------------------------------------------------------------------

@dataclass
class Schedule:
    """Base: `interval()` is the number of seconds from the last checkpoint (or the start)
    to the next periodic one, None for no periodic checkpoints."""
    spec: str = ""
    min_s: float = 1.0
    max_s: float | None = None
    margin_s: float | None = None   # walltime: finish the last checkpoint this long before the end

    kind = "base"

    def interval(self, last: Measurement | None) -> float | None:
        raise NotImplementedError

    def _clamp(self, tau: float) -> float:
        tau = max(tau, self.min_s)
        return min(tau, self.max_s) if self.max_s else tau

    def describe(self) -> str:
        return self.spec or self.kind


@dataclass
class Every(Schedule):
    """A fixed interval: simple and predictable; right when the cost and MTBF are unknown."""
    every_s: float = 3600.0
    kind = "every"

    def interval(self, last: Measurement | None) -> float | None:
        return self.every_s


@dataclass
class PreemptOnly(Schedule):
    """No periodic checkpoints: only on the checkpoint/final signals and at the walltime."""
    kind = "preempt-only"

    def interval(self, last: Measurement | None) -> float | None:
        return None


@dataclass
class YoungDaly(Schedule):
    """Optimum interval from the measured cost C and the MTBF M (Young or Daly formula).

    Until the first checkpoint measures C, `first_s` is used (or `cost_s` if given, which
    also overrides the measurement: useful for tests and for jobs whose dumps vary).
    """
    mtbf_s: float = 24 * 3600.0
    cost_s: float | None = None
    first_s: float = 300.0
    formula: str = "daly"
    kind = "young-daly"

    def optimum(self, cost: float) -> float:
        return (young_interval if self.formula == "young" else daly_interval)(cost, self.mtbf_s)

    def interval(self, last: Measurement | None) -> float | None:
        cost = self.cost_s if self.cost_s is not None else (last.frozen_s if last else None)
        if cost is None:
            return self._clamp(self.first_s)
        return self._clamp(self.optimum(cost))


@dataclass
class Adaptive(Schedule):
    """Follows the job's dirty rate r (bytes per second of run time, from the last dump's
    pages written and the time since the one before) and its cost C:

        tau = clamp( min( C / overhead,  max_size / r ),  min, max )

    C / overhead keeps the time the job spends frozen at most `overhead` of its run time
    (a dump that got dearer spreads the next one out); max_size / r keeps the next
    checkpoint's size (and the work redone from it grows with tau anyway: `max` bounds
    the lost work). With incremental dumps r is the true dirty rate; with full dumps it
    overestimates it, which errs towards more frequent checkpoints.
    """
    overhead: float = 0.02
    max_size: int | None = None
    first_s: float = 60.0
    kind = "adaptive"

    def interval(self, last: Measurement | None) -> float | None:
        if last is None:
            return self._clamp(self.first_s)
        tau = last.frozen_s / self.overhead if self.overhead > 0 else math.inf
        rate = last.dirty_rate
        if self.max_size and rate:
            tau = min(tau, self.max_size / rate)
        if math.isinf(tau):
            tau = self.max_s or self.first_s
        return self._clamp(tau)


POLICIES = {"every": Every, "young-daly": YoungDaly, "daly": YoungDaly, "young": YoungDaly,
            "adaptive": Adaptive, "preempt-only": PreemptOnly, "none": PreemptOnly}

# key -> (attribute, parser); shared keys first
_COMMON = {"min": ("min_s", parse_duration), "max": ("max_s", parse_duration),
           "margin": ("margin_s", parse_duration)}
_KEYS = {
    Every: {"every": ("every_s", parse_duration)},
    PreemptOnly: {},
    YoungDaly: {"mtbf": ("mtbf_s", parse_duration), "cost": ("cost_s", parse_duration),
                "first": ("first_s", parse_duration), "formula": ("formula", str)},
    Adaptive: {"overhead": ("overhead", float), "max-size": ("max_size", parse_size),
               "first": ("first_s", parse_duration)},
}


# -- parsing ----------------------------------------------------------------------------

def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("HPCCKPT_SCHEDULES", "").split(":") if p]
    return extra + [SITE_DIR, REPO_DIR]


def available() -> list[str]:
    """Names of the schedules that can be picked by name."""
    names = set()
    for d in search_path():
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(names)


def _words(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out += [w for w in re.split(r"[\s,]+", line) if w]
    return out


def _find_named(name: str) -> Path | None:
    if "/" in name or name.startswith("."):
        return None
    for d in search_path():
        if (d / name).is_file():
            return d / name
    return None


def site_mtbf() -> float | None:
    """The MTBF configured for this site: $HPCCKPT_MTBF, else mtbf= in /etc/hpcckpt/site.conf."""
    if os.environ.get("HPCCKPT_MTBF"):
        return parse_duration(os.environ["HPCCKPT_MTBF"])
    if SITE_CONF.is_file():
        for w in _words(SITE_CONF.read_text()):
            if w.startswith("mtbf="):
                return parse_duration(w[5:])
    return None


def parse(spec: str) -> Schedule:
    """A schedule from an inline spec or a name (plus overriding key=value words).

    Raises ScheduleError naming the bad word and listing the known names/keys.
    """
    words = _words(spec)
    if not words:
        raise ScheduleError("empty schedule: give e.g. every=30m, young-daly mtbf=24h, or a name "
                            f"({', '.join(available()) or 'none installed'})")
    policy = None
    settings: dict[str, str] = {}
    head = words[0]
    if "=" not in head:
        words = words[1:]
        path = _find_named(head)   # a site's file may tune a policy's defaults under its name
        if path is None and head in POLICIES:
            policy = head
        else:
            if path is None:
                raise ScheduleError(
                    f"unknown schedule {head!r}: known names are {', '.join(available()) or '(none)'} "
                    f"(searched {', '.join(map(str, search_path()))}); policies are "
                    f"{', '.join(sorted(POLICIES))}; or give an inline spec such as every=30m")
            for w in _words(path.read_text()):
                k, v = _split(w, path.name)
                settings[k] = v
            policy = settings.pop("policy", None)
    for w in words:
        k, v = _split(w, spec)
        if k == "policy":
            policy = v
        else:
            settings[k] = v
    if policy is None:
        policy = "every" if "every" in settings else None
    if policy is None:
        raise ScheduleError(f"schedule {spec!r} names no policy: start it with one of "
                            f"{', '.join(sorted(POLICIES))} or give every=INTERVAL")
    if policy not in POLICIES:
        raise ScheduleError(f"unknown policy {policy!r} in {spec!r}: use one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[policy]
    keys = {**_COMMON, **_KEYS[cls]}
    kwargs: dict = {"spec": " ".join(_words(spec))}
    if cls is YoungDaly and policy in ("young", "daly"):
        kwargs["formula"] = policy
    for k, v in settings.items():
        if k not in keys:
            raise ScheduleError(f"policy {policy!r} has no setting {k!r} (in {spec!r}); "
                                f"it knows {', '.join(sorted(keys))}")
        attr, conv = keys[k]
        kwargs[attr] = conv(v)
    if cls is YoungDaly and "mtbf_s" not in kwargs:
        mtbf = site_mtbf()
        if mtbf is None:
            raise ScheduleError(f"schedule {spec!r} needs the MTBF: give mtbf=DURATION, set "
                                f"HPCCKPT_MTBF, or mtbf= in {SITE_CONF}")
        kwargs["mtbf_s"] = mtbf
    if kwargs.get("formula", "daly") not in ("young", "daly"):
        raise ScheduleError(f"formula={kwargs['formula']!r}: use young or daly")
    sched = cls(**kwargs)
    if isinstance(sched, Every) and sched.every_s <= 0:
        raise ScheduleError(f"every={settings.get('every')!r}: the interval must be positive")
    if isinstance(sched, Every):
        sched.min_s = min(sched.min_s, sched.every_s)
    return sched


def _split(word: str, where: str) -> tuple[str, str]:
    if "=" not in word:
        raise ScheduleError(f"expected key=value, got {word!r} in {where!r}")
    k, v = word.split("=", 1)
    return k.strip().lower(), v.strip()


def every(seconds: float) -> Schedule:
    """The schedule `--every SECONDS` stands for."""
    return Every(spec=f"every={seconds:g}s", every_s=seconds, min_s=min(1.0, seconds))
