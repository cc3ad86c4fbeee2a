"""Sessions whose leader is gone: a daemon's session after the leader exited.

A classic daemon forks, calls setsid() in the child (the session's leader, also leader of
its process group), forks again and lets the leader exit: the grandchild goes on in a
session (and group) whose leader is dead, adopted by the namespace's init. A session id
can only be made by setsid() in a process whose PID is that id, so (as CRIU does) the
restore creates a helper at the session's PID, under the root, that calls setsid() and
forks the session's orphans, then exits and is reaped: the orphans are in the session
and group of that PID, led by nobody, exactly as before.

Only this shape is taken: members of a leaderless session are orphans adopted by the
namespace's init (or their descendants), and their group is either the dead leader's
(pgid = sid) or one led by a member. Anything else is refused as before.
"""
from ..errors import UnsupportedError
from ..images import pb
from ..kernel import proc


def ns_ids(pid: int) -> tuple[int, int]:
    """(process group, session) as the process's innermost PID namespace numbers them."""
    st = proc.status(pid)
    return int(st["NSpgid"].split()[-1]), int(st["NSsid"].split()[-1])


def under_orphan(ft, pid: int) -> bool:
    """`pid` is an orphan of the tree's namespace init, or descends from one."""
    seen = set()
    while pid in ft.table and pid not in seen:
        if pid in ft.orphans:
            return True
        seen.add(pid)
        pid = ft.table[pid].ppid
    return False


def leaderless(ft, pid: int, p: pb.Process, sid_host: int, pgid_host: int) -> bool:
    """Fill in p.sid (and p.pgid where it is the dead leader's group) for a member of a
    session whose leader has exited; False if that is not the case here."""
    if sid_host in ft.table or p.zombie or not under_orphan(ft, pid):
        return False
    pgid, sid = ns_ids(pid)
    p.sid = sid
    if pgid_host == sid_host:
        p.pgid = sid
    return True


def check(procs: list[pb.Process]) -> dict[int, list[pb.Process]]:
    """The orphans to create under a helper, by the (leaderless) session they are in.
    Members that are not orphans descend from one and inherit the session by fork."""
    pids = {p.pid for p in procs}
    out: dict[int, list[pb.Process]] = {}
    for p in procs:
        if p.sid and p.sid not in pids:
            if p.orphan:
                out.setdefault(p.sid, []).append(p)
            if p.pgid and p.pgid not in pids and p.pgid != p.sid:
                raise UnsupportedError(f"process {p.pid}: process group {p.pgid} has no member to lead it")
    return out
