"""Fixtures for the Slurm tests: the session cluster, a backend on it, a clean queue.

The ``slurm_cluster`` fixture lives in tests/slurm_cluster/fixture.py; it is loaded
here only when tests/conftest.py does not already load it for the whole suite.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcckpt.scheduler import CommandsBackend

PLUGIN = "tests.slurm_cluster.fixture"


#: The plugstack.conf the session cluster is started with (PlugStackConfig= via
#: HPCCKPT_SLURM_EXTRA_CONF). Empty until the SPANK test writes its plugin line into it:
#: sbatch and each slurmstepd read it anew, so no restart is needed.
PLUGSTACK = Path(tempfile.gettempdir()) / f"hpcckpt-plugstack-{os.getpid()}" / "plugstack.conf"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
    PLUGSTACK.parent.mkdir(parents=True, exist_ok=True)
    PLUGSTACK.write_text("")
    extra = PLUGSTACK.parent / "extra.conf"
    prev = os.environ.get("HPCCKPT_SLURM_EXTRA_CONF")
    text = Path(prev).read_text() if prev and Path(prev).is_file() else ""
    extra.write_text(text + f"\nPlugStackConfig={PLUGSTACK}\n")
    os.environ["HPCCKPT_SLURM_EXTRA_CONF"] = str(extra)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(PLUGSTACK.parent, ignore_errors=True)


@pytest.fixture
def cluster(slurm_cluster) -> Iterator:
    """The session cluster with both nodes idle before the test and no job left after.

    Tests kill slurmd and requeue jobs; each one starts from the same clean state
    instead of inheriting the previous test's leftovers.
    """
    slurm_cluster.start()
    yield slurm_cluster
    ids = slurm_cluster.run("squeue", "-h", "-o", "%A", check=False).split()
    if ids:
        slurm_cluster.run("scancel", *ids, check=False)


@pytest.fixture
def backend(cluster) -> CommandsBackend:
    """The command backend pointed at the test cluster."""
    return CommandsBackend(env=cluster.env)
