"""Which backends work here, found by trying them, and picking one.

The probe is the real thing on a small child process: arm, let it write two known
pages, collect, and check that exactly those were reported. Kernel version checks
would lie (soft-dirty can be configured out; PAGEMAP_SCAN arrived in 6.7; userfaultfd
can be forbidden by sysctl or seccomp). Results are cached for the process's life.
"""
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

from ..engine.freeze import freeze
from ..errors import HpcckptError
from ..kernel import proc
from ..kernel.libc import PAGE_SIZE
from .base import Tracker, TrackingError
from .hashing import HashingTracker
from .soft_dirty import SoftDirtyTracker
from .uffd_wp import UffdWpTracker

# best first: exact and cheap, then exact but racy-unless-frozen, then reads everything
BACKENDS: dict[str, type[Tracker]] = {
    UffdWpTracker.name: UffdWpTracker,
    SoftDirtyTracker.name: SoftDirtyTracker,
    HashingTracker.name: HashingTracker,
}

_CHILD = r"""
import mmap, sys, ctypes
m = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(16):
    m[i * 4096] = 1
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
for line in sys.stdin:
    for i in line.split():
        m[int(i) * 4096 + 7] = 2
    print("ok", flush=True)
"""
WRITTEN = (3, 9)


@dataclass
class ProbeResult:
    name: str
    works: bool
    detail: str
    seconds: float


def probe_one(name: str) -> ProbeResult:
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    tracker = BACKENDS[name]()
    try:
        buf = int(child.stdout.readline())
        fr = freeze(child.pid)
        try:
            tracker.arm(child.pid, fr, proc.maps(child.pid))
        finally:
            fr.thaw()
        child.stdin.write(" ".join(map(str, WRITTEN)) + "\n")
        child.stdin.flush()
        child.stdout.readline()
        fr = freeze(child.pid)
        try:
            vmas = proc.maps(child.pid)
            dirty = tracker.collect(child.pid, vmas)
        finally:
            fr.thaw()
        v = next(v for v in vmas if v.start <= buf < v.end)
        base = (buf - v.start) // PAGE_SIZE
        got = {int(i) - base for i in dirty[v.start] if base <= i < base + 16}
        if got != set(WRITTEN):
            why = ("no page reported (e.g. soft-dirty bits are never set: CONFIG_MEM_SOFT_DIRTY off)"
                   if not got else f"reported pages {sorted(got)}, expected {list(WRITTEN)}")
            return ProbeResult(name, False, why, time.monotonic() - t0)
        return ProbeResult(name, True, "reported exactly the written pages", time.monotonic() - t0)
    except (HpcckptError, OSError) as e:
        return ProbeResult(name, False, str(e), time.monotonic() - t0)
    finally:
        tracker.disarm()
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


@lru_cache(maxsize=1)
def probe() -> tuple[ProbeResult, ...]:
    """Every backend tried once on a child process (cached)."""
    return tuple(probe_one(n) for n in BACKENDS)


def available_backends() -> list[str]:
    """Names of the backends that work here, best first."""
    return [r.name for r in probe() if r.works]


def choose(preferred: str | None = None) -> Tracker:
    """A new tracker: `preferred` if it works here, else the best that does."""
    results = {r.name: r for r in probe()}
    if preferred is not None:
        if preferred not in BACKENDS:
            raise TrackingError(f"unknown tracking backend {preferred!r}; known: {', '.join(BACKENDS)}")
        if not results[preferred].works:
            raise TrackingError(f"tracking backend {preferred} does not work here: {results[preferred].detail}")
        return BACKENDS[preferred]()
    for name in BACKENDS:
        if results[name].works:
            return BACKENDS[name]()
    raise TrackingError("no tracking backend works here: "
                        + "; ".join(f"{r.name}: {r.detail}" for r in results.values()))
