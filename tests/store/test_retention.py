"""Retention never deletes a parent that a kept checkpoint needs."""
from __future__ import annotations

import random

import pytest

from hpcckpt.store import CheckpointNotFoundError, Store
from hpcckpt.store.retention import Entry, plan_retention

from store_helpers import publish


def _check_plan(entries: list[Entry], keep_last, keep_every, max_bytes, pinned) -> None:
    plan = plan_retention(entries, keep_last, keep_every, max_bytes, pinned)
    seqs = {e.seq for e in entries}
    parents = {e.seq: e.parent for e in entries}
    assert plan.keep | plan.delete == seqs and not (plan.keep & plan.delete)
    for s in plan.keep:                                   # closed under "parent of"
        p = parents[s]
        assert p is None or p not in seqs or p in plan.keep
    assert max(seqs) in plan.keep
    assert {p for p in pinned if p in seqs} <= plan.keep
    if keep_last and max_bytes is None:
        assert set(sorted(seqs)[-keep_last:]) <= plan.keep
    if max_bytes is not None and not plan.over_budget:
        assert sum(e.nbytes for e in entries if e.seq in plan.keep) <= max_bytes
    if keep_last is None and keep_every is None and max_bytes is None:
        assert plan.delete == frozenset()


def _random_entries(rng: random.Random, n: int) -> list[Entry]:
    out, t = [], 1000.0
    for s in range(1, n + 1):
        t += rng.uniform(1, 100)
        parent = rng.choice([None, None] + list(range(max(1, s - 5), s))) if s > 1 else None
        out.append(Entry(s, parent, t, rng.randint(1, 1000)))
    return out


def test_plan_random_cases() -> None:
    """Seeded random cases (runs even where hypothesis is not installed)."""
    rng = random.Random(7)
    for _ in range(500):
        entries = _random_entries(rng, rng.randint(1, 30))
        _check_plan(entries, rng.choice([None, 0, 1, 2, 5]), rng.choice([None, 50.0, 500.0]),
                    rng.choice([None, 0, 2000, 10000]), rng.sample([e.seq for e in entries], k=min(2, len(entries))))


def test_plan_property_hypothesis() -> None:
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=300, deadline=None)
    @hyp.given(seed=st.integers(0, 2**32), n=st.integers(1, 40), keep_last=st.one_of(st.none(), st.integers(0, 8)),
               keep_every=st.one_of(st.none(), st.floats(1, 1000)), max_bytes=st.one_of(st.none(), st.integers(0, 20000)),
               npinned=st.integers(0, 3))
    def prop(seed, n, keep_last, keep_every, max_bytes, npinned):
        rng = random.Random(seed)
        entries = _random_entries(rng, n)
        _check_plan(entries, keep_last, keep_every, max_bytes, rng.sample(range(1, n + 1), k=min(npinned, n)))

    prop()


def test_apply_retention_on_a_real_store(store: Store) -> None:
    # chains: 1 <- 2 <- 3, 4 (full) <- 5 <- 6, 7 (full), 8 <- (parent 7)
    publish(store, "j"); publish(store, "j", parent=1); publish(store, "j", parent=2)
    publish(store, "j"); publish(store, "j", parent=4); publish(store, "j", parent=5)
    publish(store, "j"); publish(store, "j", parent=7)
    res = store.apply_retention("j", keep_last=3)
    # newest three are 6, 7, 8; 6 needs 5 and 4
    assert res.kept == (4, 5, 6, 7, 8) and res.deleted == (1, 2, 3)
    assert set(res.pinned) >= {4, 5}
    for c in store.scan("j"):
        assert store.verify(c) == []
    with pytest.raises(CheckpointNotFoundError, match="deleted by retention"):
        store.get("j", 2)
    assert {c.seq for c in store.list("j", include_deleted=False)} == {4, 5, 6, 7, 8}
    # a byte budget too small for anything still keeps the newest and its chain
    res = store.apply_retention("j", keep_last=1, max_bytes=1)
    assert res.kept == (7, 8) and res.over_budget


def test_in_flight_parent_is_not_deleted(store: Store) -> None:
    for _ in range(4):
        publish(store, "j")
    w = store.begin("j", 0, parent=1)              # an incremental dump on top of 1 is running
    res = store.apply_retention("j", keep_last=1)
    assert 1 in res.kept and res.deleted == (2, 3)
    (w.path / "pages-1.img").write_bytes(b"z")
    assert w.publish({}).parent == 1
