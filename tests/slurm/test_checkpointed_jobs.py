"""Slurm jobs under `hpcckpt run --store`: requeued, preempted, or killed with their node,
each resumes from its newest image and ends with exactly the uninterrupted output."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpcckpt.scheduler import CommandsBackend, JobSubmitDescription
from hpcckpt.store import Store
from hpcckpt.store.catalog import Catalog
from tests.engine.helpers import PROGRAMS, reference
from tests.slurm_cluster.jobs import kill_node, wait_for_line

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

STEPS, PAUSE = 80, 0.1


def script(store: Path, final_signal: str = "TERM") -> str:
    # `exec` so the batch shell's signals (B:...) reach hpcckpt run itself
    return (f"#!/bin/bash\nexec {sys.executable} -m hpcckpt.cli run --store {store} --every 1 "
            f"--final-signal {final_signal} -- {sys.executable} {PROGRAMS / 'compute.py'} {STEPS} {PAUSE}\n")


def submit(backend, tmp_path, name, **kw) -> tuple[int, Path, Path]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    job = backend.submit(JobSubmitDescription(
        name=name, output=str(out), error=str(err), requeue=True, time_limit=10,
        extra_options=["--open-mode=append"], **kw))
    return job, out, err


def wait_checkpoints(store: Path, job: int, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(list((store / f"slurm-{job}").glob("0*"))) < n:
        if time.monotonic() > deadline:
            errs = "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in store.parent.glob("*.err"))
            raise AssertionError(f"no {n} checkpoints of job {job} after {timeout} s; job stderr:\n{errs}")
        time.sleep(0.1)


def catalog_rows(store: Path, job: int) -> list[dict]:
    """The job's rows as catalog.h5 itself holds them (journal folded in first)."""
    cat = Catalog(store)
    assert cat.fold(), "catalog fold was locked out"
    data = cat.load()
    rows = data.rows[data.job_slice(f"slurm-{job}")]
    return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in zip(rows.dtype.names, r.tolist())}
            for r in rows]


def check_catalog(store: Path, job: int, every: float) -> list[dict]:
    """The catalog lists exactly the published checkpoints, on schedule, with their costs."""
    rows = catalog_rows(store, job)
    on_disk = sorted(c.seq for c in Store(store).scan(f"slurm-{job}"))
    assert [r["seq"] for r in rows] == on_disk, (rows, on_disk)
    # generation 0's last checkpoint is the final one its SIGTERM asked for: off schedule
    periodic = [r for r in rows if r["generation"] == 0][:-1]
    assert len(periodic) >= 2, rows
    for a, b in zip(periodic, periodic[1:]):
        # schedule every=1 s after the previous checkpoint ended; the dump itself adds its cost
        assert b["time"] - a["time"] >= every * 0.9, (a, b)
    for r in rows:
        assert r["nprocs"] >= 1 and r["image_bytes"] > 0 and r["memory_bytes"] > 0, r
        assert r["freeze_s"] > 0 and r["host"], r
    assert any(r["parent"] >= 0 for r in rows), "no incremental checkpoint in the catalog"
    return rows


@pytest.fixture
def ref(tmp_path) -> bytes:
    return reference([sys.executable, PROGRAMS / "compute.py", STEPS, PAUSE], tmp_path / "ref.txt")


def test_requeued_job_resumes(backend: CommandsBackend, cluster, tmp_path, ref):
    store = tmp_path / "store"
    job, out, err = submit(backend, tmp_path, "requeue", script=script(store))
    backend.wait_state(job, {"RUNNING"}, timeout=30)
    wait_checkpoints(store, job, 2)
    wait_for_line(out, "step 20 ", timeout=60)
    backend.requeue(job)               # SIGTERM: final checkpoint, then Slurm runs it again
    done = backend.wait_state(job, {"COMPLETED"}, timeout=120, where=lambda j: j.restart_count >= 1)
    assert done.restart_count == 1
    log = err.read_text()
    assert "resumed from" in log, log
    assert out.read_bytes() == ref     # each line once, though the first run printed more
    rows = check_catalog(store, job, every=1)
    assert {r["generation"] for r in rows} == {0, 1}, rows


def test_preempted_job_checkpoints_in_grace_time_and_resumes(backend, cluster, tmp_path, ref):
    store, node = tmp_path / "store", cluster.nodes[0]
    job, out, err = submit(backend, tmp_path, "low", script=script(store, "USR2"), partition="low",
                           nodelist=node, signal="B:USR2@30")
    backend.wait_state(job, {"RUNNING"}, timeout=30)
    wait_checkpoints(store, job, 1)
    wait_for_line(out, "step 10 ", timeout=60)
    high = backend.submit(JobSubmitDescription(
        script="#!/bin/bash\nsleep 2\n", name="high", partition=cluster.preemptor_partition,
        nodelist=node, output=str(tmp_path / "high.out"), time_limit=2))
    backend.wait_state(high, {"COMPLETED"}, timeout=90)
    backend.wait_state(job, {"COMPLETED"}, timeout=120, where=lambda j: j.restart_count >= 1)
    log = err.read_text()
    assert "resumed from" in log, log
    assert out.read_bytes() == ref


def test_job_on_crashed_node_resumes_elsewhere(backend, cluster, tmp_path, ref):
    store = tmp_path / "store"
    job, out, err = submit(backend, tmp_path, "crash", script=script(store))
    first = backend.wait_state(job, {"RUNNING"}, timeout=30)
    wait_checkpoints(store, job, 2)
    wait_for_line(out, "step 15 ", timeout=60)
    kill_node(cluster.slurmd_pid(first.batch_host), job, cluster.conf)
    done = backend.wait_state(job, {"COMPLETED"}, timeout=150, where=lambda j: j.restart_count >= 1)
    assert done.batch_host != first.batch_host
    assert "resumed from" in err.read_text()
    assert out.read_bytes() == ref     # lost at most the time since the last checkpoint


NOBODY = 65534


def test_user_job_requeued_resumes(backend: CommandsBackend, cluster, user_env, ref):
    """An ordinary user's job (uid 65534, submitted with sbatch --uid): `hpcckpt run` needs no
    root and no daemon; it checkpoints, is requeued, resumes with the uninterrupted output."""
    home = Path(tempfile.mkdtemp(prefix="hpcckpt-slurm-user-", dir="/tmp"))
    try:
        os.chown(home, NOBODY, NOBODY)
        store, out, err = home / "store", home / "user.out", home / "user.err"
        job_cmd = " ".join(map(str, user_env.hpcckpt(
            "run", "--store", store, "--every", 1, "--", user_env.python, user_env.program("compute.py"),
            STEPS, PAUSE)))
        script = f"#!/bin/bash\nexport PYTHONPATH={user_env.env['PYTHONPATH']}\nexec {job_cmd}\n"
        job = backend.submit(JobSubmitDescription(
            script=script, name="user", output=str(out), error=str(err), requeue=True, time_limit=10,
            work_dir=str(home), extra_options=["--open-mode=append", f"--uid={NOBODY}", f"--gid={NOBODY}"]))
        backend.wait_state(job, {"RUNNING"}, timeout=30)
        wait_checkpoints(store, job, 2)
        wait_for_line(out, "step 20 ", timeout=60)
        backend.requeue(job)
        done = backend.wait_state(job, {"COMPLETED"}, timeout=120, where=lambda j: j.restart_count >= 1)
        assert done.restart_count == 1
        assert "resumed from" in err.read_text(), err.read_text()
        assert out.read_bytes() == ref
        assert {(p.stat().st_uid) for p in (store / f"slurm-{job}").glob("0*")} == {NOBODY}
        check_catalog(store, job, every=1)
    finally:
        shutil.rmtree(home, ignore_errors=True)
