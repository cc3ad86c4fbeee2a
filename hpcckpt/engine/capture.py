"""Everything of a frozen process tree but its pages: registers, signals, fds, mappings,
timers, read by /proc and by batches of injected read-only syscalls, in steps the tree's
processes take together (capture_tree), leaving every process exactly as found."""
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import HpcckptError, KernelError, ProcessGoneError
from ..images import pb
from ..images.imageset import ImageSet
from ..kernel import proc, ptrace
from ..kernel.arch import current as arch
from ..kernel.batch import OUT, Batch, Call
from ..kernel.inject import CODE, Injector, Mem, _alive, find_syscall_insn
from . import files, memory, shared, timers
from . import tree as ptree
from .freeze import Frozen


SCRATCH = 1 << 16
CODE_OFF = 40 << 10     # scratch: call outputs below, a batch's code above
TIMERS_BATCHED = 256
MAP_PRIVATE_ANON = 0x22
PR_GET_TID_ADDRESS = 40
PR_GET_CHILD_SUBREAPER = 37
SIG_NUMBERS = [s for s in range(1, 65) if s not in (9, 19)]


def _creds(st: dict[str, str]) -> pb.Creds:
    uid, gid = [int(x) for x in st["Uid"].split()], [int(x) for x in st["Gid"].split()]
    return pb.Creds(uid=uid[0], euid=uid[1], suid=uid[2], fsuid=uid[3],
                    gid=gid[0], egid=gid[1], sgid=gid[2], fsgid=gid[3],
                    groups=[int(g) for g in st.get("Groups", "").split()],
                    cap_eff=int(st["CapEff"], 16), cap_prm=int(st["CapPrm"], 16),
                    cap_inh=int(st["CapInh"], 16), cap_bnd=int(st["CapBnd"], 16))


class _Scratch:
    """A private page block mapped into the frozen target for syscall arguments, and for
    the code of a syscall batch (kernel/batch.py) when it may be executable. Its mmap
    and munmap can be set off and waited for apart (`wait=False`, `ready`; `start_unmap`,
    `end_unmap`), so a tree's processes make theirs at the same time."""

    def __init__(self, inj: Injector, mem: Mem, wait: bool = True):
        self.inj, self.mem = inj, mem
        self.addr = 0
        self.code_ok = True
        self.state = "mmap"         # mmap (under way), mapped, munmap (under way), gone
        inj.start("mmap", 0, SCRATCH, 7, MAP_PRIVATE_ANON, -1, 0)
        if wait:
            self.ready()

    def ready(self) -> None:
        """The mmap ended. W^X policies (PR_SET_MDWE, SELinux execmem) refuse rwx memory:
        then rw-, and calls go one by one."""
        if self.state != "mmap":
            return
        res = self.inj.finish(check=False)
        self.state = "gone"
        if -4096 < res < 0:
            self.code_ok = False
            res = self.inj.syscall("mmap", 0, SCRATCH, 3, MAP_PRIVATE_ANON, -1, 0)
        self.addr, self.state = res, "mapped"

    def batch(self) -> Batch:
        return Batch(self.addr, CODE_OFF, self.code_ok)

    def run(self, b: Batch, inj: Injector) -> None:
        b.run(inj, self.mem, self.addr + CODE_OFF, SCRATCH - CODE_OFF)

    def start(self, b: Batch, inj: Injector) -> None:
        b.start(inj, self.mem, self.addr + CODE_OFF, SCRATCH - CODE_OFF)

    def start_unmap(self) -> None:
        self.inj.start("munmap", self.addr, SCRATCH)
        self.state = "munmap"

    def end_unmap(self) -> None:
        self.state = "gone"
        self.inj.finish()

    def unmap(self) -> None:
        self.start_unmap()
        self.end_unmap()

    def close(self) -> None:
        """Unmapped, whatever step a failure elsewhere in the tree left it at (best effort:
        a process that is gone has nothing to unmap)."""
        try:
            if self.inj.running == CODE:
                self.inj.wait_code()
            if self.state == "mmap":
                self.ready()
            elif self.state == "munmap":
                self.end_unmap()
            if self.state == "mapped":
                self.unmap()
        except HpcckptError:
            pass


@dataclass
class _ThreadCalls:
    altstack: Call
    tid_address: Call


def _thread_calls(b: Batch) -> _ThreadCalls:
    return _ThreadCalls(altstack=b.add("sigaltstack", 0, OUT, out=24),
                        tid_address=b.add("prctl", PR_GET_TID_ADDRESS, OUT, out=8))


def _thread_state(pid: int, tid: int, tst: dict[str, str], inj: Injector, calls: _ThreadCalls) -> pb.Thread:
    """`tst`: the thread's status (proc.status)."""
    t = pb.Thread(tid=proc.status_ns_pids(tst, tid)[-1], comm=proc.status_comm(tst, pid, tid))
    t.regs.extend(arch.rewind_interrupted_syscall(inj.saved_regs).to_list())
    t.xstate = ptrace.get_regset(tid, arch.XSTATE_NOTE, arch.XSTATE_MAX)
    t.sigmask = inj.saved_mask
    t.pending.extend(ptrace.peek_siginfo(tid, shared=False))
    sp, flags, size = struct.unpack("<Qi4xQ", calls.altstack.data)  # stack_t
    t.altstack.CopyFrom(pb.SigAltStack(sp=sp, flags=flags & 0xFFFFFFFF, size=size))
    t.clear_child_tid = calls.tid_address.u64s(1)[0]
    t.robust_list, t.robust_list_len = proc.robust_list(tid)
    cfg = ptrace.get_rseq(tid)
    if cfg.rseq_abi_pointer:
        t.rseq.CopyFrom(pb.Rseq(pointer=cfg.rseq_abi_pointer, size=cfg.rseq_abi_size,
                                signature=cfg.signature))
    return t


@dataclass
class _ProcessCalls:
    sigactions: list[tuple[int, Call]]
    itimers: list[Call]
    brk: Call
    subreaper: Call


def _process_calls(st: dict[str, str], b: Batch) -> _ProcessCalls:
    # Only signals not at SIG_DFL can have an action worth saving (status says which),
    # and SIGCHLD, whose SA_NOCLDWAIT/SA_NOCLDSTOP matter even at SIG_DFL.
    acted = proc.signal_set(st, "SigCgt") | proc.signal_set(st, "SigIgn") | {signal.SIGCHLD}
    return _ProcessCalls(
        sigactions=[(sig, b.add("rt_sigaction", sig, 0, OUT, 8, out=32)) for sig in SIG_NUMBERS if sig in acted],
        itimers=[b.add("getitimer", which, OUT, out=32) for which in range(3)],
        brk=b.add("brk", 0),
        subreaper=b.add("prctl", PR_GET_CHILD_SUBREAPER, OUT, out=8))


def _process_state(pid: int, st: dict[str, str], calls: _ProcessCalls, f: list[str]) -> pb.Process:
    """`st`, `f`: its status and stat fields (proc.status, proc.stat_fields), read while frozen."""
    p = pb.Process(pid=proc.status_ns_pids(st, pid)[-1], creds=_creds(st), comm=proc.status_comm(st, pid),
                   personality=proc.personality(pid),
                   umask=int(st.get("Umask", "0022"), 8), cwd=proc.link(pid, "cwd"),
                   root=proc.link(pid, "root"))
    for sig, c in calls.sigactions:
        handler, flags, restorer, mask = c.u64s(4)
        if handler or flags or mask:
            p.sigactions.append(pb.SigAction(signo=sig, handler=handler, flags=flags,
                                             restorer=restorer, mask=mask))
    for which, c in enumerate(calls.itimers):
        isec, iusec, vsec, vusec = c.u64s(4)
        # a periodic ITIMER_REAL whose SIGALRM is still pending shows 0 left: the kernel
        # re-arms it only when the signal is taken. Keep it (restore arms it a period on).
        if vsec or vusec or isec or iusec:
            p.itimers.append(pb.ITimer(which=which, interval_sec=isec, interval_usec=iusec,
                                       value_sec=vsec, value_usec=vusec))
    # RLIMIT_CPU .. RLIMIT_RTTIME, from /proc/PID/limits (prlimit64 on another user's
    # process would need CAP_SYS_RESOURCE; injecting it costs 16 round trips)
    for r, (cur, mx) in enumerate(proc.limits(pid)):
        p.rlimits.append(pb.Rlimit(resource=r, cur=cur, max=mx))
    p.shared_pending.extend(ptrace.peek_siginfo(pid, shared=True))
    p.subreaper = struct.unpack_from("<i", calls.subreaper.data)[0] != 0
    p.mm.CopyFrom(pb.Mm(start_code=int(f[23]), end_code=int(f[24]), start_stack=int(f[25]),
                        start_data=int(f[42]), end_data=int(f[43]), start_brk=int(f[44]),
                        arg_start=int(f[45]), arg_end=int(f[46]), env_start=int(f[47]),
                        env_end=int(f[48]), brk=calls.brk.result, auxv=proc.auxv(pid),
                        exe=proc.link(pid, "exe")))
    return p


class _Capture:
    """Everything of one frozen process but its pages, in steps the tree's processes take
    together (capture_tree): each stop for an injected syscall or batch costs the
    target's scheduling latency (0.1-1 ms on a busy node), and a tree's processes now
    wait out theirs at the same time instead of one after another. Construction reads
    /proc and sets the scratch mmap off; `start_batch` sets off the batch of read-only
    calls; `end_batch` reads it and sets off the munmap; `end` gives the process. Leaves
    the target exactly as found, `close` too, at whatever step (idempotent); but with
    `keep_scratch` (the process is killed after the dump) the scratch stays mapped, one
    stop fewer, and is left to the Frozen, whose thaw takes it away."""

    def __init__(self, fr: Frozen, iset: ImageSet, policies: files.FilePolicies, st: dict,
                 descs: shared.Descriptions | None = None, shm: "ShmemTable | None" = None,
                 keep_scratch: bool = False, stat: list[str] | None = None, early: list | None = None):
        pid = self.pid = fr.pid
        self.fr, self.st, self.keep, self.stat = fr, st, keep_scratch, stat
        # smaps read before the freeze where the layout is unchanged (its page walk is
        # the longest part of a capture): see layout.early_maps
        self.vmas = proc.maps_since(pid, early) if early else None
        self.early = self.vmas is not None
        if self.vmas is None:
            self.vmas = proc.maps(pid)
        self.mem = Mem(pid)
        self.injectors: dict[int, Injector] = {}
        self.scratch: _Scratch | None = None
        try:
            ip = find_syscall_insn(pid, self.vmas)
            for tid in fr.tids:
                self.injectors[tid] = Injector(tid, ip)
            self.scratch = _Scratch(self.injectors[pid], self.mem, wait=False)
            # while the process maps its scratch: what /proc tells
            self.pvmas = [memory.describe(pid, v) for v in self.vmas]
            if shm is not None:
                for v, pv in zip(self.vmas, self.pvmas):
                    if shared.is_shared_object(v):
                        pv.shmid = shm.add(pid, v)
            self.fds = files.dump_fds(pid, iset.path, policies, descs)
            self.tst = {tid: st if tid == pid else proc.status(pid, tid) for tid in fr.tids}
            self.tms = timers.listed(pid, {tid: proc.status_ns_pids(self.tst[tid], tid)[-1] for tid in fr.tids})
        except BaseException:
            self.close()
            raise

    def start_batch(self) -> None:
        """Every read-only syscall of the main thread in one batch: one stop, not one per call."""
        self.scratch.ready()
        b = self.b = self.scratch.batch()
        self.pcalls = _process_calls(self.st, b)
        self.tcalls = {self.pid: _thread_calls(b)}
        self.timer_calls = timers.calls(self.tms, b) if len(self.tms) <= TIMERS_BATCHED else None
        self.scratch.start(b, self.injectors[self.pid])

    def end_batch(self) -> None:
        pid, fr, inj, scratch = self.pid, self.fr, self.injectors, self.scratch
        self.b.finish(inj[pid], self.mem)
        p = self.p = _process_state(pid, self.st, self.pcalls, self.stat or proc.stat_fields(pid))
        for tid in fr.tids[1:]:        # other threads: a batch each, in turn (few processes have them)
            b = scratch.batch()
            self.tcalls[tid] = _thread_calls(b)
            scratch.run(b, inj[tid])
        timer_calls, tms = self.timer_calls, self.tms
        if timer_calls is None:   # hundreds of timers: in batches of their own
            timer_calls = []
            for k in range(0, len(tms), TIMERS_BATCHED):
                b = scratch.batch()
                part = timers.calls(tms[k:k + TIMERS_BATCHED], b)
                scratch.run(b, inj[pid])
                timer_calls += part
        p.posix_timers.extend(timers.from_calls(tms, timer_calls))
        p.threads.extend(_thread_state(pid, tid, self.tst[tid], inj[tid], self.tcalls[tid]) for tid in fr.tids)
        if not self.keep:
            scratch.start_unmap()

    def end(self) -> pb.Process:
        if self.keep:
            self.fr.scratch, self.scratch = (self.scratch.addr, SCRATCH), None
        else:
            self.scratch.end_unmap()
        self.close()
        self.p.mm.vmas.extend(self.pvmas)
        self.p.fds.extend(self.fds)
        return self.p

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None
        for tid, inj in self.injectors.items():
            try:
                inj.restore()
            except HpcckptError:
                pass
            self.fr.deferred.setdefault(tid, []).extend(inj.pending_signals)
        self.injectors = {}
        self.mem.close()


def capture_tree(ft: ptree.FrozenTree, iset: ImageSet, policies: files.FilePolicies,
                  statuses: dict[int, dict], descs: shared.Descriptions,
                  shm: "ShmemTable", keep_scratch: bool = False,
                  early: dict[int, list] | None = None) -> dict[int, tuple[pb.Process, list, bool]]:
    """_Capture of every live process, step by step across the tree (in tree order, so
    content shared by several processes is saved with the first): (process, its
    mappings, whether their smaps fields are `early`'s). A process that fails is named;
    every process is left as found (`keep_scratch`: see _Capture)."""
    caps: dict[int, _Capture] = {}

    def step(h: int, fn):
        try:
            return fn()
        except HpcckptError as e:
            if isinstance(e, ProcessGoneError) or not _alive(h):
                raise ProcessGoneError(
                    f"process {h} exited (or was killed) during the dump; nothing was "
                    f"written and the rest of the tree runs on (at: {e})") from None
            raise

    try:
        for h in ft.order:
            if h not in ft.zombies:
                # its stat fields as freeze_tree's last listing (after every freeze) read them
                caps[h] = step(h, lambda: _Capture(ft.frozen[h], iset, policies, statuses[h], descs, shm,
                                                   keep_scratch, ft.table[h].fields, (early or {}).get(h)))
        for h, c in caps.items():
            step(h, c.start_batch)
        for h, c in caps.items():
            step(h, c.end_batch)
        return {h: (step(h, c.end), c.vmas, c.early) for h, c in caps.items()}
    finally:
        for c in caps.values():
            c.close()


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
