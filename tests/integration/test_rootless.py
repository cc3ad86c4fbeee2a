"""`hpcckpt run` by an ordinary user (uid 65534, no capabilities, no daemon): periodic
checkpoints, a SIGKILL of the whole run, a resume in a new run, the exact uninterrupted
output; the resumed job holds no capability and is still the user's."""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.engine.helpers import reference

pytestmark = pytest.mark.timeout(180)
NOBODY = 65534


@pytest.fixture
def home():
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-rootless-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def threads_exe(user_env):
    exe = user_env.root / "programs" / "threads_fp"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(user_env.program("threads_fp.c")), "-lm"],
                   check=True)
    return exe


def as_nobody(cmd: list, home: Path, out: Path, err: Path, env: dict) -> subprocess.Popen:
    for f in (out, err):   # the user's files, as a shell redirection of theirs would make them
        f.touch()
        os.chown(f, NOBODY, NOBODY)
    with open(out, "ab") as o, open(err, "ab") as e:
        return subprocess.Popen([str(c) for c in cmd], stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                cwd=home, env=env, user=NOBODY, group=NOBODY, extra_groups=[],
                                start_new_session=True)


def wait_for(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def caps_and_ids(pid: int) -> dict[str, str]:
    st = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: st[k].strip() for k in ("Uid", "Gid", "CapEff", "CapPrm", "CapInh", "CapAmb")}


@pytest.mark.parametrize("kind", ["python", "threads"])
def test_user_run_killed_and_resumed(user_env, home, threads_exe, kind, tmp_path):
    job = ([user_env.python, user_env.program("compute.py"), 40, 0.1] if kind == "python"
           else [threads_exe, 40, 2, 100])
    ref = reference(job, tmp_path / "ref.txt")
    cmd = user_env.hpcckpt("run", "--images", home / "img", "--every", 1, "--", *job)
    out, err = home / "out.txt", home / "err.txt"
    first = as_nobody(cmd, home, out, err, user_env.env)
    wait_for(lambda: (home / "img" / "ckpt-0002").exists() or first.poll() is not None, "two checkpoints")
    assert first.poll() is None, err.read_text()
    os.killpg(first.pid, signal.SIGKILL)   # the runner, its namespace's init and the job
    first.wait()
    assert "checkpoint" in err.read_text() and out.read_bytes() != ref
    second = as_nobody(cmd, home, out, err, user_env.env)
    wait_for(lambda: "resumed from" in err.read_text() or second.poll() is not None, "the resume")
    m = re.search(r"resumed from \S+ as PID (\d+)", err.read_text())
    assert m, err.read_text()
    ids = caps_and_ids(int(m.group(1)))
    assert second.wait(timeout=120) == 0, err.read_text()
    assert out.read_bytes() == ref
    assert ids["Uid"].split() == [str(NOBODY)] * 4 and ids["Gid"].split() == [str(NOBODY)] * 4, ids
    assert {ids[k] for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")} == {"0000000000000000"}, ids
