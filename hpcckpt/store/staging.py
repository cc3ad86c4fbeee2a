"""Staging directories: where an image set is written before it is published.

Each lives in ROOT/JOB/.staging/<host.pid.random>/ with an OWNER.json saying who writes
it. Restart never looks there. A later begin() of the same job removes staging dirs
whose writer is provably dead (same host and boot, pid gone or reused) or, for writers on
other hosts, whose directory has not changed for `stale_after` seconds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .layout import OWNER_FILE, STAGING_DIR, TRASH_DIR, atomic_write_bytes, hostname, token

log = logging.getLogger(__name__)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (tells a live pid from a reused one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


@dataclass
class Owner:
    host: str
    boot_id: str
    pid: int
    pid_start: int | None
    started: float
    generation: int
    parent: int | None

    @classmethod
    def me(cls, generation: int, parent: int | None) -> "Owner":
        return cls(hostname(), boot_id(), os.getpid(), pid_start_time(os.getpid()), time.time(), generation, parent)

    def alive(self, stale_after: float, mtime: float) -> bool:
        if self.host == hostname() and self.boot_id == boot_id():
            return self.pid_start is not None and pid_start_time(self.pid) == self.pid_start
        return time.time() - mtime < stale_after


def create_staging(job_dir: Path, owner: Owner) -> Path:
    staging = job_dir / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / token()
    path.mkdir()
    atomic_write_bytes(path / OWNER_FILE, json.dumps(asdict(owner)).encode(), durable=False)
    return path


def read_owner(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads((path / OWNER_FILE).read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


def live_stagings(job_dir: Path, stale_after: float) -> list[tuple[Path, Owner]]:
    out = []
    for path, owner, alive in _scan(job_dir, stale_after):
        if alive and owner is not None:
            out.append((path, owner))
    return out


def clean_dead(job_dir: Path, stale_after: float) -> list[Path]:
    """Remove staging dirs of dead writers (call under the job lock). Returns what went."""
    removed = []
    for path, owner, alive in _scan(job_dir, stale_after):
        if not alive:
            log.info("removing staging dir %s of dead writer %s", path, owner)
            remove_tree(job_dir, path)
            removed.append(path)
    empty_trash(job_dir)
    return removed


def remove_tree(job_dir: Path, path: Path) -> None:
    """Rename into .trash first (atomic: no half-removed dir is ever seen), then delete."""
    trash = job_dir / TRASH_DIR
    trash.mkdir(exist_ok=True)
    dest = trash / f"{path.name}.{token()}"
    try:
        os.rename(path, dest)
    except FileNotFoundError:
        return
    shutil.rmtree(dest, ignore_errors=True)


def empty_trash(job_dir: Path) -> None:
    trash = job_dir / TRASH_DIR
    if trash.is_dir():
        for e in os.scandir(trash):
            shutil.rmtree(e.path, ignore_errors=True)


def _scan(job_dir: Path, stale_after: float):
    staging = job_dir / STAGING_DIR
    if not staging.is_dir():
        return
    for e in os.scandir(staging):
        if not e.is_dir(follow_symlinks=False):
            continue
        path = Path(e.path)
        owner = read_owner(path)
        try:
            mtime = max([e.stat().st_mtime] + [x.stat().st_mtime for x in os.scandir(path)])
        except FileNotFoundError:
            mtime = time.time()
        if owner is None:
            alive = time.time() - mtime < min(stale_after, 60.0)   # killed before OWNER.json landed
        else:
            alive = owner.alive(stale_after, mtime)
        yield path, owner, alive
