"""The HDF5 catalog: an index of every checkpoint, safe with many writers on shared storage.

Why it is safe (the short version; docs/store.md has the long one):

* catalog.h5 is never modified in place. Each version is written whole by one process to
  a temp file, fsynced, and renamed over the old one. A reader has either the old inode
  or the new one open, never a half-written file; a writer killed at any instant leaves
  the previous version intact (plus a stray temp file, removed on the next fold).
* Publishing a checkpoint does not touch catalog.h5. It drops one small JSON event into
  .catalog/journal/ (one file per event, one writer per file, atomic rename), so many
  jobs on many nodes never contend. Readers apply pending events in memory.
* Folding the journal into catalog.h5 happens under an flock on .catalog/lock; a writer
  that finds the lock taken simply leaves its event for the next fold. Events are
  idempotent (upsert by job+seq, set status), so a fold killed after the rename but
  before removing the folded events replays them harmlessly.
* HDF5's own file locking is switched off (locking=False): it fails on many NFS mounts,
  and is unnecessary because no file is ever opened for writing by two processes.
* The catalog is derived data: the manifests in the checkpoint directories are the truth,
  rebuild() recreates the catalog from them, and restart never reads the catalog.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import h5py
import numpy as np

from .errors import CatalogError
from .layout import CATALOG_DIR, CATALOG_FILE, FORMAT_VERSION, JOURNAL_DIR, atomic_write_bytes, fsync_dir, token
from .locking import FileLock
from .model import Status

log = logging.getLogger(__name__)

ROW_FIELDS: list[tuple[str, str]] = [
    ("seq", "i8"), ("generation", "i8"), ("parent", "i8"), ("time", "f8"), ("created", "f8"),
    ("host", "S64"), ("nprocs", "i8"), ("memory_bytes", "i8"), ("image_bytes", "i8"),
    ("nfiles", "i8"), ("pages_written", "i8"), ("freeze_s", "f8"), ("dump_s", "f8"),
    ("write_s", "f8"), ("backend", "S32"), ("status", "u1"), ("verified_at", "f8"),
]
#: In memory rows carry the job name; on disk a job_id into the /jobs table (smaller file).
WIDE_DTYPE = np.dtype([("job", "S128")] + ROW_FIELDS)
DISK_DTYPE = np.dtype([("job_id", "i4")] + ROW_FIELDS)
JOBS_DTYPE = np.dtype([("job", "S128"), ("start", "i8"), ("count", "i8"), ("latest_seq", "i8")])
_INT_FIELDS = {name for name, t in ROW_FIELDS if t.startswith("i") or t.startswith("u")}
_FLOAT_FIELDS = {name for name, t in ROW_FIELDS if t.startswith("f")}
RESTORABLE = (int(Status.COMPLETE), int(Status.VERIFIED))


@dataclass
class Ragged:
    """A per-checkpoint array column: row i owns values[start[i]:start[i]+length[i]]."""

    start: np.ndarray
    length: np.ndarray
    values: np.ndarray

    def get(self, i: int) -> np.ndarray | None:
        if self.start[i] < 0:
            return None
        return self.values[self.start[i]: self.start[i] + self.length[i]]


@dataclass
class CatalogData:
    """The whole catalog in memory: rows sorted by (job, seq), plus ragged arrays."""

    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, WIDE_DTYPE))
    arrays: dict[str, Ragged] = field(default_factory=dict)

    def find(self, job: str, seq: int) -> int | None:
        jb = job.encode()
        lo = int(np.searchsorted(self.rows["job"], jb, "left"))
        hi = int(np.searchsorted(self.rows["job"], jb, "right"))
        i = lo + int(np.searchsorted(self.rows["seq"][lo:hi], seq))
        return i if i < hi and self.rows["seq"][i] == seq else None

    def job_slice(self, job: str) -> slice:
        jb = job.encode()
        return slice(int(np.searchsorted(self.rows["job"], jb, "left")),
                     int(np.searchsorted(self.rows["job"], jb, "right")))

    def arrays_of(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for name, rag in self.arrays.items():
            a = rag.get(i)
            if a is not None:
                out[name] = a
        return out


def publish_event(row: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The journal event for a (re)published checkpoint. `row` has the ROW_FIELDS + job."""
    return {
        "op": "publish",
        "row": {k: _json_num(v) for k, v in row.items()},
        "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape), "values": a.ravel().tolist()} for n, a in arrays.items()},
    }


def status_event(job: str, seq: int, status: Status, when: float | None = None) -> dict[str, Any]:
    return {"op": "status", "job": job, "seq": seq, "status": int(status), "time": when or time.time()}


class Catalog:
    """Journal + folded HDF5 index under ROOT/.catalog."""

    def __init__(self, root: Path, fold_every: int = 32) -> None:
        self.dir = root / CATALOG_DIR
        self.path = self.dir / CATALOG_FILE
        self.journal = self.dir / JOURNAL_DIR
        self.lock_path = self.dir / "lock"
        self.fold_every = fold_every
        #: set by Store: recreates the catalog from the checkpoint directories (lock held)
        self.rebuilder: Callable[[], CatalogData] | None = None
        self.journal.mkdir(parents=True, exist_ok=True)

    # ---- writing -------------------------------------------------------------------
    def record(self, job: str, event: dict[str, Any], fold: bool = True) -> None:
        """Append one event to the journal (one new file); then fold if enough are pending."""
        name = f"{time.time_ns():020d}~{job}~{token()}.json"
        atomic_write_bytes(self.journal / name, json.dumps(event).encode())
        if fold:
            self.maybe_fold()

    def maybe_fold(self) -> None:
        """Fold if `fold_every` events are pending and nobody else is folding right now."""
        if self.fold_every and self.pending_count() >= self.fold_every:
            self.fold(blocking=False)

    def pending_count(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.journal) if e.name.endswith(".json"))
        except FileNotFoundError:
            return 0

    def fold(self, blocking: bool = True) -> bool:
        """Fold the journal into catalog.h5. Returns False if another process is folding."""
        lock = FileLock(self.lock_path, "the catalog", timeout=300)
        if not lock.acquire(blocking=blocking):
            return False
        try:
            names = self._journal_names()
            try:
                data = self.load()
            except CatalogError as exc:
                if self.rebuilder is None:
                    raise
                log.warning("%s; rebuilding it from the checkpoint directories", exc)
                data = self.rebuilder()
            events = list(self._read_events(names))
            if events or not self.path.exists():
                self._write(merge(data, events))
            self._remove(names)
            self._clean_temps()
            return True
        finally:
            lock.release()

    def replace_all(self, data: CatalogData, folded_names: list[str]) -> None:
        """Install `data` as the catalog (used by rebuild, which holds the lock)."""
        self._write(data)
        self._remove(folded_names)
        self._clean_temps()

    # ---- reading -------------------------------------------------------------------
    def load(self) -> CatalogData:
        """Read catalog.h5 as folded (without pending events). Raises CatalogError if damaged."""
        if not self.path.exists():
            return CatalogData()
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                if f.attrs.get("format") != FORMAT_VERSION:
                    raise CatalogError(f"catalog {self.path} has format {f.attrs.get('format')!r}, expected {FORMAT_VERSION}: "
                                       "run `hpcckpt catalog rebuild`")
                jobs = f["jobs"][()]
                disk = f["checkpoints"][()]
                rows = np.zeros(len(disk), WIDE_DTYPE)
                for name, _t in ROW_FIELDS:
                    rows[name] = disk[name]
                rows["job"] = jobs["job"][disk["job_id"]] if len(disk) else b""
                arrays = {}
                for name, g in f["arrays"].items():
                    arrays[name] = Ragged(g["start"][()], g["length"][()], g["values"][()])
            return CatalogData(rows, arrays)
        except CatalogError:
            raise
        except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
            raise CatalogError(f"catalog {self.path} is unreadable ({type(exc).__name__}: {exc}); it is derived data: "
                               "run `hpcckpt catalog rebuild` to recreate it from the checkpoint directories") from None

    def read(self) -> CatalogData:
        """Folded catalog plus pending journal events: what the store looks like now."""
        data = self.load()
        names = self._journal_names()
        return merge(data, list(self._read_events(names))) if names else data

    def latest_seq(self, job: str) -> int | None:
        """Newest restorable seq of `job` per catalog, reading only /jobs and that job's rows."""
        best: int | None = None
        status: dict[int, int] = {}
        if self.path.exists():
            try:
                with h5py.File(self.path, "r", locking=False) as f:
                    jobs = f["jobs"]
                    names = jobs.fields("job")[()]
                    i = int(np.searchsorted(names, job.encode()))
                    if i < len(names) and names[i] == job.encode():
                        start, count = int(jobs[i]["start"]), int(jobs[i]["count"])
                        rows = f["checkpoints"].fields(["seq", "status"])[start:start + count]
                        for s, st in zip(rows["seq"].tolist(), rows["status"].tolist()):
                            status[s] = st
            except (OSError, KeyError, ValueError) as exc:
                raise CatalogError(f"catalog {self.path} is unreadable ({exc}): run `hpcckpt catalog rebuild`") from None
        for ev in self._read_events(self._journal_names(job)):
            if ev["op"] == "publish":
                status[int(ev["row"]["seq"])] = int(ev["row"]["status"])
            elif ev["op"] == "status":
                status[int(ev["seq"])] = int(ev["status"])
        for s, st in status.items():
            if st in RESTORABLE and (best is None or s > best):
                best = s
        return best

    def check(self) -> list[str]:
        """Problems with the catalog file itself (empty list = readable)."""
        try:
            self.load()
            return []
        except CatalogError as exc:
            return [str(exc)]

    # ---- internals -----------------------------------------------------------------
    def _journal_names(self, job: str | None = None) -> list[str]:
        try:
            names = [e.name for e in os.scandir(self.journal) if e.name.endswith(".json") and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        if job is not None:
            names = [n for n in names if n.split("~")[1:2] == [job]]
        return sorted(names)

    def _read_events(self, names: Iterable[str]) -> Iterable[dict[str, Any]]:
        for n in names:
            try:
                yield json.loads((self.journal / n).read_bytes())
            except FileNotFoundError:
                continue   # folded by someone else meanwhile; it is in catalog.h5 now
            except (ValueError, UnicodeDecodeError):
                log.warning("catalog journal event %s is unreadable; ignored (rebuild recovers it)", self.journal / n)

    def _remove(self, names: list[str]) -> None:
        for n in names:
            try:
                os.unlink(self.journal / n)
            except FileNotFoundError:
                pass

    def _clean_temps(self) -> None:
        """Remove temp files of folds and journal writes killed over an hour ago."""
        cutoff = time.time() - 3600
        for d in (self.dir, self.journal):
            for e in os.scandir(d):
                if e.name.endswith(".tmp"):
                    try:
                        if e.stat().st_mtime < cutoff:
                            os.unlink(e.path)
                    except FileNotFoundError:
                        pass

    def _write(self, data: CatalogData) -> None:
        tmp = self.dir / f".{CATALOG_FILE}.{token()}.tmp"
        rows = data.rows
        names, first, counts = np.unique(rows["job"], return_index=True, return_counts=True)
        jobs = np.zeros(len(names), JOBS_DTYPE)
        jobs["job"], jobs["start"], jobs["count"] = names, first, counts
        job_id = np.repeat(np.arange(len(names), dtype="i4"), counts)
        restorable = np.isin(rows["status"], RESTORABLE)
        for k in range(len(names)):
            sl = slice(first[k], first[k] + counts[k])
            good = rows["seq"][sl][restorable[sl]]
            jobs["latest_seq"][k] = good.max() if len(good) else -1
        disk = np.zeros(len(rows), DISK_DTYPE)
        disk["job_id"] = job_id
        for name, _t in ROW_FIELDS:
            disk[name] = rows[name]
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                f.attrs["format"] = FORMAT_VERSION
                f.attrs["written"] = time.time()
                f.attrs["rows"] = len(rows)
                f.attrs["status_codes"] = json.dumps({s.label: int(s) for s in Status})
                f.create_dataset("jobs", data=jobs)
                f.create_dataset("checkpoints", data=disk, **_compress(len(disk)))
                g = f.create_group("arrays")
                for name, rag in data.arrays.items():
                    sub = g.create_group(name)
                    sub.create_dataset("start", data=rag.start, **_compress(len(rag.start)))
                    sub.create_dataset("length", data=rag.length, **_compress(len(rag.length)))
                    sub.create_dataset("values", data=rag.values, **_compress(len(rag.values)))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(self.dir)


def merge(data: CatalogData, events: list[dict[str, Any]]) -> CatalogData:
    """Apply journal events to catalog data (pure; idempotent for replayed events)."""
    if not events:
        return data
    pending: dict[tuple[bytes, int], tuple[dict[str, Any], dict[str, Any]]] = {}
    overrides: dict[tuple[bytes, int], tuple[int, float]] = {}
    for ev in events:
        op = ev.get("op")
        if op == "publish":
            row = ev["row"]
            key = (str(row["job"]).encode(), int(row["seq"]))
            pending[key] = (dict(row), ev.get("arrays", {}))
            overrides.pop(key, None)
        elif op == "status":
            key = (str(ev["job"]).encode(), int(ev["seq"]))
            st, when = int(ev["status"]), float(ev.get("time", 0.0))
            if key in pending:
                pending[key][0]["status"] = st
                if st in (Status.VERIFIED, Status.DAMAGED):
                    pending[key][0]["verified_at"] = when
            else:
                overrides[key] = (st, when)
    rows = data.rows.copy()
    for (jb, seq), (st, when) in overrides.items():
        i = data.find(jb.decode(), seq)
        if i is not None:
            rows["status"][i] = st
            if st in (Status.VERIFIED, Status.DAMAGED):
                rows["verified_at"][i] = when
    keep = np.ones(len(rows), bool)
    for jb, seq in pending:
        i = data.find(jb.decode(), seq)
        if i is not None:
            keep[i] = False
    new = np.zeros(len(pending), WIDE_DTYPE)
    for k, (row, _arr) in enumerate(pending.values()):
        new[k]["job"] = str(row["job"]).encode()
        for name, t in ROW_FIELDS:
            v = row.get(name)
            if name in _INT_FIELDS:
                new[k][name] = -1 if v is None and name == "parent" else int(v or 0)
            elif name in _FLOAT_FIELDS:
                new[k][name] = math.nan if v is None else float(v)
            else:
                new[k][name] = str(v or "").encode()[:int(t[1:])]
    allrows = np.concatenate([rows[keep], new])
    perm = np.lexsort((allrows["seq"], allrows["job"]))
    names = set(data.arrays)
    for _row, arr in pending.values():
        names.update(arr)
    arrays: dict[str, Ragged] = {}
    for name in sorted(names):
        old = data.arrays.get(name) or Ragged(np.full(len(rows), -1, "i8"), np.zeros(len(rows), "i8"), np.zeros(0))
        chunks = [old.values]
        base = len(old.values)
        nstart = np.full(len(new), -1, "i8")
        nlen = np.zeros(len(new), "i8")
        for k, (_row, arr) in enumerate(pending.values()):
            spec = arr.get(name)
            if spec is None:
                continue
            vals = np.asarray(spec["values"], dtype=np.dtype(spec["dtype"]))
            chunks.append(vals)
            nstart[k], nlen[k] = base, len(vals)
            base += len(vals)
        dtype = np.result_type(*[c.dtype for c in chunks if len(c)]) if any(len(c) for c in chunks) else np.float64
        start = np.concatenate([old.start[keep], nstart])[perm]
        length = np.concatenate([old.length[keep], nlen])[perm]
        arrays[name] = Ragged(start, length, np.concatenate([c.astype(dtype) for c in chunks]))
    return CatalogData(allrows[perm], arrays)


def _compress(n: int) -> dict[str, Any]:
    """lzf (bundled with h5py, fast) for big datasets; tiny ones stay contiguous."""
    return {"compression": "lzf", "chunks": True} if n >= 4096 else {}


def _json_num(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
