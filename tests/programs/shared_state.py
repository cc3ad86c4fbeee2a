"""State processes share across fork: one file description (one position), a
MAP_SHARED|MAP_ANONYMOUS page, a memfd and a named /dev/shm file, all mapped by both.
Parent and child take strict turns through the shared page and append to the shared
file through the shared position. Usage: shared_state.py TURNS PAUSE SHMNAME"""
import mmap
import os
import struct
import sys
import time

turns, pause, shm_name = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
log = open("log.txt", "wb", buffering=0)           # no O_APPEND: the position is shared
anon = mmap.mmap(-1, 4096)                          # MAP_SHARED|MAP_ANONYMOUS
mfd = os.memfd_create("counts")
os.ftruncate(mfd, 8192)
counts = mmap.mmap(mfd, 8192)
shm_fd = os.open(f"/dev/shm/{shm_name}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(shm_fd, 4096)
named = mmap.mmap(shm_fd, 4096)
os.close(shm_fd)


def turn() -> int:
    return struct.unpack_from("<q", anon, 0)[0]


def play(me: int, name: str) -> None:
    for k in range(turns):
        while turn() % 2 != me:
            time.sleep(0.002)
        log.write(f"{name} {k} pos {log.tell()}\n".encode())
        struct.pack_into("<q", counts, 8 * me, struct.unpack_from("<q", counts, 8 * me)[0] + 1)
        named[me] = k % 256
        struct.pack_into("<q", anon, 0, turn() + 1)
        time.sleep(pause)


child = os.fork()
if child == 0:
    play(1, "child")
    os._exit(0)
play(0, "parent")
os.waitpid(child, 0)
print("turns", turn(), "counts", struct.unpack_from("<2q", counts), "named", named[0], named[1],
      "log", os.path.getsize("log.txt"), flush=True)
os.unlink(f"/dev/shm/{shm_name}")
