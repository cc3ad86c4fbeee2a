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
from tests.tracking.helpers import PAGE, Target  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--backends", default="")
    a = ap.parse_args()
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
