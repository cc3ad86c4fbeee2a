"""Incremental dumps: which pages of each process changed since the parent image.

Two ways to know, tried in this order for every process of the tree:
1. A live tracker (uffd-wp, soft-dirty; one per process) kept by a long-lived caller
   (`hpcckpt run`, or an engine user) in a `TreeTracker`. Its state is relative to the
   image at whose dump it was last armed or collected (`base_id`); it is used only when
   that image is the parent named now.
2. Content hashing against the parent image: the digests saved beside the parent
   (`digests-PID.npz`), or computed from the parent chain's page files. It reads all of
   the process's memory while frozen, but is exact whatever happened in between (also
   for a fresh `hpcckpt dump` process, or the restored copy of a process).
When neither works (no parent pages for this process, a damaged digest file and
chain ...), the process is dumped whole; nothing is ever taken from a parent on a guess.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from ..errors import HpcckptError, ProcessGoneError
from ..images import pb
from ..images.chain import Link, load_chain, sources
from ..kernel.libc import PAGE_SIZE
from ..tracking.incremental import PageRanges
from ..tracking import holder
from ..tracking.base import Dirty, Tracker, start_time
from ..tracking.hashing import NOT_SAVED, HashingTracker
from ..tracking.regions import region
from ..tracking.uffd_wp import UffdWpTracker

DIGESTS = "digests-{pid}.npz"


@dataclass
class TreeTracker:
    """Live trackers of a process tree, one per process (by host PID), for a caller that
    outlives checkpoints. `base_id` is the image their state is relative to."""
    backend: str | None = None            # preferred backend; None: the best that works
    trackers: dict[int, Tracker] = field(default_factory=dict)
    base_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def valid_for(self, image_id: str | None) -> bool:
        return bool(image_id) and self.base_id == image_id

    def new(self, pid: int) -> Tracker:
        from ..tracking.select import choose
        t = self.trackers.get(pid)
        if t is None:
            t = self.trackers[pid] = choose(self.backend)
        return t

    def forget(self, pid: int) -> None:
        t = self.trackers.pop(pid, None)
        if t is not None:
            t.disarm()

    def invalidate(self) -> None:
        """The trackers' state no longer matches any image (a dump failed after collect)."""
        self.base_id = None

    def close(self) -> None:
        for pid in list(self.trackers):
            self.forget(pid)
        self.base_id = None

    @property
    def name(self) -> str:
        names = sorted({t.name for t in self.trackers.values()})
        return ",".join(names) or "none"


@dataclass
class Parent:
    """The parent chain of an incremental dump, as the dump needs it."""
    chain: list[Link]
    held: "_Held | None" = None     # uffd-wp trackers taken over from the image's holder
    _pages: dict = field(default_factory=dict)   # ns PID -> PageRanges | None, read once

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Parent":
        # digests are checked by restores; a dump only needs the chain's pagemaps
        return cls(load_chain(path, verify=False))

    @property
    def path(self) -> Path:
        return self.chain[0].path

    @property
    def inv(self) -> pb.Inventory:
        return self.chain[0].inv

    def pages(self, ns_pid: int) -> "PageRanges | None":
        """The page ranges the chain holds for the process, None if it has none. Read
        once (`preload` reads them all before the tree is frozen)."""
        if ns_pid not in self._pages:
            self._pages[ns_pid] = self._read_pages(ns_pid)
        return self._pages[ns_pid]

    def preload(self) -> None:
        """Every process's page ranges, read now: parsing a pagemap of ~100k runs is
        tens of ms the frozen window need not pay."""
        for ns_pid in self.inv.pids:
            self.pages(ns_pid)

    def _read_pages(self, ns_pid: int) -> "PageRanges | None":
        if ns_pid not in self.inv.pids:
            return None
        try:
            pm = self.chain[0].iset.pagemap(ns_pid)
        except HpcckptError:
            return None
        return PageRanges.from_runs(pm.runs)

    def process(self, ns_pid: int) -> pb.Process | None:
        try:
            p = self.chain[0].iset.process(ns_pid)
        except HpcckptError:
            return None
        return None if p.zombie else p

    def held_tracker(self, host_pid: int, ns_pid: int, notes: list[str]) -> UffdWpTracker | None:
        """The uffd-wp tracker a previous hpcckpt process left armed on this process when
        it wrote this image (tracking/holder.py), taken over; None if there is none."""
        if self.held is None:
            self.held = _Held.take(self.path, self.inv.image_id, notes)
        entry = self.held.fds.pop(ns_pid, None)
        if entry is None:
            return None
        p, fd = entry
        if fd < 0:
            notes.append(f"process {ns_pid}: tracking kept since {self.path} was of another "
                         f"process {p.host_pid} (exited, or restarted since); comparing page digests")
            return None
        if p.host_pid != host_pid:
            os.close(fd)
            notes.append(f"process {ns_pid}: tracking kept since {self.path} was of PID {p.host_pid}, "
                         f"not {host_pid}; comparing page digests")
            return None
        try:
            return UffdWpTracker.adopt(host_pid, fd, {int(k[0]): tuple(k) for k in p.layout})
        except ProcessGoneError:
            raise
        except HpcckptError as e:
            notes.append(f"process {ns_pid}: uffd-wp tracking kept since {self.path} is not usable "
                         f"({e}); comparing page digests")
            return None

    def take_held(self, notes: list[str]) -> dict[int, UffdWpTracker]:
        """Every uffd-wp tracker a holder keeps since this image, taken over at once (by
        host PID; before a freeze, for pre-copy rounds); those not usable are left out
        (the dump then compares digests for their process, with a note)."""
        if self.held is None:
            self.held = _Held.take(self.path, self.inv.image_id, notes)
        got = {}
        for ns_pid, (p, fd) in list(self.held.fds.items()):
            if fd < 0:
                continue
            del self.held.fds[ns_pid]
            try:
                got[p.host_pid] = UffdWpTracker.adopt(p.host_pid, fd, {int(k[0]): tuple(k) for k in p.layout})
            except HpcckptError:
                continue             # fd closed by adopt
        return got

    def hashing_tracker(self, host_pid: int, ns_pid: int) -> HashingTracker:
        """A hashing tracker whose next collect on `host_pid` compares with this image."""
        f = self.path / DIGESTS.format(pid=ns_pid)
        if f.exists():
            try:
                return HashingTracker.load(f, host_pid)
            except HpcckptError:
                pass  # damaged: compute them from the pages instead
        p = self.process(ns_pid)
        if p is None:
            raise HpcckptError(f"parent image {self.path} has no process {ns_pid}")
        t = HashingTracker()
        t._start(host_pid)
        t.digests = image_digests(self.chain, p)
        t._remember([region(v) for v in p.mm.vmas])
        return t


@dataclass
class _Held:
    """Userfaultfds taken from a holder, by namespace PID, until the dump adopts them."""
    fds: dict[int, tuple["holder.HeldProcess", int]] = field(default_factory=dict)

    @classmethod
    def take(cls, images: Path, image_id: str, notes: list[str]) -> "_Held":
        try:
            rec = holder.HolderRecord.read(images)
            return cls(holder.take_over(rec, image_id) if rec is not None else {})
        except (OSError, ValueError) as e:
            notes.append(f"uffd-wp tracking kept since {images} is lost ({e}); comparing page digests")
            return cls()

    def __del__(self):
        for _, fd in self.fds.values():
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = {}


def collect_held(par: Parent, h: int, ns_pid: int, vmas, tracker: "TreeTracker | None",
                 notes: list[str]) -> Dirty | None:
    """Changes since `par` from the uffd-wp tracking a previous hpcckpt process left armed
    (pre-dump, dump --track-mem -R); None if there is none or it fails (then the caller
    compares digests). The tracker joins `tracker` (it is re-armed by the collect) or is
    released."""
    t = par.held_tracker(h, ns_pid, notes)
    if t is None:
        return None
    try:
        dirty = t.collect(h, vmas)
    except ProcessGoneError:
        t.disarm()
        raise
    except HpcckptError as e:
        t.disarm()
        notes.append(f"process {ns_pid}: uffd-wp tracking kept since {par.path} failed ({e}); "
                     "comparing page digests")
        return None
    notes.extend(t.take_notes())
    if tracker is not None:
        tracker.forget(h)
        tracker.trackers[h] = t
    else:
        t.disarm()
    return dirty


def hand_off(tracker: TreeTracker, images: Path, image_id: str, ns: dict[int, int]) -> list[str]:
    """Leave the uffd-wp tracking of `tracker` armed after this hpcckpt process exits: a
    holder process keeps the userfaultfds, `tracking-holder.json` beside the image says
    where, so the next `dump --parent IMAGE` writes (and freezes for) only the changes."""
    entries = []
    for h, t in tracker.trackers.items():
        if isinstance(t, UffdWpTracker) and t.fd >= 0 and t.pid == h and h in ns:
            entries.append((ns[h], h, t.start_time or start_time(h), t.fd,
                            [list(k) for k in t.layout.values()]))
    if not entries:
        return []
    try:
        holder.spawn(image_id, entries).write(images)
    except (OSError, ValueError) as e:
        return [f"uffd-wp tracking not kept after this dump ({e}); the next dump --parent "
                "compares page digests"]
    return []


def image_digests(chain: list[Link], p: pb.Process) -> dict[int, np.ndarray]:
    """The hashing backend's digests of every private mapping of an image's process, from
    the image's pages (its own or its parents'): what memory looked like at the dump."""
    vmas = [v for v in p.mm.vmas if region(v).trackable]
    out = {v.start: np.zeros((v.end - v.start) // PAGE_SIZE, dtype=np.uint64) for v in vmas}
    starts = np.array(sorted(out), dtype=np.int64)
    h = xxhash.xxh3_64_intdigest
    for src in sources(chain, p.pid):
        with open(src.pages_file, "rb", buffering=0) as f:
            for r in src.runs:
                data = os.pread(f.fileno(), r.nr_pages * PAGE_SIZE, r.offset)
                for k in range(r.nr_pages):
                    addr = r.vaddr + k * PAGE_SIZE
                    i = int(np.searchsorted(starts, addr, side="right")) - 1
                    if i < 0:
                        continue
                    s = int(starts[i])
                    arr = out[s]
                    j = (addr - s) // PAGE_SIZE
                    if j >= len(arr):
                        continue
                    d = h(data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
                    arr[j] = d if d != NOT_SAVED else 1
    return out


def save_digests(images: Path, chain: list[Link], p: pb.Process) -> None:
    """digests-PID.npz beside the image: lets a later, fresh hpcckpt process dump the
    process incrementally against this image without reading its pages again."""
    t = HashingTracker()
    t.digests = image_digests(chain, p)
    t._remember([region(v) for v in p.mm.vmas])
    tmp = images / (DIGESTS.format(pid=p.pid) + ".tmp")
    t.save(tmp)
    os.replace(tmp, images / DIGESTS.format(pid=p.pid))
    t.digests = {}

