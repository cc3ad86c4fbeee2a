"""munge credentials: how one node's hpcckptd knows who sent an image from another.

Every Slurm site runs munged with a cluster-wide key; `munge` makes a credential binding
a payload to the caller's uid/gid, `unmunge` checks it (key, time to live, replay).
"""
import hashlib
import re
import subprocess
from dataclasses import dataclass

from ..errors import PermissionDeniedError


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


def _sock(socket_path: str | None) -> list[str]:
    return ["--socket", socket_path] if socket_path else []


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(payload: str, socket_path: str | None = None, as_user: tuple[int, int] | None = None) -> bytes:
    """`as_user` (uid, gid): made by `munge` running as that user (root only): munged vouches
    for whoever connects to it, so hpcckptd acting for a user gets the user's credential."""
    who = {"user": as_user[0], "group": as_user[1], "extra_groups": []} if as_user else {}
    res = subprocess.run(["munge", *_sock(socket_path), "--string", payload], capture_output=True, timeout=30,
                         **who)
    if res.returncode != 0:
        raise PermissionDeniedError(f"munge could not make a credential: {res.stderr.decode().strip()} "
                                    "(is munged running with the cluster key?)")
    return res.stdout.strip()


def decode(cred: bytes, expect_payload: str, socket_path: str | None = None) -> Identity:
    """The sender's identity, if the credential is valid and binds `expect_payload`."""
    if not cred:
        raise PermissionDeniedError("no munge credential: unauthenticated connections are refused")
    res = subprocess.run(["unmunge", *_sock(socket_path)], input=cred, capture_output=True, timeout=30)
    text = res.stdout.decode(errors="replace")
    if res.returncode != 0:
        raise PermissionDeniedError(f"munge credential refused: {res.stderr.decode().strip() or text.strip()}")
    uid = re.search(r"^UID:\s+\S*\s*\((\d+)\)", text, re.M)
    gid = re.search(r"^GID:\s+\S*\s*\((\d+)\)", text, re.M)
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    if not uid or not gid or body.strip() != expect_payload:
        raise PermissionDeniedError("munge credential does not match this request: refused")
    return Identity(int(uid[1]), int(gid[1]))
