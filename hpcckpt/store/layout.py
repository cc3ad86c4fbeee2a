"""Where things live under a store root, and the small durable-write helpers.

Layout (every path is meant to be browsable by hand)::

    ROOT/
      STORE.json                 marker + format version
      .catalog/catalog.h5        the HDF5 index (derived; never modified in place)
      .catalog/journal/*.json    one small file per event not yet folded into catalog.h5
      .catalog/lock              flock target for folding the journal
      JOB/
        .lock                    flock target serialising begin/publish/retention of JOB
        STATE.json               highest generation begun, last sequence number used
        00000007/                a published checkpoint (the only thing restart looks at)
          MANIFEST.json          file list + xxh3_128 digests, written last
          ARRAYS.npz             optional per-checkpoint numpy arrays (checksummed too)
          VERIFY.json            result of the last full verification (not checksummed)
          ...engine files...
        .staging/<token>/        a checkpoint being written; never considered for restart
        .deleted/00000007.json   tombstone of a checkpoint removed by retention
        .trash/                  directories being removed (renamed here first)
        .replaced/               old versions parked during compaction's swap
"""
from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

from .errors import InvalidNameError

FORMAT_VERSION = 1
STORE_MARKER = "STORE.json"
CATALOG_DIR = ".catalog"
CATALOG_FILE = "catalog.h5"
JOURNAL_DIR = "journal"
JOB_LOCK = ".lock"
JOB_STATE = "STATE.json"
STAGING_DIR = ".staging"
DELETED_DIR = ".deleted"
TRASH_DIR = ".trash"
REPLACED_DIR = ".replaced"
OWNER_FILE = "OWNER.json"
MANIFEST_FILE = "MANIFEST.json"
ARRAYS_FILE = "ARRAYS.npz"
VERIFY_FILE = "VERIFY.json"
#: Names the engine may not use inside an image set: the store writes them itself.
RESERVED_NAMES = frozenset({MANIFEST_FILE, ARRAYS_FILE, VERIFY_FILE, OWNER_FILE})
#: Files in a checkpoint dir that the manifest deliberately does not cover.
UNCHECKED_NAMES = frozenset({MANIFEST_FILE, VERIFY_FILE, OWNER_FILE})

SEQ_DIGITS = 8
_JOB_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
_SEQ_RE = re.compile(r"^[0-9]{%d,}$" % SEQ_DIGITS)


def check_job_name(job: str) -> str:
    """Refuse job names that would escape ROOT or hide as dot-directories."""
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise InvalidNameError(
            f"job name {job!r} cannot be used in the store: use 1-128 characters from "
            "A-Z a-z 0-9 . _ + - not starting with '.', '+' or '-' (e.g. replace '/' and spaces by '_')"
        )
    return job


def seq_name(seq: int) -> str:
    """Zero-padded so that `ls` sorts checkpoints in order."""
    return f"{seq:0{SEQ_DIGITS}d}"


def parse_seq(name: str) -> int | None:
    """The sequence number a directory name stands for, or None if it is not one."""
    return int(name) if _SEQ_RE.match(name) else None


def hostname() -> str:
    return socket.gethostname()


def token() -> str:
    """A name part unique across hosts and processes (host, pid, random)."""
    return f"{hostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable (POSIX needs the directory synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temp file beside `path`, fsync, rename over it: readers see old or new."""
    tmp = path.with_name(f".{path.name}.{token()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
