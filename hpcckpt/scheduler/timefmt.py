"""Slurm's time formats, read and written.

Slurm prints durations as ``[days-]hours:minutes:seconds`` (or ``UNLIMITED``), takes
``--time`` in several shorter forms, and prints timestamps as local ISO times or words
such as ``Unknown``. Both backends and the job context need the same reading of them.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta

#: Values Slurm uses for "no value" in time fields.
_NO_VALUE = {"", "n/a", "none", "unknown", "(null)", "infinite", "unlimited"}

_DURATION = re.compile(
    r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_duration(text: str | None) -> timedelta | None:
    """Read a Slurm duration; ``None`` for UNLIMITED/N/A.

    Without days, Slurm reads ``M``, ``M:S`` and ``H:M:S``; with days, ``D-H``,
    ``D-H:M`` and ``D-H:M:S`` (see sbatch(1) --time).
    """
    if text is None or text.strip().lower() in _NO_VALUE:
        return None
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a Slurm duration: {text!r}")
    days = int(m["days"] or 0)
    parts = [int(p) for p in (m["a"], m["b"], m["c"]) if p is not None]
    if m["days"] is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def format_duration(value: timedelta | int | str) -> str:
    """Write a duration for ``sbatch --time``: ints are minutes, strings pass through."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        value = timedelta(minutes=value)
    total = int(value.total_seconds())
    if total <= 0:
        raise ValueError(f"time limit must be positive, got {value}")
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{seconds:02d}"


def parse_timestamp(text: str | None) -> datetime | None:
    """Read a Slurm timestamp (local time, ``YYYY-MM-DDTHH:MM:SS``); None for words."""
    if text is None or text.strip().lower() in _NO_VALUE:
        return None
    return datetime.fromisoformat(text.strip()).astimezone()


def from_epoch(value: int | float | None) -> datetime | None:
    """Read an epoch from ``squeue --json``, where 0 means "not set"."""
    if not value:
        return None
    return datetime.fromtimestamp(value).astimezone()
