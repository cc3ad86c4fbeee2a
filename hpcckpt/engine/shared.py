"""What processes of a tree share: open file descriptions and shared memory objects.

fork() gives the child the parent's open file descriptions, not copies: one file
position, one set of flags. The image keeps that by giving every description a file id;
fds (in any process) with the same id are one description, found with
kcmp(KCMP_FILE) among fds that lead to the same inode. A pipe is "inside" the tree when
both its ends are. Shared memory objects (MAP_SHARED|MAP_ANONYMOUS, memfd, /dev/shm
files) are keyed by their inode, saved once, and restored as one object mapped by each.
"""
import functools
import os
import stat
from dataclasses import dataclass, field

from ..errors import ProcessGoneError
from ..kernel import proc
from ..kernel.arch import current as arch
from ..kernel.libc import raw_syscall

KCMP_FILE = 0
O_ACCMODE = 0o3


def same_description(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    try:
        return raw_syscall(arch.SYSCALLS["kcmp"], pid1, pid2, KCMP_FILE, fd1, fd2) == 0
    except OSError:
        return False


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> int:
    """kcmp(KCMP_FILE): 0 the same description, 1 or 2 an order between them (as CRIU uses
    it); 3 (incomparable) if either is gone."""
    try:
        return raw_syscall(arch.SYSCALLS["kcmp"], pid1, pid2, KCMP_FILE, fd1, fd2)
    except OSError:
        return 3


def _cmp(a: tuple[int, int], b: tuple[int, int]) -> int:
    r = kcmp_file(a[0], a[1], b[0], b[1])
    return 0 if r == 0 else -1 if r == 1 else 1 if r == 2 else (a > b) - (a < b)


_kcmp_key = functools.cmp_to_key(_cmp)


@dataclass
class FdRef:
    """One fd of one process (host PID), with what /proc says about it."""
    pid: int
    fd: int
    target: str
    st: os.stat_result
    info: dict[str, str]

    @property
    def flags(self) -> int:
        return int(self.info["flags"], 8)


@dataclass
class Descriptions:
    """Every fd of every process of the tree, grouped into open file descriptions."""
    fds: dict[tuple[int, int], FdRef] = field(default_factory=dict)
    ids: dict[tuple[int, int], int] = field(default_factory=dict)
    pipe_modes: dict[int, set[int]] = field(default_factory=dict)   # pipe inode -> access modes
    _saved: set = field(default_factory=set)
    cache: dict = field(default_factory=dict)       # per-dump lookups (sockets.py: sock_diag tables)
    notes: list[str] = field(default_factory=list)  # what the dump left out, for the caller to show
    _outside: set[str] | None = None    # fd targets (pipe:[ino], FIFO paths) held outside the tree
    parents: dict[int, int] = field(default_factory=dict)   # PID -> parent's, where the caller knows

    @classmethod
    def collect(cls, pids: list[int]) -> "Descriptions":
        d = cls()
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for pid in pids:
            for fd in proc.fds(pid):
                try:
                    target = proc.link(pid, f"fd/{fd}")
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    info = proc.fdinfo(pid, fd)
                except (FileNotFoundError, ProcessGoneError):
                    continue  # closed under us: the frozen process cannot, so a race with exit
                ref = FdRef(pid, fd, target, st, info)
                d.fds[(pid, fd)] = ref
                groups.setdefault((st.st_dev, st.st_ino, target), []).append((pid, fd))
                if target.startswith("pipe:") or stat.S_ISFIFO(st.st_mode):
                    d.pipe_modes.setdefault(st.st_ino, set()).add(ref.flags & O_ACCMODE)
        next_id = 1
        for members in groups.values():
            # kcmp orders descriptions, so sorting by it groups equal ones next to each
            # other in O(n log n) comparisons; comparing each fd with every description
            # found so far was O(n^2) (128 processes with /dev/null open: 16k kcmp calls)
            ordered = sorted(members, key=_kcmp_key) if len(members) > 1 else members
            prev = None
            for key in ordered:
                if prev is None or not same_description(prev[0], prev[1], key[0], key[1]):
                    next_id += prev is not None
                d.ids[key] = next_id
                prev = key
            next_id += 1
        # ids in order of first appearance (process order, then fd), as before
        rank = {p: i for i, p in enumerate(pids)}
        order: dict[int, int] = {}
        for key in sorted(d.ids, key=lambda k: (rank[k[0]], k[1])):
            order.setdefault(d.ids[key], len(order) + 1)
        d.ids = {k: order[v] for k, v in d.ids.items()}
        return d

    def of(self, pid: int) -> list[tuple[int, FdRef]]:
        """(fd, FdRef) of one process, by fd (a tree's dump asks for each process's in
        turn: sorting every fd of the tree each time grew with the square of its size)."""
        by_pid = self.cache.get("by-pid")
        if by_pid is None:
            by_pid = self.cache["by-pid"] = {}
            for (p, fd), ref in sorted(self.fds.items()):
                by_pid.setdefault(p, []).append((fd, ref))
        return by_pid.get(pid, [])

    def pipe_inside(self, ino: int) -> bool:
        """Both ends of the pipe are held by processes of the tree, or the end the tree
        lacks is closed everywhere (make hands its jobs such a pipe as stdin)."""
        modes = self.pipe_modes.get(ino, set())
        if os.O_RDWR in modes or {os.O_RDONLY, os.O_WRONLY} <= modes:
            return True
        if self._outside is None:   # one pass over /proc for the whole dump, not one per pipe
            wanted = self.half_pipes()
            # `outside-before`: (targets looked for, those found) by a pass while the tree ran
            looked, found = self.cache.get("outside-before", (set(), set()))
            rest = wanted - looked
            self._outside = (found & wanted) | (_held_outside(rest, {p for p, _ in self.fds}, self.parents)
                                                if rest else set())
        return self.pipe_target(ino) not in self._outside

    def half_pipes(self) -> set[str]:
        """Targets of the pipes and FIFOs of which the tree holds one end only."""
        return {self.pipe_target(i) for i, m in self.pipe_modes.items()
                if not (os.O_RDWR in m or {os.O_RDONLY, os.O_WRONLY} <= m)}

    def pipe_target(self, ino: int) -> str:
        """What /proc shows an fd of pipe `ino` lead to: pipe:[ino], or a FIFO's path."""
        for ref in self.fds.values():
            if ref.st.st_ino == ino and stat.S_ISFIFO(ref.st.st_mode):
                return ref.target
        return f"pipe:[{ino}]"

    def first(self, what: object) -> bool:
        """True the first time `what` is asked about: save shared content only once."""
        if what in self._saved:
            return False
        self._saved.add(what)
        return True


def outside_before(pids: list[int]) -> tuple[set[str], set[str]]:
    """The pass over /proc for pipes held outside the tree (pipe_inside), made before the
    freeze (up to ~10 ms on a busy node): who else holds a pipe changes as freely while
    the tree is stopped as before. Pipes the tree opens meanwhile are looked for then."""
    try:
        wanted = Descriptions.collect(pids).half_pipes()
    except (ProcessGoneError, OSError):   # the tree changes as it runs: all left to the frozen pass
        return set(), set()
    return wanted, _held_outside(wanted, set(pids))


def _held_outside(wanted: set[str], tree: set[int], known: dict[int, int] | None = None) -> set[str]:
    """Which of the fd targets `wanted` (pipe:[ino], a FIFO's path) some process outside
    `tree` (other than us) has an fd leading to. One scan of /proc for them all (a tree
    of 128 processes with a pipe each scanned it 128 times, ~10 ms each on a busy node),
    the tree's parents first (the launcher holding its stdio pipes), stopping once every
    one is found."""
    me = os.getpid()
    out: set[str] = set()
    parents = []
    for pid in sorted(tree):
        if known and pid in known:      # `known`: parents the caller read already
            parents.append(known[pid])
            continue
        try:
            parents.append(int(proc.stat_fields(pid)[1]))
        except (ProcessGoneError, IndexError, ValueError):
            continue
    first = [p for p in dict.fromkeys(parents) if p not in tree and p != me]
    rest = (int(n) for n in os.listdir("/proc") if n.isdigit())
    for pid in (*first, *rest):
        if not wanted - out:
            break
        if pid in tree or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in wanted:
                out.add(link)
    return out


def is_shared_object(v: proc.Vma) -> bool:
    """A shared mapping whose memory lives in a tmpfs/shmem object we must save."""
    return v.shared and v.inode != 0 and not v.path.startswith("/SYSV") and (
        v.path.startswith(("/dev/zero", "/memfd:", "/dev/shm/")) or v.path.endswith(" (deleted)"))


def named_shm_path(path: str) -> str:
    """The /dev/shm file a restore recreates, or '' for anonymous objects."""
    return path if path.startswith("/dev/shm/") and not path.endswith(" (deleted)") else ""


def object_size(pid: int, v: proc.Vma) -> int:
    return os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}").st_size


def save_object(pid: int, v: proc.Vma, dest) -> int:
    """Copy a shared memory object's whole content into `dest`; returns its size."""
    fd = os.open(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}", os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with open(dest, "wb") as out:
            off = 0
            while off < size:
                chunk = os.pread(fd, min(4 << 20, size - off), off)
                if not chunk:
                    break
                out.write(chunk)
                off += len(chunk)
            out.truncate(size)
        return size
    finally:
        os.close(fd)
