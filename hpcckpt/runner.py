"""`hpcckpt run`: start a job in its own PID namespace (or resume it), checkpoint it
periodically, stay its parent, and exit as it does.

With --images DIR, each checkpoint is DIR/ckpt-NNNN and DIR/latest points at the newest
complete one (switched atomically after the image is sealed). If DIR/latest exists when
`run` starts, the job is resumed from it instead of started afresh: the same command
line serves the first run and every rerun after a kill, a crash or a requeue.
"""
import os
import signal
import sys
import time
from pathlib import Path

from .cli import FORWARDED, exit_like
from .engine import pidns
from .engine.dump import dump
from .engine.restore import restore
from .errors import HpcckptError

POLL = 0.05


def _latest(images: Path) -> Path | None:
    link = images / "latest"
    return images / os.readlink(link) if link.is_symlink() else None


def _publish_latest(images: Path, name: str) -> None:
    tmp = images / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, images / "latest")


def _next_seq(images: Path) -> int:
    seqs = [int(p.name[5:]) for p in images.glob("ckpt-*") if p.name[5:].isdigit()]
    return max(seqs, default=0) + 1


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"hpcckpt run: {msg}", file=sys.stderr, flush=True)


def start(command: list[str]) -> int:
    pidns.ensure()
    pid = os.fork()
    if pid == 0:
        try:
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the job gets stdio, not our strays
            os.execvp(command[0], command)
        except OSError as e:
            print(f"hpcckpt run: cannot start {command[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    return pid


def run(command: list[str], images: str | None = None, every: float | None = None,
        quiet: bool = False) -> int:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise HpcckptError("nothing to run: give a command after --")
    img = Path(images) if images else None
    if img:
        img.mkdir(parents=True, exist_ok=True)
    latest = _latest(img) if img else None
    try:
        if latest:
            pidns.ensure()
            r = restore(latest, show_progress=not quiet)
            pid = r.pid
            _say(quiet, f"resumed from {latest} as PID {pid} in {r.total_s:.3f} s")
        else:
            pid = start(command)
            _say(quiet, f"started {' '.join(command)} as PID {pid} (PID {pidns.JOB_PID} in its namespace)")
        for s in FORWARDED:
            signal.signal(s, lambda sig, _f: os.kill(pid, sig))
        status = _supervise(pid, img, every, quiet)
    finally:
        pidns.shutdown()
    return exit_like(status)


def _supervise(pid: int, img: Path | None, every: float | None, quiet: bool) -> int:
    next_at = time.monotonic() + every if every and img else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if next_at and time.monotonic() >= next_at:
            name = f"ckpt-{_next_seq(img):04d}"
            try:
                r = dump(pid, img / name, leave_running=True, show_progress=not quiet)
                _publish_latest(img, name)
                _say(quiet, f"checkpoint {name}: {r.pages_bytes / 2**20:.1f} MiB, "
                            f"frozen {r.frozen_s * 1000:.0f} ms")
            except HpcckptError as e:  # the job runs on; the next interval tries again
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return status
                _say(quiet, f"checkpoint {name} failed, job continues: {e}")
            next_at = time.monotonic() + every
        time.sleep(POLL)
