"""Schedules: the formulas (Daly's published values), spec parsing and named files, the
adaptive policy's response to measurements, and one real `hpcckpt run --schedule` whose
checkpoints follow the schedule and whose status file `hpcckpt status` reads."""
import json
import subprocess
import sys

import pytest

from hpcckpt import schedules as sch
from hpcckpt.schedules import Measurement, ScheduleError, parse, parse_duration
from tests.engine.helpers import PROGRAMS, reference

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


@pytest.mark.parametrize("mtbf, minutes", [("24h", 117), ("6h", 57), ("15m", 9.1)])
def test_daly_reproduces_published_values(mtbf, minutes):
    # Daly 2006, restart 10 min, checkpoint cost C = 5 min
    tau = sch.daly_interval(5 * 60, parse_duration(mtbf)) / 60
    assert tau == pytest.approx(minutes, abs=0.5 if minutes > 10 else 0.05)


def test_daly_limits_and_young():
    assert sch.daly_interval(3 * 3600, 3600) == 3600          # C >= 2M: tau = M
    assert sch.young_interval(300, 86400) == pytest.approx((2 * 300 * 86400) ** 0.5)
    assert sch.daly_interval(300, 86400) < sch.young_interval(300, 86400)  # the -C term dominates


def test_young_daly_uses_the_measured_cost():
    s = parse("young-daly mtbf=24h first=2m")
    assert s.interval(None) == 120                           # nothing measured yet
    m = Measurement(at=0, frozen_s=300, total_s=310, pages_bytes=1 << 30, since_previous_s=600)
    assert s.interval(m) / 60 == pytest.approx(116.7, abs=0.1)
    assert parse("young mtbf=24h").interval(m) == pytest.approx(sch.young_interval(300, 86400))
    assert parse("daly mtbf=1h cost=5m max=10m").interval(None) == 600   # clamped


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1.5h", 5400),
                                           ("1d", 86400), ("1h30m", 5400), (".5m", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("spec, kind, attrs", [
    ("every=30m", "every", {"every_s": 1800}),
    ("every 30m", None, None),                                 # not key=value: error
    ("young-daly mtbf=24h", "young-daly", {"mtbf_s": 86400, "formula": "daly"}),
    ("hourly", "every", {"every_s": 3600}),
    ("daly-24h", "young-daly", {"mtbf_s": 86400, "first_s": 600, "min_s": 60}),
    ("daly-24h mtbf=6h", "young-daly", {"mtbf_s": 21600}),       # words after a name override it
    ("adaptive", "adaptive", {"overhead": 0.02, "max_size": 4 << 30, "max_s": 3600}),
    ("adaptive overhead=0.05, max-size=512M", "adaptive", {"overhead": 0.05, "max_size": 512 << 20}),
    ("preempt-only", "preempt-only", {}),
    ("every=10s margin=1m", "every", {"every_s": 10, "margin_s": 60}),
])
def test_parse(spec, kind, attrs):
    if kind is None:
        with pytest.raises(ScheduleError):
            parse(spec)
        return
    s = parse(spec)
    assert s.kind == kind
    for k, v in attrs.items():
        assert getattr(s, k) == v, k


@pytest.mark.parametrize("spec, words", [
    ("bogus", ["unknown schedule 'bogus'", "hourly", "every=30m"]),
    ("every=0", ["must be positive"]),
    ("every=3x", ["unknown unit 'x'"]),
    ("young-daly mtbf=1h foo=2", ["no setting 'foo'", "mtbf"]),
    ("policy=weekly", ["unknown policy 'weekly'"]),
    ("", ["empty schedule"]),
])
def test_bad_specs_say_what_is_wrong(spec, words):
    with pytest.raises(ScheduleError) as e:
        parse(spec)
    for w in words:
        assert w in str(e.value)


def test_mtbf_from_site_config(monkeypatch, tmp_path):
    monkeypatch.delenv("HPCCKPT_MTBF", raising=False)
    monkeypatch.setattr(sch, "SITE_CONF", tmp_path / "site.conf")
    with pytest.raises(ScheduleError, match="needs the MTBF"):
        parse("daly-site")
    (tmp_path / "site.conf").write_text("# site\nmtbf=6h\n")
    assert parse("daly-site").mtbf_s == 21600
    monkeypatch.setenv("HPCCKPT_MTBF", "2h")
    assert parse("daly").mtbf_s == 7200


def test_named_schedules_from_a_site_directory(monkeypatch, tmp_path):
    (tmp_path / "nightly").write_text("policy=every\nevery=12h   # twice a day\n")
    monkeypatch.setenv("HPCCKPT_SCHEDULES", str(tmp_path))
    assert parse("nightly").every_s == 12 * 3600
    assert "nightly" in sch.available()


def test_adaptive_follows_cost_and_dirty_rate():
    s = parse("adaptive overhead=0.02 max-size=1G min=10s max=1h first=1m")
    assert s.interval(None) == 60
    cheap = Measurement(at=0, frozen_s=0.5, total_s=1, pages_bytes=1 << 20, since_previous_s=60)
    assert s.interval(cheap) == 25                            # 0.5 s / 2 %
    dear = Measurement(at=0, frozen_s=20, total_s=25, pages_bytes=1 << 20, since_previous_s=60)
    assert s.interval(dear) == 1000                           # dearer dumps: further apart
    dirty = Measurement(at=0, frozen_s=20, total_s=25, pages_bytes=8 << 30, since_previous_s=800)
    assert s.interval(dirty) == pytest.approx(100)            # 1 GiB at 10 MiB/s
    assert s.interval(Measurement(0, 200, 200, 1, 1)) == 3600  # clamped to max


def test_run_follows_schedule_and_status_reads_it(tmp_path):
    ref = reference([sys.executable, PROGRAMS / "compute.py", 30, 0.1], tmp_path / "ref.txt")
    store, out = tmp_path / "store", tmp_path / "out.txt"
    with open(out, "wb") as o:
        r = subprocess.run(HPCCKPT + ["run", "--store", store, "--job", "calc", "--schedule", "every=1s", "--",
                                      sys.executable, PROGRAMS / "compute.py", "30", "0.1"],
                           stdout=o, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref
    seqs = sorted(p.name for p in (store / "calc").glob("0*"))
    assert len(seqs) >= 2, r.stderr
    st = json.loads(subprocess.run(HPCCKPT + ["status", "calc", "--store", store, "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert st["run"]["state"] == "finished" and st["run"]["schedule"] == "every=1s"
    assert st["run"]["checkpoints"] == len(seqs) == len(st["checkpoints"])
    assert st["run"]["last"]["frozen_s"] > 0 and st["run"]["last"]["pages_bytes"] > 0
    text = subprocess.run(HPCCKPT + ["status", "calc", "--store", store], capture_output=True, text=True,
                          check=True).stdout
    assert "schedule: every=1s" in text and "last checkpoint: calc/" in text and "exit 0" in text


def test_bad_schedule_outside_slurm_stops_run(tmp_path):
    r = subprocess.run(HPCCKPT + ["run", "--store", tmp_path / "s", "--job", "x", "--schedule", "bogus", "--",
                                  "true"], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in __import__("os").environ.items() if not k.startswith("SLURM_")})
    assert r.returncode == 2 and "unknown schedule 'bogus'" in r.stderr


def test_inside_slurm_an_unusable_store_is_reported_and_the_job_runs(tmp_path):
    """A batch job can't be told to fix its command line: it runs, without checkpoints."""
    import os
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {**os.environ, "SLURM_JOB_ID": "424242"}
    r = subprocess.run(HPCCKPT + ["run", "--store", blocker / "store", "--schedule", "every=1s", "--",
                                  sys.executable, "-c", "print('ran')"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ran\n"
    assert "error: cannot use the checkpoint destination" in r.stderr and "without checkpoints" in r.stderr


def test_unsupported_resource_job_runs_and_status_has_the_error(tmp_path):
    """A job holding something the engine can't checkpoint (an io_uring instance): each
    checkpoint fails with the reason, the job runs to its end, and `hpcckpt status` shows
    the error."""
    prog = ("import ctypes, time\nfd = ctypes.CDLL(None).syscall(425, 8, ctypes.create_string_buffer(120))\n"
            "assert fd >= 0\n"
            "for i in range(40):\n    print(i, flush=True); time.sleep(0.1)\n")
    store = tmp_path / "store"
    r = subprocess.run(HPCCKPT + ["run", "--store", store, "--job", "sock", "--schedule", "every=0.5s", "--",
                                  sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"{i}\n" for i in range(40))
    assert "checkpoint failed, job continues" in r.stderr
    st = json.loads(subprocess.run(HPCCKPT + ["status", "sock", "--store", store, "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert st["run"]["failures"] >= 1 and st["run"]["checkpoints"] == 0
    assert any("io_uring" in e for e in st["run"]["errors"]), st["run"]["errors"]
