"""Turning a stored checkpoint (and its parent chain) into plain files the engine can restore.

The engine restores by injecting preadv calls that read page files at 4 KiB-aligned
offsets, so it needs the exact bytes it wrote, as ordinary files. For a store without
compression the checkpoint directories already are that, and nothing is copied. For a
compressed store every checkpoint of the chain is decompressed into a fresh directory
(by default under $HPCCKPT_TMPDIR, else $TMPDIR, else /tmp, which on a compute node
should be a local disk: not tmpfs, which would hold the image in RAM beside the restored
process). The layout there mirrors the store's, DEST/<seq>/ per checkpoint, so an engine
that finds a parent image as a sibling directory named by its sequence number works the
same on both. Decompression streams (bounded memory), uses threads, and checks the digest
of both the stored and the decompressed bytes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from .checksum import CHUNK
from .errors import CorruptDataError, MaterializeError, StoreError
from .frames import _write_all, decode_file
from .layout import ARRAYS_FILE, seq_name
from .manifest import Manifest, read_manifest
from .model import Checkpoint

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

#: environment variable naming where compressed checkpoints are decompressed by default
TMPDIR_ENV = "HPCCKPT_TMPDIR"


@dataclass
class Materialized:
    """Plain image directories of a checkpoint and its chain; a context manager.

    `with store.materialize(ckpt) as path: restore(path)` - the files are removed on exit
    if the store had to write them (never for an uncompressed store, where `path` is the
    checkpoint's own directory).
    """

    path: Path                          # the checkpoint's plain directory: give this to the engine
    chain: list[Path]                   # plain directories of the chain, oldest first, ending with path
    checkpoints: list[Checkpoint]       # the chain, each with .path replaced by its plain directory
    temp: Path | None = None            # the directory cleanup() removes; None if nothing was written
    remove_temp_dir: bool = True        # False when the caller gave dest_dir: only our subdirs go

    @property
    def copied(self) -> bool:
        return self.temp is not None

    def cleanup(self) -> None:
        """Remove what materialize wrote (idempotent)."""
        if self.temp is None:
            return
        if self.remove_temp_dir:
            shutil.rmtree(self.temp, ignore_errors=True)
        else:
            for p in self.chain:
                shutil.rmtree(p, ignore_errors=True)
        self.temp = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def __fspath__(self) -> str:
        return str(self.path)


def chain_of(store: "Store", ckpt: Checkpoint) -> list[Checkpoint]:
    """ckpt and its ancestors, oldest first (ParentMissing surfaces as CheckpointNotFound)."""
    chain = [ckpt]
    while chain[0].parent is not None:
        if chain[0].parent >= chain[0].seq:
            raise StoreError(f"checkpoint {chain[0].name} names parent {chain[0].parent:08d}, which is not older: "
                             "the chain is damaged; restore another checkpoint")
        chain.insert(0, store.get(ckpt.job, chain[0].parent))
    return chain


def materialize(store: "Store", ckpt: Checkpoint, dest_dir: str | os.PathLike[str] | None = None) -> Materialized:
    """Plain files for `ckpt` and its chain; see the module docstring for where and why."""
    chain = chain_of(store, ckpt)
    manifests = [read_manifest(c.path) for c in chain]
    if not any(m.compressed for m in manifests):
        return Materialized(ckpt.path, [c.path for c in chain], chain)
    need = sum(m.raw_bytes for m in manifests)
    if dest_dir is None:
        base = Path(os.environ.get(TMPDIR_ENV) or tempfile.gettempdir())
        _check_space(base, need, ckpt)
        try:
            temp = Path(tempfile.mkdtemp(prefix=f"hpcckpt-{ckpt.job}-{ckpt.seq:08d}-", dir=base))
        except OSError as exc:
            raise MaterializeError(f"cannot create a directory in {base} to decompress checkpoint {ckpt.name} "
                                   f"({exc}): set {TMPDIR_ENV} to a writable local directory") from None
        own_dir = True
    else:
        temp = Path(dest_dir)
        own_dir = not temp.exists()
        temp.mkdir(parents=True, exist_ok=True)
        _check_space(temp, need, ckpt)
    out = Materialized(temp / seq_name(ckpt.seq), [], [], temp, own_dir)
    try:
        for c, m in zip(chain, manifests):
            d = temp / seq_name(c.seq)
            try:
                d.mkdir()
            except FileExistsError:
                raise MaterializeError(f"cannot materialize checkpoint {c.name} into {d}: it already exists; "
                                       "give an empty dest_dir") from None
            out.chain.append(d)
            out.checkpoints.append(dataclasses.replace(c, path=d))
            _write_plain(c, m, d, store.threads)
    except BaseException:
        out.cleanup()
        raise
    log.info("materialized %s (%d checkpoint(s), %.1f MiB) into %s", ckpt.name, len(chain), need / 2**20, temp)
    return out


def _check_space(base: Path, need: int, ckpt: Checkpoint) -> None:
    try:
        st = os.statvfs(base)
    except OSError as exc:
        raise MaterializeError(f"cannot use {base} to decompress checkpoint {ckpt.name} ({exc}): set {TMPDIR_ENV} "
                               "or pass dest_dir") from None
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise MaterializeError(
            f"decompressing checkpoint {ckpt.name} needs {need / 2**30:.2f} GiB in {base}, only "
            f"{free / 2**30:.2f} GiB free: set {TMPDIR_ENV} (or pass dest_dir) to a local disk with room")


def _write_plain(c: Checkpoint, m: Manifest, d: Path, threads: int) -> None:
    for f in m.files:
        if f.name == ARRAYS_FILE:       # the store's own file, not the engine's
            continue
        target = d / f.plain
        target.parent.mkdir(parents=True, exist_ok=True)
        where = f"checkpoint {c.name}: file {f.name}"
        if f.codec:
            decode_file(c.path / f.name, target, f.codec, f.frame, f.frames, f.plain_size, f.digest,
                        f.raw_digest or "", where, threads)
        else:
            _copy_checked(c.path / f.name, target, f.size, f.digest, where)


def _copy_checked(src: Path, dst: Path, size: int, digest: str, where: str) -> None:
    """Copy a plain file, hashing it on the way (the same check verify() makes)."""
    h = xxhash.xxh3_128()
    n = 0
    try:
        with open(src, "rb", buffering=0) as fi, open(dst, "xb", buffering=0) as fo:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                k = fi.readinto(buf)
                if not k:
                    break
                h.update(view[:k])
                _write_all(fo.fileno(), view[:k])
                n += k
    except FileNotFoundError:
        raise CorruptDataError(f"{where} is missing: restore an older checkpoint") from None
    if n != size or h.hexdigest() != digest:
        raise CorruptDataError(f"{where} fails its xxh3_128 checksum (or size {n} != {size}): its content changed "
                               "after publish; restore an older checkpoint")
