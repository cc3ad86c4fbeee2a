"""The manifest: the truth about one checkpoint, stored inside its directory.

It is written last, after every file is fsynced, and the directory is renamed into place
only after the manifest is durable. So a directory under ROOT/JOB/ with a valid manifest
is by construction complete. The manifest carries its own digest so that a flipped byte
in it is caught even where the JSON still parses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checksum import ALGORITHM, hash_bytes
from .errors import ManifestError
from .layout import FORMAT_VERSION, MANIFEST_FILE, atomic_write_bytes

#: manifest format of a checkpoint with compressed files (plain ones stay FORMAT_VERSION)
COMPRESSED_FORMAT = 2


@dataclass(frozen=True)
class FileEntry:
    """One stored file. name/size/digest are always of the bytes on disk (what verify reads).

    A compressed file (codec set) is stored as `plain_name + suffix`; raw_size/raw_digest
    describe the plain bytes the engine wrote, and frames the compressed size of each
    independent frame of `frame` raw bytes (see codec.py).
    """

    name: str      # path relative to the checkpoint directory, '/'-separated
    size: int
    digest: str    # xxh3_128 hex
    codec: str | None = None
    plain_name: str | None = None
    raw_size: int | None = None
    raw_digest: str | None = None
    frame: int = 0
    frames: tuple[int, ...] = ()

    @property
    def plain(self) -> str:
        """The name the engine gave the file (and expects at restore)."""
        return self.plain_name or self.name

    @property
    def plain_size(self) -> int:
        return self.size if self.raw_size is None else self.raw_size

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "size": self.size, "digest": self.digest}
        if self.codec:
            d.update(codec=self.codec, plain_name=self.plain_name, raw_size=self.raw_size,
                     raw_digest=self.raw_digest, frame=self.frame, frames=list(self.frames))
        return d

    @classmethod
    def from_dict(cls, f: dict[str, Any]) -> "FileEntry":
        if not f.get("codec"):
            return cls(f["name"], int(f["size"]), f["digest"])
        return cls(f["name"], int(f["size"]), f["digest"], str(f["codec"]), str(f["plain_name"]),
                   int(f["raw_size"]), str(f["raw_digest"]), int(f["frame"]), tuple(int(x) for x in f["frames"]))


@dataclass
class Manifest:
    job: str
    generation: int
    seq: int
    parent: int | None
    created: float
    published: float
    host: str
    pid: int
    files: list[FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: list[str] = field(default_factory=list)
    compacted_from: list[int] = field(default_factory=list)
    format: int = FORMAT_VERSION

    @property
    def image_bytes(self) -> int:
        """Bytes on disk (compressed where compressed): what retention budgets count."""
        return sum(f.size for f in self.files)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the plain image set (what materialize writes)."""
        return sum(f.plain_size for f in self.files)

    @property
    def compressed(self) -> bool:
        return any(f.codec for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        body = {
            # a compressed checkpoint is format 2 so that an hpcckpt without compression
            # refuses it (clear message) instead of handing .zst files to the engine
            "format": COMPRESSED_FORMAT if self.compressed else self.format,
            "job": self.job,
            "generation": self.generation,
            "seq": self.seq,
            "parent": self.parent,
            "created": self.created,
            "published": self.published,
            "host": self.host,
            "pid": self.pid,
            "meta": _jsonable(self.meta),
            "arrays": list(self.arrays),
            "compacted_from": list(self.compacted_from),
            "algorithm": ALGORITHM,
            "files": [f.to_dict() for f in self.files],
        }
        return body

    def to_bytes(self) -> bytes:
        body = self.to_dict()
        body["manifest_digest"] = hash_bytes(_canonical(body))
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest {where} is not valid JSON ({exc}): the checkpoint is damaged") from None
        if not isinstance(body, dict):
            raise ManifestError(f"manifest {where} is not a JSON object: the checkpoint is damaged")
        digest = body.pop("manifest_digest", None)
        if digest != hash_bytes(_canonical(body)):
            raise ManifestError(f"manifest {where} fails its own digest (edited or corrupted): the checkpoint is damaged")
        if body.get("format") not in (FORMAT_VERSION, COMPRESSED_FORMAT):
            raise ManifestError(
                f"manifest {where} has format {body.get('format')!r}, this hpcckpt reads {FORMAT_VERSION} and "
                f"{COMPRESSED_FORMAT}: "
                "use the hpcckpt version that wrote it"
            )
        try:
            return cls(
                job=body["job"], generation=int(body["generation"]), seq=int(body["seq"]),
                parent=None if body["parent"] is None else int(body["parent"]),
                created=float(body["created"]), published=float(body["published"]),
                host=str(body["host"]), pid=int(body["pid"]),
                files=[FileEntry.from_dict(f) for f in body["files"]],
                meta=dict(body.get("meta", {})), arrays=list(body.get("arrays", [])),
                compacted_from=[int(s) for s in body.get("compacted_from", [])],
                format=FORMAT_VERSION,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {where} lacks or mistypes field {exc}: the checkpoint is damaged") from None


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Read and self-check the manifest of a checkpoint directory."""
    path = ckpt_dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} is missing: the checkpoint is incomplete or damaged") from None
    return Manifest.from_bytes(data, str(path))


def write_manifest(ckpt_dir: Path, manifest: Manifest) -> None:
    atomic_write_bytes(ckpt_dir / MANIFEST_FILE, manifest.to_bytes())


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars become Python numbers; NaN/inf become None (JSON has neither)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[str(key)] = value
    return out
