"""Checks of one checkpoint directory against its manifest.

quick_problems() stats files only (milliseconds; used by latest()); full_problems() reads
and hashes every byte (used by verify() and restore_candidate()). Both return readable
problem strings that name the checkpoint and the file, never raise for damage.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checksum import hash_file
from .errors import ManifestError
from .layout import UNCHECKED_NAMES
from .manifest import Manifest, read_manifest


def load(ckpt_dir: Path, name: str) -> tuple[Manifest | None, list[str]]:
    try:
        return read_manifest(ckpt_dir), []
    except ManifestError as exc:
        return None, [f"{name}: {exc}"]
    except OSError as exc:
        return None, [f"{name}: cannot read manifest: {exc}"]


def quick_problems(ckpt_dir: Path, manifest: Manifest, name: str) -> list[str]:
    problems = []
    for f in manifest.files:
        try:
            size = os.stat(ckpt_dir / f.name).st_size
        except FileNotFoundError:
            problems.append(f"{name}: file {f.name} is missing")
            continue
        if size != f.size:
            problems.append(f"{name}: file {f.name} has {size} bytes, manifest says {f.size} (truncated or overwritten)")
    return problems


def full_problems(ckpt_dir: Path, manifest: Manifest, name: str) -> list[str]:
    problems = []
    listed = {f.name for f in manifest.files}
    for f in manifest.files:
        path = ckpt_dir / f.name
        try:
            size, digest = hash_file(path)
        except FileNotFoundError:
            problems.append(f"{name}: file {f.name} is missing")
            continue
        except OSError as exc:
            problems.append(f"{name}: file {f.name} cannot be read: {exc}")
            continue
        if size != f.size:
            problems.append(f"{name}: file {f.name} has {size} bytes, manifest says {f.size} (truncated or overwritten)")
        elif digest != f.digest:
            problems.append(f"{name}: file {f.name} fails its xxh3_128 checksum (expected {f.digest}, found {digest}): its content changed after publish")
    for rel in _all_files(ckpt_dir):
        if rel not in listed and rel not in UNCHECKED_NAMES:
            problems.append(f"{name}: file {rel} is not in the manifest (added after publish); remove it")
    return problems


def _all_files(top: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        for fn in files:
            out.append(fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/"))
    return out
