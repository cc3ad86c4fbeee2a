"""Fixtures for the engine tests: compiled test programs."""
import subprocess
from pathlib import Path

import pytest

from .helpers import PROGRAMS


@pytest.fixture(scope="session")
def threads_fp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "threads_fp"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(PROGRAMS / "threads_fp.c"), "-lm"], check=True)
    return out
