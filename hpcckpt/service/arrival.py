"""Restoring a migrated image while its page files are still arriving.

The daemon receives a migration's files in order, metadata first and page files last,
each written front to back into a staging directory, and hands the restore to its worker
as soon as the metadata is complete. The engine checks everything else up front as
always; for the page files (`names`) it asks `wait(path, end)` before each read, which
returns once the receiver has written that far. Meanwhile a thread per page file hashes
the bytes as they land, and `check()` - called before anything runs (the restore's
`on_ready`) - insists that every file reached exactly its inventory size with its
inventory digest: a damaged or short stream kills the half-built tree, as a bad digest
does before an ordinary restore.

The receiver writes ARRIVED into the directory after the last byte; it removes the whole
directory if the stream fails, which ends every wait at once.
"""
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ..errors import ImageError
from ..images.imageset import ImageSet

ARRIVED = ".arrived"
IDLE_TIMEOUT = 120.0      # seconds without a new byte before we give up on the sender
POLL = 0.001
CHUNK = 8 << 20


@dataclass
class Arriving:
    path: Path
    names: frozenset[str]
    errors: dict[str, str] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        inv = ImageSet(self.path).inventory()
        for name in sorted(self.names):
            d = inv.digests.get(name)
            if d is None:
                raise ImageError(f"{self.path}: {name} is not in the image's inventory")
            t = threading.Thread(target=self._hash, args=(name, d.size, d.xxh3_128), daemon=True)
            t.start()
            self.threads.append(t)

    def wait(self, path: Path, end: int) -> None:
        """Return once `path` holds at least `end` bytes."""
        last, since = -1, time.monotonic()
        while True:
            arrived = (self.path / ARRIVED).exists()   # first: bytes may land between the two looks
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                if not self.path.is_dir():
                    raise ImageError(f"the migration stream broke off: {self.path} was removed") from None
                size = 0
            if size >= end:
                return
            if arrived:
                raise ImageError(f"{path} ended at {size} bytes; the image reads up to {end}")
            if size != last:
                last, since = size, time.monotonic()
            elif time.monotonic() - since > IDLE_TIMEOUT:
                raise ImageError(f"no byte of {path} arrived for {IDLE_TIMEOUT:g} s")
            time.sleep(POLL)

    def _hash(self, name: str, size: int, want: str) -> None:
        path = self.path / name
        h = xxhash.xxh3_128()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        done = 0
        try:
            since = time.monotonic()
            while not path.exists():
                if ((self.path / ARRIVED).exists() and not path.exists()) or not self.path.is_dir():
                    raise ImageError(f"image file {path} never arrived")
                if time.monotonic() - since > IDLE_TIMEOUT:
                    raise ImageError(f"image file {path} did not arrive within {IDLE_TIMEOUT:g} s")
                time.sleep(POLL)
            with open(path, "rb", buffering=0) as f:
                while done < size:
                    self.wait(path, min(size, done + CHUNK))
                    n = f.readinto(view[:min(CHUNK, size - done)])
                    h.update(view[:n])
                    done += n
            self.wait_complete()
            if os.stat(path).st_size != size:
                raise ImageError(f"image file {path} has {os.stat(path).st_size} bytes, the inventory says {size}")
            if h.hexdigest() != want:
                raise ImageError(f"image file {path} is corrupt (xxh3-128 digest differs from the inventory)")
        except (ImageError, OSError) as e:
            self.errors[name] = str(e)

    def wait_complete(self) -> None:
        """Return once the receiver has written its last byte."""
        since = time.monotonic()
        while not (self.path / ARRIVED).exists():
            if not self.path.is_dir():
                raise ImageError(f"the migration stream broke off: {self.path} was removed")
            if time.monotonic() - since > IDLE_TIMEOUT:
                raise ImageError(f"the migration into {self.path} did not finish within {IDLE_TIMEOUT:g} s")
            time.sleep(POLL)

    def check(self) -> None:
        """Every page file complete and as the inventory says; else ImageError."""
        for t in self.threads:
            t.join()
        if self.errors:
            raise ImageError("; ".join(self.errors[n] for n in sorted(self.errors)))
