"""The scheduler backend built on Slurm's own commands (sbatch, squeue, scontrol, scancel).

This is the backend that works with any Slurm that has the commands on PATH, whatever
its version, which is why it is the default: pyslurm must be built for the exact Slurm
release. Each call is one short subprocess with a timeout, so a hung controller turns
into an error naming the command instead of a job that hangs.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Collection, Mapping

from .backend import context_with_limits, poll_until
from .context import JobContext
from .errors import BackendUnavailableError, CommandError, JobNotFoundError
from .model import Job, JobSubmitDescription
from .scontrol_text import parse_jobs
from .squeue_json import job_from_json, parse_document
from .timefmt import format_duration

log = logging.getLogger(__name__)

#: scontrol/scancel wording for an unknown job id.
_INVALID_JOB = "Invalid job id specified"


class CommandsBackend:
    """SchedulerBackend over subprocess calls.

    ``env`` is added to this process's environment for every command (typically
    ``{"SLURM_CONF": ...}`` for a cluster whose config is not in /etc/slurm).
    """

    name = "commands"

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> None:
        self._env = {**os.environ, **(env or {})}
        self._timeout = timeout

    # -- running commands -------------------------------------------------------------

    def _run(self, argv: list[str], job_id: int | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  env=self._env, timeout=self._timeout, check=False)
        except FileNotFoundError:
            raise BackendUnavailableError(
                f"`{argv[0]}` not found on PATH: install Slurm's client commands "
                f"(Debian: slurm-client)") from None
        except subprocess.TimeoutExpired:
            raise CommandError(argv, None, "", job_id,
                               f"no answer within {self._timeout:g} s (controller down?)") from None
        if proc.returncode != 0:
            if _INVALID_JOB in proc.stderr and job_id is not None:
                raise JobNotFoundError(job_id, " ".join(argv))
            raise CommandError(argv, proc.returncode, proc.stderr, job_id)
        return proc

    # -- SchedulerBackend -------------------------------------------------------------

    def submit(self, desc: JobSubmitDescription) -> int:
        argv = ["sbatch", "--parsable", *sbatch_options(desc)]
        proc = self._run(argv, stdin=desc.script_text())
        # --parsable prints "JOBID" or "JOBID;CLUSTER".
        first = proc.stdout.strip().split(";", 1)[0]
        try:
            job_id = int(first)
        except ValueError:
            raise CommandError(argv, 0, proc.stderr, None,
                               f"unexpected output {proc.stdout.strip()!r}") from None
        log.debug("submitted job %d (%s)", job_id, desc.name or "unnamed")
        return job_id

    def load(self, job_id: int) -> Job:
        argv = ["scontrol", "show", "job", "-o", str(job_id)]
        proc = self._run(argv, job_id)
        for job in parse_jobs(proc.stdout):
            if job.job_id == job_id:
                return job
        raise JobNotFoundError(job_id, " ".join(argv))

    def jobs(self) -> list[Job]:
        argv = ["squeue", "--json"]
        proc = self._run(argv)
        try:
            records, errors = parse_document(proc.stdout)
        except ValueError as exc:
            raise CommandError(argv, 0, proc.stderr, None, f"unreadable JSON: {exc}") from None
        if errors:
            raise CommandError(argv, 0, str(errors), None, f"squeue reported {errors}")
        return [job_from_json(r) for r in records]

    def requeue(self, job_id: int) -> None:
        self._run(["scontrol", "requeue", str(job_id)], job_id)

    def set_comment(self, job_id: int, text: str) -> None:
        self._run(["scontrol", "update", f"JobId={job_id}", f"Comment={text}"], job_id)

    def cancel(self, job_id: int, signal: str | int | None = None,
               batch_only: bool = False) -> None:
        if signal is None and not batch_only:
            # Plain `scancel UNKNOWN_ID` exits 0 without a word in 22.05: check first.
            self.load(job_id)
        argv = ["scancel"]
        if signal is not None:
            argv.append(f"--signal={signal}")
        if batch_only:
            argv.append("--batch")
        argv.append(str(job_id))
        self._run(argv, job_id)

    def wait_state(self, job_id: int, states: Collection[str], timeout: float,
                   where: Callable[[Job], bool] | None = None) -> Job:
        return poll_until(self.load, job_id, states, timeout, where)

    def environment(self) -> JobContext:
        return context_with_limits(self.load, self._env)


def sbatch_options(desc: JobSubmitDescription) -> list[str]:
    """The sbatch command-line options for a description (script goes on stdin)."""
    opts: list[str] = []
    if desc.name:
        opts.append(f"--job-name={desc.name}")
    if desc.partition:
        opts.append(f"--partition={desc.partition}")
    if desc.time_limit is not None:
        opts.append(f"--time={format_duration(desc.time_limit)}")
    if desc.requeue is True:
        opts.append("--requeue")
    elif desc.requeue is False:
        opts.append("--no-requeue")
    if desc.signal:
        opts.append(f"--signal={desc.signal}")
    if desc.output:
        opts.append(f"--output={desc.output}")
    if desc.error:
        opts.append(f"--error={desc.error}")
    if desc.work_dir:
        opts.append(f"--chdir={desc.work_dir}")
    if desc.nodelist:
        opts.append(f"--nodelist={desc.nodelist}")
    if desc.environment:
        # ALL keeps the submitter's environment (sbatch's default) and adds these.
        opts.append("--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in
                                                    desc.environment.items())]))
    opts.extend(desc.extra_options)
    return opts
