"""The whole CLI through hpcckptd for a non-root user: a store, incremental dumps (--parent,
--track-mem, pre-dump), --live, --single, restore --store; and the refusals (another user's
store, parent image or checkpoint), which leave the process running."""
import os
import shutil
from pathlib import Path

import pytest

from hpcckpt.client import Client
from hpcckpt.errors import HpcckptError, PermissionDeniedError
from tests.engine.helpers import pid_alive

from .conftest import NOBODY, as_user
from .test_cli_hooks import as_nobody_cli


def _users_dir(world_dir: Path, name: str) -> Path:
    d = world_dir / name
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    return d


def _fields(resp, *names) -> tuple:
    """Plain values of a Response (as_user carries only picklable results)."""
    return tuple(getattr(resp, n) for n in names)


def _owners(root: Path) -> set[int]:
    return {p.lstat().st_uid for p in [root, *root.rglob("*")]}


def test_store_dump_and_restore_as_a_user(daemon, nobody_job, world_dir):
    _, sock = daemon
    job, ref, _ = nobody_job
    store = _users_dir(world_dir, "store")
    assert as_nobody_cli(sock, ["dump", "--pid", str(job.pid), "--store", str(store), "--job", "j1"]) == 0
    job.proc.wait(timeout=10)
    assert (store / "j1" / "00000001" / "inventory.img").exists()
    assert _owners(store) == {NOBODY}                  # the store's files are the user's
    assert as_nobody_cli(sock, ["restore", "--store", str(store), "--job", "j1"]) == 0
    assert job.out.read_bytes() == ref


def test_incremental_and_pre_dump_as_a_user(daemon, nobody_long_job, world_dir):
    """pre-dump, then dump --parent (only what changed), then --track-mem and a second
    incremental level; restoring the newest gives the uninterrupted output."""
    _, sock = daemon
    job, ref, _ = nobody_long_job
    d = _users_dir(world_dir, "imgs")
    pid = str(job.pid)
    assert as_nobody_cli(sock, ["pre-dump", "--pid", pid, "--images", str(d / "pre")]) == 0
    assert pid_alive(job.pid)
    parent_bytes, tracking = as_user(lambda: _fields(Client(sock).dump(
        job.pid, str(d / "mid"), leave_running=True, parent=str(d / "pre"), track_mem=True), "parent_bytes", "tracking"))
    assert parent_bytes > 0 and tracking, (parent_bytes, tracking)
    assert pid_alive(job.pid)
    assert as_nobody_cli(sock, ["dump", "--pid", pid, "--images", str(d / "last"), "--parent", str(d / "mid")]) == 0
    job.proc.wait(timeout=10)
    assert _owners(d) == {NOBODY}
    assert as_nobody_cli(sock, ["restore", "--images", str(d / "last")]) == 0
    assert job.out.read_bytes() == ref


def test_live_and_single_as_a_user(daemon, nobody_job, world_dir):
    """--live: the job runs on while written; its image, restored after the job is gone,
    rolls the output back and finishes it exactly. --single: the process alone."""
    _, sock = daemon
    job, ref, _ = nobody_job
    d = _users_dir(world_dir, "imgs")
    (processes,) = as_user(lambda: _fields(Client(sock).dump(job.pid, str(d / "live"), live=True, single=True),
                                           "processes"))
    assert processes == 1
    assert pid_alive(job.pid)                          # ran on
    job.kill()
    assert as_nobody_cli(sock, ["restore", "--images", str(d / "live")]) == 0
    assert job.out.read_bytes() == ref


def test_another_users_store_is_refused_and_the_job_runs_on(daemon, nobody_long_job, world_dir):
    _, sock = daemon
    job, ref, _ = nobody_long_job
    roots = world_dir / "roots-store"
    roots.mkdir(mode=0o755)                            # root's: nobody may read, not write
    with pytest.raises(PermissionDeniedError, match=r"you \(uid 65534\) may not write store .*roots-store"):
        as_user(lambda: Client(sock).dump(job.pid, store=str(roots), job="j1"))
    assert pid_alive(job.pid) and list(roots.iterdir()) == []
    os.chmod(roots, 0o777)                             # even writable: the files it holds stay root's
    job_dir = roots / "j1"
    job_dir.mkdir(mode=0o755)
    with pytest.raises(PermissionDeniedError, match="may not write store"):
        as_user(lambda: Client(sock).dump(job.pid, store=str(roots), job="j1"))
    assert pid_alive(job.pid) and list(job_dir.iterdir()) == []
    job.wait_lines(job.lines() + 1)                    # not frozen: it runs on
    job.kill()


def test_another_users_parent_or_checkpoint_is_refused(daemon, nobody_long_job, world_dir):
    _, sock = daemon
    job, ref, _ = nobody_long_job
    d = _users_dir(world_dir, "imgs")
    store = _users_dir(world_dir, "store")
    as_user(lambda: Client(sock).dump(job.pid, str(d / "base"), leave_running=True, track_mem=True).ok)
    as_user(lambda: Client(sock).dump(job.pid, store=str(store), job="j1", leave_running=True).ok)
    stolen = world_dir / "roots-base"                  # the same image, now root's
    shutil.copytree(d / "base", stolen)
    with pytest.raises(PermissionDeniedError, match="parent image .*roots-base belongs to uid 0"):
        as_user(lambda: Client(sock).dump(job.pid, str(d / "inc"), parent=str(stolen)))
    assert pid_alive(job.pid) and not (d / "inc").exists()
    for p in [store, *store.rglob("*")]:               # the user's checkpoint handed to root
        os.lchown(p, 0, 0)
    with pytest.raises(HpcckptError, match=r"Permission denied|belongs to uid 0"):  # unreadable, or not yours
        as_user(lambda: Client(sock).restore(store=str(store), job="j1", detach=True).pid)
    job.wait_lines(job.lines() + 1)
    job.kill()


def test_restore_an_earlier_checkpoint_from_the_store(daemon, nobody_long_job, world_dir):
    """restore --store --job --checkpoint 1: the job resumes from the first of two
    checkpoints (its output rolled back to that point, seen at the "restored" hook) and
    still ends exactly."""
    _, sock = daemon
    job, ref, _ = nobody_long_job
    store = _users_dir(world_dir, "store")

    def size_at_hook(call, event):
        seen = []
        call(Client(sock, on_hook=lambda n: n.event != event or not seen.append(job.out.stat().st_size)))
        return seen[0]
    first = as_user(lambda: size_at_hook(lambda c: c.dump(job.pid, store=str(store), job="j1", leave_running=True,
                                                          wait_hooks=True), "frozen"))
    job.wait_lines(job.lines() + 3)                    # it runs on past the first checkpoint
    assert as_nobody_cli(sock, ["dump", "--pid", str(job.pid), "--store", str(store), "--job", "j1"]) == 0
    job.proc.wait(timeout=10)
    assert job.out.stat().st_size > first
    rolled = as_user(lambda: size_at_hook(lambda c: c.restore(store=str(store), job="j1", checkpoint=1,
                                                              wait_hooks=True), "restored"))
    assert rolled == first                             # checkpoint 1's state, not the newest
    assert job.out.read_bytes() == ref
