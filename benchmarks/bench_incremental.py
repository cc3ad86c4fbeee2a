"""Incremental checkpoints, per tracking backend that works here, against the same-run
baseline: copying the same bytes from memory to a file in the same directory (fsynced).

A process (tests/tracking's pagewriter) writes SIZE of anonymous memory once; then, per
interval, a random 0.1%, 1% or 10% of its pages are rewritten (each page chosen
independently: scattered single pages, the hard case) and it is checkpointed:

* incremental dump: image bytes vs rewritten bytes, checkpoint time, time paused;
* pre-copy: an incremental pre-dump (copies while the job runs), the same fraction
  rewritten, then the final dump: the job is paused only for the last changes;
* live snapshot (fork route, engine/snapshot.py): full, and incremental at 1%;
* `--pause-aims`: only what the job is paused for, old route against new in the same
  run, alternating, `--reps` times: live full snapshots by fork vs by write-protect
  (engine/wpsnapshot.py), and final dumps after a pre-dump without vs with pre-copy
  rounds (engine/precopy.py), per 100 MiB changed; `--busy` keeps the job writing
  (0.1% of its pages per command, back to back) during the final dumps;
* tracking slowdown: ns per first write to a page after a checkpoint re-armed tracking,
  minus a second write to the same pages right after (same process, same loop).

Soft-dirty is not measured here: this kernel has no CONFIG_MEM_SOFT_DIRTY; its backend
runs only in the QEMU guest tests (tests/qemu_guest), whose emulated CPU makes timings
meaningless. Also measured: the scattered-run copy per process_vm_readv call vs batched.

    .venv/bin/python benchmarks/bench_incremental.py [--mib 4096] [--dir DIR] [--png docs/x.png]
    .venv/bin/python benchmarks/bench_incremental.py --replot out/bench_incremental.json [--write-cost] --png P
    .venv/bin/python benchmarks/bench_incremental.py --pause-aims [--reps 3] [--busy] [--png docs/pause-aims.png]
"""
import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hpcckpt.engine import memory                             # noqa: E402
from hpcckpt.engine.dump import dump                          # noqa: E402
from hpcckpt.engine.incremental import TreeTracker            # noqa: E402
from hpcckpt.tracking.select import probe                     # noqa: E402
from tests.tracking.helpers import Target                     # noqa: E402

PAGE = 4096
FRACTIONS = (0.001, 0.01, 0.10)
BACKENDS = ("uffd-wp", "hashing")


def file_limit(where: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` of (touched) memory to a file there, fsynced."""
    buf = mmap.mmap(-1, 4 << 20)
    buf.write(os.urandom(4 << 20))
    path = where / "limit.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    done = 0
    while done < nbytes:
        done += os.write(fd, buf[:min(len(buf), nbytes - done)])
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


class Job:
    """The pagewriter with SIZE written once; `rewrite` changes a random fraction."""

    def __init__(self, npages: int):
        self.t = Target()
        self.npages = npages
        self.base = self.t.alloc(npages)
        self.seed = 0

    def _z(self, permille: float) -> tuple[int, int]:
        self.seed += 1
        count, ns = self.t.cmd(f"z {self.base:x} {self.npages} {permille:g} {self.seed}").split()
        return int(count), int(ns)

    def rewrite(self, fraction: float) -> tuple[int, float]:
        """(pages written, ns per page the first write cost beyond a second write to the
        same pages: what tracking adds, the loop's own cost cancelled in the same run)."""
        count, first = self._z(fraction * 1000)
        self.seed -= 1
        _, second = self._z(fraction * 1000)
        return count, (first - second) / max(count, 1)

    def close(self) -> None:
        self.t.close()


def _row(kind: str, backend: str, frac: float | None, r, rewritten: int, limit: float, **kw) -> dict:
    row = {"kind": kind, "backend": backend, "fraction": frac, "rewritten": rewritten,
           "image": r.pages_bytes, "total_s": r.total_s, "frozen_s": r.frozen_s, "limit_s": limit,
           "tracking": r.tracking, "snapshot": r.snapshot, "spans": r.spans, **kw}
    ratio = r.pages_bytes / rewritten if rewritten else float("nan")
    per100 = r.frozen_s * 1e3 / (rewritten / (100 << 20)) if rewritten else float("nan")
    print(f"{backend:8s} {kind:22s} {('%.1f%%' % (frac * 100)) if frac else '-':>6s} "
          f"rewritten {rewritten / 2**20:8.1f} MiB image {r.pages_bytes / 2**20:8.1f} MiB ({ratio:5.3f}x) "
          f"time {r.total_s * 1e3:7.0f} ms ({r.total_s / limit:5.2f}x limit {limit * 1e3:.0f} ms) "
          f"paused {r.frozen_s * 1e3:7.1f} ms ({per100:6.1f} ms/100 MiB)"
          + (f" first write +{kw['write_ns']:.0f} ns" if "write_ns" in kw else ""), flush=True)
    print_spans(r)
    return row


def print_spans(r) -> None:
    """Where the dump's time went (DumpResult.spans), the frozen part first."""
    before, frozen, after, seen_thaw = [], [], [], False
    for name, s in r.spans.items():
        seen_thaw |= name == "thaw"
        if name in ("freeze", "thaw") or s < 0.0005:
            continue
        part = before if name.endswith("(running)") else after if seen_thaw else frozen
        part.append(f"{name.removeprefix('frozen: ').removesuffix(' (running)')} {s * 1e3:.0f}")
    print(f"{'':9s} " + (f"before the freeze (running): {', '.join(before)} ms | " if before else "")
          + f"frozen{' (pages from a fork after the thaw)' if r.snapshot else ''}: "
          + ", ".join(frozen) + " ms | after the thaw: " + ", ".join(after) + " ms", flush=True)


def one_backend(name: str, mib: int, where: Path) -> list[dict]:
    job = Job(mib * 256)
    rows = []
    tt = TreeTracker(backend=name)
    imgs: list[Path] = []

    def img(tag: str) -> Path:
        p = where / f"{name}-{len(imgs)}-{tag}"
        imgs.append(p)
        return p

    try:
        r = dump(job.t.pid, img("full"), leave_running=True, tracker=tt, show_progress=False)
        rows.append(_row("full", name, None, r, mib << 20, file_limit(where, r.pages_bytes)))
        prev = imgs[-1]
        for f in FRACTIONS:
            count, ns = job.rewrite(f)
            r = dump(job.t.pid, img("inc"), leave_running=True, tracker=tt, parent=prev, show_progress=False)
            assert r.tracking == name, (r.tracking, r.notes)
            rows.append(_row("incremental", name, f, r, count * PAGE, file_limit(where, r.pages_bytes),
                             write_ns=ns))
            prev = imgs[-1]
            # pre-copy: pre-dump while running, the job writes as much again, final dump
            pre_img = img("pre")
            pre = dump(job.t.pid, pre_img, pre_dump=True, tracker=tt, parent=prev, show_progress=False)
            count, _ = job.rewrite(f)
            r = dump(job.t.pid, img("fin"), leave_running=True, tracker=tt, parent=pre_img,
                     show_progress=False)
            rows.append(_row("final after pre-dump", name, f, r, count * PAGE,
                             file_limit(where, r.pages_bytes), pre_dump_s=pre.total_s,
                             pre_dump_frozen_s=pre.frozen_s))
            prev = imgs[-1]
        if name == BACKENDS[0]:
            count, _ = job.rewrite(0.01)
            r = dump(job.t.pid, img("live-inc"), live=True, tracker=tt, parent=prev, show_progress=False)
            rows.append(_row("live incremental", name, 0.01, r, count * PAGE, file_limit(where, r.pages_bytes)))
            tt.close()
            for p in imgs:                 # room for the full live snapshot
                shutil.rmtree(p, ignore_errors=True)
            r = dump(job.t.pid, img("live-full"), live=True, show_progress=False)
            rows.append(_row("live full", name, None, r, mib << 20, file_limit(where, r.pages_bytes)))
    finally:
        tt.close()
        job.close()
        for p in imgs:
            shutil.rmtree(p, ignore_errors=True)
    return rows


class Busy:
    """Keeps the job writing (0.1% of its pages per command, back to back) while on."""

    def __init__(self, job: Job):
        self.job, self.on, self.pages = job, True, 0
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while self.on:
            self.pages += self.job._z(1)[0]

    def stop(self) -> int:
        self.on = False
        self.th.join()
        return self.pages


def _pause_row(kind: str, route: str, frac, r, rewritten: int, busy: int = 0) -> dict:
    per100 = r.frozen_s * 1e3 / (rewritten / (100 << 20)) if rewritten else float("nan")
    print(f"{kind:22s} {route:12s} {('%.1f%%' % (frac * 100)) if frac else '-':>6s} paused "
          f"{r.frozen_s * 1e3:7.1f} ms (+{r.stops_before_s * 1e3:.1f} ms before the freeze)"
          + (f" = {per100:6.1f} ms/100 MiB changed" if rewritten else "")
          + f", image {r.pages_bytes / 2**20:.1f} MiB, time {r.total_s:.2f} s"
          + (f", job wrote {busy} pages meanwhile" if busy else "") + f"; load {os.getloadavg()[0]:.1f}",
          flush=True)
    print_spans(r)
    return {"kind": kind, "route": route, "fraction": frac, "rewritten": rewritten, "frozen_s": r.frozen_s,
            "before_s": r.stops_before_s, "image": r.pages_bytes, "total_s": r.total_s, "busy": busy,
            "notes": r.notes, "spans": r.spans, "load": os.getloadavg()[0]}


def pause_aims(mib: int, where: Path, reps: int, busy: bool) -> list[dict]:
    """Live snapshot pause (fork vs uffd write-protect) and pre-copy final pause (no
    rounds vs rounds), alternating in one run on one job."""
    job = Job(mib * 256)
    rows: list[dict] = []
    try:
        for _ in range(reps):
            for route in ("fork", "uffd"):
                img = where / f"live-{route}"
                r = dump(job.t.pid, img, live=True, live_route=route, show_progress=False)
                assert r.live_route == route, (r.live_route, r.notes)
                rows.append(_pause_row("live full", route, None, r, 0))
                shutil.rmtree(img, ignore_errors=True)
        tt = TreeTracker(backend="uffd-wp")
        prev = where / "base"
        dump(job.t.pid, prev, leave_running=True, tracker=tt, show_progress=False)
        k = 0
        for f in FRACTIONS:
            for _ in range(reps):
                for rounds in (False, True):
                    k += 1
                    pre = where / f"pre-{k}"
                    dump(job.t.pid, pre, pre_dump=True, tracker=tt, parent=prev, show_progress=False)
                    count, _ = job.rewrite(f)
                    b = Busy(job) if busy else None
                    fin = where / f"fin-{k}"
                    try:
                        r = dump(job.t.pid, fin, leave_running=True, tracker=tt, parent=pre,
                                 precopy=rounds, show_progress=False)
                    finally:
                        wrote = b.stop() if b else 0
                    rows.append(_pause_row("final after pre-dump", "rounds" if rounds else "no rounds",
                                           f, r, count * PAGE, wrote))
                    prev = fin
        tt.close()
    finally:
        job.close()
        for p in where.iterdir():
            shutil.rmtree(p, ignore_errors=True)
    _summary(rows)
    return rows


def _summary(rows: list[dict]) -> None:
    def med(sel, key="frozen_s"):
        v = [r[key] for r in rows if sel(r)]
        return statistics.median(v) if v else float("nan")
    for route in ("fork", "uffd"):
        m = med(lambda r: r["kind"] == "live full" and r["route"] == route)
        mb = med(lambda r: r["kind"] == "live full" and r["route"] == route, "before_s")
        print(f"live full, {route}: median paused {m * 1e3:.1f} ms (+{mb * 1e3:.1f} ms before)")
    for f in FRACTIONS:
        out = []
        for route in ("no rounds", "rounds"):
            sel = lambda r: r["kind"] == "final after pre-dump" and r["route"] == route and r["fraction"] == f  # noqa: E731
            m = med(sel)
            mb = med(sel, "rewritten")
            out.append(m)
            print(f"final after pre-dump {f * 100:g}%, {route}: median paused {m * 1e3:.1f} ms = "
                  f"{m * 1e3 / (mb / (100 << 20)):.1f} ms per 100 MiB changed")
        print(f"  rounds / no rounds: {out[1] / out[0]:.2f}")


def plot_pauses(rows: list[dict], mib: int, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, route in enumerate(("fork", "uffd")):
        v = [r["frozen_s"] * 1e3 for r in rows if r["kind"] == "live full" and r["route"] == route]
        vb = [(r["frozen_s"] + r["before_s"]) * 1e3 for r in rows if r["kind"] == "live full" and r["route"] == route]
        ax[0].scatter([i] * len(v), v, marker="o", label=f"{route}: frozen")
        if any(r["before_s"] for r in rows if r["route"] == route):
            ax[0].scatter([i + 0.1] * len(vb), vb, marker="x", label=f"{route}: frozen + stop before")
    ax[0].axhline(20, color="red", ls=":", label="aim: 20 ms")
    ax[0].set_xticks([0, 1], ["fork (old)", "uffd write-protect"])
    ax[0].set_ylabel("job paused (ms)")
    ax[0].set_title(f"live full snapshot of {mib} MiB")
    pct = [f * 100 for f in FRACTIONS]
    for route, mark in (("no rounds", "o"), ("rounds", "s")):
        med = []
        for f in FRACTIONS:
            v = [r["frozen_s"] * 1e3 / (r["rewritten"] / (100 << 20)) for r in rows
                 if r["kind"] == "final after pre-dump" and r["route"] == route and r["fraction"] == f]
            ax[1].scatter([f * 100] * len(v), v, marker=mark, alpha=0.5)
            med.append(statistics.median(v) if v else float("nan"))
        ax[1].plot(pct, med, marker=mark, label=f"{route}{' (old)' if route == 'no rounds' else ''}: median")
    ax[1].axhline(10, color="red", ls=":", label="aim: 10 ms per 100 MiB")
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xticks(pct, [f"{p:g}%" for p in pct])
    ax[1].set_xlabel("pages rewritten after the pre-dump")
    ax[1].set_ylabel("paused per 100 MiB changed (ms)")
    ax[1].set_title("final dump after a pre-dump")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"plot {png}")


def batching(where: Path, mib: int = 1024, fraction: float = 0.10, reps: int = 3) -> dict:
    """Scattered single-page runs (a random 10% of 1 GiB) copied to a file: one
    process_vm_readv + write per run (before) vs many runs per call (now)."""
    job = Job(mib * 256)
    try:
        job.rewrite(fraction)
        import numpy as np
        from hpcckpt.kernel import proc
        mask = np.zeros(job.npages, bool)
        mask[np.random.default_rng(1).choice(job.npages, int(job.npages * fraction), replace=False)] = True
        runs = [(job.base + a * PAGE, k * PAGE) for a, k in proc.runs(mask)]
        nbytes = sum(n for _, n in runs)
        out: dict[str, list[float]] = {"per-run": [], "batched": [], "limit": []}
        for i in range(2 * reps):
            mode = "batched" if i % 2 else "per-run"
            fd = os.open(where / "batch.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            w = memory.PageWriter(job.t.pid, fd)
            t0 = time.perf_counter()
            if mode == "batched":
                w.copy_runs(runs)
            else:
                for a, n in runs:
                    w.copy(a, n)
            os.fsync(fd)
            out[mode].append(time.perf_counter() - t0)
            w.close()
            os.close(fd)
            out["limit"].append(file_limit(where, nbytes))
        (where / "batch.bin").unlink()
        med = {k: statistics.median(v) for k, v in out.items()}
        print(f"copy of {len(runs)} scattered runs ({nbytes / 2**20:.0f} MiB): per-run "
              f"{med['per-run'] * 1e3:.0f} ms ({med['per-run'] / med['limit']:.2f}x limit), batched "
              f"{med['batched'] * 1e3:.0f} ms ({med['batched'] / med['limit']:.2f}x limit {med['limit'] * 1e3:.0f} ms)",
              flush=True)
        return {"runs": len(runs), "bytes": nbytes, **{k: v for k, v in med.items()}}
    finally:
        job.close()


def write_cost(rows: list[dict], mib: int, backends: list[str]) -> None:
    """Only the tracking cost per first write, per backend and fraction (no images): arm,
    rewrite, collect (re-arms), as the checkpoints do; updates the rows' write_ns."""
    from tests.tracking.helpers import arm, collect
    from hpcckpt.tracking.select import BACKENDS as TRACKERS
    for b in backends:
        job = Job(mib * 256)
        tr = TRACKERS[b]()
        try:
            arm(tr, job.t)
            for f in FRACTIONS:
                count, ns = job.rewrite(f)
                collect(tr, job.t)
                for r in rows:
                    if r["backend"] == b and r["fraction"] == f and r["kind"] == "incremental":
                        r["write_ns"] = ns
                print(f"{b:8s} {f * 100:4.1f}%: {count} pages, first write +{ns:.0f} ns", flush=True)
        finally:
            tr.disarm()
            job.close()


def plot(rows: list[dict], mib: int, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    pct = [f * 100 for f in FRACTIONS]
    for b, mark in zip(BACKENDS, ("o", "s")):
        inc = [r for r in rows if r["backend"] == b and r["kind"] == "incremental"]
        fin = [r for r in rows if r["backend"] == b and r["kind"] == "final after pre-dump"]
        if not inc:
            continue
        ax[0, 0].plot(pct, [r["image"] / r["rewritten"] for r in inc], marker=mark, label=b)
        ax[0, 1].plot(pct, [r["total_s"] / r["limit_s"] for r in inc], marker=mark, label=f"{b}: checkpoint")
        ax[0, 1].plot(pct, [r["frozen_s"] / r["limit_s"] for r in inc], marker=mark, ls="--",
                      label=f"{b}: paused")
        ax[1, 0].plot(pct, [r["frozen_s"] * 1e3 for r in inc], marker=mark, label=f"{b}: incremental dump")
        ax[1, 0].plot(pct, [r["frozen_s"] * 1e3 for r in fin], marker=mark, ls="--",
                      label=f"{b}: final dump after pre-dump")
        if b == BACKENDS[0]:
            ax[1, 0].plot(pct, [10 * r["rewritten"] / (100 << 20) for r in fin], color="grey", ls=":",
                          label="pre-copy aim: 10 ms per 100 MiB")
        ax[1, 1].plot(pct, [r["write_ns"] for r in inc], marker=mark, label=b)
    ax[0, 0].axhline(1.05, color="grey", ls=":", label="aim: 1.05")
    ax[0, 0].set_ylabel("image bytes / rewritten bytes")
    ax[0, 1].set_ylabel("time / memory-to-file copy of the image's bytes")
    ax[0, 1].set_yscale("log")
    live = [r for r in rows if r["kind"].startswith("live")]
    for r in live:
        ax[1, 0].axhline(r["frozen_s"] * 1e3, color="red" if "full" in r["kind"] else "orange", ls="-.",
                         label=f"{r['kind']} snapshot: {r['frozen_s'] * 1e3:.0f} ms")
    ax[1, 0].axhline(20, color="red", ls=":", label="live snapshot aim: 20 ms")
    ax[1, 0].set_ylabel("job paused (ms)")
    ax[1, 0].set_yscale("log")
    ax[1, 1].set_ylabel("ns per first write after a checkpoint, minus a second write")
    for a in ax.flat:
        a.set_xscale("log")
        a.set_xlabel("pages rewritten per interval (%)")
        a.set_xticks(pct, [f"{p:g}%" for p in pct])
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle(f"Incremental checkpoints of {mib} MiB written once (soft-dirty: not on this kernel)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"plot {png}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=4096)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-batching", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "bench_incremental.json"))
    ap.add_argument("--png", default=None, help="plot here (docs/incremental-bench.png for the docs)")
    ap.add_argument("--replot", metavar="JSON", help="only plot the results saved in JSON")
    ap.add_argument("--pause-aims", action="store_true", help="only the pauses, old route vs new (see above)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--busy", action="store_true", help="with --pause-aims: the job writes during final dumps")
    ap.add_argument("--write-cost", action="store_true",
                    help="with --replot: measure the first-write cost again (no images) into JSON")
    a = ap.parse_args()
    where = Path(a.dir or tempfile.mkdtemp(prefix="hpcckpt-bench-inc-"))
    where.mkdir(parents=True, exist_ok=True)
    works = {r.name: r for r in probe()}
    print(f"{a.mib} MiB written once; kernel {os.uname().release}; soft-dirty: "
          f"{'works' if works['soft-dirty'].works else 'not here (' + works['soft-dirty'].detail + ')'}")
    if a.pause_aims:
        if a.replot:
            d = json.loads(Path(a.replot).read_text())
            _summary(d["rows"])
        else:
            d = {"mib": a.mib, "busy": a.busy, "rows": pause_aims(a.mib, where, a.reps, a.busy)}
            out = Path(a.json).with_name(f"pause_aims{'_busy' if a.busy else ''}.json")
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(d, indent=1))
            print(f"written {out}")
        if a.png:
            plot_pauses(d["rows"], d["mib"], Path(a.png))
        return
    if a.replot:
        d = json.loads(Path(a.replot).read_text())
        if a.write_cost:
            write_cost(d["rows"], d["mib"], a.backends.split(","))
            Path(a.replot).write_text(json.dumps(d, indent=1))
        plot(d["rows"], d["mib"], Path(a.png or "incremental-bench.png"))
        return
    rows: list[dict] = []
    for b in a.backends.split(","):
        if not works[b].works:
            print(f"{b}: does not work here: {works[b].detail}")
            continue
        rows += one_backend(b, a.mib, where)
    result = {"mib": a.mib, "rows": rows,
              "batching": None if a.no_batching else batching(where)}
    Path(a.json).parent.mkdir(exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"written {a.json}")
    if a.png:
        plot(rows, a.mib, Path(a.png))
    shutil.rmtree(where, ignore_errors=True) if a.dir is None else None


if __name__ == "__main__":
    main()
