"""Writer: one image set on its way from staging to published.

publish() order, and why each step is where it is:
 1. hash + fsync every file the engine wrote (one read pass per file) - durable content;
 2. take the job lock; check the fence (generation) and the parent - decisions that must
    not race with a newer generation's begin() or with retention;
 3. assign the sequence number, write MANIFEST.json (fsynced) - the last file written;
 4. rename the staging dir to ROOT/JOB/<seq> and fsync ROOT/JOB - the commit point;
 5. update STATE.json, release the lock, journal the catalog event - derived data.
A kill before 4 leaves only a staging dir (never chosen, cleaned later); after 4 the
checkpoint exists whatever happens to steps 5.
"""
from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checksum import hash_file
from .codec import SUFFIXES
from .frames import encode_file
from .errors import ParentMissingError, ReservedFileNameError, StaleGenerationError, StoreError, WriterStateError
from .layout import ARRAYS_FILE, OWNER_FILE, RESERVED_NAMES, atomic_write_bytes, fsync_dir, hostname, seq_name
from .manifest import FileEntry, Manifest, write_manifest
from .model import Checkpoint
from .staging import remove_tree

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

#: a compressed file bigger than this fraction of the plain one is not worth decompressing
KEEP_PLAIN_ABOVE = 0.97


def wants_compression(rel: str, size: int) -> bool:
    """Page files only (when not empty). Every other engine file stays plain even when big
    (e.g. page digests saved for incremental dumps), because the engine reads those straight
    from a parent checkpoint's directory in the store when it dumps the next increment."""
    base = rel.rsplit("/", 1)[-1]
    return size > 0 and base.startswith("pages-") and base.endswith(".img")


class Writer:
    """Returned by Store.begin(); the engine writes its files into `path`."""

    def __init__(self, store: "Store", job: str, generation: int, parent: int | None, path: Path, created: float) -> None:
        self.store = store
        self.job = job
        self.generation = generation
        self.parent = parent
        self.path = path
        self.created = created
        #: False only for compaction, which rewrites an existing checkpoint and is not a job run
        self.fenced = True
        self._done = False

    @property
    def parent_path(self) -> Path | None:
        """The parent's published directory (what an incremental dump reads), or None."""
        return None if self.parent is None else self.store.job_dir(self.job) / seq_name(self.parent)

    @property
    def parent_ref(self) -> str | None:
        """How an incremental image must name its parent: '../<seq>', a sibling directory.

        That holds where the image ends up (ROOT/JOB/<seq>/) and where materialize() puts
        it (DEST/<seq>/); a path relative to the staging dir (ROOT/JOB/.staging/T/) does not.
        """
        return None if self.parent is None else f"../{seq_name(self.parent)}"

    def publish(self, meta: dict[str, Any] | None = None, *, compacted_from: list[int] | None = None,
                _seq: int | None = None) -> Checkpoint:
        """Checksum, fsync and atomically publish the staging dir; return the Checkpoint.

        meta: scalars (host, nprocs, memory_bytes, pages_written, freeze_s, dump_s, write_s,
        backend, anything JSON-able) and optional numpy arrays (e.g. dirty pages per mapping),
        which are stored in ARRAYS.npz inside the checkpoint and in the catalog.
        """
        self._check_open()
        t0 = time.perf_counter()
        meta = dict(meta or {})
        arrays = {k: np.asarray(v) for k, v in meta.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in meta.items() if k not in arrays}
        try:
            files = self._hash_files(arrays)
        except BaseException:
            self.abort()
            raise
        job_dir = self.store.job_dir(self.job)
        try:
            with self.store.job_lock(self.job):
                state = self.store.state(self.job)
                if self.fenced and state.generation > self.generation:
                    raise self.store.stale_error(self.job, self.generation, state, "publish")
                if self.parent is not None:
                    self.store.require_parent(self.job, self.parent, self.generation)
                if _seq is None:
                    seq = state.last_seq + 1
                    while (job_dir / seq_name(seq)).exists():
                        seq += 1
                    target = job_dir / seq_name(seq)
                else:   # compaction: replaces an existing seq (the store swaps it in)
                    seq, target = _seq, None
                now = time.time()
                scalars.setdefault("host", hostname())
                if any(f.codec for f in files):
                    scalars["compression"] = self.store.compression.label
                    scalars["raw_bytes"] = sum(f.plain_size for f in files)
                scalars["publish_s"] = round(time.perf_counter() - t0, 6)
                manifest = Manifest(
                    job=self.job, generation=self.generation, seq=seq, parent=self.parent,
                    created=self.created, published=now, host=str(scalars["host"]), pid=os.getpid(),
                    files=files, meta=scalars, arrays=sorted(arrays), compacted_from=list(compacted_from or []),
                )
                try:
                    os.unlink(self.path / OWNER_FILE)
                except FileNotFoundError:
                    pass
                write_manifest(self.path, manifest)
                fsync_dir(self.path)
                if target is None:
                    self.store.swap_in(self.job, seq, self.path)
                else:
                    os.rename(self.path, target)
                    fsync_dir(job_dir)
                self._done = True
                ckpt = self.store.checkpoint_from_manifest(manifest)
                # journal before STATE.json: if killed in between, begin() sees the lag and re-journals
                self.store.journal_publish(ckpt, arrays, fold=False)
                state.last_seq = max(state.last_seq, seq)
                if self.fenced and self.generation > state.generation:
                    state.generation, state.generation_host, state.generation_time = self.generation, manifest.host, now
                state.save(job_dir)
        except StaleGenerationError:
            self.abort()
            raise
        except ParentMissingError:
            self.abort()
            raise
        self.store.maybe_fold()
        return ckpt

    def abort(self) -> None:
        """Throw the staging dir away; nothing becomes visible. Safe to call twice."""
        if self._done:
            return
        self._done = True
        remove_tree(self.store.job_dir(self.job), self.path)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, t: Any, v: Any, tb: Any) -> None:
        if t is not None:
            self.abort()

    def _check_open(self) -> None:
        if self._done:
            raise WriterStateError(f"writer for job {self.job!r} (staging {self.path}) was already published or aborted: "
                                   "call store.begin() again for a new checkpoint")
        if not self.path.is_dir():
            raise WriterStateError(f"staging dir {self.path} of job {self.job!r} vanished (removed as stale by another "
                                   "process?): the checkpoint was not published; begin() a new one")

    def _maybe_compress(self, full: Path, rel: str) -> FileEntry | None:
        """Compress one engine file if the store compresses and it is worth it; else None.

        The plain file is replaced by `rel + suffix`. A file that does not shrink by at
        least 3 % (already compressed or random data) stays plain, so materialize only
        copies it; the plain digest computed while compressing is reused for it.
        """
        comp = self.store.compression
        if not comp.enabled or not wants_compression(rel, full.stat().st_size):
            return None
        assert comp.codec is not None
        stored_rel = rel + SUFFIXES[comp.codec]
        dst = full.with_name(full.name + SUFFIXES[comp.codec])
        if dst.exists():
            raise ReservedFileNameError(f"job {self.job!r}: the engine wrote both {rel} and {stored_rel} into "
                                        f"{self.path}; in a compressed store the second name is reserved for the first")
        enc = encode_file(full, dst, comp.codec, comp.level, comp.frame, self.store.threads)
        if enc.size > enc.raw_size * KEEP_PLAIN_ABOVE:
            os.unlink(dst)
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return FileEntry(rel, enc.raw_size, enc.raw_digest)
        os.unlink(full)
        return FileEntry(stored_rel, enc.size, enc.digest, comp.codec, rel, enc.raw_size, enc.raw_digest,
                         comp.frame, enc.frames)

    def _hash_files(self, arrays: dict[str, np.ndarray]) -> list[FileEntry]:
        entries: list[FileEntry] = []
        dirs: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            dirs.append(dirpath)
            rel_dir = os.path.relpath(dirpath, self.path)
            for fn in sorted(filenames):
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
                if rel == OWNER_FILE or fn.startswith(f".{OWNER_FILE}."):
                    continue
                if rel in RESERVED_NAMES:
                    raise ReservedFileNameError(
                        f"job {self.job!r}: the engine wrote {rel} into {self.path}, a name the store reserves; "
                        f"rename that file (reserved: {', '.join(sorted(RESERVED_NAMES))})")
                full = os.path.join(dirpath, fn)
                if os.path.islink(full):
                    raise StoreError(f"job {self.job!r}: {full} is a symlink; image sets must hold regular files only")
                entry = self._maybe_compress(Path(full), rel)
                if entry is None:
                    size, digest = hash_file(Path(full), fsync=True)
                    entry = FileEntry(rel, size, digest)
                entries.append(entry)
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write_bytes(self.path / ARRAYS_FILE, buf.getvalue())
            size, digest = hash_file(self.path / ARRAYS_FILE)
            entries.append(FileEntry(ARRAYS_FILE, size, digest))
        for d in dirs[1:]:
            fsync_dir(Path(d))
        return sorted(entries, key=lambda e: e.name)
