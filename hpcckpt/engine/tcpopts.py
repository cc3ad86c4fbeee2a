"""TCP options beyond the basic ones, for listening sockets and connections alike:
congestion control and Fast Open are saved and set again; what cannot be checkpointed is
refused by name: TCP-MD5 signatures (the kernel never gives their keys back) and urgent
data not yet read (TCP_REPAIR cannot put the urgent mark back).

Congestion control: the algorithm's name, set again on restore, before the socket is
bound or connected (a connection's congestion state starts afresh, as after an idle
period). A user's image only gets an algorithm the node allows unprivileged users
(net.ipv4.tcp_allowed_congestion_control): the restore runs as root, the user could not
have set another. Fast Open: a listener's queue length (TCP_FASTOPEN), set before listen,
and TCP_FASTOPEN_CONNECT / TCP_FASTOPEN_NO_COOKIE, set on the new socket before it is
bound; the server's cookie key is the node's (a per-socket key is not kept).
"""
import os
import socket
import struct

from ..errors import RestoreError, UnsupportedError
from ..images import pb
from ..kernel import netlock, rtnl, sockdiag

SOL_TCP = 6
TCP_CONGESTION, TCP_FASTOPEN, TCP_FASTOPEN_CONNECT, TCP_FASTOPEN_NO_COOKIE = 13, 23, 30, 34
CA_NAME_MAX = 16
ALLOWED = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"


def save(k: pb.Socket, s: socket.socket, ino: int, descs, where: str) -> None:
    """Options of TCP socket `s` (ours: a duplicate of the target's) into `k`."""
    if ino in _md5_inodes(descs, s, k.family):
        raise UnsupportedError(f"{where}: TCP socket {k.address or '*'}:{k.port} uses TCP-MD5 signatures "
                               "(TCP_MD5SIG); their keys cannot be read back, so it cannot be checkpointed")
    k.congestion = s.getsockopt(SOL_TCP, TCP_CONGESTION, CA_NAME_MAX).split(b"\0")[0].decode()
    if k.listening:
        k.fastopen_qlen = s.getsockopt(SOL_TCP, TCP_FASTOPEN)
    k.fastopen_connect = bool(s.getsockopt(SOL_TCP, TCP_FASTOPEN_CONNECT))
    k.fastopen_no_cookie = bool(s.getsockopt(SOL_TCP, TCP_FASTOPEN_NO_COOKIE))


def _md5_inodes(descs, s: socket.socket, family: int) -> set[int]:
    """Sockets with TCP-MD5 keys in the network namespace of `s`, one sock_diag dump per
    namespace and family for the whole dump."""
    nsfd = netlock.netns_of(s)
    try:
        key = (os.fstat(nsfd).st_ino, family)
        cache = descs.cache.setdefault("tcp_md5", {})
        if key not in cache:
            if key[0] == os.stat("/proc/thread-self/ns/net").st_ino:
                cache[key] = sockdiag.tcp_md5_inodes(family)
            else:
                with rtnl.entered(nsfd, "the socket's network namespace"):
                    cache[key] = sockdiag.tcp_md5_inodes(family)
        return cache[key]
    finally:
        os.close(nsfd)


def urgent_pending(s: socket.socket) -> bool:
    """Urgent data arrived and not yet read (and not inline): a peek at it succeeds."""
    try:
        return bool(s.recv(1, socket.MSG_OOB | socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def restore(t, fd: int, k: pb.Socket, where: str) -> None:
    """Set the options of `k` on the target's new socket `fd` (before bind, listen, connect)."""
    if k.congestion:
        name = k.congestion.encode()
        res = t.sys("setsockopt", fd, SOL_TCP, TCP_CONGESTION, t.put(name), len(name), check=False)
        if res < 0:
            raise RestoreError(f"{where}: cannot give the TCP socket its congestion control {k.congestion!r} "
                               f"back: {os.strerror(-res)} (is the algorithm available on this node? "
                               "see /proc/sys/net/ipv4/tcp_available_congestion_control)")
    for on, opt, value in ((k.listening and k.fastopen_qlen, TCP_FASTOPEN, k.fastopen_qlen),
                           (k.fastopen_connect, TCP_FASTOPEN_CONNECT, 1),
                           (k.fastopen_no_cookie, TCP_FASTOPEN_NO_COOKIE, 1)):
        if on:
            res = t.sys("setsockopt", fd, SOL_TCP, opt, t.put(struct.pack("<i", value)), 4, check=False)
            if res < 0:
                raise RestoreError(f"{where}: cannot set TCP Fast Open option {opt} again: {os.strerror(-res)}")


def check(pid: int, fd: int, k: pb.Socket, user_image: bool) -> None:
    """A user's image only gets a congestion control the node lets users choose."""
    if not user_image or not k.congestion:
        return
    try:
        with open(ALLOWED) as f:
            allowed = f.read().split()
    except OSError:
        allowed = []
    if k.congestion not in allowed:
        raise RestoreError(f"process {pid} fd {fd}: the image asks for TCP congestion control "
                           f"{k.congestion!r}, which this node does not allow users ({ALLOWED}: "
                           f"{' '.join(allowed) or 'none'}); refused")
