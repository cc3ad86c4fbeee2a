"""hpcckptd: accept requests on a Unix socket, authorize them by the caller's kernel
credentials, run dumps and restores in worker processes, enforce limits.

Usage: hpcckptd [--socket PATH] [--per-user N] [--total N] [--time-limit SECONDS]
"""
import argparse
import itertools
import logging
import os
import queue
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HpcckptError, PermissionDeniedError
from ..images import service_pb2 as spb
from . import auth, framing

DEFAULT_SOCKET = "/run/hpcckpt/hpcckptd.sock"
WORKER = [sys.executable, "-m", "hpcckpt.service.worker"]
FORWARDABLE = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
               signal.SIGQUIT, signal.SIGKILL, signal.SIGCONT}
VERSION = framing.VERSION
log = logging.getLogger("hpcckptd")


class LimitError(HpcckptError):
    """Too many requests at once, for this user or in total."""


@dataclass
class Active:
    info: spb.RequestInfo
    worker: subprocess.Popen | None = None
    cancelled: bool = False
    to_worker: threading.Lock = field(default_factory=threading.Lock)
    stdin_open: bool = False

    def relay(self, msg: spb.Request) -> bool:
        """Pass a Continue or SignalRequest to the worker; False once it no longer listens."""
        with self.to_worker:
            if not self.stdin_open:
                return False
            try:
                self.worker.stdin.write(framing.encode(msg))
                self.worker.stdin.flush()
                return True
            except (OSError, ValueError):
                return False

    def close_stdin(self) -> None:
        with self.to_worker:
            if self.stdin_open:
                self.stdin_open = False
                try:
                    self.worker.stdin.close()
                except OSError:
                    pass


@dataclass
class Daemon:
    socket_path: str = DEFAULT_SOCKET
    per_user: int = 4
    total: int = 16
    time_limit: float = 3600.0
    listen: str | None = None          # ADDR:PORT for migrations from other nodes
    spool: str = "/var/spool/hpcckpt"
    munge_socket: str | None = None
    active: dict[int, Active] = field(default_factory=dict)

    def __post_init__(self):
        self.spawn_queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._spawner, daemon=True).start()
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self._features: list[spb.Feature] | None = None
        self.sock: socket.socket | None = None
        self.spare: subprocess.Popen | None = None
        self.closed = False
        self.staging: set = set()       # migrations' Receivers in flight: removed on shutdown too

    # -- workers -------------------------------------------------------------------
    def _spawner(self) -> None:
        """Starts every worker from this one long-lived thread: a worker's parent-death
        signal fires when the *thread* that forked it ends, and a connection's thread ends
        long before a detached restore's worker may (it stays the restored job's parent)."""
        while True:
            argv, box, ready = self.spawn_queue.get()
            try:
                box.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            except OSError as e:
                box.append(e)
            ready.set()

    def spawn(self, argv: list[str]) -> subprocess.Popen:
        box: list = []
        ready = threading.Event()
        self.spawn_queue.put((argv, box, ready))
        ready.wait()
        if isinstance(box[0], OSError):
            raise HpcckptError(f"cannot start a worker: {box[0]}")
        return box[0]

    # -- serving -------------------------------------------------------------------
    def bind(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.socket_path)
        os.chmod(self.socket_path, 0o666)  # anyone may ask; SO_PEERCRED says who asked
        self.sock.listen(64)

    def serve_forever(self) -> None:
        if self.sock is None:
            self.bind()
        threading.Thread(target=self._new_spare, daemon=True).start()
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            self.tcp = socket.create_server((host, int(port)), reuse_port=False)
            threading.Thread(target=self._accept_tcp, daemon=True).start()
        # A process signal may land on any thread and then leaves accept() asleep: wake up
        # now and then so that SIGTERM's handler (shutdown) runs.
        self.sock.settimeout(0.5)
        while True:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.sock.fileno() < 0:      # closed by shutdown()
                    return
                log.info("accept: %s; going on", e)   # EMFILE, ENOMEM ...: a pause, not the end
                time.sleep(0.05)
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def shutdown(self) -> None:
        if self.sock:
            self.sock.close()
        with self.lock:
            self.closed = True
            if self.spare is not None:
                self.spare.terminate()
            for rx in self.staging:     # a migration cut short by our end leaves no files
                shutil.rmtree(rx.path, ignore_errors=True)
            for a in self.active.values():
                if a.worker and a.worker.poll() is None:
                    a.worker.terminate()

    def _accept_tcp(self) -> None:
        while True:
            try:
                conn, addr = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_migration, args=(conn, addr), daemon=True).start()

    def _serve_migration(self, conn: socket.socket, addr) -> None:
        """An image set streamed from another node: authenticate, receive, restore as the
        sender, passing the restore's notifications (and hooks) back to the sender."""
        from . import migrate
        rid = next(self.ids)
        warm: subprocess.Popen | None = None
        rx = None
        with conn:
            try:
                conn.settimeout(120)
                req = framing.decode(spb.Request, framing.read_frame(framing.sock_reader(conn)) or b"")
                if req.WhichOneof("what") != "migrate":
                    raise framing.ProtocolError("this port takes migrations only")
                if req.version != VERSION:
                    raise framing.ProtocolError(f"protocol version {req.version}; this hpcckptd speaks {VERSION}")
                who = migrate.authenticate(req.migrate, self.munge_socket)
                if req.migrate.digests_follow:   # a streaming sender waits for this before its bytes
                    conn.sendall(framing.encode(spb.Response(request_id=rid, notification=spb.Notification(
                        event="authenticated", detail=f"uid {who.uid}"))))
                caller = auth.Caller(0, who.uid, who.gid, auth.groups_of(who.uid, who.gid))
                warm = self.spawn_worker(caller, rid)   # loads the engine while the bytes arrive
                t0 = time.monotonic()
                rx = migrate.Receiver(conn, req.migrate, who, Path(self.spool))
                with self.lock:
                    self.staging.add(rx)
                late = rx.until_pages()
                restore = spb.Request(version=VERSION, restore=spb.RestoreRequest(
                    images=str(rx.path), detach=True, wait_hooks=req.migrate.wait_hooks,
                    hook_timeout=req.migrate.hook_timeout, arriving=late))
                received = threading.Event()
                answer = threading.Thread(target=self._answer_migration, daemon=True,
                                          args=(caller, restore, rid, conn, warm, received, t0))
                answer.start()          # the restore starts on the metadata; the pages follow
                try:
                    rx.rest()
                    log.info("request %d: migration from %s for uid %d into %s (%.1f MiB in %.3f s)", rid,
                             addr[0], who.uid, rx.path, sum(f.size for f in req.migrate.files) / 2**20,
                             time.monotonic() - t0)
                except (HpcckptError, OSError) as e:
                    log.info("request %d: migration stream from %s broke off: %s", rid, addr[0], e)
                    rx.abort()          # the restore waiting for the pages fails and answers
                finally:
                    received.set()
                answer.join()
            except (HpcckptError, OSError) as e:
                log.info("request %d: migration from %s refused or failed: %s", rid, addr[0], e)
                try:
                    conn.sendall(framing.encode(spb.Response(request_id=rid, final=True, ok=False, error=str(e),
                                                             error_kind=type(e).__name__)))
                except OSError:
                    pass
            finally:
                try:   # wakes the thread reading the sender's Continue frames
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                if rx is not None:   # the restore is done (or failed): the staged files go
                    rx.abort()
                    with self.lock:
                        self.staging.discard(rx)
                if warm is not None and not getattr(warm, "hpcckpt_taken", False):
                    warm.kill()
                    threading.Thread(target=warm.wait, daemon=True).start()

    def _answer_migration(self, caller: auth.Caller, restore: spb.Request, rid: int, conn: socket.socket,
                          warm: subprocess.Popen, received: threading.Event, t0: float) -> None:
        """The migration's restore (started while its pages still arrive): its notifications
        and final answer go back to the sender, whose Continue answers are read once the
        stream has ended."""
        for resp in self.handle(caller, restore, rid, conn, worker=warm, relay_after=received):
            resp.request_id = rid
            try:
                conn.sendall(framing.encode(resp))
            except OSError:
                pass
            if resp.final:
                log.info("request %d: %s %.3f s after the first byte", rid,
                         f"restored as PID {resp.pid}" if resp.ok else f"failed ({resp.error})", time.monotonic() - t0)

    def _serve(self, conn: socket.socket) -> None:
        rid = next(self.ids)
        try:
            with conn:
                caller = auth.peer(conn)
                conn.settimeout(30)
                payload = framing.read_frame(framing.sock_reader(conn))
                if payload is None:
                    return
                req = framing.decode(spb.Request, payload)
                if req.WhichOneof("what") == "restore" and req.restore.arriving:
                    raise framing.ProtocolError("RestoreRequest.arriving is set by hpcckptd for migrations only")
                conn.settimeout(None)
                try:
                    for resp in self.handle(caller, req, rid, conn):
                        resp.request_id = rid
                        conn.sendall(framing.encode(resp))
                finally:
                    try:   # wakes the thread reading the caller's Continue frames
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        except (OSError, framing.ProtocolError) as e:
            log.info("request %d: %s", rid, e)

    # -- requests ------------------------------------------------------------------
    def handle(self, caller: auth.Caller, req: spb.Request, rid: int, conn: socket.socket | None = None,
               worker: subprocess.Popen | None = None, relay_after: threading.Event | None = None):
        kind = req.WhichOneof("what")
        try:
            if req.version != VERSION:
                raise framing.ProtocolError(f"protocol version {req.version}; this hpcckptd speaks {VERSION}")
            if kind == "check":
                yield spb.Response(final=True, ok=True, features=self.features())
            elif kind in ("status", "list"):
                with self.lock:
                    mine = [a.info for a in self.active.values() if caller.root or a.info.uid == caller.uid]
                yield spb.Response(final=True, ok=True, requests=mine, active=len(self.active))
            elif kind == "cancel":
                yield self.cancel(caller, req.cancel.request_id)
            elif kind == "signal":
                yield self.signal(caller, req.signal.request_id, req.signal.signo)
            elif kind in ("dump", "restore", "migrate_out"):
                yield from self.run_worker(caller, req, rid, kind, conn, worker, relay_after)
            elif kind == "cont":
                raise framing.ProtocolError("Continue answers a hook, on the connection of the request that sent it")
            else:
                raise framing.ProtocolError("empty request: say check, dump, restore, migrate_out, status, list, "
                                            "cancel or signal")
        except HpcckptError as e:
            yield spb.Response(final=True, ok=False, error=str(e), error_kind=type(e).__name__)

    def features(self) -> list[spb.Feature]:
        if self._features is None:
            from ..kernel.features import probe
            self._features = [spb.Feature(name=f.name, available=f.available, detail=f.detail) for f in probe()]
        return self._features

    def cancel(self, caller: auth.Caller, target: int) -> spb.Response:
        with self.lock:
            a = self.active.get(target)
            if a is None or not (caller.root or a.info.uid == caller.uid):
                raise HpcckptError(f"no request {target} of yours is running")
            a.cancelled = True
            if a.worker and a.worker.poll() is None:
                a.worker.terminate()
        return spb.Response(final=True, ok=True)

    def signal(self, caller: auth.Caller, target: int, signo: int) -> spb.Response:
        """Relayed to the worker, which signals only the process it restored: the caller
        names a request, never a PID, so it can reach nothing but its own restore."""
        if signo not in FORWARDABLE:
            raise HpcckptError(f"signal {signo} is not passed on; only INT, TERM, HUP, USR1, USR2, QUIT, KILL, CONT")
        with self.lock:
            a = self.active.get(target)
            if a is None or not (caller.root or a.info.uid == caller.uid):
                raise HpcckptError(f"no request {target} of yours is running")
            if a.info.kind != "restore":
                raise HpcckptError(f"request {target} is a {a.info.kind}; only a restore's process takes signals")
        if not a.relay(spb.Request(version=VERSION, signal=spb.SignalRequest(request_id=target, signo=signo))):
            raise HpcckptError(f"request {target} has finished; its process no longer takes signals through hpcckptd")
        return spb.Response(final=True, ok=True)

    def _from_caller(self, conn: socket.socket, a: Active, after: threading.Event | None = None) -> None:
        """After the request, a caller sends only Continue answers to hooks: pass them on.
        When it hangs up, the worker's stdin closes, so a hook waiting for it fails at once."""
        if after is not None:
            after.wait()
        try:
            read = framing.sock_reader(conn)
            while (payload := framing.read_frame(read)) is not None:
                msg = framing.decode(spb.Request, payload)
                if msg.WhichOneof("what") != "cont" or not a.relay(msg):
                    break
        except (OSError, framing.ProtocolError):
            pass
        a.close_stdin()

    def authorize(self, caller: auth.Caller, req: spb.Request, kind: str) -> str:
        """Refuse early what the caller may not ask for; the worker then reads and writes
        images, stores and parents with the caller's own file credentials."""
        if kind == "migrate_out":
            return self.authorize_migration(caller, req.migrate_out)
        if kind == "dump":
            d = req.dump
            auth.may_dump(caller, d.pid)
            if d.parent:
                auth.may_use_parent(caller, d.parent)
            if d.store:
                if d.images:
                    raise HpcckptError("give either images or a store, not both")
                if not os.path.isabs(d.store):
                    raise PermissionDeniedError(f"store path {d.store!r} must be absolute")
                return f"pid {d.pid} -> {d.store} job {d.job}"
            auth.may_write_images(caller, d.images)
            return f"pid {d.pid} -> {d.images}"
        rq = req.restore
        if rq.store:
            if not os.path.isabs(rq.store):
                raise PermissionDeniedError(f"store path {rq.store!r} must be absolute")
            if not rq.job:
                raise HpcckptError("a restore from a store names the job")
            return f"{rq.store} job {rq.job}"
        auth.may_restore(caller, rq.images)
        return rq.images

    def authorize_migration(self, caller: auth.Caller, m: spb.MigrateOutRequest) -> str:
        """A user may migrate what it may dump (every member is checked again once frozen);
        the destination restores it as the user, from the munge credential made as the user."""
        host, _, port = m.to.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise HpcckptError(f"migrate to {m.to!r}: give HOST:PORT of the destination's hpcckptd --listen")
        auth.may_dump(caller, m.pid)
        return f"pid {m.pid} -> {m.to}"

    def spawn_worker(self, caller: auth.Caller, rid: int) -> subprocess.Popen:
        """A worker for this request: the spare one, started earlier and already warm
        (Python and the engine loaded: ~0.2-0.5 s saved per request), else a new one; a
        new spare is started for the next request."""
        with self.lock:
            w, self.spare = self.spare, None
        if w is None or w.poll() is not None:
            w = self.spawn(WORKER)
        threading.Thread(target=self._new_spare, daemon=True).start()
        w.stdin.write(framing.encode(spb.WorkerStart(uid=caller.uid, gid=caller.gid, groups=caller.groups,
                                                     request_id=rid, munge_socket=self.munge_socket or "")))
        w.stdin.flush()
        return w

    def _new_spare(self) -> None:
        try:
            w = self.spawn(WORKER)
        except HpcckptError:
            return
        with self.lock:
            if self.spare is None and not self.closed:
                self.spare, w = w, None
        if w is not None:      # one is there already (or we are closing): not needed
            w.stdin.close()
            w.wait()
            w.stdout.close()

    def run_worker(self, caller: auth.Caller, req: spb.Request, rid: int, kind: str,
                   conn: socket.socket | None = None, worker: subprocess.Popen | None = None,
                   relay_after: threading.Event | None = None):
        """`worker`: one started already (a migration's, warmed up while its bytes came);
        `relay_after`: read the caller's Continue answers only once this is set (the
        connection still carries a migration's page files until then)."""
        target = self.authorize(caller, req, kind)
        with self.lock:
            mine = sum(1 for a in self.active.values() if a.info.uid == caller.uid)
            if mine >= self.per_user:
                raise LimitError(f"you already have {mine} requests running (limit {self.per_user}); wait for one")
            if len(self.active) >= self.total:
                raise LimitError(f"hpcckptd is busy with {len(self.active)} requests (limit {self.total}); retry soon")
            name = "pre-dump" if kind == "dump" and req.dump.pre_dump else "migrate" if kind == "migrate_out" else kind
            a = Active(spb.RequestInfo(request_id=rid, uid=caller.uid, kind=name, started=time.time(), target=target))
            self.active[rid] = a
        try:
            yield spb.Response(notification=spb.Notification(event="accepted", detail=target))
            w = worker or self.spawn_worker(caller, rid)
            w.hpcckpt_taken = True
            with self.lock:
                a.worker = w
                if a.cancelled:  # cancelled before the worker existed
                    w.terminate()
            w.stdin.write(framing.encode(req))
            w.stdin.flush()
            a.stdin_open = True
            if conn is not None:
                threading.Thread(target=self._from_caller, args=(conn, a, relay_after), daemon=True).start()
            timer = threading.Timer(self.time_limit, w.terminate)
            timer.start()
            try:
                while True:
                    payload = framing.read_frame(w.stdout.read)
                    if payload is None:
                        w.wait()
                        why = "cancelled" if a.cancelled else f"worker exited with status {w.returncode}"
                        raise HpcckptError(f"{kind} of {target} did not finish ({why}); nothing was published")
                    resp = framing.decode(spb.Response, payload)
                    yield resp
                    if resp.final:
                        break
            finally:
                timer.cancel()
                a.close_stdin()
                threading.Thread(target=w.wait, daemon=True).start()  # reap when it ends
        finally:
            with self.lock:
                self.active.pop(rid, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hpcckptd", description="hpcckpt's per-node checkpoint service")
    ap.add_argument("--socket", default=DEFAULT_SOCKET)
    ap.add_argument("--per-user", type=int, default=4)
    ap.add_argument("--total", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=3600)
    ap.add_argument("--listen", metavar="ADDR:PORT", help="accept migrations from other nodes (munge-authenticated)")
    ap.add_argument("--spool", default="/var/spool/hpcckpt", help="where migrated images land before restore")
    ap.add_argument("--munge-socket", help="munged's socket, if not the default")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("hpcckptd: must run as root (it dumps and restores other users' processes for them)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="hpcckptd: %(message)s")
    d = Daemon(args.socket, args.per_user, args.total, args.time_limit, args.listen, args.spool, args.munge_socket)
    d.bind()
    signal.signal(signal.SIGTERM, lambda *_: d.shutdown())
    log.info("listening on %s", args.socket)
    d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
