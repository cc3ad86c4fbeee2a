"""Batch jobs under `hpcckpt run` (issue 6): what periodic checkpoints cost a job's
runtime, and how long a requeued job takes to compute again.

overhead  A C job (benchmarks/stepjob.c, compiled here) holds MIB MiB written once, then
          runs STEPS "minute-equivalent" steps: a fixed amount of compute (calibrated to
          take --step-seconds on this machine, default = --interval) plus rewriting
          FRACTION of its pages. Run (a) plain, (b) under `hpcckpt run --images DIR
          --every INTERVAL` (incremental checkpoints, every 10th full: the default).
          Reported: wall time and the job's own work time (monotonic, after its initial
          fill) of each, the overhead in %, and the checkpoints (count, MiB, frozen ms,
          total s) from `hpcckpt run`'s stderr. The issue's case is `--full`: 4 GiB, 1% per
          60 s step, checkpoints every 60 s (aim: under 2%).

requeue   On a real Slurm 22.05 test cluster (tests/slurm_cluster/cluster.sh, own state
          dir and ports, stopped at the end) one job `exec hpcckpt run --store S --every
          INTERVAL -- stepjob ...` is requeued REPEAT times (`scontrol requeue`), then its
          node is crashed CRASHES times (SIGKILL of its slurmd, stepd and job processes,
          as tests/slurm_cluster/jobs.py kill_node). For each: from the requeue (or kill)
          to the job RUNNING again, to `hpcckpt run` saying "resumed from" (first seen by
          polling its stderr file), and to the first step line the resumed computation
          prints (its own wall-clock stamp; found as the line after the largest gap in
          the stamps). Median, min, max.

    .venv/bin/python benchmarks/bench_slurm.py overhead [--mib 1024 --fraction 0.01 --interval 10 --steps 12]
    .venv/bin/python benchmarks/bench_slurm.py overhead --full        # 4096 MiB, 60 s, 30 steps: ~65 min
    .venv/bin/python benchmarks/bench_slurm.py requeue [--repeat 3 --crashes 1]
    .venv/bin/python benchmarks/bench_slurm.py all

Needs root (hpcckpt run does) and gcc. Results also go to benchmarks/out/bench_slurm_*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hpcckpt.scheduler import CommandsBackend, JobSubmitDescription

CLUSTER_SH = ROOT / "tests" / "slurm_cluster" / "cluster.sh"
OUT = ROOT / "benchmarks" / "out"
CKPT_RE = re.compile(r"checkpoint (\S+): ([\d.]+) MiB, frozen (\d+) ms, ([\d.]+) s in all")


def build(where: Path) -> Path:
    exe = where / "stepjob"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "benchmarks" / "stepjob.c")], check=True)
    return exe


def iters_for(exe: Path, seconds: float) -> int:
    """Iterations of stepjob's compute loop that take `seconds` here (best of 3)."""
    n = 100_000_000
    ns = min(float(subprocess.run([str(exe), "--calibrate", str(n)], capture_output=True, text=True,
                                  check=True).stdout.split()[1]) for _ in range(3))
    return int(seconds * 1e9 / ns)


def hpcckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpcckpt.cli", "run", *args]


# -- overhead ----------------------------------------------------------------------------
def run_job(argv: list[str]) -> dict:
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exit {p.returncode}:\n{p.stderr[-3000:]}")
    work = re.search(r"work_s ([\d.]+) sum (\w+)", p.stdout)
    ckpts = [{"mib": float(m[2]), "frozen_s": int(m[3]) / 1000, "total_s": float(m[4])} for m in CKPT_RE.finditer(p.stderr)]
    return {"wall_s": wall, "work_s": float(work[1]), "sum": work[2], "checkpoints": ckpts,
            "stderr_tail": p.stderr[-400:] if not ckpts else ""}


def overhead(a) -> dict:
    step_s = a.step_seconds or a.interval
    base = Path(tempfile.mkdtemp(prefix="bench-slurm-", dir=a.dir))
    try:
        exe = build(base)
        iters = iters_for(exe, step_s)
        job = [str(exe), str(a.mib), str(a.fraction), str(a.steps), str(iters)]
        print(f"job: {a.mib} MiB, {a.fraction:.2%} of its pages rewritten per step, {a.steps} steps of "
              f"~{step_s:g} s compute ({iters} iterations); checkpoints every {a.interval:g} s", flush=True)
        rows = {"plain": [], "checkpointed": []}
        for rep in range(a.repeat):
            r = run_job(job)
            rows["plain"].append(r)
            print(f"  plain        wall {r['wall_s']:7.2f} s  work {r['work_s']:7.2f} s", flush=True)
            if a.supervised:
                r = run_job(hpcckpt("--images", str(base / "none"), "--", *job))
                rows.setdefault("supervised", []).append(r)
                print(f"  supervised   wall {r['wall_s']:7.2f} s  work {r['work_s']:7.2f} s  "
                      f"(hpcckpt run, no periodic checkpoint)", flush=True)
            images = base / f"images-{rep}"
            r = run_job(hpcckpt("--images", str(images), "--every", str(a.interval), "--", *job))
            shutil.rmtree(images, ignore_errors=True)
            rows["checkpointed"].append(r)
            c = r["checkpoints"]
            print(f"  checkpointed wall {r['wall_s']:7.2f} s  work {r['work_s']:7.2f} s  "
                  f"{len(c)} checkpoints", flush=True)
            for i, k in enumerate(c, 1):
                print(f"      #{i:<2d} {k['mib']:8.1f} MiB  frozen {k['frozen_s'] * 1000:5.0f} ms  "
                      f"{k['total_s']:5.2f} s in all", flush=True)
            if not c:
                print(f"      (no checkpoint lines; stderr ends: {r['stderr_tail']!r})")
            if r["sum"] != rows["plain"][-1]["sum"]:
                print(f"  WARNING: checksums differ: {r['sum']} vs {rows['plain'][-1]['sum']}")
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "work_s")} for k, v in rows.items()}
        ovh = {m: (med["checkpointed"][m] / med["plain"][m] - 1) * 100 for m in ("wall_s", "work_s")}
        if a.supervised:
            sup = (med["supervised"]["work_s"] / med["plain"]["work_s"] - 1) * 100
            print(f"supervised without checkpoints: work time {sup:+.2f}% vs plain")
        allc = [k for r in rows["checkpointed"] for k in r["checkpoints"]]
        summary = {
            "mib": a.mib, "fraction": a.fraction, "interval_s": a.interval, "step_s": step_s,
            "steps": a.steps, "repeat": a.repeat, "median": med, "overhead_pct": ovh,
            "checkpoints_per_run": statistics.median(len(r["checkpoints"]) for r in rows["checkpointed"]),
            "runs": rows,
        }
        print(f"overhead (median of {a.repeat}): work time {ovh['work_s']:+.2f}%, wall time {ovh['wall_s']:+.2f}% "
              f"(plain work {med['plain']['work_s']:.2f} s, checkpointed {med['checkpointed']['work_s']:.2f} s)")
        if allc:
            big = [k for k in allc if k["mib"] > a.mib * 0.5]
            small = [k for k in allc if k["mib"] <= a.mib * 0.5]
            for name, ks in (("full", big), ("incremental", small)):
                if ks:
                    print(f"  {name:12s} checkpoints: {len(ks):3d}, median {statistics.median(k['mib'] for k in ks):7.1f} MiB, "
                          f"frozen median {statistics.median(k['frozen_s'] for k in ks) * 1000:.0f} ms "
                          f"(max {max(k['frozen_s'] for k in ks) * 1000:.0f}), "
                          f"total median {statistics.median(k['total_s'] for k in ks):.2f} s")
            frozen = sum(k["frozen_s"] for k in allc) / a.repeat
            print(f"  frozen per run: {frozen:.2f} s = {frozen / med['plain']['work_s'] * 100:.2f}% of the plain work time")
            summary["frozen_per_run_s"] = frozen
        return summary
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- requeue -----------------------------------------------------------------------------
def cluster(cmd: str, state: Path, env: dict) -> None:
    p = subprocess.run(["bash", str(CLUSTER_SH), cmd, str(state)], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"cluster.sh {cmd}: exit {p.returncode}\n{p.stderr}\n{p.stdout}")


def node_back(node: str, state: Path, env: dict, timeout: float = 60) -> None:
    """Restart a crashed node's slurmd. cluster.sh start does that but then waits for
    both nodes to be idle, and the other one runs the job: stop waiting once ours is."""
    p = subprocess.Popen(["bash", str(CLUSTER_SH), "start", str(state)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            q = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], env={**env, "SLURM_CONF": str(state / "slurm.conf")},
                               capture_output=True, text=True, check=False)
            if set(q.stdout.split()) == {"idle"}:   # one line per partition
                return
            time.sleep(0.5)
        raise RuntimeError(f"{node} not idle {timeout} s after restarting its slurmd")
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait()


def stamps(out: Path) -> list[tuple[int, float]]:
    res = []
    for ln in out.read_text(errors="replace").splitlines():
        m = re.match(r"step (\d+) t=([\d.]+)$", ln)
        if m:
            res.append((int(m[1]), float(m[2])))
    return res


def a_step(out: Path) -> float:
    """The job's seconds per step, from its first lines."""
    s = stamps(out)[:20]
    return max(0.05, (s[-1][1] - s[0][1]) / (len(s) - 1)) if len(s) > 1 else 0.5


def count_ckpts(store: Path, job: int) -> int:
    return len(list((store / f"slurm-{job}").glob("0*")))


def one_interruption(backend, job, out, err, store, how, state, conf, timeout=150) -> dict:
    """Interrupt the running job (requeue or node crash) and time its comeback."""
    before = backend.load(job)
    gen = before.restart_count
    n_resumed = err.read_text(errors="replace").count("resumed from")
    # a fresh checkpoint after the last (re)start, so there is something recent to resume
    n = count_ckpts(store, job)
    deadline = time.monotonic() + 60
    while count_ckpts(store, job) < n + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    last_printed = stamps(out)[-1][0]
    if how == "requeue":
        backend.requeue(job)
    else:
        pid = int((state / "run" / f"slurmd-{before.batch_host}.pid").read_text())
        sys.path.insert(0, str(ROOT))
        from tests.slurm_cluster.jobs import kill_node
        kill_node(pid, job, conf)
    t_running = t_resumed = host = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and t_resumed is None:
        if t_running is None:
            j = backend.load(job)
            if j.restart_count > gen and j.state == "RUNNING":
                t_running = time.time()
                host = j.batch_host
        if err.read_text(errors="replace").count("resumed from") > n_resumed:
            t_resumed = time.time()
            t_running = t_running or t_resumed
        time.sleep(0.05)
    if t_resumed is None:
        raise RuntimeError(f"job {job} not resumed {timeout} s after {how}:\n{err.read_text()[-2000:]}")
    # the first step line the resumed run prints: the one after the largest gap in the
    # stamps of the lines from just before the interruption on (lines printed after the
    # last checkpoint were rolled back with the file by then)
    deadline = time.monotonic() + 60
    first = None
    while first is None and time.monotonic() < deadline:
        near = [(k, t) for k, t in stamps(out) if t > t0 - 10]
        gaps = [(near[i + 1][1] - near[i][1], near[i + 1]) for i in range(len(near) - 1)]
        if gaps and max(gaps)[0] > 4 * a_step(out):
            first = max(gaps)[1]
        else:
            time.sleep(0.2)
    r = {"how": how, "running_s": t_running - t0, "resumed_s": t_resumed - t0,
         "first_output_s": (first[1] - t0) if first else None,
         "resumed_at_step": first[0] if first else None,
         "steps_lost": (last_printed - first[0] + 1) if first else None,
         "host_before": before.batch_host, "host_after": host}
    print(f"  {how:8s} {r['host_before']}->{r['host_after']}: RUNNING +{r['running_s']:5.1f} s, "
          f"'resumed from' +{r['resumed_s']:5.1f} s, first new step line +"
          + (f"{r['first_output_s']:5.1f} s (step {first[0]}; {r['steps_lost']} step(s) redone)"
             if first else "?"), flush=True)
    return r


def requeue(a) -> dict:
    state = Path(tempfile.mkdtemp(prefix="hpcckpt-bench-slurm-", dir="/tmp"))
    os.chmod(state, 0o755)  # munged (user munge) must traverse it
    work = Path(tempfile.mkdtemp(prefix="bench-requeue-", dir=a.dir))
    env = {**os.environ, "HPCCKPT_SLURM_PORT_BASE": str(a.port_base)}
    conf = state / "slurm.conf"
    results: list[dict] = []
    try:
        exe = build(work)
        iters = iters_for(exe, a.job_step)
        steps = int(3600 / a.job_step)   # longer than the benchmark; cancelled at the end
        t = time.monotonic()
        cluster("install", state, env)
        cluster("start", state, env)
        print(f"cluster up in {time.monotonic() - t:.1f} s ({state})", flush=True)
        backend = CommandsBackend(env={"SLURM_CONF": str(conf)})
        store, out, err = work / "store", work / "job.out", work / "job.err"
        script = (f"#!/bin/bash\nexec {sys.executable} -m hpcckpt.cli run --store {store} --every {a.interval} "
                  f"-- {exe} {a.job_mib} {a.fraction} {steps} {iters}\n")
        job = backend.submit(JobSubmitDescription(
            script=script, name="bench", output=str(out), error=str(err), requeue=True, time_limit=60,
            extra_options=["--open-mode=append", f"--chdir={ROOT}"]))
        backend.wait_state(job, {"RUNNING"}, timeout=60)
        print(f"job {job}: {a.job_mib} MiB, {a.fraction:.0%} rewritten per {a.job_step:g} s step, "
              f"checkpoints every {a.interval:g} s", flush=True)
        deadline = time.monotonic() + 60
        while count_ckpts(store, job) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no checkpoints: {err.read_text()[-2000:] if err.exists() else '(no err)'}")
            time.sleep(0.2)
        for _ in range(a.repeat):
            results.append(one_interruption(backend, job, out, err, store, "requeue", state, conf))
        for i in range(a.crashes):
            results.append(one_interruption(backend, job, out, err, store, "crash", state, conf))
            if i + 1 < a.crashes:
                node_back(results[-1]["host_before"], state, env)
        summary = {"job_mib": a.job_mib, "fraction": a.fraction, "interval_s": a.interval,
                   "job_step_s": a.job_step, "events": results}
        for how in ("requeue", "crash"):
            ev = [r for r in results if r["how"] == how]
            if not ev:
                continue
            print(f"{how} ({len(ev)}x): median [min-max] seconds from the {how}")
            for key, name in (("running_s", "job RUNNING again"), ("resumed_s", "'resumed from'"),
                              ("first_output_s", "first new output line")):
                v = [r[key] for r in ev if r[key] is not None]
                if v:
                    print(f"  {name:24s} {statistics.median(v):6.1f}  [{min(v):.1f}-{max(v):.1f}]")
                    summary[f"{how}_{key}"] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
        try:
            backend.cancel(job)
        except Exception as e:  # noqa: BLE001 - the cluster is stopped next anyway
            print(f"cancel: {e}")
        return summary
    finally:
        try:
            cluster("stop", state, env)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"warning: stopping the cluster: {e}")
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def save(name: str, data: dict) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_slurm_{name}.json").write_text(json.dumps(data, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--mib", type=int, default=1024)
    o.add_argument("--fraction", type=float, default=0.01, help="of the pages rewritten per step")
    o.add_argument("--interval", type=float, default=10, help="seconds between checkpoints")
    o.add_argument("--step-seconds", type=float, help="compute per step (default: --interval)")
    o.add_argument("--steps", type=int, default=12)
    o.add_argument("--repeat", type=int, default=1)
    o.add_argument("--supervised", action="store_true",
                   help="also run under hpcckpt run with no periodic checkpoint (tracking, supervision)")
    o.add_argument("--full", action="store_true", help="the issue's case: 4096 MiB, 1%% per 60 s step, "
                   "checkpoints every 60 s, 30 steps (~65 min)")
    r = sub.add_parser("requeue")
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--crashes", type=int, default=1)
    r.add_argument("--job-mib", type=int, default=64)
    r.add_argument("--fraction", type=float, default=0.01)
    r.add_argument("--job-step", type=float, default=0.5, help="seconds of compute per step")
    r.add_argument("--interval", type=float, default=2)
    r.add_argument("--port-base", type=int, default=18817, help="not the test suite's 17817")
    sub.add_parser("all")
    for p in (o, r):
        p.add_argument("--dir", default="/tmp", help="scratch directory for images and the store")
    a = ap.parse_args()
    if a.what == "all":
        save("overhead", overhead(o.parse_args([])))
        save("requeue", requeue(r.parse_args([])))
        return
    if a.what == "overhead" and a.full:
        a.mib, a.fraction, a.interval, a.steps, a.step_seconds = 4096, 0.01, 60, max(a.steps, 30), 60
    save(a.what, overhead(a) if a.what == "overhead" else requeue(a))


if __name__ == "__main__":
    main()
