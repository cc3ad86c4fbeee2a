"""Listener lock: nftables drops new connection attempts (SYNs) to chosen listening sockets.

When a server is dumped and killed, its listening sockets are gone until the restore:
a client connecting meanwhile would be refused (RST), a request lost. And a connection
that completed its handshake but was not accepted yet cannot be checkpointed at all (no
way to put it back into an accept queue; CRIU refuses it too). So before the tree is
frozen its listeners are locked: a SYN to their address and port is dropped (the client
retransmits it, after 1 s, then 2 s, ...), and the program is given a moment to accept
what is already queued. The restored listener is let through again by adding it to the
table's `open` set before the processes run (additions commit at once); the table is
deleted once they run (deletions wait for an RCU grace period).

One table per dump, `inet hpcckptl_<dumping pid>_<tree root pid>`, in the network namespace
of the listening sockets, apart from the connection lock's tables (kernel/netlock.py), so
neither changes the other's rules.
"""
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field

from ..errors import KernelError
from . import netlock

PREFIX = "hpcckptl_"


def table_name(root_pid: int) -> str:
    return netlock.table_name(root_pid, PREFIX)


def valid_name(name: str) -> bool:
    return netlock.valid_name(name, PREFIX)


def _create(table: str) -> str:
    t = f"inet {table}"
    out = [f"add table {t}",
           f"add chain {t} input {{ type filter hook input priority -300; policy accept; }}"]
    for name in ("listen", "open"):
        out.append(f"add set {t} {name}4 {{ type ipv4_addr . inet_service; }}")
        out.append(f"add set {t} {name}6 {{ type ipv6_addr . inet_service; }}")
        out.append(f"add set {t} {name}p {{ type inet_service; }}")      # wildcard listeners: any address
    syn = "tcp flags & (syn | ack) == syn"
    for match, v in (("ip daddr . tcp dport", "4"), ("ip6 daddr . tcp dport", "6"), ("tcp dport", "p")):
        out.append(f"add rule {t} input {match} @open{v} accept")
        out.append(f"add rule {t} input {syn} {match} @listen{v} drop")
    return "\n".join(out) + "\n"


def _elements(family: int, address: str, port: int) -> list[tuple[str, str]]:
    """(set suffix, element) for a listener: by address and port, or by port alone for a
    wildcard address (0.0.0.0 or ::, which on a dual-stack socket takes IPv4 too)."""
    if address in ("", "0.0.0.0", "::"):
        return [("p", str(port))]
    if family == socket.AF_INET6 and address.startswith("::ffff:") and "." in address:
        family, address = socket.AF_INET, address[7:]
    return [("4" if family == socket.AF_INET else "6", f"{ipaddress.ip_address(address)} . {port}")]


@dataclass
class ListenLock:
    """The listeners of one dump, locked (new SYNs dropped) from before the freeze."""
    table: str
    _made: dict[int, int] = field(default_factory=dict)          # netns inode -> our fd of it
    _elems: dict[int, list[tuple[str, str]]] = field(default_factory=dict)

    def lock(self, s: socket.socket, family: int, address: str, port: int) -> None:
        nsfd = netlock.netns_of(s)
        ino = os.fstat(nsfd).st_ino
        script = ""
        if ino in self._made:
            os.close(nsfd)
            nsfd = self._made[ino]
        else:
            script = _create(self.table)
        elems = _elements(family, address, port)
        try:
            netlock.nft(script + "".join(f"add element inet {self.table} listen{v} {{ {e} }}\n"
                                         for v, e in elems), nsfd)
        except BaseException:
            if script:
                os.close(nsfd)
            raise
        self._made[ino] = nsfd
        self._elems.setdefault(ino, []).extend(elems)

    def open(self) -> list[str]:
        """The listeners stay (the tree runs on): let SYNs through again at once."""
        failed = []
        for ino, elems in self._elems.items():
            try:
                netlock.nft("".join(f"add element inet {self.table} open{v} {{ {e} }}\n" for v, e in elems),
                            self._made[ino])
            except KernelError as e:
                failed.append(f"listener lock table inet {self.table} could not be opened: {e}")
        self._elems.clear()
        return failed

    def cleanup(self) -> list[str]:
        failed = []
        for ino, nsfd in list(self._made.items()):
            try:
                netlock.nft(netlock.delete_script(self.table), nsfd)
            except KernelError as e:
                failed.append(f"listener lock table inet {self.table} not removed: {e}")
            os.close(nsfd)
            del self._made[ino]
        self._elems.clear()
        return failed

    def keep(self) -> None:
        """The tree is dead: the lock stays until the restore lets its listeners through."""
        for nsfd in self._made.values():
            os.close(nsfd)
        self._made.clear()
        self._elems.clear()


def _exists(table: str, nsfd: int) -> bool:
    res = netlock._run(["-j", "list", "table", "inet", table], nsfd)
    return res.returncode == 0 and bool(json.loads(res.stdout or "{}").get("nftables"))


def unlock(table: str, listeners: list[tuple[int, str, int]], nsfd: int) -> None:
    """The restore's half, before the processes run: let SYNs to the restored listeners
    ((family, address, port)) through. A table not in this namespace (the image was
    restored elsewhere) is no concern of ours."""
    if not valid_name(table):
        raise KernelError(f"refusing to touch nftables table {table!r}: not a listener lock hpcckpt makes")
    if not _exists(table, nsfd):
        return
    script = "".join(f"add element inet {table} open{v} {{ {e} }}\n"
                     for f, a, p in listeners for v, e in _elements(f, a, p))
    if script:
        netlock.nft(script, nsfd)


def drop(table: str, nsfd: int) -> None:
    """Once the restored processes run: the table goes."""
    if valid_name(table) and _exists(table, nsfd):
        netlock.nft(netlock.delete_script(table), nsfd)
