"""Socket diagnostics over netlink (NETLINK_SOCK_DIAG): what /proc does not show.

A unix socket's peer (by inode) and shutdown state, and a listening TCP socket's backlog
and accept queue, are only visible through sock_diag. One dump per family and call; the
sockets are those of our network namespace (the dumped tree's: hpcckpt makes none).
"""
import socket
import struct
from dataclasses import dataclass

from ..errors import KernelError

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x1, 0x2, 0x4, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 1, 2, 4, 6
TCP_LISTEN = 10
TCP_ESTABLISHED = 1


@dataclass
class UnixSock:
    ino: int
    type: int
    state: int
    peer: int = 0          # inode of the connected peer, 0 if none (or it closed)
    name: bytes = b""      # bound path; abstract names start with b"\\0"
    shutdown: int = 0
    rqueue: int = 0
    vfs_ino: int = 0       # inode of the socket file a path name made, 0 if none


def _dump(request: bytes):
    """Payloads of every answer to one SOCK_DIAG_BY_FAMILY dump request."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        s.send(struct.pack("<IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("<IH", data, off)
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", data, off + 16)[0]
                    raise OSError(err, f"sock_diag: {socket.errno.errorcode.get(err, err)}")
                yield data[off + 16:off + length]
                off += (length + 3) & ~3
    finally:
        s.close()


def _attrs(buf: bytes, off: int):
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("<HH", buf, off)
        if length < 4:
            break
        yield kind, buf[off + 4:off + length]
        off += (length + 3) & ~3


def unix_sockets() -> dict[int, UnixSock]:
    """Every unix socket of this network namespace, by inode."""
    req = struct.pack("<BBHIII2I", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                      UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)
    out = {}
    try:
        for msg in _dump(req):
            _fam, typ, state, _pad, ino = struct.unpack_from("<BBBBI", msg)
            u = UnixSock(ino=ino, type=typ, state=state)
            for kind, val in _attrs(msg, 16):
                if kind == UNIX_DIAG_PEER:
                    u.peer = struct.unpack("<I", val[:4])[0]
                elif kind == UNIX_DIAG_NAME:
                    u.name = val
                elif kind == UNIX_DIAG_VFS:
                    u.vfs_ino = struct.unpack("<I", val[:4])[0]
                elif kind == UNIX_DIAG_SHUTDOWN:
                    u.shutdown = val[0]
                elif kind == UNIX_DIAG_RQLEN:
                    u.rqueue = struct.unpack("<I", val[:4])[0]
            out[ino] = u
    except OSError as e:
        raise KernelError(f"cannot list unix sockets through sock_diag: {e.strerror}") from None
    return out


def tcp_listen_queue(ino: int, family: int) -> tuple[int, int] | None:
    """(backlog, connections waiting to be accepted) of a listening TCP socket, or None
    where sock_diag cannot tell (module missing)."""
    req = struct.pack("<BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) + bytes(48)
    try:
        for msg in _dump(req):
            rq, wq, _uid, inode = struct.unpack_from("<4I", msg, 56)
            if inode == ino:
                return wq, rq
    except OSError:
        return None
    return None


INET_DIAG_MD5SIG = 18


def tcp_md5_inodes(family: int) -> set[int]:
    """Inodes of the TCP sockets (any state) of this thread's network namespace that hold
    TCP-MD5 keys (RFC 2385): sock_diag reports them, to CAP_NET_ADMIN only, once any
    extension is asked for."""
    req = struct.pack("<BBBBI", family, socket.IPPROTO_TCP, 0xFF, 0, 0xFFFFFFFF) + bytes(48)
    out = set()
    try:
        for msg in _dump(req):
            if any(kind == INET_DIAG_MD5SIG for kind, _ in _attrs(msg, 72)):
                out.add(struct.unpack_from("<I", msg, 68)[0])
    except OSError as e:
        raise KernelError(f"cannot list TCP sockets through sock_diag: {e.strerror}") from None
    return out
