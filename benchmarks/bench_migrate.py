"""Migration throughput over a veth link between two network namespaces, as a ratio to a
plain TCP copy of the same bytes over the same link (used by bench_service.py).

Node a runs the process and `hpcckpt.service.migrate.migrate`; node b runs hpcckptd
--listen with a private munged. The plain copy sends the same image files from a to a
Python receiver in b that writes them to the same filesystem as hpcckptd's spool."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT, TCP_PORT = 7077, 7078

SENDER = r'''
import json, sys, time
from hpcckpt.service import migrate as m, outgoing as o
pid, to, munge_sock = int(sys.argv[1]), sys.argv[2], sys.argv[3]
t = {}
def timed(name, f):
    def run(*a, **k):
        r = f(*a, **k)
        t[name] = time.perf_counter() - t0
        return r
    return run
for name in ("begin", "end", "restored"):
    setattr(o.Outgoing, name, timed(name, getattr(o.Outgoing, name)))
enc = o.munge.encode
def munge_timed(*a, **k):
    t1 = time.perf_counter(); r = enc(*a, **k); t["munge_s"] = time.perf_counter() - t1
    return r
o.munge.encode = munge_timed
t0 = time.perf_counter()
resp = m.migrate(pid, to, munge_sock, show_progress=False)
t.update(total_s=time.perf_counter() - t0, pid=resp.pid)
print(json.dumps(t))
'''

TCP_RECEIVER = r'''
import os, socket, struct, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
c, _ = srv.accept()
f = c.makefile("rb")
while True:
    head = f.read(12)
    if len(head) < 12:
        break
    n, size = struct.unpack("<IQ", head)
    name = f.read(n).decode()
    with open(os.path.join(sys.argv[3], name), "wb") as out:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            out.write(chunk)
            left -= len(chunk)
c.sendall(b"ok")
'''

TCP_SENDER = r'''
import json, os, socket, struct, sys, time
d = sys.argv[3]
names = sorted(os.listdir(d))
t0 = time.perf_counter()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for name in names:
    size = os.path.getsize(os.path.join(d, name))
    s.sendall(struct.pack("<IQ", len(name), size) + name.encode())
    with open(os.path.join(d, name), "rb") as f:
        while chunk := f.read(1 << 20):
            s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
assert s.recv(2) == b"ok"
print(json.dumps({"copy_s": time.perf_counter() - t0,
                  "bytes": sum(os.path.getsize(os.path.join(d, n)) for n in names)}))
'''


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


class Nodes:
    """Two network namespaces joined by a veth pair, with 10.232.N.1 and .2; removed on exit."""

    def __enter__(self):
        n = self._free_pair()
        self.a, self.b = f"serviceb{n}a", f"serviceb{n}b"
        self.addr_a, self.addr_b = f"10.232.{n}.1", f"10.232.{n}.2"
        sh("ip", "link", "add", f"serviceb{n}a", "type", "veth", "peer", "name", f"serviceb{n}b")
        sh("ip", "link", "set", f"serviceb{n}a", "netns", self.a)
        sh("ip", "link", "set", f"serviceb{n}b", "netns", self.b)
        for ns, dev, addr in ((self.a, f"serviceb{n}a", self.addr_a), (self.b, f"serviceb{n}b", self.addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    @staticmethod
    def _free_pair() -> int:
        """`ip netns add` fails on a taken name: another copy of the benchmark picks another N."""
        for k in range(200):
            n = (os.getpid() + k) % 200 + 20
            if subprocess.run(["ip", "netns", "add", f"serviceb{n}a"], capture_output=True).returncode:
                continue
            if subprocess.run(["ip", "netns", "add", f"serviceb{n}b"], capture_output=True).returncode == 0:
                return n
            subprocess.run(["ip", "netns", "del", f"serviceb{n}a"])
        raise RuntimeError("no free serviceb N a/b network namespace names")

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.a])   # deletes the veth pair with it
        subprocess.run(["ip", "netns", "del", self.b])

    def py(self, ns: str, code: str, *args, **kw) -> list[str]:
        return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *map(str, args)]


class Munged:
    """A private munged with a fresh key (nothing of the site's)."""

    def __enter__(self):
        if not shutil.which("munged"):
            sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", "munge")
        self.dir = Path(tempfile.mkdtemp(prefix="bench-munge-", dir="/tmp"))
        self.dir.chmod(0o755)
        m = self.dir / "m"
        m.mkdir()
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        for p in (m, key):
            shutil.chown(p, "munge", "munge")
        key.chmod(0o400)
        self.socket = str(m / "munge.socket")
        sh("runuser", "-u", "munge", "--", "munged", "--force", f"--socket={self.socket}", f"--key-file={key}",
           f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        m.chmod(0o711)
        return self

    def __exit__(self, *exc):
        try:
            os.kill(int((self.dir / "m" / "munged.pid").read_text()), 15)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _tcp_copy(nodes: Nodes, images: Path, spool: Path) -> dict:
    dest = spool / "tcp-copy"
    dest.mkdir()
    recv = subprocess.Popen(nodes.py(nodes.b, TCP_RECEIVER, nodes.addr_b, TCP_PORT, dest),
                            stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "listening"
    out = sh(*nodes.py(nodes.a, TCP_SENDER, nodes.addr_b, TCP_PORT, images), timeout=600).stdout
    recv.wait(timeout=60)
    shutil.rmtree(dest)
    return json.loads(out)


def bench_migration(sizes_mib: list[int], memhog: Path, work: Path, tree: int = 0) -> list[dict]:
    """`tree` > 0: a tree of that many processes (treehog) sharing each size, instead of one."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    spool = Path(tempfile.mkdtemp(prefix="bench-spool-", dir="/dev/shm"))
    results = []
    with Nodes() as nodes, Munged() as munged:
        log = open(work / "daemon-b.log", "wb")
        d = subprocess.Popen(["ip", "netns", "exec", nodes.b, sys.executable, "-m", "hpcckpt.service.daemon",
                              "--socket", str(work / "b.sock"), "--listen", f"{nodes.addr_b}:{PORT}",
                              "--spool", str(spool), "--munge-socket", munged.socket], stderr=log, env=env)
        try:
            while not (work / "b.sock").exists():
                assert d.poll() is None, (work / "daemon-b.log").read_text()
                time.sleep(0.02)
            for mib in sizes_mib:
                results.append(_one(nodes, munged, memhog, mib, spool, env, tree))
                for line in (work / "daemon-b.log").read_text().splitlines()[-2:]:
                    print("   destination:", line.removeprefix("hpcckptd: "))
        finally:
            d.terminate()
            d.wait(timeout=30)
            shutil.rmtree(spool, ignore_errors=True)
    return results


def _one(nodes: Nodes, munged: Munged, memhog: Path, mib: int, spool: Path, env: dict, tree: int = 0) -> dict:
    from hpcckpt.engine.dump import dump
    # the plain copy's bytes: an image of the same process, as migrate() would send
    # under `hpcckpt run`: a PID namespace of its own, so that node b (the same host here)
    # can build its copy while the original, frozen, still holds its PIDs on node a
    prog = ([str(memhog.parent / "treehog"), str(tree), str(mib * 1024 // tree), str(memhog)] if tree
            else [str(memhog), str(mib)])
    hog = subprocess.Popen(["ip", "netns", "exec", nodes.a, sys.executable, "-m", "hpcckpt.cli", "-q", "run", "--",
                            *prog], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert hog.stdout.readline() == b"ready\n"
    pid = _job(hog.pid, prog[0])
    img = Path(tempfile.mkdtemp(prefix="bench-img-", dir="/dev/shm")) / "img"
    dump(pid, img, leave_running=True, show_progress=False)
    # the link's speed drifts with the other work on the machine: a plain copy twice before
    # the migration and once after, their median the baseline of this run
    copies = [_tcp_copy(nodes, img, spool)["copy_s"] for _ in range(2)]
    reaper = threading.Thread(target=hog.wait)      # its monitor ends when it leaves
    reaper.start()
    res = subprocess.run(["ip", "netns", "exec", nodes.a, sys.executable, "-c", SENDER, str(pid),
                          f"{nodes.addr_b}:{PORT}", munged.socket], capture_output=True, text=True, env=env,
                         timeout=600)
    if res.returncode != 0:
        hog.kill()
        raise RuntimeError(f"migration of {mib} MiB failed:\n{res.stderr}")
    t = json.loads(res.stdout)
    t["bytes"] = sum(p.stat().st_size for p in img.iterdir())
    reaper.join(timeout=30)              # left node a
    try:
        os.kill(t["pid"], 9)             # the copy on node b
    except ProcessLookupError:
        pass
    copies.append(_tcp_copy(nodes, img, spool)["copy_s"])
    shutil.rmtree(img.parent)
    tcp = sorted(copies)[1]
    r = {"mib": mib, "bytes": t["bytes"], "tcp_copy_s": tcp, "migrate_s": t["total_s"]}
    gbs = lambda s: t["bytes"] / s / 1e9  # noqa: E731
    print(f"migrate {mib:5} MiB{f' in {tree} processes' if tree else ''}: image {t['bytes'] / 2**20:.0f} MiB; plain TCP copy {tcp:.3f} s "
          f"(median of {', '.join(f'{c:.3f}' for c in copies)}; {gbs(tcp):.2f} GB/s); whole migration "
          f"(dump streamed while sent, restored while it arrives, until it runs there) {t['total_s']:.3f} s "
          f"({gbs(t['total_s']):.2f} GB/s, ratio {tcp / t['total_s']:.2f}); metadata sent at {t['begin']:.3f} s, "
          f"(munge {t['munge_s']:.3f} s), pages at {t['end']:.3f} s, restored (checked, not yet running) at {t['restored']:.3f} s")
    return r


def _job(monitor: int, exe: str) -> int:
    """The job under `hpcckpt run`'s monitor: the (topmost) process running `exe`."""
    for _ in range(500):
        kids = {}
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                kids[int(name)] = (int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1]),
                                   os.readlink(f"/proc/{name}/exe"))
            except (OSError, IndexError, ValueError):
                continue
        for pid, (_, path) in kids.items():
            p = pid
            if path != exe or kids.get(kids[pid][0], (0, ""))[1] == exe:
                continue
            while p in kids and p > 1:
                p = kids[p][0]
                if p == monitor:
                    return pid
        time.sleep(0.01)
    raise RuntimeError(f"no {exe} under {monitor}")


def main() -> None:
    import argparse
    import statistics
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", default="256,1024", help="process sizes in MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size; medians are printed")
    ap.add_argument("--tree", type=int, default=0, help="a tree of N processes sharing each size (treehog)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-migrate-"))
    try:
        exe = work / "memhog"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "benchmarks" / "memhog.c")], check=True)
        subprocess.run(["gcc", "-O2", "-o", str(work / "treehog"), str(ROOT / "benchmarks" / "treehog.c")], check=True)
        sizes = [int(m) for m in args.mib.split(",")]
        runs = bench_migration([m for m in sizes for _ in range(args.repeat)], exe, work, args.tree)
        for mib in sizes:
            mine = [r for r in runs if r["mib"] == mib]
            whole = statistics.median(r["tcp_copy_s"] / r["migrate_s"] for r in mine)
            print(f"median of {len(mine)} at {mib} MiB: whole migration (dump, stream, restore) "
                  f"{whole:.2f}x a plain TCP copy's speed (runs: "
                  f"{', '.join(format(r['tcp_copy_s'] / r['migrate_s'], '.2f') for r in mine)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
