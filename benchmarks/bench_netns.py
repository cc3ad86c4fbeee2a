"""What taking the job's network namespace along costs a connected client.

Two test nodes (tests/netnodes.py: a bridge per node, joined over a veth pair); a server
(benchmarks/rr.c) in a namespace of its own on node A, a client in a third namespace
on the same segment sending 64-byte requests back to back and timing each round trip.
The server is dumped with --tcp-established (killed, its connection locked) and restored,
on node A, in one of two ways, through the CLI as an operator would:
  same-netns   the job's namespace stays (named); restored into it (`ip netns exec`)
  --netns      dumped with --netns (the namespace goes with the job), restored into a
               new one built from the image, its veth back on the bridge
The pause is the longest round trip during the checkpoint; the baseline is the median
round trip before it, in the same run; the figure to read is the ratio of the two modes'
pauses (both include a TCP retransmission timeout of the client). Every answer is checked
(a lost, repeated or reset request ends the client with an error).
Usage: bench_netns.py [--repeat N]
"""
import argparse
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


def one(exe: Path, work: Path, nodes, how: str, k: int) -> dict:
    tag = f"b{k}"
    j, c = nodes.namespace(f"{tag}j"), nodes.namespace(f"{tag}c")
    addr = nodes.ip(10 + k)
    nodes.attach(j, nodes.a, f"{tag}v0", f"{addr}/24")
    nodes.attach(c, nodes.a, f"{tag}w0", f"{nodes.ip(100 + k)}/24")
    srv = subprocess.Popen(["ip", "netns", "exec", j, str(exe), "server", addr], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    port = srv.stdout.readline().split()[1].decode()
    srv.stdout.close()
    if how == "--netns":
        subprocess.run(["ip", "netns", "del", j], check=True)      # the job's own namespace
    rec = work / f"rtt-{tag}.bin"
    cli = subprocess.Popen(["ip", "netns", "exec", c, str(exe), "client", addr, port, str(BEFORE + 8), str(rec)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rest = None
    try:
        cli.stdout.readline()
        time.sleep(BEFORE)
        t0 = time.monotonic()
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
    s = samples(rec)
    base = statistics.median(rtt for start, rtt in s if start < t0 - 0.1)
    during = [rtt for start, rtt in s if t0 - 0.05 <= start <= t1]
    return {"base": base, "pause": max(during) if during else float("nan"), "requests": len(s),
            "lost": 0 if ok else err.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="netns-bench-"))
    pauses = {"same-netns": [], "--netns": []}
    try:
        exe = build(work)
        with two_nodes("nbench") as nodes:
            print(f"{'restore':11} {'RTT base':>9} {'pause':>9} {'pause/RTT':>10} {'requests':>9}  lost")
            k = 0
            for _ in range(args.repeat):
                for how in pauses:
                    k += 1
                    x = one(exe, work, nodes, how, k)
                    pauses[how].append(x["pause"])
                    print(f"{how:11} {x['base'] * 1e6:7.1f}us {x['pause'] * 1e3:7.1f}ms "
                          f"{x['pause'] / x['base']:9.0f}x {x['requests']:9d}  {x['lost']}", flush=True)
        a, b = statistics.median(pauses["--netns"]), statistics.median(pauses["same-netns"])
        print(f"median pause with the namespace rebuilt / restored into the same one: {a * 1e3:.0f} / "
              f"{b * 1e3:.0f} ms = {a / b:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
