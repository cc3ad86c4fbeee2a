"""Freeze, dump and restore of process trees of 1, 16 and 128 processes.

Each process (benchmarks/treehog.c, fan-out 4) holds 1 MiB of written memory and a few
fds (/dev/null, a pipe of its own, a file, the tree's ready pipe). Prints the median
over --repeat runs of: freeze (freeze_tree then thaw, the tree running), dump (the CLI's
engine call: frozen, written, killed), restore (running again), each as a total and as
ms per extra process (the slope against the 1-process tree), beside a baseline measured
in the same run: copying the same bytes out of the same processes with process_vm_readv
into one file per process, fsync included, i.e. what a dump could not go below.
With --cgroup the tree runs in a cgroup v2 of its own, so freeze and dump go through
the cgroup freezer (cgroup.freeze) instead of ptrace alone.
Usage: bench_trees.py [--dir DIR] [--sizes 1,16,128] [--repeat 3] [--kib 1024] [--cgroup]
       [--profile dump|restore|freeze] (cProfile of the largest tree, top functions)
"""
import argparse
import cProfile
import ctypes
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcckpt.engine import tree as ptree
from hpcckpt.engine.cgroup_freezer import v2_mount
from hpcckpt.engine.dump import dump
from hpcckpt.engine.restore import restore
from hpcckpt.kernel import proc
from hpcckpt.kernel.libc import libc, vm_read

HERE = Path(__file__).resolve().parent
PR_SET_CHILD_SUBREAPER = 36


def build(tmp: Path) -> Path:
    exe = tmp / "treehog"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "treehog.c")], check=True)
    return exe


def members(root: int) -> list[int]:
    return ptree.members(root, ptree.scan(), None)[0]


def reap_all() -> None:
    """We are a subreaper: whatever the tree left behind is ours to collect."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG | 0x40000000)[0] == 0:
                time.sleep(0.01)
                continue
        except ChildProcessError:
            return


def kill_tree(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reap_all()


def start(exe: Path, n: int, kib: int, work: Path, cg: Path | None = None) -> tuple[subprocess.Popen, list[int]]:
    def join() -> None:
        (cg / "cgroup.procs").write_text(str(os.getpid()))
    p = subprocess.Popen([str(exe), str(n), str(kib), str(exe)], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=join if cg else None)
    assert p.stdout.readline() == b"ready\n"
    pids = members(p.pid)
    assert len(pids) == n, (len(pids), n)
    return p, pids


def baseline(pids: list[int], work: Path) -> float:
    """process_vm_readv of each process's private written memory into a file of its own,
    fsynced: the bytes a dump must move, at the kernel's speed."""
    buf = ctypes.create_string_buffer(4 << 20)
    addr = ctypes.addressof(buf)
    view = memoryview(buf).cast("B")
    ranges = {}
    for pid in pids:     # the layout is known before the clock starts, as a dump's pagemap is
        ranges[pid] = [(v.start, v.size) for v in proc.maps(pid, with_flags=False)
                       if v.anonymous and "w" in v.prot]
    t0 = time.perf_counter()
    fds = []
    for pid in pids:
        fd = os.open(work / f"raw-{pid}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fds.append(fd)
        for start, size in ranges[pid]:
            done = 0
            while done < size:
                n = min(len(buf), size - done)
                got = vm_read(pid, addr, start + done, n)
                os.write(fd, view[:got])
                done += n
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    dt = time.perf_counter() - t0
    for pid in pids:
        (work / f"raw-{pid}").unlink()
    return dt


def one(exe: Path, work: Path, n: int, kib: int, profile: str | None, cg: Path | None = None) -> dict:
    p, pids = start(exe, n, kib, work, cg)
    base = baseline(pids, work)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profile == "freeze":
        prof.enable()
    ft = ptree.freeze_tree(p.pid)
    fr = time.perf_counter() - t0
    if (ft.cgroup is not None) != (cg is not None):
        raise SystemExit(f"froze through {ft.cgroup} where {cg} was meant")
    ft.thaw()
    if profile == "freeze":
        prof.disable()
    img = work / f"img-{n}"
    if profile == "dump":
        prof.enable()
    d = dump(p.pid, img, show_progress=False)
    if profile == "dump":
        prof.disable()
    p.wait()
    reap_all()
    t0 = time.perf_counter()
    if profile == "restore":
        prof.enable()
    res = restore(img, show_progress=False)
    if profile == "restore":
        prof.disable()
    rt = time.perf_counter() - t0
    back = members(res.pid)
    kill_tree(back)
    image = sum(f.stat().st_size for f in img.iterdir())
    shutil.rmtree(img)
    if len(back) != n:
        raise SystemExit(f"restored tree has {len(back)} processes, not {n}")
    return dict(n=n, base=base, freeze=fr, dump=d.total_s, frozen=d.frozen_s, restore=rt,
                image=image, prof=prof, spans=d.spans)


def per_extra(rows: dict[int, dict], key: str, n: int) -> float:
    """ms per process beyond the first."""
    if n == 1 or 1 not in rows:
        return float("nan")
    return (rows[n][key] - rows[1][key]) / (n - 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(HERE / "out"))
    ap.add_argument("--sizes", default="1,16,128")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kib", type=int, default=1024)
    ap.add_argument("--profile", choices=["freeze", "dump", "restore"])
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--cgroup", action="store_true", help="each tree in a cgroup v2 of its own")
    args = ap.parse_args()
    cg = None
    if args.cgroup:
        mnt = v2_mount()
        if mnt is None:
            raise SystemExit("no cgroup v2 hierarchy mounted")
        cg = mnt / f"treeperf-bench-{os.getpid()}"
        cg.mkdir()
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("cannot become a child subreaper")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="treeperf-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        exe = build(work)
        rows: dict[int, dict] = {}
        for n in sizes:
            runs = [one(exe, work, n, args.kib, args.profile if n == max(sizes) else None, cg)
                    for _ in range(args.repeat)]
            rows[n] = {k: statistics.median(r[k] for r in runs)
                       for k in ("base", "freeze", "dump", "frozen", "restore", "image")}
            rows[n]["prof"] = runs[-1]["prof"]
            rows[n]["spans"] = {k: statistics.median(r["spans"].get(k, 0.0) for r in runs)
                                for k in runs[0]["spans"]}
        print(f"{'procs':>5} {'base s':>7} {'freeze s':>8} {'dump s':>7} {'frozen s':>8} "
              f"{'restore s':>9} {'dump/base':>9} {'image MiB':>9} | ms per extra process: "
              f"{'base':>5} {'freeze':>6} {'dump':>6} {'restore':>7} {'dump/base':>9}")
        for n in sizes:
            r = rows[n]
            pb_, pd = per_extra(rows, "base", n), per_extra(rows, "dump", n)
            print(f"{n:5} {r['base']:7.3f} {r['freeze']:8.3f} {r['dump']:7.3f} {r['frozen']:8.3f} "
                  f"{r['restore']:9.3f} {r['dump'] / r['base']:9.1f} {r['image'] / 2**20:9.1f} | "
                  f"{'':>22}{pb_:5.2f} {per_extra(rows, 'freeze', n):6.2f} {pd:6.2f} "
                  f"{per_extra(rows, 'restore', n):7.2f} {pd / pb_ if pb_ == pb_ else float('nan'):9.1f}",
                  flush=True)
        big = max(sizes)
        if 1 in rows and big > 1:       # where the dump's time per extra process goes
            parts = {k: (v - rows[1]["spans"].get(k, 0.0)) / (big - 1) * 1e3
                     for k, v in rows[big]["spans"].items()}
            print(f"dump, ms per extra process by phase ({big} vs 1, DumpResult.spans): "
                  + ", ".join(f"{k.removeprefix('frozen: ')} {v:.2f}" for k, v in parts.items() if abs(v) >= 0.01))
        if args.profile:
            print(f"\ncProfile of the {args.profile} of {max(sizes)} processes (last run):")
            pstats.Stats(rows[max(sizes)]["prof"]).sort_stats("tottime").print_stats(args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cg is not None:
            cg.rmdir()


if __name__ == "__main__":
    sys.exit(main())
