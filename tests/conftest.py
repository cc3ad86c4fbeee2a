"""Shared fixtures for hpcckpt's tests: the real Slurm cluster (started on first use) and
hpcckpt as an ordinary user runs it, and the two network-namespace test "nodes" (tests/netnodes.py).

scripts/test.sh runs the suite in two pytest-xdist workers (`--dist loadgroup`) with two
groups: the Slurm tests (which mostly wait for Slurm) with a few light files on one
worker, everything else on the other. Two streams of engine tests at once would slow the
jobs the tests checkpoint enough to change what the tests see; one stream beside the
waiting Slurm tests does not."""
import pytest

pytest_plugins = ["tests.slurm_cluster.fixture", "tests.user_env", "tests.netnodes"]

BESIDE_SLURM = ("/tests/slurm/", "/tests/qemu_guest/", "/tests/store/")


def _group(item: pytest.Item) -> str:
    path = item.path.as_posix()
    return "slurm" if any(d in path for d in BESIDE_SLURM) else "engine"


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
