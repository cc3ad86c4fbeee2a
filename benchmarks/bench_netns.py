"""What taking the job's network namespace along costs a connected client.

Two test nodes (tests/netnodes.py: a bridge per node, joined over a veth pair); a server
(benchmarks/rr.c) in a namespace of its own on node A, a client in a third namespace
on the same segment sending 64-byte requests back to back and timing each round trip.
The server is dumped with --tcp-established (killed, its connection locked) and restored,
on node A, in one of two ways, through the CLI as an operator would:
  same-netns   the job's namespace stays (named); restored into it (`ip netns exec`)
  --netns      dumped with --netns (the namespace goes with the job), restored into a
               new one built from the image, its veth back on the bridge
  migrate      the server, under `hpcckpt run --netns`, moved to node B by `hpcckpt migrate
               --tcp-established --netns` (node B's hpcckptd, munge; the client stays on A)
The pause is the longest round trip during the checkpoint; the baseline is the median
round trip before it, in the same run; the figure to read is the ratio of the two modes'
pauses (both include a TCP retransmission timeout of the client). Every answer is checked
(a lost, repeated or reset request ends the client with an error).
Usage: bench_netns.py [--repeat N]   (root; installs munge if missing)
"""
import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_tcp import build, samples  # noqa: E402
from tests.netnodes import two_nodes  # noqa: E402

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]
BEFORE = 1.0
PORT = 7078


@contextlib.contextmanager
def munged():
    """A private munged (as tests/service/test_migrate.py starts one)."""
    if not shutil.which("munged"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "munge"], check=True)
    d = Path(tempfile.mkdtemp(prefix="netns-bench-munge-", dir="/tmp"))
    d.chmod(0o755)
    m = d / "m"
    m.mkdir()
    key = m / "munge.key"
    key.write_bytes(os.urandom(1024))
    for x in (m, key):
        shutil.chown(x, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force", f"--socket={m}/munge.socket",
                    f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                    f"--seed-file={m}/munged.seed"], check=True)
    m.chmod(0o711)
    try:
        yield str(m / "munge.socket")
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((m / "munged.pid").read_text()), 15)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def daemon(nodes, msock: str):
    """hpcckptd on node B, listening for migrations."""
    run_dir = Path(tempfile.mkdtemp(prefix="netns-bench-d-", dir="/tmp"))
    p = subprocess.Popen(["ip", "netns", "exec", nodes.b, sys.executable, "-m", "hpcckpt.service.daemon",
                          "--socket", str(run_dir / "d.sock"), "--listen", f"{nodes.addr_b}:{PORT}",
                          "--spool", str(run_dir / "spool"), "--munge-socket", msock], stderr=subprocess.DEVNULL)
    try:
        while not (run_dir / "d.sock").exists():
            assert p.poll() is None, "hpcckptd did not start"
            time.sleep(0.02)
        time.sleep(1.0)                  # its spare worker warm
        yield
    finally:
        p.terminate()
        p.wait(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)


def _in_ns(ns_file: str, under: int) -> int:
    """The descendant of `under` in network namespace `ns_file` (the job under run)."""
    ino = os.stat(ns_file).st_ino
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        todo = [under]
        while todo:
            p = todo.pop(0)
            try:
                if os.stat(f"/proc/{p}/ns/net").st_ino == ino:
                    return p
                todo += [int(c) for t in os.listdir(f"/proc/{p}/task")
                         for c in open(f"/proc/{p}/task/{t}/children").read().split()]
            except OSError:
                continue
        time.sleep(0.02)
    raise RuntimeError("the job did not start in its namespace")


def one(exe: Path, work: Path, nodes, how: str, k: int, msock: str = "") -> dict:
    tag = f"b{k}"
    j, c = nodes.namespace(f"{tag}j"), nodes.namespace(f"{tag}c")
    addr = nodes.ip(10 + k)
    nodes.attach(j, nodes.a, f"{tag}v0", f"{addr}/24")
    nodes.attach(c, nodes.a, f"{tag}w0", f"{nodes.ip(100 + k)}/24")
    under = ["ip", "netns", "exec", nodes.a, *HPCCKPT, "-q", "run", "--netns", f"/run/netns/{j}", "--"] \
        if how == "migrate" else ["ip", "netns", "exec", j]
    srv = subprocess.Popen([*under, str(exe), "server", addr], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    port = srv.stdout.readline().split()[1].decode()
    srv.stdout.close()
    job = _in_ns(f"/run/netns/{j}", srv.pid) if how == "migrate" else srv.pid
    if how in ("--netns", "migrate"):
        subprocess.run(["ip", "netns", "del", j], check=True)      # the job's own namespace
    rec = work / f"rtt-{tag}.bin"
    cli = subprocess.Popen(["ip", "netns", "exec", c, str(exe), "client", addr, port, str(BEFORE + 8), str(rec)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rest, moved = None, 0
    try:
        cli.stdout.readline()
        time.sleep(BEFORE)
        t0 = time.monotonic()
        if how == "migrate":
            res = subprocess.run(["ip", "netns", "exec", nodes.a, *HPCCKPT, "migrate", "--pid", str(job), "--to",
                                  f"{nodes.addr_b}:{PORT}", "--munge-socket", msock, "--tcp-established",
                                  "--netns"], capture_output=True, text=True, check=True)
            moved = int(res.stderr.split("as PID")[1].split()[0])
            t_mig = time.monotonic() - t0
            err = cli.communicate(timeout=120)[1].decode()
            t1 = time.monotonic()
            return {**_result(rec, t0, t1, cli.returncode == 0, err), "op": t_mig}
        extra = ["--netns"] if how == "--netns" else []
        subprocess.run(["ip", "netns", "exec", nodes.a, *HPCCKPT, "-q", "dump", "--pid", str(srv.pid), "--images",
                        str(work / f"img-{tag}"), "--tcp-established", *extra], check=True)
        srv.wait()
        where = ["ip", "netns", "exec", nodes.a if how == "--netns" else j]
        rest = subprocess.Popen([*where, *HPCCKPT, "-q", "restore", "--images", str(work / f"img-{tag}")],
                                stdin=subprocess.DEVNULL)
        err = cli.communicate(timeout=120)[1].decode()
        t1 = time.monotonic()
        ok = cli.returncode == 0
    finally:
        for p in (cli, srv):
            if p.poll() is None:
                p.kill()
                p.wait()
        if rest is not None:      # the restored server has the dumped one's PID
            subprocess.run(["kill", "-9", str(srv.pid)], capture_output=True)
            rest.wait()
        if moved:
            subprocess.run(["kill", "-9", str(moved)], capture_output=True)
    return _result(rec, t0, t1, ok, err)


def _result(rec: Path, t0: float, t1: float, ok: bool, err: str) -> dict:
    s = samples(rec)
    base = statistics.median(rtt for start, rtt in s if start < t0 - 0.1)
    during = [rtt for start, rtt in s if t0 - 0.05 <= start <= t1]
    return {"base": base, "pause": max(during) if during else float("nan"), "requests": len(s),
            "lost": 0 if ok else err.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", help="one mode only (same-netns, --netns, migrate)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="netns-bench-"))
    pauses = {"same-netns": [], "--netns": [], "migrate": []}
    try:
        exe = build(work)
        with two_nodes("nbench") as nodes, munged() as msock, daemon(nodes, msock):
            print(f"{'restore':11} {'RTT base':>9} {'pause':>9} {'pause/RTT':>10} {'requests':>9}  lost")
            k = 0
            for _ in range(args.repeat):
                for how in [args.only] if args.only else pauses:
                    k += 1
                    x = one(exe, work, nodes, how, k, msock)
                    pauses[how].append(x["pause"])
                    print(f"{how:11} {x['base'] * 1e6:7.1f}us {x['pause'] * 1e3:7.1f}ms "
                          f"{x['pause'] / x['base']:9.0f}x {x['requests']:9d}  {x['lost']}"
                          + (f"  (migrate command {x['op']:.2f} s)" if "op" in x else ""), flush=True)
        if args.only:
            return
        b = statistics.median(pauses["same-netns"])
        for how, what in (("--netns", "the namespace rebuilt here"), ("migrate", "migrated to node B")):
            a = statistics.median(pauses[how])
            print(f"median pause, {what} / restored into the same namespace: {a * 1e3:.0f} / "
                  f"{b * 1e3:.0f} ms = {a / b:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
