"""Image chains: an incremental image, its parent, the parent's parent ...

An incremental image lists every page the restore must give back, each either written
in its own pages file or marked `in_parent`. A restore takes a page from the newest image
that wrote it: `sources()` walks the chain once per process and returns, per image, the
runs to read from that image's pages file. A page that an image marks in_parent but no
ancestor holds is a broken chain, reported with the image that lacks it.

Parents are named by a path relative to the child (and, failing that, as a sibling of the
same name: a store writes an image in a staging directory and publishes it next to its
parent) and by their random `image_id`, so a parent replaced by another image is refused.
"""
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageError
from . import pb
from .imageset import INVENTORY, ImageSet

PAGE = 4096
MAX_DEPTH = 1000


def new_image_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Link:
    """One image of a chain, newest first in a list."""
    iset: ImageSet
    inv: pb.Inventory

    @property
    def path(self) -> Path:
        return self.iset.path


def parent_path(path: Path, inv: pb.Inventory) -> Path:
    """Where the parent of the image at `path` is; ImageError naming it if nowhere."""
    rel = Path(inv.parent)
    for cand in (Path(os.path.normpath(path / rel)), path.parent / rel.name):
        if (cand / INVENTORY).exists():
            return cand
    raise ImageError(f"{path}: its parent image {inv.parent} ({(path / rel).resolve()}) is missing; "
                     "restore from the parent chain's newest complete image, or take a full dump")


def relative_parent(images: Path, parent: Path) -> str:
    return os.path.relpath(Path(parent).resolve(), Path(images).resolve())


def load_chain(images: str | os.PathLike, verify: bool = True, first: pb.Inventory | None = None) -> list[Link]:
    """The image at `images` and all its ancestors, newest first; each inventory read (and,
    with `verify`, every file's digest checked); the parent ids must match."""
    iset = ImageSet(images)
    inv = first or iset.inventory()
    if verify and first is None:
        iset.verify(inv)
    chain = [Link(iset, inv)]
    seen = {str(iset.path.resolve())}
    while chain[-1].inv.parent:
        child = chain[-1]
        if len(chain) > MAX_DEPTH:
            raise ImageError(f"{iset.path}: parent chain longer than {MAX_DEPTH} images")
        ppath = parent_path(child.path, child.inv)
        key = str(ppath.resolve())
        if key in seen:
            raise ImageError(f"{child.path}: its parent chain loops back to {ppath}")
        seen.add(key)
        try:
            pset = ImageSet(ppath)
            pinv = pset.inventory()
            if verify:
                pset.verify(pinv)
        except ImageError as e:
            raise ImageError(f"parent image {ppath} of {child.path} is damaged: {e}") from None
        if pinv.image_id != child.inv.parent_id:
            raise ImageError(f"{child.path}: its parent {ppath} is another image (id {pinv.image_id or 'none'}, "
                             f"expected {child.inv.parent_id}): it was replaced; take a full dump")
        _same_owner(child.path, ppath)
        chain.append(Link(pset, pinv))
    return chain


def _same_owner(child: Path, parent: Path) -> None:
    """A parent must belong to whoever owns the child: an image may not pull in another
    user's pages."""
    a, b = (os.stat(p / INVENTORY).st_uid for p in (child, parent))
    if a != b:
        raise ImageError(f"{child} (uid {a}) names parent {parent}, which belongs to uid {b}: refused")


def pages_file_size(link: Link, pm: pb.Pagemap) -> int:
    d = link.inv.digests.get(pm.pages_file)
    return d.size if d else 0


def _pages(runs) -> tuple[np.ndarray, np.ndarray]:
    """Page addresses and file offsets of runs, sorted by address."""
    if not runs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = np.array([r.nr_pages for r in runs], dtype=np.int64)
    va = np.array([r.vaddr for r in runs], dtype=np.int64)
    off = np.array([r.offset for r in runs], dtype=np.int64)
    rep = np.repeat(np.arange(len(runs)), n)
    k = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    a, o = va[rep] + k * PAGE, off[rep] + k * PAGE
    order = np.argsort(a, kind="stable")
    return a[order], o[order]


def _runs(addrs: np.ndarray, offs: np.ndarray) -> list[pb.PageRun]:
    """Pages sorted by address back into runs contiguous in memory and in the file."""
    if len(addrs) == 0:
        return []
    brk = np.flatnonzero((np.diff(addrs) != PAGE) | (np.diff(offs) != PAGE)) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(addrs)]))
    return [pb.PageRun(vaddr=int(addrs[s]), nr_pages=int(e - s), offset=int(offs[s]))
            for s, e in zip(starts, ends)]


@dataclass
class Source:
    """Runs of one process to read from one image's pages file."""
    link: Link
    pages_file: Path
    runs: list[pb.PageRun]

    @property
    def nbytes(self) -> int:
        return sum(r.nr_pages for r in self.runs) * PAGE


def sources(chain: list[Link], pid: int, pm: pb.Pagemap | None = None) -> list[Source]:
    """Where each page of process `pid` (as the image numbers it) comes from: a list of
    sources, newest image first, together covering exactly the pages the newest image lists."""
    pm = pm or chain[0].iset.pagemap(pid)
    own = [r for r in pm.runs if not r.in_parent]
    need = _pages([r for r in pm.runs if r.in_parent])[0]
    out = [Source(chain[0], chain[0].path / pm.pages_file, own)] if own else []
    for i in range(1, len(chain)):
        if len(need) == 0:
            break
        link = chain[i]
        try:
            ppm = link.iset.pagemap(pid)
        except ImageError as e:
            raise ImageError(f"parent image {link.path} of {chain[i - 1].path} lacks process {pid}'s pages: {e}") from None
        wa, wo = _pages([r for r in ppm.runs if not r.in_parent])
        idx = np.minimum(np.searchsorted(wa, need), max(len(wa) - 1, 0))
        hit = (wa[idx] == need) if len(wa) else np.zeros(len(need), bool)
        if hit.any():
            out.append(Source(link, link.path / ppm.pages_file, _runs(need[hit], wo[idx[hit]])))
        need = need[~hit]
        if len(need):
            pa = _pages([r for r in ppm.runs if r.in_parent])[0]
            j = np.minimum(np.searchsorted(pa, need), max(len(pa) - 1, 0))
            ok = (pa[j] == need) if len(pa) else np.zeros(len(need), bool)
            if not ok.all():
                raise ImageError(f"parent image {link.path} of {chain[i - 1].path} does not hold page "
                                 f"{int(need[~ok][0]):#x} of process {pid}, which the child marks as in its "
                                 "parent: the chain is broken")
    if len(need):
        raise ImageError(f"{chain[-1].path} marks page {int(need[0]):#x} of process {pid} as in its parent, "
                         "but it has no parent: the chain is broken")
    return out


def chain_pages(chain: list[Link], pid: int) -> np.ndarray:
    """Sorted addresses of every page of `pid` the newest image lists (written or in parent)."""
    try:
        pm = chain[0].iset.pagemap(pid)
    except ImageError:
        return np.zeros(0, np.int64)
    return _pages(list(pm.runs))[0]
