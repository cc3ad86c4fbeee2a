"""The scheduler backend over pyslurm (libslurm), for sites whose Slurm matches it.

pyslurm is compiled against one Slurm release (PyPI's 25.11.x needs Slurm 25.11) and
refuses to work with another ("Slurm version mismatch"), so this backend is only ever
chosen after ``check_pyslurm()`` says yes; Debian 12's Slurm 22.05 never matches.
It saves the process start-up of the command backend on busy controllers.

Not exercised by the test cluster here (no pyslurm for 22.05); its contract is the
same SchedulerBackend the command backend passes the tests for.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import re
import subprocess
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta
from types import ModuleType
from typing import Any

from .backend import context_with_limits, poll_until
from .context import JobContext
from .errors import BackendUnavailableError, JobNotFoundError, SchedulerError
from .hostlist import expand
from .model import Job, JobSubmitDescription
from .timefmt import format_duration

log = logging.getLogger(__name__)


def installed_slurm_version(env: Mapping[str, str] | None = None) -> str | None:
    """The local Slurm release as ``"22.05.8"`` from ``slurmd -V``/``sinfo -V``.

    ``sinfo -V`` needs a readable config even to print its version, so slurmd (which
    does not) is asked first.
    """
    for argv in (["slurmd", "-V"], ["sinfo", "-V"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                 env={**os.environ, **(env or {})}, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
        if m:
            return m.group(0)
    return None


def same_release(pyslurm_version: str, slurm_version: str) -> bool:
    """pyslurm X.Y.* works with Slurm X.Y.* only ("25.11.0" vs "25.11.2": yes)."""
    def major_minor(v: str) -> tuple[int, int] | None:
        m = re.match(r"(\d+)\.(\d+)", v)
        return (int(m.group(1)), int(m.group(2))) if m else None
    a, b = major_minor(pyslurm_version), major_minor(slurm_version)
    return a is not None and a == b


def check_pyslurm(env: Mapping[str, str] | None = None) -> tuple[ModuleType | None, str]:
    """Return (pyslurm module, "") when usable here, else (None, the reason why not)."""
    try:
        version = importlib.metadata.version("pyslurm")
    except importlib.metadata.PackageNotFoundError:
        return None, "pyslurm is not installed"
    slurm = installed_slurm_version(env)
    if slurm is None:
        return None, "cannot tell the installed Slurm version (no slurmd/sinfo -V)"
    if not same_release(version, slurm):
        return None, f"pyslurm {version} is built for another Slurm than the installed {slurm}"
    try:
        module = importlib.import_module("pyslurm")
    except Exception as exc:  # pyslurm raises plain errors on ABI/version mismatch
        return None, f"import pyslurm failed: {exc}"
    return module, ""


class PyslurmBackend:
    """SchedulerBackend over pyslurm's Job/Jobs/JobSubmitDescription API."""

    name = "pyslurm"

    def __init__(self, module: ModuleType | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        if module is None:
            module, why = check_pyslurm(env)
            if module is None:
                raise BackendUnavailableError(f"pyslurm backend unavailable: {why}")
        self._ps = module
        self._env = dict(os.environ if env is None else {**os.environ, **env})

    def _call(self, what: str, job_id: int | None, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            text = str(exc)
            if job_id is not None and "Invalid job id" in text:
                raise JobNotFoundError(job_id, f"pyslurm {what}") from exc
            subject = f"job {job_id}: " if job_id is not None else ""
            raise SchedulerError(f"{subject}pyslurm {what} failed: {text}") from exc

    def submit(self, desc: JobSubmitDescription) -> int:
        fields: dict[str, Any] = {"script": desc.script_text()}
        if desc.name:
            fields["name"] = desc.name
        if desc.partition:
            fields["partitions"] = desc.partition
        if desc.time_limit is not None:
            fields["time_limit"] = format_duration(desc.time_limit)
        if desc.requeue is not None:
            fields["is_requeueable"] = desc.requeue
        if desc.signal:
            fields["signal"] = desc.signal
        if desc.output:
            fields["standard_output"] = desc.output
        if desc.error:
            fields["standard_error"] = desc.error
        if desc.work_dir:
            fields["working_directory"] = desc.work_dir
        if desc.nodelist:
            fields["required_nodes"] = desc.nodelist
        if desc.environment:
            fields["environment"] = dict(desc.environment)
        if desc.extra_options:
            raise SchedulerError(
                f"pyslurm submit: extra sbatch options {desc.extra_options} cannot be "
                f"passed through libslurm; use the commands backend")
        sub = self._call("JobSubmitDescription", None,
                         lambda: self._ps.JobSubmitDescription(**fields))
        return int(self._call("submit", None, sub.submit))

    def load(self, job_id: int) -> Job:
        return _to_job(self._call("Job.load", job_id, lambda: self._ps.Job.load(job_id)))

    def jobs(self) -> list[Job]:
        loaded = self._call("Jobs.load", None, self._ps.Jobs.load)
        return [_to_job(j) for j in loaded.values()]

    def requeue(self, job_id: int) -> None:
        self._call("requeue", job_id, lambda: self._ps.Job(job_id).requeue())

    def set_comment(self, job_id: int, text: str) -> None:
        self._call("set comment", job_id,
                   lambda: self._ps.Job(job_id).modify(self._ps.JobSubmitDescription(comment=text)))

    def cancel(self, job_id: int, signal: str | int | None = None,
               batch_only: bool = False) -> None:
        job = self._ps.Job(job_id)
        if signal is None and not batch_only:
            self.load(job_id)
            self._call("cancel", job_id, job.cancel)
            return
        # Same meaning as `scancel [--batch] [--signal=SIG]`: KILL unless told otherwise.
        steps = "batch" if batch_only else "children"
        self._call("send_signal", job_id,
                   lambda: job.send_signal(signal if signal is not None else "SIGKILL",
                                           steps=steps))

    def wait_state(self, job_id: int, states: Collection[str], timeout: float,
                   where: Callable[[Job], bool] | None = None) -> Job:
        return poll_until(self.load, job_id, states, timeout, where)

    def environment(self) -> JobContext:
        return context_with_limits(self.load, self._env)


def _to_job(j: Any) -> Job:
    """pyslurm.Job -> Job. pyslurm gives minutes and epochs, like squeue --json."""
    def when(v: Any) -> datetime | None:
        return datetime.fromtimestamp(v).astimezone() if v else None
    limit = getattr(j, "time_limit", None)
    return Job(
        job_id=int(j.id),
        name=j.name or "",
        state=j.state,
        state_reason=getattr(j, "state_reason", None),
        restart_count=int(getattr(j, "requeue_count", 0) or 0),
        user=getattr(j, "user_name", None),
        partition=j.partition,
        nodes=tuple(expand(getattr(j, "allocated_nodes", None))),
        batch_host=getattr(j, "batch_host", None),
        time_limit=timedelta(minutes=limit) if isinstance(limit, int) else None,
        submit_time=when(getattr(j, "submit_time", None)),
        start_time=when(getattr(j, "start_time", None)),
        end_time=when(getattr(j, "end_time", None)),
        exit_code=getattr(j, "exit_code", None),
        exit_signal=getattr(j, "exit_code_signal", None),
        requeue=getattr(j, "is_requeueable", None),
        work_dir=getattr(j, "working_directory", None),
        standard_output=getattr(j, "standard_output", None),
        comment=getattr(j, "comment", None) or None,
    )
