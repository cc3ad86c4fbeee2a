"""Expand Slurm host lists such as ``node[1-3,7],gpu01``.

The integration needs single node names (to know where a job ran and where it runs now),
and calling ``scontrol show hostnames`` for that would cost a process per job. Only the
forms Slurm prints for node lists are handled: comma-separated names, each with at most
one bracketed range list, ranges keeping their zero padding.
"""
from __future__ import annotations

import re

_ITEM = re.compile(r"([^,\[]*)(\[[^\]]*\])?([^,\[]*)")


def expand(hostlist: str | None) -> list[str]:
    """Return the node names of a Slurm host list, in order; [] for empty/"(null)"."""
    if not hostlist or hostlist.strip() in ("(null)", "None", "N/A"):
        return []
    names: list[str] = []
    pos = 0
    text = hostlist.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read host list {hostlist!r} at {text[pos:]!r}")
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            names.append(prefix + suffix)
        else:
            for number in _expand_ranges(ranges[1:-1], hostlist):
                names.append(f"{prefix}{number}{suffix}")
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"cannot read host list {hostlist!r} at {text[pos:]!r}")
            pos += 1
    return [n for n in names if n]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in host list {whole!r}")
        width = len(lo)
        for i in range(int(lo), int(hi or lo) + 1):
            out.append(str(i).zfill(width))
    return out
