"""The hpcckpt command line: check, dump, restore, show, run."""
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
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.WEXITSTATUS(status)


def cmd_check(args) -> int:
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


def cmd_dump(args) -> int:
    from .engine.dump import dump
    from .engine.files import FilePolicies
    r = dump(args.pid, args.images, leave_running=args.leave_running,
             policies=FilePolicies.parse(args.file_policy), show_progress=not args.quiet)
    if not args.quiet:
        print(f"dumped process {r.pid} ({r.threads} threads) to {r.images}: "
              f"{r.pages_bytes / 2**20:.1f} MiB of pages in {r.total_s:.3f} s, frozen {r.frozen_s:.3f} s"
              + ("" if args.leave_running else "; process killed"), file=sys.stderr)
    return 0


def cmd_restore(args) -> int:
    from .engine.restore import restore
    r = restore(args.images, show_progress=not args.quiet)
    if not args.quiet:
        print(f"restored process {r.pid} ({r.threads} threads, {r.pages_bytes / 2**20:.1f} MiB) "
              f"in {r.total_s:.3f} s", file=sys.stderr)
    if args.detach:
        print(r.pid)
        return 0
    return wait_as_parent(r.pid)


def cmd_show(args) -> int:
    from .images.show import show
    print(show(args.images, as_json=args.json))
    return 0


def cmd_run(args) -> int:
    from .runner import run
    return run(args.command, images=args.images, every=args.every, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hpcckpt", description="Transparent checkpoint/restore of Linux processes")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress or summary lines")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="which kernel features this machine offers")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)
    d = sub.add_parser("dump", help="checkpoint a process into an image directory")
    d.add_argument("--pid", "-t", type=int, required=True)
    d.add_argument("--images", "-D", required=True)
    d.add_argument("--leave-running", "-R", action="store_true", help="let the process run on after the dump")
    d.add_argument("--file-policy", action="append", metavar="PATH=rollback|keep|refuse",
                   help="what a restore does with files open for writing under PATH (default rollback)")
    d.set_defaults(func=cmd_dump)
    r = sub.add_parser("restore", help="restore a process; stays its parent unless --detach")
    r.add_argument("--images", "-D", required=True)
    r.add_argument("--detach", "-d", action="store_true", help="print the PID and leave it running")
    r.set_defaults(func=cmd_restore)
    s = sub.add_parser("show", help="decode an image set")
    s.add_argument("images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    u = sub.add_parser("run", help="run a program in its own PID namespace, checkpointing it")
    u.add_argument("--images", "-D", help="directory for the checkpoints (one subdirectory each)")
    u.add_argument("--every", type=float, help="seconds between checkpoints")
    u.add_argument("command", nargs=argparse.REMAINDER)
    u.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
