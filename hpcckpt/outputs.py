"""Keep the job's output file in each checkpoint, so a resume can refill it.

A restore rolls every file the job writes back to its size at the checkpoint, which makes
each line appear once: that needs the file to still hold those bytes. Slurm's default
`--open-mode=truncate` empties the batch job's output file when a requeued run starts
(and a node-local output file is gone with its node), so the rollback would have nothing
to roll back to ("... is shorter than at the checkpoint").

So `hpcckpt run` copies the part of its own stdout/stderr file(s) that the checkpoint
covers (the sizes the image recorded) into the checkpoint as OUTPUT-n.bin with
OUTPUTS.json, and before a resume writes it back into a file that came up shorter. Only
the job's stdout/stderr are kept (the files Slurm truncates), and only up to LIMIT bytes
each: a bigger output file is reported once, with the remedy (--open-mode=append).
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .images.imageset import ImageSet
from .images import hpcckpt_pb2 as pb

INDEX = "OUTPUTS.json"
LIMIT = 64 * 2**20


@dataclass(frozen=True)
class Kept:
    path: str
    size: int
    file: str


def own_outputs() -> set[tuple[int, int]]:
    """(device, inode) of our stdout and stderr when they are regular files."""
    out = set()
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.add((st.st_dev, st.st_ino))
    return out


def _written_regular_fds(images: Path) -> list[pb.Fd]:
    s = ImageSet(images)
    inv = s.inventory()
    fds = []
    for pid in inv.pids or [inv.root_pid]:
        for e in s.process(pid).fds:
            if e.kind == pb.REGULAR and e.flags & os.O_ACCMODE != os.O_RDONLY and e.policy == pb.ROLLBACK:
                fds.append(e)
    return fds


def keep(images: Path, targets: set[tuple[int, int]]) -> list[str]:
    """Copy the checkpointed part of the target files into `images`; return warnings."""
    kept: dict[str, Kept] = {}
    warnings = []
    for e in _written_regular_fds(images):
        if e.path in kept:
            continue
        try:
            st = os.stat(e.path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in targets:
            continue
        if e.size > LIMIT:
            warnings.append(f"output file {e.path} is {e.size} bytes, more than the {LIMIT} kept in a "
                            "checkpoint: submit with --open-mode=append so a requeue keeps it")
            continue
        name = f"OUTPUT-{len(kept)}.bin"
        with open(e.path, "rb") as src:
            data = src.read(e.size)
        if len(data) < e.size:  # already shorter than the image says: nothing to keep
            continue
        (images / name).write_bytes(data)
        kept[e.path] = Kept(e.path, e.size, name)
    if kept:
        (images / INDEX).write_text(json.dumps([k.__dict__ for k in kept.values()]))
    return warnings


def refill(images: Path) -> list[str]:
    """Before a restore: give every kept output file that came up shorter its content back.
    Returns what was done, to be said after the restore."""
    try:
        entries = [Kept(**k) for k in json.loads((Path(images) / INDEX).read_text())]
    except FileNotFoundError:
        return []
    notes = []
    for k in entries:
        try:
            cur = os.stat(k.path).st_size
        except FileNotFoundError:
            cur = -1
        if cur >= k.size:
            continue
        data = (Path(images) / k.file).read_bytes()
        fd = os.open(k.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        notes.append(f"output file {k.path} was {'missing' if cur < 0 else f'{cur} bytes'} (truncated by a "
                     f"requeue?); refilled its {k.size} bytes from the checkpoint")
    return notes
