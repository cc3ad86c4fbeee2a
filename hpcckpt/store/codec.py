"""Compression codecs for page data, and the per-store compression setting.

Why frames: a page file is compressed as a sequence of independent frames of `frame`
raw bytes each (4 MiB by default), simply concatenated. Independent frames let publish
and materialize stream (bounded memory: a few frames in flight) and run on several
cores with threads (zstandard and lz4 release the GIL while they work), and the result
is still an ordinary .zst / .lz4 file: `zstd -d` and `lz4 -d` decode concatenated frames.
The compressed size of every frame is kept in the manifest so decompression can be
split among threads without scanning the file.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .errors import StoreConfigError

#: Raw bytes per frame: large enough for a good ratio, small enough to keep memory low.
DEFAULT_FRAME = 4 << 20
#: Codec name -> file name suffix of a compressed file (so a browsing human sees it).
SUFFIXES = {"zstd": ".zst", "lz4": ".lz4"}
_LEVELS = {"zstd": (1, 19, 3), "lz4": (0, 16, 0)}   # min, max, default
_SPEC_RE = re.compile(r"^(zstd|lz4)(?:[-:]?(-?\d+))?$")


@dataclass(frozen=True)
class Compression:
    """A store's setting: which codec compresses page data, at which level.

    `codec` None means page data is stored as the engine wrote it (the default).
    """

    codec: str | None = None
    level: int = 0
    frame: int = DEFAULT_FRAME

    @classmethod
    def parse(cls, spec: "str | Compression | None", level: int | None = None) -> "Compression":
        """'none', 'zstd', 'zstd-3', 'zstd:3', 'lz4', or a Compression (returned as is)."""
        if isinstance(spec, Compression):
            return spec
        if spec is None or str(spec).lower() in ("", "none", "off", "no"):
            return cls()
        m = _SPEC_RE.match(str(spec).lower())
        if not m:
            raise StoreConfigError(f"unknown compression {spec!r}: use none, zstd, zstd-N (N 1-19) or lz4")
        codec = m.group(1)
        lo, hi, default = _LEVELS[codec]
        lvl = level if level is not None else int(m.group(2)) if m.group(2) else default
        if not lo <= lvl <= hi:
            raise StoreConfigError(f"compression level {lvl} is out of range for {codec}: use {lo}-{hi}")
        _require(codec)
        return cls(codec, lvl)

    @property
    def enabled(self) -> bool:
        return self.codec is not None

    @property
    def label(self) -> str:
        """How listings and meta name it: 'none', 'zstd-3', 'lz4'."""
        if self.codec is None:
            return "none"
        return f"{self.codec}-{self.level}" if self.codec == "zstd" else "lz4" if self.level == 0 else f"lz4-{self.level}"

    def to_json(self) -> dict[str, Any]:
        return {"compression": self.codec or "none", "level": self.level, "frame": self.frame}

    @classmethod
    def from_json(cls, body: dict[str, Any], where: str) -> "Compression":
        name = body.get("compression", "none")
        try:
            c = cls.parse(name, None if name in (None, "none") else int(body.get("level", 0)))
            frame = int(body.get("frame", DEFAULT_FRAME))
        except (TypeError, ValueError):
            raise StoreConfigError(f"{where}: unreadable compression setting {json.dumps(body)}") from None
        if frame < 4096 or frame % 4096:
            raise StoreConfigError(f"{where}: compression frame {frame} must be a positive multiple of 4096")
        return cls(c.codec, c.level, frame) if c.codec else cls()


def _require(codec: str) -> None:
    """Fail early, at store open, with the pip command, rather than at the first publish."""
    try:
        if codec == "zstd":
            import zstandard  # noqa: F401
        else:
            import lz4.frame  # noqa: F401
    except ImportError:
        pkg = "zstandard" if codec == "zstd" else "lz4"
        raise StoreConfigError(f"this store compresses with {codec} but the Python package {pkg!r} is not "
                               f"installed: pip install {pkg}") from None


# ---- per-thread compressor objects (zstandard contexts are not thread-safe) ---------------
_local = threading.local()


def compressor(codec: str, level: int) -> Callable[[bytes], bytes]:
    """A function compressing one frame; safe to call from many threads at once."""
    _require(codec)
    if codec == "zstd":
        import zstandard

        def zc(data: bytes) -> bytes:
            key = ("zc", level)
            c = getattr(_local, "ctx", {}).get(key)
            if c is None:
                c = zstandard.ZstdCompressor(level=level, write_content_size=True)
                _local.__dict__.setdefault("ctx", {})[key] = c
            return c.compress(data)
        return zc
    import lz4.frame

    def lc(data: bytes) -> bytes:
        return lz4.frame.compress(data, compression_level=level, content_checksum=False, store_size=True)
    return lc


def decompressor(codec: str) -> Callable[[bytes, int], bytes]:
    """A function decoding one frame to at most `limit` bytes; thread-safe."""
    _require(codec)
    if codec == "zstd":
        import zstandard

        def zd(data: bytes, limit: int) -> bytes:
            d = getattr(_local, "ctx", {}).get("zd")
            if d is None:
                d = zstandard.ZstdDecompressor()
                _local.__dict__.setdefault("ctx", {})["zd"] = d
            return d.decompress(data, max_output_size=limit)
        return zd
    import lz4.frame

    def ld(data: bytes, limit: int) -> bytes:
        return lz4.frame.decompress(data)
    return ld


def codec_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the codecs raise on garbage input (turned into CorruptDataError)."""
    errs: list[type[BaseException]] = [RuntimeError, ValueError]
    try:
        import zstandard
        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)
