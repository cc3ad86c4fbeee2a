"""A job in a network namespace of its own (engine/netns.py): a TCP server, whose namespace
has a veth to node A's bridge (IPv4 and IPv6 addresses, MTU 1400), an address on lo, routes in
two tables and a routing rule, is dumped with --netns and --tcp-established while a
client on the node streams to it, and restored into a new namespace built from the
image: the same interfaces, addresses, routes and rules, the node side of its veth back
on the bridge, and the client never notices (SHA-256 of each stream equal both sides).
Also: what --netns refuses, with the job left running, and crafted images."""
import json
import os
import subprocess
import sys
import time

import pytest

from hpcckpt.errors import ImageError
from hpcckpt.images import pb
from hpcckpt.images.validate import validate_netns
from .helpers import PROGRAMS, Job, cli, pid_alive
from .test_tcp import PROG, TOTAL, check_stream, expected, nft, progress, wait_for  # noqa: F401 (nft: fixture)

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


def in_ns(pid: int, *cmd) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *map(str, cmd)]


def net_state(pid: int) -> dict:
    """What `ip` shows of process `pid`'s namespace, without what differs by nature
    between two namespaces (interface indexes, counters, the peer's index)."""
    def ip(*args):
        return json.loads(subprocess.run(in_ns(pid, "ip", "-j", *args), capture_output=True, text=True,
                                         check=True).stdout or "[]")
    links = sorted((x["ifname"], x.get("address"), x["mtu"], "UP" in x["flags"],
                    x.get("link_type"), x.get("linkinfo", {}).get("info_kind")) for x in ip("-d", "link"))
    addrs = sorted((x["ifname"], a["family"], a["local"], a["prefixlen"]) for x in ip("addr")
                   for a in x["addr_info"] if a.get("scope") != "link")
    routes = sorted(json.dumps(r, sort_keys=True) for fam in ("-4", "-6") for r in ip(fam, "route", "show", "table", "all")
                    if r.get("table") != "local" and r.get("protocol") != "kernel")
    rules = sorted(json.dumps(r, sort_keys=True) for fam in ("-4", "-6") for r in ip(fam, "rule"))
    return {"links": links, "addrs": addrs, "routes": routes, "rules": rules}


def node_side(node: str, name: str) -> dict | None:
    res = subprocess.run(["ip", "-n", node, "-j", "-d", "link", "show", name], capture_output=True, text=True)
    return json.loads(res.stdout)[0] if res.returncode == 0 else None


def job_namespace(nodes, tag: str, last: int = 10) -> tuple[str, str, str]:
    """A job's namespace on node A, richly configured: (its name, its IPv4 and IPv6 address)."""
    j = nodes.namespace(tag)
    addr, addr6 = nodes.ip(last), f"fd00:231:{nodes.n}::{last}"
    nodes.attach(j, nodes.a, f"{tag}v0", f"{addr}/24", f"{addr6}/64")
    subprocess.run(["ip", "-n", nodes.a, "addr", "replace", f"fd00:231:{nodes.n}::1/64", "dev", "br0", "nodad"],
                   check=True, capture_output=True)
    run = [["link", "set", "eth0", "mtu", "1400"], ["addr", "add", f"192.168.{nodes.n}.1/32", "dev", "lo"],
           ["route", "add", "default", "via", nodes.addr_a],
           ["route", "add", "10.99.0.0/16", "via", nodes.addr_a, "table", "100"],
           ["route", "add", "blackhole", "10.98.0.0/16", "table", "100"],
           ["rule", "add", "from", addr, "lookup", "100", "priority", "1000"],
           ["-6", "route", "add", "default", "via", f"fd00:231:{nodes.n}::1"]]
    for args in run:
        subprocess.run(["ip", "-n", j, *args], check=True, capture_output=True)
    return j, addr, addr6


def _job_of(ancestor: int, node: str | None = None) -> int:
    """The root of the job under `ancestor` (hpcckpt run's monitor, or a restore): its
    first descendant in another network namespace than `node`'s (default: the ancestor's)."""
    def children(pid: int) -> list[int]:
        try:
            return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            return []
    home = os.stat(f"/run/netns/{node}" if node else f"/proc/{ancestor}/ns/net").st_ino
    deadline = time.monotonic() + 30
    while True:
        todo = children(ancestor)
        while todo:
            p = todo.pop(0)
            try:
                if os.stat(f"/proc/{p}/ns/net").st_ino != home:
                    return p
            except OSError:
                continue
            todo.extend(children(p))
        assert time.monotonic() < deadline, f"no job under process {ancestor}"
        time.sleep(0.02)


@pytest.mark.parametrize("tag", ["jr", "j6"])
def test_job_namespace_dumped_and_restored_keeps_its_client(tmp_path, nodes, tag):
    """`hpcckpt run --netns` on node A (the monitor stays in the node's namespace, the job
    joins its own); the job is dumped from the node and restored there into a new one.
    Over IPv4 (jr) and IPv6 (j6: the address comes back without duplicate address
    detection and is announced by an unsolicited neighbour advertisement)."""
    want = expected()
    j, addr4, addr6 = job_namespace(nodes, tag, 10 if tag == "jr" else 11)
    addr = addr4 if tag == "jr" else addr6
    # the job: a shell whose child is the server; the shell sleeps on once the stream is done,
    # so the restored namespace can be looked at afterwards
    run = Job.start(["ip", "netns", "exec", nodes.a, *HPCCKPT, "run", "--netns", f"/run/netns/{j}", "--", "sh", "-c",
                     f"{sys.executable} {PROG} server {addr} {TOTAL}; exec sleep 600"], tmp_path / "server.txt")
    srv = Job(run.proc, run.out)
    client = rest = job = None
    try:
        srv.wait_lines(1)
        job = _job_of(run.pid, nodes.a)
        subprocess.run(["ip", "netns", "del", j], check=True)     # the job's own: only it holds it now
        before = net_state(job)
        port = srv.out.read_text().split()[1]
        client = Job.start(["ip", "netns", "exec", nodes.a, sys.executable, PROG, "client", addr, port, TOTAL],
                           tmp_path / "client.txt")
        wait_for(lambda: progress(client.out, "client") > TOTAL // 10, "the stream to get going",
                 alive=(srv.proc, client.proc))
        res = subprocess.run(["ip", "netns", "exec", nodes.a, *HPCCKPT, "dump", "--pid", str(job), "--images",
                              str(tmp_path / "img"), "--tcp-established", "--netns"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert run.proc.wait(timeout=10) != 0                     # its job was killed
        assert node_side(nodes.a, f"{tag}v0") is None, "the job's veth stayed on the node after the dump"
        shown = cli("show", tmp_path / "img").stdout
        assert "own network namespace: 2 interfaces" in shown and f"node side {tag}v0 on bridge br0" in shown, shown
        time.sleep(0.3)                        # the client keeps sending meanwhile
        assert client.proc.poll() is None, client.out.read_text()[-500:]
        # a bridge the node does not have: refused before anything is made
        bad = subprocess.run(["ip", "netns", "exec", nodes.a, *HPCCKPT, "restore", "--images", str(tmp_path / "img"),
                              "--veth", f"eth0={tag}v1@nobridge"], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "bridge nobridge" in bad.stderr, bad.stderr
        assert node_side(nodes.a, f"{tag}v1") is None
        rest = subprocess.Popen(["ip", "netns", "exec", nodes.a, *HPCCKPT, "restore", "--images", str(tmp_path / "img")],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "restore.txt", "wb"),
                                stdin=subprocess.DEVNULL)
        assert client.proc.wait(timeout=120) == 0, client.out.read_text()[-1000:]
        check_stream(client.out, "client", "server", want)
        wait_for(lambda: "server sent" in srv.out.read_text(), "the restored server's last line", alive=(rest,))
        check_stream(srv.out, "server", "client", want)
        job = _job_of(rest.pid, nodes.a)
        assert net_state(job) == before
        side = node_side(nodes.a, f"{tag}v0")
        assert side and side.get("master") == "br0" and "UP" in side["flags"], side
        assert subprocess.run(["ip", "netns", "identify", str(job)], capture_output=True,
                              text=True).stdout.strip() == "", "restored into a named (existing) namespace"
    finally:
        for p in (client, srv):
            if p is not None:
                p.kill()
        if job is not None and pid_alive(job):
            os.kill(job, 9)
        if rest is not None:
            rest.wait(timeout=30)


def test_netns_refused_clearly_process_runs_on(tmp_path, nodes):
    """--netns on a process in hpcckpt's own namespace, and on one whose namespace another
    process outside the tree shares: refused by name, the process runs on."""
    prog = [sys.executable, PROGRAMS / "compute.py", 400, 0.05]
    job = Job.start(prog, tmp_path / "out.txt")
    try:
        job.wait_lines(2)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img1", "--netns", check=False)
        assert res.returncode != 0 and "hpcckpt's own network namespace" in res.stderr, res.stderr
        n = job.lines()
        wait_for(lambda: job.lines() > n + 2, "the job to run on", alive=(job.proc,))
    finally:
        job.kill()
    j = nodes.namespace("js")
    other = subprocess.Popen(["ip", "netns", "exec", j, "sleep", "600"])
    job = Job.start(["ip", "netns", "exec", j, *map(str, prog)], tmp_path / "out2.txt")
    try:
        job.wait_lines(2)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img2", "--netns", check=False)
        assert res.returncode != 0 and f"also holds process(es) {other.pid}" in res.stderr, res.stderr
        assert not (tmp_path / "img2").exists()
        n = job.lines()
        wait_for(lambda: job.lines() > n + 2, "the job to run on", alive=(job.proc,))
    finally:
        job.kill()
        other.kill()
        other.wait()


def _inventory() -> pb.Inventory:
    inv = pb.Inventory()
    inv.netns.links.add(name="lo", kind="loopback", up=True)
    inv.netns.links.add(name="eth0", kind="veth", mac=b"\x02" * 6, peer_name="jobv0", peer_master="br0")
    inv.netns.addresses.add(link="eth0", address="10.0.0.5", prefixlen=24)
    inv.netns.routes.add(table=254, link="eth0", gateway="10.0.0.1", type=1)
    inv.netns.rules.add(priority=1000, table=100, action=1, src="10.0.0.5", src_len=32)
    return inv


@pytest.mark.parametrize("change,message", [
    (lambda n: None, "image owned by uid 1000"),
    (lambda n: setattr(n.links[1], "peer_name", "../../etc"), "interface name '../../etc'"),
    (lambda n: setattr(n.links[1], "kind", "macvlan"), "kind 'macvlan'"),
    (lambda n: setattr(n.addresses[0], "address", "10.0.0.500"), "is not an IPv4 address"),
    (lambda n: setattr(n.addresses[0], "link", "eth9"), "which the image does not make"),
    (lambda n: setattr(n.routes[0], "dst_len", 33), "out of range"),
    (lambda n: setattr(n.rules[0], "iif", "x" * 16), "interface name"),
    (lambda n: n.links.pop(0), "without its loopback interface lo"),
])
def test_crafted_namespace_images_refused(change, message):
    inv = _inventory()
    validate_netns("img", inv, 0)            # the untouched one passes
    change(inv.netns)
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_netns("img", inv, 1000 if "uid" in message else 0)


def test_run_netns_requeued_rejoins_or_rebuilds_its_namespace(tmp_path, nodes):
    """`hpcckpt run --netns PATH` stopped by its final checkpoint (TERM, as at preemption)
    and run again: while the site's namespace PATH exists the resumed job joins it as it
    is (the checkpoint left it alone); once the site removed it, the job gets a new one
    built from the image (its veth back on the node's bridge). The job's output is that
    of an uninterrupted run."""
    from .helpers import reference
    j = nodes.namespace("jq")
    nodes.attach(j, nodes.a, "jqv0", f"{nodes.ip(30)}/24")
    ns_file = f"/run/netns/{j}"
    cmd = [sys.executable, PROGRAMS / "compute.py", 90, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    run = [*HPCCKPT, "run", "--netns", ns_file, "--images", str(tmp_path / "img"), "--", *map(str, cmd)]

    def start() -> subprocess.Popen:
        with open(out, "ab") as f:
            return subprocess.Popen(["ip", "netns", "exec", nodes.a, *run], stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.PIPE, start_new_session=True)

    def stop_at(mon: subprocess.Popen, lines: int) -> None:
        wait_for(lambda: out.read_bytes().count(b"\n") >= lines, f"{lines} lines", alive=(mon,))
        mon.send_signal(15)
        said = mon.communicate(timeout=60)[1].decode()
        assert mon.returncode == 0 and "final checkpoint" in said, said

    mon = start()
    try:
        job = _job_of(mon.pid, nodes.a)
        assert os.stat(f"/proc/{job}/ns/net").st_ino == os.stat(ns_file).st_ino
        stop_at(mon, 20)
        assert node_side(nodes.a, "jqv0"), "the site's namespace lost its veth to the checkpoint"
        mon = start()                                   # resumed into the site's namespace
        job = _job_of(mon.pid, nodes.a)
        assert os.stat(f"/proc/{job}/ns/net").st_ino == os.stat(ns_file).st_ino
        stop_at(mon, 45)
        subprocess.run(["ip", "netns", "del", j], check=True)     # the site's epilog
        wait_for(lambda: node_side(nodes.a, "jqv0") is None, "the namespace to go")
        mon = start()                                   # resumed into a new one, from the image
        job = _job_of(mon.pid, nodes.a)
        state = net_state(job)
        assert ("eth0", "inet", nodes.ip(30), 24) in state["addrs"], state
        side = node_side(nodes.a, "jqv0")
        assert side and side.get("master") == "br0", side
        said = mon.communicate(timeout=120)[1].decode()
        assert mon.returncode == 0, said
        assert out.read_bytes() == ref
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
