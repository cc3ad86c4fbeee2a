"""The pause a connected client sees while its server is checkpointed.

A client (benchmarks/rr.c, a separate process) sends 64-byte requests back to back over
one loopback TCP connection and times each round trip; the server answers each. While it
runs, the server is checkpointed with --tcp-established in one of these ways:
  leave-running  dump, the server frozen for the whole dump, then thawed
  live           dump --live: frozen only to be snapshotted, memory written while it runs
  kill+restore   dump (the server killed, its connection locked), then restored
The pause is the longest round trip during the checkpoint; the baseline is the median
round trip of the same client before it, in the same run. Every answer is checked (a
lost, repeated or reset request ends the client with an error), so "lost 0" means none.
Usage: bench_tcp.py [--repeat N] [--dir DIR]
"""
import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from hpcckpt.engine.dump import dump
from hpcckpt.engine.restore import restore

HERE = Path(__file__).resolve().parent
BEFORE, AFTER = 1.0, 1.5       # seconds of plain round trips around the checkpoint


def build(tmp: Path) -> Path:
    exe = tmp / "rr"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "rr.c")], check=True)
    return exe


def samples(path: Path) -> list[tuple[float, float]]:
    data = path.read_bytes()
    return [struct.unpack_from("dd", data, off) for off in range(0, len(data) - 15, 16)]


def one(exe: Path, work: Path, how: str) -> dict:
    images = work / f"img-{how}"
    shutil.rmtree(images, ignore_errors=True)
    srv = subprocess.Popen([str(exe), "server", "127.0.0.1"], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    port = srv.stdout.readline().split()[1].decode()
    srv.stdout.close()
    rec = work / f"rtt-{how}.bin"
    restored = None
    cli = subprocess.Popen([str(exe), "client", "127.0.0.1", port, str(BEFORE + AFTER + 3), str(rec)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cli.stdout.readline()
        time.sleep(BEFORE)
        t0 = time.monotonic()
        if how == "leave-running":
            r = dump(srv.pid, images, leave_running=True, show_progress=False, tcp_established=True)
        elif how == "live":
            r = dump(srv.pid, images, live=True, show_progress=False, tcp_established=True)
        else:
            r = dump(srv.pid, images, show_progress=False, tcp_established=True)
            srv.wait()
            restored = restore(images, show_progress=False).pid
        t1 = time.monotonic()
        err = cli.communicate(timeout=60)[1].decode()
        ok = cli.returncode == 0
    finally:
        for p in (cli, srv):
            if p.poll() is None:
                p.kill()
                p.wait()
        if restored:
            subprocess.run(["kill", "-9", str(restored)])
            try:
                os.waitpid(restored, 0)
            except ChildProcessError:
                pass
    s = samples(rec)
    base = statistics.median(rtt for start, rtt in s if start < t0 - 0.1)
    during = [rtt for start, rtt in s if t0 - 0.05 <= start <= t1]
    return {"how": how, "base": base, "pause": max(during) if during else float("nan"),
            "frozen": r.frozen_s, "op": t1 - t0, "requests": len(s), "lost": 0 if ok else err.strip()}


def lock_cost(n: int = 20) -> tuple[float, float, float]:
    """Median seconds to lock one connection (table made), to let it through, to delete
    the table: the network lock's own share of the pause (the last is not in it)."""
    from hpcckpt.kernel import netlock
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    times = []
    for i in range(n):
        lk = netlock.NetLock(netlock.table_name(100000 + i))
        t0 = time.perf_counter()
        lk.lock(a, socket.AF_INET, a.getsockname(), a.getpeername())
        t1 = time.perf_counter()
        lk.open()
        t2 = time.perf_counter()
        lk.cleanup()
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    for x in (a, c, ls):
        x.close()
    return tuple(statistics.median(t[k] for t in times) for k in range(3))


def redis_under_load(work: Path, checkpoint: bool) -> tuple[float, str]:
    """Seconds redis-benchmark (4 connections, 100000 SETs) takes against a redis-server,
    with or without a dump (kill) + restore of the server midway; and its error lines."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    images = work / f"redis-img-{checkpoint}"
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--logfile", str(work / "redis.log")],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    restored = None
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout != b"PONG\n":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        t0 = time.monotonic()
        bench = subprocess.Popen(["redis-benchmark", "-p", str(port), "-c", "4", "-n", "100000", "-t", "set",
                                  "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if checkpoint:
            time.sleep(1.0)
            dump(srv.pid, images, show_progress=False, tcp_established=True)
            srv.wait()
            restored = restore(images, show_progress=False).pid
        out = bench.communicate(timeout=300)[0].decode(errors="replace")
        dt = time.monotonic() - t0
        errors = [x for x in out.replace("\r", "\n").splitlines() if "rror" in x or bench.returncode]
        return dt, "; ".join(errors[:3])
    finally:
        for pid in (srv.pid, restored):
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        srv.wait()
        if restored:
            try:
                os.waitpid(restored, 0)
            except ChildProcessError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tcp-bench-", dir=args.dir))
    try:
        exe = build(work)
        print(f"{'checkpoint':14} {'RTT base':>9} {'pause':>9} {'pause/RTT':>10} {'frozen':>9} "
              f"{'dump(+rst)':>10} {'requests':>9}  lost")
        for how in ("leave-running", "live", "kill+restore"):
            for _ in range(args.repeat):
                x = one(exe, work, how)
                print(f"{x['how']:14} {x['base'] * 1e6:7.1f}us {x['pause'] * 1e3:7.1f}ms "
                      f"{x['pause'] / x['base']:9.0f}x {x['frozen'] * 1e3:7.1f}ms {x['op'] * 1e3:8.1f}ms "
                      f"{x['requests']:9d}  {x['lost']}", flush=True)
        if shutil.which("redis-server") and shutil.which("redis-benchmark"):
            plain, err0 = redis_under_load(work, False)
            ckpt, err1 = redis_under_load(work, True)
            print(f"redis-benchmark, 100000 SETs on 4 connections: {plain:.2f} s plain, {ckpt:.2f} s with the "
                  f"server dumped, killed and restored midway ({ckpt / plain:.2f}x); errors: "
                  f"{err0 or 'none'} / {err1 or 'none'}")
        lock, unlock, delete = lock_cost()
        print(f"network lock alone: lock {lock * 1e3:.2f} ms, let through {unlock * 1e3:.2f} ms "
              f"(both inside the pause), delete table {delete * 1e3:.1f} ms (after the thaw)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
