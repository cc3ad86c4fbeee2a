"""`hpcckpt run` with the image store: final checkpoint on SIGTERM, resume, fallback past
a damaged checkpoint, fencing of a stale copy, checkpoint on demand."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engine.helpers import PROGRAMS, reference

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


def start_run(store: Path, out: Path, log: Path, *args, env=None, steps=40):
    cmd = HPCCKPT + ["run", "--store", str(store), "--job", "calc", *args, "--",
                     sys.executable, str(PROGRAMS / "compute.py"), str(steps), "0.05"]
    with open(out, "ab") as o, open(log, "ab") as e:
        return subprocess.Popen(cmd, stdout=o, stderr=e, env=env, start_new_session=True)


def wait_for(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def checkpoints(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "calc").glob("0*"))


def test_final_checkpoint_on_sigterm_then_resume(tmp_path):
    ref = reference([sys.executable, PROGRAMS / "compute.py", 40, 0.05], tmp_path / "ref.txt")
    store, out, log = tmp_path / "store", tmp_path / "out.txt", tmp_path / "log.txt"
    run = start_run(store, out, log, "--every", "0.5")
    wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 12)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 0
    assert "final checkpoint calc/" in log.read_text()
    n = out.read_bytes().count(b"\n")
    assert n < 40
    rerun = start_run(store, out, log)
    assert rerun.wait(timeout=120) == 0
    assert out.read_bytes() == ref
    assert "resumed from" in log.read_text()
    listing = subprocess.run(HPCCKPT + ["ls", "--store", store, "--job", "calc"], capture_output=True,
                             text=True, check=True).stdout
    assert "calc" in listing and "complete" in listing or "verified" in listing
    assert subprocess.run(HPCCKPT + ["verify", "--store", store, "--job", "calc"]).returncode == 0


def test_checkpoint_signal_and_fallback_past_damage(tmp_path):
    ref = reference([sys.executable, PROGRAMS / "compute.py", 40, 0.05], tmp_path / "ref.txt")
    store, out, log = tmp_path / "store", tmp_path / "out.txt", tmp_path / "log.txt"
    run = start_run(store, out, log)                 # no --every: only on demand
    wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 5)
    run.send_signal(signal.SIGUSR1)
    wait_for(lambda: len(checkpoints(store)) == 1)
    wait_for(lambda: out.read_bytes().count(b"\n") >= 12)
    run.send_signal(signal.SIGUSR1)
    wait_for(lambda: len(checkpoints(store)) == 2)
    os.killpg(run.pid, signal.SIGKILL)               # a node crash
    run.wait()
    newest = store / "calc" / checkpoints(store)[-1]
    pages = next(newest.glob("pages-*.img"))
    data = bytearray(pages.read_bytes())
    data[100] ^= 1
    pages.write_bytes(data)                          # the newest image is damaged
    rerun = start_run(store, out, log)
    assert rerun.wait(timeout=120) == 0
    text = log.read_text()
    assert f"skipped damaged checkpoint calc/{newest.name}" in text
    assert out.read_bytes() == ref                   # resumed from the older one


def test_stale_generation_cannot_publish(tmp_path):
    """Two live copies of one job (a cut-off node's and the requeued run): the stale one
    runs on unharmed but can never publish over the newer generation's images."""
    store = tmp_path / "store"
    old = dict(os.environ, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0")
    new = dict(os.environ, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    stale_out, stale_log = tmp_path / "stale.txt", tmp_path / "stale.log"
    r0 = start_run(store, stale_out, stale_log, "--every", "0.3", env=old, steps=40)
    wait_for(lambda: len(checkpoints(store)) >= 1)
    r1 = start_run(store, tmp_path / "out1.txt", tmp_path / "new.log", "--every", "0.3", env=new, steps=40)
    wait_for(lambda: "checkpoint calc/" in (tmp_path / "new.log").read_text())
    assert r0.wait(timeout=60) == 0 and r1.wait(timeout=60) == 0
    text = stale_log.read_text()
    assert "generation 0 may not" in text and "generation 1 was recorded" in text
    assert stale_out.read_bytes().endswith(b"done\n")
    gens = {int(json.loads((d / "MANIFEST.json").read_text())["generation"])
            for d in (store / "calc").glob("0*")}
    newest = max((store / "calc").glob("0*"))
    assert json.loads((newest / "MANIFEST.json").read_text())["generation"] == 1, gens


def test_kill9_loop_during_dumps_always_resumes_a_complete_image(tmp_path):
    """kill -9 of the whole job (checkpointer included) at 30 random instants, many in the
    middle of a dump or a publish: every rerun resumes from a complete image, and the job
    ends with exactly the uninterrupted output."""
    import random
    rng = random.Random(7)
    cmd = [sys.executable, PROGRAMS / "compute.py", 1500, 0.005]
    ref = reference(cmd, tmp_path / "ref.txt")
    store, out, log = tmp_path / "store", tmp_path / "out.txt", tmp_path / "log.txt"

    def start():
        if not list(store.glob("k/0*")):   # no checkpoint yet: the job starts afresh
            out.write_bytes(b"")
        with open(out, "ab") as o, open(log, "ab") as e:
            return subprocess.Popen(HPCCKPT + ["run", "--store", str(store), "--job", "k", "--every", "0.1",
                                               "--"] + [str(c) for c in cmd],
                                    stdout=o, stderr=e, start_new_session=True)
    for _ in range(30):
        lines = log.read_text().count("\n") if log.exists() else 0
        run = start()
        # the instants count from the job running again, not from the interpreter's start-up,
        # which a busy machine stretches past any fixed delay
        wait_for(lambda: log.read_text().count("\n") > lines or run.poll() is not None, timeout=60)
        time.sleep(rng.uniform(0.02, 0.8))
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        assert b"done" not in out.read_bytes(), "the job finished before the kills did"
    assert len(list((store / "k").glob("0*"))) >= 5
    assert start().wait(timeout=300) == 0
    assert out.read_bytes() == ref
