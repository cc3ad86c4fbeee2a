"""Damage is detected, named, and restart falls back to the newest good checkpoint."""
from __future__ import annotations

import logging
import os

import pytest

from hpcckpt.store import NoRestorableCheckpointError, Status, Store

from store_helpers import flip_byte, publish


def test_flipped_byte_in_page_file(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    c1 = publish(store, "j")
    c2 = publish(store, "j")
    flip_byte(c2.path / "pages-2.img", 100)
    problems = store.verify(c2)
    assert len(problems) == 1 and "j/00000002" in problems[0] and "pages-2.img" in problems[0]
    assert "checksum" in problems[0]
    with caplog.at_level(logging.WARNING):
        cand = store.restore_candidate("j")
    assert cand.seq == c1.seq
    assert cand.skipped[0][0] == 2 and "pages-2.img" in cand.skipped[0][1][0]
    assert "j/00000002" in caplog.text or "00000002" in caplog.text
    # the verdict is recorded: latest() now skips it, the catalog says damaged
    assert store.latest("j").seq == 1
    status = {c.seq: c.status for c in store.list("j")}
    assert status == {1: Status.VERIFIED, 2: Status.DAMAGED}


def test_truncated_and_missing_files(store: Store) -> None:
    c1 = publish(store, "j")
    c2 = publish(store, "j")
    c3 = publish(store, "j")
    os.truncate(c3.path / "pages-0.img", 10)
    os.unlink(c2.path / "core-1.img")
    assert store.latest("j").seq == 1            # size check alone rules both out
    p3 = store.verify(c3)
    assert any("pages-0.img" in p and "truncated" in p for p in p3)
    assert any("core-1.img is missing" in p for p in store.verify(c2))
    cand = store.restore_candidate("j")
    assert cand.seq == c1.seq and [s for s, _ in cand.skipped] == [3, 2]


def test_damaged_parent_damages_the_chain(store: Store) -> None:
    base = publish(store, "j")
    inc = publish(store, "j", parent=base.seq)
    flip_byte(base.path / "core-1.img")
    problems = store.verify(inc)
    assert any("parent chain is damaged" in p for p in problems)
    assert any("j/00000001: file core-1.img" in p for p in problems)
    with pytest.raises(NoRestorableCheckpointError) as err:
        store.restore_candidate("j")
    msg = str(err.value)
    assert "none of its 2 checkpoints verifies" in msg and "j/00000002" in msg and "core-1.img" in msg


def test_missing_parent_and_edited_manifest(store: Store) -> None:
    base = publish(store, "j")
    inc = publish(store, "j", parent=base.seq)
    text = (inc.path / "MANIFEST.json").read_text().replace('"nprocs": 1', '"nprocs": 9')
    (inc.path / "MANIFEST.json").write_text(text)
    assert any("fails its own digest" in p for p in store.verify(inc))
    os.rename(base.path, store.root / "elsewhere")
    with pytest.raises(NoRestorableCheckpointError, match="missing"):
        store.restore_candidate("j")


def test_unexpected_file_reported(store: Store) -> None:
    c = publish(store, "j")
    (c.path / "stray.img").write_bytes(b"?")
    assert any("stray.img is not in the manifest" in p for p in store.verify(c))


def test_no_checkpoints_at_all(store: Store) -> None:
    with pytest.raises(NoRestorableCheckpointError, match="no checkpoints"):
        store.restore_candidate("never-ran")
    assert store.latest("never-ran") is None
