"""Restore stubs made while Python threads spin: how many hang before their exec, how long one takes.

A restore makes each tree's first process with a raw clone3 (engine/launch.py) from a
process whose other threads may be running Python (the node service's workers). A child
that runs Python before its exec can wait forever for the interpreter lock; this makes
--count stubs one after another at free PIDs while --threads threads spin in Python, and
counts the stubs that did not stop at their exec within --deadline seconds (killed, not
retried). Run it with each tree's interpreter to compare (both have launch._clone_stub):
  cd /work/main && .venv/bin/python /path/to/benchmarks/bench_stubs.py
Usage: bench_stubs.py [--count 200] [--threads 4] [--deadline 5] [--interval 0.005]
"""
import argparse
import os
import signal
import statistics
import sys
import threading
import time

import hpcckpt
from hpcckpt.engine import launch
from hpcckpt.kernel import ptrace


def free_pid(start: int) -> int:
    pid = start
    while os.path.exists(f"/proc/{pid}"):
        pid = pid + 1 if pid < 32000 else 20000
    return pid


def spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():        # pure Python: asks for the GIL every switch interval
        n += 1


def storm(count: int, threads: int, deadline: float, interval: float) -> tuple[int, list[float]]:
    """(stubs that hung, seconds each good stub took to reach its exec stop). The GIL's
    switch interval is set to `interval`: the shorter, the likelier another thread's
    request to take the lock is pending while the clone runs (the hang's condition)."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    stop = threading.Event()
    workers = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    hung, times = 0, []
    pid = 20000 + os.getpid() % 10000
    try:
        for _ in range(count):
            pid = free_pid(pid + 1)
            t0 = time.perf_counter()
            try:
                child = launch._clone_stub(pid)
            except hpcckpt.errors.RestoreError:      # taken meanwhile by another process
                continue
            end = time.monotonic() + deadline
            while (st := ptrace.wait(child, nohang=True)) is None and time.monotonic() < end:
                time.sleep(0.0005)
            if st is None:
                hung += 1
            else:
                times.append(time.perf_counter() - t0)
            os.kill(child, signal.SIGKILL)
            while not ptrace.wait(child).exited:
                pass
    finally:
        sys.setswitchinterval(old_interval)
        stop.set()
        for w in workers:
            w.join()
    return hung, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.005, help="GIL switch interval, s (default 5 ms)")
    args = ap.parse_args()
    hung, times = storm(args.count, args.threads, args.deadline, args.interval)
    print(f"{os.path.dirname(hpcckpt.__file__)}: {args.count} stubs, {args.threads} spinning threads, "
          f"switch interval {args.interval * 1e3:g} ms: "
          f"{hung} hung ({hung / args.count:.1%}), median {statistics.median(times) * 1e3:.2f} ms "
          f"to the exec stop, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
