"""The HDF5 catalog: arrays round-trip, many concurrent writers, rebuild, damage."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import h5py
import numpy as np

from hpcckpt.store import Status, Store, format_listing, plot_stats

from store_helpers import publish


def _fields(c):
    return (c.job, c.seq, c.generation, c.parent, c.time, c.created, c.host, c.nprocs, c.memory_bytes,
            c.image_bytes, c.nfiles, c.pages_written, c.backend, c.status)


def test_arrays_and_scalars_round_trip(store: Store) -> None:
    dirty = np.array([0, 5, 17, 4096, 3], dtype=np.int64)
    rate = np.linspace(0.5, 3.5, 7)
    c = publish(store, "j", pages_written=4121, dump_s=1.25, write_s=0.75, backend="ptrace",
                dirty_pages=dirty, write_rate=rate, note="free text")
    publish(store, "j", dirty_pages=np.array([1, 2], dtype=np.int64))
    assert c.extra["note"] == "free text"
    for sync in (False, True):                    # pending in the journal, then folded into HDF5
        if sync:
            store.catalog_sync()
            assert not list(store.catalog.journal.iterdir())
        got = store.catalog_arrays("j", c.seq)
        assert got["dirty_pages"].dtype == np.int64 and np.array_equal(got["dirty_pages"], dirty)
        assert np.array_equal(got["write_rate"], rate)
        assert np.array_equal(store.catalog_arrays("j", 2)["dirty_pages"], [1, 2])
        assert "write_rate" not in store.catalog_arrays("j", 2)
        [row, _] = store.list("j")
        assert (row.pages_written, row.dump_s, row.write_s, row.backend) == (4121, 1.25, 0.75, "ptrace")
    assert np.array_equal(store.arrays(c)["dirty_pages"], dirty)      # also inside the checkpoint
    with h5py.File(store.catalog.path, "r") as f:                     # plain HDF5, readable by anyone
        assert list(f["jobs"]["job"]) == [b"j"] and len(f["checkpoints"]) == 2
    store.rebuild_catalog()
    assert np.array_equal(store.catalog_arrays("j", c.seq)["write_rate"], rate)


def _writer(root: str, job: str, n: int, retain: bool = True) -> None:
    store = Store(root, fold_every=4)
    parent = None
    for i in range(n):
        c = publish(store, job, parent=parent, size=2000 + i, dirty_pages=np.arange(i + 1))
        parent = c.seq if i % 3 else None
    if retain:
        store.apply_retention(job, keep_last=6)
    os._exit(0)


def test_eight_concurrent_writers(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    Store(root)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(root, f"job{k}", 10)) for k in range(8)]
    # two more writers share one job: sequence numbers must still be unique
    # (retention once both are done: one's retention may delete the other's next parent)
    procs += [ctx.Process(target=_writer, args=(root, "shared", 10, False)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    Store(root).apply_retention("shared", keep_last=6)
    store = Store(root)
    on_disk = store.scan()
    per_job = {}
    for c in on_disk:
        per_job.setdefault(c.job, []).append(c.seq)
        assert store.verify(c, record=False) == []
    assert sorted(per_job) == ["job%d" % k for k in range(8)] + ["shared"]
    catalog = store.list()
    assert len(catalog) == 8 * 10 + 20                      # nothing lost: deleted ones kept as history
    live = sorted(_fields(c) for c in catalog if c.status is not Status.DELETED)
    assert live == sorted(_fields(c) for c in on_disk)
    store.catalog_sync()
    before = sorted(_fields(c) for c in store.list())
    arrays_before = {(c.job, c.seq): store.catalog_arrays(c.job, c.seq) for c in on_disk[:5]}
    assert store.rebuild_catalog() == len(before)
    assert sorted(_fields(c) for c in store.list()) == before
    for (job, seq), arrs in arrays_before.items():
        assert np.array_equal(store.catalog_arrays(job, seq)["dirty_pages"], arrs["dirty_pages"])


def test_truncated_catalog_is_detected_and_never_blocks_restart(store: Store, caplog) -> None:
    for _ in range(3):
        publish(store, "j")
    store.catalog_sync()
    size = store.catalog.path.stat().st_size
    os.truncate(store.catalog.path, size // 2)
    problems = store.catalog.check()
    assert problems and str(store.catalog.path) in problems[0] and "rebuild" in problems[0]
    assert store.latest("j").seq == 3                       # restart paths do not read the catalog
    assert store.restore_candidate("j").seq == 3
    c4 = publish(store, "j")                                # publishing still works
    listed = store.list("j")                                # ... and ls rebuilds, with a warning
    assert [c.seq for c in listed] == [1, 2, 3, 4] and c4.seq == 4
    assert "unreadable" in caplog.text
    assert store.catalog.check() == []


def test_catalog_latest_lookup(store: Store) -> None:
    publish(store, "a"); publish(store, "a"); publish(store, "b")
    store.catalog_sync()
    publish(store, "a")                                      # pending in the journal
    assert store.catalog.latest_seq("a") == 3 and store.catalog.latest_seq("b") == 1
    assert store.catalog.latest_seq("zzz") is None


def test_format_listing_and_plot(store: Store, tmp_path: Path) -> None:
    publish(store, "j", freeze_s=0.1, dump_s=0.2, write_s=0.3, dirty_pages=np.array([3, 1, 4]))
    publish(store, "j", parent=1, freeze_s=0.1, dump_s=0.1, write_s=0.1)
    text = format_listing(store.list())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["JOB", "SEQ", "GEN"] and len(lines) == 3
    assert "00000001" in lines[2] and "complete" in lines[2]
    assert format_listing([]) == "no checkpoints\n"
    png = plot_stats(store, "j", tmp_path / "stats.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fold_into_damaged_catalog_rebuilds_instead_of_losing_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fold_every=1)
    for _ in range(3):
        publish(store, "j")
    store.catalog.path.write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    publish(store, "j")                                      # this publish folds
    assert store.catalog.check() == []
    assert [c.seq for c in store.list("j")] == [1, 2, 3, 4]
