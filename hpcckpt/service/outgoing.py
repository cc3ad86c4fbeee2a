"""The source's side of a migration stream: the connection a dump writes its image to
(engine/streamdump.py's `stream`), and the destination's answers on it.

On the wire: the request frame (file names and sizes, a munge credential binding them),
the metadata files' bytes, the page files' bytes as the dump reads them from the frozen
process, then a MigrateTrailer frame with the page files' digests. The destination then
restores, checks every file, and stops at its "restored" hook (built, not yet running)
until we answer: the source kills its copy first, then says go, so the process never runs
in two places, and runs on here unless the destination has it checked and ready.
"""
import select
import socket
import struct
from pathlib import Path

from ..errors import HpcckptError
from ..images import service_pb2 as spb
from . import framing, munge

SEND_TIMEOUT = 120        # seconds the destination may stop taking bytes before we give up
ANSWER_TIMEOUT = 600      # seconds its restore may take to report "restored"
HOOK_TIMEOUT = 600        # seconds the destination waits at "restored" for us (our action script)


class MigrationError(HpcckptError):
    """The destination refused, failed, or the connection to it broke."""


def binding(req: spb.MigrateRequest) -> str:
    """What the munge credential vouches for: this exact list of files and sizes (and hooks)."""
    bare = spb.MigrateRequest()
    bare.CopyFrom(req)
    bare.credential = b""
    return munge.digest(bare.SerializeToString(deterministic=True))


class Outgoing:
    """One migration's connection. `as_user`: (uid, gid) the munge credential is made as
    (hpcckptd migrating a user's process: the destination restores it as that user)."""

    def __init__(self, host: str, port: int, munge_socket: str | None = None,
                 as_user: tuple[int, int] | None = None, on_notify=None, version: int = framing.VERSION):
        self.where = f"{host}:{port}"
        self.munge_socket, self.as_user, self.on_notify, self.version = munge_socket, as_user, on_notify, version
        try:
            self.sock = socket.create_connection((host, port), timeout=60)
        except OSError as e:
            raise MigrationError(f"cannot connect to {self.where}: {e.strerror or e}") from None
        self.read = framing.sock_reader(self.sock)
        self.at_hook = False

    # -- what the dump calls (engine/streamdump.py) -------------------------------------
    def begin(self, images: Path, pages: list[tuple[str, int]]) -> int:
        """Announce every file, send the metadata; the fd the page bytes go to."""
        meta = sorted(p for p in images.iterdir() if p.is_file())
        req = spb.MigrateRequest(files=[spb.MigrateFile(name=p.name, size=p.stat().st_size) for p in meta]
                                 + [spb.MigrateFile(name=n, size=size) for n, size in pages],
                                 wait_hooks=True, hook_timeout=HOOK_TIMEOUT, digests_follow=True)
        req.credential = munge.encode(binding(req), self.munge_socket, self.as_user)
        try:
            self.sock.sendall(framing.encode(spb.Request(version=self.version, migrate=req)))
            self._authenticated()
            for p in meta:
                with open(p, "rb") as f:
                    self.sock.sendfile(f)
            # the engine writes the pages with os.write: a blocking socket, bounded by the kernel
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        except OSError as e:
            raise self.broken(e) from None
        return self.sock.fileno()

    def _authenticated(self) -> None:
        """The destination's verdict on our credential, before any byte of the image: a
        refusal comes back whole (not lost in a reset mid-stream) and costs no transfer."""
        resp = self._next()
        if resp.final:
            raise MigrationError(f"{self.where} refused the migration: {resp.error or 'no reason given'}")
        if resp.notification.event != "authenticated":
            raise MigrationError(f"{self.where} answered {resp.notification.event!r} where it should have "
                                 "accepted or refused our credential (a different hpcckpt version?)")

    def end(self, digests: dict[str, str]) -> None:
        trailer = spb.MigrateTrailer(pages=[spb.PageDigest(name=n, xxh3_128=d) for n, d in digests.items()])
        try:
            self.sock.sendall(framing.encode(trailer))
        except OSError as e:
            raise self.broken(e) from None

    def broken(self, e: OSError) -> MigrationError:
        """Sending failed: the destination's own reason, if it gave one before hanging up."""
        why = e.strerror or str(e)
        if e.errno in (11, 110):
            why = f"it took no bytes for {SEND_TIMEOUT} s"
        reason = self._final_error()
        return MigrationError(f"the stream to {self.where} broke off ({why})"
                              + (f"; the destination said: {reason}" if reason else ""))

    def _final_error(self) -> str:
        try:
            self.sock.settimeout(5)
            while (payload := framing.read_frame(self.read)) is not None:
                resp = framing.decode(spb.Response, payload)
                if resp.final:
                    return resp.error
        except (OSError, HpcckptError):
            pass
        return ""

    # -- the destination's answers --------------------------------------------------------
    def _next(self) -> spb.Response:
        try:
            payload = framing.read_frame(self.read)
        except OSError as e:
            raise MigrationError(f"the connection to {self.where} broke off before its answer "
                                 f"({e.strerror or e})") from None
        if payload is None:
            raise MigrationError(f"{self.where} closed the connection without an answer")
        return framing.decode(spb.Response, payload)

    def restored(self) -> spb.Notification:
        """Wait until the destination has built the process and checked every file (its
        "restored" hook: nothing runs there yet); its progress goes to on_notify."""
        self.sock.settimeout(ANSWER_TIMEOUT)
        while True:
            resp = self._next()
            if resp.final:
                raise MigrationError(f"{self.where} did not restore it: {resp.error or 'no reason given'}")
            n = resp.notification
            if self.on_notify:
                self.on_notify(n)
            if n.wait and n.event == "restored":
                self.at_hook = True
                return n

    def still_waiting(self) -> None:
        """Just before we kill our copy: the destination must still be holding its own at
        "restored" (it may have given up meanwhile: its hook timed out)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            resp = self._next()
            if resp.final:
                raise MigrationError(f"{self.where} gave up its copy: {resp.error or 'no reason given'}")

    def go(self) -> spb.Response:
        """Let the destination's process run (ours is gone); its final answer."""
        self.at_hook = False
        try:
            self.sock.sendall(framing.encode(spb.Request(version=self.version, cont=spb.Continue(ok=True))))
        except OSError as e:
            raise MigrationError(f"could not tell {self.where} to start the process: {e.strerror or e}") from None
        while True:
            resp = self._next()
            if resp.final:
                if not resp.ok:
                    raise MigrationError(f"{self.where} failed to start it: {resp.error or 'no reason given'}")
                return resp
            if self.on_notify:
                self.on_notify(resp.notification)

    def decline(self, reason: str) -> None:
        """The source keeps the process: the destination kills what it built."""
        if self.at_hook:
            self.at_hook = False
            try:
                self.sock.sendall(framing.encode(spb.Request(version=self.version,
                                                             cont=spb.Continue(ok=False, reason=reason))))
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
