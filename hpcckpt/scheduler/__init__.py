"""hpcckpt's interface to the batch scheduler (Slurm).

Everything the Slurm integration needs from the scheduler goes through
``SchedulerBackend`` (submit, load, jobs, requeue, cancel/signal, wait_state,
environment); ``select_backend()`` returns the one that works here. Inside a job,
``JobContext.from_environ()`` answers "which job and which run of it am I" with no
controller round trip.
"""
from .backend import SchedulerBackend, poll_until
from .commands import CommandsBackend
from .context import JobContext
from .errors import (BackendUnavailableError, CommandError, JobEndedError, JobNotFoundError,
                     NotInJobError, SchedulerError, WaitTimeoutError)
from .model import FINAL_STATES, Job, JobSubmitDescription
from .pyslurm_backend import PyslurmBackend
from .selection import select_backend

__all__ = [
    "BackendUnavailableError", "CommandError", "CommandsBackend", "FINAL_STATES", "Job",
    "JobContext", "JobEndedError", "JobNotFoundError", "JobSubmitDescription",
    "NotInJobError", "PyslurmBackend", "SchedulerBackend", "SchedulerError",
    "WaitTimeoutError", "poll_until", "select_backend",
]
