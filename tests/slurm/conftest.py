"""Fixtures for the Slurm tests: the session cluster, a backend on it, a clean queue.

The ``slurm_cluster`` fixture lives in tests/slurm_cluster/fixture.py; it is loaded
here only when tests/conftest.py does not already load it for the whole suite.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from hpcckpt.scheduler import CommandsBackend

PLUGIN = "tests.slurm_cluster.fixture"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)


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
