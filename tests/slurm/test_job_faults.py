"""What goes wrong around a checkpointed Slurm job, on the real cluster: a store that cannot
be used, a job holding what the engine cannot checkpoint (each runs to its exact end,
the error in its output and in `hpcckpt status`), and the stale copy of a requeued job
(a cut-off node's run waking up late) that must not publish over the live generation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.scheduler import CommandsBackend
from hpcckpt.store import Store
from tests.engine.helpers import PROGRAMS, reference
from tests.slurm.test_checkpointed_jobs import PAUSE, STEPS, check_catalog, script, submit, wait_checkpoints
from tests.slurm_cluster.jobs import wait_for_line

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]

URING = ("import ctypes, time\nfd = ctypes.CDLL(None).syscall(425, 8, ctypes.create_string_buffer(120))\n"
         "assert fd >= 0\nfor i in range(30):\n    print(i, flush=True); time.sleep(0.1)\n")


@pytest.fixture
def ref(tmp_path) -> bytes:
    return reference([sys.executable, PROGRAMS / "compute.py", STEPS, PAUSE], tmp_path / "ref.txt")


def status(cluster, job: int, store: Path, *extra: str) -> str:
    """`hpcckpt status` as a user on a cluster node asks it (the cluster's slurm.conf)."""
    r = subprocess.run(HPCCKPT + ["status", str(job), "--store", str(store), *extra], capture_output=True,
                       text=True, env={**os.environ, **cluster.env})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_unusable_store_job_runs_and_says_why(backend: CommandsBackend, cluster, tmp_path, ref):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = blocker / "store"                 # under a regular file: can never be made
    job, out, err = submit(backend, tmp_path, "nostore", script=script(store))
    backend.wait_state(job, {"COMPLETED"}, timeout=120)
    assert out.read_bytes() == ref
    assert "cannot use the checkpoint destination" in err.read_text(), err.read_text()
    st = status(cluster, job, store)
    assert f"store {store} does not exist" in st, st
    assert "Slurm comment: hpcckpt: cannot use the checkpoint destination" in st, st


def test_unsupported_resource_job_runs_and_says_why(backend: CommandsBackend, cluster, tmp_path):
    prog = tmp_path / "uring.py"
    prog.write_text(URING)
    store = tmp_path / "store"
    body = (f"#!/bin/bash\nexec {sys.executable} -m hpcckpt.cli run --store {store} --every 0.5 -- "
            f"{sys.executable} {prog}\n")
    job, out, err = submit(backend, tmp_path, "uring", script=body)
    backend.wait_state(job, {"COMPLETED"}, timeout=120)
    assert out.read_text() == "".join(f"{i}\n" for i in range(30))
    assert "checkpoint failed, job continues" in err.read_text(), err.read_text()
    st = status(cluster, job, store)
    assert "io_uring" in st and "failed:" in st, st
    assert "Slurm comment: hpcckpt:" in st and "checkpoint failed" in st, st


def test_stale_copy_of_a_requeued_job_cannot_publish(backend: CommandsBackend, cluster, tmp_path, ref):
    store = tmp_path / "store"
    job, out, err = submit(backend, tmp_path, "fenced", script=script(store))
    backend.wait_state(job, {"RUNNING"}, timeout=30)
    wait_checkpoints(store, job, 2)
    wait_for_line(out, "step 15 ", timeout=60)
    backend.requeue(job)
    backend.wait_state(job, {"RUNNING"}, timeout=90, where=lambda j: j.restart_count >= 1)
    wait_for_line(err, "resumed from", timeout=60)
    # the first run's checkpointer on a node Slurm lost touch with wakes up and publishes late:
    # same job, generation 0 (a process of its own stands in for the lost job)
    env = {**os.environ, **cluster.env, "SLURM_JOB_ID": str(job), "SLURM_RESTART_COUNT": "0"}
    lost = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        late = subprocess.run(HPCCKPT + ["dump", "--pid", str(lost.pid), "--store", str(store), "--leave-running"],
                              capture_output=True, text=True, timeout=120, env=env)
    finally:
        lost.kill()
        lost.wait()
    assert late.returncode != 0, late.stdout
    assert "generation 0 may not" in late.stderr and "generation 1 was recorded" in late.stderr, late.stderr
    backend.wait_state(job, {"COMPLETED"}, timeout=120, where=lambda j: j.restart_count >= 1)
    assert out.read_bytes() == ref
    gens = [c.generation for c in sorted(Store(store).scan(f"slurm-{job}"), key=lambda c: c.seq)]
    assert gens[-1] == 1 and set(gens) == {0, 1}, gens
    check_catalog(store, job, every=1)
    run = json.loads(status(cluster, job, store, "--json"))["run"]
    assert run["generation"] == 1, run       # the stale copy did not overwrite the live status
