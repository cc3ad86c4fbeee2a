"""The data the store hands out: Checkpoint, its Status, and what a publish records."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Status(enum.IntEnum):
    """Life cycle of a checkpoint as the catalog records it (stored as a small int)."""

    COMPLETE = 1   # published: manifest written, renamed into place
    VERIFIED = 2   # a full checksum verification of it and its parent chain passed
    DAMAGED = 3    # a verification found a problem (see VERIFY.json in its directory)
    DELETED = 4    # removed by retention or by hand; kept in the catalog as history

    @property
    def label(self) -> str:
        return self.name.lower()


#: Scalar fields of meta that have their own catalog column (others stay in the manifest).
META_NUMBERS: dict[str, type] = {
    "nprocs": int,
    "memory_bytes": int,
    "pages_written": int,
    "freeze_s": float,
    "dump_s": float,
    "write_s": float,
}
META_STRINGS = ("host", "backend")


@dataclass(frozen=True)
class Checkpoint:
    """One published image set. `path` is the directory the engine restores from."""

    job: str
    generation: int
    seq: int
    path: Path
    parent: int | None
    time: float                  # unix time of publish
    created: float               # unix time of begin()
    host: str
    nprocs: int = 0
    memory_bytes: int = 0
    image_bytes: int = 0
    nfiles: int = 0
    pages_written: int = 0
    freeze_s: float = float("nan")
    dump_s: float = float("nan")
    write_s: float = float("nan")
    backend: str = ""
    status: Status = Status.COMPLETE
    compacted_from: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    #: set by restore_candidate(): newer checkpoints it skipped, with their problems
    skipped: tuple[tuple[int, tuple[str, ...]], ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        """How messages name this checkpoint: job/seq."""
        return f"{self.job}/{self.seq:08d}"

    def replace(self, **changes: Any) -> "Checkpoint":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RetentionResult:
    """What apply_retention() kept and removed, and why nothing more could go."""

    job: str
    kept: tuple[int, ...]
    deleted: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    #: kept although a policy would drop them: parents of kept ones, in-flight parents, newest
    pinned: tuple[int, ...] = ()
    over_budget: bool = False
