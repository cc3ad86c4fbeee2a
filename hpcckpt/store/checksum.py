"""Per-file xxh3_128 digests.

xxh3 runs at memory speed (several GB/s per core), so checksumming adds little to a dump
that is bound by the file system anyway. Reading a file to hash it is combined with the
fsync that durability needs, so publish touches each file once.
"""
from __future__ import annotations

import os
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
CHUNK = 4 << 20


def hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """Return (size, hex digest) of `path`; fsync it first when asked."""
    h = xxhash.xxh3_128()
    size = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsync:
            os.fsync(fd)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            h.update(view[:n])
            size += n
    finally:
        os.close(fd)
    return size, h.hexdigest()


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)
