"""Moving a process to another node without a shared filesystem.

The source freezes the process and dumps it straight into a TCP connection to the
destination node's hpcckptd (outgoing.py, engine/streamdump.py), authenticated by munge;
the destination restores it as the sender's uid while the pages still arrive
(arrival.py), checks every file against its digest, and only then, once the source has
killed its frozen copy, lets it run. If the destination refuses or fails, the process is
thawed on the source and runs on: a failed migration never loses the job, and the job
never runs in two places.

On the destination the bytes go from the socket into the staging file by splice, never
through Python. It stages in memory (/dev/shm) when the image fits, and starts the
restore's worker as soon as the sender is authenticated, so its start overlaps the transfer.
"""
import errno
import fcntl
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path

from ..errors import HpcckptError, PermissionDeniedError
from ..images import service_pb2 as spb
from . import framing, munge
from .arrival import ARRIVED
from .outgoing import Outgoing, binding

CHUNK = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
MAX_FILES = 100000
MAX_TOTAL = 1 << 42
F_SETPIPE_SZ = 1031
IDLE_TIMEOUT = 120         # seconds a sender may stall mid-file
MEMORY_SHARE = 0.5         # stage in /dev/shm while the image takes at most this share of its free space


def _order(p: Path) -> tuple[int, str]:
    """Metadata first, pages last: the destination can start on what it needs first."""
    return (p.name.startswith("pages-"), p.name)


def request_for(images: Path) -> spb.MigrateRequest:
    files = sorted((p for p in images.iterdir() if p.is_file()), key=_order)
    return spb.MigrateRequest(files=[spb.MigrateFile(name=p.name, size=p.stat().st_size) for p in files])


def staging_dir(spool: Path, total: int) -> Path:
    """Where arriving images wait for their restore: memory (/dev/shm) when they fit in a
    share of it, so the restore reads them from the page cache; else the spool on disk."""
    shm = Path("/dev/shm")
    try:
        if total <= shutil.disk_usage(shm).free * MEMORY_SHARE:
            return shm
    except OSError:
        pass
    spool.mkdir(parents=True, exist_ok=True)
    return spool


def authenticate(req: spb.MigrateRequest, munge_socket: str | None) -> munge.Identity:
    """The sender's identity from its munge credential; the request's limits and names."""
    who = munge.decode(req.credential, binding(req), munge_socket)
    if len(req.files) > MAX_FILES or sum(f.size for f in req.files) > MAX_TOTAL:
        raise PermissionDeniedError("migration request is larger than this node accepts")
    for f in req.files:
        if not NAME_RE.match(f.name):
            raise PermissionDeniedError(f"migration names a file {f.name!r} that is not a plain image file name")
    if len({f.name for f in req.files}) != len(req.files):
        raise PermissionDeniedError("migration names a file twice")
    return who


class Receiver:
    """Takes the files of an authenticated migration into a fresh directory owned by the
    sender, in the order sent: `until_pages()` the metadata, then `rest()` the page files,
    which a restore may already be reading (arrival.py); ARRIVED marks the end."""

    def __init__(self, conn: socket.socket, req: spb.MigrateRequest, who: munge.Identity, spool: Path):
        self.conn, self.files, self.who = conn, list(req.files), who
        self.digests_follow = req.digests_follow
        total = sum(f.size for f in req.files)
        self.path = Path(tempfile.mkdtemp(prefix=f"hpcckpt-migrate-{who.uid}-", dir=staging_dir(spool, total)))
        os.chown(self.path, who.uid, who.gid)
        self.next = 0
        # splice needs a blocking socket (Python's timeouts make it non-blocking): the
        # kernel's receive timeout bounds a stalled sender instead
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", IDLE_TIMEOUT, 0))
        self.splicer = _Splicer(conn)

    def until_pages(self) -> list[str]:
        """Receive up to the first page file; the names still to come if only page files
        follow (a restore may start now), else everything is received and []."""
        rest = self.files
        while self.next < len(rest) and not rest[self.next].name.startswith("pages-"):
            self._one(rest[self.next])
        late = [f.name for f in rest[self.next:]]
        if not all(n.startswith("pages-") for n in late):
            self.rest()
            return []
        return late

    def rest(self) -> None:
        """The rest of the files, then (a streamed dump's) the page digests; ARRIVED holds
        those, written whole before it appears."""
        while self.next < len(self.files):
            self._one(self.files[self.next])
        self.splicer.close()
        trailer = self._trailer() if self.digests_follow else b""
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        tmp = self.path / (ARRIVED + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, trailer)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / ARRIVED)

    def _trailer(self) -> bytes:
        """The MigrateTrailer after the last byte: one digest for every page file, no more."""
        try:
            payload = framing.read_frame(framing.sock_reader(self.conn))
        except BlockingIOError:
            raise framing.ProtocolError(f"the sender sent no page digests for {IDLE_TIMEOUT} s") from None
        if payload is None:
            raise framing.ProtocolError("connection closed before the page files' digests")
        t = framing.decode(spb.MigrateTrailer, payload)
        want = {f.name for f in self.files if f.name.startswith("pages-")}
        names = [d.name for d in t.pages]
        if sorted(names) != sorted(want) or len(set(names)) != len(names):
            raise framing.ProtocolError("the page digests after the stream name other files than its page files")
        return payload

    def _one(self, f: spb.MigrateFile) -> None:
        """One file, under a temporary name until it is the sender's: a restore reading it
        as it arrives never sees it owned by anyone else."""
        tmp = self.path / f".{f.name}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchown(fd, self.who.uid, self.who.gid)
            os.rename(tmp, self.path / f.name)
            self.splicer.copy(fd, f.size, f.name)
        finally:
            os.close(fd)
        self.next += 1

    def abort(self) -> None:
        """The stream failed: everything goes, which also ends a restore waiting for it."""
        self.splicer.close()
        shutil.rmtree(self.path, ignore_errors=True)


class _Splicer:
    """Socket to file without passing the bytes through Python: splice() into a pipe and
    from it into the file (the kernel moves page references, then copies once into the
    file's pages). Falls back to recv_into + write where splice is refused."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass
        self.buf = None

    def close(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            os.close(self.w)
            self.r = self.w = -1

    def copy(self, fd: int, size: int, name: str) -> None:
        left = size
        sock = self.conn.fileno()
        while left > 0:
            try:
                n = os.splice(sock, self.w, min(left, CHUNK), flags=os.SPLICE_F_MOVE)
            except BlockingIOError:
                raise framing.ProtocolError(f"the sender stopped sending {name} ({left} bytes still to come) "
                                            f"for {IDLE_TIMEOUT} s") from None
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                return self._copy_slow(fd, left, name)
            if n == 0:
                raise framing.ProtocolError(f"connection closed with {left} bytes of {name} still to come")
            left -= n
            while n:
                n -= os.splice(self.r, fd, n, flags=os.SPLICE_F_MOVE)

    def _copy_slow(self, fd: int, left: int, name: str) -> None:
        self.buf = self.buf or memoryview(bytearray(CHUNK))
        while left > 0:
            n = self.conn.recv_into(self.buf, min(left, CHUNK))
            if n == 0:
                raise framing.ProtocolError(f"connection closed with {left} bytes of {name} still to come")
            os.write(fd, self.buf[:n])
            left -= n


def migrate(pid: int, to: str, munge_socket: str | None = None, show_progress: bool = True,
            action=None, on_notify=None, tcp_established: bool = False, netns: bool = False,
            as_user: tuple[int, int] | None = None, check_frozen=None):
    """Move `pid` and its descendants to `to` (HOST:PORT); the destination's final answer.

    The tree is frozen and dumped straight into the connection (engine/streamdump.py): no
    local copy of its pages. It stays frozen here until the destination has restored it
    and checked every file against its digest (its "restored": built, not yet running);
    only then is it killed here, and only then does it run there. Any failure before that
    (refused, a broken stream, a bad digest there, a hook saying no) thaws it here: it runs
    on where it was, as it was, and MigrationFailed says why.

    `action` (an ActionScript, or any callable(stage, pid, images, node=...)) runs at the
    source's "frozen" and "dumped" and at the destination's "restored"; raising keeps the
    process here. `on_notify` sees the destination's notifications (its restore's
    progress). `as_user`: the munge credential is made as this (uid, gid), so the
    destination restores as that user (hpcckptd migrating a user's process);
    `check_frozen(pids)`: once the tree is frozen, may refuse it (hpcckptd: every member
    must be the caller's).
    `tcp_established`, `netns`: as for dump. With both, a server in a network namespace of
    its own moves with its address and keeps its connections (docs/architecture.md).
    """
    from ..engine.dump import dump
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit():
        raise HpcckptError(f"--to {to!r}: give HOST:PORT of the destination's hpcckptd --listen")
    out = Outgoing(host, int(port), munge_socket, as_user, on_notify)     # connected before we freeze
    base = "/dev/shm" if shutil.disk_usage("/dev/shm").free > (64 << 20) else None
    work = Path(tempfile.mkdtemp(prefix="hpcckpt-migrate-out-", dir=base))     # metadata only
    img = work / "img"

    def frozen(pids: list[int]) -> None:
        if check_frozen:
            check_frozen(pids)
        if action:
            action("frozen", pid, str(img))

    def dumped(path) -> None:        # every byte sent; the tree is still frozen here
        if action:
            action("dumped", pid, str(path))
        n = out.restored()
        if action:
            action("restored", n.pid, n.images, node=to)
        out.still_waiting()
        # returning lets the dump kill the tree here; the destination's copy runs after that
    try:
        try:
            dump(pid, img, leave_running=False, show_progress=show_progress, stream=out,
                 on_frozen=frozen, on_dumped=dumped, tcp_established=tcp_established, netns=netns)
        except BaseException as e:
            out.decline(str(e))
            if isinstance(e, (HpcckptError, OSError)):
                raise MigrationFailed(f"migration of process {pid} to {to} failed: {e}; "
                                      f"the process runs on here") from None
            raise
        try:
            if netns:            # gone here: its address must be nowhere but there before it runs
                _leave_node(img)
            return out.go()
        except HpcckptError as e:
            raise HpcckptError(f"process {pid} was handed over to {to} (it is gone here), but {e}: "
                               f"look for it there") from None
    finally:
        out.close()
        shutil.rmtree(work, ignore_errors=True)


def _leave_node(img: Path) -> None:
    """The job leaves with its network namespace: the node side of its veths goes from
    this node even when the site keeps the namespace (bind-mounted), so its address is
    nowhere but at the destination (done once the tree is killed here, before the
    destination's copy runs)."""
    from ..engine.netns import detach
    from ..images.imageset import ImageSet
    detach(ImageSet(img).inventory().netns)


class MigrationFailed(HpcckptError):
    """The destination did not take the process; it runs on where it was."""
