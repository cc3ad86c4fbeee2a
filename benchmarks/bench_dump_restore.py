"""Dump and restore of a process holding 256 MiB, 1 GiB and 4 GiB of written memory.

Prints seconds, GB/s, image bytes and the time the process was frozen, beside the
physical limit measured in the same run: writing the same bytes from memory to a file in
the same directory (for dump) and reading them back from that file into memory (for
restore). Usage: bench_dump_restore.py [--dir DIR] [--sizes 256,1024,4096] [--repeat N]
"""
import argparse
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcckpt.engine.dump import dump
from hpcckpt.engine.restore import restore

HERE = Path(__file__).resolve().parent


def build(tmp: Path) -> Path:
    exe = tmp / "memhog"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "memhog.c")], check=True)
    return exe


def limit_write(path: Path, nbytes: int) -> float:
    """memory -> file, with fsync, as the dump does."""
    buf = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        view = memoryview(buf)
        for off in range(0, nbytes, 64 << 20):
            f.write(view[off:off + (64 << 20)])
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    del view, buf
    return dt


def limit_read(path: Path, nbytes: int) -> float:
    """file (page cache) -> fresh memory (faulted in by the read), as a restore must."""
    t0 = time.perf_counter()
    buf = mmap.mmap(-1, nbytes)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        off = 0
        while off < nbytes:
            off += f.readinto(view[off:off + (64 << 20)])
    dt = time.perf_counter() - t0
    view.release()
    buf.close()
    return dt


def one(exe: Path, work: Path, mib: int) -> dict:
    nbytes = mib << 20
    raw = work / "raw.bin"
    w = limit_write(raw, nbytes)
    r = limit_read(raw, nbytes)
    raw.unlink()
    p = subprocess.Popen([str(exe), str(mib)], stdout=subprocess.PIPE, start_new_session=True)
    assert p.stdout.readline() == b"ready\n"
    img = work / f"img-{mib}"
    d = dump(p.pid, img, show_progress=False)
    p.wait()
    image_bytes = sum(f.stat().st_size for f in img.iterdir())
    t0 = time.perf_counter()
    res = restore(img, show_progress=False)
    rt = time.perf_counter() - t0
    os.kill(res.pid, signal.SIGKILL)
    os.waitpid(res.pid, 0)
    shutil.rmtree(img)
    return dict(mib=mib, limit_w=w, limit_r=r, dump=d.total_s, frozen=d.frozen_s,
                restore=rt, image=image_bytes, pages=d.pages_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(HERE / "out"))
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        exe = build(work)
        print(f"{'size':>6} {'limit w':>8} {'dump':>7} {'ratio':>6} {'GB/s':>6} {'frozen':>7} "
              f"{'limit r':>8} {'restore':>8} {'ratio':>6} {'GB/s':>6} {'image MiB':>9}")
        for mib in [int(s) for s in args.sizes.split(",")]:
            for _ in range(args.repeat):
                m = one(exe, work, mib)
                gb = m["pages"] / 1e9
                print(f"{mib:5}M {m['limit_w']:8.3f} {m['dump']:7.3f} {m['dump'] / m['limit_w']:6.2f} "
                      f"{gb / m['dump']:6.2f} {m['frozen']:7.3f} {m['limit_r']:8.3f} {m['restore']:8.3f} "
                      f"{m['restore'] / m['limit_r']:6.2f} {gb / m['restore']:6.2f} {m['image'] / 2**20:9.1f}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
