"""SysV IPC: shared memory segments, semaphore sets and message queues.

A job's IPC objects live in an IPC namespace, and their IDs are numbers the processes
keep in memory. `hpcckpt run` gives each job an IPC namespace of its own (pidns.py), so
the whole namespace belongs to the job: a dump saves every object in it (as CRIU's
criu/ipc_ns.c does) and a restore recreates them in a fresh namespace with the same IDs
(through kernel.{shm,sem,msg}_next_id, which the kernel takes for the next object made in
that namespace), keys, owners, modes and content, before any process attaches.

A process in the host's IPC namespace shares it with everyone else: what it uses there is
not the job's to save or recreate. Such a dump is refused when the tree uses a SysV object
(an attached segment, one it created or last used, a queue or semaphore set it last
used), naming process, kind and ID, and telling to run the job under `hpcckpt run`; one
that uses none dumps as before. A namespace is the job's own when no process outside the
tree but the tree's parent and that parent's other children (the monitor and init of
`hpcckpt run`, or whoever ran `unshare --ipc`) is in it.

SEM_UNDO adjustments, which the kernel shows nowhere, are measured: a single-threaded
process with an undo list (kcmp KCMP_SYSVSEM) is made to apply its own (injected
unshare(CLONE_SYSVSEM), what exit does), the change of the values is its adjustments, and
it takes them back (semop with SEM_UNDO of the opposite amounts). A restored process gets
them the same way. Threads share one list, allocated by pthread_create: every thread of a
multi-threaded process has to drop it for it to apply, and they cannot share one again, so
theirs are read (`threaded_undo`) only by a dump after which the tree dies, last; a dump
that lets the tree run on says it did not keep them.

Not kept: creator uid/gid (the restorer's), the PIDs and times of the last operations
(the kernel's). Messages and segments are read without disturbing them (msgrcv MSG_COPY,
an attach of our own).
"""
import ctypes
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, KernelError, RestoreError, UnsupportedError
from ..images import pb
from ..kernel.arch import current as arch
from ..kernel.inject import Injector, Mem, find_syscall_insn
from ..kernel.libc import libc, raw_syscall

CLONE_NEWIPC = 0x08000000
IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SHM_RDONLY, SHM_REMAP, SHM_EXEC = 0o10000, 0o40000, 0o100000
SHM_LOCK = 11
SHM_DEST, SHM_LOCKED = 0o1000, 0o2000
GETPID, GETNCNT, GETALL, GETZCNT, SETALL = 11, 14, 13, 15, 17
SEM_UNDO, CLONE_SYSVSEM, SEMVMX = 0x1000, 0x40000, 32767
MSG_NOERROR, MSG_COPY = 0o10000, 0o40000
KCMP_SYSVSEM = 6
PERM = 0o777
DS_SIZE = {"shm": 112, "sem": 88, "msg": 120}
MSG_QBYTES_OFF = 88                   # struct msqid64_ds
KIND_NAMES = {"shm": "shared memory segment", "sem": "semaphore set", "msg": "message queue"}

libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.msgrcv.restype = ctypes.c_ssize_t
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]


def _check(res: int, what: str) -> int:
    if res == -1 or res is None:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return res


# -- namespaces ------------------------------------------------------------------------

def ns_id(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/ipc").st_ino


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def shared_with(root: int, tree: set[int]) -> int | None:
    """A process outside the tree in the tree's IPC namespace, or None: the namespace is
    the job's own. Not counted: us, the tree's parent and its other children (the monitor
    and the PID namespace's init of `hpcckpt run`, which made the namespace)."""
    ns = ns_id(root)
    parent = _ppid(root)
    skip = tree | {os.getpid(), parent}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        try:
            if ns_id(pid) != ns or _ppid(pid) == parent:
                continue
        except OSError:          # gone, or not ours to look at (then not the job's either)
            continue
        return pid
    return None


@contextmanager
def entered(pid: int):
    """This thread inside `pid`'s IPC namespace for the block (setns is per thread)."""
    if ns_id(pid) == ns_id("thread-self"):
        yield
        return
    back = os.open("/proc/thread-self/ns/ipc", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/ipc", os.O_RDONLY)
    try:
        _check(libc.setns(target, CLONE_NEWIPC), f"entering the IPC namespace of process {pid}")
        try:
            yield
        finally:
            _check(libc.setns(back, CLONE_NEWIPC), "returning to our IPC namespace")
    finally:
        os.close(back)
        os.close(target)


LIMITS = ("msgmax", "msgmnb", "msgmni", "sem", "shmall", "shmmax", "shmmni", "shm_rmid_forced")


def read_limits() -> dict[str, str]:
    """This thread's IPC namespace's limits (kernel.msgmnb ...)."""
    out = {}
    for name in LIMITS:
        try:
            with open(f"/proc/sys/kernel/{name}") as f:
                out[name] = f.read().strip()
        except OSError:
            pass
    return out


def write_limits(limits: dict[str, str]) -> None:
    """Give a new IPC namespace the limits of the one it came from: a new namespace starts
    with the kernel's defaults, and a job must not lose what the node's admin raised."""
    now = read_limits()
    for name, value in limits.items():
        if now.get(name) != value:
            try:
                with open(f"/proc/sys/kernel/{name}", "w") as f:
                    f.write(value)
            except OSError:
                pass


def unshare() -> None:
    """A new IPC namespace for this thread, with the limits of the current one."""
    limits = read_limits()
    _check(libc.unshare(CLONE_NEWIPC), "creating an IPC namespace for the job (needs root)")
    write_limits(limits)


def enter_fresh_namespace() -> None:
    """Make sure the objects a restore creates land in an empty IPC namespace of the job's:
    the one `hpcckpt run` (pidns.ensure) made, while still empty, else a new one."""
    from . import pidns
    if ns_id("thread-self") == pidns.ipc_namespace() and not any(_listing(k) for k in ("shm", "sem", "msg")):
        return
    unshare()


# -- reading ---------------------------------------------------------------------------

@dataclass
class Obj:
    kind: str                 # shm, sem, msg
    key: int
    id: int
    mode: int                 # with SHM_DEST / SHM_LOCKED bits for shm
    uid: int
    gid: int
    size: int = 0             # shm: bytes; sem: nsems; msg: qnum
    pids: tuple[int, ...] = ()  # shm: cpid, lpid; msg: lspid, lrpid (as we number them)

    def perm(self) -> pb.IpcPerm:
        return pb.IpcPerm(id=self.id, key=self.key, uid=self.uid, gid=self.gid, mode=self.mode & PERM)

    def name(self) -> str:
        return f"SysV {KIND_NAMES[self.kind]} {self.id} (key {self.key:#x})"


def _listing(kind: str) -> list[Obj]:
    """The objects of this thread's IPC namespace, from /proc/sysvipc (opened here)."""
    with open(f"/proc/sysvipc/{kind}") as f:
        lines = f.read().splitlines()[1:]
    out = []
    for line in lines:
        c = line.split()
        if not c:
            continue
        if kind == "shm":   # key shmid perms size cpid lpid nattch uid gid cuid cgid ...
            out.append(Obj(kind, int(c[0]), int(c[1]), int(c[2], 8), int(c[7]), int(c[8]),
                           int(c[3]), (int(c[4]), int(c[5]))))
        elif kind == "sem":  # key semid perms nsems uid gid cuid cgid otime ctime
            out.append(Obj(kind, int(c[0]), int(c[1]), int(c[2], 8), int(c[4]), int(c[5]), int(c[3])))
        else:               # key msqid perms cbytes qnum lspid lrpid uid gid cuid cgid ...
            out.append(Obj(kind, int(c[0]), int(c[1]), int(c[2], 8), int(c[7]), int(c[8]),
                           int(c[4]), (int(c[5]), int(c[6]))))
    return sorted(out, key=lambda o: o.id)


def _sem_values(o: Obj) -> list[int]:
    arr = (ctypes.c_ushort * max(o.size, 1))()
    _check(libc.semctl(o.id, 0, GETALL, ctypes.cast(arr, ctypes.c_void_p)), f"reading {o.name()}")
    return list(arr[:o.size])


def _sem_pids(o: Obj) -> list[int]:
    return [libc.semctl(o.id, i, GETPID) for i in range(o.size)]


def _messages(o: Obj) -> list[pb.SysvMsg]:
    """Every message of a queue, in order, left in the queue (MSG_COPY)."""
    ds = _stat(o)
    cbytes = struct.unpack_from("<Q", ds, 72)[0]
    buf = ctypes.create_string_buffer(8 + cbytes + 1)
    out = []
    for i in range(o.size):
        n = libc.msgrcv(o.id, buf, cbytes + 1, i, MSG_COPY | IPC_NOWAIT | MSG_NOERROR)
        _check(n, f"reading message {i} of {o.name()}")
        mtype = struct.unpack_from("<q", buf.raw, 0)[0]
        out.append(pb.SysvMsg(type=mtype, data=buf.raw[8:8 + n]))
    return out


def _stat(o: Obj) -> bytes:
    buf = ctypes.create_string_buffer(DS_SIZE[o.kind])
    fn = {"shm": libc.shmctl, "sem": libc.semctl, "msg": libc.msgctl}[o.kind]
    args = (o.id, IPC_STAT, buf) if o.kind != "sem" else (o.id, 0, IPC_STAT, buf)
    _check(fn(*args), f"reading {o.name()}")
    return buf.raw


def _save_segment(o: Obj, dest: Path) -> int:
    """Copy a segment's content (attached read-only here) into `dest`; returns its huge page
    size in bytes, 0 for a segment of ordinary pages."""
    addr = libc.shmat(o.id, None, SHM_RDONLY)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, f"attaching {o.name()} to save it: {os.strerror(e)}")
    try:
        with open(dest, "wb") as f:
            f.write(ctypes.string_at(addr, o.size))
        page = _page_size_at(addr)
        return page if page > os.sysconf("SC_PAGESIZE") else 0
    finally:
        libc.shmdt(ctypes.c_void_p(addr))


def _page_size_at(addr: int) -> int:
    """KernelPageSize (bytes) of our mapping starting at `addr` (hugetlb: the huge page's)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                inside = int(head.split("-")[0], 16) == addr
            elif inside and head == "KernelPageSize:":
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def _undo_probe():
    """has_undo(pid): does `pid` have a SEM_UNDO list? Its pointer (kcmp KCMP_SYSVSEM) then
    differs from that of a fresh child of ours, which has none (fork never copies one).
    A single-threaded process gets one only by a semop with SEM_UNDO; threads share one
    (CLONE_SYSVSEM), allocated empty by pthread_create, so for them it tells nothing."""
    child = os.fork()
    if child == 0:
        try:
            while True:
                os.pause()
        finally:
            os._exit(0)
    try:
        yield lambda pid: raw_syscall(arch.SYSCALLS["kcmp"], pid, child, KCMP_SYSVSEM, 0, 0) != 0
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@contextmanager
def _injected(pid: int, vmas: list):
    """Syscalls run by the frozen process `pid` (its main thread), with a scratch page."""
    inj = Injector(pid, find_syscall_insn(pid, vmas))
    mem = Mem(pid)
    addr = None
    try:
        addr = inj.syscall("mmap", 0, 4096, 3, 0x22, -1, 0)
        yield inj, mem, addr
    finally:
        try:
            if addr is not None:
                inj.syscall("munmap", addr, 4096)
        finally:
            inj.restore()
            mem.close()


def _semops(inj, mem, addr: int, semid: int, ops: list[tuple[int, int]], who: str) -> None:
    """semop(semid, ops, SEM_UNDO | IPC_NOWAIT) run by the process itself."""
    buf = b"".join(struct.pack("<Hhh", num, op, SEM_UNDO | IPC_NOWAIT) for num, op in ops)
    mem.write(addr, buf)
    res = inj.syscall("semop", semid, addr, len(ops), check=False)
    if res < 0:
        raise RestoreError(f"{who}: cannot take SEM_UNDO adjustments of semaphore set {semid} "
                           f"again: {os.strerror(-res)}")


def _phases(undo: dict[int, list[pb.SemUndo]]):
    """Operations that give each process its adjustments: semop(-adj) with SEM_UNDO records
    adj. Increments of every process first, then decrements: a value then never goes below
    the one it ends at, so IPC_NOWAIT never refuses."""
    for positive in (True, False):
        for key, lists in undo.items():
            for u in lists:
                ops = [(i, -a) for i, a in enumerate(u.adj) if a and (-a > 0) == positive]
                if ops:
                    yield key, u.semid, ops


def _take_undo(pids: dict[int, int], vmas: dict[int, list], notes: list[str]) -> dict[int, list[pb.SemUndo]]:
    """Every process's SEM_UNDO adjustments, which the kernel shows nowhere: the frozen
    process applies its own (injected unshare(CLONE_SYSVSEM), as at exit), the values'
    change is its adjustments, and it takes them back (semop with SEM_UNDO). Only for
    single-threaded processes: threads share one list, and for them this is not possible."""
    sets = _listing("sem")
    single = [h for h in pids if _threads(h) == 1]
    with _undo_probe() as has_undo:
        undo = [h for h in single if has_undo(h)]
    if not undo:
        return {}
    for a in undo:
        for b in undo:
            if a < b and raw_syscall(arch.SYSCALLS["kcmp"], a, b, KCMP_SYSVSEM, 0, 0) == 0:
                raise UnsupportedError(f"processes {pids[a]} and {pids[b]} share one SEM_UNDO list "
                                       "(clone CLONE_SYSVSEM); not supported")
    for o in sets:
        for i in range(o.size):
            if libc.semctl(o.id, i, GETNCNT) > 0 or libc.semctl(o.id, i, GETZCNT) > 0:
                raise UnsupportedError(f"{o.name()} has a waiter outside the frozen tree; its "
                                       "SEM_UNDO adjustments cannot be read now")
    values = {o.id: _sem_values(o) for o in sets}
    out: dict[int, list[pb.SemUndo]] = {}
    try:
        for h in undo:
            with _injected(h, vmas[h]) as (inj, _mem, _addr):
                res = inj.syscall("unshare", CLONE_SYSVSEM, check=False)
            if res < 0:
                raise UnsupportedError(f"process {pids[h]}: cannot read its SEM_UNDO adjustments: "
                                       f"{os.strerror(-res)}")
            now = {o.id: _sem_values(o) for o in sets}
            out[h] = [pb.SemUndo(semid=i, adj=[b - a for a, b in zip(values[i], now[i])])
                      for i in values if now[i] != values[i]]
            for u in out[h]:
                if any(v in (0, SEMVMX) for v, a in zip(now[u.semid], u.adj) if a):
                    notes.append(f"process {pids[h]}: a SEM_UNDO adjustment of semaphore set {u.semid} "
                                 "may have been cut at the semaphore's bounds")
            values = now
    finally:
        _give_back(out, pids, vmas)
    return out


def threaded_undo(root: int, pids: dict[int, int], vmas: dict[int, list], notes: list[str],
                  final: bool) -> dict[int, list[pb.SemUndo]]:
    """SEM_UNDO adjustments of the multi-threaded processes (host PID -> per set), for a dump
    that kills the tree next (`final`); call it last, with the image otherwise complete.

    Threads share one list (pthread_create clones with CLONE_SYSVSEM); unshare(CLONE_SYSVSEM)
    in a thread only drops that thread's reference, and the last one dropped applies the
    list, as the last thread's exit would. So every thread of the frozen process is made to
    unshare, the values' change is the adjustments, and the main thread takes them back
    (semop with SEM_UNDO): its threads no longer share that list, which no syscall can
    give back; so only a dump after which the tree dies does this (or one failing after
    it: the process then runs on with its adjustments in its main thread's list). A dump
    that lets the tree run on notes that they are not kept. The restore gives them to the
    main thread before it makes its threads, so they share them again."""
    multi = [h for h in pids if _threads(h) > 1]
    if not multi:
        return {}
    if not final:
        for h in multi:
            notes.append(f"process {pids[h]} has threads: SEM_UNDO adjustments it may hold are not "
                         "kept (read only by a dump after which the tree stops)")
        return {}
    out: dict[int, list[pb.SemUndo]] = {}
    with entered(root):
        sets = _listing("sem")
        for h in multi:
            for other in pids:
                if other != h and raw_syscall(arch.SYSCALLS["kcmp"], h, other, KCMP_SYSVSEM, 0, 0) == 0:
                    raise UnsupportedError(f"processes {pids[h]} and {pids[other]} share one SEM_UNDO "
                                           "list (clone CLONE_SYSVSEM without CLONE_THREAD); not supported")
        for o in sets:
            for i in range(o.size):
                if libc.semctl(o.id, i, GETNCNT) > 0 or libc.semctl(o.id, i, GETZCNT) > 0:
                    raise UnsupportedError(f"{o.name()} has a waiter outside the frozen tree; its "
                                           "SEM_UNDO adjustments cannot be read now")
        values = {o.id: _sem_values(o) for o in sets}
        try:
            for h in multi:
                ip = find_syscall_insn(h, vmas[h])
                for tid in sorted(int(x) for x in os.listdir(f"/proc/{h}/task")):
                    inj = Injector(tid, ip)
                    try:
                        res = inj.syscall("unshare", CLONE_SYSVSEM, check=False)
                    finally:
                        inj.restore()
                    if res < 0:
                        raise UnsupportedError(f"process {pids[h]} thread {tid}: cannot read its SEM_UNDO "
                                               f"adjustments: {os.strerror(-res)}")
                now = {o.id: _sem_values(o) for o in sets}
                out[h] = [pb.SemUndo(semid=i, adj=[b - a for a, b in zip(values[i], now[i])])
                          for i in values if now[i] != values[i]]
                values = now
        finally:
            _give_back(out, pids, vmas)
    return {h: u for h, u in out.items() if u}


def _give_back(out: dict[int, list[pb.SemUndo]], pids: dict[int, int], vmas: dict[int, list]) -> None:
    try:
        for h, semid, ops in _phases(out):
            with _injected(h, vmas[h]) as (inj, mem, addr):
                _semops(inj, mem, addr, semid, ops, f"process {pids[h]}")
    except (RestoreError, KernelError) as e:
        raise KernelError(f"{e}; the SEM_UNDO adjustments of the tree's processes may be lost") from None


def restore_undo(targets: dict, procs: list[pb.Process]) -> None:
    """Give each restored process its SEM_UNDO adjustments (create() set the values so
    that they end as they were), by semop with SEM_UNDO run by the process itself."""
    undo = {p.pid: list(p.sem_undo) for p in procs if p.sem_undo}
    for pid, semid, ops in _phases(undo):
        t = targets[pid]
        addr = t.put(bytes(6 * len(ops)))
        _semops(t.main, t.mem, addr, semid, ops, f"process {pid}")


def dump(root: int, pids: dict[int, int], vmas: dict[int, list], images: Path,
         notes: list[str]) -> tuple[pb.IpcNamespace | None, dict[int, list[pb.SemUndo]]]:
    """The tree's IPC namespace content while the tree is frozen, or None when the tree is
    in the host's namespace and uses nothing there (a use is refused, naming it); and the
    SEM_UNDO adjustments of each process that has some (host PID -> per set).

    `pids`: host PID -> PID as the tree numbers it, for every live member; `vmas`: their
    proc.Vma lists (SysV attachments show as /SYSV<key> mappings whose inode is the ID).
    """
    ns = ns_id(root)
    for host in pids:
        if ns_id(host) != ns:
            raise UnsupportedError(f"process {pids[host]} (PID {host}) runs in an IPC namespace of its "
                                   "own inside the tree; not supported")
    from . import pidns
    # the namespace this process made for the job (hpcckpt run) holds only the job's tree
    other = None if ns == pidns.ipc_namespace() else shared_with(root, set(pids))
    if other is not None:
        _refuse_host_use(pids, vmas, other)
        return None, {}
    out = pb.IpcNamespace()
    undo: dict[int, list[pb.SemUndo]] = {}
    with entered(root):
        if _listing("sem"):      # adjustments exist only for the namespace's sets
            undo = _take_undo(pids, vmas, notes)
        for o in _listing("shm"):
            name = f"sysvshm-{o.id}.img"
            try:
                huge = _save_segment(o, images / name)
            except OSError as e:
                raise UnsupportedError(f"cannot save {o.name()}: {e.strerror}") from None
            out.shm.append(pb.SysvShm(perm=o.perm(), size=o.size, data_file=name, huge_page_size=huge,
                                      removed=bool(o.mode & SHM_DEST), locked=bool(o.mode & SHM_LOCKED)))
        for o in _listing("sem"):
            out.sem.append(pb.SysvSem(perm=o.perm(), values=_sem_values(o)))
        for o in _listing("msg"):
            qbytes = struct.unpack_from("<Q", _stat(o), MSG_QBYTES_OFF)[0]
            out.msg.append(pb.SysvMsgQueue(perm=o.perm(), qbytes=qbytes, messages=_messages(o)))
    return out, undo


def _refuse_host_use(pids: dict[int, int], vmas: dict[int, list], other: int) -> None:
    """In a namespace shared with others (the host's): refuse when the tree uses a SysV
    object, naming it."""
    def refuse(host: int, o: Obj, how: str) -> None:
        raise UnsupportedError(
            f"process {pids[host]} (PID {host}) {how} {o.name()} in an IPC namespace it shares with "
            f"processes outside the tree (PID {other}), which cannot be checkpointed with it; run "
            "the job under `hpcckpt run`, which gives it an IPC namespace of its own")
    shm = {o.id: o for o in _listing("shm")}
    for host, vs in vmas.items():
        for v in vs:
            if v.path.startswith("/SYSV"):
                refuse(host, shm.get(v.inode) or Obj("shm", int(v.path[5:13], 16), v.inode, 0, 0, 0),
                       f"has attached (at {v.start:#x})")
    for o in shm.values():
        for h in o.pids:
            if h in pids:
                refuse(h, o, "created or last used")
    for o in _listing("msg"):
        for h in o.pids:
            if h in pids:
                refuse(h, o, "last sent to or received from")
    for o in _listing("sem"):
        for h in _sem_pids(o):
            if h in pids:
                refuse(h, o, "last operated on")


# -- restoring -------------------------------------------------------------------------

def _next_id(kind: str, value: int) -> None:
    with open(f"/proc/sys/kernel/{kind}_next_id", "w") as f:
        f.write(str(value))


def _set_owner(kind: str, p: pb.IpcPerm, qbytes: int = 0) -> None:
    o = Obj(kind, p.key, p.id, p.mode, p.uid, p.gid)
    ds = bytearray(_stat(o))
    struct.pack_into("<II", ds, 4, p.uid, p.gid)
    struct.pack_into("<H", ds, 20, p.mode & PERM)
    if kind == "msg" and qbytes:
        struct.pack_into("<Q", ds, MSG_QBYTES_OFF, qbytes)
    buf = ctypes.create_string_buffer(bytes(ds), len(ds))
    fn = {"shm": libc.shmctl, "sem": libc.semctl, "msg": libc.msgctl}[kind]
    args = (p.id, IPC_SET, buf) if kind != "sem" else (p.id, 0, IPC_SET, buf)
    _check(fn(*args), f"setting owner and mode of {o.name()}")


def _created(kind: str, p: pb.IpcPerm, res: int) -> None:
    if res < 0:
        e = ctypes.get_errno()
        raise RestoreError(f"cannot recreate SysV {KIND_NAMES[kind]} {p.id}: {os.strerror(e)}")
    if res != p.id:
        raise RestoreError(f"SysV {KIND_NAMES[kind]} {p.id} came back as {res}: the kernel ignored "
                           f"kernel.{kind}_next_id")


def create(ipc: pb.IpcNamespace, images: Path, procs: list[pb.Process] = ()) -> list[int]:
    """Recreate every object in this thread's (fresh) IPC namespace, same IDs; returns the
    segments to remove once the processes have attached them again (they had been removed).
    Semaphores start at their value plus the SEM_UNDO adjustments of `procs`, which
    restore_undo then takes back into each process."""
    totals = undo_totals(ipc, procs)
    remove_later = []
    try:
        for s in ipc.shm:
            _next_id("shm", s.perm.id)
            res = libc.shmget(s.perm.key, s.size, IPC_CREAT | IPC_EXCL | (s.perm.mode & PERM) | _huge_flags(s))
            if res < 0 and s.huge_page_size:
                e = ctypes.get_errno()
                pages = -(-s.size // s.huge_page_size)
                raise RestoreError(f"cannot recreate SysV shared memory {s.perm.id}, a SHM_HUGETLB segment "
                                   f"of {pages} huge page(s) of {s.huge_page_size >> 10} kB: {os.strerror(e)}; "
                                   "this node needs that many free (vm.nr_hugepages, or nr_hugepages under "
                                   f"/sys/kernel/mm/hugepages/hugepages-{s.huge_page_size >> 10}kB)")
            _created("shm", s.perm, res)
            _fill_segment(s, images)
            _set_owner("shm", s.perm)
            if s.locked:
                libc.shmctl(s.perm.id, SHM_LOCK, None)
            if s.removed:
                remove_later.append(s.perm.id)
        for m in ipc.sem:
            _next_id("sem", m.perm.id)
            _created("sem", m.perm, libc.semget(m.perm.key, len(m.values), IPC_CREAT | IPC_EXCL | (m.perm.mode & PERM)))
            arr = (ctypes.c_ushort * len(m.values))(*totals[m.perm.id])
            _check(libc.semctl(m.perm.id, 0, SETALL, ctypes.cast(arr, ctypes.c_void_p)),
                   f"setting the values of SysV semaphore set {m.perm.id}")
            _set_owner("sem", m.perm)
        for q in ipc.msg:
            _next_id("msg", q.perm.id)
            _created("msg", q.perm, libc.msgget(q.perm.key, IPC_CREAT | IPC_EXCL | (q.perm.mode & PERM)))
            try:
                _set_owner("msg", q.perm, q.qbytes)
            except OSError:      # a limit above msgmnb needs CAP_SYS_RESOURCE: keep the default
                _set_owner("msg", q.perm)
            for msg in q.messages:
                buf = ctypes.create_string_buffer(struct.pack("<q", msg.type) + msg.data, 8 + len(msg.data))
                _check(libc.msgsnd(q.perm.id, buf, len(msg.data), IPC_NOWAIT),
                       f"refilling SysV message queue {q.perm.id}")
    except OSError as e:
        raise RestoreError(f"recreating the job's SysV IPC objects: {e.strerror}") from None
    return remove_later


SHM_HUGETLB, SHM_HUGE_SHIFT = 0o4000, 26


def _huge_flags(s: pb.SysvShm) -> int:
    """shmget flags for a SHM_HUGETLB segment: its page size as log2 << SHM_HUGE_SHIFT."""
    if not s.huge_page_size:
        return 0
    return SHM_HUGETLB | (s.huge_page_size.bit_length() - 1) << SHM_HUGE_SHIFT


def undo_totals(ipc: pb.IpcNamespace, procs) -> dict[int, list[int]]:
    """Each set's values with every process's SEM_UNDO adjustments added (what the values
    were before the processes took their adjustments)."""
    out = {m.perm.id: list(m.values) for m in ipc.sem}
    for p in procs:
        for u in p.sem_undo:
            vals = out.get(u.semid)
            if vals is None or len(u.adj) != len(vals):
                raise ImageError(f"process {p.pid} has SEM_UNDO adjustments for semaphore set "
                                 f"{u.semid}, which the image lacks or sizes otherwise")
            for i, a in enumerate(u.adj):
                vals[i] += a
    for semid, vals in out.items():
        if any(not 0 <= v <= SEMVMX for v in vals):
            raise ImageError(f"semaphore set {semid}: values with SEM_UNDO adjustments leave "
                             f"0..{SEMVMX}")
    return out


def _fill_segment(s: pb.SysvShm, images: Path) -> None:
    addr = libc.shmat(s.perm.id, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), f"attaching SysV segment {s.perm.id}")
    try:
        with open(images / s.data_file, "rb") as f:
            data = f.read(s.size)
        if len(data) != s.size:
            raise ImageError(f"{images / s.data_file} holds {len(data)} bytes, segment {s.perm.id} {s.size}")
        ctypes.memmove(addr, data, len(data))
    finally:
        libc.shmdt(ctypes.c_void_p(addr))


def remove(ids: list[int]) -> None:
    """IPC_RMID the segments that had been removed while attached: gone once detached."""
    for i in ids:
        libc.shmctl(i, IPC_RMID, None)


def attach(t, vmas: list[pb.Vma]) -> None:
    """Attach every SysV segment the process had attached, where it was, by injected
    shmat (SHM_REMAP); parts the process had unmapped are unmapped again, and each
    mapping gets its protection back. Before the other mappings are made: an attach covers
    the whole segment."""
    groups: dict[tuple[int, int], list[pb.Vma]] = {}
    for v in vmas:
        if v.kind == pb.SYSV_SHM:
            groups.setdefault((v.sysv_shmid, v.start - v.pgoff), []).append(v)
    for (shmid, base), vs in groups.items():
        writable = any(v.prot & 2 for v in vs)
        flags = SHM_REMAP | (0 if writable else SHM_RDONLY) | (SHM_EXEC if any(v.prot & 4 for v in vs) else 0)
        res = t.sys("shmat", shmid, base, flags, check=False)
        if res != base:
            raise RestoreError(f"process {t.ns_pid}: cannot attach SysV segment {shmid} at {base:#x}: "
                               + (os.strerror(-res) if res < 0 else f"attached at {res:#x}"))
        size = _segment_span(t.pid, base)
        covered = sorted((v.start, v.end) for v in vs)
        pos = base
        for s, e in covered + [(base + size, base + size)]:
            if s > pos:
                t.sys("munmap", pos, s - pos)
            pos = max(pos, e)
        for v in vs:
            t.sys("mprotect", v.start, v.end - v.start, v.prot)


def _segment_span(pid: int, base: int) -> int:
    """The length the attach at `base` got (the segment's size, page-rounded)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            rng = line.split(None, 1)[0]
            s, e = (int(x, 16) for x in rng.split("-"))
            if s == base:
                return e - s
    raise RestoreError(f"SysV segment attached at {base:#x} is not in the maps of process {pid}")
