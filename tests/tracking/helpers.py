"""A controllable target process for the tracking tests, and a checkpoint step.

The C program (programs/pagewriter.c) changes memory only on command, so a test knows
exactly which pages were written between two collects. Binaries are built once per
session into HPCCKPT_TEST_BIN_DIR (set by the QEMU guest runner to binaries the host
built, as compiling under software emulation is slow) or a temp dir.
"""
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from hpcckpt.engine.freeze import freeze
from hpcckpt.kernel import proc

HERE = Path(__file__).parent
PAGE = 4096


def build(name: str = "pagewriter") -> Path:
    src = HERE / "programs" / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    bindir = Path(os.environ.get("HPCCKPT_TEST_BIN_DIR") or Path(tempfile.gettempdir()) / "hpcckpt-test-bin")
    out = bindir / f"{name}-{digest}"
    if not out.exists():
        bindir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["gcc", "-O1", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    return out


class Target:
    """The pagewriter process; `cmd` sends one command and returns its answer."""

    def __init__(self):
        self.p = subprocess.Popen([str(build())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def cmd(self, line: str) -> str:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def alloc(self, npages: int, huge: bool = False) -> int:
        return int(self.cmd(f"a {npages} {int(huge)}"), 16)

    def write(self, addr: int, n: int = 1, step: int = 1) -> None:
        assert self.cmd(f"w {addr:x} {n} {step}") == "ok"

    def vmas(self):
        return proc.maps(self.pid)

    def vma_at(self, addr: int):
        return next(v for v in self.vmas() if v.start <= addr < v.end)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass


def arm(tracker, t: Target):
    """Arm on the frozen target, as the dump does."""
    fr = freeze(t.pid)
    try:
        tracker.arm(t.pid, fr, proc.maps(t.pid))
    finally:
        fr.thaw()


def collect(tracker, t: Target) -> dict:
    """One checkpoint's collect, with the target frozen as in a dump."""
    fr = freeze(t.pid)
    try:
        return tracker.collect(t.pid, proc.maps(t.pid))
    finally:
        fr.thaw()


def pages(dirty: dict, vma_start: int) -> set[int]:
    return set(int(i) for i in dirty[vma_start])
