"""The process tree of a dump: who belongs to it, and freezing all of it as one.

The kernel here has no /proc/PID/task/TID/children, so the tree is found by reading
every /proc/PID/stat. Processes are frozen parents first and the listing is read again
after each round: a process not yet stopped may have forked, and only a listing in
which every member is already stopped (or a zombie) proves nothing escaped. A stopped
parent cannot reap, so its zombies stay put while we look at them. A tree that forks
faster than that (a fork bomb) makes the rounds go on: after MAX_ROUNDS the freeze gives
up, thaws all, and says so. Where the tree has a cgroup v2 of its own (or one is named),
the cgroup is frozen first (cgroup_freezer.py): nothing can fork, one round suffices.
"""
import os
import signal
import time
from dataclasses import dataclass, field

from ..errors import HpcckptError, KernelError, ProcessGoneError
from ..kernel import proc
from .cgroup_freezer import CgroupFreezer, for_tree
from .freeze import Frozen, freeze

MAX_ROUNDS = 200    # listings of the tree that still found new processes: a fork bomb


@dataclass
class Entry:
    """One process as /proc/PID/stat shows it (PIDs as we see them)."""
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    fields: list[str] = field(default_factory=list, repr=False, compare=False)   # all of stat's


def scan() -> dict[int, Entry]:
    """Every process on the system; processes that vanish while we read are skipped."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = proc.stat_fields(int(name))
        except ProcessGoneError:
            continue
        out[int(name)] = Entry(int(name), f[0], int(f[1]), int(f[2]), int(f[3]), f)
    return out


def _children(table: dict[int, Entry]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for e in table.values():
        kids.setdefault(e.ppid, []).append(e.pid)
    for v in kids.values():
        v.sort()
    return kids


def namespace_init(pid: int) -> int | None:
    """PID (as we see it) of the init of `pid`'s PID namespace, if that is not ours."""
    ns = proc.ns_pids(pid)
    if len(ns) <= len(proc.ns_pids(os.getpid())):
        return None
    want = os.readlink(f"/proc/{pid}/ns/pid")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == want and proc.ns_pids(int(name))[-1] == 1:
                return int(name)
        except (OSError, ProcessGoneError):
            continue
    return None


def members(root: int, table: dict[int, Entry], init: int | None) -> tuple[list[int], set[int]]:
    """The root's descendants, parents first; plus, in a namespace of the job's own,
    the orphans its init adopted and their descendants. Returns (members, orphans)."""
    kids = _children(table)
    out, orphans = [], set()

    def walk(start: int) -> None:
        todo = [start]
        while todo:
            p = todo.pop(0)
            out.append(p)
            todo.extend(kids.get(p, []))

    walk(root)
    if init is not None:
        for c in kids.get(init, []):
            if c != root and c not in out:
                orphans.add(c)
                walk(c)
    return out, orphans


@dataclass
class FrozenTree:
    """All processes of a tree, stopped; zombies are listed (they need no stopping)."""
    root: int
    order: list[int] = field(default_factory=list)       # parents first, zombies included
    frozen: dict[int, Frozen] = field(default_factory=dict)
    zombies: set[int] = field(default_factory=set)
    orphans: set[int] = field(default_factory=set)
    table: dict[int, Entry] = field(default_factory=dict)
    cgroup: CgroupFreezer | None = None   # frozen through it; thawed through it as one
    rounds: int = 0                       # listings of the tree the freeze took
    thawed: bool = False                  # thaw() ran: the tree runs again
    stopped_at: float = 0.0               # time.monotonic() when its first process was stopped

    @property
    def threads(self) -> int:
        return sum(len(f.tids) for f in self.frozen.values())

    def thaw(self) -> None:
        """Let every process run on as before (children first, so no parent sees a
        stopped child); errors are swallowed, since this runs on failure paths. Through a
        cgroup: frozen again first, every task detached, then thawed, so all start at once."""
        self.thawed = True
        refrozen = False
        if self.cgroup is not None:
            try:
                self.cgroup.freeze()
                refrozen = True
            except (HpcckptError, OSError):
                pass
        for pid in reversed(self.order):
            if pid in self.frozen:
                self.frozen[pid].thaw()
        if refrozen:
            try:
                self.cgroup.thaw()
            except (HpcckptError, OSError):
                pass

    def kill(self) -> None:
        """Kill every process first, then collect what we are owed as tracer."""
        for pid in self.order:
            if pid in self.frozen:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in self.order:
            if pid in self.frozen:
                self.frozen[pid].reap()


def _freeze_member(pid: int, root: int, on_slow=None) -> Frozen | None:
    """Freeze one process; None if it became a zombie or vanished (not the root)."""
    try:
        return freeze(pid, on_slow)
    except HpcckptError:
        if pid == root:
            raise
        try:
            if proc.stat_fields(pid)[0] in "ZX":
                return None
        except ProcessGoneError:
            return None
        raise


def freeze_tree(root: int, whole: bool = True, cgroup: str | None = "auto") -> FrozenTree:
    """Stop every process of the tree rooted at `root` (only `root` unless `whole`).

    `cgroup`: a cgroup v2 directory to freeze the tree through (all its processes stop
    at once, none can fork); "auto": the root's own cgroup when it holds exactly the
    tree; None: ptrace only. On any failure everything already stopped runs on untouched.
    """
    ft = FrozenTree(root)
    cg, thaw_cg = None, False
    try:
        init = namespace_init(root) if whole else None
        if cgroup == "auto":
            if whole:
                table = scan()
                cg = for_tree(root, set(members(root, table, init)[0]) if root in table else set())
        elif cgroup is not None:
            cg = CgroupFreezer.open(cgroup)
        slow = None
        if cg is not None:
            thaw_cg = not cg.requested()    # frozen by someone else: leave it frozen
            ft.stopped_at = time.monotonic()
            cg.freeze()

            def slow() -> None:
                """A task that will not stop while the cgroup is frozen (a vfork parent):
                thaw, and finish as ptrace alone does (the rounds catch new forks)."""
                nonlocal slow, thaw_cg
                if not thaw_cg:
                    raise KernelError(
                        f"a process of the tree of {root} does not stop while cgroup {cg.path} "
                        "is frozen (a parent waiting for its vfork child?), and someone else froze "
                        "that cgroup; thaw it and dump again")
                cg.thaw()
                thaw_cg = False
                ft.cgroup = cg              # thawed early: the way out still goes through it
                slow = None
        while True:
            ft.table = scan()
            if root not in ft.table:
                raise ProcessGoneError(f"process {root} does not exist (or exited)")
            if ft.table[root].state in "ZX":
                raise ProcessGoneError(f"process {root} has exited (it is a zombie)")
            found, ft.orphans = members(root, ft.table, init) if whole else ([root], set())
            new = [p for p in found if p not in ft.frozen and p not in ft.zombies]
            if not new:
                # processes that exited meanwhile (and were reaped) leave the tree
                ft.order = found
                ft.zombies &= set(found)
                for gone in set(ft.frozen) - set(found):
                    ft.frozen.pop(gone).thaw()
                break
            ft.rounds += 1
            if ft.rounds > MAX_ROUNDS:
                raise KernelError(
                    f"the process tree of {root} forks faster than it can be frozen: after "
                    f"{MAX_ROUNDS} rounds ({len(ft.frozen)} processes stopped) new processes still "
                    "appear. Nothing was dumped and the tree runs on. Run the job in a cgroup v2 "
                    "of its own and dump with --freeze-cgroup, which stops it all at once")
            ft.stopped_at = ft.stopped_at or time.monotonic()
            for pid in new:
                e = ft.table[pid]
                fr = None if e.state in "ZX" else _freeze_member(pid, root, slow)
                if fr is None:
                    ft.zombies.add(pid)
                else:
                    ft.frozen[pid] = fr
        if cg is not None and thaw_cg:
            # every task is in its ptrace stop now: thawing the cgroup lets none of them run
            cg.thaw()
            ft.cgroup = cg
        return ft
    except BaseException:
        ft.order = list(ft.frozen)
        ft.thaw()
        if cg is not None and thaw_cg:
            try:
                cg.thaw()
            except HpcckptError:
                pass
        raise
