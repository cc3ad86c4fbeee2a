"""A job longer than its time limit chains through allocations: `hpcckpt run` reads the
job's end time from the controller, takes a final checkpoint a margin before it, requeues
the job, and the next allocation resumes; the output is the uninterrupted run's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hpcckpt.scheduler import CommandsBackend, JobSubmitDescription
from tests.engine.helpers import PROGRAMS

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# ~65 s of work under a 1-minute limit: one walltime requeue, the shortest chain there is
STEPS, PAUSE = 70, 0.9
HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


def test_time_limit_checkpoints_requeues_and_resumes(backend: CommandsBackend, cluster, tmp_path):
    cmd = [sys.executable, str(PROGRAMS / "compute.py"), str(STEPS), str(PAUSE)]
    ref_file = tmp_path / "ref.txt"
    with open(ref_file, "wb") as f:    # the uninterrupted run, alongside the job to save a minute
        ref_run = subprocess.Popen(cmd, stdout=f, stdin=subprocess.DEVNULL)
    store, out, err = tmp_path / "store", tmp_path / "wt.out", tmp_path / "wt.err"
    script = (f"#!/bin/bash\nexec {' '.join(HPCCKPT)} run --store {store} --schedule every=20s -- "
              f"{' '.join(cmd)}\n")
    job = backend.submit(JobSubmitDescription(
        script=script, name="walltime", output=str(out), error=str(err), requeue=True, time_limit=1))
    # Slurm's default --open-mode=truncate: the requeued run starts with empty output files;
    # hpcckpt run refills them from the checkpoint before it resumes
    backend.wait_state(job, {"RUNNING"}, timeout=30)
    status_file = store / f"slurm-{job}" / "RUN-STATUS.json"
    deadline = time.monotonic() + 30
    while not status_file.exists():
        assert time.monotonic() < deadline, err.read_text() if err.exists() else "no status file"
        time.sleep(0.2)
    st = json.loads(subprocess.run(HPCCKPT + ["status", str(job), "--store", str(store), "--json"],
                                   capture_output=True, text=True, check=True, env={**os.environ, **cluster.env}).stdout)
    assert st["run"]["walltime_end"] and st["run"]["final_checkpoint_by"] < st["run"]["walltime_end"]
    assert st["run"]["next_checkpoint"] is not None
    done = backend.wait_state(job, {"COMPLETED"}, timeout=200, where=lambda j: j.restart_count >= 1)
    assert ref_run.wait(timeout=60) == 0
    log = err.read_text()
    # printed before the final dump, so the resume's rollback of the shared file keeps it
    assert "walltime, " in log and "before the time limit: final checkpoint, then requeue" in log, log
    assert "resumed from" in log, log
    assert done.restart_count >= 1
    assert out.read_bytes() == ref_file.read_bytes()
    assert "refilled its" in log, log
    text = subprocess.run(HPCCKPT + ["status", str(job), "--store", str(store)], capture_output=True,
                          text=True, check=True).stdout
    assert "run: finished" in text and "exit 0" in text, text
