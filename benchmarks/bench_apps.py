"""Requests lost and the longest pause clients see while a real server is checkpointed.

nginx (a master and 2 workers) serves a 16 KiB file to three clients (benchmarks/
http_load.py, separate processes): two on keep-alive connections and one making a new
connection per request. While they run, nginx is checkpointed with --tcp-established:
  live           dump --live: frozen only to be snapshotted, memory written while it runs
  leave-running  dump, the tree frozen for the whole dump, then thawed
  kill+restore   dump (the tree killed, its connections locked), then restored
Figures per client kind: requests lost (a failed, refused, reset or wrong answer), and the
pause (the longest request during the checkpoint) as a ratio to the median request of the
same client before it, in the same run. Aims (issue 8): zero lost, pause under 50 ms with
--live.
Usage: bench_apps.py [--repeat N] [--dir DIR]
"""
import argparse
import ctypes
import hashlib
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcckpt.engine.dump import dump
from hpcckpt.engine.restore import restore
from hpcckpt.kernel import netlock

HERE = Path(__file__).resolve().parent
BEFORE, AFTER = 1.0, 2.5       # seconds of plain requests around the checkpoint
CLIENTS = (("keepalive", 2), ("fresh", 1))
PR_SET_CHILD_SUBREAPER = 36


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(work: Path, www: Path, port: int) -> subprocess.Popen:
    conf = work / "nginx.conf"
    conf.write_text(f"""daemon off; master_process on; worker_processes 2;
pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{ access_log off; keepalive_timeout 300s; keepalive_requests 1000000;
  client_body_temp_path {work}/b; proxy_temp_path {work}/p; fastcgi_temp_path {work}/f;
  uwsgi_temp_path {work}/u; scgi_temp_path {work}/s;
  server {{ listen 127.0.0.1:{port}; root {www}; }} }}
""")
    p = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            assert time.monotonic() < deadline and p.poll() is None, "nginx did not start"
            time.sleep(0.05)


def records(path: Path) -> list[tuple[float, float, float]]:
    data = path.read_bytes()
    return [struct.unpack_from("ddd", data, off) for off in range(0, len(data) - 23, 24)]


def tree_pids(root: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True, text=True).stdout
    return [root] + [int(x) for x in out.split()]


def one(work: Path, www: Path, digest: str, how: str) -> dict:
    port = free_port()
    images = work / f"img-{how}"
    shutil.rmtree(images, ignore_errors=True)
    srv = start_nginx(work, www, port)
    restored = None
    clients = []
    try:
        for kind, n in CLIENTS:
            for i in range(n):
                rec = work / f"{how}-{kind}-{i}.bin"
                c = subprocess.Popen(["nice", "-n", "10", sys.executable, HERE / "http_load.py", str(port), "/page.bin", digest,
                                      str(BEFORE + AFTER + 2), str(rec), kind], stdout=subprocess.PIPE)
                clients.append((kind, rec, c))
        for _, _, c in clients:
            c.stdout.readline()
        time.sleep(BEFORE)
        t0 = time.monotonic()
        if how == "live":
            r = dump(srv.pid, images, live=True, show_progress=False, tcp_established=True)
        elif how == "leave-running":
            r = dump(srv.pid, images, leave_running=True, show_progress=False, tcp_established=True)
        else:
            members = tree_pids(srv.pid)
            r = dump(srv.pid, images, show_progress=False, tcp_established=True)
            srv.wait()
            while any(os.path.exists(f"/proc/{p}") for p in members):    # the workers: ours to reap
                try:
                    os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.001)
            restored = restore(images, show_progress=False).pid
        t1 = time.monotonic()
        for _, _, c in clients:
            c.wait(timeout=120)
    finally:
        for _, _, c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        for pid in tree_pids(restored or srv.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if srv.poll() is None:
            srv.wait()
        for t in netlock.tables():
            if t.endswith(f"_{srv.pid}"):
                netlock.nft(netlock.delete_script(t))
    out = {"how": how, "frozen": r.frozen_s, "op": t1 - t0}
    for kind, _ in CLIENTS:
        recs = [x for k, rec, _ in clients if k == kind for x in records(rec)]
        base = statistics.median(d for s, d, ok in recs if s < t0 - 0.1 and ok)
        during = [d for s, d, ok in recs if t0 - 0.05 <= s <= t1 + 0.05]
        out[kind] = {"base": base, "pause": max(during) if during else float("nan"),
                     "lost": sum(1 for _, _, ok in recs if not ok), "requests": len(recs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if not shutil.which("nginx"):
        sys.exit("bench_apps: nginx is not installed (scripts/test-packages.sh installs it)")
    # the killed master's workers come to us, not to a slow init: as `hpcckpt run`'s init does
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(tempfile.mkdtemp(prefix="apps-bench-", dir=args.dir))
    www = Path(tempfile.mkdtemp(prefix="apps-bench-www-"))
    try:
        work.chmod(0o755)
        www.chmod(0o755)
        page = random.Random(1).randbytes(16 << 10)
        (www / "page.bin").write_bytes(page)
        (www / "page.bin").chmod(0o644)
        digest = hashlib.sha256(page).hexdigest()
        print(f"{'checkpoint':14} {'client':10} {'base':>8} {'pause':>9} {'pause/base':>10} {'lost':>5} "
              f"{'requests':>8} {'frozen':>8} {'op':>8}")
        for how in ("live", "leave-running", "kill+restore"):
            for _ in range(args.repeat):
                x = one(work, www, digest, how)
                for kind, _ in CLIENTS:
                    y = x[kind]
                    print(f"{how:14} {kind:10} {y['base'] * 1e3:6.2f}ms {y['pause'] * 1e3:7.1f}ms "
                          f"{y['pause'] / y['base']:9.0f}x {y['lost']:5d} {y['requests']:8d} "
                          f"{x['frozen'] * 1e3:6.0f}ms {x['op'] * 1e3:6.0f}ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(www, ignore_errors=True)


if __name__ == "__main__":
    main()
