"""A process that reserves a huge range of address space, as servers do (mariadbd maps
8 TiB for its buffer pool's largest size), and uses a few scattered pages of it: a
PROT_NONE reservation with pages made writable inside, and a MAP_NORESERVE read-write
range written here and there. It prints a digest of what it wrote at every step, so a
restored run must print exactly what an uninterrupted one does.

usage: reserved.py STEPS"""
import ctypes
import hashlib
import mmap
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_NORESERVE = 0x4000
PAGE = 4096


def reserve(size: int, prot: int) -> int:
    addr = libc.mmap(None, size, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return addr


steps = int(sys.argv[1])
big = reserve(2 << 40, 0)                          # 2 TiB, nothing usable
rw = reserve(1 << 40, mmap.PROT_READ | mmap.PROT_WRITE)        # 1 TiB, written sparsely
# make 3 scattered windows of the PROT_NONE reservation usable, as a pool grows into it
windows = [big + (1 << 30) * k * 97 for k in (1, 5, 11)]
for w in windows:
    assert libc.mprotect(w, 16 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE) == 0
spots = windows + [rw + (1 << 30) * k * 131 + PAGE * k for k in range(1, 7)]
print("ready", flush=True)
for step in range(steps):
    h = hashlib.sha256()
    for i, a in enumerate(spots):
        buf = (ctypes.c_char * (3 * PAGE)).from_address(a)
        old = bytes(buf)
        new = hashlib.sha256(old + bytes([step, i])).digest() * (3 * PAGE // 32)
        ctypes.memmove(a, new, len(new))
        h.update(new)
    print(step, h.hexdigest(), flush=True)
    time.sleep(0.05)
print("done", flush=True)
