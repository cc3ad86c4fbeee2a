"""Read ``scontrol show job -o`` output into Job records.

Slurm 22.05's scontrol has no --json, and ``squeue --json`` cannot select one job, so
for a single job the one-line ``Key=Value Key=Value`` form is the cheapest exact source.
Values may contain spaces (Command=, Comment=), so a record is split only before a word
that looks like a key followed by ``=``.
"""
from __future__ import annotations

import re

from .hostlist import expand
from .model import Job
from .timefmt import parse_duration, parse_timestamp

_KEY_START = re.compile(r" (?=[A-Za-z][A-Za-z0-9_/:]*=)")
_NULL = {"", "(null)", "N/A", "None"}


def parse_record(line: str) -> dict[str, str]:
    """Split one ``-o`` line into its fields (the first ``=`` separates key and value)."""
    fields: dict[str, str] = {}
    for token in _KEY_START.split(line.strip()):
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value.strip()
    return fields


def parse_jobs(text: str) -> list[Job]:
    """Every job in ``scontrol show job -o`` output (one line per job)."""
    return [job_from_record(parse_record(line)) for line in text.splitlines()
            if line.startswith("JobId=")]


def job_from_record(rec: dict[str, str]) -> Job:
    """Build a Job from one parsed record."""
    exit_code, exit_signal = _exit(rec.get("ExitCode"))
    state = rec.get("JobState", "UNKNOWN")
    return Job(
        job_id=int(rec["JobId"]),
        name=rec.get("JobName", ""),
        state=state,
        state_reason=_opt(rec.get("Reason")),
        restart_count=int(rec.get("Restarts", "0") or 0),
        user=_user(rec.get("UserId")),
        partition=_opt(rec.get("Partition")),
        nodes=tuple(expand(rec.get("NodeList"))),
        batch_host=_opt(rec.get("BatchHost")),
        time_limit=parse_duration(rec.get("TimeLimit")),
        submit_time=parse_timestamp(rec.get("SubmitTime")),
        start_time=parse_timestamp(rec.get("StartTime")),
        # For a running job EndTime is the projected end (start + limit).
        end_time=parse_timestamp(rec.get("EndTime")),
        exit_code=exit_code,
        exit_signal=exit_signal,
        requeue=_bool(rec.get("Requeue")),
        work_dir=_opt(rec.get("WorkDir")),
        standard_output=_opt(rec.get("StdOut")),
        comment=_opt(rec.get("Comment")),
    )


def _opt(value: str | None) -> str | None:
    return None if value is None or value in _NULL else value


def _user(value: str | None) -> str | None:
    """``UserId=root(0)`` -> ``root``."""
    if not value:
        return None
    return value.split("(", 1)[0] or None


def _bool(value: str | None) -> bool | None:
    if value is None or value in _NULL:
        return None
    return value not in ("0", "no", "No")


def _exit(value: str | None) -> tuple[int | None, int | None]:
    """``ExitCode=1:0`` -> (1, 0): exit status and terminating signal."""
    if not value or ":" not in value:
        return None, None
    code, sig = value.split(":", 1)
    return int(code), int(sig)
