"""Every working backend reports exactly the pages a real process wrote.

The target (programs/pagewriter.c) writes only on command, so after each command the
set of written pages of its buffers is known; the tests compare it with the report.
Pages the target's own code touches (stack, libc data) are outside the buffers and
not checked.
"""
import os
import random
import select
import signal
import time

import numpy as np
import pytest

from hpcckpt.engine.freeze import freeze
from hpcckpt.errors import HpcckptError, ProcessGoneError
from hpcckpt.kernel import proc
from hpcckpt.kernel.libc import pidfd_open
from hpcckpt.tracking.scan import Scanner

from .helpers import PAGE, arm, collect, pages

THP_PAGES = 512


def test_exact_pages_over_intervals(backend, target):
    """A varying fraction of a buffer written per interval: exactly those pages."""
    n = 2048
    buf = target.alloc(n)
    arm(backend, target)
    rng = random.Random(4)
    for frac in (0.0, 0.001, 0.01, 0.1, 0.5, 0.0):
        want = set(rng.sample(range(n), int(n * frac)))
        for i in sorted(want):
            target.write(buf + i * PAGE)
        dirty = collect(backend, target)
        assert pages(dirty, buf) == want, f"{backend.name}, fraction {frac}"


def test_strided_runs(backend, target):
    buf = target.alloc(1024)
    arm(backend, target)
    target.write(buf + 3 * PAGE, 100, 7)      # 100 pages, every 7th
    target.write(buf + 900 * PAGE, 50, 1)     # one run of 50
    want = {3 + 7 * k for k in range(100) if 3 + 7 * k < 1024} | set(range(900, 950))
    assert pages(collect(backend, target), buf) == want


def test_mapping_changes(backend, target):
    """New, moved, grown, re-created and removed mappings; brk growth; mprotect splits."""
    quiet = target.alloc(64)      # never written: must stay empty throughout
    grow = target.alloc(64)
    gone = target.alloc(64)
    again = target.alloc(64)
    split = target.alloc(64)
    arm(backend, target)
    new = target.alloc(32)                                     # created
    assert target.cmd(f"u {gone:x} 64") == "ok"                 # removed
    moved = int(target.cmd(f"g {grow:x} 64 1024"), 16)          # grown (and maybe moved)
    target.write(moved + 1000 * PAGE)
    assert target.cmd(f"f {again:x} 64") == "ok"                # re-created in place
    assert target.cmd(f"p {split + 16 * PAGE:x} 16 1") == "ok"  # middle made read-only
    target.write(split + 2 * PAGE)
    heap = int(target.cmd(f"b {64 * PAGE}"), 16)                # brk grows by 64 pages
    vmas = proc.maps(target.pid)
    dirty = collect(backend, target)

    def vma(addr):
        return next(v for v in vmas if v.start <= addr < v.end)

    assert gone not in dirty and not any(v.start <= gone < v.end for v in vmas)
    assert pages(dirty, quiet) == set()
    v = vma(new)
    assert pages(dirty, v.start) == set(range((v.end - v.start) // PAGE)), "new mapping not whole"
    v = vma(moved)
    if backend.name != "hashing" or moved != grow:
        assert pages(dirty, v.start) == set(range((v.end - v.start) // PAGE)), "moved mapping not whole"
    assert (moved - v.start) // PAGE + 1000 in pages(dirty, v.start)
    v = vma(again)
    # re-created: every old page is gone, so every page differs from the last checkpoint
    assert pages(dirty, v.start) >= set(range((again - v.start) // PAGE, (again - v.start) // PAGE + 64))
    assert (split - vma(split).start) // PAGE + 2 in pages(dirty, vma(split).start)
    for k in range(64):  # every page the heap grew by, in whichever mapping holds it
        a = heap + k * PAGE
        assert (a - vma(a).start) // PAGE in pages(dirty, vma(a).start)
    # after the changes, tracking is exact again
    target.write(split + 40 * PAGE)
    target.write(moved + 3 * PAGE)
    vmas = proc.maps(target.pid)
    dirty = collect(backend, target)
    assert pages(dirty, vma(split + 40 * PAGE).start) == {(split + 40 * PAGE - vma(split + 40 * PAGE).start) // PAGE}
    assert pages(dirty, vma(moved).start) == {(moved - vma(moved).start) // PAGE + 3}
    assert pages(dirty, vma(new).start) == set()
    assert pages(dirty, quiet) == set()


def _thp_pages(pid: int, start: int) -> int:
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = int(line.split("-", 1)[0], 16) == start
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024 // PAGE
    return 0


def test_thp_granularity(backend, target):
    """A write into a transparent huge page: the kernel may only say "this 2 MiB"."""
    buf = target.alloc(4 * THP_PAGES, huge=True)
    arm(backend, target)
    target.write(buf + 700 * PAGE)
    target.write(buf + 1500 * PAGE)
    got = pages(collect(backend, target), buf)
    assert {700, 1500} <= got
    if _thp_pages(target.pid, buf) == 0:
        assert got == {700, 1500}
    # nothing outside the huge pages that were written
    assert {p // THP_PAGES for p in got} <= {700 // THP_PAGES, 1500 // THP_PAGES}
    target.write(buf + 10 * PAGE)
    got = pages(collect(backend, target), buf)
    assert 10 in got and {p // THP_PAGES for p in got} == {0}


def test_madv_dontneed(backend, target):
    """Dropped pages read back as zeros: reported. Dropped and untouched: reported or
    absent (the dump saves only present pages, so absent ones come back as zeros)."""
    buf = target.alloc(64)
    arm(backend, target)
    assert target.cmd(f"d {buf + 10 * PAGE:x} 4") == "ok"
    assert target.cmd(f"r {buf + 10 * PAGE:x} 2") == "ok"
    target.write(buf + 20 * PAGE)
    got = pages(collect(backend, target), buf)
    assert {10, 11, 20} <= got <= {10, 11, 12, 13, 20}
    pm = proc.pagemap(target.pid, buf + 12 * PAGE, buf + 14 * PAGE)
    for k, e in zip((12, 13), pm):
        assert k in got or not (int(e) >> 63) & 1
    assert pages(collect(backend, target), buf) == set()


def test_process_exits_mid_collect(backend, target, monkeypatch):
    """The process dies while its pages are being looked at: a clear error, nothing left
    frozen, the tracker can be disarmed."""
    buf = target.alloc(64)
    arm(backend, target)
    target.write(buf)

    def killing(orig):
        def wrapper(*a, **kw):
            pidfd = pidfd_open(target.pid)
            os.kill(target.pid, signal.SIGKILL)
            select.select([pidfd], [], [], 5)  # readable once it has exited
            os.close(pidfd)
            return orig(*a, **kw)
        return wrapper

    monkeypatch.setattr(Scanner, "scan", killing(Scanner.scan))
    monkeypatch.setattr(proc, "pagemap", killing(proc.pagemap))
    fr = freeze(target.pid)
    try:
        with pytest.raises(ProcessGoneError, match=str(target.pid)):
            backend.collect(target.pid, proc.maps(target.pid))
    finally:
        fr.thaw()
    assert target.p.wait(timeout=5) == -signal.SIGKILL
    backend.disarm()
    with pytest.raises(HpcckptError):
        backend.collect(target.pid, [])


def test_exited_between_checkpoints(backend, target):
    target.alloc(8)  # a mapping to track
    arm(backend, target)
    vmas = proc.maps(target.pid)
    target.cmd("x")
    target.p.wait()
    with pytest.raises(ProcessGoneError, match="exited"):
        backend.collect(target.pid, vmas)


def _exited(pid: int) -> bool:
    """Dead with its memory gone: a zombie (or already reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_arm_on_exiting_process_leaves_nothing_frozen(backend, target, monkeypatch):
    target.alloc(8)
    vmas = proc.maps(target.pid)
    fr = freeze(target.pid)
    os.kill(target.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10   # the kill lands asynchronously: a loaded machine let
    while not _exited(target.pid):     # the hashing backend read the still-mapped memory
        assert time.monotonic() < deadline, f"process {target.pid} did not die"
        time.sleep(0.005)
    try:
        with pytest.raises(HpcckptError):
            backend.arm(target.pid, fr, vmas)
            backend.collect(target.pid, vmas)  # backends that need no injection notice here
    finally:
        fr.thaw()
    assert target.p.wait(timeout=5) == -signal.SIGKILL


def test_untracked_kinds(backend, target):
    """vDSO family: nothing (never saved); shared mappings: whole (others can write them)."""
    arm(backend, target)
    vmas = proc.maps(target.pid)
    dirty = collect(backend, target)
    assert set(dirty) == {v.start for v in vmas}
    for v in vmas:
        if v.path in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"):
            assert len(dirty[v.start]) == 0
        elif v.shared:
            assert len(dirty[v.start]) == (v.end - v.start) // PAGE
    assert all(isinstance(a, np.ndarray) for a in dirty.values())
