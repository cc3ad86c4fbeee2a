"""Pick the scheduler backend for this machine.

pyslurm when it imports AND was built for the installed Slurm release, else Slurm's
commands. The choice and the reason are logged at debug level so "why is it slow /
why is pyslurm not used" has an answer without being noise in every job's output.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from .backend import SchedulerBackend
from .commands import CommandsBackend
from .pyslurm_backend import PyslurmBackend, check_pyslurm

log = logging.getLogger(__name__)


def select_backend(env: Mapping[str, str] | None = None,
                   prefer: str | None = None) -> SchedulerBackend:
    """Return the best working backend; ``prefer="commands"`` skips the pyslurm probe."""
    if prefer not in (None, "commands", "pyslurm"):
        raise ValueError(f"unknown scheduler backend {prefer!r} (commands, pyslurm)")
    if prefer != "commands":
        module, why = check_pyslurm(env)
        if module is not None:
            log.debug("scheduler backend: pyslurm (matches the installed Slurm)")
            return PyslurmBackend(module, env)
        if prefer == "pyslurm":
            return PyslurmBackend(None, env)  # raises BackendUnavailableError with why
        log.debug("scheduler backend: commands, because %s", why)
    else:
        log.debug("scheduler backend: commands (asked for)")
    return CommandsBackend(env)
