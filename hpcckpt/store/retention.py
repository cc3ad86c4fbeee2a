"""Which checkpoints of a job to keep: a pure function, so it can be property-tested.

The rule that matters: the kept set is closed under "parent of", i.e. deleting is never
allowed to strand an incremental checkpoint without the images it builds on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Entry:
    seq: int
    parent: int | None
    time: float
    nbytes: int


@dataclass(frozen=True)
class Plan:
    keep: frozenset[int]
    delete: frozenset[int]
    pinned: frozenset[int]      # kept only because a kept/in-flight checkpoint needs them, or newest
    over_budget: bool


def closure(seqs: Iterable[int], parents: dict[int, int | None]) -> set[int]:
    """`seqs` plus every ancestor of them that exists."""
    out: set[int] = set()
    for s in seqs:
        while s is not None and s in parents and s not in out:
            out.add(s)
            s = parents[s]
    return out


def plan_retention(entries: list[Entry], keep_last: int | None = None, keep_every: float | None = None,
                   max_bytes: int | None = None, pinned: Iterable[int] = ()) -> Plan:
    """Decide what to keep.

    keep_last: the N newest are wanted. keep_every: beyond those, the newest checkpoint in
    each interval of that many seconds is wanted. With neither, all are wanted. max_bytes:
    then the oldest wanted ones are dropped until the kept set fits. The newest checkpoint,
    `pinned` ones (e.g. parents of checkpoints being written right now) and every ancestor of a
    kept checkpoint are always kept, even over budget (over_budget tells).
    """
    if not entries:
        return Plan(frozenset(), frozenset(), frozenset(), False)
    by_seq = {e.seq: e for e in entries}
    parents = {e.seq: e.parent for e in entries}
    order = sorted(by_seq, reverse=True)
    newest = order[0]
    must = {newest} | {p for p in pinned if p in by_seq}
    if keep_last is None and keep_every is None:
        wanted = set(order)
    else:
        wanted = set(order[:max(keep_last or 0, 1)])
        if keep_every:
            buckets: set[int] = set()
            for s in order:       # newest first: the first seen in a bucket is its newest
                b = math.floor(by_seq[s].time / keep_every)
                if b not in buckets:
                    buckets.add(b)
                    if s not in wanted:
                        wanted.add(s)
    wanted |= must
    keep = closure(wanted, parents)
    over = False
    if max_bytes is not None:
        droppable = sorted(wanted - must)           # oldest first
        while sum(by_seq[s].nbytes for s in keep) > max_bytes:
            if not droppable:
                over = True
                break
            wanted.discard(droppable.pop(0))
            keep = closure(wanted, parents)
    pinned_out = (keep - wanted) | must
    return Plan(frozenset(keep), frozenset(set(by_seq) - keep), frozenset(pinned_out), over)
