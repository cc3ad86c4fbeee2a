"""`hpcckpt status JOBID`: what a checkpointed job has and what its supervisor plans.

The checkpoints come from the store's directories (the truth a restart reads); the
schedule's next time, the walltime plan, the measured costs and any errors come from the
status file `hpcckpt run` rewrites atomically in the job's directory (RUN-STATUS.json);
the job's state from Slurm when the controller answers. Each source may be missing (a job
that has not checkpointed yet, a store on another cluster): status says so and shows
the rest.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .destinations import STATUS_FILE, read_status
from .errors import HpcckptError


def job_name(jobid: str) -> str:
    """A bare Slurm job id names the store job `slurm-ID` (what `run` uses inside Slurm)."""
    return f"slurm-{jobid}" if jobid.isdigit() else jobid


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    d = t - now
    rel = f"in {d:.0f} s" if d >= 0 else f"{-d:.0f} s ago"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({rel})"


def _slurm_state(jobid: str) -> tuple[str | None, str | None]:
    """(state line, comment) of the Slurm job; the comment carries hpcckpt's newest error."""
    if not jobid.isdigit():
        return None, None
    try:
        from .scheduler import CommandsBackend
        job = CommandsBackend(timeout=5).load(int(jobid))
    except (HpcckptError, OSError):
        return None, None
    return f"{job.state} (restarts {job.restart_count}, nodes {','.join(job.nodes) or '-'})", job.comment


def job_status(jobid: str, store: str | None, images: str | None, as_json: bool = False) -> str:
    if bool(store) == bool(images):
        raise HpcckptError("say where the job's checkpoints are: --store ROOT or --images DIR")
    checkpoints: list[dict] = []
    if store:
        from .store import Store
        root = Path(store)
        if not root.is_dir():
            slurm, comment = _slurm_state(jobid)
            if slurm is None:
                raise HpcckptError(f"store {store} does not exist")
            if as_json:
                return json.dumps({"job": job_name(jobid), "slurm": slurm, "comment": comment,
                                   "checkpoints": [], "run": None, "store": "missing"}, indent=1)
            return "\n".join([f"job {job_name(jobid)}: Slurm {slurm}", f"  store {store} does not exist"]
                             + ([f"  Slurm comment: {comment}"] if comment else []))
        name = job_name(jobid)
        st = Store(root)
        status_path = st.job_dir(name) / STATUS_FILE
        for c in st.scan(name):
            checkpoints.append({"seq": c.seq, "generation": c.generation, "time": c.time, "host": c.host,
                                "image_bytes": c.image_bytes, "freeze_s": c.freeze_s, "dump_s": c.dump_s,
                                "path": str(c.path)})
    else:
        name = jobid
        status_path = Path(images) / STATUS_FILE
        for p in sorted(Path(images).glob("ckpt-*")):
            checkpoints.append({"seq": int(p.name[5:]) if p.name[5:].isdigit() else -1, "generation": None,
                                "time": p.stat().st_mtime, "host": None, "path": str(p)})
    run = read_status(status_path)
    slurm, comment = _slurm_state(jobid)
    if as_json:
        return json.dumps({"job": name, "slurm": slurm, "comment": comment, "checkpoints": checkpoints,
                           "run": asdict(run) if run else None}, indent=1)
    now = time.time()
    lines = [f"job {name}" + (f": Slurm {slurm}" if slurm else "")]
    if comment:
        lines.append(f"  Slurm comment: {comment}")
    if run is None:
        lines.append(f"  no status file ({status_path}): hpcckpt run has not started for this job here")
    else:
        lines += [
            f"  run: {run.state} on {run.host} (pid {run.pid}, generation {run.generation}), "
            f"updated {_when(run.updated, now)}",
            f"  schedule: {run.schedule} ({run.policy})",
            f"  next checkpoint: {_when(run.next_checkpoint, now)}",
        ]
        if run.walltime_end:
            lines.append(f"  walltime ends: {_when(run.walltime_end, now)}; final checkpoint + requeue at "
                         f"{_when(run.final_checkpoint_by, now)}")
        if run.last:
            rate = run.last.get("dirty_rate")
            lines.append(f"  last checkpoint: {run.last['where']} at {_when(run.last['at'], now)}: "
                         f"frozen {run.last['frozen_s'] * 1000:.0f} ms, {run.last['total_s']:.2f} s in all, "
                         f"{run.last['pages_bytes'] / 2**20:.1f} MiB"
                         + (f", dirty rate {rate / 2**20:.2f} MiB/s" if rate else ""))
        lines.append(f"  checkpoints taken by this run: {run.checkpoints}, failed: {run.failures}")
        if run.exit:
            lines.append(f"  job ended: {run.exit}")
        for e in run.errors:
            lines.append(f"  error: {e}")
    lines.append(f"  checkpoints ({len(checkpoints)}):" if checkpoints else "  checkpoints: none")
    for c in checkpoints:
        extra = (f" gen {c['generation']} {c.get('host') or '-'} {c.get('image_bytes', 0) / 2**20:.1f} MiB "
                 f"freeze {c.get('freeze_s') or 0:.3f} s dump {c.get('dump_s') or 0:.3f} s"
                 if c["generation"] is not None else "")
        lines.append(f"    {c['seq']:08d} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(c['time']))}{extra}")
    return "\n".join(lines)
