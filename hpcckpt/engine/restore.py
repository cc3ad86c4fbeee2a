"""Restore a process tree from an image set.

Everything that can be checked without touching a process is checked first (digests,
format, kernel and vDSO, mapped files, files to reopen, PIDs, ownership). Then a traced
stub is created at the image's PID and turned into the process by syscalls we inject:
its own mappings go, the vDSO family moves to where the image had it, every mapping is
recreated and filled from the page file, files, signal state, threads and credentials
follow, and the registers last. Any failure kills the stub: never a half-restored process.
"""
import os
import platform
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from functools import partial

from ..errors import HpcckptError, ImageError, PermissionDeniedError, RestoreError
from ..images import pb
from ..images.imageset import ImageSet, open_image_file
from ..kernel import effects, elf, proc, ptrace, vdso
from ..kernel.arch import current as arch
from ..kernel.effects import Queue, Step
from ..kernel.inject import Injector, Mem, find_syscall_insn
from ..kernel.libc import pidfd_getfd, pidfd_open
from ..progress import Progress
from . import eventfds, files, fsnotify, locks, memory, pidns, sockets, sysvipc, timers, ttys, userns
from ..images.chain import Link, load_chain, pages_file_size, sources, Source
from ..images.validate import validate, validate_fsnotify, validate_in_flight, validate_ipc, validate_netns
from .create import create_tree
from .incremental import TreeTracker
from .netns import Restoring as NewNetns

SCRATCH = 1 << 16
PUT_ROOM = 48 << 10         # scratch: arguments below, queued calls' results and code above
WINDOW = 32 << 20           # scratch plus room to park the vDSO family while moving it
AT_FDCWD = -100
MAP_PRIVATE, MAP_SHARED, MAP_FIXED, MAP_ANON, MAP_GROWSDOWN = 0x2, 0x1, 0x10, 0x20, 0x100
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PR_SET_MM, PR_SET_MM_MAP, PR_SET_NAME = 35, 14, 15
F_DUPFD_CLOEXEC, F_SETFL, F_SETPIPE_SZ = 1030, 4, 1031
PR_SET_CHILD_SUBREAPER = 36
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000
KIND_NAMES = {pb.VDSO: "[vdso]", pb.VVAR: "[vvar]", pb.VVAR_VCLOCK: "[vvar_vclock]"}


@dataclass
class Restored:
    pid: int
    threads: int
    pages_bytes: int
    total_s: float
    processes: int = 1
    notes: list[str] = field(default_factory=list)   # what came back differently (a pty's index)


# -- checks that touch nothing ---------------------------------------------------------

def check_image(iset: ImageSet, arriving=None) -> tuple[pb.Inventory, pb.Process, pb.Pagemap]:
    inv = iset.inventory()
    iset.verify(inv, skip=arriving.names if arriving else ())
    if inv.arch != platform.machine():
        raise RestoreError(f"{iset.path} was dumped on {inv.arch}; this machine is {platform.machine()}")
    pid = inv.root_pid
    p, pm = iset.process(pid), iset.pagemap(pid)
    if pm.pages_file != f"pages-{pid}.img" or pm.pages_file not in inv.digests:
        raise ImageError(f"{iset.path}: pagemap names page file {pm.pages_file!r}, which is not "
                         f"this image's pages-{pid}.img")
    return inv, p, pm


def check_owner(iset: ImageSet, inv: pb.Inventory, p: pb.Process) -> None:
    """An image never grants more than its owner had.

    The caller must own the image (or be root), and the image may only claim the
    credentials of whoever owns its files: a user's image edited to claim uid 0 is refused.
    """
    owner = os.stat(iset.path / "inventory.img").st_uid
    me = os.geteuid()
    if me != 0 and owner != me:
        raise PermissionDeniedError(f"image {iset.path} belongs to uid {owner}, not to you (uid {me})")
    c = p.creds
    claimed = {c.uid, c.euid, c.suid, c.fsuid, inv.uid}
    if owner != 0 and claimed != {owner}:
        raise PermissionDeniedError(
            f"image {iset.path} is owned by uid {owner} but claims uids {sorted(claimed)}: refused")
    if me != 0 and not userns.active():   # rootless runs hold the powers in their own namespaces
        raise PermissionDeniedError(
            "restoring a process needs root (to choose its PID and address space); run "
            "hpcckpt restore as root or through the hpcckpt node service")


def check_kernel(inv: pb.Inventory) -> None:
    here = vdso.layout()
    for name, size in (("[vdso]", inv.vdso_size), ("[vvar]", inv.vvar_size),
                       ("[vvar_vclock]", inv.vvar_vclock_size)):
        have = here[name].size if name in here else 0
        if size and have != size:
            raise RestoreError(
                f"this kernel's {name} is {have} bytes, the image's ({inv.kernel}) {size}: "
                "the process was dumped on a different kernel; restore it on a node running "
                f"{inv.kernel}")
    if inv.vdso_xxh3 and inv.vdso_xxh3 != vdso.digest():
        raise RestoreError(
            f"this kernel's vDSO code differs from the one at dump time (kernel {inv.kernel}, "
            f"here {platform.release()}); restore on a node running {inv.kernel}")


def check_mapped_files(inv: pb.Inventory) -> None:
    for f in inv.files:
        try:
            st = os.stat(f.path)
        except FileNotFoundError:
            raise RestoreError(f"{f.path}, mapped by the process, is missing on this node") from None
        if f.build_id:
            now = elf.build_id(f.path)
            if now != f.build_id:
                raise RestoreError(
                    f"{f.path} differs from the one at dump time (build-id {now or 'none'} here, "
                    f"{f.build_id} in the image): install the same version on this node")
        elif st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            raise RestoreError(
                f"{f.path}, mapped by the process, changed since the checkpoint "
                f"({f.size} -> {st.st_size} bytes)")


def check_ids_free(p: pb.Process) -> None:
    for t in p.threads:
        if os.path.exists(f"/proc/{t.tid}"):
            raise RestoreError(
                f"PID {t.tid} (needed by {'process' if t.tid == p.pid else 'a thread of'} {p.pid}) "
                "is in use: restore after that process is gone, or run jobs under `hpcckpt run` "
                "so each has its own PID namespace")


# -- the target ------------------------------------------------------------------------

class Target:
    """The stub being turned into the process: injectors per thread and a scratch block."""

    def __init__(self, pid: int, ns_pid: int, image_vmas, syscall_ip: int | None = None):
        self.pid = pid                      # as we see it
        self.mem = Mem(pid)
        svmas = proc.maps(pid, with_flags=False)   # maps, not smaps: the stub's flags are of no use
        self.main = Injector(pid, syscall_ip or find_syscall_insn(pid, svmas))
        self.threads = {ns_pid: self.main}  # by the TIDs the process itself sees
        self.host = {ns_pid: pid}           # ... and as we see them
        self.window = _free_window(list(image_vmas) + svmas)
        self.scratch = self.window
        code_ok = self._map_scratch()
        self.queue = Queue(self.main, self.mem, self.scratch + PUT_ROOM, SCRATCH - PUT_ROOM, code_ok, RestoreError)
        self._off = 0
        self.stub_vmas = svmas
        self.ns_pid = ns_pid
        self.shm_fds: dict[int, int] = {}       # shared memory object id -> fd here
        self.pidfds: dict[int, Step] = {}       # other tree member's PID -> pidfd here
        self.extra_fds: list[int | Step] = []   # staged fds others may take; closed at install
        self.fd_base: int | None = None         # staged fds go at or above it (_prepare_fds)

    def _map_scratch(self) -> bool:
        """The scratch block; executable where allowed (W^X policies refuse), so queued
        calls run as one block of code (kernel/effects.py). Whether it is."""
        flags = MAP_PRIVATE | MAP_ANON | MAP_FIXED_NOREPLACE
        if self.main.syscall("mmap", self.scratch, SCRATCH, 7, flags, -1, 0, check=False) == self.scratch:
            return True
        self.main.syscall("mmap", self.scratch, SCRATCH, 3, flags, -1, 0)
        return False

    def take_fd(self, owner: "Target", fd: "int | Step", queue: bool = False) -> "int | Step":
        """Duplicate `owner`'s fd into this process: the same open file description. With
        `queue`, the calls are only queued (`later`): a Step is returned."""
        if owner is self:
            step = self.later("fcntl", fd, F_DUPFD_CLOEXEC, 0)
        else:
            owner.flush()       # its fd exists once its own queue has run
            fd = fd.value if isinstance(fd, Step) else fd
            if owner.ns_pid not in self.pidfds:
                self.pidfds[owner.ns_pid] = self.later("pidfd_open", owner.ns_pid, 0)
            step = self.later("pidfd_getfd", self.pidfds[owner.ns_pid], fd, 0)
        if queue:
            return step
        self.flush()
        return step.value

    def sys(self, name: str, *args: int, tid: int | None = None, check: bool = True) -> int:
        """One syscall now (after the queued ones; an argument may be a queued call)."""
        self.flush()
        args = tuple(a.value if isinstance(a, Step) else a for a in args)
        return (self.threads[tid] if tid else self.main).syscall(name, *args, check=check)

    def later(self, name: str, *args, check: int | None = effects.ERRNO, fail: str = "",
              tid: int | None = None) -> Step | int:
        """A syscall in the main thread, queued: it runs with the others queued, in one stop,
        at the next `flush` (or `sys`); an argument may be an earlier Step's result. A
        failure (`check`: kernel/effects.py) stops the queue there, named by `fail`. In
        another thread (`tid`), the call is made now, checked for an errno unless `check`
        is None."""
        if tid is not None and tid != self.ns_pid:
            return self.sys(name, *args, tid=tid, check=check is not None)
        return self.queue.add(name, *args, check=check, fail=fail)

    def flush(self) -> None:
        self.queue.run()

    def put(self, data: bytes) -> int:
        """Copy bytes into the scratch block; the address stays valid until it wraps
        (queued calls run first: their arguments may be there)."""
        if self._off + len(data) > PUT_ROOM:
            self.flush()
            self._off = 0
        addr = self.scratch + self._off
        self.mem.write(addr, data)
        self._off += (len(data) + 15) & ~15
        return addr

    def cstr(self, s: str) -> int:
        return self.put(os.fsencode(s) + b"\0")

    def set_syscall_ip(self, ip: int) -> None:
        if not self.queue.code_ok:   # queued calls injected one by one use the instruction where it is now
            self.flush()
        for inj in self.threads.values():
            inj.syscall_ip = ip


def _free_window(vmas) -> int:
    spans = sorted((v.start, v.end) for v in vmas)
    base = 0x100000000
    while base < 0x7F0000000000:
        if all(e <= base or s >= base + WINDOW for s, e in spans):
            return base
        base += WINDOW
    raise RestoreError("no free address range left for the restore's scratch memory")


def _unmap_spans(stub_vmas, keep: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The stub's mappings to remove (all but the vDSO family and vsyscall), merged into
    as few spans as the ones kept (and `keep`) allow: one munmap per span, not per
    mapping (holes inside a span are fine to munmap)."""
    keep = sorted(keep + [(v.start, v.end) for v in stub_vmas
                          if v.path in vdso.NAMES or v.path == "[vsyscall]"])
    spans: list[tuple[int, int]] = []
    for v in sorted(stub_vmas, key=lambda v: v.start):
        if v.path in vdso.NAMES or v.path == "[vsyscall]":
            continue
        if spans and not any(spans[-1][1] <= ks < v.start for ks, _ in keep):
            spans[-1] = (spans[-1][0], v.end)
        else:
            spans.append((v.start, v.end))
    return spans


def _clear_stub(t: Target, vmas: list[pb.Vma]) -> None:
    """Unmap the stub's own mappings and move its vDSO family where the image had them."""
    for start, end in _unmap_spans(t.stub_vmas, [(t.window, t.window + WINDOW)]):
        t.later("munmap", start, end - start)
    wanted = {KIND_NAMES[v.kind]: v for v in vmas if v.kind in KIND_NAMES}
    park = t.window + SCRATCH
    for v in t.stub_vmas:
        if v.path not in vdso.NAMES:
            continue
        dst = wanted.get(v.path)
        if dst is None:
            t.later("munmap", v.start, v.size)
            continue
        # park first, so a destination overlapping another member of the family is free
        t.later("mremap", v.start, v.size, v.size, MREMAP_MAYMOVE | MREMAP_FIXED, park)
        if v.path == "[vdso]":
            t.set_syscall_ip(t.main.syscall_ip - v.start + park)
        v.start, v.end = park, park + v.size
        park += (v.size + (1 << 20)) & ~((1 << 20) - 1)
    for v in t.stub_vmas:
        dst = wanted.get(v.path)
        if dst is not None:
            t.later("mremap", v.start, v.size, v.size, MREMAP_MAYMOVE | MREMAP_FIXED, dst.start)
            if v.path == "[vdso]":
                t.set_syscall_ip(t.main.syscall_ip - v.start + dst.start)
    t.flush()


def _set_fs_creds(t: Target, c: pb.Creds) -> None:
    """Open every file as the image's owner would: groups, fsgid, fsuid first. Groups the
    stub already has are left alone: a user namespace (rootless `hpcckpt run`) denies
    setgroups even to the same list."""
    have = [int(g) for g in proc.status(t.pid).get("Groups", "").split()]
    if sorted(c.groups) != sorted(have):
        groups = struct.pack(f"<{len(c.groups)}I", *c.groups)
        t.later("setgroups", len(c.groups), t.put(groups) if groups else 0)
    t.later("setfsgid", c.fsgid, check=None)    # returns the previous fsgid, never an errno
    t.later("setfsuid", c.fsuid, check=None)


def _set_mm(t: Target, mm: pb.Mm) -> None:
    exe_fd = t.sys("openat", AT_FDCWD, t.cstr(mm.exe), os.O_RDONLY | os.O_CLOEXEC)
    auxv = t.put(mm.auxv)
    m = struct.pack("<11QQII", mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                    mm.start_brk, mm.brk, mm.start_stack, mm.arg_start, mm.arg_end,
                    mm.env_start, mm.env_end, auxv, len(mm.auxv), exe_fd)
    try:
        t.sys("prctl", PR_SET_MM, PR_SET_MM_MAP, t.put(m), len(m), 0)
    finally:
        t.sys("close", exe_fd)


def _map_vmas(t: Target, vmas: list[pb.Vma], written: set[int]) -> None:
    """Every mapping of the image at its address, in one stop: each file opened once, its
    fd handed to the mmaps within the block; the first failure stops it and is named."""
    opened: dict[tuple[str, int], Step] = {}
    for v in vmas:
        if v.kind in KIND_NAMES or v.kind in (pb.VSYSCALL, pb.SYSV_SHM):
            continue
        prot = v.prot | (memory.PROT["w"] if v.start in written else 0)
        size = v.end - v.start
        fd, flags = -1, MAP_FIXED
        if v.kind in (pb.FILE_PRIVATE, pb.FILE_SHARED) and not v.shmid:
            mode = os.O_RDWR if v.kind == pb.FILE_SHARED and v.prot & memory.PROT["w"] else os.O_RDONLY
            if (v.path, mode) not in opened:
                opened[(v.path, mode)] = t.later("openat", AT_FDCWD, t.cstr(v.path), mode | os.O_CLOEXEC,
                                                 fail=f"cannot open {v.path} (mapped at {v.start:#x})")
            fd = opened[(v.path, mode)]
            flags |= MAP_SHARED if v.kind == pb.FILE_SHARED else MAP_PRIVATE
        elif v.shmid:
            fd, flags = t.shm_fds[v.shmid], MAP_FIXED | MAP_SHARED
        elif v.kind == pb.ANON_SHARED:
            flags |= MAP_SHARED | MAP_ANON
        else:
            flags |= MAP_PRIVATE | MAP_ANON | (MAP_GROWSDOWN if v.growsdown else 0)
        if v.noreserve:    # a terabyte reservation: without it the commit charge is refused
            flags |= MAP_NORESERVE
        t.later("mmap", v.start, size, prot, flags, fd, v.pgoff if fd != -1 else 0, check=v.start,
                fail=f"cannot recreate mapping {v.start:#x}-{v.end:#x} ({v.path or 'anonymous'})")
    for fd in opened.values():      # (after a failure they stay open: the stub is killed)
        t.later("close", fd, check=None)
    t.flush()


def _finish_vmas(t: Target, vmas: list[pb.Vma], written: set[int]) -> None:
    for v in vmas:
        if v.start in written and not v.prot & memory.PROT["w"]:
            t.later("mprotect", v.start, v.end - v.start, v.prot)
        for flag in v.vmflags:
            t.later("madvise", v.start, v.end - v.start, memory.MADVISE[flag], check=None)
    t.flush()


@dataclass
class Shared:
    """What processes of the tree share, as recreated so far: the first process that
    needs a description or shared memory object makes it, the others take it from there."""
    desc: dict[int, tuple["Target", int]]            # file id -> (owner, its staged fd)
    pipes: dict[int, tuple["Target", int, int]]      # pipe inode -> (owner, read fd, write fd)
    shm: dict[int, tuple["Target", int]]             # object id -> (owner, fd)
    objects: dict[int, pb.ShmemObject]
    socks: "sockets.Restoring" = field(default_factory=lambda: sockets.Restoring())  # unix pairs, TCP connections
    terminals: "ttys.Terminals | None" = None


def _local_copy(t: Target, fd: "int | Step") -> int:
    """The target's fd, duplicated into this (the restoring) process."""
    t.flush()
    fd = fd.value if isinstance(fd, Step) else fd
    pidfd = pidfd_open(t.pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


def _open_shmem(t: Target, vmas: list[pb.Vma], sh: Shared, iset: ImageSet) -> None:
    """An fd in `t` for every shared memory object it maps; made and filled once."""
    for oid in sorted({v.shmid for v in vmas if v.shmid}):
        if oid in sh.shm:
            t.shm_fds[oid] = t.take_fd(*sh.shm[oid], queue=True)
            continue
        obj = sh.objects.get(oid)
        if obj is None:
            raise ImageError(f"{iset.path}: process {t.ns_pid} maps shared memory object {oid}, "
                             "which the inventory does not list")
        if obj.path:
            fd = t.sys("openat", AT_FDCWD, t.cstr(obj.path), os.O_RDWR | files.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            fd = t.sys("memfd_create", t.cstr("hpcckpt-shmem"), 1)  # MFD_CLOEXEC
        t.sys("ftruncate", fd, obj.size)
        local = _local_copy(t, fd)
        try:
            with _image_file(iset, obj.data_file) as src:
                off = 0
                while chunk := src.read(4 << 20):
                    os.pwrite(local, chunk, off)
                    off += len(chunk)
        except OSError as e:
            raise RestoreError(f"filling shared memory object {oid} from {iset.path / obj.data_file}: "
                               f"{e.strerror}") from None
        finally:
            os.close(local)
        sh.shm[oid] = (t, fd)
        t.shm_fds[oid] = fd


def _prepare_fds(t: Target, fds: list[pb.Fd]) -> None:
    """Where `t`'s staged fds go (above every fd it has or will have), before any process
    stages anything: another's staging may make an fd here first (a connected unix pair)."""
    have = set(proc.fds(t.pid))
    t.fd_base, t.fd_have = max([e.fd for e in fds] + list(have) + [2]) + 1, have
    t.fd_keep = {e.fd for e in fds if e.kind == pb.INHERITED and e.fd in have}


def _stage_fds(t: Target, fds: list[pb.Fd], iset: ImageSet, sh: Shared) -> list[tuple[int, pb.Fd]]:
    """Open (or take from the process that already has it) every fd, at high numbers."""
    if t.fd_base is None:
        _prepare_fds(t, fds)
    base = t.fd_base
    staged: list[tuple[int, pb.Fd]] = []
    for e in fds:
        if e.kind == pb.INHERITED:
            if e.fd in t.fd_keep:
                continue
            fd = t.later("openat", AT_FDCWD, t.cstr("/dev/null"), os.O_RDWR)
        elif e.file_id and e.file_id in sh.desc:
            fd = t.take_fd(*sh.desc[e.file_id], queue=True)
        else:
            fd = _open_one(t, e, iset, sh)
        high = t.later("fcntl", fd, F_DUPFD_CLOEXEC, base)
        t.later("close", fd)
        staged.append((high, e))
        if e.file_id and e.kind != pb.INHERITED and e.file_id not in sh.desc:
            sh.desc[e.file_id] = (t, high)
    t.flush()
    return [(high.value, e) for high, e in staged]


def _open_one(t: Target, e: pb.Fd, iset: ImageSet, sh: Shared) -> "int | Step":
    """The description of `e` made in `t` (a new fd there, at any number), or the pipe end
    or socket pair end `t` takes from the process that made it. Files opened by path and
    pipe ends are only queued (a Step: its fd once the queue runs)."""
    base = t.fd_base
    if e.kind == pb.PIPE and e.path.startswith("/"):
        fd = _open_fifo(t, e, sh)
    elif e.kind == pb.PIPE:
        if e.pipe_id not in sh.pipes:
            ends = t.put(bytes(8))
            t.sys("pipe2", ends, 0)
            r, w = struct.unpack("<ii", t.mem.read(ends, 8))
            if e.pipe_size:
                t.later("fcntl", w, F_SETPIPE_SZ, e.pipe_size, check=None)
            hr, hw = (t.later("fcntl", x, F_DUPFD_CLOEXEC, base) for x in (r, w))
            t.later("close", r)
            t.later("close", w)
            t.extra_fds += [hr, hw]
            sh.pipes[e.pipe_id] = (t, hr, hw)
        owner, r, w = sh.pipes[e.pipe_id]
        fd = t.take_fd(owner, r if e.flags & files.O_ACCMODE == os.O_RDONLY else w, queue=True)
        if e.pipe_data:
            local = _local_copy(owner, w)
            try:
                os.write(local, e.pipe_data)
            finally:
                os.close(local)
        t.later("fcntl", fd, F_SETFL, e.flags & ~files.O_ACCMODE)
    elif e.kind == pb.SOCKET:
        fd = sockets.create(t, e, sh.socks, _local_copy)
    elif e.kind == pb.TTY:
        fd = sh.terminals.open_fd(t, e)
    elif e.kind in (pb.EVENTFD, pb.TIMERFD, pb.SIGNALFD, pb.EPOLL):
        fd = eventfds.create(t, e, _local_copy)
    elif e.kind in (pb.INOTIFY, pb.FANOTIFY):
        fd = fsnotify.create(t, e, _local_copy)
    elif e.kind == pb.DELETED_FILE:
        d = os.path.dirname(e.path.removesuffix(" (deleted)")) or "/tmp"
        fd = t.sys("openat", AT_FDCWD, t.cstr(d if os.path.isdir(d) else "/tmp"),
                   files.O_TMPFILE | os.O_RDWR, e.mode or 0o600)
        local = _local_copy(t, fd)
        try:
            with _image_file(iset, e.data_file) as src:
                while chunk := src.read(1 << 20):
                    os.write(local, chunk)
        finally:
            os.close(local)
        t.sys("lseek", fd, e.pos, 0)
    else:
        flags = e.flags & ~(files.O_CREAT | files.O_EXCL | files.O_TRUNC)
        if e.kind == pb.DIRECTORY:
            flags |= files.O_DIRECTORY
        fd = t.later("openat", AT_FDCWD, t.cstr(e.path), flags,
                     fail=f"process {t.ns_pid} fd {e.fd}: cannot open {e.path}")
        if e.kind == pb.REGULAR and e.policy == pb.ROLLBACK and e.flags & files.O_ACCMODE:
            t.later("ftruncate", fd, e.size)
        if e.kind == pb.REGULAR:
            t.later("lseek", fd, e.pos, 0)
    return fd


def _open_fifo(t: Target, e: pb.Fd, sh: Shared) -> int:
    """A FIFO's fd, opened by path by `t` (with the image owner's file credentials). The
    first opener of a FIFO keeps it open read-write until the fds are installed, so that no
    open blocks or fails for want of the other side, and its saved data stays buffered."""
    where = f"process {t.ns_pid} fd {e.fd}"
    if e.pipe_id not in sh.pipes:
        keep = t.sys("openat", AT_FDCWD, t.cstr(e.path), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC, check=False)
        if keep < 0:
            raise RestoreError(f"{where}: cannot open FIFO {e.path}: {os.strerror(-keep)}")
        if e.pipe_size:
            t.sys("fcntl", keep, F_SETPIPE_SZ, e.pipe_size, check=False)
        high = t.sys("fcntl", keep, F_DUPFD_CLOEXEC, t.fd_base)
        t.sys("close", keep)
        t.extra_fds.append(high)
        sh.pipes[e.pipe_id] = (t, high, high)
    owner, _, keeper = sh.pipes[e.pipe_id]
    flags = e.flags & ~(files.O_CREAT | files.O_EXCL | files.O_TRUNC)
    fd = t.sys("openat", AT_FDCWD, t.cstr(e.path), flags | os.O_NONBLOCK, check=False)
    if fd < 0:
        raise RestoreError(f"{where}: cannot open FIFO {e.path}: {os.strerror(-fd)}")
    if e.pipe_data:
        local = _local_copy(owner, keeper)
        try:
            os.write(local, e.pipe_data)
        finally:
            os.close(local)
    t.sys("fcntl", fd, F_SETFL, e.flags & ~files.O_ACCMODE)
    return fd


def _install_fds(t: Target, staged: list[tuple[int, pb.Fd]]) -> None:
    """Move every staged fd to its number; close what the stub had and we no longer need."""
    for fd in t.extra_fds + list(t.pidfds.values()):
        t.later("close", fd, check=None)
    for fd in t.fd_have - t.fd_keep:
        t.later("close", fd, check=None)
    for high, e in staged:
        t.later("dup3", high, e.fd, os.O_CLOEXEC if e.cloexec else 0)
        t.later("close", high)
    t.flush()


def _restore_process_state(t: Target, p: pb.Process) -> None:
    t.later("chdir", t.cstr(p.cwd))
    t.later("umask", p.umask)
    t.later("personality", p.personality)
    for a in p.sigactions:
        t.later("rt_sigaction", a.signo, t.put(struct.pack("<4Q", a.handler, a.flags, a.restorer, a.mask)), 0, 8)
    for it in p.itimers:
        value = (it.value_sec, it.value_usec)
        if value == (0, 0):    # expired, signal pending, waiting to be re-armed: a period on
            value = (it.interval_sec, it.interval_usec)
        t.later("setitimer", it.which, t.put(struct.pack("<4Q", it.interval_sec, it.interval_usec,
                                                         *value)), 0)
    have = proc.limits(t.pid)     # read from outside: an injected prlimit64 each cost 16
    for r in p.rlimits:
        # Raising a hard limit needs CAP_SYS_RESOURCE, which we may lack: then keep the
        # hard limit we have and cap the soft one by it, rather than fail the restore.
        cur, mx = have[r.resource] if r.resource < len(have) else (None, None)
        if (cur, mx) == (r.cur, r.max):
            continue
        if mx is None:
            a = t.put(bytes(16))
            t.sys("prlimit64", 0, r.resource, 0, a)
            cur, mx = struct.unpack("<2Q", t.mem.read(a, 16))
        if t.sys("prlimit64", 0, r.resource, t.put(struct.pack("<2Q", r.cur, r.max)), 0, check=False) < 0:
            t.sys("prlimit64", 0, r.resource, t.put(struct.pack("<2Q", min(r.cur, mx), mx)), 0, check=False)


def _create_threads(t: Target, p: pb.Process) -> None:
    for th in p.threads:
        if th.tid == p.pid:
            continue
        set_tid = t.put(struct.pack("<i", th.tid))
        args = t.put(struct.pack("<11Q", CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, set_tid, 1, 0))
        res = t.sys("clone3", args, 88, check=False)
        if res != th.tid:
            raise RestoreError(f"cannot recreate thread {th.tid} of process {p.pid}: "
                               + (os.strerror(-res) if res < 0 else f"got TID {res}"))
        host = (set(proc.threads(t.pid)) - set(t.host.values())).pop()
        st = ptrace.wait_trap(host)
        if st.sig != signal.SIGSTOP:
            raise RestoreError(f"new thread {th.tid} stopped unexpectedly ({st})")
        t.threads[th.tid] = Injector(host, t.main.syscall_ip)
        t.host[th.tid] = host


def _restore_thread_state(t: Target, p: pb.Process, th: pb.Thread) -> None:
    tid = th.tid
    t.later("set_tid_address", th.clear_child_tid, tid=tid)
    if th.robust_list:
        t.later("set_robust_list", th.robust_list, th.robust_list_len, tid=tid)
    if th.rseq.pointer:
        t.later("rseq", th.rseq.pointer, th.rseq.size, 0, th.rseq.signature, tid=tid)
    if th.altstack.sp or th.altstack.size:
        ss = struct.pack("<Qi4xQ", th.altstack.sp, th.altstack.flags & ~1, th.altstack.size)
        t.later("sigaltstack", t.put(ss), 0, tid=tid)
    for si in th.pending:
        t.later("rt_tgsigqueueinfo", p.pid, tid, struct.unpack_from("<i", si)[0], t.put(si), tid=tid)
    t.later("prctl", PR_SET_NAME, t.put(th.comm.encode()[:15] + b"\0"), tid=tid)


def _drop_creds(t: Target, p: pb.Process) -> None:
    """The image's ids, then its capabilities: a stub may hold more than the process had
    (root's full set, or the ambient ones of a rootless run), never the other way round."""
    c = p.creds
    want = (c.cap_eff, c.cap_prm, c.cap_inh)
    for tid in t.threads:
        t.later("setresgid", c.gid, c.egid, c.sgid, tid=tid)
        t.later("setresuid", c.uid, c.euid, c.suid, tid=tid)
        t.flush()           # the capabilities they leave are read from outside
        st = proc.status(t.host[tid])
        if int(st.get("CapAmb", "0"), 16):
            t.later("prctl", userns.PR_CAP_AMBIENT, userns.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, tid=tid)
        have = tuple(int(st[k], 16) for k in ("CapEff", "CapPrm", "CapInh"))
        if have != want:
            t.later("capset", t.put(userns.cap_header()), t.put(userns.cap_sets(*want)), tid=tid)


def _fill_memory(t: Target, p: pb.Process, srcs: list[Source], iset: ImageSet, sh: Shared, prog,
                 arriving=None) -> None:
    """The stub's own mappings go, the image's come back with their content: the process
    reads its pages itself (injected preadv) from each image of the chain in turn."""
    vmas = list(p.mm.vmas)
    written = {v.start for v in vmas for s in srcs for r in s.runs if v.start <= r.vaddr < v.end}
    _clear_stub(t, vmas)
    fds = [_open_pages(t, s.pages_file, iset, arriving) for s in srcs]
    _open_shmem(t, vmas, sh, iset)
    _set_fs_creds(t, p.creds)
    _set_mm(t, p.mm)
    sysvipc.attach(t, vmas)
    _map_vmas(t, vmas, written)
    for fd, s in zip(fds, srcs):
        try:
            late = arriving and s.pages_file.name in arriving.names and s.pages_file.parent == iset.path
            memory.fill_pages(t, fd, s.runs, prog, partial(arriving.wait, s.pages_file) if late else None)
        except OSError as e:
            raise RestoreError(f"reading memory of process {p.pid} from {s.pages_file}: "
                               f"{e.strerror}") from None
        t.later("close", fd)
    _finish_vmas(t, vmas, written)


def _image_owner(iset: ImageSet) -> int:
    return os.stat(iset.path / "inventory.img").st_uid


def _open_pages(t: Target, path, iset: ImageSet, arriving=None) -> int:
    """The stub's fd of a page file. The stub opens it before the image owner's file
    credentials apply (the page files belong to whoever made the images, root too), so a
    name swapped by the user after the digest check must not lead it anywhere else: we
    open the file safely ourselves (open_image_file: no symlink, no FIFO, the owner's own
    regular file), the stub opens the name without following a symlink or blocking, and
    the two must be the very same file (device and inode), else the restore stops.
    (Opening our fd through /proc/PID/fd/N instead fails in a rootless run: a process
    that entered a user namespace is not dumpable for its own stub.)"""
    if arriving and path.name in arriving.names and path.parent == iset.path:
        arriving.wait_exists(path)
    mine = open_image_file(path, _image_owner(iset))
    try:
        want = os.fstat(mine)
        fd = t.sys("openat", AT_FDCWD, t.cstr(os.path.abspath(path)),
                   os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, check=False)
        if fd < 0:
            raise ImageError(f"image file {path} could not be opened again after it was checked "
                             f"({os.strerror(-fd)}): it was replaced; refused")
        theirs = _local_copy(t, fd)
        try:
            got = os.fstat(theirs)
        finally:
            os.close(theirs)
        if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
            t.sys("close", fd)
            raise ImageError(f"image file {path} was replaced after it was checked: refused")
        return fd
    finally:
        os.close(mine)


def _image_file(iset: ImageSet, name: str):
    """A file of the image (shared memory content, a deleted file's data) to read as root:
    safely opened, as the page files are."""
    return os.fdopen(open_image_file(iset.path / name, _image_owner(iset)), "rb")


def _finish_process(t: Target, p: pb.Process) -> None:
    """Everything after the fds: process and thread state, credentials, registers."""
    _restore_process_state(t, p)
    if p.subreaper:
        t.later("prctl", PR_SET_CHILD_SUBREAPER, 1)
    _create_threads(t, p)
    for th in p.threads:
        _restore_thread_state(t, p, th)
    timers.restore(t, p)
    locks.restore(t, p)
    for si in p.shared_pending:
        t.later("rt_sigqueueinfo", p.pid, struct.unpack_from("<i", si)[0], t.put(si))
    _drop_creds(t, p)
    t.sys("munmap", t.scratch, SCRATCH)
    for th in p.threads:
        tid = t.host[th.tid]
        ptrace.set_regs(tid, arch.Regs.from_list(list(th.regs)))
        try:
            ptrace.set_regset(tid, arch.XSTATE_NOTE, th.xstate)
        except HpcckptError:
            raise RestoreError(
                f"this CPU cannot take thread {th.tid}'s vector state ({len(th.xstate)}-byte "
                "xsave area): restore on a node with the same CPU features") from None
        ptrace.set_sigmask(tid, th.sigmask)


def _load_tree(iset: ImageSet, inv: pb.Inventory, root: pb.Process) -> list[pb.Process]:
    """Every process of the image, parents before children, root first."""
    procs = [root] + [iset.process(pid) for pid in inv.pids if pid != root.pid]
    for p in procs:
        if p.zombie:
            continue
        check_owner(iset, inv, p)
        if p.root != "/":
            raise RestoreError(f"process {p.pid} ran chrooted in {p.root}; not supported yet")
        files.check_files(list(p.fds))
        # a user's image (not root's) gets no port its process could not have bound itself
        sockets.check(p.pid, list(p.fds), p.creds if os.stat(iset.path / "inventory.img").st_uid else None,
                      fresh_netns=inv.HasField("netns"))
    return procs


def check_chain(iset: ImageSet, inv: pb.Inventory) -> list[Link]:
    """The image and its parents, every file of each verified, the parents' ids matching."""
    if inv.pre_dump:
        raise RestoreError(f"{iset.path} is a pre-dump (pages copied while the process ran): it is "
                           "only the parent of a final dump; restore that one")
    return load_chain(iset.path, verify=True, first=inv)


def check_pages(chain: list[Link], procs: list[pb.Process], pms: dict[int, pb.Pagemap]) -> dict[int, list[Source]]:
    """Bound every field of every process (images are untrusted), in the image and in each
    parent that holds the process; then where each page comes from."""
    out = {}
    for p in procs:
        if p.zombie:
            continue
        pm = pms[p.pid]
        if pm.pages_file != f"pages-{p.pid}.img":
            raise ImageError(f"{chain[0].path}: pagemap of process {p.pid} names {pm.pages_file!r}")
        validate(str(chain[0].path), p, pm, pages_file_size(chain[0], pm))
        for link in chain[1:]:
            if p.pid not in link.inv.pids:
                break
            pp, ppm = link.iset.process(p.pid), link.iset.pagemap(p.pid)
            if ppm.pages_file != f"pages-{p.pid}.img":
                raise ImageError(f"{link.path}: pagemap of process {p.pid} names {ppm.pages_file!r}")
            if not pp.zombie:
                validate(str(link.path), pp, ppm, pages_file_size(link, ppm))
        out[p.pid] = sources(chain, p.pid, pm)
    return out


def restore(images: str | os.PathLike, show_progress: bool = True, on_ready=None,
            tracker: "TreeTracker | None" = None, shell_job: bool = False, arriving=None,
            veth: dict[str, tuple[str, str]] | None = None, join_netns: str | None = None) -> Restored:
    """Recreate the process tree of an image set (or of the newest image of a chain),
    running, its root our child; returns the root's PID. Nothing runs before every process
    is fully restored; any failure kills every process the restore made. With `tracker`,
    every process is armed for dirty-page tracking before it runs, so the caller's next
    dump can be incremental against this image. `shell_job`: the tree ran in a terminal
    held outside it; it gets this command's terminal instead (ttys.py). `arriving`: page
    files of the image still arriving (hpcckptd's migration): `.names` are not checked up
    front, `.wait(path, end)` returns once a file holds `end` bytes; the caller checks
    their digests itself in `on_ready`, before anything runs. An image holding the job's
    network namespace is restored into a new one (engine/netns.py); `veth` overrides the
    node side of its veths ({inside name: (node-side name, bridge)}); `join_netns` (a
    namespace file such as /run/netns/NAME, which the site made again for a rerun) is
    joined instead, as it is (CRIU's --join-ns)."""
    t0 = time.monotonic()
    iset = ImageSet(images)
    inv, root, _ = check_image(iset, arriving)
    chain = check_chain(iset, inv)
    procs = _load_tree(iset, inv, root)
    check_kernel(inv)
    timers.check_kernel(procs)
    check_mapped_files(inv)
    owner = os.stat(iset.path / "inventory.img").st_uid
    validate_ipc(str(iset.path), inv, owner, procs)
    for p in procs:
        validate_fsnotify(str(iset.path), p, owner)
    validate_in_flight(str(iset.path), [p for p in procs if not p.zombie])
    validate_netns(str(iset.path), inv, owner)
    net = None
    if inv.HasField("netns"):
        net = NewNetns(inv.netns, str(iset.path), veth or {}, join=join_netns)
        net.check()
    elif veth:
        raise RestoreError(f"--veth: {iset.path} holds no network namespace (dumped without --netns)")
    if inv.own_pid_namespace:
        pidns.ensure()
    else:
        for p in procs:
            check_ids_free(p) if not p.zombie else None
    pms = {p.pid: iset.pagemap(p.pid) for p in procs if not p.zombie}
    srcs = check_pages(chain, procs, pms)
    live = [p for p in procs if not p.zombie]
    ipc_removed = []
    if inv.own_ipc_namespace:   # the job's SysV objects, same IDs, before anyone attaches
        sysvipc.enter_fresh_namespace()
        ipc_removed = sysvipc.create(inv.ipc, iset.path, live)
    terms = ttys.Terminals.prepare(str(iset.path), inv, procs, shell_job)
    try:
        if net is not None:     # this thread, and so every stub it clones, in the job's namespace
            net.enter()
        ctree = create_tree(procs, terms)
    except BaseException:
        terms.close()
        if net is not None:
            net.abort()
        raise
    targets: dict[int, Target] = {}
    try:
        sh = Shared({}, {}, {}, {o.id: o for o in inv.shmem}, terminals=terms)
        pages_bytes = sum(s.nbytes for ss in srcs.values() for s in ss)
        prog = Progress(f"restore {root.pid}", pages_bytes, enabled=show_progress)
        for p in live:
            targets[p.pid] = Target(ctree.host(p.pid), p.pid, list(p.mm.vmas),
                                    ctree.stubs[p.pid].inj.syscall_ip)
            _fill_memory(targets[p.pid], p, srcs[p.pid], iset, sh, prog, arriving)
        prog.finish()
        for t in targets.values():
            for fd in t.shm_fds.values():
                t.sys("close", fd)
        for p in live:
            _prepare_fds(targets[p.pid], list(p.fds))
        sh.socks.setup(live, targets, sh.desc, partial(_open_one, iset=iset, sh=sh), _local_copy)
        staged = {p.pid: _stage_fds(targets[p.pid], list(p.fds), iset, sh) for p in live}
        sockets.pass_in_flight(sh.socks)
        for p in live:
            _install_fds(targets[p.pid], staged[p.pid])
        sysvipc.restore_undo(targets, live)
        sysvipc.remove(ipc_removed)
        for p in live:
            eventfds.add_watches(targets[p.pid], p)
            sockets.finish(targets[p.pid], p, _local_copy)
        terms.finish(ctree.host)
        if tracker is not None:
            _arm(tracker, targets, live, inv)
        for p in live:
            _finish_process(targets[p.pid], p)
        sockets.resume(sh.socks)
        if on_ready:
            on_ready(ctree.root_host)
        if net is not None:     # its connections are out of repair mode: packets may come
            net.connect()
        for p in reversed(live):      # children first: no parent runs to find a stopped child
            t = targets[p.pid]
            for tid in t.host.values():
                ptrace.detach(tid, 0)
            t.mem.close()
        for note in sockets.cleanup(sh.socks):
            print(f"hpcckpt: {note}", file=sys.stderr)
    except BaseException:
        terms.close()
        ttys.take_back_foreground()
        ctree.kill_all()
        _kill_stub(ctree.root_host)
        if net is not None:
            net.abort()
        raise
    if net is not None:
        net.leave()
    return Restored(pid=ctree.root_host, threads=sum(len(p.threads) for p in live),
                    pages_bytes=pages_bytes,
                    total_s=time.monotonic() - t0, processes=len(procs), notes=terms.notes)


def _arm(tracker: "TreeTracker", targets: dict[int, Target], live: list[pb.Process], inv: pb.Inventory) -> None:
    """Track every restored process from before its first instruction: its memory is the
    image's now, so the trackers' state is relative to this image."""
    tracker.close()
    for p in live:
        t = targets[p.pid]
        try:
            tracker.new(t.pid).arm(t.pid, t.main, proc.maps(t.pid))
        except HpcckptError as e:
            tracker.forget(t.pid)
            tracker.notes.append(f"process {p.pid}: cannot track its memory after the restore ({e})")
    tracker.base_id = inv.image_id or None


def _kill_stub(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
