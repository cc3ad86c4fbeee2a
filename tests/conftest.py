"""Shared fixtures for hpcckpt's tests: the real Slurm cluster (started on first use) and
hpcckpt as an ordinary user runs it."""
pytest_plugins = ["tests.slurm_cluster.fixture", "tests.user_env"]
