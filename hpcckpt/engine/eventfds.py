"""eventfd, timerfd, signalfd and epoll: their whole state is in /proc/PID/fdinfo, and
each is recreated by the process itself (injected eventfd2 / timerfd_create +
timerfd_settime / signalfd4 / epoll_create1), then moved to its fd number like any other
fd (files.py, restore.py). Shared across processes by file id like other open file
descriptions. An epoll's watches name fd numbers, so they are added (epoll_ctl) only
once every fd of every process is in place; the kernel then recomputes readiness.
"""
import os
import re
import struct

from ..errors import RestoreError, UnsupportedError
from ..images import pb

TARGETS = {"anon_inode:[eventfd]": pb.EVENTFD, "anon_inode:[timerfd]": pb.TIMERFD,
           "anon_inode:[signalfd]": pb.SIGNALFD, "anon_inode:[eventpoll]": pb.EPOLL}
EPOLL_CTL_ADD = 1
_TFD = re.compile(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\s*-?\d+\s+ino:\s*([0-9a-f]+)")
O_NONBLOCK = 0o4000
EFD_SEMAPHORE = 1
TFD_IOC_SET_TICKS = 0x40085400      # _IOW('T', 0, u64)
_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def describe(e: pb.Fd, target: str, info: dict[str, str], pid: int = 0, first: bool = True) -> None:
    """Fill `e` (kind and state) from the fd's fdinfo. `first`: this is the first fd of its
    description in the tree, which carries an epoll's watches (host `pid` holds it)."""
    e.kind = TARGETS[target]
    if e.kind == pb.EPOLL:
        if first:
            e.epoll_watches.extend(_epoll_watches(pid, e.fd))
    elif e.kind == pb.EVENTFD:
        e.eventfd.CopyFrom(pb.EventFd(count=int(info["eventfd-count"]),
                                      semaphore=info.get("eventfd-semaphore", "0") == "1"))
    elif e.kind == pb.TIMERFD:
        vs, vn = (int(x) for x in _PAIR.match(info["it_value"]).groups())
        isec, ins = (int(x) for x in _PAIR.match(info["it_interval"]).groups())
        e.timerfd.CopyFrom(pb.TimerFd(clockid=int(info["clockid"]), ticks=int(info["ticks"]),
                                      settime_flags=int(info["settime flags"], 8),
                                      value_sec=vs, value_nsec=vn, interval_sec=isec, interval_nsec=ins))
    else:
        e.signalfd_mask = int(info["sigmask"], 16)


def _epoll_watches(pid: int, fd: int) -> list[pb.EpollWatch]:
    """The 'tfd:' lines of an epoll fd; each watched fd must still be that file here."""
    out = []
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        lines = [line for line in f if line.startswith("tfd:")]
    for line in lines:
        m = _TFD.match(line)
        if m is None:
            raise UnsupportedError(f"process {pid}: fd {fd} is an epoll whose watch list this "
                                   f"kernel shows as {line.strip()!r}, which hpcckpt cannot read")
        tfd, events, data, ino = int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16)
        try:
            same = os.stat(f"/proc/{pid}/fd/{tfd}").st_ino == ino
        except FileNotFoundError:
            same = False
        if not same:
            raise UnsupportedError(
                f"process {pid}: fd {fd} is an epoll watching a file added as fd {tfd}, which is "
                "closed or reused since; hpcckpt cannot checkpoint that yet")
        out.append(pb.EpollWatch(fd=tfd, events=events, data=data))
    return out


def add_watches(t, p: pb.Process) -> None:
    """Every watch of every epoll fd of `p`, in target `t`, whose fds are all in place."""
    for e in p.fds:
        for w in e.epoll_watches:
            res = t.sys("epoll_ctl", e.fd, EPOLL_CTL_ADD, w.fd, t.put(struct.pack("<IQ", w.events, w.data)),
                        check=False)
            if res < 0:
                raise RestoreError(f"process {p.pid} fd {e.fd}: cannot watch fd {w.fd} with epoll "
                                   f"again: {os.strerror(-res)}")


def create(t, e: pb.Fd, local_copy) -> int:
    """The fd recreated in target `t` (a restore.Target); returns its number there.
    `local_copy(t, fd)` gives this process a duplicate, to write an eventfd's count."""
    nonblock = e.flags & O_NONBLOCK
    if e.kind == pb.EVENTFD:
        fd = t.sys("eventfd2", 0, nonblock | (EFD_SEMAPHORE if e.eventfd.semaphore else 0))
        if e.eventfd.count:
            local = local_copy(t, fd)
            try:
                os.write(local, struct.pack("<Q", e.eventfd.count))
            finally:
                os.close(local)
        return fd
    if e.kind == pb.TIMERFD:
        tf = e.timerfd
        fd = t.sys("timerfd_create", tf.clockid, nonblock)
        value = (tf.value_sec, tf.value_nsec)
        if value == (0, 0) and tf.ticks:
            # a periodic timer that expired and was not read yet is parked by the kernel
            # (fdinfo shows 0 left) until a read forwards it: it runs on a period from now
            value = (tf.interval_sec, tf.interval_nsec)
        if value != (0, 0):
            # what was left, relative: an absolute timer comes back at the same distance
            spec = struct.pack("<4Q", tf.interval_sec, tf.interval_nsec, *value)
            t.sys("timerfd_settime", fd, 0, t.put(spec), 0)
        if tf.ticks:
            res = t.sys("ioctl", fd, TFD_IOC_SET_TICKS, t.put(struct.pack("<Q", tf.ticks)), check=False)
            if res < 0:
                raise RestoreError(f"process {t.ns_pid} fd {e.fd}: cannot give the timerfd its "
                                   f"{tf.ticks} unread expirations: {os.strerror(-res)}")
        return fd
    if e.kind == pb.EPOLL:
        return t.sys("epoll_create1", 0)
    return t.sys("signalfd4", -1, t.put(struct.pack("<Q", e.signalfd_mask)), 8, nonblock)
