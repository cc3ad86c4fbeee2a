"""/proc parsing: what the kernel tells about a process without stopping it.

Laid out like psutil's _pslinux: one function per file, plain dataclasses out, and a
process that vanished turned into ProcessGoneError naming its PID.
"""
import ctypes
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ProcessGoneError
from .libc import PAGE_SIZE

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61  # page is a page-cache page or shared anonymous


def _read(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None


@dataclass
class Vma:
    start: int
    end: int
    prot: str            # "rwxp" / "rw-s" as in maps
    pgoff: int
    dev: str
    inode: int
    path: str            # "" for anonymous, "[heap]", "/lib/...", "/dev/zero (deleted)"
    vmflags: list[str] = field(default_factory=list)
    anon_kb: int = 0     # smaps "Anonymous:" and "Swap:" (0 when read from maps)
    swap_kb: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.prot[3] == "s"

    @property
    def special(self) -> bool:
        return self.path.startswith("[") and self.path not in ("[heap]", "[stack]")

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and not self.special


_HEX = frozenset("0123456789abcdef")
_MAPS_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def maps(pid: int, with_flags: bool = True) -> list[Vma]:
    """The mappings, with smaps' VmFlags when asked (they tell guard, dontfork, hugepage)."""
    text = _read(pid, "smaps" if with_flags else "maps")
    lines = text.splitlines()
    if with_flags:
        fast = _smaps_by_block(lines)
        if fast is not None:
            return fast
    return _parse_maps(lines)


def maps_since(pid: int, before: list[Vma]) -> list[Vma] | None:
    """The mappings now from /proc/PID/maps (no page walk: ~0.5 ms, where smaps walks
    every page table entry, ~7 ms per GiB), with smaps' fields carried over from
    `before`, an smaps read of a moment ago, for every mapping that is still there: same
    start, permissions, offset and file. One grown or shrunk in place (brk, mremap)
    keeps its VmFlags but not its page counts (zeroed: "not known to be populated").
    None when a mapping is new: only smaps tells its VmFlags.

    What this cannot see: VmFlags madvise changes in place (dontfork, wipeonfork,
    dontdump, hugepage) meanwhile; callers that need them exact check them again."""
    old = {v.start: v for v in before}
    vmas = _parse_maps(_read(pid, "maps").splitlines())
    for v in vmas:
        o = old.get(v.start)
        if o is None or (o.prot, o.pgoff, o.dev, o.inode, o.path) != (v.prot, v.pgoff, v.dev, v.inode, v.path):
            return None
        v.vmflags = o.vmflags
        if o.end == v.end:
            v.anon_kb, v.swap_kb = o.anon_kb, o.swap_kb
    return vmas


def _block(v: Vma, lines: list[str], at: int, anon: int, swap: int, flags: int) -> bool:
    """smaps' Anonymous, Swap and VmFlags of the mapping whose line is lines[at], read
    at their offsets in its block; False if a line is not the one expected there."""
    a, s, f = lines[at + anon], lines[at + swap], lines[at + flags]
    if not (a.startswith("Anonymous:") and s.startswith("Swap:") and f.startswith("VmFlags:")):
        return False
    v.anon_kb, v.swap_kb, v.vmflags = int(a.split()[1]), int(s.split()[1]), f.split()[1:]
    return True


def _smaps_by_block(lines: list[str]) -> list[Vma] | None:
    """smaps gives every mapping the same block of field lines (one kernel, one layout):
    their offsets are taken from the first block and each block read at them, checking
    the lines found (25 lookups for 25 mappings, not a test of each of ~600 lines, which
    cost 3 times the kernel's read). None when any block differs: the general parse."""
    if not lines or lines[0][:1] not in _HEX:
        return None
    try:
        size = next(i for i, line in enumerate(lines) if line.startswith("VmFlags:")) + 1
        anon = next(i for i in range(size) if lines[i].startswith("Anonymous:"))
        swap = next(i for i in range(size) if lines[i].startswith("Swap:"))
    except StopIteration:
        return None
    if len(lines) % size:
        return None
    vmas: list[Vma] = []
    for at in range(0, len(lines), size):
        m = _MAPS_RE.match(lines[at])
        if m is None:
            return None
        v = Vma(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5], int(m[6]), m[7])
        if not _block(v, lines, at, anon, swap, size - 1):
            return None
        vmas.append(v)
    return vmas


def _parse_maps(lines: list[str]) -> list[Vma]:
    """maps or smaps, line by line."""
    vmas: list[Vma] = []
    # a mapping's line starts with its (lowercase hex) address, smaps' fields under it
    # with a capital: dispatched on the first character
    for line in lines:
        c = line[:1]
        if c in _HEX:
            m = _MAPS_RE.match(line)
            if m:
                vmas.append(Vma(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5], int(m[6]), m[7]))
        elif not vmas:
            continue
        elif c == "V":
            if line.startswith("VmFlags:"):
                vmas[-1].vmflags = line.split()[1:]
        elif c == "A":
            if line.startswith("Anonymous:"):
                vmas[-1].anon_kb = int(line.split()[1])
        elif c == "S" and line.startswith("Swap:"):
            vmas[-1].swap_kb = int(line.split()[1])
    return vmas


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):   # ESRCH: exiting right now
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    out = {}
    for line in _read(pid, f"task/{tid}/status" if tid else "status").splitlines():
        k, _, v = line.partition(":")
        out[k] = v[1:] if k == "Name" else v.strip()    # a comm may end in spaces
    return out


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the comm (index 0 is the state)."""
    text = _read(pid, "stat")
    return text[text.rindex(")") + 2:].split()


def comm(pid: int, tid: int | None = None) -> str:
    path = f"task/{tid}/comm" if tid else "comm"
    return _read(pid, path).rstrip("\n")


def link(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except (FileNotFoundError, ProcessLookupError):   # ESRCH: exiting right now
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None


def personality(pid: int) -> int:
    return int(_read(pid, "personality"), 16)


def auxv(pid: int) -> bytes:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        return f.read()


def posix_timers(pid: int) -> str:
    return _read(pid, "timers")


def fds(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):   # ESRCH: exiting right now
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    """Key -> value; "lock" holds every lock: line (one per line: a dump reads each fd's
    fdinfo once, for its description and its locks)."""
    out = {}
    for line in _read(pid, f"fdinfo/{fd}").splitlines():
        k, _, v = line.partition(":")
        out[k] = out[k] + "\n" + v.strip() if k == "lock" and k in out else v.strip()
    return out


def pagemap(pid: int, start: int, end: int) -> np.ndarray:
    """The pagemap entries (u64 each) for [start, end)."""
    n = (end - start) // PAGE_SIZE
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
            buf = bytearray(n * 8)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                k = f.readinto(view[got:]) if f.seek(start // PAGE_SIZE * 8 + got) >= 0 else 0
                if not k:
                    break
                got += k
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None
    return np.frombuffer(buf, dtype=np.uint64, count=got // 8)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a boolean array as (first index, length)."""
    return address_runs(mask, 0, 1)


def address_runs(mask: np.ndarray, start: int, unit: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """Runs of True in a per-page mask of the memory at `start`, as (address, bytes);
    made by numpy and converted once (a run made one by one from numpy scalars costs
    ~1 us: 60 ms for a plan of 10% of 4 GiB rewritten at random)."""
    if not mask.any():
        return []
    m = np.concatenate(([False], mask, [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    return list(zip((d[::2] * unit + start).tolist(), ((d[1::2] - d[::2]) * unit).tolist()))


def ns_pids(pid: int, tid: int | None = None) -> list[int]:
    """The PID in each nested PID namespace, outermost first (NSpid)."""
    st = _read(pid, f"task/{tid}/status" if tid else "status")
    for line in st.splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return [tid or pid]


def status_ns_pids(st: dict[str, str], pid: int) -> list[int]:
    """ns_pids from a status() already read (of `pid`, a process or a thread)."""
    return [int(x) for x in st["NSpid"].split()] if "NSpid" in st else [pid]


def status_comm(st: dict[str, str], pid: int, tid: int | None = None) -> str:
    """comm from a status() already read: its Name, which the kernel escapes (\\n, \\\\)
    only where comm has a control character or a backslash; comm() read then."""
    name = st.get("Name")
    return name if name is not None and "\\" not in name else comm(pid, tid)


RLIM_INFINITY = (1 << 64) - 1


def limits(pid: int) -> list[tuple[int, int]]:
    """(soft, hard) of every resource limit, RLIMIT_CPU (0) .. RLIMIT_RTTIME (15), in the
    kernel's own units: /proc/PID/limits prints them in resource order, "%-25s %-20s %-20s",
    so a dump needs no prlimit64 injected into the process (16 round trips) to know them."""
    out = []
    for line in _read(pid, "limits").splitlines()[1:]:
        soft, hard = line[26:46].strip(), line[47:67].strip()
        out.append(tuple(RLIM_INFINITY if v == "unlimited" else int(v) for v in (soft, hard)))
    return out


def robust_list(tid: int) -> tuple[int, int]:
    """(head, len) of a thread's robust futex list: get_robust_list takes a TID, so it
    is asked from here (ptrace-read access suffices), not injected."""
    from .arch import current
    from .libc import raw_syscall
    head, size = ctypes.c_uint64(), ctypes.c_uint64()
    try:
        raw_syscall(current.SYSCALLS["get_robust_list"], tid, ctypes.addressof(head), ctypes.addressof(size))
    except OSError as e:
        if e.errno == 3:
            raise ProcessGoneError(f"thread {tid} does not exist (or exited)") from None
        raise
    return head.value, size.value


def signal_set(st: dict[str, str], key: str) -> set[int]:
    """Signal numbers of a /proc/PID/status mask line (SigCgt, SigIgn, SigBlk, ...)."""
    mask = int(st.get(key, "0"), 16)
    return {s + 1 for s in range(64) if mask >> s & 1}
