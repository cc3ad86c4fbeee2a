"""Restore stubs: made at the PID asked for, traced, stopped at their exec, even while other
Python threads of the restoring process want the interpreter lock."""
import os
import signal
import sys
import threading
import time

import pytest

from hpcckpt.engine import launch
from hpcckpt.errors import RestoreError
from hpcckpt.kernel import ptrace

HANG = 10.0     # a stub reaches its exec in about a millisecond: one still running is hung


def _free_pid(after: int) -> int:
    pid = after + 1
    while os.path.exists(f"/proc/{pid}"):
        pid = pid + 1 if pid < 32000 else 20000
    return pid


def _end(child: int) -> None:
    os.kill(child, signal.SIGKILL)
    while not ptrace.wait(child).exited:
        pass


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def test_stubs_made_while_threads_want_the_gil():
    """200 stubs while 4 threads spin in Python, the GIL's switch interval cut to 0.1 ms so a
    request to hand the lock over is nearly always pending at the clone. A child that runs
    Python before its exec then waits forever for the lock (the previous launcher: 14-30% of
    stubs hung here); the machine-code child never does. Each stub must stop at its exec of
    the stub program, traced by us, at the PID asked for."""
    stop = threading.Event()
    spinners = [threading.Thread(target=_spin, args=(stop,), daemon=True) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    for s in spinners:
        s.start()
    hung, made, pid = [], 0, 20000 + os.getpid() % 10000
    try:
        while made < 200:
            pid = _free_pid(pid)
            try:
                child = launch._clone_stub(pid)
            except RestoreError as e:     # the PID was taken meanwhile by another process
                assert "in use" in str(e)
                continue
            made += 1
            deadline = time.monotonic() + HANG
            while (st := ptrace.wait(child, nohang=True)) is None and time.monotonic() < deadline:
                time.sleep(0.001)
            try:
                if st is None:
                    hung.append(child)
                    continue
                assert child == pid
                assert (st.exited, st.sig) == (False, signal.SIGTRAP), st
                assert os.readlink(f"/proc/{child}/exe") == os.path.realpath(launch.STUB)
                status = open(f"/proc/{child}/status").read()
                assert f"TracerPid:\t{os.getpid()}\n" in status
            finally:
                _end(child)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        for s in spinners:
            s.join()
    assert not hung, f"{len(hung)} of 200 stubs never reached their exec"


def test_launch_stub_at_a_pid_in_use_names_its_holder():
    with pytest.raises(RestoreError, match=rf"PID {os.getpid()} is in use by \S+ \(uid {os.geteuid()}\)"):
        launch.launch_stub(os.getpid())


def test_launch_stub_stops_at_the_pid_asked_for():
    pid = _free_pid(20000 + os.getpid() % 10000)
    child = launch.launch_stub(pid)
    try:
        assert child == pid
        assert "\tt (tracing stop)" in open(f"/proc/{child}/status").read()
    finally:
        _end(child)
