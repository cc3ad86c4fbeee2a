"""One dump or restore for hpcckptd, in a process of its own.

Isolation is the point: the engine may create PID namespaces and becomes the parent of
what it restores, a crash takes only this request down, and the daemon's memory stays
small whatever the size of the process. If the daemon dies, we get SIGTERM
(PR_SET_PDEATHSIG) and unwind: a frozen process is thawed, a partial image removed.
Usage (by the daemon only): python -m hpcckpt.service.worker UID GID REQUEST_ID < request
"""
import os
import signal
import sys
from pathlib import Path

from ..errors import HpcckptError
from ..images import service_pb2 as spb
from ..kernel.libc import libc
from . import auth, framing

PR_SET_PDEATHSIG = 1


class Cancelled(HpcckptError):
    """The request was cancelled, timed out, or the daemon went away."""


def _on_term(_sig, _frame):
    raise Cancelled("request cancelled (or hpcckptd stopped) before it finished; nothing was changed")


def send(resp: spb.Response) -> None:
    sys.stdout.buffer.write(framing.encode(resp))
    sys.stdout.buffer.flush()


def main() -> int:
    uid, gid, rid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, _on_term)
    if os.getppid() == 1:
        return 1
    caller = auth.Caller(0, uid, gid)
    req = framing.decode(spb.Request, framing.read_frame(sys.stdin.buffer.read) or b"")
    done = spb.Response(request_id=rid, final=True, ok=True)
    try:
        if req.WhichOneof("what") == "dump":
            from ..engine.dump import dump
            from ..engine.files import FilePolicies
            d = req.dump
            r = dump(d.pid, d.images, leave_running=d.leave_running,
                     policies=FilePolicies.parse(list(d.file_policy)), show_progress=False)
            auth.give_to(caller, Path(d.images))
            done.pid, done.pages_bytes, done.frozen_s, done.total_s = r.pid, r.pages_bytes, r.frozen_s, r.total_s
        else:
            from ..engine.restore import restore
            rq = req.restore
            r = restore(rq.images, show_progress=False)
            done.pid, done.pages_bytes, done.total_s = r.pid, r.pages_bytes, r.total_s
            if rq.detach:  # answer now, but stay its parent (and its PID namespace's keeper)
                send(done)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.waitpid(r.pid, 0)
                return 0
            send(spb.Response(request_id=rid, notification=spb.Notification(
                event="restored", detail=f"process {r.pid} running")))
            _, status = os.waitpid(r.pid, 0)
            done.exit_status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    except (HpcckptError, OSError, ValueError) as e:
        done.ok, done.error, done.error_kind = False, str(e), type(e).__name__
    send(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
