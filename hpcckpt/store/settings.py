"""The store-wide settings in ROOT/STORE.json (marker, format, compression).

Compression is a property of the store, not of a run, so that every job and node writing
to one store agrees without passing flags around: STORE.json says e.g.
`{"format": 1, "compression": "zstd", "level": 3, "frame": 4194304}`. A store created
before compression existed has no such keys and is uncompressed. Each checkpoint's
manifest records per file how it is stored, so changing the setting never makes old
checkpoints unreadable.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .codec import Compression
from .errors import StoreConfigError
from .layout import FORMAT_VERSION, STORE_MARKER, atomic_write_bytes, token


def _read(root: Path) -> dict[str, Any]:
    path = root / STORE_MARKER
    try:
        body = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreConfigError(f"{path} is not valid JSON ({exc}): restore it from a backup or rewrite it as "
                               f'{{"format": {FORMAT_VERSION}, "compression": "none"}}') from None
    if not isinstance(body, dict):
        raise StoreConfigError(f"{path} is not a JSON object: rewrite it as {{\"format\": {FORMAT_VERSION}}}")
    return body


def open_settings(root: Path, wanted: Compression | None) -> Compression:
    """Create STORE.json with `wanted` (or none) if absent; else return what it records,
    refusing a `wanted` that differs (a store has one setting; set_compression changes it)."""
    marker = root / STORE_MARKER
    if not marker.exists():
        body = {"format": FORMAT_VERSION, "created": time.time(), **(wanted or Compression()).to_json()}
        tmp = root / f".{STORE_MARKER}.{token()}.tmp"
        atomic_write_bytes(tmp, json.dumps(body).encode())
        try:
            os.link(tmp, marker)         # create-if-absent: two creators cannot both win
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    current = Compression.from_json(_read(root), str(marker))
    if wanted is not None and (wanted.codec, wanted.level) != (current.codec, current.level):
        raise StoreConfigError(
            f"store {root} stores page data with compression {current.label}, not {wanted.label}: open it without "
            f"a compression argument to use its setting, or call Store(root).set_compression({wanted.label!r}) "
            "to change it for future checkpoints")
    return current


def write_settings(root: Path, comp: Compression) -> Compression:
    """Record a new compression setting (atomic replace; other keys kept)."""
    body = _read(root)
    body.update(comp.to_json())
    atomic_write_bytes(root / STORE_MARKER, json.dumps(body).encode())
    return comp
