"""What the integration knows about a job: plain dataclasses, the same for every backend.

Modelled on pyslurm's ``Job``/``JobSubmitDescription`` (field names follow it where it
has one), but frozen and backend-free, so that code and tests above the scheduler
interface never see whether the data came from ``scontrol`` text, ``squeue --json`` or
libslurm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

# Job states as Slurm names them (squeue --json "job_state", scontrol "JobState").
PENDING = "PENDING"
RUNNING = "RUNNING"
SUSPENDED = "SUSPENDED"
COMPLETING = "COMPLETING"
COMPLETED = "COMPLETED"
CANCELLED = "CANCELLED"
FAILED = "FAILED"
TIMEOUT = "TIMEOUT"
NODE_FAIL = "NODE_FAIL"
PREEMPTED = "PREEMPTED"
REQUEUED = "REQUEUED"

#: States a job never leaves. NODE_FAIL and PREEMPTED are missing on purpose: a
#: requeueable job passes through them on its way back to PENDING.
FINAL_STATES = frozenset({
    COMPLETED, CANCELLED, FAILED, TIMEOUT, "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
})


@dataclass(frozen=True)
class Job:
    """One job as the controller sees it now.

    ``restart_count`` is Slurm's requeue counter (``Restarts=``, ``restart_cnt``); it is
    also what the job itself sees as SLURM_RESTART_COUNT, hpcckpt's *generation*.
    """

    job_id: int
    name: str
    state: str
    state_reason: str | None = None
    restart_count: int = 0
    user: str | None = None
    partition: str | None = None
    nodes: tuple[str, ...] = ()
    batch_host: str | None = None
    time_limit: timedelta | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    requeue: bool | None = None
    work_dir: str | None = None
    standard_output: str | None = None
    comment: str | None = None      # free text; hpcckpt puts its errors here

    @property
    def is_final(self) -> bool:
        """True once the job can no longer run again."""
        return self.state in FINAL_STATES

    @property
    def node_list(self) -> str:
        """The nodes as one comma-separated string (handy in messages)."""
        return ",".join(self.nodes)


@dataclass
class JobSubmitDescription:
    """What to submit: a batch script plus the options the integration cares about.

    ``time_limit`` takes minutes (int), a timedelta or a Slurm time string. ``signal``
    is sbatch's ``--signal`` value, e.g. ``"B:USR2@60"``. ``requeue`` None leaves the
    cluster default (JobRequeue). ``extra_options`` are passed to sbatch verbatim,
    for everything this narrow interface does not name.
    """

    script: str
    name: str | None = None
    partition: str | None = None
    time_limit: timedelta | int | str | None = None
    requeue: bool | None = None
    signal: str | None = None
    output: str | None = None
    error: str | None = None
    work_dir: str | None = None
    nodelist: str | None = None
    environment: dict[str, str] | None = None
    extra_options: list[str] = field(default_factory=list)

    def script_text(self) -> str:
        """The script as Slurm needs it: sbatch refuses one without an interpreter line."""
        if self.script.startswith("#!"):
            return self.script
        return "#!/bin/sh\n" + self.script
