"""Helpers shared by the store tests (imported by name; tests/ has no packages)."""
from __future__ import annotations

from pathlib import Path

from hpcckpt.store import Checkpoint, Store


def write_image(path: Path, seq_hint: int, size: int = 4096) -> None:
    """A fake image set: a message file and a page file, content derived from seq_hint."""
    (path / "core-1.img").write_bytes(f"core of step {seq_hint}\n".encode())
    (path / f"pages-{seq_hint % 3}.img").write_bytes(bytes([seq_hint % 251]) * size)


def publish(store: Store, job: str, generation: int = 0, parent: int | None = None, size: int = 4096,
            **meta) -> Checkpoint:
    w = store.begin(job, generation, parent=parent)
    write_image(w.path, store.state(job).last_seq + 1, size)
    return w.publish({"nprocs": 1, "memory_bytes": size, **meta})


def flip_byte(path: Path, offset: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
