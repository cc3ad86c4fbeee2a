"""Helpers for tests that run real jobs on the test cluster.

Job scripts here are bash, use the test's own Python (``sys.executable``, the venv with
hpcckpt installed) and report through their Slurm output file, which the test polls:
that file is the one channel every Slurm job has, including after a requeue.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

#: A job script line that prints the job's context as hpcckpt parses it, as JSON
#: after the tag CTX, using the same backend selection the integration will use.
PRINT_CONTEXT = (
    f"{sys.executable} -c 'import dataclasses, json; "
    "from hpcckpt.scheduler import select_backend; "
    "ctx = select_backend(prefer=\"commands\").environment(); "
    "print(\"CTX \" + json.dumps(dataclasses.asdict(ctx), default=str), flush=True)'"
)


def wait_for_line(path: Path, needle: str, timeout: float, count: int = 1) -> list[str]:
    """Wait until ``path`` has ``count`` lines containing ``needle``; return them."""
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            found = [ln for ln in path.read_text(errors="replace").splitlines()
                     if needle in ln]
            if len(found) >= count:
                return found
        time.sleep(0.2)
    text = path.read_text(errors="replace") if path.exists() else "(no file)"
    raise AssertionError(f"{count} line(s) with {needle!r} not in {path} after "
                         f"{timeout:g} s; it holds:\n{text}")


def job_processes(job_id: int, conf: Path) -> list[int]:
    """Pids of this job's slurmstepd and of every process running in the job.

    Only processes of *this* cluster (SLURM_CONF in their environment) count: another
    test cluster on the machine may have a job with the same id.
    """
    ours = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ours not in environ:
            continue
        if cmdline.startswith(f"slurmstepd: [{job_id}.".encode()) or \
                f"SLURM_JOB_ID={job_id}".encode() in environ:
            pids.append(int(entry))
    return pids


def kill_node(slurmd_pid: int, job_id: int, conf: Path) -> list[int]:
    """Crash a node the hard way: SIGKILL its slurmd, then the job's stepd and processes.

    With two nodes on one host there is no machine to power off, so "the node" is its
    slurmd plus what runs the job there. Returns the job pids killed.
    """
    os.kill(slurmd_pid, signal.SIGKILL)
    killed = job_processes(job_id, conf)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed
