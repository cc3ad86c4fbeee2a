"""Freezing a tree through its cgroup v2 (cgroup.freeze), as CRIU's --freeze-cgroup does.

ptrace alone stops a tree one process at a time, and a process not yet stopped may fork;
a fork bomb can outrun it. A frozen cgroup cannot fork at all: every task stops at once.
The dump then seizes and interrupts every task while the cgroup is frozen (on cgroup v2
a frozen task enters the ptrace stop at once; the kernel counts a ptrace stop as frozen),
and thaws the cgroup only when every task is in its ptrace stop, so no task ever runs
while others are stopped. On the way out the cgroup is frozen again before the tasks are
detached, and thawed when all are: the tree starts again as one.

Only cgroup v2 is handled (the v1 freezer stops tasks where a ptrace interrupt cannot
reach them until thawed). Auto-detection: the root's v2 cgroup (not the root cgroup)
holding exactly the processes of the tree.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HpcckptError, KernelError, ProcessGoneError

FREEZE_TIMEOUT = 10.0


def v2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid
    systems), or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def v2_cgroup_of(pid: int) -> str | None:
    """The v2 cgroup of `pid` ("/a/b"), from its "0::" line of /proc/PID/cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None
    return None


@dataclass
class CgroupFreezer:
    """One cgroup v2 directory and its freezer."""
    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CgroupFreezer":
        p = Path(path)
        if not p.is_absolute():
            mnt = v2_mount()
            p = (mnt / str(path).lstrip("/")) if mnt else p
        if not (p / "cgroup.freeze").exists():
            raise KernelError(
                f"{path} is not a cgroup v2 directory with a freezer (no cgroup.freeze there); "
                "name the job's own cgroup under the cgroup2 mount"
                + (f" ({v2_mount()})" if v2_mount() else ""))
        return cls(p)

    def processes(self) -> set[int]:
        """Every process in the cgroup and its descendants."""
        out: set[int] = set()
        for d, _, _ in os.walk(self.path):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    out.update(int(x) for x in f.read().split())
            except FileNotFoundError:
                continue   # a child cgroup removed while we walked
        return out

    def is_frozen(self) -> bool:
        with open(self.path / "cgroup.events") as f:
            for line in f:
                if line.startswith("frozen "):
                    return line.split()[1] == "1"
        return False

    def _write(self, value: str) -> None:
        try:
            with open(self.path / "cgroup.freeze", "w") as f:
                f.write(value)
        except OSError as e:
            raise KernelError(f"cannot {'freeze' if value == '1' else 'thaw'} cgroup {self.path}: "
                              f"{e.strerror}") from None

    def requested(self) -> bool:
        """cgroup.freeze: has someone (maybe not us) asked for the cgroup to be frozen?"""
        with open(self.path / "cgroup.freeze") as f:
            return f.read().strip() == "1"

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze and wait until the kernel says every task is frozen; on timeout the
        cgroup is thawed again and the error names it."""
        self._write("1")
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not self.is_frozen():
            if time.monotonic() > deadline:
                self.thaw()
                raise KernelError(f"cgroup {self.path} did not freeze within {timeout:.0f} s "
                                  "(a task stuck in the kernel?); it was thawed, nothing dumped")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def thaw(self) -> None:
        self._write("0")


def _under(rel: str, cg: str | None) -> bool:
    return cg is not None and (cg == rel or cg.startswith(rel.rstrip("/") + "/"))


def _descends(pid: int, root: int) -> bool | None:
    """Is `pid` `root` or below it? None if it is gone."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        pid = int(text[text.rindex(")") + 2:].split()[1])
        seen += 1
    return pid == root


def for_tree(root: int, members: set[int]) -> CgroupFreezer | None:
    """The root's own v2 cgroup if it holds exactly the tree (`members`, as a listing
    just made saw it), else None. The tree may fork and reap meanwhile: a process in one
    listing but not the other is looked at again on its own."""
    mnt = v2_mount()
    if mnt is None:
        return None
    try:
        rel = v2_cgroup_of(root)
    except HpcckptError:
        return None
    if not rel or rel == "/":
        return None
    try:
        cg = CgroupFreezer.open(mnt / rel.lstrip("/"))
        procs = cg.processes()
    except (HpcckptError, OSError):
        return None
    for pid in members - procs:         # exited since (gone), or outside the cgroup
        try:
            if not _under(rel, v2_cgroup_of(pid)):
                return None
        except HpcckptError:
            continue
    for pid in procs - members:         # forked since (below the root), or an outsider
        if _descends(pid, root) is False:
            return None
    return cg


JOB_PREFIX = "hpcckpt-job-"


def job_cgroup() -> CgroupFreezer | None:
    """A cgroup v2 of its own for `hpcckpt run`'s job, under the runner's cgroup, so its
    dumps freeze it through cgroup.freeze (found automatically: it holds exactly the
    tree). None where we may not make one (no v2, no permission, no delegation): the
    dumps then use ptrace alone, as before."""
    mnt = v2_mount()
    if mnt is None:
        return None
    try:
        rel = v2_cgroup_of(os.getpid()) or "/"
        parent = mnt / rel.lstrip("/")
        _sweep(parent)
        path = parent / f"{JOB_PREFIX}{os.getpid()}"
        path.mkdir()
    except (HpcckptError, OSError):
        return None
    if not (path / "cgroup.freeze").exists():
        remove(CgroupFreezer(path))
        return None
    return CgroupFreezer(path)


def _sweep(parent: Path) -> None:
    """Remove the empty job cgroups of runners that are gone (one killed with SIGKILL
    cannot remove its own); a live runner's, or one still holding tasks, stays."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(JOB_PREFIX)]
    except OSError:
        return
    for name in names:
        owner = name[len(JOB_PREFIX):]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            try:
                os.rmdir(parent / name)    # fails (EBUSY) while any task is in it
            except OSError:
                pass


def join(cg: CgroupFreezer, pids: list[int] | None = None) -> bool:
    """Move `pids` (default: the caller) into the cgroup; False if the kernel refused
    any (a zombie cannot move; the others still do)."""
    ok = True
    for pid in pids or [os.getpid()]:
        try:
            with open(cg.path / "cgroup.procs", "w") as f:
                f.write(str(pid))
        except OSError:
            ok = False
    return ok


def remove(cg: CgroupFreezer, timeout: float = 2.0) -> None:
    """rmdir once its tasks are gone (they leave it as they finish exiting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cg.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
