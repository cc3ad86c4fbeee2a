"""Errors of the scheduler interface.

They derive from hpcckpt's one hierarchy so the CLI reports them like every other error,
and each message names the job and the command (or library call) at fault, because the
person reading it is usually looking at a batch job's output file long after the fact.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from hpcckpt.errors import HpcckptError


class SchedulerError(HpcckptError):
    """Base of every error the scheduler interface raises."""


class BackendUnavailableError(SchedulerError):
    """The chosen backend cannot work here (command missing, pyslurm mismatch, ...)."""


class NotInJobError(SchedulerError):
    """The caller asked for the current job's context outside a Slurm job."""


class CommandError(SchedulerError):
    """A Slurm command exited non-zero or printed something we could not read."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str,
                 job_id: int | None = None, what: str | None = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        self.job_id = job_id
        subject = f"job {job_id}: " if job_id is not None else ""
        status = f"exit {returncode}" if returncode is not None else "no exit status"
        detail = what or (self.stderr.splitlines()[-1] if self.stderr else "no error output")
        super().__init__(f"{subject}`{' '.join(self.argv)}` failed ({status}): {detail}")


class JobNotFoundError(SchedulerError):
    """The controller does not know this job (never existed, or purged after MinJobAge)."""

    def __init__(self, job_id: int, source: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: not known to the Slurm controller ({source})")


class WaitTimeoutError(SchedulerError):
    """A job did not reach the awaited state in time."""

    def __init__(self, job_id: int, wanted: Iterable[str], timeout: float,
                 last_state: str | None) -> None:
        self.job_id = job_id
        self.wanted = sorted(wanted)
        self.last_state = last_state
        super().__init__(
            f"job {job_id}: not in {'/'.join(self.wanted)} after {timeout:g} s "
            f"(last seen {last_state or 'nothing'})")


class JobEndedError(SchedulerError):
    """While waiting, the job ended in a state other than the awaited ones."""

    def __init__(self, job_id: int, wanted: Iterable[str], state: str, reason: str) -> None:
        self.job_id = job_id
        self.state = state
        super().__init__(
            f"job {job_id}: ended {state} (reason {reason}) while waiting for "
            f"{'/'.join(sorted(wanted))}")
