"""Benchmarks of hpcckpt.store: checksum speed, publish overhead vs a plain copy,
compression (none/lz4/zstd-1/zstd-3: write+publish vs a plain copy, size ratio,
materialize speed) on realistic page data, catalog insert/lookup at 1k/10k/100k
checkpoints, directory latest() lookup.

    .venv/bin/python benchmarks/bench_store.py [--quick] [--dir DIR] [--mb 256] [--json out.json]
    .venv/bin/python benchmarks/bench_store.py --only compression --compress-mb 256,1024

DIR should be on the file system you care about (a shared one for real numbers); the
default is a temp dir. Everything it creates is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

from hpcckpt.store import Store
from hpcckpt.store.catalog import CatalogData, merge, publish_event
from hpcckpt.store.checksum import hash_file
from hpcckpt.store.layout import seq_name


def timeit(fn, repeat: int = 3) -> float:
    """Median wall time of fn() over `repeat` runs."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_checksum(mb: int) -> dict:
    buf = os.urandom(1 << 20) * mb
    t = timeit(lambda: xxhash.xxh3_128_hexdigest(buf))
    return {"xxh3_128_memory_GBps": round(len(buf) / t / 1e9, 2)}


def make_image_set(src: Path, mb: int) -> int:
    """A fake image set: a few message files and page files totalling `mb` MiB."""
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    total = 0
    for i in range(4):
        (src / f"core-{i}.img").write_bytes(rng.bytes(4096))
        total += 4096
    per = (mb << 20) // 4
    for i in range(4):
        data = rng.bytes(per)
        (src / f"pages-{i}.img").write_bytes(data)
        total += per
    return total


def copy_tree(src: Path, dst: Path, fsync: bool) -> None:
    dst.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        if fsync:
            fd = os.open(dst / f.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def bench_publish(base: Path, mb: int, repeat: int) -> dict:
    src = base / "src"
    nbytes = make_image_set(src, mb)
    plain, plain_sync, store_t, publish_only = [], [], [], []
    store = Store(base / "store")
    def store_write(k: int) -> None:
        t = time.perf_counter()
        w = store.begin("bench", 0)
        for f in sorted(src.iterdir()):
            shutil.copyfile(f, w.path / f.name)
        t1 = time.perf_counter()
        w.publish({"nprocs": 1, "memory_bytes": nbytes})
        store_t.append(time.perf_counter() - t)
        publish_only.append(time.perf_counter() - t1)

    def plain_write(k: int, fsync: bool) -> None:
        t = time.perf_counter()
        copy_tree(src, base / f"plain{fsync}{k}", fsync=fsync)
        (plain_sync if fsync else plain).append(time.perf_counter() - t)

    for k in range(repeat):
        # each variant starts with no dirty pages (os.sync) so none pays for another's writeback
        variants = [lambda: plain_write(k, False), lambda: plain_write(k, True), lambda: store_write(k)]
        for variant in variants[k % 3:] + variants[:k % 3]:     # rotate the order between repeats
            os.sync()
            variant()
        os.sync()
        shutil.rmtree(base / f"plain{False}{k}"); shutil.rmtree(base / f"plain{True}{k}")
    ckpt = store.latest("bench")
    t_hash = timeit(lambda: [hash_file(ckpt.path / f.name) for f in ckpt.path.iterdir() if f.suffix == ".img"], repeat)
    t_verify = timeit(lambda: store.verify(ckpt, record=False), repeat)
    m = statistics.median
    return {
        "image_MiB": round(nbytes / 2**20, 1),
        "plain_copy_s": round(m(plain), 3), "plain_copy_fsync_s": round(m(plain_sync), 3),
        "store_write_publish_s": round(m(store_t), 3), "publish_only_s": round(m(publish_only), 3),
        "ratio_vs_plain_copy": round(m(store_t) / m(plain), 2),
        "ratio_vs_plain_copy_fsync": round(m(store_t) / m(plain_sync), 2),
        "hash_files_hot_GBps": round(nbytes / t_hash / 1e9, 2),
        "verify_hot_GBps": round(nbytes / t_verify / 1e9, 2),
    }


#: A numpy program with the state mix of a simulation code: smooth float64 fields (full
#: mantissas), a mostly-zero field with hot regions, random particle data, sorted int64
#: neighbour indices. It prints READY and sleeps until it is dumped.
STATE_PROGRAM = r"""
import sys, time
import numpy as np
mb = int(sys.argv[1])
n = max(1, (mb << 20) // 8 // 5)
rng = np.random.default_rng(1)
side = int(n ** 0.5)
x = np.linspace(0, 8 * np.pi, side)
smooth = np.resize((np.sin(x)[:, None] * np.cos(0.7 * x)[None, :] * np.exp(-x / 20)[:, None]).ravel(), n)
heat = np.zeros(n); heat[n // 8: n // 4] = 100.0; heat[n // 2: n // 2 + n // 16] = 50.0
for _ in range(20):
    heat[1:-1] += 0.2 * (heat[:-2] + heat[2:] - 2 * heat[1:-1])
particles = rng.standard_normal(n)
neigh = np.sort(rng.integers(0, 1 << 20, n))
velocity = smooth * 0.5 + rng.standard_normal(n) * 1e-3
print("READY", flush=True)
time.sleep(600)
"""


def dump_numpy_process(base: Path, mb: int) -> list[Path]:
    """Dump a real numpy process of about `mb` MiB state; its page files."""
    prog = subprocess.Popen([sys.executable, "-c", STATE_PROGRAM, str(mb)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert prog.stdout is not None and prog.stdout.readline().strip() == b"READY"
        images = base / f"dump{mb}"
        subprocess.run([sys.executable, "-m", "hpcckpt.cli", "-q", "dump", "--pid", str(prog.pid), "--images",
                        str(images), "--leave-running"], check=True, stdout=subprocess.DEVNULL)
    finally:
        prog.kill()
        prog.wait()
    return sorted(images.glob("pages-*.img"))


def make_realistic_set(base: Path, name: str, mb: int) -> tuple[Path, int]:
    """An image set of `mb` MiB: half the page bytes of a real numpy process dump (tiled if
    the dump is smaller), half random; plus the dump's message files."""
    pages = dump_numpy_process(base, mb // 2)
    src = base / name
    src.mkdir()
    half = (mb << 20) // 2
    dumped = b"".join(p.read_bytes() for p in pages)
    real = (dumped * (half // max(1, len(dumped)) + 1))[:half]
    (src / "pages-1000.img").write_bytes(real)
    del dumped, real
    rng = np.random.default_rng(3)
    with open(src / "pages-1001.img", "wb") as f:
        for _ in range(half >> 24):
            f.write(rng.bytes(16 << 20))
    for p in pages[0].parent.glob("*.img"):
        if not p.name.startswith("pages-"):
            shutil.copyfile(p, src / p.name)
    shutil.rmtree(pages[0].parent)
    return src, sum(f.stat().st_size for f in src.iterdir())


def bench_compression(base: Path, mbs: list[int], repeat: int, codecs: list[str]) -> list[dict]:
    """Per size and codec: write + publish into a store with that setting, as a ratio to a
    plain copy (and a plain copy + fsync) of the same bytes to the same file system, all in
    the same run with the order rotated; the stored/plain size ratio; materialize speed."""
    out = []
    for mb in mbs:
        src, nbytes = make_realistic_set(base, f"real{mb}", mb)
        stores = {c: Store(base / f"store-{mb}-{c}", compression=c) for c in codecs}
        times: dict[str, list[float]] = {k: [] for k in ["plain", "plain_fsync", *codecs]}

        def store_write(codec: str) -> None:
            t = time.perf_counter()
            w = stores[codec].begin("bench", 0)
            for f in sorted(src.iterdir()):
                shutil.copyfile(f, w.path / f.name)
            w.publish({"nprocs": 1, "memory_bytes": nbytes})
            times[codec].append(time.perf_counter() - t)

        def plain_write(k: int, fsync: bool) -> None:
            t = time.perf_counter()
            copy_tree(src, base / f"plain{fsync}{k}", fsync=fsync)
            times["plain_fsync" if fsync else "plain"].append(time.perf_counter() - t)

        for k in range(repeat):
            variants = [lambda: plain_write(k, False), lambda: plain_write(k, True)]
            variants += [lambda c=c: store_write(c) for c in codecs]
            r = k % len(variants)
            for variant in variants[r:] + variants[:r]:
                os.sync()
                variant()
            os.sync()
            shutil.rmtree(base / f"plain{False}{k}"); shutil.rmtree(base / f"plain{True}{k}")
            if k < repeat - 1:
                for st in stores.values():
                    shutil.rmtree(st.job_dir("bench"))
        m = statistics.median
        row: dict = {"image_MiB": round(nbytes / 2**20), "plain_copy_s": round(m(times["plain"]), 3),
                     "plain_copy_fsync_s": round(m(times["plain_fsync"]), 3), "codecs": {}}
        os.environ["HPCCKPT_TMPDIR"] = str(base)      # materialize onto the same file system
        for c in codecs:
            ckpt = stores[c].latest("bench")
            raw_pages = sum(f.stat().st_size for f in src.glob("pages-*.img"))
            stored_pages = sum(f.stat().st_size for f in ckpt.path.glob("pages-*.img*"))
            stored_real = sum(f.stat().st_size for f in ckpt.path.glob("pages-1000.img*"))
            mats = []
            for _ in range(max(1, repeat - 1)):
                os.sync()
                t = time.perf_counter()
                with stores[c].materialize(ckpt):
                    mats.append(time.perf_counter() - t)
            row["codecs"][c] = {
                "write_publish_s": round(m(times[c]), 3),
                "ratio_vs_plain_copy": round(m(times[c]) / m(times["plain"]), 2),
                "ratio_vs_plain_copy_fsync": round(m(times[c]) / m(times["plain_fsync"]), 2),
                "write_GBps": round(nbytes / m(times[c]) / 1e9, 3),
                "stored_over_plain": round(ckpt.image_bytes / nbytes, 3),
                "stored_over_plain_pages": round(stored_pages / raw_pages, 3),
                "stored_over_plain_real_half": round(stored_real / (raw_pages / 2), 3),
                "materialize_s": round(m(mats), 3),
                "materialize_GBps": round(nbytes / m(mats) / 1e9, 3) if m(mats) > 0.001 else None,
                "materialize_vs_plain_copy": round(m(mats) / m(times["plain"]), 2),
            }
        os.environ.pop("HPCCKPT_TMPDIR")
        out.append(row)
        for st in stores.values():
            shutil.rmtree(st.root)
        shutil.rmtree(src)
    return out


def synthetic_catalog(n: int, per_job: int = 100) -> CatalogData:
    events = []
    now = time.time()
    for i in range(n):
        job, seq = f"job{i // per_job:05d}", i % per_job + 1
        row = {"job": job, "seq": seq, "generation": 0, "parent": seq - 1 if seq % 4 else -1,
               "time": now + i, "created": now + i - 1, "host": f"node{i % 64:03d}", "nprocs": 8,
               "memory_bytes": 1 << 30, "image_bytes": 1 << 28, "nfiles": 12, "pages_written": 65536,
               "freeze_s": 0.1, "dump_s": 1.5, "write_s": 1.2, "backend": "ptrace", "status": 1, "verified_at": None}
        events.append(publish_event(row, {"dirty_pages": np.arange(16, dtype=np.int64)}))
    return merge(CatalogData(), events)


def bench_catalog(base: Path, sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        root = base / f"cat{n}"
        store = Store(root, fold_every=0)        # fold by hand below
        data = synthetic_catalog(n)
        t = time.perf_counter(); store.catalog._write(data); t_write = time.perf_counter() - t
        job = "job%05d" % ((n - 1) // 100)
        t_latest = timeit(lambda: store.catalog.latest_seq(job), 20)
        t_read = timeit(lambda: store.catalog.read(), 3)
        t_list = timeit(lambda: store.list(job), 5)
        # inserting: one journal file per publish, folded every 32 publishes
        ev = publish_event({"job": job, "seq": 1000, "status": 1, "time": time.time(), "parent": -1}, {})
        appends = []
        for k in range(32):
            ev["row"]["seq"] = 1000 + k
            t = time.perf_counter(); store.catalog.record(job, ev, fold=False); appends.append(time.perf_counter() - t)
        t_latest_pending = timeit(lambda: store.catalog.latest_seq(job), 20)
        t = time.perf_counter(); store.catalog.fold(); t_fold = time.perf_counter() - t
        out.append({
            "checkpoints": n, "catalog_MiB": round(store.catalog.path.stat().st_size / 2**20, 2),
            "write_whole_catalog_ms": round(t_write * 1e3, 1),
            "insert_journal_ms": round(statistics.median(appends) * 1e3, 2),
            "fold_32_events_ms": round(t_fold * 1e3, 1),
            "insert_amortized_ms": round(statistics.median(appends) * 1e3 + t_fold * 1e3 / 32, 2),
            "catalog_latest_ms": round(t_latest * 1e3, 2),
            "catalog_latest_with_32_pending_ms": round(t_latest_pending * 1e3, 2),
            "list_one_job_ms": round(t_list * 1e3, 1),
            "read_whole_catalog_ms": round(t_read * 1e3, 1),
        })
        shutil.rmtree(root)
    return out


def bench_dir_latest(base: Path, sizes: list[int]) -> list[dict]:
    """latest() straight from the directories, with n checkpoint dirs in one job."""
    out = []
    for n in sizes:
        store = Store(base / f"dirs{n}")
        job_dir = store.job_dir("big")
        job_dir.mkdir()
        for s in range(1, n):                    # bulk: empty dirs stand for old checkpoints
            os.mkdir(job_dir / seq_name(s))
        st = store.state("big"); st.last_seq = n - 1; st.generation = 0; st.save(job_dir)
        w = store.begin("big", 0)
        (w.path / "pages-1.img").write_bytes(b"x" * 4096)
        w.publish({})
        t = timeit(lambda: store.latest("big"), 20)
        t_small = time.perf_counter()
        for _ in range(20):                      # publish cost of a tiny image set, fsyncs included
            w = store.begin("big", 0)
            (w.path / "pages-1.img").write_bytes(b"x" * 4096)
            w.publish({})
        out.append({"checkpoint_dirs": n, "latest_ms": round(t * 1e3, 2),
                    "tiny_publish_ms": round((time.perf_counter() - t_small) / 20 * 1e3, 2)})
        shutil.rmtree(base / f"dirs{n}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--dir", help="where to write (default: a temp dir)")
    ap.add_argument("--mb", type=int, default=None, help="image set size in MiB (default 256, quick 32)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--only", action="append", choices=["checksum", "publish", "compression", "catalog", "dir_latest"],
                    help="run only these parts (repeatable)")
    ap.add_argument("--compress-mb", help="comma-separated image set sizes for the compression part "
                    "(default 256,1024; quick 64)")
    ap.add_argument("--codecs", default="none,lz4,zstd-1,zstd-3")
    args = ap.parse_args()
    mb = args.mb or (32 if args.quick else 256)
    cmbs = [int(x) for x in (args.compress_mb or ("64" if args.quick else "256,1024")).split(",")]
    sizes = [1000, 10000] if args.quick else [1000, 10000, 100000]
    base = Path(tempfile.mkdtemp(prefix="bench_store.", dir=args.dir))
    parts = {
        "checksum": lambda: bench_checksum(min(mb, 256)),
        "publish": lambda: bench_publish(base, mb, 3 if args.quick else 5),
        "compression": lambda: bench_compression(base, cmbs, 2 if args.quick else 3, args.codecs.split(",")),
        "catalog": lambda: bench_catalog(base, sizes),
        "dir_latest": lambda: bench_dir_latest(base, sizes),
    }
    try:
        results = {name: fn() for name, fn in parts.items() if not args.only or name in args.only}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
