"""hpcckpt.client: ask the node's hpcckptd for checks, dumps and restores.

    from hpcckpt.client import Client
    c = Client()                       # /run/hpcckpt/hpcckptd.sock, or $HPCCKPTD_SOCKET
    r = c.dump(pid, "/scratch/me/img", leave_running=True)
    r = c.restore("/scratch/me/img", detach=True); print(r.pid)

Each call sends one request and reads responses until the final one; notifications on
the way go to `on_notify` (progress: `done` of `total` bytes, at most 4 a second). With
`wait_hooks`, the daemon stops at "dumped" (image sealed, process still frozen) or
"restored" (process built, not yet running) until `on_hook(notification)` returns:
True goes on, False or an exception makes the request fail cleanly. A refused or failed
request raises the same exception class the engine would have raised, with the daemon's
message. `on_accepted(request_id)` learns the request's id early, e.g. to pass signals
on to a foreground restore with `signal()`.
"""
import os
import socket

from . import errors
from .images import service_pb2 as spb
from .service import framing
from .service.daemon import DEFAULT_SOCKET, VERSION


def default_socket() -> str:
    """$HPCCKPTD_SOCKET, or where the systemd unit puts it."""
    return os.environ.get("HPCCKPTD_SOCKET") or DEFAULT_SOCKET


class ServiceError(errors.HpcckptError):
    """hpcckptd refused or failed a request (the message says why)."""


def _raise(resp: spb.Response):
    cls = getattr(errors, resp.error_kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.HpcckptError)):
        cls = ServiceError
    raise cls(resp.error)


class Client:
    def __init__(self, socket_path: str | None = None, on_notify=None, timeout: float | None = None,
                 on_hook=None, on_accepted=None):
        self.path = socket_path or default_socket()
        self.on_notify = on_notify
        self.on_hook = on_hook
        self.on_accepted = on_accepted
        self.timeout = timeout

    def call(self, **what) -> spb.Response:
        req = spb.Request(version=VERSION, **what)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise ServiceError(f"hpcckptd is not running (no socket at {self.path}); start it as root") from None
            s.sendall(framing.encode(req))
            read = framing.sock_reader(s)
            while True:
                payload = framing.read_frame(read)
                if payload is None:
                    raise ServiceError("hpcckptd closed the connection without an answer")
                resp = framing.decode(spb.Response, payload)
                if resp.final:
                    if not resp.ok:
                        _raise(resp)
                    return resp
                n = resp.notification
                if n.event == "accepted" and self.on_accepted:
                    self.on_accepted(resp.request_id)
                if self.on_notify:
                    self.on_notify(n)
                if n.wait:
                    try:
                        s.sendall(framing.encode(spb.Request(version=VERSION, cont=self._answer(n))))
                    except OSError:
                        pass   # too late (the hook timed out): the daemon's final answer says so

    def _answer(self, n: spb.Notification) -> spb.Continue:
        if self.on_hook is None:
            return spb.Continue(ok=True)
        try:
            return spb.Continue(ok=bool(self.on_hook(n)), reason="the caller's hook said no")
        except Exception as e:  # the hook's failure fails the request, not the caller
            return spb.Continue(ok=False, reason=f"the caller's hook failed: {e}")

    def check(self) -> spb.Response:
        return self.call(check=spb.CheckRequest())

    def dump(self, pid: int, images: str | None = None, leave_running: bool = False, file_policy=(),
             wait_hooks: bool = False, hook_timeout: float = 0, *, store: str | None = None,
             job: str | None = None, generation: int | None = None, parent: str | None = None,
             track_mem: bool = False, live: bool = False, single: bool = False,
             pre_dump: bool = False, tcp_established: bool = False) -> spb.Response:
        """Dump into `images`, or as the next checkpoint of `job` in `store` (the response's
        `where` says which); `parent` makes it incremental. As `hpcckpt dump` would."""
        d = spb.DumpRequest(pid=pid, images=os.path.abspath(images) if images else "",
                            leave_running=leave_running, file_policy=list(file_policy),
                            wait_hooks=wait_hooks, hook_timeout=hook_timeout,
                            store=os.path.abspath(store) if store else "", job=job or "",
                            parent=os.path.abspath(parent) if parent else "", track_mem=track_mem,
                            live=live, single=single, pre_dump=pre_dump, tcp_established=tcp_established)
        if generation is not None:
            d.generation = generation
        return self.call(dump=d)

    def restore(self, images: str | None = None, detach: bool = False, wait_hooks: bool = False,
                hook_timeout: float = 0, *, store: str | None = None, job: str | None = None,
                checkpoint: int | None = None) -> spb.Response:
        """Restore `images`, or the newest good checkpoint (or `checkpoint`) of `job` in `store`."""
        r = spb.RestoreRequest(images=os.path.abspath(images) if images else "", detach=detach,
                               wait_hooks=wait_hooks, hook_timeout=hook_timeout,
                               store=os.path.abspath(store) if store else "", job=job or "")
        if checkpoint is not None:
            r.checkpoint = checkpoint
        return self.call(restore=r)

    def migrate(self, pid: int, to: str, wait_hooks: bool = False, hook_timeout: float = 0) -> spb.Response:
        """Move our own process `pid` to `to` (HOST:PORT of the destination's hpcckptd
        --listen), where it is restored as us; the response's pid is its PID there. With
        `wait_hooks`: "frozen" and "dumped" here, then the destination's "restored"
        (`node` set); saying no keeps the process here, running on."""
        return self.call(migrate_out=spb.MigrateOutRequest(pid=pid, to=to, wait_hooks=wait_hooks,
                                                           hook_timeout=hook_timeout))

    def signal(self, request_id: int, signo: int) -> spb.Response:
        """Signal the process of a foreground restore of yours (by request, never by PID)."""
        return self.call(signal=spb.SignalRequest(request_id=request_id, signo=int(signo)))

    def status(self) -> spb.Response:
        return self.call(status=spb.StatusRequest())

    def cancel(self, request_id: int) -> spb.Response:
        return self.call(cancel=spb.CancelRequest(request_id=request_id))
