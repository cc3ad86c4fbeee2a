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

NOBODY = 65534


@pytest.fixture
def daemon():
    run_dir = Path(tempfile.mkdtemp(prefix="hpcckptd-", dir="/tmp"))
    run_dir.chmod(0o755)  # as /run/hpcckpt: every user reaches the socket
    sock = run_dir / "hpcckptd.sock"
    p = subprocess.Popen([sys.executable, "-m", "hpcckpt.service.daemon", "--socket", str(sock),
                          "--per-user", "4", "--total", "8"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline, "hpcckptd did not start"
        time.sleep(0.02)
    yield p, str(sock)
    if p.poll() is None:
        p.terminate()
        p.wait(timeout=10)
    shutil.rmtree(run_dir, ignore_errors=True)


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
