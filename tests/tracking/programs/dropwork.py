"""A numpy computation for the tracking-failure tests: each step rewrites a random 5% of a
private buffer's pages and prints a digest of all its memory. From step DROP_AT on it
also keeps a MAP_DROPPABLE mapping (Linux 6.11+), a kind userfaultfd refuses to
register, and writes some of its pages each step.
Usage: dropwork.py STEPS SLEEP [DROP_AT]"""
import ctypes
import hashlib
import sys
import time

import numpy as np

PAGE = 4096
MAP_DROPPABLE, MAP_ANONYMOUS, MAP_PRIVATE = 0x08, 0x20, 0x02
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def mapping(npages: int, flags: int) -> np.ndarray:
    a = libc.mmap(None, npages * PAGE, 3, flags | MAP_ANONYMOUS, -1, 0)
    if a in (None, ctypes.c_void_p(-1).value):
        sys.exit(f"mmap failed: errno {ctypes.get_errno()}")
    return np.ctypeslib.as_array((ctypes.c_uint8 * (npages * PAGE)).from_address(a)).reshape(npages, PAGE)


steps, pause = int(sys.argv[1]), float(sys.argv[2])
drop_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
rng = np.random.default_rng(11)
n = 2048
main = mapping(n, MAP_PRIVATE)
main[:, 0] = 1
drop = None
for step in range(steps):
    idx = rng.choice(n, n // 20, replace=False)
    main[idx, (step * 13) % PAGE] += step + 1
    if step == drop_at:
        drop = mapping(32, MAP_DROPPABLE)
    h = hashlib.sha256(main.tobytes())
    if drop is not None:
        drop[rng.choice(32, 4, replace=False), step % PAGE] += step + 1
        h.update(drop.tobytes())
    print(f"step {step} {h.hexdigest()[:16]}", flush=True)
    time.sleep(pause)
print("done", flush=True)
