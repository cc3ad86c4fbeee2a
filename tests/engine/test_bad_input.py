"""Bad input gets a clear error and loses nothing; nothing is left frozen or half-restored."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpcckpt.engine.dump import dump
from hpcckpt.errors import PermissionDeniedError
from hpcckpt.images.imageset import ImageSet

from .helpers import PROGRAMS, Job, cli, pid_alive, reference

NOBODY = 65534


@pytest.fixture
def image(tmp_path, threads_fp):
    """A sealed image of a process killed after the dump; returns (image dir, job)."""
    job = Job.start([threads_fp, 120, 2, 20], tmp_path / "out.txt")
    job.wait_lines(4)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    return tmp_path / "img", job


def test_pid_that_does_not_exist(tmp_path):
    res = cli("dump", "--pid", 4000000, "--images", tmp_path / "img", check=False)
    assert res.returncode == 2
    assert "process 4000000 does not exist" in res.stderr
    assert not (tmp_path / "img").exists()


def test_pid_that_already_exited(tmp_path):
    p = subprocess.Popen(["true"])
    while not open(f"/proc/{p.pid}/stat").read().split(")")[1].split()[0] == "Z":
        pass
    res = cli("dump", "--pid", p.pid, "--images", tmp_path / "img", check=False)
    p.wait()
    assert res.returncode == 2 and f"{p.pid}" in res.stderr and "Traceback" not in res.stderr


def test_unsupported_fd_leaves_process_running(tmp_path, threads_fp):
    """A netlink socket stops the dump, names process, fd and kind; the job finishes correctly."""
    cmd = [sys.executable, "-c",
           "import socket,sys,runpy; s=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW); sys.argv=['compute.py','50','0.06']; "
           f"runpy.run_path({str(PROGRAMS / 'compute.py')!r}, run_name='__main__')"]
    ref = reference([sys.executable, PROGRAMS / "compute.py", 50, 0.06], tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(5)
    res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
    assert res.returncode == 2
    assert f"process {job.pid}: fd 3 (netlink" in res.stderr and "cannot be checkpointed" in res.stderr
    assert job.proc.wait(timeout=60) == 0
    assert job.out.read_bytes() == ref
    assert not (tmp_path / "img").exists()


def test_full_disk_leaves_process_running(tmp_path):
    """ENOSPC in the middle of writing pages: the job survives, no partial image is left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        cmd = [sys.executable, "-c",
               "import sys,runpy; big=bytearray(b'x')*(16<<20); sys.argv=['compute.py','50','0.06']; "
               f"runpy.run_path({str(PROGRAMS / 'compute.py')!r}, run_name='__main__')"]
        ref = reference([sys.executable, PROGRAMS / "compute.py", 50, 0.06], tmp_path / "ref.txt")
        job = Job.start(cmd, tmp_path / "out.txt")
        job.wait_lines(5)
        res = cli("dump", "--pid", job.pid, "--images", mnt / "img", check=False)
        assert res.returncode == 2
        assert "No space left on device" in res.stderr and str(mnt / "img") in res.stderr
        assert job.proc.wait(timeout=60) == 0
        assert job.out.read_bytes() == ref
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _expect_restore_error(img: Path, job: Job, *fragments: str) -> None:
    res = cli("restore", "--images", img, check=False)
    assert res.returncode == 2, res.stderr
    for f in fragments:
        assert f in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not pid_alive(job.pid)


@pytest.mark.parametrize("victim", ["inventory.img", "process-", "pagemap-", "pages-"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_image_is_refused(image, victim, damage):
    img, job = image
    target = next(p for p in img.iterdir() if p.name.startswith(victim))
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x40
        target.write_bytes(data)
    _expect_restore_error(img, job, target.name)


def test_missing_image_file(image):
    img, job = image
    victim = next(img.glob("pagemap-*"))
    victim.unlink()
    _expect_restore_error(img, job, victim.name, "missing")


def test_other_format_version(image):
    img, job = image
    iset = ImageSet(img)
    inv = iset.read_message("inventory.img", "inventory")
    inv.format_version = 99
    iset.write_message("inventory.img", "inventory", inv)
    _expect_restore_error(img, job, "format version 99")


def test_missing_mapped_file(tmp_path, threads_fp):
    exe = tmp_path / "copy_of_threads_fp"
    shutil.copy(threads_fp, exe)
    job = Job.start([exe, 120, 2, 20], tmp_path / "out.txt")
    job.wait_lines(3)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    exe.unlink()
    _expect_restore_error(tmp_path / "img", job, str(exe), "missing")


def test_output_file_gone(image):
    img, job = image
    job.out.unlink()
    _expect_restore_error(img, job, str(job.out), "missing")


@pytest.fixture
def world_dir():
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-test-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_user_process_restored_with_its_own_credentials(world_dir, threads_fp):
    exe = world_dir / "threads_fp"
    shutil.copy(threads_fp, exe)
    exe.chmod(0o755)
    cmd = [exe, 120, 2, 20]
    ref = reference(cmd, world_dir / "ref.txt")
    out = world_dir / "out.txt"
    out.touch()
    os.chown(out, NOBODY, NOBODY)
    with open(out, "wb") as f:
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, user=NOBODY, group=NOBODY, extra_groups=[])
    job = Job(p, out)
    job.wait_lines(5)
    cli("dump", "--pid", job.pid, "--images", world_dir / "img")
    p.wait(timeout=10)
    n = job.lines()
    r = subprocess.Popen([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", world_dir / "img"])
    while job.lines() <= n:              # the restored process is writing
        assert r.poll() is None
        time.sleep(0.01)
    uids = open(f"/proc/{job.pid}/status").read().split("Uid:")[1].split("\n")[0].split()
    assert uids == [str(NOBODY)] * 4       # never root, though root restored it
    assert r.wait(timeout=60) == 0
    assert out.read_bytes() == ref


def test_file_the_owner_cannot_open_kills_the_half_restored_process(world_dir, threads_fp):
    """A failure after the process exists: it is killed, not left half-made."""
    exe = world_dir / "threads_fp"
    shutil.copy(threads_fp, exe)
    exe.chmod(0o755)
    out = world_dir / "out.txt"
    out.touch()
    os.chown(out, NOBODY, NOBODY)
    with open(out, "wb") as f:
        p = subprocess.Popen([str(exe), "30", "2", "20"], stdout=f, stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, user=NOBODY, group=NOBODY, extra_groups=[])
    job = Job(p, out)
    job.wait_lines(3)
    cli("dump", "--pid", job.pid, "--images", world_dir / "img")
    p.wait(timeout=10)
    out.chmod(0o000)   # root could still open it; the image's owner cannot
    _expect_restore_error(world_dir / "img", job, str(out), "Permission denied")


def test_image_edited_to_claim_root_is_refused(image):
    img, job = image          # a root process's image...
    for f in [img, *img.iterdir()]:
        os.chown(f, NOBODY, NOBODY)   # ...handed to a user: it now claims more than its owner had
    _expect_restore_error(img, job, f"owned by uid {NOBODY}", "refused")


def test_user_may_not_dump_someone_elses_process(tmp_path, threads_fp):
    job = Job.start([threads_fp, 200, 1, 20], tmp_path / "out.txt")
    job.wait_lines(2)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            dump(job.pid, "/tmp/hpcckpt-never-written")
        except PermissionDeniedError as e:
            code = 0 if "belongs to uid 0" in str(e) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0
    assert pid_alive(job.pid)
    job.kill()
