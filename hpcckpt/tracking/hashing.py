"""Content hashing: the backend that works on every kernel.

Each page the dump would save gets an xxh3-64 digest; a collect computes them again and
reports the pages whose digest changed. It reads all of the process's saved memory every
time (so it costs like a full dump's read) but lets the dump write only what changed.
A page the dump would not save (absent, or an unmodified page of a private file mapping)
has the digest 0, so a page appearing or disappearing counts as a change too.

Digests can be saved next to an image and loaded by a later, fresh hpcckpt process,
which is what makes this backend usable by one-shot `hpcckpt dump --parent`.
"""
import json
import os

import numpy as np
import xxhash

from ..kernel import proc
from ..kernel.libc import PAGE_SIZE
from .base import Dirty, Tracker, TrackingLostError
from .reader import CHUNK, Reader, pagemap, saved_mask
from .regions import NO_PAGES, Region, regions

NOT_SAVED = np.uint64(0)


def _saved_mask(pid: int, r: Region) -> np.ndarray:
    """Which pages of the mapping the dump saves (engine.memory.pages_to_save's rule)."""
    pm = pagemap(pid, r.start, r.end)
    return saved_mask(pm, r.inode > 0 or (r.inode == -1 and r.path.startswith("/")))


def region_digests(pid: int, r: Region, reader: Reader) -> np.ndarray:
    """xxh3-64 of every saved page of the mapping, 0 for the others."""
    out = np.zeros(r.npages, dtype=np.uint64)
    h = xxhash.xxh3_64_intdigest
    for first, n in proc.runs(_saved_mask(pid, r)):
        done = 0
        while done < n:
            k = min(n - done, CHUNK // PAGE_SIZE)
            view = reader.read(r.start + (first + done) * PAGE_SIZE, k * PAGE_SIZE)
            d = np.fromiter((h(view[i:i + PAGE_SIZE]) for i in range(0, k * PAGE_SIZE, PAGE_SIZE)),
                            dtype=np.uint64, count=k)
            d[d == NOT_SAVED] = 1  # a real digest of 0 must not read as "not saved"
            out[first + done:first + done + k] = d
            done += k
    return out


class HashingTracker(Tracker):
    """Reports pages whose content digest differs from the previous arm/collect."""

    name = "hashing"

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[int, np.ndarray] = {}

    def arm(self, pid: int, target, vmas) -> None:
        self._start(pid)
        regs = regions(vmas)
        self.digests = self._digest_all(pid, [r for r in regs if r.trackable])
        self._remember(regs)

    def collect(self, pid: int, vmas, source: int | None = None) -> Dirty:
        """Pages whose digest changed, compared address by address: content decides, so
        a mapping that grew, shrank, was split or merged is still exact; pages at
        addresses that had no digest before (new or moved mappings) are all reported.
        `source`: read the memory of this process instead (a copy-on-write fork of `pid`
        made while it was frozen: its memory is that instant's, and `pid` runs on)."""
        if source is None:
            self._check_same(pid)
        regs = regions(vmas)
        out: Dirty = {}
        for r in regs:
            if r.special:
                out[r.start] = NO_PAGES
            elif not r.trackable:
                out[r.start] = r.all_pages()
        new = self._digest_all(source or pid, [r for r in regs if r.trackable])
        old_addrs, old_digests = None, None
        for r in regs:
            if not r.trackable:
                continue
            old = self.digests.get(r.start)
            if old is not None and self.layout.get(r.start) == r.key and len(old) == r.npages:
                out[r.start] = np.flatnonzero(new[r.start] != old).astype(np.int64)
                continue
            if old_addrs is None:
                old_addrs, old_digests = self._by_address()
            addrs = r.start + np.arange(r.npages, dtype=np.int64) * PAGE_SIZE
            i = np.minimum(np.searchsorted(old_addrs, addrs), max(len(old_addrs) - 1, 0))
            found = (old_addrs[i] == addrs) if len(old_addrs) else np.zeros(r.npages, bool)
            same = found & (old_digests[i] == new[r.start]) if len(old_addrs) else found
            out[r.start] = np.flatnonzero(~same).astype(np.int64)
        self.digests = new
        self._remember(regs)
        return out

    def _by_address(self) -> tuple[np.ndarray, np.ndarray]:
        """Every page address that had a digest, sorted, and its digest."""
        starts = sorted(self.digests)
        if not starts:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        addrs = np.concatenate([s + np.arange(len(self.digests[s]), dtype=np.int64) * PAGE_SIZE
                                for s in starts])
        return addrs, np.concatenate([self.digests[s] for s in starts])

    def disarm(self) -> None:
        super().disarm()
        self.digests = {}

    def _digest_all(self, pid: int, regs: list[Region]) -> dict[int, np.ndarray]:
        reader = Reader(pid)
        try:
            return {r.start: region_digests(pid, r, reader) for r in regs}
        finally:
            reader.close()

    # -- persistence: a later hpcckpt process compares against these ---------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write layout and digests (numpy .npz) so a fresh process can `load` them."""
        starts = sorted(self.digests)
        keys = [list(self.layout[s]) for s in sorted(self.layout)]
        arrays = [self.digests[s] for s in starts]
        with open(path, "wb") as f:
            np.savez(f, keys=np.array(json.dumps(keys)),
                     starts=np.array(starts, dtype=np.uint64),
                     counts=np.array([len(a) for a in arrays], dtype=np.int64),
                     digests=np.concatenate(arrays) if arrays else np.zeros(0, np.uint64))

    @classmethod
    def load(cls, path: str | os.PathLike, pid: int) -> "HashingTracker":
        """A tracker whose next collect on `pid` compares with the saved digests.

        Content comparison is valid whatever happened to the process in between (it may
        be the restored copy of the one the digests were taken from)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = json.loads(str(z["keys"]))
                starts, counts, digests = z["starts"], z["counts"], z["digests"]
        except (OSError, ValueError, KeyError) as e:
            raise TrackingLostError(f"digest file {path} is missing or damaged ({e}); "
                                    "take a full dump") from None
        t = cls()
        t._start(pid)
        t.layout = {int(k[0]): (int(k[0]), int(k[1]), int(k[2]), bool(k[3]), k[4], int(k[5]), int(k[6]))
                    for k in keys}
        ends = np.cumsum(counts)
        t.digests = {int(s): digests[e - c:e] for s, c, e in zip(starts, counts, ends)}
        return t
