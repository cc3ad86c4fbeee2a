"""Per-job state: the highest generation begun and the last sequence number handed out.

It lives in ROOT/JOB/STATE.json and is only changed under the job lock, by atomic
replace. It is a cache of facts the directories also hold (manifests carry generation and
seq), so a lost or damaged STATE.json is rebuilt from them; the one fact it alone holds is
"generation G has begun but not yet published", which is what fences a stale writer early.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .layout import JOB_STATE, atomic_write_bytes, parse_seq, DELETED_DIR
from .manifest import read_manifest
from .errors import ManifestError


@dataclass
class JobState:
    generation: int = -1
    generation_host: str = ""
    generation_time: float = 0.0
    last_seq: int = 0

    def save(self, job_dir: Path) -> None:
        atomic_write_bytes(job_dir / JOB_STATE, json.dumps(asdict(self), indent=1).encode() + b"\n")


def load_state(job_dir: Path) -> JobState:
    """Read STATE.json; if missing or damaged, derive it from manifests and tombstones."""
    try:
        raw = json.loads((job_dir / JOB_STATE).read_bytes())
        return JobState(int(raw["generation"]), str(raw["generation_host"]),
                        float(raw["generation_time"]), int(raw["last_seq"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return derive_state(job_dir)


def derive_state(job_dir: Path) -> JobState:
    state = JobState()
    if not job_dir.is_dir():
        return state
    for entry in job_dir.iterdir():
        seq = parse_seq(entry.name)
        if seq is None:
            continue
        state.last_seq = max(state.last_seq, seq)
        try:
            m = read_manifest(entry)
        except ManifestError:
            continue
        if m.generation > state.generation:
            state.generation, state.generation_host, state.generation_time = m.generation, m.host, m.published
    deleted = job_dir / DELETED_DIR
    if deleted.is_dir():
        for entry in deleted.iterdir():
            seq = parse_seq(entry.name.split(".")[0])
            if seq is not None:
                state.last_seq = max(state.last_seq, seq)
    if state.generation_time == 0.0 and state.generation >= 0:
        state.generation_time = time.time()
    return state
