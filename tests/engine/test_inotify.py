"""inotify watches and fanotify marks (engine/fsnotify.py): a watcher (tests/programs/
fswatch.c) whose live watch numbers are 2 and 3 (1 was removed) is dumped midway, killed,
restored; it must go on receiving the events of the files it creates after the restore,
under the same wd numbers, and its next new watch must get the number an uninterrupted
run gives: the output is compared whole. A fanotify notification mark likewise; a
fanotify group of a permission class is refused, the process left running."""
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import PROGRAMS, Job, cli, restore_fg


@pytest.fixture(scope="session")
def fswatch(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin") / "fswatch"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(PROGRAMS / "fswatch.c")], check=True)
    return out


def _run(tmp_path, fswatch, extra: list, lines_before: int) -> tuple[bytes, bytes, Path]:
    """(the uninterrupted output, the dumped-killed-restored run's, its image)"""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    with open(tmp_path / "ref.txt", "wb") as f:
        subprocess.run([str(fswatch), str(ref_dir), "30", "40", *extra], stdout=f, check=True, timeout=120)
    ref = (tmp_path / "ref.txt").read_bytes()
    for attempt in range(3):
        # events queued but unread at the dump are lost by design (the dump says so): a dump
        # that fell between a file's creation and the read of its event is taken again
        job_dir, img = tmp_path / f"job{attempt}", tmp_path / f"img{attempt}"
        job_dir.mkdir()
        job = Job.start([fswatch, job_dir, 30, 40, *extra], tmp_path / f"out{attempt}.txt")
        try:
            job.wait_lines(lines_before)
            dumped = cli("dump", "--pid", job.pid, "--images", img)
            job.proc.wait(timeout=10)
            assert job.proc.returncode == -9
            if "unread events" in dumped.stderr:
                continue
            partial = job.out.read_bytes()
            res = restore_fg(img)
            assert res.returncode == 0, res.stderr
        finally:
            job.kill()
        assert 0 < len(partial) < len(ref)
        return ref, job.out.read_bytes(), img
    raise AssertionError("three dumps in a row found unread events")


def test_inotify_watches_keep_their_numbers(tmp_path, fswatch):
    ref, out, img = _run(tmp_path, fswatch, [], 25)
    assert out == ref
    assert b"  inotify wd 3 close_write g29\n" in out and b"new watch: 4\n" in out
    shown = cli("show", img).stdout
    assert "INOTIFY" in shown


def test_fanotify_mark_still_reports(tmp_path, fswatch):
    ref, out, _ = _run(tmp_path, fswatch, ["fanotify"], 25)
    assert out == ref
    assert b"  fanotify mask 0x8 file h29\n" in out


def test_fanotify_permission_class_is_refused_and_process_runs_on(tmp_path):
    """A group of FAN_CLASS_CONTENT stops the dump naming process, fd and kind."""
    code = ("import ctypes,time\n"
            "fd=ctypes.CDLL(None).fanotify_init(0x4, 0); assert fd >= 0; print(fd, flush=True)\n"
            "[time.sleep(0.02) for _ in range(100)]; print('done', flush=True)\n")
    job = Job.start([sys.executable, "-c", code], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        fd = job.out.read_text().split()[0]
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
        assert res.returncode == 2, res.stderr
        assert f"process {job.pid}: fd {fd} is a fanotify group of a permission class" in res.stderr
        assert job.proc.wait(timeout=30) == 0          # thawed, ran to its end
        assert job.out.read_text().endswith("done\n")
        assert not (tmp_path / "img").exists()
    finally:
        job.kill()


def test_user_image_may_not_claim_a_privileged_fanotify_group(tmp_path, fswatch):
    """validate.py: fanotify without file-id reporting needs CAP_SYS_ADMIN; a user's image
    holding one is refused before anything is made."""
    import os
    from hpcckpt.images.imageset import ImageSet
    (tmp_path / "job").mkdir()
    job = Job.start([fswatch, tmp_path / "job", 30, 40, "fanotify"], tmp_path / "out.txt")
    try:
        job.wait_lines(10)
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    finally:
        job.kill()
    iset = ImageSet(tmp_path / "img")
    inv = iset.inventory()
    user = 65534
    for pid in inv.pids:
        p = iset.process(pid)
        for f in ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid"):
            setattr(p.creds, f, user)
        iset.write_message(f"process-{pid}.img", "process", p)
    inv.uid = user
    iset.seal(inv)
    for p in [*iset.path.iterdir(), iset.path]:
        os.chown(p, user, user)
    res = cli("restore", "--images", tmp_path / "img", check=False)
    assert res.returncode != 0
    assert "fanotify flags 0x1 need CAP_SYS_ADMIN, which the image's owner (uid 65534) lacks" in res.stderr, \
        res.stderr


def test_user_run_with_inotify_says_what_it_lacks(user_env, tmp_path):
    """Rootless: the path of a watch comes from its file handle, which only
    CAP_DAC_READ_SEARCH on the host may open: each checkpoint fails saying so, the job
    runs to its exact end."""
    import os
    import shutil
    import tempfile
    from pathlib import Path
    from tests.integration.test_rootless import NOBODY, as_nobody
    exe = user_env.root / "programs" / "fswatch"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(user_env.program("fswatch.c"))], check=True)
    home = Path(tempfile.mkdtemp(prefix="sysvipc-rootless-", dir="/tmp"))
    try:
        for d in ("ref", "job"):
            (home / d).mkdir()
            os.chown(home / d, NOBODY, NOBODY)
        os.chown(home, NOBODY, NOBODY)
        ref = as_nobody([exe, home / "ref", 20, 50], home, home / "ref.txt", home / "ref.err", user_env.env)
        assert ref.wait(timeout=60) == 0
        cmd = user_env.hpcckpt("run", "--images", home / "img", "--every", 0.3, "--", exe, home / "job", 20, 50)
        run = as_nobody(cmd, home, home / "out.txt", home / "err.txt", user_env.env)
        assert run.wait(timeout=60) == 0, (home / "err.txt").read_text()
        err = (home / "err.txt").read_text()
        assert "checkpoint failed, job continues" in err and "needs CAP_DAC_READ_SEARCH" in err, err
        assert (home / "out.txt").read_bytes() == (home / "ref.txt").read_bytes()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_unread_events_are_reported_lost(tmp_path):
    """Events queued at the checkpoint cannot be given back: the dump says how many bytes."""
    (tmp_path / "w").mkdir()
    code = ("import ctypes,time\n"
            f"l=ctypes.CDLL(None); fd=l.inotify_init1(0); l.inotify_add_watch(fd, b'{tmp_path / 'w'}', 0x100)\n"
            f"open('{tmp_path / 'w' / 'f'}', 'w').close(); print(fd, flush=True)\n"
            "[time.sleep(0.02) for _ in range(200)]\n")
    job = Job.start([sys.executable, "-c", code], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        fd = job.out.read_text().split()[0]
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--leave-running")
        assert f"process {job.pid}: fd {fd} (anon_inode:inotify) had 32 bytes of unread events" in res.stderr, \
            res.stderr
    finally:
        job.kill()
