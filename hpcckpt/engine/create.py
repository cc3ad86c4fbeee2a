"""Creating the processes of a tree, with their PIDs, parents, sessions and groups.

As CRIU does it, the shape comes first and the content later: the root's stub is
launched (launch.py), and every other process is forked by its own parent's stub with
an injected clone3(set_tid), so it really is that parent's child (the kernel's parent
link cannot be set any other way). PTRACE_O_TRACEFORK hands us each new child stopped.
A process calls setsid() before it forks its children (they inherit the session);
process groups are joined once all exist (leaders first). Orphans are forked by a
short-lived helper that then exits, so the namespace's init adopts them. Zombies are
created like any child and made to exit with their saved status; the SIGCHLD that
raises in their parent is taken back, since the original parent had already had it.
"""
import os
import signal
import struct
from dataclasses import dataclass, field

from ..errors import HpcckptError, RestoreError
from ..images import pb
from ..kernel import proc, ptrace
from ..kernel.arch import current as arch
from ..kernel.inject import Injector, Mem, find_syscall_insn
from .launch import launch_stub
from .sessions import check as leaderless_sessions

OPTIONS = ptrace.O_EXITKILL | ptrace.O_TRACECLONE | ptrace.O_TRACEFORK
PR_SET_NAME = 15


@dataclass
class Stub:
    """A created process (or helper) that we trace, with an injector on it."""
    ns_pid: int
    host: int
    inj: Injector

    def scratch(self) -> int:
        """Room below the stub's stack pointer for syscall arguments (nothing lives there)."""
        return (arch.sp(self.inj.saved_regs) - 16384) & ~0xF

    def put(self, data: bytes, off: int = 0) -> int:
        m = Mem(self.host)
        try:
            m.write(self.scratch() + off, data)
        finally:
            m.close()
        return self.scratch() + off


@dataclass
class Tree:
    stubs: dict[int, Stub] = field(default_factory=dict)   # by PID in the tree's namespace
    root_host: int = 0
    terminals: object = None    # ttys.Terminals: ptys made by the root, controlling terminals

    def host(self, ns_pid: int) -> int:
        return self.stubs[ns_pid].host

    def kill_all(self) -> None:
        """Failure: every process we made dies, and is reaped (by us where we can). Threads
        we trace are reaped one by one first: the kernel reports a traced group's leader
        only after all its other threads have been."""
        tids = {s.host: _threads(s.host) for s in self.stubs.values()}
        for s in self.stubs.values():
            try:
                os.kill(s.host, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for s in self.stubs.values():
            for tid in [*tids[s.host], s.host]:
                try:
                    while True:
                        st = ptrace.wait(tid)
                        if st.exited:
                            break
                except HpcckptError:
                    pass

    def release(self) -> None:
        """Put each stub's registers and mask back as they were before our injections."""
        for s in self.stubs.values():
            s.inj.restore()


def _threads(pid: int) -> list[int]:
    """The threads of `pid` other than its leader."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    except OSError:
        return []


def _stub(ns_pid: int, host: int) -> Stub:
    return Stub(ns_pid, host, Injector(host, find_syscall_insn(host, proc.maps(host, with_flags=False))))


def fork_child(parent: Stub, ns_pid: int | None) -> Stub:
    """Make `parent` fork a child at `ns_pid` (any PID if None); returns it, stopped."""
    set_tid = parent.put(struct.pack("<i", ns_pid or 0), 256)
    args = parent.put(struct.pack("<11Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0,
                                  set_tid if ns_pid else 0, 1 if ns_pid else 0, 0))
    parent.inj.new_child = None
    res = parent.inj.syscall("clone3", args, 88, check=False)
    if res < 0 or parent.inj.new_child is None:
        what = f"PID {ns_pid}" if ns_pid else "a helper process"
        raise RestoreError(f"process {parent.ns_pid} could not fork {what}: "
                           + (os.strerror(-res) if res < 0 else "no fork event"))
    host = parent.inj.new_child
    st = ptrace.wait_trap(host)
    if st.sig != signal.SIGSTOP:
        raise RestoreError(f"new process {res} stopped unexpectedly ({st})")
    return Stub(res, host, Injector(host, parent.inj.syscall_ip))   # a copy of its parent: same vDSO


def exit_stub(s: Stub, code: int = 0, sig: int = 0) -> None:
    """Make a stub exit with `code`, or die of `sig`; we reap it as tracer, after
    which it is its parent's zombie."""
    regs = s.inj.saved_regs
    if sig:
        ptrace.set_sigmask(s.host, 0)
        ptrace.set_regs(s.host, arch.prepare_syscall(regs, arch.SYSCALLS["kill"], (s.ns_pid, sig), s.inj.syscall_ip))
    else:
        ptrace.set_regs(s.host, arch.prepare_syscall(regs, arch.SYSCALLS["exit_group"], (code,), s.inj.syscall_ip))
    ptrace.cont(s.host)
    while True:
        st = ptrace.wait(s.host)
        if st.exited:
            return
        ptrace.cont(s.host, st.sig if st.sig != signal.SIGTRAP and not st.event else 0)


def drain_sigchld(s: Stub) -> None:
    """Take back SIGCHLDs the restore itself raised in `s`."""
    ts = s.put(bytes(16), 512)
    mask = s.put(struct.pack("<Q", 1 << (signal.SIGCHLD - 1)), 544)
    while s.inj.syscall("rt_sigtimedwait", mask, 0, ts, 8, check=False) > 0:
        pass


def create_tree(procs: list[pb.Process], terminals=None) -> Tree:
    """All processes of the image, stopped, in their final tree shape, sessions and groups
    (and, with `terminals`, their ptys and controlling terminals)."""
    t = Tree(terminals=terminals)
    by_pid = {p.pid: p for p in procs}
    root = procs[0]
    t.root_host = launch_stub(root.pid)
    helpers: dict[int | None, Stub] = {}
    try:
        ptrace.set_options(t.root_host, OPTIONS)
        t.stubs[root.pid] = _stub(root.pid, t.root_host)
        if terminals is not None:
            terminals.create(t.stubs[root.pid])
        _session(t, root, None)
        leaderless = leaderless_sessions(procs)
        for p in procs[1:]:
            if p.orphan:
                _orphan(t, p, root, helpers, leaderless)
                continue
            parent = by_pid.get(p.ppid)
            if parent is None or parent.pid not in t.stubs or parent.zombie:
                raise RestoreError(f"process {p.pid}: its parent {p.ppid} is not in the image "
                                   "(or was not created before it)")
            t.stubs[p.pid] = fork_child(t.stubs[p.ppid], p.pid)
            _session(t, p, parent)
        for key in list(helpers):        # orphans made: their forker exits, the root reaps it
            exit_stub(helpers[key])
            t.stubs[root.pid].inj.syscall("wait4", helpers.pop(key).ns_pid, 0, 0, 0, check=False)
        if leaderless or any(p.orphan for p in procs):
            drain_sigchld(t.stubs[root.pid])
        # for a tree created in the orphans' loop, parents precede children as dumped
        for p in procs:
            if p.pgid and p.pgid == p.pid and p.sid != p.pid:
                t.stubs[p.pid].inj.syscall("setpgid", 0, 0)
        for p in procs:
            if p.pgid and p.pgid != p.pid:
                if p.pgid == p.sid and p.sid in leaderless:
                    continue             # the dead leader's group: had from the helper
                if p.pgid not in by_pid:
                    raise RestoreError(f"process {p.pid}: process group {p.pgid} has no member to lead it")
                res = t.stubs[p.pid].inj.syscall("setpgid", 0, p.pgid, check=False)
                if res < 0:
                    raise RestoreError(f"process {p.pid} cannot join process group {p.pgid}: {os.strerror(-res)}")
        if terminals is not None:
            terminals.set_foreground(t.stubs)
        for p in procs:
            if p.zombie:
                z = t.stubs[p.pid]
                z.inj.syscall("prctl", PR_SET_NAME, z.put(p.comm.encode()[:15] + b"\0"))
                exit_stub(z, p.exit_code, p.exit_signal)
        for ppid in {p.ppid for p in procs if p.zombie}:
            drain_sigchld(t.stubs[ppid])
        for p in procs:
            if p.zombie:
                del t.stubs[p.pid]   # exited: nothing left to fill, kill or detach
        t.release()
        return t
    except BaseException:
        for h in helpers.values():
            try:
                os.kill(h.host, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t.kill_all()
        try:
            os.waitpid(t.root_host, 0)
        except ChildProcessError:
            pass
        raise


def _orphan(t: Tree, p: pb.Process, root: pb.Process, helpers: dict, leaderless: dict) -> None:
    """An orphan, forked by a helper that exits once all are made, so the namespace's
    init adopts them. In a session whose leader is gone (sessions.py) the helper has that
    session's PID and calls setsid() first: it makes the session and its group."""
    key = p.sid if p.sid in leaderless else None
    if key not in helpers:
        helpers[key] = fork_child(t.stubs[root.pid], key)
        if key is not None:
            helpers[key].inj.syscall("setsid")
    t.stubs[p.pid] = fork_child(helpers[key], p.pid)
    _session(t, p, pb.Process(pid=key, sid=key) if key is not None else root)


def _session(t: Tree, p: pb.Process, parent: pb.Process | None) -> None:
    """setsid() where the process leads its session; check the rest is inherited."""
    if p.sid and p.sid == p.pid:
        t.stubs[p.pid].inj.syscall("setsid")
        if t.terminals is not None:
            t.terminals.set_ctty(t.stubs[p.pid], p)
        return
    inherited = parent.sid if parent else 0
    if p.sid != inherited:
        raise RestoreError(
            f"process {p.pid} is in session {p.sid} but its parent {p.ppid} in session "
            f"{inherited}: a session changed under a forked child; not supported yet")
