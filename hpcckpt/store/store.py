"""Store: the facade the engine and the CLI call.

Truth lives in the checkpoint directories (their manifests); everything the restart path
uses (latest, get, verify, restore_candidate) reads only those, so a damaged or missing
catalog can never block a restart. The catalog serves listing, statistics and plots.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .catalog import Catalog, CatalogData, ROW_FIELDS, merge, publish_event, status_event
from .errors import (CatalogError, CheckpointNotFoundError, ManifestError, NoRestorableCheckpointError,
                     ParentMissingError, StaleGenerationError, StoreError)
from .layout import (ARRAYS_FILE, DELETED_DIR, JOB_LOCK, REPLACED_DIR, VERIFY_FILE, atomic_write_bytes, check_job_name, fsync_dir, parse_seq, seq_name, token)
from .codec import Compression
from .locking import FileLock
from .materialize import Materialized, chain_of, materialize
from .settings import open_settings, write_settings
from .manifest import Manifest, read_manifest
from .model import META_NUMBERS, Checkpoint, RetentionResult, Status
from .retention import Entry, plan_retention
from .staging import Owner, clean_dead, create_staging, live_stagings, remove_tree
from .state import JobState, load_state
from .verify import full_problems, load, quick_problems
from .writer import Writer

log = logging.getLogger(__name__)

#: how a compaction merges a chain (oldest first, ending with the checkpoint) into out_dir
MergeFn = Callable[[list[Checkpoint], Path], None]


class Store:
    """Image sets of many jobs under one root directory (local or shared file system)."""

    def __init__(self, root: str | os.PathLike[str], *, compression: str | Compression | None = None,
                 level: int | None = None, threads: int = 2, fold_every: int = 32,
                 stale_staging_after: float = 6 * 3600, lock_timeout: float = 120.0) -> None:
        """Open (or create) the store at `root`.

        compression ('none', 'zstd', 'zstd-N', 'lz4'; level overrides N) is a setting of
        the store, recorded in STORE.json when the store is created. Opening an existing
        store with a different one raises StoreConfigError (set_compression() changes it);
        None means "whatever the store says". threads: cores used to (de)compress.
        """
        self.root = Path(root)
        self.stale_staging_after = stale_staging_after
        self.lock_timeout = lock_timeout
        self.threads = max(1, int(threads))
        self.root.mkdir(parents=True, exist_ok=True)
        wanted = None if compression is None and level is None else Compression.parse(compression or "zstd", level)
        self.compression = open_settings(self.root, wanted)
        self.catalog = Catalog(self.root, fold_every=fold_every)
        self.catalog.rebuilder = self._scan_catalog

    # ---- paths, locks, state ---------------------------------------------------------
    def job_dir(self, job: str) -> Path:
        return self.root / check_job_name(job)

    def job_lock(self, job: str) -> FileLock:
        d = self.job_dir(job)
        d.mkdir(exist_ok=True)
        return FileLock(d / JOB_LOCK, f"job {job!r} in store {self.root}", self.lock_timeout)

    def state(self, job: str) -> JobState:
        return load_state(self.job_dir(job))

    def stale_error(self, job: str, generation: int, state: JobState, action: str) -> StaleGenerationError:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.generation_time))
        return StaleGenerationError(
            f"job {job!r}: generation {generation} may not {action}: generation {state.generation} was recorded "
            f"(on host {state.generation_host or '?'} at {when}). This writer is a stale copy of the job (e.g. "
            "a node cut off while Slurm restarted the job elsewhere) and must stop; its checkpoint is discarded.",
            job, generation, state.generation)

    def set_compression(self, compression: str | Compression | None, level: int | None = None) -> Compression:
        """Change how checkpoints published from now on are stored ('none' to stop compressing).
        Existing checkpoints keep their own encoding (each manifest says per file)."""
        self.compression = write_settings(self.root, Compression.parse(compression, level))
        return self.compression

    # ---- writing ---------------------------------------------------------------------
    def next_generation(self, job: str) -> int:
        """For runs without a scheduler restart count: a new generation, higher than any so far."""
        with self.job_lock(job):
            state = self.state(job)
            state.generation = max(state.generation, -1) + 1
            state.generation_host, state.generation_time = Owner.me(0, None).host, time.time()
            state.save(self.job_dir(job))
            return state.generation

    def claim_generation(self, job: str, generation: int) -> None:
        """A run of generation `generation` starts (Slurm's restart count): fence older
        writers from now on, not only from its first checkpoint, so a stale copy cannot
        publish while the new run is still restoring. A stale caller gets the error."""
        with self.job_lock(job):
            self._fence(job, self.state(job), generation, None, "start")

    def _fence(self, job: str, state: JobState, generation: int, parent: int | None, action: str) -> None:
        """Under the job lock: refuse an older generation, record a newer one."""
        if state.generation > generation:
            raise self.stale_error(job, generation, state, action)
        if generation > state.generation:
            state.generation, state.generation_time = generation, time.time()
            state.generation_host = Owner.me(generation, parent).host
            state.save(self.job_dir(job))

    def begin(self, job: str, generation: int, parent: int | None = None) -> Writer:
        """Start a checkpoint of `job`; the engine writes into the returned Writer's `path`.

        Records `generation` as the newest of the job if it is (fencing older writers from
        now on), cleans staging dirs of dead writers, and checks the parent exists.
        """
        if not isinstance(generation, int) or generation < 0:
            raise StoreError(f"job {job!r}: generation must be an integer >= 0, got {generation!r}")
        job_dir = self.job_dir(job)
        job_dir.mkdir(exist_ok=True)
        with self.job_lock(job):
            state = self.state(job)
            self._fence(job, state, generation, parent, "begin a checkpoint")
            self._recover_replaced(job)
            self._repair_lag(job, state)
            clean_dead(job_dir, self.stale_staging_after)
            if parent is not None:
                self.require_parent(job, parent, generation)
            owner = Owner.me(generation, parent)
            path = create_staging(job_dir, owner)
        return Writer(self, job, generation, parent, path, owner.started)

    def require_parent(self, job: str, parent: int, generation: int) -> None:
        pdir = self.job_dir(job) / seq_name(parent)
        try:
            m = read_manifest(pdir)
        except ManifestError as exc:
            gone = self._tombstone(job, parent)
            why = "was deleted by retention" if gone else f"is not usable ({exc})"
            raise ParentMissingError(
                f"job {job!r}: parent checkpoint {job}/{parent:08d} {why}: write a full (parent=None) "
                "checkpoint instead") from None
        if m.job != job:
            raise ParentMissingError(f"job {job!r}: parent {pdir} belongs to job {m.job!r}: write a full checkpoint")

    def journal_publish(self, ckpt: Checkpoint, arrays: dict[str, np.ndarray], fold: bool = True) -> None:
        """Tell the catalog; a failure here is logged, never fails the (already durable) publish."""
        try:
            self.catalog.record(ckpt.job, publish_event(_row(ckpt), arrays), fold=fold)
        except Exception as exc:  # noqa: BLE001 - the checkpoint is safe; the index can be rebuilt
            log.warning("checkpoint %s is published but the catalog was not updated (%s); "
                        "run `hpcckpt catalog rebuild`", ckpt.name, exc)

    def maybe_fold(self) -> None:
        try:
            self.catalog.maybe_fold()
        except Exception as exc:  # noqa: BLE001 - derived data; the next fold or a rebuild catches up
            log.warning("catalog fold failed (%s); run `hpcckpt catalog rebuild` if it persists", exc)

    def _repair_lag(self, job: str, state: JobState) -> None:
        """Under the job lock: a publish killed after its rename but before STATE.json was
        updated may also have missed the catalog; journal such checkpoints again (idempotent)."""
        job_dir = self.job_dir(job)
        seq = state.last_seq
        changed = False
        while (job_dir / seq_name(seq + 1)).is_dir():
            seq += 1
            m, _ = load(job_dir / seq_name(seq), "")
            if m is not None:
                c = self.checkpoint_from_manifest(m)
                self.journal_publish(c, self.arrays(c), fold=False)
            state.last_seq, changed = seq, True
        if changed:
            state.save(job_dir)

    def _finish_deletes(self, job: str) -> None:
        """Under the job lock: complete deletes cut short after their tombstone was written."""
        tomb_dir = self.job_dir(job) / DELETED_DIR
        if not tomb_dir.is_dir():
            return
        for e in os.scandir(tomb_dir):
            seq = parse_seq(e.name.split(".")[0])
            path = self.job_dir(job) / e.name.split(".")[0]
            if seq is not None and path.is_dir():
                self._delete(job, seq)

    def _delete(self, job: str, seq: int) -> None:
        """Tombstone, journal, then remove: each step is safe to be the last one done."""
        job_dir = self.job_dir(job)
        path = job_dir / seq_name(seq)
        tomb = job_dir / DELETED_DIR / f"{seq_name(seq)}.json"
        if not tomb.exists():
            try:
                manifest_text = (path / "MANIFEST.json").read_text()
            except (OSError, UnicodeDecodeError):
                manifest_text = ""
            atomic_write_bytes(tomb, json.dumps({"deleted": time.time(), "manifest": manifest_text}).encode())
        try:
            self.catalog.record(job, status_event(job, seq, Status.DELETED), fold=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("catalog not told that %s/%08d was deleted (%s)", job, seq, exc)
        remove_tree(job_dir, path)

    def _journal_status(self, ckpt: Checkpoint, status: Status) -> None:
        try:
            self.catalog.record(ckpt.job, status_event(ckpt.job, ckpt.seq, status))
        except Exception as exc:  # noqa: BLE001
            log.warning("catalog not updated with status %s of %s (%s); run `hpcckpt catalog rebuild`",
                        status.label, ckpt.name, exc)

    # ---- reading (directories: the truth) ----------------------------------------------
    def checkpoint_from_manifest(self, m: Manifest, status: Status | None = None) -> Checkpoint:
        path = self.job_dir(m.job) / seq_name(m.seq)
        if status is None:
            status = self._recorded_status(path)
        meta = m.meta
        numbers = {}
        for k, t in META_NUMBERS.items():
            v = meta.get(k)
            numbers[k] = (math.nan if t is float else 0) if v is None else t(v)
        extra = {k: v for k, v in meta.items() if k not in META_NUMBERS and k not in ("host", "backend")}
        return Checkpoint(job=m.job, generation=m.generation, seq=m.seq, path=path, parent=m.parent,
                          time=m.published, created=m.created, host=str(meta.get("host") or m.host),
                          image_bytes=m.image_bytes, nfiles=len(m.files), backend=str(meta.get("backend") or ""),
                          status=status, compacted_from=tuple(m.compacted_from), extra=extra, **numbers)

    def _recorded_status(self, path: Path) -> Status:
        try:
            return Status[json.loads((path / VERIFY_FILE).read_bytes())["status"].upper()]
        except (OSError, ValueError, KeyError):
            return Status.COMPLETE

    def _seqs_desc(self, job: str) -> Iterator[int]:
        """Published seqs newest first; probes around STATE.json's last_seq before listing."""
        job_dir = self.job_dir(job)
        if not job_dir.is_dir():
            return
        last = self.state(job).last_seq
        while (job_dir / seq_name(last + 1)).is_dir():   # a publish killed before updating STATE.json
            last += 1
        seen = 0
        s = last
        tombs = job_dir / DELETED_DIR
        while s > 0 and seen < 64:
            if (job_dir / seq_name(s)).is_dir() and not (tombs / f"{seq_name(s)}.json").exists():
                yield s
            s -= 1
            seen += 1
        if s > 0:
            dead = {e.name.split(".")[0] for e in os.scandir(tombs)} if tombs.is_dir() else set()
            rest = sorted((q for e in os.scandir(job_dir)
                           if (q := parse_seq(e.name)) is not None and q <= s and e.name not in dead), reverse=True)
            yield from rest

    def latest(self, job: str) -> Checkpoint | None:
        """Newest checkpoint that is complete: valid manifest, all files present at their
        recorded sizes, parent chain present, not found damaged by an earlier verify().
        (Sizes only: restore_candidate() reads every byte.) Never reads the catalog."""
        for seq in self._seqs_desc(job):
            c = self._quick_ok(job, seq)
            if c is not None:
                return c
        return None

    def _quick_ok(self, job: str, seq: int) -> Checkpoint | None:
        path = self.job_dir(job) / seq_name(seq)
        m, problems = load(path, f"{job}/{seq:08d}")
        if m is None or quick_problems(path, m, "") or self._recorded_status(path) is Status.DAMAGED:
            return None
        child, p = seq, m.parent
        while p is not None:
            if p >= child:
                return None
            pm, _ = load(self.job_dir(job) / seq_name(p), "")
            if pm is None:
                return None
            child, p = p, pm.parent
        return self.checkpoint_from_manifest(m)

    def get(self, job: str, seq: int) -> Checkpoint:
        path = self.job_dir(job) / seq_name(seq)
        try:
            return self.checkpoint_from_manifest(read_manifest(path))
        except ManifestError as exc:
            if not path.exists():
                tomb = self._tombstone(job, seq)
                if tomb is not None:
                    raise CheckpointNotFoundError(
                        f"checkpoint {job}/{seq:08d} was deleted by retention at "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(tomb['deleted']))}; "
                        "`hpcckpt ls` lists the ones kept") from None
                raise CheckpointNotFoundError(
                    f"checkpoint {job}/{seq:08d} does not exist in store {self.root}; `hpcckpt ls --job {job}` "
                    "lists the ones there are") from None
            raise CheckpointNotFoundError(f"checkpoint {job}/{seq:08d} is damaged: {exc}") from None

    def scan(self, job: str | None = None) -> list[Checkpoint]:
        """Every published checkpoint read from the directories (slow on big stores, exact)."""
        out = []
        for j in ([job] if job else self.jobs()):
            for seq in sorted(self._seqs_desc(j)):
                m, _ = load(self.job_dir(j) / seq_name(seq), "")
                if m is not None:
                    out.append(self.checkpoint_from_manifest(m))
        return out

    def jobs(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))

    def arrays(self, ckpt: Checkpoint) -> dict[str, np.ndarray]:
        """Per-checkpoint arrays as stored in its directory (ARRAYS.npz)."""
        p = ckpt.path / ARRAYS_FILE
        if not p.exists():
            return {}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    # ---- verification and restart ------------------------------------------------------
    def verify(self, ckpt: Checkpoint, record: bool = True, _cache: dict[int, list[str]] | None = None) -> list[str]:
        """Read every byte of `ckpt` and of its whole parent chain; return the problems found.

        With record=True the result is written to VERIFY.json in each checked directory and
        to the catalog (status verified or damaged).
        """
        cache = {} if _cache is None else _cache
        return list(self._verify_one(ckpt.job, ckpt.seq, record, cache, depth=0))

    def _verify_one(self, job: str, seq: int, record: bool, cache: dict[int, list[str]], depth: int) -> list[str]:
        if seq in cache:
            return cache[seq]
        name = f"{job}/{seq:08d}"
        path = self.job_dir(job) / seq_name(seq)
        if not path.is_dir():
            gone = "deleted by retention" if self._tombstone(job, seq) else "missing"
            cache[seq] = [f"{name}: checkpoint directory {path} is {gone}"]
            return cache[seq]
        m, problems = load(path, name)
        if m is not None:
            if m.job != job or m.seq != seq:
                problems.append(f"{name}: manifest says it is {m.job}/{m.seq:08d} (directory moved or copied?)")
            problems += full_problems(path, m, name)
            if m.parent is not None:
                if m.parent >= seq:
                    problems.append(f"{name}: parent {m.parent:08d} is not older than the checkpoint itself")
                else:
                    pp = self._verify_one(job, m.parent, record, cache, depth + 1)
                    if pp:
                        problems.append(f"{name}: its parent chain is damaged (parent {job}/{m.parent:08d})")
                        problems += [p for p in pp if p not in problems]
        cache[seq] = problems
        if record:
            status = Status.DAMAGED if problems else Status.VERIFIED
            try:
                atomic_write_bytes(path / VERIFY_FILE, json.dumps(
                    {"status": status.label, "time": time.time(), "problems": problems}, indent=1).encode(), durable=False)
            except OSError as exc:
                log.warning("cannot record verification result in %s: %s", path, exc)
            if m is not None:
                self._journal_status(self.checkpoint_from_manifest(m, status), status)
        return problems

    def restore_candidate(self, job: str, *, record: bool = True) -> Checkpoint:
        """Newest checkpoint that fully verifies (with its chain). Skipped damaged ones are
        logged as warnings and listed in the result's `skipped`; if none verifies, raises
        NoRestorableCheckpointError naming each checkpoint and its problems."""
        if (self.job_dir(job) / REPLACED_DIR).is_dir():
            with self.job_lock(job):
                self._recover_replaced(job)
        damaged: dict[int, list[str]] = {}
        cache: dict[int, list[str]] = {}
        for seq in self._seqs_desc(job):
            problems = self._verify_one(job, seq, record, cache, 0)
            if not problems:
                ckpt = self.get(job, seq)
                if damaged:
                    log.warning("job %r: restoring from %s because newer checkpoints are damaged: %s", job, ckpt.name,
                                "; ".join(f"{s:08d}: {p[0]}" for s, p in damaged.items()))
                return ckpt.replace(status=Status.VERIFIED,
                                    skipped=tuple((s, tuple(p)) for s, p in damaged.items()))
            damaged[seq] = problems
        if not damaged:
            raise NoRestorableCheckpointError(
                f"job {job!r} has no checkpoints in store {self.root}: start it from the beginning "
                "(or check --store/--job)", job, {})
        detail = "\n".join(f"  {job}/{s:08d}: " + "; ".join(p) for s, p in damaged.items())
        raise NoRestorableCheckpointError(
            f"job {job!r}: none of its {len(damaged)} checkpoints verifies, so it cannot be restored; start it "
            f"from the beginning or repair the files:\n{detail}", job, damaged)

    # ---- catalog -------------------------------------------------------------------------
    def list(self, job: str | None = None, include_deleted: bool = True) -> list[Checkpoint]:
        """Checkpoints as the catalog knows them (fast; includes deleted ones as history).
        A damaged catalog is rebuilt from the directories, with a warning."""
        try:
            data = self.catalog.read()
        except CatalogError as exc:
            log.warning("%s; rebuilding it now", exc)
            self.rebuild_catalog()
            data = self.catalog.read()
        rows = data.rows
        sl = data.job_slice(job) if job else slice(0, len(rows))
        out = []
        for i in range(sl.start, sl.stop):
            r = rows[i]
            st = Status(int(r["status"]))
            if st is Status.DELETED and not include_deleted:
                continue
            j = r["job"].decode()
            out.append(Checkpoint(
                job=j, generation=int(r["generation"]), seq=int(r["seq"]),
                path=self.job_dir(j) / seq_name(int(r["seq"])),
                parent=None if r["parent"] < 0 else int(r["parent"]), time=float(r["time"]),
                created=float(r["created"]), host=r["host"].decode(), nprocs=int(r["nprocs"]),
                memory_bytes=int(r["memory_bytes"]), image_bytes=int(r["image_bytes"]), nfiles=int(r["nfiles"]),
                pages_written=int(r["pages_written"]), freeze_s=float(r["freeze_s"]), dump_s=float(r["dump_s"]),
                write_s=float(r["write_s"]), backend=r["backend"].decode(), status=st))
        return out

    def catalog_arrays(self, job: str, seq: int) -> dict[str, np.ndarray]:
        data = self.catalog.read()
        i = data.find(job, seq)
        return {} if i is None else data.arrays_of(i)

    def catalog_sync(self) -> None:
        """Fold every pending journal event into catalog.h5 now (waits for the lock)."""
        self.catalog.fold(blocking=True)

    def rebuild_catalog(self) -> int:
        """Recreate catalog.h5 from the checkpoint directories and tombstones. Returns rows."""
        lock = FileLock(self.catalog.lock_path, "the catalog", timeout=600)
        with lock:
            names = self.catalog._journal_names()
            data = self._scan_catalog()
            self.catalog.replace_all(data, names)
            return len(data.rows)

    def _scan_catalog(self) -> CatalogData:
        """Catalog contents derived from directories and tombstones (the truth)."""
        events: list[dict[str, Any]] = []
        for job in self.jobs():
            seen: set[int] = set()
            for seq in sorted(self._seqs_desc(job)):
                path = self.job_dir(job) / seq_name(seq)
                m, _ = load(path, "")
                seen.add(seq)
                if m is None:
                    events.append(publish_event({"job": job, "seq": seq, "status": int(Status.DAMAGED),
                                                 "time": path.stat().st_mtime, "parent": None}, {}))
                    continue
                c = self.checkpoint_from_manifest(m)
                try:
                    arrays = self.arrays(c)
                except (OSError, ValueError) as exc:
                    log.warning("arrays of %s unreadable (%s); catalogued without them", c.name, exc)
                    arrays = {}
                row = _row(c)
                if c.status in (Status.VERIFIED, Status.DAMAGED):
                    row["verified_at"] = _verified_at(path)
                events.append(publish_event(row, arrays))
            tomb_dir = self.job_dir(job) / DELETED_DIR
            if tomb_dir.is_dir():
                for e in sorted(os.scandir(tomb_dir), key=lambda e: e.name):
                    seq = parse_seq(e.name.split(".")[0])
                    if seq is None or seq in seen:
                        continue
                    try:
                        tomb = json.loads(Path(e.path).read_bytes())
                        m = Manifest.from_bytes(tomb["manifest"].encode(), e.path)
                    except (OSError, ValueError, KeyError, ManifestError):
                        continue
                    c = self.checkpoint_from_manifest(m, Status.DELETED)
                    events.append(publish_event(_row(c), {}))
        return merge(CatalogData(), events)

    # ---- retention and compaction ------------------------------------------------------
    def apply_retention(self, job: str, keep_last: int | None = None, keep_every: float | None = None,
                        max_bytes: int | None = None) -> RetentionResult:
        """Delete checkpoints of `job` that no policy keeps; never one a kept one needs."""
        job_dir = self.job_dir(job)
        with self.job_lock(job):
            self._finish_deletes(job)
            entries, ckpts = [], {}
            for seq in self._seqs_desc(job):
                path = job_dir / seq_name(seq)
                m, _ = load(path, "")
                if m is None:       # unreadable manifest: size by walking, no parent known
                    nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    entries.append(Entry(seq, None, path.stat().st_mtime, nbytes))
                    continue
                ckpts[seq] = self.checkpoint_from_manifest(m)
                entries.append(Entry(seq, m.parent, m.published, m.image_bytes))
            pinned = {o.parent for _p, o in live_stagings(job_dir, self.stale_staging_after) if o.parent is not None}
            good = self.latest(job)
            if good is not None:
                pinned.add(good.seq)
            plan = plan_retention(entries, keep_last, keep_every, max_bytes, pinned)
            (job_dir / DELETED_DIR).mkdir(exist_ok=True)
            for seq in sorted(plan.delete):
                self._delete(job, seq)
            fsync_dir(job_dir)
        self.maybe_fold()
        size = {e.seq: e.nbytes for e in entries}
        return RetentionResult(job, tuple(sorted(plan.keep)), tuple(sorted(plan.delete)),
                               sum(size.values()), sum(size[s] for s in plan.keep),
                               tuple(sorted(plan.pinned)), plan.over_budget)

    def materialize(self, ckpt: Checkpoint, dest_dir: str | os.PathLike[str] | None = None) -> Materialized:
        """Plain files the engine can restore `ckpt` from, with its whole parent chain.

        Use as `with store.materialize(ckpt) as path: restore(path)`. Uncompressed
        checkpoints: `path` is the checkpoint's own directory, nothing is copied or
        removed. Compressed: each checkpoint of the chain is decompressed (and checked)
        into dest_dir/<seq>/ or, by default, a new $HPCCKPT_TMPDIR / $TMPDIR / /tmp
        directory, removed when the `with` block ends (or by .cleanup()). Does not
        verify first: call restore_candidate() / verify() for that (materialize still
        checks every digest of what it reads and raises CorruptDataError).
        """
        return materialize(self, ckpt, dest_dir)

    def compact(self, ckpt: Checkpoint, merge_fn: MergeFn) -> Checkpoint:
        """Replace `ckpt` (same job and seq) by a standalone image that merge_fn builds from
        its chain (oldest first); ancestors then become deletable by retention.

        merge_fn gets the chain as plain image directories (materialized if the store is
        compressed, so the engine never sees compressed files) and writes plain files into
        out_dir; publish compresses them as the store's setting says."""
        if ckpt.parent is None:
            return ckpt
        problems = self.verify(ckpt)
        if problems:
            raise StoreError(f"checkpoint {ckpt.name} cannot be compacted, its chain is damaged: " + "; ".join(problems))
        chain = chain_of(self, ckpt)
        job_dir = self.job_dir(ckpt.job)
        owner = Owner.me(ckpt.generation, None)
        with self.job_lock(ckpt.job):
            path = create_staging(job_dir, owner)
        writer = Writer(self, ckpt.job, ckpt.generation, None, path, ckpt.created)
        try:
            plain = materialize(self, ckpt)
            try:
                merge_fn(plain.checkpoints, path)
            finally:
                plain.cleanup()
            m = read_manifest(ckpt.path)
            meta: dict[str, Any] = dict(m.meta)
            for k in ("publish_s", "compression", "raw_bytes"):
                meta.pop(k, None)
            meta.update(self.arrays(ckpt))
            writer.fenced = False
            return writer.publish(meta, compacted_from=[c.seq for c in chain[:-1]], _seq=ckpt.seq)
        except BaseException:
            writer.abort()
            raise

    def compact_job(self, job: str, merge_fn: MergeFn, seq: int | None = None) -> Checkpoint:
        """`hpcckpt compact --store ROOT --job NAME [--checkpoint N]`: compact checkpoint N,
        or the newest complete one, of `job`. Returns the (possibly unchanged) checkpoint."""
        ckpt = self.get(job, seq) if seq is not None else self.latest(job)
        if ckpt is None:
            raise CheckpointNotFoundError(f"job {job!r} has no complete checkpoint in store {self.root} to compact; "
                                          f"`hpcckpt ls --store {self.root} --job {job}` lists what there is")
        return self.compact(ckpt, merge_fn)

    def swap_in(self, job: str, seq: int, staging: Path) -> None:
        """Replace published `seq` by `staging` (called under the job lock by compaction).
        The old dir is parked in .replaced/ first; _recover_replaced() undoes a half swap."""
        job_dir = self.job_dir(job)
        target = job_dir / seq_name(seq)
        if not target.is_dir():
            raise CheckpointNotFoundError(f"checkpoint {job}/{seq:08d} vanished during compaction (deleted by "
                                          "retention?); the compacted copy is discarded")
        parked_dir = job_dir / REPLACED_DIR
        parked_dir.mkdir(exist_ok=True)
        park = parked_dir / f"{seq_name(seq)}.{token()}"
        os.rename(target, park)
        os.rename(staging, target)
        fsync_dir(job_dir)
        remove_tree(job_dir, park)

    def _recover_replaced(self, job: str) -> None:
        """Call under the job lock: finish or undo a compaction swap cut short by a crash."""
        parked_dir = self.job_dir(job) / REPLACED_DIR
        if not parked_dir.is_dir():
            return
        for e in os.scandir(parked_dir):
            seq = parse_seq(e.name.split(".")[0])
            target = self.job_dir(job) / e.name.split(".")[0]
            if seq is not None and not target.exists():
                os.rename(e.path, target)
                log.warning("restored %s after a compaction interrupted mid-swap", target)
            else:
                remove_tree(self.job_dir(job), Path(e.path))

    def _tombstone(self, job: str, seq: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.job_dir(job) / DELETED_DIR / f"{seq_name(seq)}.json").read_bytes())
        except (OSError, ValueError):
            return None


def _row(c: Checkpoint) -> dict[str, Any]:
    row: dict[str, Any] = {"job": c.job}
    for name, _t in ROW_FIELDS:
        if name == "parent":
            row[name] = -1 if c.parent is None else c.parent
        elif name == "status":
            row[name] = int(c.status)
        elif name == "verified_at":
            row[name] = None
        else:
            row[name] = getattr(c, name)
    return row


def _verified_at(path: Path) -> float | None:
    try:
        return float(json.loads((path / VERIFY_FILE).read_bytes())["time"])
    except (OSError, ValueError, KeyError):
        return None
