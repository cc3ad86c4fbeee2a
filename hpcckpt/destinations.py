"""Where `hpcckpt run` and `dump` put checkpoints and where a resume finds them.

Two kinds, one interface: a plain directory (DIR/ckpt-NNNN plus an atomically switched
DIR/latest link), or a job in the image store (atomic publish, checksums, fencing by
generation, catalog, retention). Both promise the same thing: a resume only ever sees a
complete image.
"""
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .engine.dump import DumpResult
from .errors import HpcckptError
from .store import NoRestorableCheckpointError, Store
from .store.layout import atomic_write_bytes

#: The file `hpcckpt run` keeps up to date in the job's directory for `hpcckpt status`.
STATUS_FILE = "RUN-STATUS.json"


@dataclass
class RunStatus:
    """What a running (or ended) `hpcckpt run` says about itself, for `hpcckpt status`.

    Written whole and renamed into place, so a reader sees the old or the new file. Times
    are wall-clock seconds since the epoch, so another node can read them.
    """
    job: str
    generation: int
    host: str
    pid: int
    schedule: str
    policy: str
    state: str = "running"          # running | finished | requeued | stopped | failed
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    next_checkpoint: float | None = None
    walltime_end: float | None = None
    final_checkpoint_by: float | None = None
    checkpoints: int = 0
    failures: int = 0
    last: dict | None = None        # where, at, frozen_s, total_s, pages_bytes, dirty_rate
    errors: list[str] = field(default_factory=list)
    exit: str | None = None

    def error(self, msg: str) -> None:
        self.errors = (self.errors + [msg])[-5:]


def write_status(path: Path, status: RunStatus) -> None:
    """Atomically replace the status file, unless a newer generation of the job wrote it
    (a stale copy on a cut-off node must not hide the live run's status)."""
    try:
        old = json.loads(path.read_text())
        if int(old.get("generation", -1)) > status.generation:
            return
    except (OSError, ValueError):
        pass
    status.updated = time.time()
    atomic_write_bytes(path, json.dumps(asdict(status), indent=1).encode(), durable=False)


def read_status(path: Path) -> RunStatus | None:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HpcckptError(f"status file {path} is unreadable ({e}); the next checkpoint rewrites it") from None
    known = RunStatus.__dataclass_fields__
    return RunStatus(**{k: v for k, v in raw.items() if k in known})


class ImageDir:
    """DIR/ckpt-NNNN, with DIR/latest pointing at the newest sealed one."""

    notes: list[str] = []
    #: the newest image written or resumed from: the parent of an incremental checkpoint
    last_path: Path | None = None

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        """Nothing to drop: the restore read the images in place."""
        self.job = self.root.name
        self.generation = 0

    @property
    def status_path(self) -> Path:
        return self.root / STATUS_FILE

    def latest(self) -> Path | None:
        link = self.root / "latest"
        self.last_path = self.root / os.readlink(link) if link.is_symlink() else None
        return self.last_path

    def checkpoint(self, do_dump: Callable[..., DumpResult], parent: bool = False) -> tuple[str, DumpResult]:
        """With `parent`, do_dump(path, parent_path) may write an incremental image against
        the last one (the chain stays in DIR: retention is the user's)."""
        seqs = [int(p.name[5:]) for p in self.root.glob("ckpt-*") if p.name[5:].isdigit()]
        name = f"ckpt-{max(seqs, default=0) + 1:04d}"
        r = do_dump(self.root / name, self.last_path) if parent and self.last_path else do_dump(self.root / name)
        self.last_path = self.root / name
        tmp = self.root / f".latest.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, self.root / "latest")
        return str(self.root / name), r


@dataclass
class StoreJob:
    """One job in an image store, written as one generation of it."""
    store: Store
    job: str
    generation: int
    keep_last: int | None = None
    notes: list[str] = field(default_factory=list)
    last_seq: int | None = None          # newest checkpoint written or resumed from
    last_path: Path | None = None
    keep_every: float | None = None      # retention beyond the last N: one per interval
    max_bytes: int | None = None         # retention: a byte budget for the job
    _materialized: object = None

    @property
    def status_path(self) -> Path:
        d = self.store.job_dir(self.job)
        d.mkdir(exist_ok=True)
        return d / STATUS_FILE

    @classmethod
    def open(cls, root: str, job: str | None, generation: int | None, keep_last: int | None) -> "StoreJob":
        store = Store(root)
        job = job or default_job_name()
        if generation is None:
            generation = slurm_generation()
        if generation is None:
            generation = store.next_generation(job)
        else:
            store.claim_generation(job, generation)
        return cls(store, job, generation, keep_last)

    def latest(self) -> Path | None:
        try:
            c = self.store.restore_candidate(self.job)
        except NoRestorableCheckpointError as e:
            if e.args and "no checkpoints" in str(e):
                return None
            raise
        # said after the restore: restoring rolls a shared stderr file back to its size at
        # the checkpoint, which would erase anything printed before
        self.notes = [f"skipped damaged checkpoint {self.job}/{seq:08d}: {'; '.join(problems)}"
                      for seq, problems in c.skipped]
        self.last_seq, self.last_path = c.seq, c.path
        # a compressed store hands the engine plain files in a temporary directory
        self._materialized = self.store.materialize(c)
        return self._materialized.path

    def release(self) -> None:
        """The restore is done: drop the temporary plain copy, if one was made."""
        if self._materialized is not None:
            self._materialized.cleanup()
            self._materialized = None

    def checkpoint(self, do_dump: Callable[..., DumpResult], parent: bool = False) -> tuple[str, DumpResult]:
        """With `parent`, do_dump(path, parent_path) may write an incremental image against
        the last checkpoint, which the store then keeps as long as this one needs it."""
        par = self.last_seq if parent and self.last_seq is not None else None
        w = self.store.begin(self.job, self.generation, parent=par)
        try:
            r = do_dump(w.path, self.last_path) if par is not None else do_dump(w.path)
        except BaseException:
            w.abort()
            raise
        c = w.publish({"host": socket.gethostname(), "nprocs": 1, "memory_bytes": r.memory_bytes,
                       "pages_written": r.pages_bytes // 4096, "freeze_s": r.frozen_s,
                       "dump_s": r.total_s, "backend": r.tracking if r.incremental else "full",
                       "write_rate_gbs": np.array([r.pages_bytes / max(r.total_s, 1e-9) / 1e9])})
        self.last_seq, self.last_path = c.seq, c.path
        if self.keep_last or self.keep_every or self.max_bytes:
            self.store.apply_retention(self.job, keep_last=self.keep_last, keep_every=self.keep_every,
                                       max_bytes=self.max_bytes)
        return f"{self.job}/{c.seq:08d}", r


def slurm_generation() -> int | None:
    """Inside a Slurm job: its restart count, the fencing generation of this run."""
    if not (os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")):
        return None
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def default_job_name() -> str:
    jid = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if jid:
        return f"slurm-{jid}"
    raise HpcckptError("name the job with --job NAME (outside Slurm there is no job id to name it by)")


def open_destination(images: str | None, store: str | None, job: str | None, generation: int | None = None,
                     keep_last: int | None = None, keep_every: float | None = None, max_bytes: int | None = None):
    if images and store:
        raise HpcckptError("give either --images DIR or --store ROOT, not both")
    if store:
        dest = StoreJob.open(store, job, generation, keep_last)
        dest.keep_every, dest.max_bytes = keep_every, max_bytes
        return dest
    if images:
        return ImageDir(images)
    return None
