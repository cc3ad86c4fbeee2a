"""Open files: what each descriptor is, and how to give it back.

Files open for writing are rolled back to their size at the checkpoint on restore
(policy per path: rollback, keep or refuse), so a resumed job's output holds each line
once. stdin/stdout/stderr that lead outside the process (a terminal, a pipe, a socket)
are handed the restore command's own, as CRIU's --shell-job does.
"""
import ctypes
import fcntl
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RestoreError, UnsupportedError
from ..images import pb
from ..kernel.libc import libc, pidfd_getfd, pidfd_open
from . import eventfds, fsnotify, locks, sockets, ttys

O_ACCMODE = 0o3
O_CLOEXEC = 0o2000000
O_CREAT, O_EXCL, O_TRUNC, O_DIRECTORY, O_TMPFILE = 0o100, 0o200, 0o1000, 0o200000, 0o20200000
F_GETPIPE_SZ, F_SETPIPE_SZ = 1032, 1031
SPLICE_F_NONBLOCK = 2
TTY_MAJORS = {4, 5} | set(range(136, 144))
SAFE_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}

libc.tee.restype = ctypes.c_ssize_t
libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]

POLICY_NAMES = {"rollback": pb.ROLLBACK, "keep": pb.KEEP, "refuse": pb.REFUSE}


@dataclass
class FilePolicies:
    """What to do with files open for writing, by path prefix (longest match wins)."""
    rules: dict[str, int] = field(default_factory=dict)
    shell_job: bool = False   # terminals held outside the tree are the restore's own (ttys.py)

    @classmethod
    def parse(cls, specs: list[str]) -> "FilePolicies":
        rules = {}
        for spec in specs or []:
            path, _, name = spec.rpartition("=")
            if not path or name not in POLICY_NAMES:
                raise ValueError(f"bad file policy {spec!r}: use PATH=rollback|keep|refuse")
            rules[os.path.abspath(path)] = POLICY_NAMES[name]
        return cls(rules)

    def for_path(self, path: str) -> int:
        best = max((p for p in self.rules if path == p or path.startswith(p.rstrip("/") + "/")),
                   key=len, default=None)
        return self.rules[best] if best else pb.ROLLBACK


def tee_pipe(src: int) -> bytes:
    """The unread bytes of the pipe `src` (an fd of ours), left in the pipe."""
    r, w = os.pipe()
    try:
        size = fcntl.fcntl(src, F_GETPIPE_SZ)
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
        n = libc.tee(src, w, size, SPLICE_F_NONBLOCK)
        out = b""
        while len(out) < max(n, 0):
            out += os.read(r, n - len(out))
        return out
    finally:
        for x in (r, w):
            os.close(x)


def dump_fds(pid: int, images: Path, policies: FilePolicies, descs=None) -> list[pb.Fd]:
    """Describe every open descriptor; refuse kinds we cannot restore, naming them.

    `descs` (shared.Descriptions of the whole tree) says which fds share a description
    and which pipes have both ends inside the tree; content shared by several fds
    (pipe data, a deleted file) is saved with the first of them only.
    """
    from .shared import Descriptions
    if descs is None:
        descs = Descriptions.collect([pid])
    out = []
    pidfd = -1      # one for all of the process's pipes

    def local(fd: int) -> int:
        """The process's fd `fd`, duplicated into ours."""
        nonlocal pidfd
        if pidfd < 0:
            pidfd = pidfd_open(pid)
        return pidfd_getfd(pidfd, fd)
    try:
        for fd, ref in descs.of(pid):
            out.append(_describe(pid, fd, ref, images, policies, descs, local))
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return out


def _describe(pid: int, fd: int, ref, images: Path, policies: FilePolicies, descs, local) -> pb.Fd:
    """One fd of dump_fds; `local(fd)` gives a copy of the process's fd (ours to close)."""
    t, st, info = ref.target, ref.st, ref.info
    flags = ref.flags
    fid = descs.ids[(pid, fd)]
    e = pb.Fd(fd=fd, flags=flags & ~O_CLOEXEC, cloexec=bool(flags & O_CLOEXEC),
              pos=int(info.get("pos", 0)), path=t, file_id=fid)
    leads_out = (t.startswith("pipe:") and not descs.pipe_inside(st.st_ino)) or (
        t.startswith("socket:") and not sockets.pair_inside(descs, st.st_ino)) or (
        stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in TTY_MAJORS)
    if ttys.kind_of(st):
        ttys.describe_fd(e, pid, fd, st, info, descs, policies.shell_job)
    elif fd <= 2 and leads_out:
        e.kind = pb.INHERITED
    elif t in eventfds.TARGETS:
        eventfds.describe(e, t, info, pid, descs.first(("desc", fid)))
    elif t in fsnotify.TARGETS:
        fsnotify.describe(e, t, pid, descs.first(("desc", fid)), descs.notes)
    elif t.startswith("socket:"):
        sockets.describe(e, pid, st.st_ino, descs, descs.first(("sock", fid)))
    elif t.startswith("pipe:") or (stat.S_ISFIFO(st.st_mode) and t.startswith("/")
                                    and not t.endswith(" (deleted)")):
        if not descs.pipe_inside(st.st_ino):
            raise UnsupportedError(
                f"process {pid}: fd {fd} is a {'pipe' if t.startswith('pipe:') else 'FIFO'} ({t}) "
                "leading outside the process tree; only pipes and FIFOs with both ends inside "
                "the tree are supported so far")
        e.kind = pb.PIPE
        e.pipe_id = st.st_ino
        x = local(fd)
        try:
            e.pipe_size = fcntl.fcntl(x, F_GETPIPE_SZ)
            if flags & O_ACCMODE != os.O_WRONLY and descs.first(("pipe", st.st_ino)):
                e.pipe_data = tee_pipe(x)
        finally:
            os.close(x)
    elif stat.S_ISREG(st.st_mode):
        e.size, e.mtime_ns, e.mode = st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)
        if st.st_nlink == 0:
            e.kind = pb.DELETED_FILE
            e.data_file = f"file-{fid}.data"
            if descs.first(("file", fid)):
                with open(f"/proc/{pid}/fd/{fd}", "rb") as src, open(images / e.data_file, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        else:
            e.kind = pb.REGULAR
            e.policy = policies.for_path(t) if flags & O_ACCMODE else pb.KEEP
    elif stat.S_ISDIR(st.st_mode):
        e.kind = pb.DIRECTORY
    elif stat.S_ISCHR(st.st_mode) and t in SAFE_DEVICES:
        e.kind = pb.CHAR_DEVICE
    else:
        kind = t.split(":", 1)[0] if ":" in t else stat.filemode(st.st_mode)
        if t.startswith("anon_inode:"):
            kind = t.split(":", 1)[1].strip("[]")
        raise UnsupportedError(
            f"process {pid}: fd {fd} is a {kind} ({t}), which hpcckpt cannot checkpoint yet")
    e.locks.extend(locks.parse(pid, fd, t, info["lock"].splitlines() if "lock" in info else []))
    return e


def check_files(fds: list[pb.Fd]) -> None:
    """Before a restore touches anything: every file is there and may be rolled back."""
    for e in fds:
        if e.kind == pb.PIPE and e.path.startswith("/"):
            try:
                if not stat.S_ISFIFO(os.stat(e.path).st_mode):
                    raise RestoreError(f"fd {e.fd}: {e.path} is no FIFO on this node any more")
            except FileNotFoundError:
                raise RestoreError(f"fd {e.fd}: FIFO {e.path} is missing on this node") from None
        if e.kind not in (pb.REGULAR, pb.DIRECTORY, pb.CHAR_DEVICE):
            continue
        try:
            st = os.stat(e.path)
        except FileNotFoundError:
            raise RestoreError(f"fd {e.fd}: file {e.path} is missing on this node") from None
        if e.kind != pb.REGULAR or e.flags & O_ACCMODE == os.O_RDONLY:
            continue
        if e.policy == pb.REFUSE and (st.st_size != e.size or st.st_mtime_ns != e.mtime_ns):
            raise RestoreError(
                f"fd {e.fd}: {e.path} changed since the checkpoint ({e.size} -> {st.st_size} bytes) "
                "and its policy is 'refuse'")
        if e.policy == pb.ROLLBACK and st.st_size < e.size:
            raise RestoreError(
                f"fd {e.fd}: {e.path} is shorter ({st.st_size} bytes) than at the checkpoint "
                f"({e.size}); it cannot be rolled back. Restore it, or use policy 'keep'")
