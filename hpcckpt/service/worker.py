"""One dump or restore for hpcckptd, in a process of its own.

Isolation is the point: the engine may create PID namespaces and becomes the parent of
what it restores, a crash takes only this request down, and the daemon's memory stays
small whatever the size of the process. If the daemon dies, we get SIGTERM
(PR_SET_PDEATHSIG) and unwind: a frozen process is thawed, a partial image removed.

stdin carries the Request, then what the daemon relays while we run: the caller's
Continue answers to hooks and SignalRequests for the process we restored. stdout carries
Responses: notifications (progress, at most 4 a second; hooks) and the final one.
Usage (by the daemon only): python -m hpcckpt.service.worker < WorkerStart, Request, ...
(started ahead of requests, so that Python and the engine are loaded when one comes)
"""
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress
from ..errors import HpcckptError
from ..images import service_pb2 as spb
from ..kernel.libc import libc
from ..engine import pidns
from ..engine import tree as ptree
from . import auth, framing
from .arrival import Arriving

PR_SET_PDEATHSIG = 1
PROGRESS_INTERVAL = 0.25      # 4 notifications a second at most: the caller wants a line, not a flood
DEFAULT_HOOK_TIMEOUT = 60.0


class Cancelled(HpcckptError):
    """The request was cancelled, timed out, or the daemon went away."""


class HookFailed(HpcckptError):
    """The caller declined a hook, did not answer it in time, or went away."""


def _on_term(_sig, _frame):
    raise Cancelled("request cancelled (or hpcckptd stopped) before it finished; nothing was changed")


_out_lock = threading.Lock()


def _stdin(n: int) -> bytes:
    """Unbuffered: the reader thread must hold no io lock the interpreter's exit needs."""
    return os.read(0, n)


def send(resp: spb.Response) -> None:
    with _out_lock:
        sys.stdout.buffer.write(framing.encode(resp))
        sys.stdout.buffer.flush()


STOP_WAIT = 2.0              # seconds a process may take to stop before we kill anyway


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def kill_tree(root: int) -> None:
    """Kill a restored job and everything it started, as if its parent had died with it.

    In a PID namespace of the restore's own, killing its init takes every process with it.
    Otherwise the tree is stopped first (SIGSTOP, waiting until each shows it) and read again
    until no new member appears, so nothing forks away or is reparented out of sight while
    we kill; then all get SIGKILL."""
    if pidns._init_pid is not None:
        os.kill(pidns._init_pid, signal.SIGKILL)
        return
    stopped: set[int] = set()
    while True:
        table = ptree.scan()
        if root not in table:
            break
        found, _ = ptree.members(root, table, None)
        new = [p for p in found if p not in stopped and table[p].state not in "ZX"]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(p)
        deadline = time.monotonic() + STOP_WAIT
        while any(_state(p) not in "TtZX" for p in new) and time.monotonic() < deadline:
            time.sleep(0.005)
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Session:
    """What the daemon relays to us after the request, read by a thread of its own.

    A foreground restore (`holds_job`) is held by its caller as a direct restore is by
    the CLI, its parent: when the caller's connection drops (the daemon then closes our
    stdin), the job is killed with everything it started. A detached one runs on."""
    rid: int
    answers: queue.Queue = field(default_factory=queue.Queue)
    target: int | None = None            # the restored process, once it exists
    pending: list[int] = field(default_factory=list)   # signals that came before it did
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_progress: float = 0.0
    holds_job: bool = False
    caller_gone: bool = False

    def read(self) -> None:
        try:
            while (payload := framing.read_frame(_stdin)) is not None:
                msg = framing.decode(spb.Request, payload)
                kind = msg.WhichOneof("what")
                if kind == "cont":
                    self.answers.put(msg.cont)
                elif kind == "signal":
                    self.deliver(msg.signal.signo)
        except (HpcckptError, OSError, ValueError):
            pass
        self.answers.put(None)           # the caller is gone: a hook waiting now fails at once
        with self.lock:
            self.caller_gone = True
            target = self.target if self.holds_job else None
        if target is not None:
            kill_tree(target)

    def deliver(self, signo: int) -> None:
        with self.lock:
            if self.target is None:
                self.pending.append(signo)
                return
            target = self.target
        try:
            os.kill(target, signo)
        except (ProcessLookupError, ValueError, OSError):
            pass

    def running(self, pid: int) -> None:
        with self.lock:
            self.target, pending, self.pending = pid, self.pending, []
            gone = self.caller_gone and self.holds_job
        if gone:
            kill_tree(pid)
        for s in pending:
            self.deliver(s)

    def ended(self) -> None:
        """The job was reaped: its PID may be anyone's now, never signal it again."""
        with self.lock:
            self.target = None

    def hook(self, event: str, timeout: float, detail: str = "", pid: int = 0, images: str = "",
             node: str = "") -> None:
        """Tell the caller, then wait for its Continue before the engine goes on."""
        send(spb.Response(request_id=self.rid, notification=spb.Notification(
            event=event, wait=True, detail=detail, pid=pid, images=images, node=node)))
        try:
            ans = self.answers.get(timeout=timeout or DEFAULT_HOOK_TIMEOUT)
        except queue.Empty:
            raise HookFailed(f"no answer to the {event!r} hook within {timeout or DEFAULT_HOOK_TIMEOUT:g} s; "
                             "the caller must send Continue (or raise hook_timeout)") from None
        if ans is None:
            raise HookFailed(f"the caller went away during the {event!r} hook")
        if not ans.ok:
            raise HookFailed(f"the caller declined at the {event!r} hook"
                             + (f": {ans.reason}" if ans.reason else ""))

    def on_progress(self, p: progress.Progress) -> None:
        now = time.monotonic()
        if not p.finished and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        send(spb.Response(request_id=self.rid, notification=spb.Notification(
            event="progress", done=p.done, total=p.total, detail=p.label)))


def _results(done: spb.Response, r) -> None:
    done.pid, done.pages_bytes, done.frozen_s, done.total_s = r.pid, r.pages_bytes, r.frozen_s, r.total_s
    done.processes, done.threads, done.parent_bytes, done.tracking = r.processes, r.threads, r.parent_bytes, r.tracking
    done.notes.extend(r.notes)


def do_dump(caller: auth.Caller, s: Session, d: spb.DumpRequest, done: spb.Response) -> None:
    """What `hpcckpt dump|pre-dump` does directly, with the caller's file credentials: the
    image directory, store, parent image and digests are written and read as the caller."""
    from ..destinations import StoreJob
    from ..engine.dump import dump
    from ..engine.files import FilePolicies
    policies = FilePolicies.parse(list(d.file_policy))

    def dumped(path) -> None:
        auth.give_to(caller, Path(path))   # the caller may read its image in the hook
        s.hook("dumped", d.hook_timeout, detail=str(path), pid=d.pid, images=str(path))

    def one(path, parent=None):
        def frozen(pids: list[int]) -> None:
            # the daemon checked the root; what it started may have changed hands since (a
            # setuid program): every member, now that none can change, must be the caller's
            if not caller.root:
                for p in pids:
                    auth.may_dump(caller, p, root=d.pid)
            if d.wait_hooks:
                s.hook("frozen", d.hook_timeout, detail=f"{len(pids)} processes frozen", pid=d.pid,
                       images=str(path))
        return dump(d.pid, path, leave_running=d.leave_running, policies=policies, show_progress=False,
                    parent=parent or d.parent or None, tree=not d.single, track_mem=d.track_mem or d.pre_dump,
                    live=d.live, pre_dump=d.pre_dump, on_dumped=dumped if d.wait_hooks else None,
                    tcp_established=d.tcp_established, on_frozen=frozen)
    with auth.acting_as(caller):
        try:
            if d.store:
                dest = StoreJob.open(d.store, d.job, d.generation if d.HasField("generation") else None, None)
                where, r = dest.checkpoint(one)
                done.notes.extend(dest.notes)
            else:
                where, r = d.images, one(d.images)
                auth.give_to(caller, Path(d.images))
        except PermissionError as e:
            raise auth.refused(e, caller, f"write {'store ' + d.store if d.store else d.images}"
                               + (f" or read parent {d.parent}" if d.parent else "")) from None
    done.where = str(where)
    _results(done, r)


def do_migrate(caller: auth.Caller, s: Session, m: spb.MigrateOutRequest, done: spb.Response,
               munge_socket: str) -> None:
    """`hpcckpt migrate` for the caller: its own process, frozen and checked member by
    member, streamed to the destination with a munge credential made as the caller (so
    it is restored there as the caller, never as root). Hooks go to the caller's client:
    "frozen" and "dumped" here, the destination's "restored" with `node`."""
    from .migrate import migrate

    def frozen(pids: list[int]) -> None:
        if not caller.root:
            for p in pids:
                auth.may_dump(caller, p, root=m.pid)

    def action(stage: str, pid: int, images: str = "", node: str = "") -> None:
        s.hook(stage, m.hook_timeout, detail=f"{stage}" + (f" on {node}" if node else ""), pid=pid,
               images="" if stage != "restored" else images, node=node)

    def progress(n: spb.Notification) -> None:      # the destination's restore, to the caller
        if n.event == "progress":
            send(spb.Response(request_id=s.rid, notification=n))
    r = migrate(m.pid, m.to, munge_socket or None, show_progress=False, action=action if m.wait_hooks else None,
                on_notify=progress, as_user=None if caller.root else (caller.uid, caller.gid),
                check_frozen=frozen)
    done.pid, done.where = r.pid, m.to


def materialized(caller: auth.Caller, rq: spb.RestoreRequest):
    """The plain image directory of a store's checkpoint, read (and, for a compressed store,
    written to a temporary directory) with the caller's file credentials."""
    from ..store import commands
    with auth.acting_as(caller):
        try:
            return commands.restore_images(rq.store, rq.job, rq.checkpoint if rq.HasField("checkpoint") else None)
        except PermissionError as e:
            raise auth.refused(e, caller, f"read job {rq.job} in store {rq.store}") from None


def do_restore(caller: auth.Caller, s: Session, rq: spb.RestoreRequest, done: spb.Response) -> int | None:
    """Restore; for a foreground restore, wait for the job and report how it ended. Returns
    the job's PID if the request is answered already (detached) and we stay its parent."""
    from ..engine.restore import restore

    m = materialized(caller, rq) if rq.store else None
    path = str(m.path) if m else rq.images

    arriving = Arriving(Path(path), tuple(rq.arriving)) if rq.arriving else None

    def ready(pid: int) -> None:
        if arriving:        # every page file complete, with its digest, before anything runs
            arriving.check()
        if rq.wait_hooks:
            s.hook("restored", rq.hook_timeout, detail=f"process {pid} restored, not yet running", pid=pid,
                   images=rq.images or f"{rq.store}/{rq.job}")
    try:
        if m:   # the store's files: still only the caller's own images
            auth.may_restore(caller, path)
            for seq, problems in m.checkpoints[-1].skipped:
                done.notes.append(f"skipped damaged checkpoint {rq.job}/{seq:08d}: {'; '.join(problems)}")
        r = restore(path, show_progress=False, on_ready=ready if rq.wait_hooks or arriving else None,
                    arriving=arriving)
    finally:
        if m:
            with auth.acting_as(caller):
                m.cleanup()
    done.pid, done.pages_bytes, done.total_s = r.pid, r.pages_bytes, r.total_s
    done.processes, done.threads = r.processes, r.threads
    if rq.detach:
        return r.pid
    if not rq.wait_hooks:
        send(spb.Response(request_id=s.rid, notification=spb.Notification(
            event="restored", detail=f"process {r.pid} running", pid=r.pid)))
    s.holds_job = True
    s.running(r.pid)
    try:
        _, status = os.waitpid(r.pid, 0)
    except Cancelled:      # cancelled or timed out: a held job ends with its request
        kill_tree(r.pid)
        os.waitpid(r.pid, 0)
        s.ended()
        raise
    s.ended()
    done.exit_status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return None


def main() -> int:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, _on_term)
    if os.getppid() == 1:
        return 1
    broken = None
    try:
        try:
            from ..engine import dump, restore  # noqa: F401  (loaded before any request: a spare is warm)
            from ..kernel.rtnl import preload
            preload()                       # pyroute2, for a migrated job's network namespace
        except ImportError as e:            # a broken installation: the caller is told why, not just
            broken = (f"hpcckptd's worker ({sys.executable}) cannot load hpcckpt: {e}; "  # an exit status
                      "reinstall hpcckpt into that Python (pip install -e .) and restart hpcckptd")
        first = framing.read_frame(_stdin)
    except Cancelled:      # a spare stopped with the daemon
        return 0
    if first is None:      # a spare that was not needed
        return 0
    start = framing.decode(spb.WorkerStart, first)
    caller, rid = auth.Caller(0, start.uid, start.gid, tuple(start.groups)), start.request_id
    munge_socket = start.munge_socket
    req = framing.decode(spb.Request, framing.read_frame(_stdin) or b"")
    s = Session(rid)
    threading.Thread(target=s.read, daemon=True).start()
    progress.set_listener(s.on_progress)
    done = spb.Response(request_id=rid, final=True, ok=True)
    detached = None
    try:
        if broken:
            raise HpcckptError(broken)
        if req.WhichOneof("what") == "dump":
            do_dump(caller, s, req.dump, done)
        elif req.WhichOneof("what") == "migrate_out":
            do_migrate(caller, s, req.migrate_out, done, munge_socket)
        else:
            detached = do_restore(caller, s, req.restore, done)
    except (HpcckptError, OSError, ValueError) as e:
        done.ok, done.error, done.error_kind = False, str(e), type(e).__name__
    except Exception as e:     # a bug of ours: still an answer, and the engine has cleaned up
        done.ok, done.error = False, f"internal error in hpcckptd's worker: {type(e).__name__}: {e}"
    progress.set_listener(None)
    send(done)
    if detached is not None:  # answered, but stay its parent (and its PID namespace's keeper)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.waitpid(detached, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
