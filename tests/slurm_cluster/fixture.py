"""pytest plugin: a real two-node Slurm cluster, started once per test session.

Tests marked ``@pytest.mark.slurm`` take the ``slurm_cluster`` fixture. The first one
installs Slurm and munge if missing (apt-get), starts munged, slurmctld and two slurmd
on this machine through ``cluster.sh``, and the session's end stops them all. If the
cluster cannot be brought up the fixture FAILS with the reason: a silently skipped
Slurm test would hide exactly the breakage these tests exist to catch.

Enable with ``pytest_plugins = ["tests.slurm_cluster.fixture"]`` in tests/conftest.py
or ``-p tests.slurm_cluster.fixture``. Set HPCCKPT_SLURM_STATE to keep the state
directory (logs, config) at a known path; by default a fresh one is made and removed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
NODES = ("node1", "node2")


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: where its files are and how clients reach it."""

    state_dir: Path
    conf: Path
    nodes: tuple[str, ...] = NODES
    partitions: tuple[str, ...] = ("low", "high")
    default_partition: str = "low"
    preemptor_partition: str = "high"
    grace_time: int = 20
    startup_seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def slurmd_pid(self, node: str) -> int:
        """The pid of ``node``'s slurmd (to kill it in node-failure tests)."""
        return int((self.state_dir / "run" / f"slurmd-{node}.pid").read_text())

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        proc = subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exit {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self) -> None:
        """(Re)start the daemons (idempotent; restarts a killed slurmd)."""
        _cluster("start", self.state_dir)

    def logs(self, lines: int = 30) -> str:
        """The tail of every daemon log, for assertion messages."""
        out = []
        for f in sorted(self.log_dir.glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {f.name}\n" + "\n".join(text))
        return "\n".join(out)


def _cluster(cmd: str, state_dir: Path | None = None, timeout: float = 600) -> str:
    argv = ["bash", str(CLUSTER_SH), cmd] + ([str(state_dir)] if state_dir else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exit {proc.returncode}:\n"
                           f"{proc.stderr.strip()}\n{proc.stdout.strip()}")
    return proc.stdout


def start_cluster(state_dir: Path) -> SlurmCluster:
    """Install if needed and start; raise RuntimeError naming what went wrong."""
    t0 = time.monotonic()
    _cluster("install")
    _cluster("start", state_dir)
    conf = state_dir / "slurm.conf"
    grace = int(os.environ.get("HPCCKPT_SLURM_GRACE", "20"))
    return SlurmCluster(state_dir=state_dir, conf=conf, grace_time=grace,
                        startup_seconds=time.monotonic() - t0,
                        env={"SLURM_CONF": str(conf)})


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide Slurm cluster; fails (never skips) when it cannot start."""
    keep = os.environ.get("HPCCKPT_SLURM_STATE")
    # Under /tmp, not $TMPDIR: munged runs as user munge and must traverse every parent
    # directory, and its socket path must stay under the 108-byte sun_path limit.
    state_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hpcckpt-slurm-",
                                                              dir="/tmp"))
    failure = None
    try:
        cluster = start_cluster(state_dir)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        failure = str(exc)
    if failure is not None:
        _stop_quietly(state_dir)
        pytest.fail(f"the Slurm test cluster did not start: {failure}", pytrace=False)
    try:
        yield cluster
    finally:
        _stop_quietly(state_dir)
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)


def _stop_quietly(state_dir: Path) -> None:
    try:
        _cluster("stop", state_dir, timeout=120)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"warning: stopping the Slurm test cluster: {exc}")
