"""hpcckptd: authorization from the kernel, users' own dumps and restores, limits,
robustness against a killed daemon, cancellation, many clients."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpcckpt.client import Client
from hpcckpt.errors import HpcckptError, PermissionDeniedError
from tests.engine.helpers import PROGRAMS, Job, pid_alive

from .conftest import NOBODY, as_user, start_daemon, start_hog


def test_check_and_status_for_anyone(daemon):
    _, sock = daemon
    names = as_user(lambda: [f.name for f in Client(sock).check().features])
    assert "clone3 with set_tid" in names
    assert as_user(lambda: Client(sock).status().ok)


def test_broken_installation_is_named_to_the_caller(tmp_path, nobody_job):
    """A worker that cannot import what it needs (here pyroute2, as in a venv made before
    it became a dependency) answers with the missing module, not a bare exit status; the
    job is untouched."""
    fake = tmp_path / "shadow" / "pyroute2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('pyroute2 is broken on this node')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake.parent}:{os.environ.get('PYTHONPATH', '')}")
    daemon = start_daemon(env)
    _, sock = next(daemon)
    job, ref, img = nobody_job
    with pytest.raises(HpcckptError, match="cannot load hpcckpt: pyroute2 is broken on this node"):
        as_user(lambda: Client(sock).dump(job.pid, img))
    assert pid_alive(job.pid) and not Path(img).exists()
    job.proc.wait(timeout=30)
    assert job.out.read_bytes() == ref
    daemon.close()


def test_user_dumps_and_restores_own_process(daemon, nobody_job):
    _, sock = daemon
    job, ref, img = nobody_job
    r = as_user(lambda: Client(sock).dump(job.pid, img).pages_bytes)
    assert r > 0
    job.proc.wait(timeout=10)
    assert {p.stat().st_uid for p in Path(img).iterdir()} == {NOBODY}   # the images are the user's
    res = as_user(lambda: Client(sock).restore(img).exit_status)
    assert res == 0
    assert job.out.read_bytes() == ref


def test_user_may_not_dump_anothers_process(daemon, tmp_path, world_dir, user_exe):
    _, sock = daemon
    job = Job.start([user_exe, 200, 1, 20], tmp_path / "out.txt")        # root's
    job.wait_lines(2)
    with pytest.raises(PermissionDeniedError, match="does not run entirely as you"):
        as_user(lambda: Client(sock).dump(job.pid, str(world_dir / "img")))
    assert pid_alive(job.pid) and not (world_dir / "img").exists()
    job.kill()


def test_user_may_not_restore_anothers_image_or_one_claiming_root(daemon, tmp_path, world_dir, user_exe):
    _, sock = daemon
    job = Job.start([user_exe, 200, 1, 20], tmp_path / "out.txt")
    job.wait_lines(2)
    img = world_dir / "rootimg"
    Client(sock).dump(job.pid, str(img))             # root dumps root's process
    job.proc.wait(timeout=10)
    with pytest.raises(PermissionDeniedError, match="belongs to uid 0"):
        as_user(lambda: Client(sock).restore(str(img)))
    for p in [img, *img.iterdir()]:                  # handed to the user: it now claims uid 0
        os.chown(p, NOBODY, NOBODY)
    with pytest.raises(PermissionDeniedError, match="claims uids"):
        as_user(lambda: Client(sock).restore(str(img)))
    assert not pid_alive(job.pid)


def test_killed_daemon_leaves_target_running_and_publishes_nothing(daemon, tmp_path, memhog):
    proc, sock = daemon
    hog = start_hog(memhog, 1536)
    img = tmp_path / "img"
    t = threading.Thread(target=lambda: pytest.raises(HpcckptError, Client(sock).dump, hog.pid, str(img)))
    t.start()
    deadline = time.monotonic() + 30
    while not (img / f"pages-{hog.pid}.img").exists():     # the dump is under way
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    t.join(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        st = open(f"/proc/{hog.pid}/status").read()
        if "TracerPid:\t0" in st and "(tracing stop)" not in st:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert "State:\tS" in st or "State:\tR" in st       # running (or asleep in pause), not stopped
    assert not (img / "inventory.img").exists()          # no image was sealed
    hog.kill()
    hog.wait()


def test_cancel(daemon, tmp_path, memhog):
    _, sock = daemon
    hog = start_hog(memhog, 1536)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(HpcckptError, Client(sock).dump,
                                                                    hog.pid, str(tmp_path / "img"))))
    t.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "img" / f"pages-{hog.pid}.img").exists():   # the dump is under way
        assert time.monotonic() < deadline
        time.sleep(0.005)
    Client(sock).cancel(Client(sock).status().requests[0].request_id)
    t.join(timeout=60)
    assert "cancel" in str(errors[0].value)
    assert pid_alive(hog.pid) and not (tmp_path / "img").exists()
    hog.kill()
    hog.wait()


def test_twenty_concurrent_clients(daemon, tmp_path):
    """Each client dumps its own waiting process, restores it, and gets its exact output."""
    proc, sock = daemon
    results = {}

    def retry(call):
        while True:   # the daemon admits 4 per user and 8 in all: a refused client retries
            try:
                return call()
            except HpcckptError as e:
                if "busy" not in str(e) and "already have" not in str(e):
                    raise
                time.sleep(0.1)

    def client(i: int):
        job = Job.start([sys.executable, PROGRAMS / "echo_stdin.py"], tmp_path / f"out{i}.txt",
                        stdin=subprocess.PIPE)
        job.proc.stdin.write(f"client {i}\n".encode())
        job.proc.stdin.flush()
        job.wait_lines(1)
        c = Client(sock)
        retry(lambda: c.dump(job.pid, str(tmp_path / f"img{i}")))
        job.proc.wait(timeout=30)
        pid = retry(lambda: c.restore(str(tmp_path / f"img{i}"), detach=True).pid)
        deadline = time.monotonic() + 120   # stdin at EOF in the restore: it finishes
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        results[i] = (pid == job.pid, job.out.read_bytes() == f"1 CLIENT {i}\ndone 1\n".encode())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == {i: (True, True) for i in range(20)}
    rss_kib = int(open(f"/proc/{proc.pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss_kib < 150_000, f"hpcckptd grew to {rss_kib} KiB"
