"""A numpy computation whose memory changes between steps in known ways, for incremental
checkpoints: each step rewrites 1%, 10% or 50% of a private buffer's pages, and maps a new
region, unmaps an old one, grows one with mremap (it may move) or drops pages
(MADV_DONTNEED), then prints a digest of all of it.  Usage: chainwork.py STEPS SLEEP [MIB]"""
import ctypes
import hashlib
import sys
import time

import numpy as np

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def mapping(npages: int) -> int:
    return libc.mmap(None, npages * PAGE, 3, 0x22, -1, 0)


def pages(addr: int, npages: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * (npages * PAGE)).from_address(addr)).reshape(npages, PAGE)


steps, pause = int(sys.argv[1]), float(sys.argv[2])
n = int(sys.argv[3]) * 256 if len(sys.argv) > 3 else 2048
rng = np.random.default_rng(7)
main = mapping(n)
pages(main, n)[:, 0] = 1
extra: list[list[int]] = []           # [address, pages]
for step in range(steps):
    frac = (0.01, 0.1, 0.5)[step % 3]
    idx = rng.choice(n, max(1, int(n * frac)), replace=False)
    pages(main, n)[idx, (step * 7) % PAGE] += step + 1
    if step % 4 == 1:
        a = mapping(64)
        pages(a, 64)[:, 1] = step
        extra.append([a, 64])
    elif step % 4 == 2 and len(extra) > 1:
        a, k = extra.pop(0)
        libc.munmap(a, k * PAGE)
    elif step % 4 == 3 and extra:
        a, k = extra[-1]
        b = libc.mremap(a, k * PAGE, (k + 32) * PAGE, 1)    # MREMAP_MAYMOVE
        pages(b, k + 32)[k:, 2] = step
        extra[-1] = [b, k + 32]
    if step % 5 == 4:
        libc.madvise(main + 16 * PAGE, 8 * PAGE, 4)         # MADV_DONTNEED: zeros again
    h = hashlib.sha256(pages(main, n).tobytes())
    for a, k in extra:
        h.update(pages(a, k).tobytes())
    print(f"step {step} {h.hexdigest()[:16]}", flush=True)
    time.sleep(pause)
print("done", flush=True)
