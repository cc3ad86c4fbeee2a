"""Shared fixtures for hpcckpt's tests: the real Slurm cluster (started on first use) and
hpcckpt as an ordinary user runs it.

scripts/test.sh runs the suite in two pytest-xdist workers (`--dist loadgroup`). Each test
file runs whole on one worker, because its module fixtures (network namespaces, daemons,
compiled programs) are made once per file. The Slurm tests are one group, sent first: they
spend most of their time waiting for Slurm, which is when the other worker does the rest."""
import pytest

pytest_plugins = ["tests.slurm_cluster.fixture", "tests.user_env"]

SLURM_GROUP = "slurm"


def _group(item: pytest.Item) -> str:
    path = item.path.as_posix()
    return SLURM_GROUP if "/tests/slurm/" in path else path


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    items.sort(key=lambda item: _group(item) != SLURM_GROUP)   # stable: file order kept
