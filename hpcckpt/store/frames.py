"""Streaming, multi-threaded compression of one file into independent frames, and back.

Memory stays bounded whatever the file size: at most 2 x threads frames are in flight.
Both directions hash as they go, so publish still reads each file once (the xxh3 digest
of the stored bytes goes into the manifest as for any file, and the digest of the plain
bytes too), and materialize checks both without a separate pass.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .codec import codec_errors, compressor, decompressor
from .errors import CorruptDataError


@dataclass(frozen=True)
class Encoded:
    """What encode_file() produced: sizes and digests of both forms, and the frame index."""

    raw_size: int
    raw_digest: str
    size: int
    digest: str
    frames: tuple[int, ...]


def _read_full(fd: int, buf: bytearray) -> int:
    """Fill buf from fd (short reads are legal, e.g. on NFS); return bytes read (< len at EOF)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def encode_file(src: Path, dst: Path, codec: str, level: int, frame: int, threads: int) -> Encoded:
    """Compress src into dst (created, must not exist) frame by frame; fsync dst."""
    compress = compressor(codec, level)
    raw_h, out_h = xxhash.xxh3_128(), xxhash.xxh3_128()
    frames: list[int] = []
    raw_size = size = 0
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with ThreadPoolExecutor(max(1, threads), thread_name_prefix="hpcckpt-compress") as pool:
                pending: deque[Future[bytes]] = deque()
                eof = False
                while not eof or pending:
                    while not eof and len(pending) < 2 * max(1, threads):
                        buf = bytearray(frame)
                        n = _read_full(fi, buf)
                        if n < frame:
                            eof = True
                            del buf[n:]
                        if n:
                            chunk = bytes(buf)
                            raw_h.update(chunk)
                            raw_size += n
                            pending.append(pool.submit(compress, chunk))
                    if pending:
                        out = pending.popleft().result()
                        _write_all(fo, out)
                        out_h.update(out)
                        frames.append(len(out))
                        size += len(out)
            os.fsync(fo)
        finally:
            os.close(fo)
    finally:
        os.close(fi)
    return Encoded(raw_size, raw_h.hexdigest(), size, out_h.hexdigest(), tuple(frames))


def decode_file(src: Path, dst: Path, codec: str, frame: int, frames: tuple[int, ...], raw_size: int,
                digest: str, raw_digest: str, where: str, threads: int) -> None:
    """Decompress src into dst (created), checking the frame sizes and both digests.

    Raises CorruptDataError naming `where` (checkpoint and file) on any mismatch; dst is
    then left partial and the caller throws the whole materialized directory away.
    """
    decompress = decompressor(codec)
    bad = codec_errors()
    in_h, out_h = xxhash.xxh3_128(), xxhash.xxh3_128()
    total = 0
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with ThreadPoolExecutor(max(1, threads), thread_name_prefix="hpcckpt-decompress") as pool:
                pending: deque[tuple[int, Future[bytes]]] = deque()
                it = iter(enumerate(frames))
                exhausted = False
                while not exhausted or pending:
                    while not exhausted and len(pending) < 2 * max(1, threads):
                        nxt = next(it, None)
                        if nxt is None:
                            exhausted = True
                            break
                        i, clen = nxt
                        buf = bytearray(clen)
                        if _read_full(fi, buf) != clen:
                            raise CorruptDataError(f"{where}: stored file is shorter than its frame index says "
                                                   f"(frame {i}): truncated after publish; restore an older checkpoint")
                        data = bytes(buf)
                        in_h.update(data)
                        pending.append((i, pool.submit(decompress, data, frame)))
                    if not pending:
                        break
                    i, fut = pending.popleft()
                    try:
                        out = fut.result()
                    except bad as exc:
                        raise CorruptDataError(f"{where}: frame {i} does not decode ({exc}): the stored file is "
                                               "damaged; restore an older checkpoint (hpcckpt verify names it)") from None
                    last = i == len(frames) - 1
                    if len(out) != (raw_size - frame * i if last else frame):
                        raise CorruptDataError(f"{where}: frame {i} decodes to {len(out)} bytes, not the published "
                                               "size: the stored file is damaged")
                    out_h.update(out)
                    _write_all(fo, out)
                    total += len(out)
        finally:
            os.close(fo)
        if os.read(fi, 1):
            raise CorruptDataError(f"{where}: stored file has bytes beyond its last frame (appended after publish)")
    finally:
        os.close(fi)
    if in_h.hexdigest() != digest:
        raise CorruptDataError(f"{where}: fails its xxh3_128 checksum (stored bytes changed after publish); "
                               "restore an older checkpoint")
    if total != raw_size or out_h.hexdigest() != raw_digest:
        raise CorruptDataError(f"{where}: decompressed bytes differ from what was published (size {total} vs "
                               f"{raw_size}); the stored file is damaged")
