"""Fixtures for the store tests: real directories, real HDF5, real processes."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpcckpt.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")
