"""hpcckptd: round-trip latency of a no-op request, a dump through the service vs direct,
and migration throughput between two network-namespace "nodes" (a veth pair, addresses
only inside the namespaces made here) as a ratio to a plain TCP copy of the same bytes
over the same link. Usage: bench_service.py [--mib 256] [--n 200] [--migrate 256,1024]"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcckpt.client import Client
from hpcckpt.engine.dump import dump

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--migrate", default="256,1024", help="MiB sizes for the migration runs ('' to skip)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-svc-"))
    sock = str(work / "d.sock")
    d = subprocess.Popen([sys.executable, "-m", "hpcckpt.service.daemon", "--socket", sock],
                         stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            time.sleep(0.01)
        c = Client(sock)
        c.status()
        lat = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            c.status()
            lat.append((time.perf_counter() - t0) * 1000)
        print(f"no-op (status) round trip: median {statistics.median(lat):.3f} ms, "
              f"p99 {sorted(lat)[int(len(lat) * 0.99) - 1]:.3f} ms over {args.n}")
        exe = work / "memhog"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "memhog.c")], check=True)
        for how in ("direct", "service"):
            p = subprocess.Popen([str(exe), str(args.mib)], stdout=subprocess.PIPE)
            p.stdout.readline()
            img = work / f"img-{how}"
            t0 = time.perf_counter()
            if how == "direct":
                dump(p.pid, img, show_progress=False)
            else:
                c.dump(p.pid, str(img))
            dt = time.perf_counter() - t0
            p.wait()
            print(f"dump of {args.mib} MiB {how:8}: {dt:.3f} s")
            shutil.rmtree(img)
        if args.migrate:
            from bench_migrate import bench_migration
            bench_migration([int(m) for m in args.migrate.split(",")], exe, work)
    finally:
        d.terminate()
        d.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
