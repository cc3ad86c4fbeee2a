"""The running job's view of itself, read from the SLURM_* environment.

Inside a job hpcckpt must know, without asking anybody, which job it is, which run of
it (the *generation*: Slurm's restart count, 0 on the first run, which fences a stale
copy on a cut-off node), where it runs and whether it is the batch step. Slurm 22.05
does not put the job's end time into the environment (no SLURM_JOB_END_TIME), so
``time_limit``/``end_time`` are filled in by a backend that asks the controller.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .errors import NotInJobError, SchedulerError
from .hostlist import expand


@dataclass(frozen=True)
class JobContext:
    """The current job, as seen from inside one of its processes."""

    job_id: int
    generation: int
    node_name: str | None
    job_name: str | None = None
    partition: str | None = None
    nodes: tuple[str, ...] = ()
    cluster: str | None = None
    submit_dir: str | None = None
    step_id: str | None = None
    in_batch_step: bool = False
    array_job_id: int | None = None
    array_task_id: int | None = None
    time_limit: timedelta | None = None
    end_time: datetime | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> "JobContext":
        """Read the context from ``env`` (default: this process's environment).

        Raises NotInJobError when SLURM_JOB_ID is absent.
        """
        env = os.environ if env is None else env
        raw_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not raw_id:
            raise NotInJobError("not inside a Slurm job: SLURM_JOB_ID is not set")
        try:
            job_id = int(raw_id)
        except ValueError:
            raise NotInJobError(f"SLURM_JOB_ID={raw_id!r} is not a job id") from None
        step_id = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
        node = env.get("SLURMD_NODENAME")
        return cls(
            job_id=job_id,
            # Unset on the first run; Slurm sets it from the first requeue on.
            generation=_int(env.get("SLURM_RESTART_COUNT"), "SLURM_RESTART_COUNT") or 0,
            node_name=node,
            job_name=env.get("SLURM_JOB_NAME"),
            partition=env.get("SLURM_JOB_PARTITION"),
            nodes=tuple(expand(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))),
            cluster=env.get("SLURM_CLUSTER_NAME"),
            submit_dir=env.get("SLURM_SUBMIT_DIR"),
            step_id=step_id,
            # The batch shell runs on a node (SLURMD_NODENAME) but in no srun step;
            # an salloc shell has no SLURMD_NODENAME, an srun task has SLURM_STEP_ID.
            in_batch_step=bool(node) and step_id is None,
            array_job_id=_int(env.get("SLURM_ARRAY_JOB_ID"), "SLURM_ARRAY_JOB_ID"),
            array_task_id=_int(env.get("SLURM_ARRAY_TASK_ID"), "SLURM_ARRAY_TASK_ID"),
        )

    def with_limits(self, time_limit: timedelta | None,
                    end_time: datetime | None) -> "JobContext":
        """A copy with the time limit and projected end time the controller reported."""
        return replace(self, time_limit=time_limit, end_time=end_time)

    def seconds_left(self, now: datetime | None = None) -> float | None:
        """Seconds until the time limit ends the job; None when unknown or unlimited."""
        if self.end_time is None:
            return None
        now = now or datetime.now().astimezone()
        return (self.end_time - now).total_seconds()


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SchedulerError(f"{name}={value!r} in the job environment is not an integer") from None
