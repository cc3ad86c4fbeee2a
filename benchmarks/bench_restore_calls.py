"""Syscalls a restore makes in each extra process of a tree, by kind: injected one by one
(a ptrace round trip each) and queued into blocks (kernel/effects.py, one stop per block),
with the ptrace requests they cost (cont: one per block). Trees of 1 and N processes (benchmarks/treehog.c, as
bench_trees.py makes them); the figures are (N-process tree - 1-process tree) / (N - 1).
Runs with either tree's interpreter (old code has no queued calls):
  cd /work/main && .venv/bin/python /path/to/benchmarks/bench_restore_calls.py
Usage: bench_restore_calls.py [--n 16]
"""
import argparse
import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trees as bt  # noqa: E402

from hpcckpt.kernel import inject, ptrace  # noqa: E402
from hpcckpt.kernel.libc import libc  # noqa: E402

injected, queued, requests = collections.Counter(), collections.Counter(), collections.Counter()


def _count(counter, key, fn):
    def wrapped(*a, **k):
        counter[key(*a)] += 1
        return fn(*a, **k)
    return wrapped


def instrument() -> None:
    inject.Injector.syscall = _count(injected, lambda self, name, *a: name, inject.Injector.syscall)
    try:
        from hpcckpt.kernel import effects
    except ImportError:
        effects = None
    if effects is not None:
        effects.Queue.add = _count(queued, lambda self, name, *a: name, effects.Queue.add)
    for name in ("set_regs", "get_regs", "singlestep", "cont", "wait"):
        setattr(ptrace, name, _count(requests, lambda *a, n=name: n, getattr(ptrace, name)))


def counted_restore(exe: Path, work: Path, n: int) -> tuple[dict, dict, dict]:
    restore = bt.restore

    def measured(img, **kw):
        for c in (injected, queued, requests):
            c.clear()
        return restore(img, **kw)
    bt.restore = measured
    try:
        bt.one(exe, work, n, 1024, None)
    finally:
        bt.restore = restore
    return dict(injected), dict(queued), dict(requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    instrument()
    if libc.prctl(bt.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("cannot become a child subreaper")
    work = Path(tempfile.mkdtemp(prefix="restore-calls-"))
    try:
        exe = bt.build(work)
        one, many = counted_restore(exe, work, 1), counted_restore(exe, work, args.n)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def per(i: int, key: str) -> float:
        return (many[i].get(key, 0) - one[i].get(key, 0)) / (args.n - 1)
    for i, what in ((0, "injected one by one"), (1, "queued into blocks"), (2, "ptrace requests")):
        keys = sorted(set(many[i]) | set(one[i]), key=lambda k: -per(i, k))
        total = sum(per(i, k) for k in keys) if i < 2 else None
        print(f"{what}, per extra process" + (f": {total:.1f}" if total is not None else ""))
        print("   " + ", ".join(f"{k} {per(i, k):.1f}" for k in keys if abs(per(i, k)) >= 0.05))
    print(f"({os.path.dirname(inject.__file__)}, load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    sys.exit(main())
