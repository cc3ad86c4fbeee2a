"""Incremental checkpoints: full vs incremental dump (image bytes, time, freeze time) for a
process holding 256 MiB / 1 GiB, with 1%, 10% and 100% of its pages rewritten since the
parent; pre-dump + final dump; live snapshot; all against the memory-to-file limit
measured in the same run (copying the same bytes from our own memory to a file in the
same directory). Uses tests/tracking's pagewriter (writes pages on command).

    .venv/bin/python benchmarks/bench_incremental.py [--sizes 256,1024] [--dir /tmp/x]
"""
import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hpcckpt.engine.dump import dump                          # noqa: E402
from hpcckpt.engine.incremental import TreeTracker            # noqa: E402
from tests.tracking.helpers import Target                     # noqa: E402

PAGE = 4096


def file_limit(where: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` of (touched) memory to a file there, fsynced."""
    buf = mmap.mmap(-1, 4 << 20)
    buf.write(os.urandom(4 << 20))
    path = where / "limit.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    done = 0
    while done < nbytes:
        done += os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def one_size(mib: int, where: Path) -> dict:
    npages = mib * 256
    limit = file_limit(where, mib << 20)
    out = {"mib": mib, "limit_s": limit, "cases": []}

    def rec(name, r, frac=None):
        out["cases"].append({"case": name, "fraction": frac, "image_bytes": r.pages_bytes,
                             "total_s": r.total_s, "frozen_s": r.frozen_s,
                             "total_vs_limit": r.total_s / limit, "frozen_vs_limit": r.frozen_s / limit})
        print(f"{mib:5d} MiB {name:24s} frac={frac!s:5s} image {r.pages_bytes / 2**20:8.1f} MiB "
              f"total {r.total_s * 1000:7.1f} ms frozen {r.frozen_s * 1000:7.1f} ms "
              f"(limit {limit * 1000:.0f} ms: {r.total_s / limit:.2f}x, frozen {r.frozen_s / limit:.3f}x)", flush=True)

    t = Target()
    try:
        base = t.alloc(npages)
        tt = TreeTracker()
        prev, k = None, 0
        for frac in (None, 0.01, 0.10, 1.0):
            if frac:
                step = max(1, int(1 / frac))
                t.write(base, npages // step, step)
            k += 1
            img = where / f"c{k}"
            r = dump(t.pid, img, leave_running=True, tracker=tt, parent=prev, show_progress=False)
            rec("full" if frac is None else "incremental uffd-wp", r, frac)
            prev = img
        t.write(base, npages // 10, 10)
        r = dump(t.pid, where / "h", leave_running=True, parent=prev, show_progress=False)
        rec("incremental hashing", r, 0.10)
        shutil.rmtree(where / "h")
        r = dump(t.pid, where / "f2", leave_running=True, show_progress=False)
        rec("full (reference)", r, None)
        shutil.rmtree(where / "f2")
        for i in range(1, k + 1):
            shutil.rmtree(where / f"c{i}")
        tt.close()
        tt = TreeTracker()
        pre = dump(t.pid, where / "pre", pre_dump=True, tracker=tt, show_progress=False)
        rec("pre-dump", pre, None)
        t.write(base, npages // 100, 100)
        fin = dump(t.pid, where / "fin", parent=where / "pre", tracker=tt, leave_running=True, show_progress=False)
        rec("final dump after pre-dump", fin, 0.01)
        tt.close()
        for d in ("pre", "fin"):
            shutil.rmtree(where / d)
        r = dump(t.pid, where / "live", live=True, show_progress=False)
        rec("live snapshot", r, None)
        shutil.rmtree(where / "live")
    finally:
        t.p.kill()
        t.p.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "bench_incremental.json"))
    a = ap.parse_args()
    where = Path(a.dir or tempfile.mkdtemp(prefix="hpcckpt-bench-inc-"))
    where.mkdir(parents=True, exist_ok=True)
    results = [one_size(int(s), where) for s in a.sizes.split(",")]
    Path(a.json).parent.mkdir(exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
