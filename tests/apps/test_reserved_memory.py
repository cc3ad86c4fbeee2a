"""Huge address-space reservations, as servers make them (mariadbd maps 8 TiB PROT_NONE
for its buffer pool's largest size): the dump saves the few pages used in them, in memory
bounded by those pages, and the restored program goes on to the uninterrupted output."""
import resource
import subprocess
import sys

from tests.engine.helpers import PROGRAMS, Job, cli, reference

PROG = PROGRAMS / "reserved.py"
STEPS = 40
AS_LIMIT = 4 << 30     # a dump reading pagemap for all 3 TiB would need ~6 GiB: MemoryError, not OOM


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def test_sparse_terabyte_reservations(tmp_path):
    want = reference([sys.executable, PROG, STEPS], tmp_path / "ref.txt")
    job = Job.start([sys.executable, PROG, STEPS], tmp_path / "out.txt")
    try:
        job.wait_lines(5)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", preexec_fn=_limited)
        assert job.proc.wait(timeout=10) != 0
        assert "MemoryError" not in res.stderr, res.stderr
        pages = sum(f.stat().st_size for f in (tmp_path / "img").glob("pages-*.img"))
        assert pages < 256 << 20, f"{pages} bytes of pages for a few touched pages"
        with open(tmp_path / "out.txt", "ab") as out:
            r = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                               stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
    finally:
        job.kill()
    assert (tmp_path / "out.txt").read_bytes() == want
