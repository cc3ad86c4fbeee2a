"""The job's output file is emptied by each new run (a shell's `>`, Slurm's default
--open-mode=truncate): `hpcckpt run` keeps the checkpointed part in the checkpoint and
refills the file before it resumes, so the output still holds every line once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engine.helpers import PROGRAMS, reference

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]
CMD = [sys.executable, str(PROGRAMS / "compute.py"), "40", "0.05"]


def run_truncating(store: Path, out: Path) -> subprocess.Popen:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)   # as `>` and Slurm do
    try:
        return subprocess.Popen(HPCCKPT + ["run", "--store", str(store), "--job", "t", "--every", "0.5", "--", *CMD],
                                stdout=fd, stderr=fd, start_new_session=True)
    finally:
        os.close(fd)


def test_truncated_output_is_refilled_on_resume(tmp_path):
    ref = reference(CMD, tmp_path / "ref.txt")
    store, out = tmp_path / "store", tmp_path / "out.txt"
    first = run_truncating(store, out)
    deadline = time.monotonic() + 60
    while out.read_bytes().count(b"\nstep") < 15:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)                 # final checkpoint
    assert first.wait(timeout=30) == 0
    second = run_truncating(store, out)               # the file starts empty again
    assert second.wait(timeout=120) == 0
    text = out.read_text()
    assert "refilled its" in text and "resumed from" in text, text
    job_lines = "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("hpcckpt run:"))
    assert job_lines.encode() == ref                  # stdout and stderr share the file: every job line once
