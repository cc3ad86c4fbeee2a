"""`hpcckpt migrate` by an ordinary user (uid 65534): through the node's hpcckptd, which
may move only the user's own processes, with a munge credential made as the user, so the
destination node restores the job as that user and nothing more."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.engine.helpers import reference

from .test_migrate import PORT, _descendant, _finishes, dest_daemon, munged  # noqa: F401  (fixtures)

NOBODY = 65534
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def source_daemon(nodes, munged, tmp_path):  # noqa: F811
    """hpcckptd on node a (the user's node): its socket where every user reaches it."""
    a = nodes.a
    run_dir = Path(tempfile.mkdtemp(prefix="migrate-hpcckptd-a-", dir="/tmp"))
    run_dir.chmod(0o755)
    sock = run_dir / "d.sock"
    p = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.service.daemon",
                          "--socket", str(sock), "--munge-socket", munged],
                         stderr=open(tmp_path / "daemon-a.log", "wb"))
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon-a.log").read_text()
        time.sleep(0.02)
    yield str(sock)
    p.terminate()
    p.wait(timeout=10)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def home():
    d = Path(tempfile.mkdtemp(prefix="migrate-user-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ids(pid: int) -> dict[str, str]:
    st = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: st[k].strip() for k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapInh", "CapAmb")}


def _as_nobody(cmd, home: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=home, env=env, user=NOBODY, group=NOBODY, extra_groups=[],
                            stdin=subprocess.DEVNULL, **kw)


def test_user_migrates_own_job_and_it_runs_there_as_the_user(nodes, munged, dest_daemon, source_daemon,  # noqa: F811
                                                              user_env, home, tmp_path):
    """The user's job (their own rootless `hpcckpt run`, its own PID namespace) is moved by
    `hpcckpt migrate` through node a's hpcckptd to node b, restored there as uid 65534 with
    no capability, and finishes with the uninterrupted run's output."""
    addr = nodes.addr_b
    job_cmd = [user_env.python, user_env.program("compute.py"), 80, 0.05]
    ref = reference(job_cmd, tmp_path / "ref.txt")
    out, err = home / "out.txt", home / "err.txt"
    for f in (out, err):
        f.touch()
        os.chown(f, NOBODY, NOBODY)
    with open(out, "ab") as o, open(err, "ab") as e:
        run = _as_nobody(user_env.hpcckpt("-q", "run", "--", *job_cmd), home, user_env.env, stdout=o, stderr=e)
    while out.read_bytes().count(b"\n") < 5:
        assert run.poll() is None, err.read_text()
        time.sleep(0.02)
    job = _descendant(run.pid, "compute.py")
    env = dict(user_env.env, HPCCKPTD_SOCKET=source_daemon)
    action = f'echo "$HPCCKPT_ACTION ${{HPCCKPT_NODE:-here}} $(id -u)" >> {home}/actions.log'
    mig = _as_nobody(user_env.hpcckpt("migrate", "--pid", job, "--to", f"{addr}:{PORT}", "--action-script", action),
                     home, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = mig.communicate(timeout=120)
    assert mig.returncode == 0, stderr
    # the hooks reached the user's own client, the destination's "restored" naming it
    assert (home / "actions.log").read_text().splitlines() == [
        f"frozen here {NOBODY}", f"dumped here {NOBODY}", f"restored {addr}:{PORT} {NOBODY}"]
    there = int(stderr.rsplit("as PID ", 1)[1].split()[0])
    ids = _ids(there)
    run.wait(timeout=30)                  # its monitor on node a saw the job leave
    # node b knew the sender as the user (munge), not as the root daemon that sent it
    assert f"for uid {NOBODY} into" in (tmp_path / "daemon-b.log").read_text()
    _finishes(out, ref)
    assert ids["Uid"].split() == [str(NOBODY)] * 4 and ids["Gid"].split() == [str(NOBODY)] * 4, ids
    assert {ids[k] for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")} == {"0000000000000000"}, ids
    assert ids["Groups"] in ("", str(NOBODY)), ids


def test_user_may_not_migrate_another_users_process(nodes, munged, dest_daemon, source_daemon, user_env,  # noqa: F811
                                                     home):
    addr = nodes.addr_b
    victim = subprocess.Popen(["sleep", "60"])
    try:
        env = dict(user_env.env, HPCCKPTD_SOCKET=source_daemon)
        mig = _as_nobody(user_env.hpcckpt("migrate", "--pid", victim.pid, "--to", f"{addr}:{PORT}"), home, env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, stderr = mig.communicate(timeout=60)
        assert mig.returncode == 1 and "does not run entirely as you" in stderr, stderr
        assert victim.poll() is None and open(f"/proc/{victim.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "S"
    finally:
        victim.kill()
        victim.wait()
