"""inotify watches and fanotify marks: what each instance watches, and giving it back.

/proc/PID/fdinfo lists an instance's watches (inotify: wd, mask, and a file handle of
the watched inode; fanotify: init flags and marks on inodes, mounts or filesystems). A
watch is saved by path: the handle is opened with open_by_handle_at on a mount of its
filesystem and the path read back (as CRIU's criu/fsnotify.c does). A restore recreates
the instance in the process (injected inotify_init1 / fanotify_init) and adds each watch
again, as the image's owner (the target already has the owner's file credentials), so
only what the owner may read is watched.

inotify watch descriptors are numbers the program keeps: the kernel hands them out
cyclically upward from 1 (idr_alloc_cyclic in fs/notify/inotify/inotify_user.c), never
reusing a freed one before wrapping. So watches are added in wd order, and a gap is
skipped by adding and removing a throwaway watch, which moves the allocator on; the
IN_IGNORED events that removal queues are read away before the program runs. Where the
allocator stood beyond the highest live wd at the dump is not shown: a watch the program
adds after a restore may get a smaller number than it would have.

Events queued but not yet read at the dump are lost (as with CRIU): the program sees
the events of what happens after the restore. fanotify groups in a permission class
(FAN_CLASS_CONTENT/PRE_CONTENT: processes may wait on an answer) are refused at dump.
"""
import array
import ctypes
import errno
import fcntl
import os
import re
import stat
import termios
from dataclasses import dataclass

from ..errors import RestoreError, UnsupportedError
from ..images import pb
from ..kernel.libc import libc, pidfd_getfd, pidfd_open

INOTIFY_TARGET = "anon_inode:inotify"
FANOTIFY_TARGET = "anon_inode:[fanotify]"
TARGETS = {INOTIFY_TARGET: pb.INOTIFY, FANOTIFY_TARGET: pb.FANOTIFY}
O_PATH, O_NONBLOCK = 0o10000000, 0o4000
F_SETFL = 4
IN_DONT_FOLLOW = 0x02000000
IN_DELETE_SELF = 0x400
AT_FDCWD = -100
FAN_CLASS_CONTENT, FAN_CLASS_PRE_CONTENT = 0x4, 0x8
FAN_MARK_ADD, FAN_MARK_DONT_FOLLOW = 0x1, 0x4
FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORED_SURV_MODIFY = 0x20, 0x40
FAN_MARK_EVICTABLE, FAN_MARK_IGNORE = 0x200, 0x400
MARK_INODE, MARK_MOUNT, MARK_FILESYSTEM = 0, 1, 2
MARK_TYPE_FLAGS = {MARK_INODE: 0x0, MARK_MOUNT: 0x10, MARK_FILESYSTEM: 0x100}
_FIELD = re.compile(r"([a-z_-]+):(\S+)")


class file_handle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(file_handle), ctypes.c_int]


@dataclass
class Mount:
    mnt_id: int
    dev: int          # kernel dev_t encoding, as fdinfo's sdev
    root: str         # the mount's root within its filesystem
    point: str        # where it is mounted


def _mounts(pid: int) -> list[Mount]:
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            c = line.split()
            major, minor = (int(x) for x in c[2].split(":"))
            point = c[4].encode().decode("unicode_escape")
            out.append(Mount(int(c[0]), (major << 20) | minor, c[3], point))
    return out


def _fields(line: str) -> dict[str, str]:
    return dict(_FIELD.findall(line))


def _path_of_handle(pid: int, fd: int, f: dict[str, str], mounts: list[Mount]) -> tuple[str, bool]:
    """The path of a watched inode, from its file handle; and whether it is a symlink."""
    what = f"process {pid}: fd {fd} watches inode {int(f['ino'], 16)}"
    if "f_handle" not in f:
        raise UnsupportedError(f"{what}, whose file system gives no file handle; not supported")
    dev = int(f["sdev"], 16)
    raw = bytes.fromhex(f["f_handle"])
    h = file_handle(handle_bytes=len(raw), handle_type=int(f["fhandle-type"], 16))
    ctypes.memmove(h.f_handle, raw, len(raw))
    cands = sorted((m for m in mounts if m.dev == dev), key=lambda m: m.root != "/")
    denied = False
    for m in cands:
        try:
            mfd = os.open(m.point, os.O_RDONLY | os.O_DIRECTORY)   # not O_PATH: the kernel wants a real file
        except OSError:
            continue
        try:
            ofd = libc.open_by_handle_at(mfd, ctypes.byref(h), O_PATH)
        finally:
            os.close(mfd)
        if ofd < 0:
            denied |= ctypes.get_errno() == errno.EPERM
            continue
        try:
            path = os.readlink(f"/proc/self/fd/{ofd}")
            link = stat.S_ISLNK(os.fstat(ofd).st_mode) if not path.endswith(" (deleted)") else False
        finally:
            os.close(ofd)
        if path.endswith(" (deleted)") or not path.startswith("/"):
            raise UnsupportedError(f"{what} ({path}), which has been deleted or is not reachable; "
                                   "not supported")
        return path, link
    if denied:
        raise UnsupportedError(f"{what}: finding its path from its file handle (open_by_handle_at) "
                               "needs CAP_DAC_READ_SEARCH on the host, which a rootless run lacks; "
                               "checkpoint as root or through the node service (hpcckptd)")
    raise UnsupportedError(f"{what} on device {dev >> 20}:{dev & 0xfffff}, which hpcckpt cannot "
                           "find by its file handle")


def _lines(pid: int, fd: int, prefix: str) -> list[str]:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return [line for line in f if line.startswith(prefix)]


def describe(e: pb.Fd, target: str, pid: int, first: bool, notes: list[str] | None = None) -> None:
    """Fill `e` from the fd's fdinfo; the watches go with the description's first fd.
    Events waiting to be read are lost: `notes` says how many bytes of them."""
    e.kind = TARGETS[target]
    if e.kind == pb.INOTIFY:
        if first:
            e.inotify.extend(_inotify_watches(pid, e.fd))
    else:
        _fanotify(e, pid, first)
    if first and notes is not None:
        n = _unread(pid, e.fd)
        if n:
            notes.append(f"process {pid}: fd {e.fd} ({target}) had {n} bytes of unread events; "
                         "a restore does not give them back")


def _unread(pid: int, fd: int) -> int:
    """Bytes of events queued on an inotify/fanotify fd (FIONREAD on our duplicate)."""
    try:
        pidfd = pidfd_open(pid)
        try:
            local = pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
    except OSError:
        return 0
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(local, termios.FIONREAD, buf)
        return buf[0]
    except OSError:
        return 0
    finally:
        os.close(local)


def _inotify_watches(pid: int, fd: int) -> list[pb.InotifyWatch]:
    mounts = _mounts(pid)
    out = []
    for line in _lines(pid, fd, "inotify "):
        f = _fields(line)
        path, link = _path_of_handle(pid, fd, f, mounts)
        out.append(pb.InotifyWatch(wd=int(f["wd"], 16), path=path,
                                   mask=int(f["mask"], 16) | (IN_DONT_FOLLOW if link else 0)))
    return sorted(out, key=lambda w: w.wd)


def _fanotify(e: pb.Fd, pid: int, first: bool) -> None:
    lines = _lines(pid, e.fd, "fanotify ")
    head = _fields(lines[0]) if lines else {}
    if "flags" not in head:
        raise UnsupportedError(f"process {pid}: fd {e.fd} is a fanotify group whose fdinfo this "
                               "kernel shows in a form hpcckpt cannot read")
    flags = int(head["flags"], 16)
    if flags & (FAN_CLASS_CONTENT | FAN_CLASS_PRE_CONTENT):
        raise UnsupportedError(
            f"process {pid}: fd {e.fd} is a fanotify group of a permission class "
            f"(flags {flags:#x}): processes may be waiting for its answers; not supported")
    e.fanotify.flags, e.fanotify.event_flags = flags, int(head["event-flags"], 16)
    if not first:
        return
    mounts = _mounts(pid)
    for line in lines[1:]:
        f = _fields(line)
        m = pb.FanotifyMark(mask=int(f["mask"], 16), ignored_mask=int(f["ignored_mask"], 16),
                            mflags=int(f.get("mflags", "0"), 16))
        if "ino" in f:
            m.type = MARK_INODE
            m.path, link = _path_of_handle(pid, e.fd, f, mounts)
            if link:
                m.mflags |= FAN_MARK_DONT_FOLLOW
        elif "mnt_id" in f:
            m.type = MARK_MOUNT
            mnt = [x for x in mounts if x.mnt_id == int(f["mnt_id"], 16)]
            if not mnt:
                raise UnsupportedError(f"process {pid}: fd {e.fd} marks mount {f['mnt_id']}, which "
                                       "is not in its mount namespace; not supported")
            m.path = mnt[0].point
        elif "sdev" in f:
            m.type = MARK_FILESYSTEM
            mnt = [x for x in mounts if x.dev == int(f["sdev"], 16)]
            if not mnt:
                raise UnsupportedError(f"process {pid}: fd {e.fd} marks a file system no mount shows")
            m.path = mnt[0].point
        else:
            raise UnsupportedError(f"process {pid}: fd {e.fd}: unknown fanotify mark {line.strip()!r}")
        e.fanotify.marks.append(m)


# -- restore ---------------------------------------------------------------------------

def create(t, e: pb.Fd, local_copy) -> int:
    """The instance, made by the process itself, with every watch (mark) back."""
    if e.kind == pb.INOTIFY:
        return _create_inotify(t, e, local_copy)
    return _create_fanotify(t, e)


def _scratch_path(watches) -> str:
    """A directory anyone may read and no watch is on: the throwaway watch's target."""
    taken = set()
    for w in watches:
        try:
            s = os.stat(w.path, follow_symlinks=False)
            taken.add((s.st_dev, s.st_ino))
        except OSError:
            pass
    for p in ("/", "/usr", "/etc", "/proc", "/dev", "/tmp"):
        s = os.stat(p)
        if (s.st_dev, s.st_ino) not in taken:
            return p
    raise RestoreError("no directory left for moving inotify's watch numbers on")


def _create_inotify(t, e: pb.Fd, local_copy) -> int:
    fd = t.sys("inotify_init1", O_NONBLOCK)
    watches = sorted(e.inotify, key=lambda w: w.wd)
    scratch = None
    nxt = 1
    skipped = False
    for w in watches:
        while nxt < w.wd:
            scratch = scratch or t.cstr(_scratch_path(watches))
            wd = t.sys("inotify_add_watch", fd, scratch, IN_DELETE_SELF)
            t.sys("inotify_rm_watch", fd, wd)
            nxt, skipped = wd + 1, True
        got = t.sys("inotify_add_watch", fd, t.cstr(w.path), w.mask, check=False)
        if got != w.wd:
            why = os.strerror(-got) if got < 0 else f"it came back as watch {got}"
            raise RestoreError(f"process {t.ns_pid} fd {e.fd}: cannot watch {w.path} again as inotify "
                               f"watch {w.wd}: {why}")
        nxt = got + 1
    if skipped:         # the throwaways' IN_IGNORED events (and anything else: see above)
        local = local_copy(t, fd)
        try:
            while True:
                try:
                    os.read(local, 65536)
                except BlockingIOError:
                    break
        finally:
            os.close(local)
    t.sys("fcntl", fd, F_SETFL, e.flags & O_NONBLOCK)
    return fd


def _create_fanotify(t, e: pb.Fd) -> int:
    fa = e.fanotify
    fd = t.sys("fanotify_init", fa.flags, fa.event_flags, check=False)
    if fd < 0:
        raise RestoreError(f"process {t.ns_pid} fd {e.fd}: cannot create its fanotify group "
                           f"(flags {fa.flags:#x}): {os.strerror(-fd)}")
    for m in fa.marks:
        base = FAN_MARK_ADD | MARK_TYPE_FLAGS[m.type] | (m.mflags & (FAN_MARK_EVICTABLE | FAN_MARK_DONT_FOLLOW))
        adds = []
        if m.mask:
            adds.append((base, m.mask))
        if m.ignored_mask:
            ign = FAN_MARK_IGNORE if m.mflags & FAN_MARK_IGNORE else FAN_MARK_IGNORED_MASK
            adds.append((base | ign | (m.mflags & FAN_MARK_IGNORED_SURV_MODIFY), m.ignored_mask))
        for flags, mask in adds:
            res = t.sys("fanotify_mark", fd, flags, mask, AT_FDCWD, t.cstr(m.path), check=False)
            if res < 0:
                raise RestoreError(f"process {t.ns_pid} fd {e.fd}: cannot mark {m.path} for fanotify "
                                   f"again: {os.strerror(-res)}"
                                   + (" (the image's owner may not read it)" if -res == errno.EACCES else ""))
    t.sys("fcntl", fd, F_SETFL, e.flags & O_NONBLOCK)    # as the program left it, whatever fanotify_init said
    return fd
