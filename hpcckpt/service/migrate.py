"""Moving a process to another node without a shared filesystem.

The source dumps the process (which stops it), streams the image set to the destination
node's hpcckptd over TCP, authenticated by munge, and the destination restores it as the
sender's uid. If the destination refuses or fails, the source restores the process
locally from the same image, so a failed migration never loses the job.

The bytes go from the source's page cache to the socket by sendfile and from the socket
into the destination's staging file by splice, never through Python. The destination
stages in memory (/dev/shm) when the image fits, and starts the restore's worker as soon
as the sender is authenticated, so its start overlaps the transfer.
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
from ..progress import Progress
from . import framing, munge
from .arrival import ARRIVED

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


def binding(req: spb.MigrateRequest) -> str:
    """What the munge credential vouches for: this exact list of files and sizes (and hooks)."""
    bare = spb.MigrateRequest()
    bare.CopyFrom(req)
    bare.credential = b""
    return munge.digest(bare.SerializeToString(deterministic=True))


def send(images: Path, host: str, port: int, munge_socket: str | None = None,
         version: int = framing.VERSION, on_notify=None, on_hook=None, show_progress: bool = False) -> spb.Response:
    """Stream the image set to HOST:PORT's hpcckptd; return its final answer.

    The request frame lists the files; their bytes follow raw, in that order, sent from
    the page cache by sendfile (no copy through us). Then the destination's notifications
    come back: progress of its restore, and hooks (with `on_hook`, the destination waits at
    "restored" for our Continue)."""
    req = request_for(images)
    req.wait_hooks = on_hook is not None
    req.credential = munge.encode(binding(req), munge_socket)
    total = sum(f.size for f in req.files)
    prog = Progress(f"send to {host}", total, enabled=show_progress)
    with socket.create_connection((host, port), timeout=60) as s:
        read = framing.sock_reader(s)
        try:
            s.sendall(framing.encode(spb.Request(version=version, migrate=req)))
            for f in req.files:
                with open(images / f.name, "rb") as src:
                    sent = 0
                    while sent < f.size:
                        n = s.sendfile(src, sent, min(f.size - sent, 64 * CHUNK))
                        if n == 0:
                            raise HpcckptError(f"{images / f.name} shrank while it was sent")
                        sent += n
                        prog(n)
        except OSError:           # the destination hung up: its answer says why, if it gave one
            s.settimeout(5)
            try:
                payload = framing.read_frame(read)
            except (OSError, HpcckptError):
                payload = None
            if payload is None:
                raise
            return framing.decode(spb.Response, payload)
        prog.finish()
        s.settimeout(None)      # the destination's restore (and our hooks) may take a while
        while True:
            payload = framing.read_frame(read)
            if payload is None:
                raise HpcckptError(f"{host}:{port} closed the connection without an answer")
            resp = framing.decode(spb.Response, payload)
            if resp.final:
                return resp
            n = resp.notification
            if on_notify:
                on_notify(n)
            if n.wait:
                s.sendall(framing.encode(spb.Request(version=version, cont=_answer(on_hook, n))))


def _answer(on_hook, n: spb.Notification) -> spb.Continue:
    try:
        return spb.Continue(ok=bool(on_hook(n)) if on_hook else True, reason="the sender's hook said no")
    except Exception as e:   # the hook's failure says no, with its reason
        return spb.Continue(ok=False, reason=str(e))


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
    return who


class Receiver:
    """Takes the files of an authenticated migration into a fresh directory owned by the
    sender, in the order sent: `until_pages()` the metadata, then `rest()` the page files,
    which a restore may already be reading (arrival.py); ARRIVED marks the end."""

    def __init__(self, conn: socket.socket, req: spb.MigrateRequest, who: munge.Identity, spool: Path):
        self.conn, self.files, self.who = conn, list(req.files), who
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
        while self.next < len(self.files):
            self._one(self.files[self.next])
        self.splicer.close()
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        fd = os.open(self.path / ARRIVED, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)

    def _one(self, f: spb.MigrateFile) -> None:
        fd = os.open(self.path / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchown(fd, self.who.uid, self.who.gid)
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
            action=None, on_notify=None, tcp_established: bool = False, netns: bool = False):
    """Dump `pid` (stopping it), send it to `to` (HOST:PORT), return the remote answer.

    `action` (an ActionScript, or any callable(stage, pid, images)) runs at the source's
    "frozen" and "dumped" and at the destination's "restored" (the remote process built,
    not yet running); saying no at any of them keeps the process here. `on_notify` sees
    the destination's notifications (its restore's progress).
    On failure the process is restored here from the same image and a MigrationFailed
    carrying the local Restored is raised: the caller stays its parent.
    `tcp_established`, `netns`: as for dump. With both, a server in a network namespace of
    its own moves with its address and keeps its connections (docs/architecture.md).
    """
    from ..engine.dump import dump
    from ..engine.restore import restore
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit():
        raise HpcckptError(f"--to {to!r}: give HOST:PORT of the destination's hpcckptd --listen")
    base = "/dev/shm" if shutil.disk_usage("/dev/shm").free > (1 << 30) else None
    work = Path(tempfile.mkdtemp(prefix="hpcckpt-migrate-", dir=base))
    hooks = {"on_frozen": lambda _pids: action("frozen", pid, str(img)),
             "on_dumped": lambda p: action("dumped", pid, str(p))} if action else {}
    try:
        img = work / "img"
        dump(pid, img, leave_running=False, show_progress=show_progress, tcp_established=tcp_established,
             netns=netns, **hooks)
        if netns:
            _leave_node(img)
        remote = (lambda n: action(n.event, n.pid, n.images, node=to) or True) if action else None
        try:
            resp = send(img, host, int(port), munge_socket, on_notify=on_notify, on_hook=remote,
                        show_progress=show_progress)
            error = "" if resp.ok else resp.error
        except (OSError, HpcckptError) as e:
            resp, error = None, str(e)
        if error:
            local = restore(img, show_progress=show_progress)
            raise MigrationFailed(f"migration to {to} failed: {error}; the process runs here again "
                                  f"as PID {local.pid}", local)
        return resp
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _leave_node(img: Path) -> None:
    """The job leaves with its network namespace: the node side of its veths goes from
    this node even when the site keeps the namespace (bind-mounted), so its address is
    nowhere but at the destination (a failed migration restores it here again)."""
    from ..engine.netns import detach
    from ..images.imageset import ImageSet
    detach(ImageSet(img).inventory().netns)


class MigrationFailed(HpcckptError):
    """The destination did not take the process; it was restored where it was."""

    def __init__(self, message: str, local):
        super().__init__(message)
        self.local = local
