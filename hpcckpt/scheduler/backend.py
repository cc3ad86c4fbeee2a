"""The scheduler interface: what hpcckpt's Slurm integration asks of a scheduler.

Kept narrow on purpose (submit, look, requeue, signal, wait, "who am I") so a second
backend is a small file, and so tests can run the same checks against each backend.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Protocol, runtime_checkable

from .context import JobContext
from .errors import JobEndedError, SchedulerError, WaitTimeoutError
from .model import Job, JobSubmitDescription

log = logging.getLogger(__name__)


@runtime_checkable
class SchedulerBackend(Protocol):
    """Operations on Slurm jobs; every method raises a SchedulerError on failure."""

    #: Short name for logs and messages ("commands", "pyslurm").
    name: str

    def submit(self, desc: JobSubmitDescription) -> int:
        """Submit a batch job; return its id."""
        ...

    def load(self, job_id: int) -> Job:
        """The job as the controller sees it now (JobNotFoundError if unknown)."""
        ...

    def jobs(self) -> list[Job]:
        """Every job the controller knows, finished ones included until MinJobAge."""
        ...

    def requeue(self, job_id: int) -> None:
        """Put a running job back in the queue (its next run has restart_count + 1)."""
        ...

    def set_comment(self, job_id: int, text: str) -> None:
        """Set the job's comment (its owner may): where `hpcckpt status` finds an error
        when the job's store itself is unusable."""
        ...

    def cancel(self, job_id: int, signal: str | int | None = None,
               batch_only: bool = False) -> None:
        """Cancel the job, or with ``signal`` only send it that signal.

        ``batch_only`` signals just the batch shell (``scancel -b``), the way
        ``--signal=B:...`` does, instead of every step.
        """
        ...

    def wait_state(self, job_id: int, states: Collection[str], timeout: float,
                   where: Callable[[Job], bool] | None = None) -> Job:
        """Poll until the job is in one of ``states`` (and ``where(job)`` holds)."""
        ...

    def environment(self) -> JobContext:
        """The current job's context (NotInJobError outside a job)."""
        ...


def context_with_limits(load: Callable[[int], Job], env) -> JobContext:
    """Shared body of ``environment``: the job's context from its environment, with the
    time limit and end time from the controller (the environment has neither)."""
    ctx = JobContext.from_environ(env)
    try:
        job = load(ctx.job_id)
    except SchedulerError as exc:
        # The context is still right without the limits; say why they are missing.
        log.warning("job %d: time limit unknown: %s", ctx.job_id, exc)
        return ctx
    return ctx.with_limits(job.time_limit, job.end_time)


def poll_until(load: Callable[[int], Job], job_id: int, states: Collection[str],
               timeout: float, where: Callable[[Job], bool] | None = None,
               interval: float = 0.5) -> Job:
    """Shared body of ``wait_state``: poll ``load`` until the job matches.

    Gives up at once when the job ends in a state nobody waits for, instead of
    sleeping out the timeout: a job that FAILED will not become RUNNING.
    """
    wanted = {s.upper() for s in states}
    deadline = time.monotonic() + timeout
    last: Job | None = None
    while True:
        last = load(job_id)
        if last.state in wanted and (where is None or where(last)):
            return last
        if last.is_final and last.state not in wanted:
            raise JobEndedError(job_id, wanted, last.state, last.state_reason or "None")
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(job_id, wanted, timeout,
                                   _describe(last))
        time.sleep(interval)


def _describe(job: Job) -> str:
    return f"{job.state} (reason {job.state_reason}, restarts {job.restart_count})"
