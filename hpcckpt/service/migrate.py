"""Moving a process to another node without a shared filesystem.

The source dumps the process (which stops it), streams the image set to the destination
node's hpcckptd over TCP, authenticated by munge, and the destination restores it as the
sender's uid. If the destination refuses or fails, the source restores the process
locally from the same image, so a failed migration never loses the job.
"""
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import HpcckptError, PermissionDeniedError
from ..images import service_pb2 as spb
from . import framing, munge

CHUNK = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
MAX_FILES = 100000
MAX_TOTAL = 1 << 42


def request_for(images: Path) -> spb.MigrateRequest:
    files = sorted(p for p in images.iterdir() if p.is_file())
    return spb.MigrateRequest(files=[spb.MigrateFile(name=p.name, size=p.stat().st_size) for p in files])


def binding(req: spb.MigrateRequest) -> str:
    """What the munge credential vouches for: this exact list of files and sizes."""
    bare = spb.MigrateRequest()
    bare.CopyFrom(req)
    bare.credential = b""
    return munge.digest(bare.SerializeToString(deterministic=True))


def send(images: Path, host: str, port: int, munge_socket: str | None = None,
         version: int = 1) -> spb.Response:
    req = request_for(images)
    req.credential = munge.encode(binding(req), munge_socket)
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(framing.encode(spb.Request(version=version, migrate=req)))
        for f in req.files:
            with open(images / f.name, "rb") as src:
                while chunk := src.read(CHUNK):
                    s.sendall(framing._LEN.pack(len(chunk)) + chunk)
        read = framing.sock_reader(s)
        while True:
            payload = framing.read_frame(read)
            if payload is None:
                raise HpcckptError(f"{host}:{port} closed the connection without an answer")
            resp = framing.decode(spb.Response, payload)
            if resp.final:
                return resp


@dataclass
class Received:
    path: Path
    uid: int
    gid: int


def receive(conn: socket.socket, req: spb.MigrateRequest, spool: Path, munge_socket: str | None) -> Received:
    """Check the credential, then take the files into a fresh spool directory."""
    who = munge.decode(req.credential, binding(req), munge_socket)
    if len(req.files) > MAX_FILES or sum(f.size for f in req.files) > MAX_TOTAL:
        raise PermissionDeniedError("migration request is larger than this node accepts")
    for f in req.files:
        if not NAME_RE.match(f.name):
            raise PermissionDeniedError(f"migration names a file {f.name!r} that is not a plain image file name")
    spool.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"migrate-{who.uid}-", dir=spool))
    try:
        read = framing.sock_reader(conn)
        for f in req.files:
            left = f.size
            with open(dest / f.name, "wb") as out:
                while left > 0:
                    chunk = framing.read_frame(read)
                    if chunk is None or len(chunk) > left:
                        raise framing.ProtocolError(f"file {f.name} arrived with the wrong size")
                    out.write(chunk)
                    left -= len(chunk)
            os.chown(dest / f.name, who.uid, who.gid)
        os.chown(dest, who.uid, who.gid)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return Received(dest, who.uid, who.gid)


def migrate(pid: int, to: str, munge_socket: str | None = None, show_progress: bool = True):
    """Dump `pid` (stopping it), send it to `to` (HOST:PORT), return the remote answer.

    On failure the process is restored here from the same image and a MigrationFailed
    carrying the local Restored is raised: the caller stays its parent.
    """
    from ..engine.dump import dump
    from ..engine.restore import restore
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit():
        raise HpcckptError(f"--to {to!r}: give HOST:PORT of the destination's hpcckptd --listen")
    base = "/dev/shm" if shutil.disk_usage("/dev/shm").free > (1 << 30) else None
    work = Path(tempfile.mkdtemp(prefix="hpcckpt-migrate-", dir=base))
    try:
        img = work / "img"
        dump(pid, img, leave_running=False, show_progress=show_progress)
        try:
            resp = send(img, host, int(port), munge_socket)
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


class MigrationFailed(HpcckptError):
    """The destination did not take the process; it was restored where it was."""

    def __init__(self, message: str, local):
        super().__init__(message)
        self.local = local
