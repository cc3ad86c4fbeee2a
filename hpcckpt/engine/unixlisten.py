"""Unix sockets bound to a name: listening ones (a tmux or screen server's socket) and
datagram ones others send to (a log or a job server's socket).

Dump: the name (a path, or an abstract name starting with NUL), the socket file's mode
(tmux keeps state in its execute bits), and a refusal if connections wait in the accept
queue (they would need their client's end, outside the tree). Clients that connect
later simply reconnect to the new socket, as they would after a server restart.

Restore: the dead original leaves its socket file behind; it is removed (only if it is
a socket, and by the restored process itself, with the image owner's file credentials,
so an image cannot remove anything its owner could not) and the name is bound again,
then listened on. Before anything is touched, a name that a live server still answers
on is refused.
"""
import os
import socket
import stat
import struct

from ..errors import ImageError, RestoreError, UnsupportedError
from ..images import pb

AT_FDCWD = -100
SOCK_NONBLOCK = 0o4000
O_NONBLOCK = 0o4000


def absolute(u, pid: int) -> bytes:
    """The name of a socket bound to a relative path, made absolute: the path from the
    process' working directory, when the socket file found there is this very socket
    (sock_diag names its inode). Otherwise the name as bound (refused by describe)."""
    name = u.name.rstrip(b"\0")
    if not name or name.startswith((b"/", b"\0")) or not u.vfs_ino:
        return u.name
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd").encode()
        st = os.lstat(os.path.join(f"/proc/{pid}/cwd".encode(), name))
    except OSError:
        return u.name
    if stat.S_ISSOCK(st.st_mode) and st.st_ino == u.vfs_ino:
        return os.path.join(cwd, name)
    return u.name


def describe(k: pb.Socket, name: bytes, pending: int, where: str) -> None:
    """Fill `k` for a listening unix socket bound to `name` (as sock_diag gives it)."""
    if pending:
        raise UnsupportedError(f"{where} listening on {name!r} has {pending} connection(s) waiting "
                               "to be accepted; they cannot be checkpointed yet")
    bound_name(k, name, where)
    k.listening = True
    k.backlog = socket.SOMAXCONN      # sock_diag does not say; the backlog changes nothing seen


def named_dgram(k: pb.Socket) -> bool:
    """A unix datagram socket outside any pair (bound, or connected one way to a name)."""
    return k.family == socket.AF_UNIX and k.type == socket.SOCK_DGRAM and not k.pair_id and not k.listening


def bound_name(k: pb.Socket, name: bytes, where: str) -> None:
    """Record the name a socket is bound to (path or abstract) with its file's mode."""
    if not name.startswith(b"\0"):
        name = name.rstrip(b"\0")
        if not name.startswith(b"/"):
            raise UnsupportedError(f"{where} is bound to the relative path {name!r}, which its working "
                                   "directory no longer leads to; bind to an absolute path")
        try:
            st = os.lstat(name)
            if stat.S_ISSOCK(st.st_mode):
                k.unix_mode = stat.S_IMODE(st.st_mode)
        except FileNotFoundError:
            pass
    k.address = os.fsdecode(name)


def check(pid: int, fds: list[pb.Fd]) -> None:
    """Before a restore: no live server answers on any name we are to bind."""
    for e in fds:
        k = e.socket
        if e.kind != pb.SOCKET or k.family != socket.AF_UNIX:
            continue
        if named_dgram(k) and k.peer_address and (not k.peer_address.startswith(("/", "\0"))
                                                  or "\0" in k.peer_address[1:]):
            raise ImageError(f"image is invalid: process {pid} fd {e.fd}: unix peer name {k.peer_address!r}")
        if not (k.listening or (named_dgram(k) and k.address)):
            continue
        if k.unix_mode & ~0o777 or not k.address or "\0" in k.address[1:]:
            raise ImageError(f"image is invalid: process {pid} fd {e.fd}: unix socket name "
                             f"{k.address!r} or mode {k.unix_mode:o}")
        probe = socket.socket(socket.AF_UNIX, k.type)
        try:
            probe.connect(os.fsencode(k.address))
        except OSError:
            continue                  # stale file or no file: ours to bind again
        finally:
            probe.close()
        raise RestoreError(f"process {pid} fd {e.fd}: a live server already listens on unix socket "
                           f"{k.address!r}; stop it (or restore elsewhere) and restore again")


def create(t, e: pb.Fd) -> int:
    """The listening or named datagram socket of `e` in target `t` (restore.Target)."""
    k = e.socket
    where = f"process {t.ns_pid} fd {e.fd}"
    if not k.address:          # a datagram socket connected one way, never bound: connect() comes later
        return t.sys("socket", socket.AF_UNIX, k.type | (SOCK_NONBLOCK if e.flags & O_NONBLOCK else 0), 0)
    abstract = k.address.startswith("\0")
    fd = t.sys("socket", socket.AF_UNIX, k.type | (SOCK_NONBLOCK if e.flags & O_NONBLOCK else 0), 0)
    res = bind(t, fd, k.address)
    if res < 0:
        raise RestoreError(f"{where}: cannot bind unix socket {k.address!r} again: {os.strerror(-res)}")
    if k.unix_mode and not abstract:
        t.sys("fchmodat", AT_FDCWD, t.cstr(k.address), k.unix_mode, 0, check=False)
    if k.listening:
        t.sys("listen", fd, k.backlog or socket.SOMAXCONN)
    return fd


def bind(t, fd: int, address: str) -> int:
    """Bind target `t`'s socket `fd` to `address` by injection, a stale socket file there
    removed first (by the target: with the image owner's file credentials); returns what
    bind returned."""
    name = os.fsencode(address)
    if not name.startswith(b"\0"):
        try:
            if stat.S_ISSOCK(os.lstat(name).st_mode):
                t.sys("unlinkat", AT_FDCWD, t.cstr(address), 0, check=False)
        except FileNotFoundError:
            pass
    sa = sockaddr(address)
    return t.sys("bind", fd, t.put(sa), len(sa), check=False)


def live(address: str, kind: int) -> bool:
    """Does a live socket answer on `address` (a connection or datagram would reach it)?"""
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(os.fsencode(address))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def sockaddr(name: str) -> bytes:
    raw = os.fsencode(name)
    return struct.pack("<H", socket.AF_UNIX) + raw + (b"" if raw.startswith(b"\0") else b"\0")
