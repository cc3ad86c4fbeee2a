"""Dump a process tree (every process with all its threads) to an image set.

Order matters for the promises we make: everything that can refuse (unsupported fds,
mappings, timers) is looked at while the process is frozen but before anything is
written; any failure thaws the process exactly as it was and removes the partial image;
without --leave-running the process is killed only after the image is sealed on disk.
"""
import os
import platform
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import HpcckptError, KernelError, PermissionDeniedError, ProcessGoneError, UnsupportedError
from ..images import pb
from ..images.imageset import ImageSet
from ..kernel import elf, proc, ptrace, vdso
from ..kernel.arch import current as arch
from ..kernel.inject import Injector, Mem, find_syscall_insn
from ..progress import Progress
from . import files, memory, shared
from . import tree as ptree
from .freeze import Frozen

SCRATCH = 1 << 16
MAP_PRIVATE_ANON = 0x22
PR_GET_TID_ADDRESS = 40
PR_GET_CHILD_SUBREAPER = 37
SIG_NUMBERS = [s for s in range(1, 65) if s not in (9, 19)]


@dataclass
class DumpResult:
    pid: int
    images: Path
    threads: int
    memory_bytes: int      # bytes of the process's mappings
    pages_bytes: int       # bytes of page data written
    frozen_s: float        # how long the process could not run
    total_s: float
    processes: int = 1     # processes in the tree (zombies included)


def _creds(st: dict[str, str]) -> pb.Creds:
    uid, gid = [int(x) for x in st["Uid"].split()], [int(x) for x in st["Gid"].split()]
    return pb.Creds(uid=uid[0], euid=uid[1], suid=uid[2], fsuid=uid[3],
                    gid=gid[0], egid=gid[1], sgid=gid[2], fsgid=gid[3],
                    groups=[int(g) for g in st.get("Groups", "").split()],
                    cap_eff=int(st["CapEff"], 16), cap_prm=int(st["CapPrm"], 16),
                    cap_inh=int(st["CapInh"], 16), cap_bnd=int(st["CapBnd"], 16))


def check_owner(pid: int) -> dict[str, str]:
    """A caller may only dump processes that are entirely its own."""
    st = proc.status(pid)
    me = os.geteuid()
    if me != 0:
        uids = {int(x) for x in st["Uid"].split()}
        gids = {int(x) for x in st["Gid"].split()}
        if uids != {me} or gids - {os.getegid(), *os.getgroups()}:
            raise PermissionDeniedError(
                f"process {pid} belongs to uid {st['Uid'].split()[0]}; you (uid {me}) may only "
                "dump processes that run entirely with your own credentials")
    return st


class _Scratch:
    """A private page block mapped into the frozen target for syscall arguments."""

    def __init__(self, inj: Injector, mem: Mem):
        self.inj, self.mem = inj, mem
        self.addr = inj.syscall("mmap", 0, SCRATCH, 3, MAP_PRIVATE_ANON, -1, 0)

    def read_u64s(self, n: int, off: int = 0) -> tuple[int, ...]:
        return struct.unpack(f"<{n}Q", self.mem.read(self.addr + off, 8 * n))

    def unmap(self) -> None:
        self.inj.syscall("munmap", self.addr, SCRATCH)


def _thread_state(pid: int, tid: int, inj: Injector, scratch: _Scratch) -> pb.Thread:
    t = pb.Thread(tid=proc.ns_pids(pid, tid)[-1], comm=proc.comm(pid, tid))
    t.regs.extend(arch.rewind_interrupted_syscall(inj.saved_regs).to_list())
    t.xstate = ptrace.get_regset(tid, arch.XSTATE_NOTE, arch.XSTATE_MAX)
    t.sigmask = inj.saved_mask
    t.pending.extend(ptrace.peek_siginfo(tid, shared=False))
    a = scratch.addr
    inj.syscall("sigaltstack", 0, a)
    sp, flags, size = struct.unpack("<Qi4xQ", scratch.mem.read(a, 24))  # stack_t
    t.altstack.CopyFrom(pb.SigAltStack(sp=sp, flags=flags & 0xFFFFFFFF, size=size))
    inj.syscall("prctl", PR_GET_TID_ADDRESS, a)
    t.clear_child_tid = scratch.read_u64s(1)[0]
    inj.syscall("get_robust_list", 0, a, a + 8)
    t.robust_list, t.robust_list_len = scratch.read_u64s(2)
    cfg = ptrace.get_rseq(tid)
    if cfg.rseq_abi_pointer:
        t.rseq.CopyFrom(pb.Rseq(pointer=cfg.rseq_abi_pointer, size=cfg.rseq_abi_size,
                                signature=cfg.signature))
    return t


def _process_state(pid: int, st: dict[str, str], inj: Injector, scratch: _Scratch) -> pb.Process:
    f = proc.stat_fields(pid)
    p = pb.Process(pid=proc.ns_pids(pid)[-1], creds=_creds(st), comm=proc.comm(pid), personality=proc.personality(pid),
                   umask=int(st.get("Umask", "0022"), 8), cwd=proc.link(pid, "cwd"),
                   root=proc.link(pid, "root"))
    a = scratch.addr
    for sig in SIG_NUMBERS:
        inj.syscall("rt_sigaction", sig, 0, a, 8)
        handler, flags, restorer, mask = scratch.read_u64s(4)
        if handler or flags or mask:
            p.sigactions.append(pb.SigAction(signo=sig, handler=handler, flags=flags,
                                             restorer=restorer, mask=mask))
    for which in range(3):
        inj.syscall("getitimer", which, a)
        isec, iusec, vsec, vusec = scratch.read_u64s(4)
        if vsec or vusec:
            p.itimers.append(pb.ITimer(which=which, interval_sec=isec, interval_usec=iusec,
                                       value_sec=vsec, value_usec=vusec))
    for r in range(16):  # RLIMIT_CPU .. RLIMIT_RTTIME; from inside: prlimit on another
        inj.syscall("prlimit64", 0, r, 0, a)  # user's process would need CAP_SYS_RESOURCE
        cur, mx = scratch.read_u64s(2)
        p.rlimits.append(pb.Rlimit(resource=r, cur=cur, max=mx))
    p.shared_pending.extend(ptrace.peek_siginfo(pid, shared=True))
    brk = inj.syscall("brk", 0)
    inj.syscall("prctl", PR_GET_CHILD_SUBREAPER, a)
    p.subreaper = struct.unpack("<i", scratch.mem.read(a, 4))[0] != 0
    p.mm.CopyFrom(pb.Mm(start_code=int(f[23]), end_code=int(f[24]), start_stack=int(f[25]),
                        start_data=int(f[42]), end_data=int(f[43]), start_brk=int(f[44]),
                        arg_start=int(f[45]), arg_end=int(f[46]), env_start=int(f[47]),
                        env_end=int(f[48]), brk=brk, auxv=proc.auxv(pid), exe=proc.link(pid, "exe")))
    return p


def _mapped_files(vmas: list[pb.Vma], exe: str) -> list[pb.MappedFile]:
    out = []
    for path in sorted({v.path for v in vmas if v.kind in (pb.FILE_PRIVATE, pb.FILE_SHARED)} | {exe}):
        try:
            s = os.stat(path)
        except FileNotFoundError:
            continue
        out.append(pb.MappedFile(path=path, size=s.st_size, mtime_ns=s.st_mtime_ns, build_id=elf.build_id(path)))
    return out


def _cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    return []


def _capture(fr: Frozen, iset: ImageSet, policies: files.FilePolicies, st: dict,
             descs: shared.Descriptions | None = None,
             shm: "ShmemTable | None" = None) -> tuple[pb.Process, list]:
    """Everything but the pages, while frozen. Leaves the target exactly as found."""
    pid = fr.pid
    vmas = proc.maps(pid)
    pvmas = [memory.describe(pid, v) for v in vmas]
    if shm is not None:
        for v, pv in zip(vmas, pvmas):
            if shared.is_shared_object(v):
                pv.shmid = shm.add(pid, v)
    if proc.posix_timers(pid).strip():
        raise UnsupportedError(f"process {pid} has POSIX timers (timer_create), not supported yet")
    fds = files.dump_fds(pid, iset.path, policies, descs)
    ip = find_syscall_insn(pid, vmas)
    mem = Mem(pid)
    injectors = {}
    scratch = None
    try:
        for tid in fr.tids:
            injectors[tid] = Injector(tid, ip)
        scratch = _Scratch(injectors[pid], mem)
        p = _process_state(pid, st, injectors[pid], scratch)
        p.threads.extend(_thread_state(pid, tid, injectors[tid], scratch) for tid in fr.tids)
        scratch.unmap()
        scratch = None
    finally:
        if scratch is not None:
            try:
                scratch.unmap()
            except HpcckptError:
                pass
        for tid, inj in injectors.items():
            try:
                inj.restore()
            except HpcckptError:
                pass
            fr.deferred.setdefault(tid, []).extend(inj.pending_signals)
        mem.close()
    p.mm.vmas.extend(pvmas)
    p.fds.extend(fds)
    return p, vmas


class ShmemTable:
    """Shared memory objects of the tree, by inode; each saved once to shmem-ID.img."""

    def __init__(self, images: Path):
        self.images = images
        self.ids: dict[tuple[str, int], int] = {}
        self.objects: list[pb.ShmemObject] = []

    def add(self, pid: int, v: proc.Vma) -> int:
        key = (v.dev, v.inode)
        if key not in self.ids:
            oid = len(self.objects) + 1
            name = f"shmem-{oid}.img"
            try:
                size = shared.save_object(pid, v, self.images / name)
            except OSError as e:
                raise KernelError(f"process {pid}: cannot save shared memory {v.path} at "
                                  f"{v.start:#x}: {e.strerror}") from None
            self.objects.append(pb.ShmemObject(id=oid, size=size, data_file=name,
                                               path=shared.named_shm_path(v.path)))
            self.ids[key] = oid
        return self.ids[key]


def _tree_ids(ft: ptree.FrozenTree) -> dict[int, int]:
    """Host PID -> PID in the tree's own namespace, for every member."""
    out = {}
    depth = len(proc.ns_pids(ft.root))
    for pid in ft.order:
        ns = proc.ns_pids(pid)
        if len(ns) != depth:
            raise UnsupportedError(f"process {pid} runs in a PID namespace of its own inside the tree; "
                                   "not supported")
        out[pid] = ns[-1]
    return out


def _relations(ft: ptree.FrozenTree, pid: int, ns: dict[int, int], p: pb.Process) -> None:
    """ppid, pgid and sid as the tree's namespace numbers them; 0 means 'outside the
    tree: whatever the restoring parent has', which is legal only where the root has it."""
    e, r = ft.table[pid], ft.table[ft.root]
    p.orphan = pid in ft.orphans
    p.ppid = ns.get(e.ppid, 1 if p.orphan else 0) if pid != ft.root else 0
    for name in ("pgid", "sid"):
        host = getattr(e, name)
        if host in ns:
            setattr(p, name, ns[host])
        elif host == getattr(r, name):
            setattr(p, name, 0)
        else:
            kind = "process group" if name == "pgid" else "session"
            raise UnsupportedError(
                f"process {pid} is in {kind} {host}, whose leader is neither in the tree nor "
                f"shared with the tree's root {ft.root}; not supported yet")


def _zombie(pid: int, ns: dict[int, int]) -> pb.Process:
    f = proc.stat_fields(pid)
    code = int(f[49]) if len(f) > 49 else 0   # /proc/PID/stat field 52: exit_code (wait status)
    return pb.Process(pid=ns[pid], comm=proc.comm(pid), zombie=True,
                      exit_code=(code >> 8) & 0xFF, exit_signal=code & 0x7F)


def dump(pid: int, images: str | os.PathLike, leave_running: bool = False,
         policies: files.FilePolicies | None = None, show_progress: bool = True,
         tree: bool = True) -> DumpResult:
    """Checkpoint `pid` and (unless `tree=False`) all its descendants into `images`;
    kill them all afterwards unless `leave_running`."""
    t0 = time.monotonic()
    check_owner(pid)
    fresh_dir = not os.path.exists(images)
    iset = ImageSet(images, create=True)
    created = set(os.listdir(iset.path))
    ft = ptree.freeze_tree(pid, tree)
    t_frozen = time.monotonic()
    try:
        ns = _tree_ids(ft)
        statuses = {p: check_owner(p) for p in ft.frozen}
        descs = shared.Descriptions.collect(list(ft.frozen))
        shm = ShmemTable(iset.path)
        procs: dict[int, pb.Process] = {}
        for p_host in ft.order:
            if p_host in ft.zombies:
                procs[p_host] = _zombie(p_host, ns)
            else:
                procs[p_host] = _capture(ft.frozen[p_host], iset, policies or files.FilePolicies(),
                                         statuses[p_host], descs, shm)[0]
            _relations(ft, p_host, ns, procs[p_host])
        plans = {h: [(v, memory.pages_to_save(h, v)) for v in procs[h].mm.vmas]
                 for h in ft.order if h not in ft.zombies}
        total = sum(n for plan in plans.values() for _, runs in plan for _, n in runs)
        prog = Progress(f"dump {pid}", total, enabled=show_progress)
        pages_bytes = 0
        for h in ft.order:
            p = procs[h]
            pages = pb.Pagemap(pages_file=f"pages-{p.pid}.img")
            if h not in ft.zombies:
                _write_pages(h, iset, pages, plans[h], prog)
                pages_bytes += pages.pages_bytes
            iset.write_message(f"process-{p.pid}.img", "process", p)
            iset.write_message(f"pagemap-{p.pid}.img", "pagemap", pages)
        prog.finish()
        root = procs[pid]
        inv = _inventory(root, pid)
        inv.pids[:] = [procs[h].pid for h in ft.order]
        inv.shmem.extend(shm.objects)
        for h in ft.order:
            if h not in ft.zombies and h != pid:
                inv.files.extend(f for f in _mapped_files(list(procs[h].mm.vmas), procs[h].mm.exe)
                                 if f.path not in {x.path for x in inv.files})
        if leave_running:
            ft.thaw()
            t_thawed = time.monotonic()
            iset.seal(inv)
        else:
            iset.seal(inv)
            t_thawed = time.monotonic()
            ft.kill()
    except BaseException:
        ft.thaw()
        _remove_new(iset.path, created)
        if fresh_dir:
            shutil.rmtree(iset.path, ignore_errors=True)
        raise
    return DumpResult(pid=pid, images=iset.path, threads=ft.threads,
                      memory_bytes=sum(v.end - v.start for p in procs.values() for v in p.mm.vmas),
                      pages_bytes=pages_bytes, frozen_s=t_thawed - t_frozen,
                      total_s=time.monotonic() - t0, processes=len(ft.order))


def _write_pages(pid: int, iset: ImageSet, pages: pb.Pagemap, plan, prog) -> None:
    fd = os.open(iset.path / pages.pages_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    writer = memory.PageWriter(pid, fd)
    try:
        for _, runs in plan:
            for addr, n in runs:
                off = writer.copy(addr, n)
                pages.runs.append(pb.PageRun(vaddr=addr, nr_pages=n // memory.PAGE_SIZE, offset=off))
                prog(n)
        os.fsync(fd)
    except OSError as e:
        if e.errno == 3:
            raise ProcessGoneError(f"process {pid} exited during the dump") from None
        raise KernelError(f"writing pages of process {pid} to {iset.path}: {e.strerror}") from None
    finally:
        writer.close()
        os.close(fd)
    pages.pages_bytes = writer.offset


def _inventory(p: pb.Process, pid: int) -> pb.Inventory:
    sizes = {v.kind: v.end - v.start for v in p.mm.vmas}
    return pb.Inventory(
        hpcckpt_version=__version__, kernel=platform.release(), arch=platform.machine(),
        cpu_flags=_cpu_flags(), xsave_size=len(p.threads[0].xstate), created=time.time(),
        host=socket.gethostname(), root_pid=p.pid, pids=[p.pid],
        own_pid_namespace=len(proc.ns_pids(pid)) > len(proc.ns_pids(os.getpid())),
        files=_mapped_files(list(p.mm.vmas), p.mm.exe), uid=p.creds.uid,
        vdso_size=sizes.get(pb.VDSO, 0), vvar_size=sizes.get(pb.VVAR, 0),
        vvar_vclock_size=sizes.get(pb.VVAR_VCLOCK, 0), vdso_xxh3=vdso.digest(pid))


def _remove_new(path: Path, before: set[str]) -> None:
    """Take back what a failed dump wrote, and nothing else."""
    for name in set(os.listdir(path)) - before:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
