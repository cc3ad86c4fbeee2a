"""rtnetlink in any network namespace (pyroute2), and the announcements a moved address
needs (gratuitous ARP, unsolicited neighbour advertisement).

pyroute2's IPRoute opens its netlink socket when made: made while this thread is in
another network namespace (setns, this thread only, and straight back), the socket, and
so every request through it, belongs to that namespace. No helper process, no name in
/run/netns needed: a /proc/PID/ns/net fd is enough.
"""
import contextlib
import ctypes
import os
import socket
import struct
import sys

from ..errors import KernelError
from .libc import libc

CLONE_NEWNET = 0x40000000
ARPHRD_LOOPBACK = 772
IFF_UP = 0x1
IFA_F_NODAD, IFA_F_PERMANENT = 0x02, 0x80
IFA_F_KERNEL = 0x08 | 0x20 | 0x40 | 0x80     # DADFAILED, DEPRECATED, TENTATIVE, PERMANENT: the kernel sets them
RT_TABLE_LOCAL = 255
RTPROT_KERNEL = 2
RTN_LOCAL, RTN_BROADCAST, RTN_MULTICAST, RTN_ANYCAST = 2, 3, 5, 4


def errors() -> tuple:
    """What a netlink request may raise: pyroute2's NetlinkError (`code` = errno) is no
    OSError. Looked up when an exception is being handled: pyroute2 is only imported
    (slowly, see `preload`) by the code that uses it."""
    mod = sys.modules.get("pyroute2.netlink.exceptions")
    return (OSError, mod.NetlinkError) if mod is not None else (OSError,)


def errno_of(e: BaseException) -> int | None:
    return getattr(e, "code", None) or getattr(e, "errno", None)


def _setns(fd: int, what: str) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise KernelError(f"cannot enter {what} (setns): {os.strerror(ctypes.get_errno())}")


@contextlib.contextmanager
def entered(nsfd: int, what: str = "the network namespace"):
    """This thread in network namespace `nsfd` for the block, then back in its own."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(nsfd, what)
        try:
            yield
        finally:
            _setns(back, "our own network namespace again")
    finally:
        os.close(back)


def preload() -> None:
    """Import pyroute2 now (~0.2-0.4 s: its package imports all of itself), so that the
    dump's frozen time and the restore's pause do not pay for it."""
    import pyroute2.iproute.linux  # noqa: F401


def ipr(nsfd: int | None = None, what: str = "the network namespace"):
    """An IPRoute speaking to namespace `nsfd` (ours if None); the caller closes it."""
    from pyroute2.iproute.linux import IPRoute
    if nsfd is None:
        return IPRoute()
    with entered(nsfd, what):
        return IPRoute()


def attr(msg, name: str, default=None):
    v = msg.get_attr(name)
    return default if v is None else v


def mac_bytes(text: str | None) -> bytes:
    return bytes.fromhex(text.replace(":", "")) if text else b""


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def gratuitous_arp(ifindex: int, mac: bytes, address: str) -> None:
    """An ARP request for our own address, broadcast: switches (bridges) learn where the
    MAC is now, neighbours update their caches. Sent from this thread's namespace."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        ip = socket.inet_aton(address)
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
        frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp
        s.sendto(frame, (_ifname(ifindex), 0))
    finally:
        s.close()


def unsolicited_na(ifindex: int, mac: bytes, address: str) -> None:
    """A neighbour advertisement for our own IPv6 address to all nodes (override flag),
    the IPv6 gratuitous ARP; the kernel fills in the ICMPv6 checksum."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.bind((address, 0, 0, ifindex))
        na = struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x20000000, socket.inet_pton(socket.AF_INET6, address),
                         2, 1, mac)
        s.sendto(na, ("ff02::1", 0, 0, ifindex))
    finally:
        s.close()


def _ifname(index: int) -> str:
    return socket.if_indextoname(index)
