"""Compaction replaces a chain's tip by a standalone image; retention can then drop the chain."""
from __future__ import annotations

import shutil
from pathlib import Path

from hpcckpt.store import Checkpoint, Store

from store_helpers import publish


def _merge(chain: list[Checkpoint], out: Path) -> None:
    """A toy engine merge: newer files win."""
    for c in chain:
        for f in c.path.iterdir():
            if f.name.endswith(".img"):
                shutil.copyfile(f, out / f.name)


def test_compact_then_retain(store: Store) -> None:
    publish(store, "j")
    publish(store, "j", parent=1)
    tip = publish(store, "j", parent=2)
    child = publish(store, "j", parent=3)
    new = store.compact(tip, _merge)
    assert new.seq == tip.seq and new.parent is None and new.compacted_from == (1, 2)
    assert new.path == tip.path and store.verify(new) == [] and store.verify(child) == []
    assert sorted(p.name for p in new.path.glob("*.img")) == ["core-1.img", "pages-0.img", "pages-1.img", "pages-2.img"]
    res = store.apply_retention("j", keep_last=2)
    assert res.kept == (3, 4) and res.deleted == (1, 2)
    assert store.restore_candidate("j").seq == 4
    assert [c.parent for c in store.list("j", include_deleted=False)] == [None, 3]
    assert store.compact(new, _merge) == new      # already standalone


def test_half_done_swap_is_rolled_back(store: Store) -> None:
    """A crash between compaction's two renames leaves the old dir parked; it comes back."""
    c = publish(store, "j")
    parked = store.root / "j" / ".replaced"
    parked.mkdir()
    c.path.rename(parked / "00000001.host.1.abcd")
    assert store.restore_candidate("j").seq == 1
    assert c.path.is_dir() and not any(parked.iterdir())
