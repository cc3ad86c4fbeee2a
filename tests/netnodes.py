"""Test "nodes" on one machine: two network namespaces, each with a bridge `br0` holding
its address, the bridges joined by a veth pair (the private test link) into one Ethernet
segment, as a site's nodes whose job bridges share a VLAN. A job or a client gets a
namespace of its own attached to a node's bridge (`attach`); a job's namespace moved to
the other node (its veth's node side re-created there, on that node's br0) keeps its
address reachable, with no route to change.

Names: namespaces are `<prefix><N>a`/`<prefix><N>b`, N the first free number (a second
copy of the suite, another worktree or xdist worker, takes another); interfaces are made
inside namespaces, never in the host's, so their names cannot collide. Addresses live in
the private namespaces only.
"""
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

BRIDGE = "br0"


def sh(*cmd) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {res.stderr.strip()}")
    return res.stdout


def netns_add(name: str) -> bool:
    return subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0


def netns_del(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Nodes:
    a: str              # node namespaces
    b: str
    n: int              # their number: 10.231.N.0/24 is the segment
    prefix: str
    extra: list         # namespaces made by `namespace`, removed with the nodes

    @property
    def addr_a(self) -> str:
        return f"10.231.{self.n}.1"

    @property
    def addr_b(self) -> str:
        return f"10.231.{self.n}.2"

    def ip(self, last: int) -> str:
        """An address on the segment (3..253 are free for jobs and clients)."""
        return f"10.231.{self.n}.{last}"

    def namespace(self, tag: str) -> str:
        """A further named namespace (a job's, a client's), deleted with the nodes."""
        name = f"{self.prefix}{self.n}{tag}"
        if not netns_add(name):
            netns_del(name)
            sh("ip", "netns", "add", name)
        self.extra.append(name)
        return name

    def attach(self, ns: str, node: str, outside: str, *addrs: str, inside: str = "eth0") -> None:
        """Join namespace `ns` to `node`'s bridge by a veth pair: `inside` in `ns` with
        `addrs` (CIDR), `outside` in `node`, a port of br0; both up, lo up."""
        sh("ip", "-n", ns, "link", "add", inside, "type", "veth", "peer", "name", outside, "netns", node)
        sh("ip", "-n", node, "link", "set", outside, "master", BRIDGE, "up")
        for a in addrs:
            sh("ip", "-n", ns, "addr", "add", a, "dev", inside, *(["nodad"] if ":" in a else []))
        sh("ip", "-n", ns, "link", "set", inside, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def _claim(prefix: str) -> int:
    start = os.getpid() % 200
    for k in range(200):
        n = (start + k) % 200 + 20
        if not netns_add(f"{prefix}{n}a"):
            continue
        if netns_add(f"{prefix}{n}b"):
            return n
        netns_del(f"{prefix}{n}a")
    raise RuntimeError(f"no free {prefix}Na/{prefix}Nb network namespace names")


@contextmanager
def two_nodes(prefix: str):
    n = _claim(prefix)
    nodes = Nodes(f"{prefix}{n}a", f"{prefix}{n}b", n, prefix, [])
    try:
        sh("ip", "-n", nodes.a, "link", "add", "link0", "type", "veth", "peer", "name", "link0", "netns", nodes.b)
        for ns, addr in ((nodes.a, nodes.addr_a), (nodes.b, nodes.addr_b)):
            sh("ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0")
            sh("ip", "-n", ns, "link", "set", "link0", "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", BRIDGE)
            sh("ip", "-n", ns, "link", "set", BRIDGE, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns in (*nodes.extra, nodes.a, nodes.b):
            netns_del(ns)


@pytest.fixture(scope="module")
def nodes(request):
    """Two test nodes for this test module (names from the module's name)."""
    short = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:8]
    with two_nodes(f"n{short}") as n:
        yield n
