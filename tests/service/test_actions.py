"""--action-script (CRIU's): run at "frozen", "dumped" and "restored", directly and through
hpcckptd (where it runs in the client, as the user); a non-zero exit abandons the dump and
leaves the process running, or undoes the restore. And the "frozen" check that every
member of a user's tree is still the user's."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcckpt.client import Client
from hpcckpt.errors import PermissionDeniedError
from tests.engine.helpers import Job, cli, pid_alive, reference

from .conftest import NOBODY, as_user, start_as_nobody
from .test_cli_hooks import as_nobody_cli

SCRIPT = """#!/bin/sh
# log: stage pid uid state-of-the-process pages-files-in-the-image; say no at stage $1
st=$(sed -n 's/^State:\t\\(.\\).*/\\1/p' /proc/$HPCCKPT_PID/status)
n=$(ls "$HPCCKPT_IMAGES" 2>/dev/null | grep -c '^pages-')
echo "$HPCCKPT_ACTION $HPCCKPT_PID $(id -u) $st $n" >> {log}
[ "$HPCCKPT_ACTION" != "$1" ]
"""


@pytest.fixture
def action(world_dir):
    log = world_dir / "actions.log"
    script = world_dir / "action.sh"
    script.write_text(SCRIPT.format(log=log))
    script.chmod(0o755)
    log.touch()
    log.chmod(0o666)
    return script, log


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines()


def _runs_on(job: Job) -> None:
    assert pid_alive(job.pid)
    job.wait_lines(job.lines() + 1)           # thawed: it computes on


def test_action_script_direct(action, world_dir, user_exe):
    script, log = action
    cmd = [user_exe, 150, 2, 20]
    ref = reference(cmd, world_dir / "ref.txt")
    job = Job.start(cmd, world_dir / "out.txt")
    job.wait_lines(5)
    img = world_dir / "img"
    p = str(job.pid)
    for stage in ("frozen", "dumped"):
        res = cli("dump", "--pid", p, "--images", img, "--action-script", f"{script} {stage}", check=False)
        assert res.returncode == 2 and f"exited with status 1 at '{stage}' for process {p}" in res.stderr, res.stderr
        assert not img.exists()
        _runs_on(job)
    cli("dump", "--pid", p, "--images", img, "--action-script", f"{script} none")
    job.proc.wait(timeout=10)
    res = cli("restore", "--images", img, "--action-script", f"{script} none")
    assert job.out.read_bytes() == ref, res.stderr
    assert _lines(log) == [f"frozen {p} 0 t 0",                      # stopped, nothing written yet
                           f"frozen {p} 0 t 0", f"dumped {p} 0 t 1",   # sealed, still stopped
                           f"frozen {p} 0 t 0", f"dumped {p} 0 t 1",
                           f"restored {p} 0 t 1"]                     # built, not yet running


def test_action_script_refusing_a_restore_undoes_it(action, world_dir, user_exe):
    script, log = action
    job = Job.start([user_exe, 150, 2, 20], world_dir / "out.txt")
    job.wait_lines(5)
    img = world_dir / "img"
    cli("dump", "--pid", job.pid, "--images", img)
    job.proc.wait(timeout=10)
    res = cli("restore", "--images", img, "--action-script", f"{script} restored", check=False)
    assert res.returncode == 2 and "at 'restored'" in res.stderr and "the restore was undone" in res.stderr
    assert not pid_alive(job.pid)


def test_action_script_through_the_daemon_runs_as_the_user(daemon, action, nobody_long_job):
    _, sock = daemon
    script, log = action
    job, ref, img = nobody_long_job
    p = str(job.pid)
    assert as_nobody_cli(sock, ["dump", "--pid", p, "--images", img, "--action-script", f"{script} frozen"]) == 2
    assert not Path(img).exists()
    _runs_on(job)
    assert as_nobody_cli(sock, ["dump", "--pid", p, "--images", img, "--action-script", f"{script} none"]) == 0
    job.proc.wait(timeout=10)
    assert as_nobody_cli(sock, ["restore", "--images", img, "--action-script", f"{script} none"]) == 0
    assert job.out.read_bytes() == ref
    u = NOBODY
    assert _lines(log) == [f"frozen {p} {u} t 0", f"frozen {p} {u} t 0", f"dumped {p} {u} t 1",
                           f"restored {p} {u} t 1"]


@pytest.fixture(scope="module")
def setuid_sleeper():
    """A setuid-root program that just waits: what a user's job may start (as passwd)."""
    d = Path(__import__("tempfile").mkdtemp(prefix="service-suid-", dir="/tmp"))
    d.chmod(0o755)
    src = d / "s.c"
    src.write_text("#include <unistd.h>\nint main(void) { for (;;) pause(); }\n")
    exe = d / "suid_sleep"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    exe.chmod(0o4755)
    yield exe
    shutil.rmtree(d, ignore_errors=True)


def test_a_users_tree_holding_a_setuid_child_is_refused(daemon, world_dir, user_exe, setuid_sleeper):
    """The daemon checks the root it is asked for; the frozen tree is checked whole, so a
    setuid program the job started (root's memory) never lands in the user's image."""
    _, sock = daemon
    job = start_as_nobody(["/bin/sh", "-c", f"{setuid_sleeper} & exec {user_exe} 100000 1 20"], world_dir / "out.txt")
    try:
        job.wait_lines(3)
        img = world_dir / "img"
        with pytest.raises(PermissionDeniedError, match=rf"in the tree of {job.pid}\) does not run entirely as you"):
            as_user(lambda: Client(sock).dump(job.pid, str(img)).ok)
        assert not img.exists()
        _runs_on(job)
    finally:
        for k in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(k), 9)
        job.kill()
