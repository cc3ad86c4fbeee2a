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

When: a schedule (hpcckpt/schedules.py) gives the interval to the next periodic
checkpoint from the last measured one. Inside a Slurm job with a time limit the
supervisor also reads the job's end time from the controller and, a margin before it
(the schedule's margin=, else twice the measured checkpoint time plus 10 s), takes a
final checkpoint and requeues the job, so a long job chains through allocations without
relying on --signal (whose warning Slurm 22.05 sends up to a minute early or ~10 s late).
After every checkpoint a status file (destinations.RunStatus) is rewritten atomically
for `hpcckpt status`.
"""
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from . import outputs
from .cli import FORWARDED, exit_like
from .destinations import RunStatus, write_status
from .engine import cgroup_freezer, memory, pidns
from .engine.dump import DumpResult, dump
from .engine.incremental import TreeTracker
from .engine.restore import restore
from .images.imageset import ImageSet
from .errors import HpcckptError, ProcessGoneError
from .schedules import Measurement, PreemptOnly, Schedule, format_duration

POLL = 0.05
#: The least time left for the last checkpoint before the walltime; Slurm's controller
#: enforces limits on a timer, but a dump that starts too late is lost whole.
MIN_MARGIN = 10.0


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"hpcckpt run: {msg}", file=sys.stderr, flush=True)


def start(command: list[str], cg=None, netns: str | None = None) -> int:
    """Fork the job as PID 2 of our PID namespace; with `netns` (a namespace file, e.g.
    /run/netns/NAME, the site made with the job's veth and addresses) the job, not this
    monitor, joins that network namespace: checkpoints then save it (engine/netns.py)."""
    nsfd = None
    if netns:
        try:
            nsfd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise HpcckptError(f"--netns {netns}: {e.strerror}") from None
    pidns.ensure()
    pid = os.fork()
    if pid == 0:
        try:
            if cg is not None:
                cgroup_freezer.join(cg)   # the job's own cgroup: dumps freeze it as one
            if nsfd is not None:
                from .kernel import rtnl
                rtnl._setns(nsfd, f"network namespace {netns}")
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the job gets stdio, not our strays
            os.execvp(command[0], command)
        except OSError as e:
            print(f"hpcckpt run: cannot start {command[0]}: {e.strerror}", file=sys.stderr)
        except HpcckptError as e:
            print(f"hpcckpt run: cannot start {command[0]}: {e}", file=sys.stderr)
        os._exit(127)
    if nsfd is not None:
        os.close(nsfd)
    return pid


def append_outputs() -> None:
    """Make our stdout/stderr files (a batch job's output file) O_APPEND, as
    --open-mode=append would. The job inherits them, so the checkpoint records O_APPEND
    and a resumed job, which gets its own open file again, still writes at the end, and
    so do we: without it the resumed job and this supervisor would write at two separate
    offsets of one file and overwrite each other's lines."""
    for fd in (1, 2):
        try:
            if not os.path.isfile(f"/proc/self/fd/{fd}"):
                continue
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_APPEND and flags & os.O_ACCMODE != os.O_RDONLY:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
        except OSError:
            pass


def job_end_time(quiet: bool) -> float | None:
    """Wall-clock end of this Slurm job's allocation, or None (no job, no limit, no answer)."""
    if not (os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")):
        return None
    from .scheduler import CommandsBackend, SchedulerError
    try:
        ctx = CommandsBackend(timeout=10).environment()
    except SchedulerError as e:
        _say(quiet, f"cannot read the job's time limit, no walltime checkpoint: {e}")
        return None
    return ctx.end_time.timestamp() if isinstance(ctx.end_time, datetime) else None


def run(command: list[str], dest=None, every: float | None = None, quiet: bool = False,
        checkpoint_signal: int = signal.SIGUSR1, final_signal: int = signal.SIGTERM,
        requeue: bool | None = None, schedule: Schedule | None = None, walltime: bool = True,
        errors: list[str] | None = None, full_every: int | None = 10,
        tcp_established: bool = False, netns: str | None = None) -> int:
    """Start or resume `command`, supervise it, exit as it does.

    `netns`: the job runs in that network namespace (a file like /run/netns/NAME), and
    every checkpoint saves it; a resume builds a new one from the image.

    Checkpoints are incremental (only pages written since the previous one, tracked by
    the engine from the start or the resume on), with a full one every `full_every`
    (1: always full; None: only when the chain breaks).

    `errors` are problems found before the job started (a bad schedule, a store that
    cannot be written): they are reported in the output and in the status file, and the
    job runs anyway, with what still works.
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise HpcckptError("nothing to run: give a command after --")
    if requeue is None:
        requeue = bool(os.environ.get("SLURM_JOB_ID"))
    if schedule is None and every:
        from .schedules import every as every_schedule
        schedule = every_schedule(every)
    schedule = schedule or PreemptOnly(spec="signals only")
    latest = dest.latest() if dest else None
    tracker = TreeTracker() if dest is not None and full_every != 1 else None
    if tracker is not None and latest and _untrackable(_image_vmas(latest), quiet):
        tracker = None
    append_outputs()
    jobcg = cgroup_freezer.job_cgroup()
    pid = None
    try:
        if latest:
            pidns.ensure()
            refilled = outputs.refill(latest)
            # --netns PATH that the site made again for this rerun is joined as it is; else
            # an image with a namespace gets a new one built from it
            join = netns if netns and os.path.exists(netns) else None
            r = restore(latest, show_progress=not quiet, tracker=tracker, shell_job=True,  # our terminal, if any
                        on_ready=(lambda root: _adopt(jobcg, root)) if jobcg else None, join_netns=join)
            pid = r.pid
            for note in dest.notes + refilled:
                _say(quiet, note)
            _say(quiet, f"resumed from {latest} as PID {pid} in {r.total_s:.3f} s")
        else:
            pid = start(command, jobcg, netns)
            _say(quiet, f"started {' '.join(command)} as PID {pid} (PID {pidns.JOB_PID} in its namespace)")
        for e in errors or []:  # after the restore: it rolls a shared output file back
            _say(quiet, f"error: {e}")
        end = job_end_time(quiet) if walltime and dest else None
        sup = Supervisor(pid, dest, schedule, quiet, checkpoint_signal, final_signal, requeue, end, errors or [])
        sup.tracker, sup.full_every = tracker, full_every
        sup.tcp_established = tcp_established
        sup.netns = bool(netns) or bool(latest and ImageSet(latest).inventory().HasField("netns"))
        sup.depth = ImageSet(latest).inventory().chain_depth if latest else None
        if latest:
            dest.release()
        status = sup.loop()
    finally:
        pidns.shutdown(pid)     # collects the job too, if nothing did yet
        if jobcg is not None:
            cgroup_freezer.remove(jobcg)
    return exit_like(status) if status is not None else 0


def _adopt(cg, root: int) -> None:
    """A resumed job, still stopped: every process of it into the job's cgroup."""
    from .engine import tree
    cgroup_freezer.join(cg, tree.members(root, tree.scan(), tree.namespace_init(root))[0])


def _untrackable(vmas, quiet: bool) -> bool:
    """A job holding a huge private reservation (mariadbd's 8 TiB buffer-pool range) gets
    full checkpoints: dirty-page tracking is not bounded for such a mapping yet, while a
    full dump costs what its used pages cost (engine/memory.py `_sparse_runs`)."""
    huge = memory.huge_private(vmas)
    if huge:
        _say(quiet, f"full checkpoints only: the job maps {', '.join(huge[:3])}, too large to track "
                    "dirty pages in")
    return bool(huge)


def _image_vmas(path) -> list:
    iset = ImageSet(path)
    return [v for pid in iset.inventory().pids for v in iset.process(pid).mm.vmas]


def _tree_vmas(root: int) -> list:
    from .engine.listeners import descendants
    from .kernel import proc
    out = []
    for pid in descendants(root):
        try:
            out.extend(proc.maps(pid, with_flags=False))
        except (OSError, HpcckptError):
            continue
    return out


class Supervisor:
    """The job's parent: waits, checkpoints per schedule, before the walltime and on
    signals, forwards the rest, and keeps the status file current."""

    def __init__(self, pid: int, dest, schedule: Schedule, quiet: bool, checkpoint_signal: int,
                 final_signal: int, requeue: bool, end_time: float | None = None,
                 errors: list[str] | None = None):
        self.pid, self.dest, self.schedule, self.quiet = pid, dest, schedule, quiet
        self.ckpt_sig, self.final_sig, self.requeue = checkpoint_signal, final_signal, requeue
        self.end_time = end_time
        self.pending: set[int] = set()
        self.outputs = outputs.own_outputs()
        self.output_warned = False
        self.last: Measurement | None = None
        self.since = time.monotonic()   # end of the last checkpoint (or start)
        self.status = RunStatus(job=getattr(dest, "job", "-"), generation=getattr(dest, "generation", 0),
                                host=socket.gethostname(), pid=os.getpid(), schedule=schedule.describe(),
                                policy=schedule.kind, walltime_end=end_time)
        for e in errors or []:
            self.status.error(e)
        self.told: str | None = None   # the error last put in the Slurm job's comment
        for s in set(FORWARDED) | {checkpoint_signal, final_signal}:
            signal.signal(s, self._on_signal)

    def _on_signal(self, sig: int, _frame) -> None:
        if self.dest and sig in (self.ckpt_sig, self.final_sig):
            self.pending.add(sig)
        else:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    # -- when -------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """Monotonic time of the next periodic checkpoint, None if there is none."""
        if not self.dest:
            return None
        tau = self.schedule.interval(self.last)
        return None if tau is None else self.since + tau

    def margin(self) -> float:
        if self.schedule.margin_s is not None:
            return self.schedule.margin_s
        cost = self.last.total_s if self.last else 0.0
        return max(MIN_MARGIN, 2 * cost + MIN_MARGIN)

    def final_deadline(self) -> float | None:
        """Monotonic time at which the last checkpoint before the walltime starts."""
        if self.end_time is None or not self.dest:
            return None
        return time.monotonic() + (self.end_time - time.time()) - self.margin()

    def _publish_status(self, state: str = "running") -> None:
        self._tell_scheduler()
        if not self.dest:
            return
        st, now = self.status, time.monotonic()
        st.state = state
        due, deadline = self.next_due(), self.final_deadline()
        st.next_checkpoint = None if due is None or state != "running" else time.time() + (due - now)
        st.final_checkpoint_by = None if deadline is None or state != "running" else time.time() + (deadline - now)
        try:
            write_status(self.dest.status_path, st)
        except OSError as e:
            _say(self.quiet, f"cannot write the status file: {e}")

    def _tell_scheduler(self) -> None:
        """The newest error also goes into the Slurm job's comment: `hpcckpt status` finds
        it there when the store, where the status file lives, is what failed."""
        job = os.environ.get("SLURM_JOB_ID", "")
        last = self.status.errors[-1] if self.status.errors else None
        if not job.isdigit() or last is None or last == self.told:
            return
        self.told = last
        from .scheduler import CommandsBackend, SchedulerError
        try:
            CommandsBackend(timeout=10).set_comment(int(job), " ".join(f"hpcckpt: {last}".split())[:500])
        except SchedulerError as e:
            _say(self.quiet, f"cannot put the error in the job's comment: {e}")

    # -- the loop ---------------------------------------------------------------------
    def loop(self) -> int | None:
        """The job's wait status, or None when we stopped it after a final checkpoint."""
        self._publish_status()
        if self.end_time is not None and self.dest:
            _say(self.quiet, f"walltime ends in {format_duration(self.end_time - time.time())}: "
                             f"a final checkpoint and requeue {format_duration(self.margin())} before")
        walltime_armed = True
        while True:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # it ended during a dump, which collected its status
                if self.gone_status is None:
                    raise HpcckptError(f"job {self.pid} ended and its exit status was lost") from None
                done, status = self.pid, self.gone_status
            if done:
                self.status.exit = _describe(status)
                self._publish_status("finished")
                return status
            now = time.monotonic()
            if self.final_sig in self.pending:
                if self._final("final signal"):
                    return None
                self.pending.discard(self.final_sig)
                if self.gone_status is None:
                    os.kill(self.pid, self.final_sig)  # as if hpcckpt were not there
            deadline = self.final_deadline()
            if walltime_armed and deadline is not None and now >= deadline:
                walltime_armed = False  # one attempt: if it fails, the job runs to its limit
                if self.requeue:
                    if self._final("walltime"):
                        return None
                else:
                    self._checkpoint(final=False)
            due = self.next_due()
            if self.ckpt_sig in self.pending or (due is not None and now >= due):
                self.pending.discard(self.ckpt_sig)
                self._checkpoint(final=False)
            time.sleep(POLL)

    def _final(self, why: str) -> bool:
        # said before the dump: a resume rolls a shared output file back to its size at
        # the checkpoint, so what we print after the dump would vanish
        left = f", {self.end_time - time.time():.0f} s before the time limit" if why == "walltime" else ""
        _say(self.quiet, f"{why}{left}: final checkpoint, then " + (
            "requeue" if self.requeue and os.environ.get("SLURM_JOB_ID") else "stop"))
        if not self._checkpoint(final=True, why=why):
            return False
        requeued = self._requeue()
        self._publish_status("requeued" if requeued else "stopped")
        return True

    def _checkpoint(self, final: bool, why: str = "") -> bool:
        run_s = time.monotonic() - self.since
        label = f"{'final ' if final else ''}checkpoint" + (f" ({why})" if why and why != "final signal" else "")
        t0 = time.monotonic()
        try:
            where, r = self._dump_chained(final)
        except HpcckptError as e:  # the job runs on; the next interval tries again
            if isinstance(e, ProcessGoneError) and e.tid == self.pid and e.wait_status is not None:
                self.gone_status = e.wait_status  # it ended while being frozen: nothing to save
                return False
            msg = f"{label} failed, job continues: {e}"
            _say(self.quiet, msg)
            self.status.failures += 1
            self.status.error(msg)
            self.since = time.monotonic()
            self._publish_status()
            return False
        total = time.monotonic() - t0
        self._measured(where, r, total, run_s)
        _say(self.quiet, f"{label} {where}: {r.pages_bytes / 2**20:.1f} MiB, "
                         f"frozen {r.frozen_s * 1000:.0f} ms, {total:.2f} s in all" + ("; job stopped" if final else ""))
        if final:  # dump killed the job; as its tracer it may have collected it already
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        else:
            self._publish_status()
        return True

    tracker: TreeTracker | None = None
    full_every: int | None = None
    tcp_established: bool = False   # dumps take established TCP connections (engine/tcp.py)
    netns: bool = False             # dumps save the job's network namespace (engine/netns.py)
    gone_status: int | None = None  # the job's wait status, when a dump collected it
    depth: int | None = None        # parents of the last image; None: there is none

    def _dump_chained(self, final: bool) -> tuple[str, DumpResult]:
        """An incremental checkpoint against the last one when the chain may grow, else
        (or when the parent turns out unusable) a full one."""
        if self.tracker is not None and _untrackable(_tree_vmas(self.pid), self.quiet):
            self.tracker.close()            # before a dump arms it over the whole range
            self.tracker = None
        if self.tracker is not None and self.depth is not None and (
                not self.full_every or self.depth + 1 < self.full_every):
            try:
                where, r = self.dest.checkpoint(self._dump_into(final), parent=True)
                self.depth = self.depth + 1 if r.incremental else 0
                return where, r
            except ProcessGoneError:
                raise
            except HpcckptError as e:
                _say(self.quiet, f"incremental checkpoint failed ({e}); taking a full one")
        where, r = self.dest.checkpoint(self._dump_into(final))
        self.depth = 0
        return where, r

    def _dump_into(self, final: bool):
        def do_dump(path, parent=None):
            r = dump(self.pid, path, leave_running=not final, show_progress=not self.quiet, shell_job=True,
                     parent=parent, tracker=self.tracker, tcp_established=self.tcp_established,
                     netns=self.netns)
            try:
                warnings = outputs.keep(Path(path), self.outputs)
            except (HpcckptError, OSError, ValueError) as e:  # the checkpoint itself is good
                warnings = [f"cannot keep the output file in the checkpoint ({e}); after a requeue in "
                            "--open-mode=truncate its earlier lines are lost"]
            if warnings and not self.output_warned:
                self.output_warned = True
                for w in warnings:
                    _say(self.quiet, w)
                    self.status.error(w)
            return r
        return do_dump

    def _measured(self, where: str, r: DumpResult, total: float, run_s: float) -> None:
        self.last = Measurement(at=time.time(), frozen_s=r.frozen_s, total_s=total,
                                pages_bytes=r.pages_bytes, since_previous_s=run_s)
        self.since = time.monotonic()
        self.status.checkpoints += 1
        self.status.last = {"where": where, "at": self.last.at, "frozen_s": r.frozen_s, "total_s": total,
                            "pages_bytes": r.pages_bytes, "dirty_rate": self.last.dirty_rate}

    def _requeue(self) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue and job):
            return False
        # say it first: requeueing ourselves SIGTERMs the batch shell (us) at once
        self._publish_status("requeued")
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        _say(self.quiet, f"requeued Slurm job {job}" if res.returncode == 0 else
             f"scontrol requeue {job}: {res.stderr.strip() or res.returncode} (Slurm may be requeueing it already)")
        return res.returncode == 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"
