"""Read ``squeue --json`` output into Job records.

22.05's squeue --json ignores ``-j`` and ``-t`` and returns every job the controller
knows, so this is the source for listing all jobs and filtering happens here, in Python.
Its fields differ from scontrol's in ways that matter: epochs instead of local times,
minutes (or null for UNLIMITED) for the time limit, and ``standard_output`` still holds
the unexpanded pattern (``%j``), so it is expanded here for the common patterns.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from .hostlist import expand
from .model import Job
from .timefmt import from_epoch


def parse_document(text: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Return (job dicts, errors) from squeue's JSON document."""
    doc = json.loads(text)
    return list(doc.get("jobs") or []), list(doc.get("errors") or [])


def job_from_json(d: dict[str, Any]) -> Job:
    """Build a Job from one element of ``jobs``."""
    limit = d.get("time_limit")
    state = d.get("job_state") or "UNKNOWN"
    # A live job without a limit gets a made-up end a year ahead (scontrol says
    # Unknown); do not pass that on.
    live = state in ("RUNNING", "PENDING", "SUSPENDED", "CONFIGURING", "COMPLETING")
    end = None if (live and not limit) else from_epoch(d.get("end_time"))
    exit_code = d.get("exit_code")
    return Job(
        job_id=int(d["job_id"]),
        name=d.get("name") or "",
        state=state,
        state_reason=d.get("state_reason") if d.get("state_reason") not in ("", "None") else None,
        restart_count=int(d.get("restart_cnt") or 0),
        user=d.get("user_name") or None,
        partition=d.get("partition") or None,
        nodes=tuple(expand(d.get("nodes"))),
        batch_host=d.get("batch_host") or None,
        time_limit=timedelta(minutes=limit) if limit else None,
        submit_time=from_epoch(d.get("submit_time")),
        start_time=from_epoch(d.get("start_time")),
        end_time=end,
        # 22.05 reports the raw wait status: exit code in the high byte, signal low.
        exit_code=(exit_code >> 8) & 0xFF if isinstance(exit_code, int) else None,
        exit_signal=exit_code & 0x7F if isinstance(exit_code, int) else None,
        requeue=d.get("requeue"),
        work_dir=d.get("current_working_directory") or None,
        standard_output=_expand_pattern(d.get("standard_output"), d),
        comment=d.get("comment") or None,
    )


def _expand_pattern(path: str | None, d: dict[str, Any]) -> str | None:
    """Expand the filename patterns scontrol expands (%j, %x, %u, %A, %%)."""
    if not path:
        return None
    subst = {"j": str(d.get("job_id")), "x": d.get("name") or "",
             "u": d.get("user_name") or "", "A": str(d.get("array_job_id") or d.get("job_id")),
             "%": "%"}
    out, i = [], 0
    while i < len(path):
        ch = path[i]
        if ch == "%" and i + 1 < len(path) and path[i + 1] in subst:
            out.append(subst[path[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
