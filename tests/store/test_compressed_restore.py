"""End to end: a real numpy process dumped into a zstd store (StoreJob + engine dump),
materialized, restored by the CLI in a subprocess: output identical to an uninterrupted run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hpcckpt.destinations import StoreJob
from hpcckpt.engine.dump import dump
from hpcckpt.store import Store
from tests.engine.helpers import PROGRAMS, Job, reference, restore_fg


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_dump_into_compressed_store_then_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("HPCCKPT_TMPDIR", str(scratch))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    cmd = [sys.executable, PROGRAMS / "blas.py", 40, 0.02]
    ref = reference(cmd, tmp_path / "ref.txt", env=env)

    store = Store(tmp_path / "store", compression=codec)
    job = Job.start(cmd, tmp_path / "out.txt", env=env)
    job.wait_lines(10)
    where, r = StoreJob(store, "blas", 0).checkpoint(lambda path: dump(job.pid, path, show_progress=False))
    job.proc.wait(timeout=10)                       # ended by the dump
    partial = job.out.read_bytes()
    assert 0 < len(partial) < len(ref)

    ckpt = store.restore_candidate("blas")
    assert where == ckpt.name
    suffix = ".zst" if codec == "zstd" else ".lz4"
    assert list(ckpt.path.glob(f"pages-*.img{suffix}")) and not list(ckpt.path.glob("pages-*.img"))
    assert ckpt.image_bytes < ckpt.extra["raw_bytes"]
    with store.materialize(ckpt) as images:
        assert images.is_relative_to(scratch) and list(images.glob("pages-*.img"))
        assert restore_fg(images).returncode == 0
    assert job.out.read_bytes() == ref
    assert not any(scratch.iterdir())


@pytest.mark.slow
def test_incremental_chain_in_compressed_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full and an incremental dump (parent materialized for the engine's hashing) into a
    zstd store; the tip is materialized with its parent and restored through the chain."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("HPCCKPT_TMPDIR", str(scratch))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, PROGRAMS / "blas.py", 60, 0.02]
    ref = reference(cmd, tmp_path / "ref.txt", env=env)
    store = Store(tmp_path / "store", compression="zstd-1")
    sj = StoreJob(store, "chain", 0)
    job = Job.start(cmd, tmp_path / "out.txt", env=env)
    job.wait_lines(10)
    sj.checkpoint(lambda path: dump(job.pid, path, leave_running=True, show_progress=False))
    job.wait_lines(20)

    def incremental(path: Path, parent: Path) -> object:
        with store.materialize(store.get("chain", 1)) as plain_parent:
            return dump(job.pid, path, parent=plain_parent, show_progress=False)
    where, r = sj.checkpoint(incremental, parent=True)
    job.proc.wait(timeout=10)
    assert r.incremental and where == "chain/00000002" and 0 < len(job.out.read_bytes()) < len(ref)
    tip = store.restore_candidate("chain")
    assert tip.parent == 1
    with store.materialize(tip) as images:
        assert restore_fg(images).returncode == 0
    assert job.out.read_bytes() == ref
    assert not any(scratch.iterdir())
