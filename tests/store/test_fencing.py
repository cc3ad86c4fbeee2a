"""A stale generation (a cut-off copy of a requeued job) can neither begin nor publish."""
from __future__ import annotations

import pytest

from hpcckpt.store import StaleGenerationError, Store

from store_helpers import publish


def test_stale_writer_cannot_publish_after_newer_generation_began(store: Store) -> None:
    publish(store, "job", generation=0)
    stale = store.begin("job", 0)                 # the old copy starts a dump ...
    (stale.path / "pages-1.img").write_bytes(b"old" * 100)
    newer = store.begin("job", 1)                 # ... while Slurm restarted the job (restart count 1)
    with pytest.raises(StaleGenerationError) as err:
        stale.publish({})
    msg = str(err.value)
    assert "generation 0 may not publish" in msg and "generation 1 was recorded" in msg and "'job'" in msg
    assert err.value.newest == 1
    assert not stale.path.exists()                # its staging is discarded
    (newer.path / "pages-1.img").write_bytes(b"new" * 100)
    c = newer.publish({})
    assert store.latest("job") == c and c.generation == 1


def test_stale_generation_cannot_begin(store: Store) -> None:
    publish(store, "job", generation=3)
    with pytest.raises(StaleGenerationError, match="generation 2 may not begin"):
        store.begin("job", 2)
    publish(store, "job", generation=3)          # same generation keeps working


def test_fence_survives_lost_state_file(store: Store) -> None:
    publish(store, "job", generation=5)
    (store.root / "job" / "STATE.json").unlink()
    with pytest.raises(StaleGenerationError):
        store.begin("job", 4)
    assert publish(store, "job", generation=5).seq == 2   # sequence numbers are not reused


def test_next_generation_counter(store: Store) -> None:
    g1 = store.next_generation("local")
    g2 = store.next_generation("local")
    assert g2 == g1 + 1
    with pytest.raises(StaleGenerationError):
        store.begin("local", g1)
