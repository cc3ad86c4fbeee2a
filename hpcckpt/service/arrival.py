"""Restoring a migrated image while its page files are still arriving.

The daemon receives a migration's files in order, metadata first and page files last,
each written front to back into a staging directory, and hands the restore to its worker
as soon as the metadata is complete. The engine checks everything else up front as
always; for the page files (`names`, in the order they arrive) it asks `wait(path, end)`
before each read, which returns once the receiver has written that far. Meanwhile one
thread hashes the files, in that order, as their bytes land, and `check()` - called before anything runs (the restore's
`on_ready`) - insists that every file reached exactly its inventory size with its
inventory digest: a damaged or short stream kills the half-built tree, as a bad digest
does before an ordinary restore.

The receiver writes ARRIVED into the directory after the last byte; it removes the whole
directory if the stream fails, which ends every wait at once. A source that dumped while it
sent (engine/streamdump.py) knew the page files' digests only after their bytes: their
inventory entries are empty, and ARRIVED holds the MigrateTrailer that brought them.
"""
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ..errors import ImageError
from ..images import service_pb2 as spb
from ..images.imageset import ImageSet, open_image_file

ARRIVED = ".arrived"
IDLE_TIMEOUT = 120.0      # seconds without a new byte before we give up on the sender
POLL = 0.001
CHUNK = 8 << 20


@dataclass
class Arriving:
    path: Path
    names: tuple[str, ...]          # in the order they arrive
    errors: dict[str, str] = field(default_factory=dict)
    go: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        inv = ImageSet(self.path).inventory()
        self.expect = []
        for name in self.names:
            d = inv.digests.get(name)
            if d is None:
                raise ImageError(f"{self.path}: {name} is not in the image's inventory")
            self.expect.append((name, d.size, d.xxh3_128))
        # made now: once the restore has unshared its PID namespace, no thread can be made
        self.thread = threading.Thread(target=self._hash_all, daemon=True)
        self.thread.start()

    def start(self) -> None:
        """Let the hashing begin: at the restore's first wait, once it made its processes.
        Its stubs are made with a raw clone3 of this process, which copies no other thread
        and runs no fork handlers: a thread busy in malloc meanwhile would leave the child
        stuck on that lock before it can exec (seen with a thread per file of an 8-process
        tree). Until then the thread sleeps on an event, holding nothing."""
        self.go.set()

    def _hash_all(self) -> None:
        self.go.wait()
        for name, size, want in self.expect:
            self._hash(name, size, want)

    def wait(self, path: Path, end: int) -> None:
        """Return once `path` holds at least `end` bytes."""
        self.start()
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

    def wait_exists(self, path: Path) -> None:
        """Return once the receiver has created `path` (it appears already the sender's)."""
        self.start()
        since = time.monotonic()
        while not path.exists():
            if (self.path / ARRIVED).exists() or not self.path.is_dir():
                raise ImageError(f"image file {path} never arrived")
            if time.monotonic() - since > IDLE_TIMEOUT:
                raise ImageError(f"image file {path} did not arrive within {IDLE_TIMEOUT:g} s")
            time.sleep(POLL)

    def _hash(self, name: str, size: int, want: str) -> None:
        path = self.path / name
        h = xxhash.xxh3_128()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        done = 0
        try:
            self.wait_exists(path)
            with os.fdopen(open_image_file(path, None), "rb", buffering=0) as f:
                while done < size:
                    self.wait(path, min(size, done + CHUNK))
                    n = f.readinto(view[:min(CHUNK, size - done)])
                    h.update(view[:n])
                    done += n
            self.wait_complete()
            if not want:
                want = self._trailer_digest(name)
            if os.stat(path).st_size != size:
                raise ImageError(f"image file {path} has {os.stat(path).st_size} bytes, the inventory says {size}")
            if h.hexdigest() != want:
                raise ImageError(f"image file {path} is corrupt (xxh3-128 digest differs from the inventory)")
        except (ImageError, OSError) as e:
            self.errors[name] = str(e)

    def _trailer_digest(self, name: str) -> str:
        """A streamed page file's digest, from the trailer the receiver kept in ARRIVED."""
        t = spb.MigrateTrailer()
        try:
            t.ParseFromString((self.path / ARRIVED).read_bytes())
        except Exception as e:     # DecodeError, OSError: no digest, no restore
            raise ImageError(f"{self.path}: the page digests after the stream are unreadable: {e}") from None
        for d in t.pages:
            if d.name == name and d.xxh3_128:
                return d.xxh3_128
        raise ImageError(f"image file {self.path / name} has no digest, in the inventory or after the stream")

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
        self.start()
        self.thread.join()
        if self.errors:
            raise ImageError("; ".join(self.errors[n] for n in sorted(self.errors)))
