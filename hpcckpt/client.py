"""hpcckpt.client: ask the node's hpcckptd for checks, dumps and restores.

    from hpcckpt.client import Client
    c = Client()                       # /run/hpcckpt/hpcckptd.sock, or $HPCCKPTD_SOCKET
    r = c.dump(pid, "/scratch/me/img", leave_running=True)
    r = c.restore("/scratch/me/img", detach=True); print(r.pid)

Each call sends one request and reads responses until the final one; notifications on
the way go to `on_notify`. A refused or failed request raises the same exception class
the engine would have raised, with the daemon's message.
"""
import os
import socket

from . import errors
from .images import service_pb2 as spb
from .service import framing
from .service.daemon import DEFAULT_SOCKET, VERSION


class ServiceError(errors.HpcckptError):
    """hpcckptd refused or failed a request (the message says why)."""


def _raise(resp: spb.Response):
    cls = getattr(errors, resp.error_kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.HpcckptError)):
        cls = ServiceError
    raise cls(resp.error)


class Client:
    def __init__(self, socket_path: str | None = None, on_notify=None, timeout: float | None = None):
        self.path = socket_path or os.environ.get("HPCCKPTD_SOCKET", DEFAULT_SOCKET)
        self.on_notify = on_notify
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
                if self.on_notify:
                    self.on_notify(resp.notification)

    def check(self) -> spb.Response:
        return self.call(check=spb.CheckRequest())

    def dump(self, pid: int, images: str, leave_running: bool = False, file_policy=()) -> spb.Response:
        return self.call(dump=spb.DumpRequest(pid=pid, images=os.path.abspath(images),
                                              leave_running=leave_running, file_policy=list(file_policy)))

    def restore(self, images: str, detach: bool = False) -> spb.Response:
        return self.call(restore=spb.RestoreRequest(images=os.path.abspath(images), detach=detach))

    def status(self) -> spb.Response:
        return self.call(status=spb.StatusRequest())

    def cancel(self, request_id: int) -> spb.Response:
        return self.call(cancel=spb.CancelRequest(request_id=request_id))
