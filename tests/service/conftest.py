"""A real hpcckptd (a separate root process on a private socket) and non-root callers."""
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.engine.conftest import threads_fp  # noqa: F401  (the compiled test program)
from tests.engine.helpers import PROGRAMS, Job, reference

NOBODY = 65534


def start_daemon(env: dict | None = None):
    """A hpcckptd on a private socket (`env`: its environment, and so its workers')."""
    run_dir = Path(tempfile.mkdtemp(prefix="hpcckptd-", dir="/tmp"))
    run_dir.chmod(0o755)  # as /run/hpcckpt: every user reaches the socket
    sock = run_dir / "hpcckptd.sock"
    p = subprocess.Popen([sys.executable, "-m", "hpcckpt.service.daemon", "--socket", str(sock),
                          "--per-user", "4", "--total", "8"], stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline, "hpcckptd did not start"
        time.sleep(0.02)
    try:
        yield p, str(sock)
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def daemon():
    yield from start_daemon()


def as_user(fn, uid: int = NOBODY):
    """Run fn() in a forked child with uid/gid `uid` and no groups; return or raise its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - carried to the parent
            out = ("err", e)
        try:
            data = pickle.dumps(out)
        except Exception as e:  # an unpicklable result
            data = pickle.dumps(("err", RuntimeError(repr(e))))
        os.write(w, data)
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "err":
        raise value
    return value


@pytest.fixture
def world_dir():
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-svc-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _build_for_users(name: str, source: Path, *flags: str):
    """Compile a test program where uid 65534 can run it (/tmp/pytest-of-root is 0700)."""
    d = Path(tempfile.mkdtemp(prefix=f"hpcckpt-{name}-", dir="/tmp"))
    d.chmod(0o755)
    exe = d / name
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(source), *flags], check=True)
    return d, exe


@pytest.fixture(scope="session")
def user_exe():
    d, exe = _build_for_users("threads_fp", PROGRAMS / "threads_fp.c", "-pthread", "-lm")
    yield exe
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def memhog():
    d, exe = _build_for_users("memhog", Path(__file__).parents[2] / "benchmarks" / "memhog.c")
    yield exe
    shutil.rmtree(d, ignore_errors=True)


def start_hog(memhog: Path, mib: int) -> subprocess.Popen:
    """A process holding `mib` MiB of written memory, ready once this returns."""
    hog = subprocess.Popen([str(memhog), str(mib)], stdout=subprocess.PIPE)
    assert hog.stdout.readline() == b"ready\n"
    return hog


def start_as_nobody(cmd, out: Path) -> Job:
    out.touch()
    os.chown(out, NOBODY, NOBODY)
    with open(out, "wb") as f:
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, user=NOBODY, group=NOBODY, extra_groups=[])
    return Job(p, out)


@pytest.fixture
def nobody_job(world_dir, user_exe):
    """A user's computation midway: (job, its uninterrupted output, where its image goes)."""
    cmd = [user_exe, 30, 2, 20]
    ref = reference(cmd, world_dir / "ref.txt")
    job = start_as_nobody(cmd, world_dir / "out.txt")
    job.wait_lines(5)
    return job, ref, str(world_dir / "img")


@pytest.fixture
def nobody_long_job(world_dir, user_exe):
    """As nobody_job, running ~4 s: long enough for several requests while it runs."""
    cmd = [user_exe, 150, 2, 20]
    ref = reference(cmd, world_dir / "ref.txt")
    job = start_as_nobody(cmd, world_dir / "out.txt")
    job.wait_lines(5)
    return job, ref, str(world_dir / "img")
