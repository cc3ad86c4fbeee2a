"""`hpcckpt dump|restore|check` through hpcckptd: what the CLI does for a non-root user
(or with --service), so that a batch script reads the same with or without the daemon.

A foreground restore behaves as a direct one would: the daemon's worker is the restored
process's parent, so we wait for the final response carrying its exit status and exit as
it did, passing on the signals a batch system sends us (INT, TERM, HUP, USR1, USR2).
"""
import os
import signal
import sys
from dataclasses import dataclass, field

from ..client import Client, default_socket
from ..errors import HpcckptError
from ..images import service_pb2 as spb
from ..progress import Progress

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def socket_for(args) -> str | None:
    """The daemon's socket if this command should go through it, else None (direct mode):
    --service [SOCKET] always; otherwise a non-root caller when a daemon socket exists."""
    if getattr(args, "service", None) is not None:
        return args.service or default_socket()
    if args.cmd not in ("dump", "pre-dump", "restore", "check", "migrate"):
        return None
    if os.geteuid() != 0 and os.path.exists(default_socket()):
        return default_socket()
    return None


@dataclass
class ProgressLine:
    """The daemon's progress notifications shown as the direct mode's progress line."""
    enabled: bool
    bars: dict[str, Progress] = field(default_factory=dict)

    def __call__(self, n: spb.Notification) -> None:
        if n.event != "progress" or not self.enabled:
            return
        bar = self.bars.get(n.detail)
        if bar is None:
            bar = self.bars[n.detail] = Progress(n.detail, n.total)
        bar(n.done - bar.done)
        if n.done >= n.total:
            bar.finish()


def _store_job(args) -> tuple[str | None, int | None]:
    """The job name and fencing generation a direct dump would use, from our environment
    (Slurm's job id and restart count): the daemon cannot see the caller's environment.
    As destinations.default_job_name/slurm_generation, without importing the store (numpy,
    h5py): a client stays light."""
    if not args.store:
        return args.job, None
    jid = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not args.job and not jid:
        raise HpcckptError("name the job with --job NAME (outside Slurm there is no job id to name it by)")
    return args.job or f"slurm-{jid}", int(os.environ.get("SLURM_RESTART_COUNT") or 0) if jid else None


def _no_shell_job(args) -> None:
    if getattr(args, "shell_job", False):
        raise HpcckptError("--shell-job is not available through hpcckptd: the daemon holds no terminal of "
                           "yours to give the job; run the job under `hpcckpt run` without a terminal")


def dump(args, sock: str) -> int:
    _no_shell_job(args)
    pre = args.cmd == "pre-dump"
    if args.images and args.store:
        raise HpcckptError("give either --images DIR or --store ROOT, not both")
    if not args.images and not args.store:
        raise HpcckptError("say where the images go: --images DIR or --store ROOT [--job NAME]")
    job, generation = _store_job(args)
    r = Client(sock, on_notify=ProgressLine(not args.quiet), on_hook=_on_hook(args)).dump(
        args.pid, args.images, leave_running=args.leave_running, file_policy=args.file_policy or (),
        wait_hooks=_on_hook(args) is not None,
        store=args.store, job=job, generation=generation, parent=args.parent, track_mem=args.track_mem,
        live=args.live, single=args.single, pre_dump=pre,
        tcp_established=getattr(args, "tcp_established", False))
    if not args.quiet:
        where = r.where if args.store else os.path.abspath(args.images)
        print(f"dumped process {r.pid} ({r.processes} processes, {r.threads} threads) to {where} through "
              f"hpcckptd: {r.pages_bytes / 2**20:.1f} MiB of pages in {r.total_s:.3f} s, frozen {r.frozen_s:.3f} s"
              + (f"; {r.parent_bytes / 2**20:.1f} MiB in parent images ({r.tracking})" if r.tracking else "")
              + ("" if args.leave_running or pre or args.live else "; process killed"), file=sys.stderr)
        for note in r.notes:
            print(f"hpcckpt: {note}", file=sys.stderr)
    return 0


def _what(args) -> dict:
    if args.store:
        if not args.job:
            raise HpcckptError("--store needs --job NAME")
        return {"store": args.store, "job": args.job, "checkpoint": args.checkpoint}
    if not args.images:
        raise HpcckptError("say what to restore: --images DIR or --store ROOT --job NAME")
    return {"images": args.images}


def _on_hook(args):
    """--action-script: the daemon waits at each hook while the script runs here, as the user."""
    if not getattr(args, "action_script", None):
        return None
    from .actions import ActionScript
    return ActionScript(args.action_script).on_hook


def _notes(r: spb.Response) -> None:
    for note in r.notes:
        print(f"hpcckpt: {note}", file=sys.stderr)


def restore(args, sock: str) -> int:
    _no_shell_job(args)
    what = _what(args)
    if args.detach:
        r = Client(sock, on_notify=ProgressLine(not args.quiet), on_hook=_on_hook(args)).restore(
            detach=True, wait_hooks=_on_hook(args) is not None, **what)
        _notes(r)
        print(r.pid)
        return 0
    rid: list[int] = []
    pending: list[int] = []

    def forward(sig, _frame) -> None:
        if not rid:            # before the daemon said which request: sent once it does
            pending.append(sig)
            return
        try:
            Client(sock).signal(rid[0], sig)
        except HpcckptError:
            pass               # the process has just ended: its status is on its way

    def accepted(request_id: int) -> None:
        rid.append(request_id)

    def notified(n: spb.Notification) -> None:
        show(n)
        if n.event == "restored" and not args.quiet:
            print(f"restored process {n.pid} through hpcckptd", file=sys.stderr)
        while pending and rid:
            forward(pending.pop(0), None)

    show = ProgressLine(not args.quiet)
    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        r = Client(sock, on_notify=notified, on_accepted=accepted, on_hook=_on_hook(args)).restore(
            wait_hooks=_on_hook(args) is not None, **what)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    _notes(r)
    if r.exit_status < 0:        # die of its signal, as a direct restore's parent would
        sig = -r.exit_status
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return r.exit_status


def migrate(args, sock: str) -> int:
    """`hpcckpt migrate` for a user: hpcckptd dumps the user's own process into the
    connection to the destination, with a munge credential made as the user, so the
    destination restores it as the user. On failure it runs on here."""
    if getattr(args, "munge_socket", None):
        raise HpcckptError("--munge-socket is hpcckptd's to choose when migrating through it (its --munge-socket)")
    if getattr(args, "tcp_established", False) or getattr(args, "netns", False):
        raise HpcckptError("--tcp-established and --netns are not available to migrations through hpcckptd "
                           "yet: run the migration as root")
    hook = _on_hook(args)
    try:
        r = Client(sock, on_notify=ProgressLine(not args.quiet), on_hook=hook).migrate(
            args.pid, args.to, wait_hooks=hook is not None)
    except HpcckptError as e:
        print(f"hpcckpt migrate: {e}", file=sys.stderr)
        return 1
    print(f"hpcckpt migrate: process {args.pid} now runs on {args.to} as PID {r.pid}", file=sys.stderr)
    return 0


def check(args, sock: str) -> int:
    import json
    feats = Client(sock).check().features
    if args.json:
        print(json.dumps([{"name": f.name, "available": f.available, "detail": f.detail} for f in feats], indent=1))
    else:
        for f in feats:
            print(f"{'yes' if f.available else 'no ':3}  {f.name:38} {f.detail}")
        print(f"dump and restore go through hpcckptd ({sock})")
    return 0
