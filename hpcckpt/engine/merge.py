"""Merging an image chain into one standalone image (the store's compaction).

The newest image's messages are copied; each process gets one pages file holding every
page it lists, read from whichever image of the chain wrote it, in address order. The
merged image keeps the newest image's id: its content is the same, so images that name
it as their parent stay valid when a store swaps the merged copy in.
"""
import os
import shutil
from pathlib import Path

from ..errors import ImageError
from ..images import pb
from ..images.chain import load_chain, sources
from ..images.imageset import INVENTORY, ImageSet

CHUNK = 8 << 20


def merge(images: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the standalone equivalent of the image at `images` (and its parents) to `dest`."""
    chain = load_chain(images, verify=True)
    src = chain[0]
    if src.inv.pre_dump:
        raise ImageError(f"{src.path} is a pre-dump; merge the final dump that names it as parent")
    out = ImageSet(dest, create=True)
    inv = pb.Inventory()
    inv.CopyFrom(src.inv)
    inv.parent, inv.parent_id, inv.chain_depth, inv.tracking = "", "", 0, ""
    inv.ClearField("digests")
    for name in src.inv.digests:
        if not name.startswith(("pages-", "pagemap-")):
            shutil.copyfile(src.path / name, out.path / name)
    for pid in src.inv.pids:
        pm = src.iset.pagemap(pid)
        merged = pb.Pagemap(pages_file=pm.pages_file)
        p = src.iset.process(pid)
        bounds = sorted({v.start for v in p.mm.vmas} | {v.end for v in p.mm.vmas})
        todo = sorted(((piece, s.pages_file) for s in sources(chain, pid, pm) for r in s.runs
                       for piece in _split(r, bounds)), key=lambda x: x[0].vaddr)
        with open(out.path / pm.pages_file, "wb") as w:
            files: dict[Path, int] = {}
            try:
                off = 0
                for r, path in todo:
                    if path not in files:
                        files[path] = os.open(path, os.O_RDONLY)
                    n = r.nr_pages * 4096
                    done = 0
                    while done < n:
                        data = os.pread(files[path], min(CHUNK, n - done), r.offset + done)
                        if not data:
                            raise ImageError(f"{path} ends early (run at {r.vaddr:#x})")
                        w.write(data)
                        done += len(data)
                    merged.runs.append(pb.PageRun(vaddr=r.vaddr, nr_pages=r.nr_pages, offset=off))
                    off += n
                merged.pages_bytes = off
                w.flush()
                os.fsync(w.fileno())
            finally:
                for fd in files.values():
                    os.close(fd)
        out.write_message(f"pagemap-{pid}.img", "pagemap", merged)
    out.seal(inv)
    return out.path


def _split(r: pb.PageRun, bounds: list[int]) -> list[pb.PageRun]:
    """A run cut at mapping boundaries (the chain joins runs that are contiguous in both
    memory and file, which may span two adjacent mappings; an image keeps them apart)."""
    end = r.vaddr + r.nr_pages * 4096
    cuts = [r.vaddr] + [b for b in bounds if r.vaddr < b < end] + [end]
    return [pb.PageRun(vaddr=a, nr_pages=(b - a) // 4096, offset=r.offset + (a - r.vaddr))
            for a, b in zip(cuts, cuts[1:])]


def merge_fn(chain, dest: Path) -> None:
    """`Store.compact`'s merge function: `chain` is the store's checkpoints, oldest first;
    the images name their parents themselves, so the newest one says it all."""
    if (Path(dest) / INVENTORY).exists():
        raise ImageError(f"{dest} already holds an image")
    merge(chain[-1].path, dest)
