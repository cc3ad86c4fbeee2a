"""hpcckptd streams: dumping a process far larger than the daemon never makes the daemon or
its worker hold the image (the pages go from the process to the file in bounded chunks)."""
import os
import threading
import time

from hpcckpt.client import Client

from .conftest import start_hog

MIB = 512


def _hwm_kib(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a live process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return None


def _workers(daemon_pid: int) -> list[int]:
    """The daemon's children (this kernel has no /proc/PID/task/TID/children)."""
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == daemon_pid:
                    out.append(int(name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def test_memory_bounded_while_dumping_a_large_process(daemon, tmp_path, memhog):
    proc, sock = daemon
    hog = start_hog(memhog, MIB)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def watch():      # a worker's VmHWM only grows: its last reading is its peak
        while not done.is_set():
            for pid in [proc.pid, *_workers(proc.pid)]:
                if (kib := _hwm_kib(pid)) is not None:
                    peaks[pid] = max(peaks.get(pid, 0), kib)
            time.sleep(0.005)
    t = threading.Thread(target=watch)
    t.start()
    try:
        r = Client(sock).dump(hog.pid, str(tmp_path / "img"))
    finally:
        done.set()
        t.join()
    hog.wait(timeout=10)
    assert r.pages_bytes >= MIB << 20
    workers = {p: k for p, k in peaks.items() if p != proc.pid}
    assert workers, "the worker was never seen"
    worker_mib, daemon_mib = max(workers.values()) / 1024, peaks[proc.pid] / 1024
    # a worker is a Python with the engine loaded (~70 MiB here): a quarter of the image at most
    assert worker_mib < 128, f"worker peaked at {worker_mib:.0f} MiB dumping {MIB} MiB"
    assert daemon_mib < 64, f"hpcckptd peaked at {daemon_mib:.0f} MiB"
