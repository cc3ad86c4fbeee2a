"""The CLI through hpcckptd as a non-root user (progress line, a foreground restore that
exits as its process did and passes signals on), progress notifications, and hooks."""
import os
import signal
import time
from pathlib import Path

import pytest

from hpcckpt.cli import main as cli_main
from hpcckpt.client import Client
from hpcckpt.errors import HpcckptError
from tests.engine.helpers import pid_alive

from .conftest import NOBODY, as_user, start_as_nobody, start_hog


def as_nobody_cli(sock: str, argv: list[str]) -> int:
    """hpcckpt ARGV run by uid 65534 (main() in a forked child: /root is not nobody's)."""
    def run():
        os.environ["HPCCKPTD_SOCKET"] = sock
        return cli_main(argv)
    return as_user(run)


def test_cli_routes_a_users_dump_and_restore_through_the_daemon(daemon, nobody_job):
    _, sock = daemon
    job, ref, img = nobody_job
    assert as_nobody_cli(sock, ["dump", "--pid", str(job.pid), "--images", img]) == 0
    job.proc.wait(timeout=10)
    assert {p.stat().st_uid for p in Path(img).iterdir()} == {NOBODY}
    assert as_nobody_cli(sock, ["restore", "--images", img]) == 0     # foreground: its exit status
    assert job.out.read_bytes() == ref
    assert as_nobody_cli(sock, ["--service", sock, "check"]) == 0


def test_cli_foreground_restore_passes_signals_on_and_dies_of_them(daemon, world_dir, user_exe):
    _, sock = daemon
    job = start_as_nobody([user_exe, 100000, 1, 20], world_dir / "out.txt")
    job.wait_lines(3)
    img = str(world_dir / "img")
    as_nobody_cli(sock, ["dump", "--pid", str(job.pid), "--images", img])
    job.proc.wait(timeout=10)
    before = job.out.stat().st_size
    pid = os.fork()
    if pid == 0:      # the batch script's `hpcckpt restore`, as nobody
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ["HPCCKPTD_SOCKET"] = sock
            os._exit(cli_main(["-q", "restore", "--images", img]))
        finally:
            os._exit(99)
    deadline = time.monotonic() + 30
    while job.out.stat().st_size <= before:       # the restored process runs on
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    deadline = time.monotonic() + 10
    while pid_alive(job.pid):
        assert time.monotonic() < deadline, "the restored process did not get the signal"
        time.sleep(0.02)


def test_user_may_not_signal_anothers_restore(daemon, tmp_path, user_exe):
    _, sock = daemon
    with pytest.raises(HpcckptError, match="no request 424242 of yours"):
        as_user(lambda: Client(sock).signal(424242, signal.SIGTERM))


def test_progress_notifications_are_rate_limited(daemon, tmp_path, memhog):
    _, sock = daemon
    hog = start_hog(memhog, 1024)
    seen = []
    t0 = time.monotonic()
    r = Client(sock, on_notify=lambda n: seen.append(n) if n.event == "progress" else None).dump(
        hog.pid, str(tmp_path / "img"))
    dt = time.monotonic() - t0
    hog.wait()
    assert seen and seen[-1].done == seen[-1].total == r.pages_bytes
    assert [n.done for n in seen] == sorted(n.done for n in seen)
    assert len(seen) <= 4 * dt + 2, (len(seen), dt)


def test_dumped_hook_runs_while_frozen_and_a_refusal_thaws(daemon, tmp_path, memhog):
    _, sock = daemon
    hog = start_hog(memhog, 64)
    img = tmp_path / "img"
    seen = []

    def hook(n):
        st = open(f"/proc/{hog.pid}/status").read()
        seen.append((n.event, (img / "inventory.img").exists(), (img / f"pages-{hog.pid}.img").exists(),
                     "TracerPid:\t0" not in st or "State:\tT" in st))
        return n.event == "frozen"        # refuse at "dumped": the dump must fail and thaw
    with pytest.raises(HpcckptError, match="declined at the 'dumped' hook"):
        Client(sock, on_hook=hook).dump(hog.pid, str(img), wait_hooks=True)
    assert seen == [("frozen", False, False, True),     # held, nothing written yet
                    ("dumped", True, True, True)]       # sealed, the process still held
    assert pid_alive(hog.pid) and not (img / "inventory.img").exists()
    with pytest.raises(HpcckptError, match="no answer to the 'dumped' hook within 1 s"):
        Client(sock, on_hook=lambda n: n.event == "frozen" or time.sleep(2) or True).dump(
            hog.pid, str(img), wait_hooks=True, hook_timeout=1)
    assert pid_alive(hog.pid)
    r = Client(sock, on_hook=lambda n: True).dump(hog.pid, str(img), wait_hooks=True)   # goes on: killed
    hog.wait(timeout=10)
    assert r.pid == hog.pid and (img / "inventory.img").exists()


def test_restored_hook_before_the_process_runs(daemon, nobody_job):
    _, sock = daemon
    job, ref, img = nobody_job
    as_user(lambda: Client(sock).dump(job.pid, img).pid)
    job.proc.wait(timeout=10)
    size = job.out.stat().st_size
    seen = []

    def hook(n):
        st = open(f"/proc/{n.pid}/status").read()
        time.sleep(0.3)
        seen.append((n.event, n.pid, "State:\tt" in st or "State:\tT" in st, job.out.stat().st_size == size))
        return True
    def restore():
        r = Client(sock, on_hook=hook).restore(img, wait_hooks=True)
        return int(r.exit_status), list(seen)
    status, seen = as_user(restore)
    assert status == 0
    assert seen == [("restored", job.pid, True, True)]      # built, held, not yet running
    assert job.out.read_bytes() == ref


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(name))
    return kids


def _nobody_cli_child(sock: str, argv: list[str]) -> int:
    """`hpcckpt ARGV` as nobody in a forked child (a batch script's command); its PID."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ["HPCCKPTD_SOCKET"] = sock
            os._exit(cli_main(argv))
        finally:
            os._exit(99)
    return pid


def _dumped_tree(sock: str, world_dir: Path, user_exe: Path):
    """A user's job with a child (threads_fp with a `sleep` it started), dumped by the user."""
    job = start_as_nobody(["/bin/sh", "-c", f"sleep 1000 & exec {user_exe} 100000 1 20"], world_dir / "out.txt")
    job.wait_lines(3)
    kids = _children(job.pid)
    assert len(kids) == 1
    img = str(world_dir / "img")
    assert as_nobody_cli(sock, ["-q", "dump", "--pid", str(job.pid), "--images", img]) == 0
    job.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{kids[0]}"):     # init reaps the orphaned child late
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job, img


def _wait_output_grows(job, before: int) -> None:
    deadline = time.monotonic() + 30
    while job.out.stat().st_size <= before:       # the restored process runs on
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_killed_foreground_client_takes_its_restored_job_along(daemon, world_dir, user_exe):
    """The client of a foreground restore is the job's parent to a batch system: SIGKILL
    it and the daemon must kill the restored tree, as a direct restore's would die."""
    _, sock = daemon
    job, img = _dumped_tree(sock, world_dir, user_exe)
    before = job.out.stat().st_size
    cli = _nobody_cli_child(sock, ["-q", "restore", "--images", img])
    _wait_output_grows(job, before)
    kids = _children(job.pid)
    assert len(kids) == 1 and pid_alive(kids[0])                  # the tree is back
    os.kill(cli, signal.SIGKILL)
    os.waitpid(cli, 0)
    deadline = time.monotonic() + 10
    while pid_alive(job.pid) or pid_alive(kids[0]):
        assert time.monotonic() < deadline, "the restored tree outlived its foreground client"
        time.sleep(0.02)
    size = job.out.stat().st_size
    time.sleep(0.3)
    assert job.out.stat().st_size == size


def test_detached_restore_outlives_its_client(daemon, world_dir, user_exe):
    _, sock = daemon
    job, img = _dumped_tree(sock, world_dir, user_exe)
    before = job.out.stat().st_size
    cli = _nobody_cli_child(sock, ["-q", "restore", "--detach", "--images", img])
    _, status = os.waitpid(cli, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    _wait_output_grows(job, before)
    time.sleep(0.5)
    kids = _children(job.pid)
    assert pid_alive(job.pid) and len(kids) == 1 and pid_alive(kids[0])
    os.kill(kids[0], signal.SIGKILL)
    os.kill(job.pid, signal.SIGKILL)
