#!/usr/bin/env python3
"""Dirty-page tracking costs, per backend that works here.

For a target holding SIZE (default 1 GiB) of written anonymous memory: the time to arm,
the time of a collect with 0, 1000 and all pages written since the last one (in ms, and
ms per GiB), and what tracking costs the target: ns per page for its first write to a
page after a collect, against the same writes untracked.

    .venv/bin/python benchmarks/bench_tracking.py [--gib 1] [--backends uffd-wp,hashing]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hpcckpt.engine.freeze import freeze  # noqa: E402
from hpcckpt.kernel import proc  # noqa: E402
from hpcckpt.tracking.select import BACKENDS, probe  # noqa: E402
from hpcckpt.tracking.regions import regions  # noqa: E402
from tests.tracking.helpers import PAGE, Target  # noqa: E402


def _fork_pause(pid: int) -> float:
    """Seconds a fork snapshot (engine/snapshot.py) of the frozen process takes."""
    from hpcckpt.engine import snapshot
    fr = freeze(pid)
    try:
        t0 = time.perf_counter()
        sn = snapshot.take(fr)
        dt = time.perf_counter() - t0
    finally:
        fr.thaw()
    snapshot.release(sn)
    return dt


def frozen_call(pid, fn):
    fr = freeze(pid)
    try:
        vmas = proc.maps(pid)
        t0 = time.perf_counter()
        res = fn(vmas, fr)
        return time.perf_counter() - t0, res
    finally:
        fr.thaw()


def write_ns(t: Target, addr: int, n: int, step: int = 1) -> float:
    return int(t.cmd(f"t {addr:x} {n} {step}")) / n


def bench(name: str, gib: float) -> dict:
    npages = int(gib * (1 << 30)) // PAGE
    t = Target()
    try:
        buf = t.alloc(npages)
        base_ns = write_ns(t, buf, npages)          # untracked rewrite of present pages
        tr = BACKENDS[name]()
        arm_s, _ = frozen_call(t.pid, lambda v, fr: tr.arm(t.pid, fr, v))
        res = {"arm": arm_s}
        c0, d = frozen_call(t.pid, lambda v, fr: tr.collect(t.pid, v))
        res["collect 0"] = c0
        step = npages // 1000
        t.write(buf, 1000, step)
        c1, d1 = frozen_call(t.pid, lambda v, fr: tr.collect(t.pid, v))
        res["collect 1000"] = c1
        assert len(d1[buf]) == 1000, (name, len(d1[buf]))
        tracked_ns = write_ns(t, buf, npages)      # first write to each page after a collect
        call, dall = frozen_call(t.pid, lambda v, fr: tr.collect(t.pid, v))
        res["collect all"] = call
        assert len(dall[buf]) == npages
        res["write ns untracked"] = base_ns
        res["write ns tracked"] = tracked_ns
        tr.disarm()
        return res
    finally:
        t.close()


UFFDIO_WRITEPROTECT = 0xC018AA06


def live_routes(gib: float, reps: int = 5, huge: bool = False) -> dict:
    """What a live snapshot pauses the job for, by route, on SIZE written memory:
    fork (engine/snapshot.py: an injected clone copies the page tables) vs synchronous
    userfaultfd write-protect (a uffd without WP_ASYNC, registered on the writable
    mappings, then UFFDIO_WRITEPROTECT over them: every later write faults to us first).
    Both measured while the target is frozen; medians of `reps`."""
    import fcntl
    import statistics
    import struct
    from hpcckpt.tracking import userfaultfd as uf
    from hpcckpt.tracking.target import injector
    npages = int(gib * (1 << 30)) // PAGE
    t = Target()
    out = {"fork": [], "uffd-wp sync": []}
    try:
        t.alloc(npages, huge=huge)
        for _ in range(reps):
            out["fork"].append(_fork_pause(t.pid))
            fr = freeze(t.pid)
            fd = -1
            try:
                t0 = time.perf_counter()
                with injector(t.pid, fr) as inj:
                    fd = uf.open_in_target(inj, t.pid)
                fcntl.ioctl(fd, uf.UFFDIO_API, bytearray(struct.pack("<3Q", uf.UFFD_API, uf.UFFD_FEATURE_WP_UNPOPULATED, 0)))
                for v in proc.maps(t.pid, with_flags=False):   # sync WP: anonymous memory only
                    if v.prot[1] == "w" and v.prot[3] == "p" and v.inode == 0 and not v.path.startswith("[v"):
                        uf.register_wp(fd, v.start, v.end - v.start)
                        fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, bytearray(struct.pack("<3Q", v.start, v.end - v.start, 1)))
                out["uffd-wp sync"].append(time.perf_counter() - t0)
            finally:
                if fd >= 0:
                    os.close(fd)
                fr.thaw()
    finally:
        t.close()
    med = {k: statistics.median(v) for k, v in out.items()}
    print(f"live snapshot pause on {gib:g} GiB{' (THP)' if huge else ''}: fork {med['fork'] * 1e3:.1f} ms "
          f"({med['fork'] * 1e3 / gib:.1f} ms/GiB); arming synchronous uffd-wp "
          f"{med['uffd-wp sync'] * 1e3:.1f} ms ({med['uffd-wp sync'] * 1e3 / gib:.1f} ms/GiB)")
    return med


def handover(gib: float, reps: int = 3) -> dict:
    """What a live snapshot by synchronous write-protect would pause a job for whose async
    uffd-wp tracking is armed (a VMA takes one userfaultfd): first freeze: collect the
    tracker, unregister it, make, register and protect the synchronous uffd; second
    freeze, after the copy: close the synchronous uffd (the kernel clears its wp bits)
    and register and protect the tracker's again. Medians of `reps`, ms."""
    import statistics
    from hpcckpt.engine.wpsnapshot import WpSnapshot
    from hpcckpt.tracking import userfaultfd as uf
    from hpcckpt.tracking.target import injector
    from hpcckpt.tracking.uffd_wp import UffdWpTracker
    import fcntl
    import struct
    npages = int(gib * (1 << 30)) // PAGE
    t = Target()
    out = {"first freeze": [], "second freeze": [], "fork": []}
    try:
        t.alloc(npages)
        tr = UffdWpTracker()
        frozen_call(t.pid, lambda v, fr: tr.arm(t.pid, fr, v))
        for _ in range(reps):
            fr = freeze(t.pid)
            try:
                vmas = proc.maps(t.pid)
                t0 = time.perf_counter()
                tr.collect(t.pid, vmas)
                for v in vmas:
                    if "uw" in v.vmflags:
                        fcntl.ioctl(tr.fd, uf.UFFDIO_UNREGISTER, struct.pack("<2Q", v.start, v.end - v.start))
                with injector(t.pid, fr) as inj:
                    s = WpSnapshot.arm(t.pid, inj, proc.maps(t.pid))
                out["first freeze"].append(time.perf_counter() - t0)
            finally:
                fr.thaw()
            s.split([])      # write faults served (no copy here): a thread stopped in one
            s.serve()        # (e.g. the kernel's rseq update) could not be frozen again
            fr = freeze(t.pid)
            try:
                t0 = time.perf_counter()
                s.close()
                tr._register([r for r in regions(proc.maps(t.pid, with_flags=False)) if r.trackable])
                tr._scan_written(regions(proc.maps(t.pid, with_flags=False)))
                out["second freeze"].append(time.perf_counter() - t0)
            finally:
                fr.thaw()
            out["fork"].append(_fork_pause(t.pid))
        tr.disarm()
    finally:
        t.close()
    med = {k: statistics.median(v) * 1e3 for k, v in out.items()}
    print(f"{gib:g} GiB, async uffd-wp armed: live by write-protect would freeze {med['first freeze']:.1f} ms "
          f"(collect, unregister, arm) + {med['second freeze']:.1f} ms (re-arm the tracker); "
          f"the fork route {med['fork']:.1f} ms; load {os.getloadavg()[0]:.1f}")
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--backends", default="")
    ap.add_argument("--live-routes", action="store_true", help="only: fork vs sync uffd-wp pause")
    ap.add_argument("--huge", action="store_true", help="with --live-routes: memory in transparent huge pages")
    ap.add_argument("--handover", action="store_true",
                    help="only: the pauses of handing async uffd-wp tracking over to a live snapshot and back")
    a = ap.parse_args()
    if a.handover:
        handover(a.gib)
        return
    if a.live_routes:
        live_routes(a.gib, huge=a.huge)
        return
    works = {r.name: r for r in probe()}
    names = [n for n in (a.backends.split(",") if a.backends else BACKENDS) if n]
    print(f"target: {a.gib:g} GiB of written anonymous memory; kernel {os.uname().release}")
    print(f"{'backend':<11} {'arm':>9} {'coll 0':>9} {'coll 1000':>10} {'coll all':>9}   "
          f"(ms; per GiB)   first write after reset: tracked / untracked ns per page")
    for n in names:
        if not works[n].works:
            print(f"{n:<11} does not work here: {works[n].detail}")
            continue
        r = bench(n, a.gib)
        ms = lambda k: f"{r[k] * 1e3:9.2f}"  # noqa: E731
        per = lambda k: r[k] * 1e3 / a.gib  # noqa: E731
        print(f"{n:<11} {ms('arm')} {ms('collect 0')} {ms('collect 1000'):>10} {ms('collect all')}"
              f"   ({per('arm'):.2f} / {per('collect 0'):.2f} / {per('collect 1000'):.2f} / "
              f"{per('collect all'):.2f} ms/GiB)   {r['write ns tracked']:.0f} / "
              f"{r['write ns untracked']:.0f} ns (+{r['write ns tracked'] - r['write ns untracked']:.0f})")


if __name__ == "__main__":
    main()
