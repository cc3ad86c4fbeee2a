"""hpcckpt as an ordinary user runs it: a Python environment and a copy of the sources
that uid 65534 can read (the test venv's interpreter and the checkout may sit under /root).

The venv is Debian's python3 with hpcckpt's dependencies, kept in /var/tmp across runs
(one per version of setup.py); the sources are copied afresh for every test session."""
from __future__ import annotations

import ast
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One venv per version of the requirements: checkouts with other ones (worktrees) keep theirs.
VENV = Path("/var/tmp/hpcckpt-user-venv-" + hashlib.sha1((REPO / "setup.py").read_bytes()).hexdigest()[:12])
SKIP = {"matplotlib"}   # only `hpcckpt stats` plots; not worth the install here


def _requirements() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)
            return [r for r in reqs if r.split(">")[0].split("=")[0].strip() not in SKIP]
    raise AssertionError("setup.py has no install_requires")


def _venv() -> Path:
    """Made once; test workers running in parallel wait for the one making it."""
    with open(f"{VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _make_venv()


def _make_venv() -> Path:
    stamp = VENV / ".ok"
    if stamp.exists():
        return VENV / "bin" / "python"
    shutil.rmtree(VENV, ignore_errors=True)
    if subprocess.run(["/usr/bin/python3", "-m", "venv", str(VENV)], capture_output=True).returncode:
        subprocess.run(["apt-get", "install", "-y", "-qq", "python3-venv"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", *_requirements()], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(VENV)], check=True)
    stamp.touch()
    return VENV / "bin" / "python"


@dataclass
class UserEnv:
    python: Path        # an interpreter with hpcckpt's dependencies, runnable by anyone
    root: Path          # world-readable copy: hpcckpt/ and programs/
    env: dict[str, str]

    def hpcckpt(self, *args) -> list[str]:
        return [str(self.python), "-m", "hpcckpt.cli", *map(str, args)]

    def program(self, name: str) -> Path:
        return self.root / "programs" / name


@pytest.fixture(scope="session")
def user_env():
    python = _venv()
    root = Path(tempfile.mkdtemp(prefix="hpcckpt-user-src-", dir="/tmp"))
    shutil.copytree(REPO / "hpcckpt", root / "hpcckpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests" / "programs", root / "programs", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    root.chmod(0o755)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(root), "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    yield UserEnv(python, root, env)
    shutil.rmtree(root, ignore_errors=True)
