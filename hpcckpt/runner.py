"""`hpcckpt run`: start a job in its own PID namespace (or resume it), checkpoint it
periodically and on signals, stay its parent, and exit as it does.

The same command line serves the first run and every rerun: when the destination (an
image directory or a job in the store) holds a complete checkpoint, the job resumes
from it. Inside Slurm the job name and the fencing generation come from the job's
environment, so a requeued run resumes, and a stale copy on a cut-off node cannot
publish over the requeued run's images.

Files the job writes are rolled back to their size at the checkpoint on resume; when the
job's stderr is also ours (a batch job's output file), lines we printed after that
checkpoint go with them, so what a resume has to say is printed after the restore.

Signals: the checkpoint signal (default USR1) takes a checkpoint and lets the job run on;
the final signal (default TERM: what Slurm sends when a grace time or a time limit ends)
takes a checkpoint, stops the job and, inside Slurm with --requeue, requeues it. Every
other forwarded signal (INT, HUP, USR1/USR2 when not taken) goes to the job.
"""
import os
import signal
import subprocess
import sys
import time

from .cli import FORWARDED, exit_like
from .engine import pidns
from .engine.dump import dump
from .engine.restore import restore
from .errors import HpcckptError

POLL = 0.05


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


def run(command: list[str], dest=None, every: float | None = None, quiet: bool = False,
        checkpoint_signal: int = signal.SIGUSR1, final_signal: int = signal.SIGTERM,
        requeue: bool | None = None) -> int:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise HpcckptError("nothing to run: give a command after --")
    if requeue is None:
        requeue = bool(os.environ.get("SLURM_JOB_ID"))
    latest = dest.latest() if dest else None
    try:
        if latest:
            pidns.ensure()
            r = restore(latest, show_progress=not quiet)
            pid = r.pid
            for note in dest.notes:
                _say(quiet, note)
            _say(quiet, f"resumed from {latest} as PID {pid} in {r.total_s:.3f} s")
        else:
            pid = start(command)
            _say(quiet, f"started {' '.join(command)} as PID {pid} (PID {pidns.JOB_PID} in its namespace)")
        sup = Supervisor(pid, dest, every, quiet, checkpoint_signal, final_signal, requeue)
        status = sup.loop()
    finally:
        pidns.shutdown()
    return exit_like(status) if status is not None else 0


class Supervisor:
    """The job's parent: waits, checkpoints on time and on signals, forwards the rest."""

    def __init__(self, pid, dest, every, quiet, checkpoint_signal, final_signal, requeue):
        self.pid, self.dest, self.every, self.quiet = pid, dest, every, quiet
        self.ckpt_sig, self.final_sig, self.requeue = checkpoint_signal, final_signal, requeue
        self.pending: set[int] = set()
        for s in set(FORWARDED) | {checkpoint_signal, final_signal}:
            signal.signal(s, self._on_signal)

    def _on_signal(self, sig: int, _frame) -> None:
        if self.dest and sig in (self.ckpt_sig, self.final_sig):
            self.pending.add(sig)
        else:
            os.kill(self.pid, sig)

    def loop(self) -> int | None:
        """The job's wait status, or None when we stopped it after a final checkpoint."""
        next_at = time.monotonic() + self.every if self.every and self.dest else None
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return status
            if self.final_sig in self.pending:
                if self._checkpoint(final=True):
                    self._requeue()
                    return None
                self.pending.discard(self.final_sig)
                os.kill(self.pid, self.final_sig)  # as if hpcckpt were not there
            if self.ckpt_sig in self.pending or (next_at and time.monotonic() >= next_at):
                self.pending.discard(self.ckpt_sig)
                self._checkpoint(final=False)
                if self.every:
                    next_at = time.monotonic() + self.every
            time.sleep(POLL)

    def _checkpoint(self, final: bool) -> bool:
        try:
            where, r = self.dest.checkpoint(
                lambda path: dump(self.pid, path, leave_running=not final, show_progress=not self.quiet))
        except HpcckptError as e:  # the job runs on; the next interval tries again
            _say(self.quiet, f"{'final ' if final else ''}checkpoint failed, job continues: {e}")
            return False
        _say(self.quiet, f"{'final ' if final else ''}checkpoint {where}: {r.pages_bytes / 2**20:.1f} MiB, "
                         f"frozen {r.frozen_s * 1000:.0f} ms" + ("; job stopped" if final else ""))
        if final:  # dump killed the job; as its tracer it may have collected it already
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        return True

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue and job):
            return
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        _say(self.quiet, f"requeued Slurm job {job}" if res.returncode == 0 else
             f"scontrol requeue {job}: {res.stderr.strip() or res.returncode} (Slurm may be requeueing it already)")
