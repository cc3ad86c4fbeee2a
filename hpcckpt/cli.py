"""The hpcckpt command line: check, dump, restore, show, run, status, ls, stats, verify."""
import argparse
import json
import os
import signal
import sys

from .errors import HpcckptError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def wait_as_parent(pid: int) -> int:
    """Stay the process's parent: pass on signals, then exit as it did."""
    for s in FORWARDED:
        signal.signal(s, lambda sig, _f: os.kill(pid, sig))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    for s in FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    return exit_like(status)


def exit_like(status: int) -> int:
    """Our exit status as the child's: its code, or die of its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):   # those two have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.WEXITSTATUS(status)


def cmd_check(args) -> int:
    if sock := _service(args):
        from .service import viacli
        return viacli.check(args, sock)
    from .kernel.features import probe
    ok = True
    rows = probe()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
    for r in rows:
        ok &= r.available or not r.required
        if not args.json:
            print(f"{'yes' if r.available else 'no ':3}  {r.name:38} {r.detail}"
                  + ("" if r.available else f"; without it: {r.without}"))
    if not args.json:
        print("dump and restore can work here" if ok else "dump/restore cannot work here (see 'no' rows marked required)")
    return 0 if ok else 1


def _service(args) -> str | None:
    """hpcckptd's socket when this command goes through the daemon (see service/viacli.py)."""
    from .service.viacli import socket_for
    return socket_for(args)


TCP_HELP = ("checkpoint established TCP connections (TCP_REPAIR); their packets are held back "
            "from the dump until the restore, and only a restore of this checkpoint can take them up")


NETNS_HELP = ("the job runs in a network namespace of its own: save its interfaces, addresses, "
              "routes and rules; a restore makes a new one (the node side of its veths deleted "
              "here when the job is killed)")


def cmd_dump(args) -> int:
    if sock := _service(args):
        from .service import viacli
        return viacli.dump(args, sock)
    from .engine.dump import dump
    from .engine.files import FilePolicies
    policies = FilePolicies.parse(args.file_policy)

    pre = args.cmd == "pre-dump"
    script = _action_script(args)

    def do_dump(path, parent=None):
        hooks = {"on_frozen": lambda _pids: script("frozen", args.pid, path),
                 "on_dumped": lambda p: script("dumped", args.pid, p)} if script else {}
        return dump(args.pid, path, leave_running=args.leave_running, policies=policies,
                    show_progress=not args.quiet, parent=parent or args.parent, tree=not args.single,
                    track_mem=args.track_mem or pre, live=getattr(args, "live", False), pre_dump=pre,
                    shell_job=getattr(args, "shell_job", False),
                    tcp_established=getattr(args, "tcp_established", False),
                    netns=getattr(args, "netns", False),
                    live_route=getattr(args, "live_route", "auto"),
                    freeze_cgroup=getattr(args, "freeze_cgroup", None) or "auto", **hooks)
    if args.images and not args.store:  # the image set itself, as CRIU's -D
        where, r = args.images, do_dump(args.images)
    else:
        where, r = _destination(args, True).checkpoint(do_dump)
    if not args.quiet:
        print(f"dumped process {r.pid} ({r.processes} processes, {r.threads} threads) to {where}: "
              f"{r.pages_bytes / 2**20:.1f} MiB of pages in {r.total_s:.3f} s, frozen {r.frozen_s:.3f} s"
              + (f"; {r.parent_bytes / 2**20:.1f} MiB in parent images ({r.tracking})" if r.incremental else "")
              + ("" if args.leave_running or pre or args.live else "; process killed"), file=sys.stderr)
        for note in r.notes:
            print(f"hpcckpt: {note}", file=sys.stderr)
    return 0


def cmd_restore(args) -> int:
    if sock := _service(args):
        from .service import viacli
        return viacli.restore(args, sock)
    from .engine.netns import parse_veth
    from .engine.restore import restore as engine_restore
    script = _action_script(args)

    veth = parse_veth(getattr(args, "veth", None))

    def restore(path: str, **kw):
        ready = (lambda pid: script("restored", pid, path)) if script else None
        return engine_restore(path, on_ready=ready, veth=veth, **kw)
    if args.store:
        from .store import commands
        if args.job is None:
            raise HpcckptError("--store needs --job NAME")
        m = commands.restore_images(args.store, args.job, args.checkpoint)
        with m as path:  # a compressed checkpoint is decompressed to a temporary directory
            for seq, problems in m.checkpoints[-1].skipped:
                print(f"hpcckpt: skipped damaged checkpoint {args.job}/{seq:08d}: {'; '.join(problems)}",
                      file=sys.stderr)
            r = restore(str(path), show_progress=not args.quiet, shell_job=args.shell_job)
    elif args.images:
        r = restore(args.images, show_progress=not args.quiet, shell_job=args.shell_job)
    else:
        raise HpcckptError("say what to restore: --images DIR or --store ROOT --job NAME")
    if not args.quiet:
        print(f"restored process {r.pid} ({r.threads} threads, {r.pages_bytes / 2**20:.1f} MiB) "
              f"in {r.total_s:.3f} s", file=sys.stderr)
        for note in getattr(r, "notes", []):
            print(f"hpcckpt: {note}", file=sys.stderr)
    if args.detach:
        print(r.pid)
        return 0
    from .engine.ttys import take_back_foreground
    try:
        return wait_as_parent(r.pid)
    finally:
        take_back_foreground()    # a shell job had our terminal's foreground: ours again


def _action_script(args):
    """--action-script CMD as a callable (stage, pid, images), or None (service/actions.py)."""
    if not getattr(args, "action_script", None):
        return None
    from .service.actions import ActionScript
    return ActionScript(args.action_script)


def _action_flag(p) -> None:
    p.add_argument("--action-script", metavar="CMD",
                   help="run CMD (through /bin/sh) at each stage - frozen, dumped, restored - with "
                        "HPCCKPT_ACTION, HPCCKPT_PID, HPCCKPT_IMAGES set; a non-zero exit abandons the "
                        "dump (the process runs on) or undoes the restore")


def cmd_catalog(args) -> int:
    from .store import commands
    print(commands.catalog_rebuild(args.store))
    return 0


def cmd_compact(args) -> int:
    from .engine.merge import merge_fn
    from .store import commands
    print(commands.compact(args.store, args.job, merge_fn, checkpoint=args.checkpoint))
    return 0


def cmd_show(args) -> int:
    from .images.show import show
    print(show(args.images, as_json=args.json))
    return 0


def _signal(name: str) -> int:
    try:
        return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))
    except AttributeError:
        raise argparse.ArgumentTypeError(f"unknown signal {name!r}") from None


def _destination(args, required: bool):
    from .destinations import open_destination
    dest = open_destination(args.images, args.store, args.job, keep_last=getattr(args, "keep_last", None),
                            keep_every=getattr(args, "keep_every", None), max_bytes=getattr(args, "max_bytes", None))
    if required and dest is None:
        from .errors import HpcckptError
        raise HpcckptError("say where the images go: --images DIR or --store ROOT [--job NAME]")
    return dest


def cmd_run(args) -> int:
    """Inside a Slurm job nobody can fix the command line any more: a bad schedule or an
    unusable store is reported (output and status) and the job runs anyway, without what
    failed. Outside Slurm the same problems stop `run` at once."""
    from .engine import userns
    userns.enter_if_unprivileged()   # first: numpy's BLAS threads would make it impossible
    from .runner import run
    from .schedules import ScheduleError, every, parse
    in_job = bool(os.environ.get("SLURM_JOB_ID"))
    if args.schedule and args.every:
        raise HpcckptError("give --schedule SPEC or --every SECONDS, not both")
    errors: list[str] = []
    schedule = None
    try:
        schedule = parse(args.schedule) if args.schedule else every(args.every) if args.every else None
    except ScheduleError as e:
        if not in_job:
            raise
        errors.append(f"{e}; no periodic checkpoints (only on signals and before the walltime)")
    try:
        dest = _destination(args, False)
    except (HpcckptError, OSError) as e:
        if not in_job:
            raise
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        errors.append(f"cannot use the checkpoint destination: {msg}{where}; the job runs without checkpoints")
        dest = None
    return run(args.command, dest=dest, quiet=args.quiet, schedule=schedule,
               checkpoint_signal=args.checkpoint_signal, final_signal=args.final_signal,
               requeue=args.requeue, walltime=args.walltime, errors=errors, full_every=args.full_every,
               tcp_established=args.tcp_established, netns=args.netns)


def cmd_status(args) -> int:
    from .status import job_status
    print(job_status(args.jobid, args.store, args.images, as_json=args.json))
    return 0


def cmd_ls(args) -> int:
    from .store import Store, format_listing
    print(format_listing(Store(args.store).list(args.job)))
    return 0


def cmd_stats(args) -> int:
    from .store import Store, plot_stats
    print(plot_stats(Store(args.store), args.job, args.png))
    return 0


def cmd_verify(args) -> int:
    if args.store:
        from .store import Store
        store = Store(args.store)
        ckpt = store.get(args.job, args.checkpoint) if args.checkpoint is not None else store.latest(args.job)
        if ckpt is None:
            raise HpcckptError(f"job {args.job!r} has no checkpoint in {args.store}")
        problems = store.verify(ckpt)
        target = str(ckpt.path)
    else:
        from .images.imageset import ImageSet
        problems = []
        try:
            ImageSet(args.images).verify()
        except HpcckptError as e:
            problems = [str(e)]
        target = args.images
    for p in problems:
        print(f"{target}: {p}")
    if not problems:
        print(f"{target}: verified")
    return 1 if problems else 0


def cmd_migrate(args) -> int:
    if sock := _service(args):        # an ordinary user: hpcckptd migrates the user's own process
        from .service import viacli
        return viacli.migrate(args, sock)
    from .service.migrate import MigrationFailed, migrate
    try:
        from .service.viacli import ProgressLine
        resp = migrate(args.pid, args.to, args.munge_socket, show_progress=not args.quiet,
                       action=_action_script(args), on_notify=ProgressLine(not args.quiet),
                       tcp_established=args.tcp_established, netns=args.netns)
    except MigrationFailed as e:       # the process runs on here, as it was
        print(f"hpcckpt migrate: {e}", file=sys.stderr)
        return 1
    print(f"hpcckpt migrate: process {args.pid} now runs on {args.to} as PID {resp.pid}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hpcckpt", description="Transparent checkpoint/restore of Linux processes")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress or summary lines")
    ap.add_argument("--service", nargs="?", const="", metavar="SOCKET",
                    help="dump/restore/check through hpcckptd (default socket: $HPCCKPTD_SOCKET or "
                         "/run/hpcckpt/hpcckptd.sock); without it, a non-root user goes through the "
                         "daemon when its socket exists, root works directly")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="which kernel features this machine offers")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)
    d = sub.add_parser("dump", help="checkpoint a process into an image directory")
    d.add_argument("--pid", "-t", type=int, required=True)
    _where(d)
    d.add_argument("--leave-running", "-R", action="store_true", help="let the process run on after the dump")
    d.add_argument("--single", action="store_true", help="this process only, not its descendants")
    d.add_argument("--freeze-cgroup", metavar="PATH",
                   help="freeze the tree through this cgroup v2 (cgroup.freeze) first, so it cannot "
                        "fork meanwhile (default: the root's own cgroup if it holds exactly the tree)")
    d.add_argument("--file-policy", action="append", metavar="PATH=rollback|keep|refuse",
                   help="what a restore does with files open for writing under PATH (default rollback)")
    _incremental(d)
    d.add_argument("--live", action="store_true",
                   help="the process runs on while its memory is written (a snapshot of one instant)")
    d.add_argument("--live-route", choices=("auto", "uffd", "fork"), default="auto",
                   help="with --live: keep the instant's pages by write-protect (userfaultfd: the "
                        "job pauses for no page-table copy) or a copy-on-write fork; auto: uffd "
                        "where the kernel allows it")
    d.add_argument("--shell-job", "-j", action="store_true",
                   help="the tree runs in a terminal held outside it (a shell job); see docs/ttys.md")
    d.add_argument("--tcp-established", action="store_true", help=TCP_HELP)
    d.add_argument("--netns", action="store_true", help=NETNS_HELP)
    _action_flag(d)
    d.set_defaults(func=cmd_dump)
    pd = sub.add_parser("pre-dump", help="copy a process's memory while it runs; a dump --parent then "
                                         "freezes it only to write what changed since")
    pd.add_argument("--pid", "-t", type=int, required=True)
    _where(pd)
    pd.add_argument("--file-policy", action="append", metavar="PATH=rollback|keep|refuse")
    _incremental(pd)
    _action_flag(pd)
    pd.set_defaults(func=cmd_dump, leave_running=True, live=False, single=False)
    r = sub.add_parser("restore", help="restore a process; stays its parent unless --detach")
    _where(r)
    r.add_argument("--checkpoint", type=int, help="with --store: this sequence number, not the newest")
    r.add_argument("--detach", "-d", action="store_true", help="print the PID and leave it running")
    r.add_argument("--shell-job", "-j", action="store_true",
                   help="an image of a shell job: the tree gets this command's terminal")
    r.add_argument("--veth", action="append", metavar="INSIDE=OUTSIDE[@BRIDGE]",
                   help="an image with the job's network namespace: make the node side of its veth "
                        "INSIDE as OUTSIDE, a port of BRIDGE (default: the names the image had)")
    _action_flag(r)
    r.set_defaults(func=cmd_restore)
    s = sub.add_parser("show", help="decode an image set")
    s.add_argument("images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    u = sub.add_parser("run", help="run a program in its own PID namespace, checkpointing it")
    _where(u)
    u.add_argument("--every", type=float, help="seconds between checkpoints (short for --schedule every=SECONDS)")
    u.add_argument("--schedule", metavar="SPEC",
                   help="when to checkpoint: a name from schedules/ (hourly, daly-24h, adaptive, ...) or an "
                        "inline spec (every=30m, 'young-daly mtbf=24h'); see docs/schedules.md")
    u.add_argument("--walltime", action=argparse.BooleanOptionalAction, default=True,
                   help="inside Slurm: final checkpoint and requeue shortly before the time limit (default on)")
    u.add_argument("--keep-last", type=int, help="with --store: keep the newest N checkpoints")
    u.add_argument("--keep-every", type=float, metavar="SECONDS",
                   help="with --store: beyond the newest N, keep one checkpoint per this interval")
    u.add_argument("--max-bytes", type=int, help="with --store: a byte budget for the job's checkpoints")
    u.add_argument("--checkpoint-signal", type=_signal, default=signal.SIGUSR1,
                   help="take a checkpoint and run on (default USR1; not forwarded to the job)")
    u.add_argument("--final-signal", type=_signal, default=signal.SIGTERM,
                   help="take a checkpoint and stop the job (default TERM)")
    u.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=None,
                   help="after a final checkpoint, requeue the Slurm job (default: inside Slurm)")
    u.add_argument("--full-every", type=int, default=10, metavar="N",
                   help="checkpoints are incremental, every Nth one full (1: always full; default 10)")
    u.add_argument("--tcp-established", action="store_true", help=TCP_HELP)
    u.add_argument("--netns", metavar="PATH",
                   help="run the job (not this monitor) in that network namespace (/run/netns/NAME, "
                        "made by the site with the job's veth and addresses); checkpoints save it and a "
                        "resume makes a new one from the image (see docs/architecture.md)")
    u.add_argument("command", nargs=argparse.REMAINDER)
    u.set_defaults(func=cmd_run)
    so = sub.add_parser("status", help="a job's checkpoints, the schedule's next time and the measured costs")
    so.add_argument("jobid", help="Slurm job id (job slurm-JOBID in the store) or the job's name")
    so.add_argument("--store", help="image store root")
    so.add_argument("--images", "-D", help="image directory (instead of --store)")
    so.add_argument("--json", action="store_true")
    so.set_defaults(func=cmd_status)
    mg = sub.add_parser("migrate", help="move a process to another node's hpcckptd (munge-authenticated)")
    mg.add_argument("--pid", "-t", type=int, required=True)
    mg.add_argument("--to", required=True, metavar="HOST:PORT")
    mg.add_argument("--munge-socket", help="munged's socket, if not the default")
    mg.add_argument("--tcp-established", action="store_true", help=TCP_HELP)
    mg.add_argument("--netns", action="store_true", help=NETNS_HELP)
    _action_flag(mg)
    mg.set_defaults(func=cmd_migrate)
    cat = sub.add_parser("catalog", help="the store's HDF5 catalog")
    cat.add_argument("action", choices=["rebuild"])
    cat.add_argument("--store", required=True)
    cat.set_defaults(func=cmd_catalog)
    cp = sub.add_parser("compact", help="merge a checkpoint's parent chain into a standalone image")
    cp.add_argument("--store", required=True)
    cp.add_argument("--job", required=True)
    cp.add_argument("--checkpoint", type=int, help="this sequence number, not the newest")
    cp.set_defaults(func=cmd_compact)
    ls = sub.add_parser("ls", help="list the checkpoints in a store")
    ls.add_argument("--store", required=True)
    ls.add_argument("--job")
    ls.set_defaults(func=cmd_ls)
    st = sub.add_parser("stats", help="plot a job's checkpoint sizes and durations (PNG)")
    st.add_argument("--store", required=True)
    st.add_argument("--job", required=True)
    st.add_argument("--png", default="hpcckpt-stats.png")
    st.set_defaults(func=cmd_stats)
    v = sub.add_parser("verify", help="check an image set (and its parents) against its digests")
    _where(v)
    v.add_argument("--checkpoint", type=int)
    v.set_defaults(func=cmd_verify)
    return ap


def _incremental(p) -> None:
    p.add_argument("--track-mem", action="store_true",
                   help="save page digests beside the image, so a later dump --parent can be incremental")
    p.add_argument("--parent", metavar="PREV",
                   help="an earlier image of the process: write only the pages changed since")


def _where(p) -> None:
    p.add_argument("--images", "-D", help="image directory")
    p.add_argument("--store", help="image store root (shared filesystem)")
    p.add_argument("--job", help="job name in the store (inside Slurm: slurm-JOBID)")


def _bare_service(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--service dump ...`: the bare option, not a socket named 'dump'."""
    cmds = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = list(argv)
    for i, tok in enumerate(out):
        if tok in cmds:
            break
        if tok == "--service" and (i + 1 == len(out) or out[i + 1] in cmds or out[i + 1].startswith("-")):
            out[i] = "--service="
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_bare_service(sys.argv[1:] if argv is None else argv, parser))
    try:
        return args.func(args)
    except HpcckptError as e:
        print(f"hpcckpt {args.cmd}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # one we did not foresee: still a message, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"hpcckpt {args.cmd}: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
