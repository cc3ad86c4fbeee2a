"""Shared fixtures for hpcckpt's tests: the real Slurm cluster (started on first use)."""
pytest_plugins = ["tests.slurm_cluster.fixture"]
