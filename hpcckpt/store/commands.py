"""What the CLI's store commands call: one function per command, returning what to print.

Kept here (not in cli.py) so the store's rules - which checkpoint a restore may use, that a
compressed one must be materialized first, that compaction goes through the job lock -
live with the store, and the CLI stays argument parsing.
"""
from __future__ import annotations

import os

from .errors import CheckpointNotFoundError
from .materialize import Materialized
from .store import MergeFn, Store


def restore_images(root: str | os.PathLike[str], job: str, checkpoint: int | None = None,
                   dest_dir: str | os.PathLike[str] | None = None) -> Materialized:
    """`hpcckpt restore --store ROOT --job NAME [--checkpoint N]`: plain image directory to
    hand the engine. `with restore_images(...) as path: restore(path)`; the newest checkpoint
    that fully verifies unless N is given (N is verified too, and refused if damaged).
    Damaged newer checkpoints that were skipped are in `.checkpoints[-1].skipped`."""
    store = Store(root)
    if checkpoint is None:
        ckpt = store.restore_candidate(job)
    else:
        ckpt = store.get(job, checkpoint)
        problems = store.verify(ckpt)
        if problems:
            raise CheckpointNotFoundError(f"checkpoint {ckpt.name} is damaged and cannot be restored: "
                                          + "; ".join(problems) + " (omit --checkpoint to fall back to a good one)")
    m = store.materialize(ckpt, dest_dir)
    m.checkpoints[-1] = m.checkpoints[-1].replace(skipped=ckpt.skipped, status=ckpt.status)
    return m


def catalog_rebuild(root: str | os.PathLike[str]) -> str:
    """`hpcckpt catalog rebuild --store ROOT`."""
    n = Store(root).rebuild_catalog()
    return f"catalog of {root} rebuilt from the checkpoint directories: {n} checkpoints"


def compact(root: str | os.PathLike[str], job: str, merge_fn: MergeFn, checkpoint: int | None = None) -> str:
    """`hpcckpt compact --store ROOT --job NAME [--checkpoint N]` (merge_fn: the engine's)."""
    store = Store(root)
    before = store.get(job, checkpoint) if checkpoint is not None else store.latest(job)
    if before is None:
        raise CheckpointNotFoundError(f"job {job!r} has no complete checkpoint in store {root} to compact")
    if before.parent is None:
        return f"{before.name} is already standalone; nothing to compact"
    after = store.compact(before, merge_fn)
    merged = ", ".join(f"{s:08d}" for s in after.compacted_from)
    return (f"{after.name} is now standalone ({after.image_bytes / 2**20:.1f} MiB), merged from {merged}; "
            "retention may now delete those")
