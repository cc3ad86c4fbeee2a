"""A server's listening sockets across a dump that kills it (kernel/listenlock.py).

Before the tree is frozen, each TCP listener it holds is locked (new SYNs dropped, so a
client connecting while the server is away retransmits instead of being refused) and the
program gets up to DRAIN seconds to accept the connections already queued, which could
not be checkpointed. The lock rides along with the connection lock of the dump: released
with it when the tree runs on, kept with it when the tree is killed; the image names the
table (`Socket.listen_lock`) and the restore lets the restored listeners through.
"""
import os
import socket
import struct
import time

from ..kernel import listenlock, sockdiag
from ..kernel.libc import pidfd_getfd, pidfd_open

DRAIN = 1.0        # seconds the program gets to accept what is queued before the freeze


def descendants(root: int) -> list[int]:
    """The root and its descendants now (a listing; the freeze makes the real one)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def _same_owner(root: int, pids: list[int]) -> list[int]:
    """Only processes owned as the root is: the dump checks every member's owner once the
    tree is frozen, after this; a setuid descendant's listener is not ours to hold off."""
    try:
        uid = os.stat(f"/proc/{root}").st_uid
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                out.append(pid)
        except OSError:
            continue
    return out


def _sockets(pids: list[int]) -> dict[int, tuple[int, int]]:
    """Socket inode -> (a pid, its fd) holding it."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.setdefault(int(target[8:-1]), (pid, int(fd)))
    return out


def _listeners() -> dict[int, tuple[int, str, int, int]]:
    """Listening TCP sockets of our network namespace: inode -> (family, address, port,
    connections waiting to be accepted)."""
    out = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        req = struct.pack("<BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << sockdiag.TCP_LISTEN) + bytes(48)
        try:
            msgs = list(sockdiag._dump(req))
        except OSError:
            continue
        for msg in msgs:
            port = struct.unpack_from(">H", msg, 4)[0]
            raw = msg[8:12] if family == socket.AF_INET else msg[8:24]
            rq, _wq, _uid, inode = struct.unpack_from("<4I", msg, 56)
            out[inode] = (family, socket.inet_ntop(family, raw), port, rq)
    return out


class Held:
    """The dump's connection lock (engine/tcp.DumpConnections) with the tree's listeners
    locked too; `locked` maps each locked listener's inode to the table."""

    def __init__(self, conns, root: int):
        self.conns = conns
        self.lock = listenlock.ListenLock(listenlock.table_name(root))
        self.locked: dict[int, str] = {}

    def __getattr__(self, name):
        return getattr(self.conns, name)

    def release(self) -> list[str]:
        return self.conns.release() + self.lock.open()

    def cleanup(self) -> list[str]:
        return self.conns.cleanup() + self.lock.cleanup()

    def keep(self) -> None:
        self.conns.keep()
        self.lock.keep()


def quiesce(conns, root: int) -> Held:
    """Lock the listeners the tree holds, then wait (up to DRAIN) for their accept queues
    to empty; returns the connection lock with them."""
    held = Held(conns, root)
    listening = _listeners()
    mine = {ino: where for ino, where in _sockets(_same_owner(root, descendants(root))).items()
            if ino in listening}
    try:
        for ino, (pid, fd) in mine.items():
            family, address, port, _ = listening[ino]
            try:
                pidfd = pidfd_open(pid)
            except OSError:
                continue                 # gone since: nothing to lock
            try:
                s = socket.socket(fileno=pidfd_getfd(pidfd, fd))
            except OSError:
                continue
            finally:
                os.close(pidfd)
            try:
                held.lock.lock(s, family, address, port)
            finally:
                s.close()
            held.locked[ino] = held.lock.table
        deadline = time.monotonic() + DRAIN
        while held.locked and time.monotonic() < deadline:
            now = _listeners()
            if not any(now.get(ino, (0, "", 0, 0))[3] for ino in held.locked):
                break
            time.sleep(0.005)
    except BaseException:
        held.lock.cleanup()
        raise
    return held
