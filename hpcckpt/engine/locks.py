"""File locks held by the dumped processes, and taking them back on restore.

A lock is kernel state tied to an open file: dumping the file without it would resume
the job believing it holds a lock nobody holds. /proc/PID/fdinfo/FD lists, as "lock:"
lines, the locks held through that fd: flock() and OFD locks of its open file
description, and the POSIX record locks of its process taken through that description.
All three are taken again on restore, in the same process on the same fd number, without
waiting: a lock someone else took meanwhile fails the restore, naming the file.
Leases and delegations are refused at dump.
"""
import os
import struct

from ..errors import RestoreError, UnsupportedError
from ..images import pb

KINDS = {"FLOCK": pb.FLOCK, "POSIX": pb.POSIX, "OFDLCK": pb.OFD}
KIND_NAMES = {pb.FLOCK: "flock", pb.POSIX: "POSIX record", pb.OFD: "OFD record"}
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
F_RDLCK, F_WRLCK = 0, 1
F_SETLK, F_OFD_SETLK = 6, 37


def parse(pid: int, fd: int, path: str, lines: list[str]) -> list[pb.FileLock]:
    """fdinfo 'lock:' lines, e.g. '1: POSIX  ADVISORY  WRITE 28009 fe:00:2179472 10 29'."""
    out = []
    for line in lines:
        f = line.split()
        if len(f) < 8 or "->" in f[1]:
            continue                      # a blocked request, not a held lock
        kind, mode, rw, start, end = f[1], f[2], f[3], f[6], f[7]
        if kind not in KINDS or mode != "ADVISORY" or rw not in ("READ", "WRITE"):
            raise UnsupportedError(
                f"process {pid}: fd {fd} ({path}) holds a {kind} {mode} {rw} lock, which hpcckpt "
                "cannot checkpoint yet")
        length = 0 if end == "EOF" else int(end) - int(start) + 1
        lk = pb.FileLock(kind=KINDS[kind], write=rw == "WRITE", start=int(start), length=length)
        if lk not in out:
            out.append(lk)
    return out


def restore(t, p: pb.Process) -> None:
    """Take every lock again in target `t`, whose fds are in place."""
    for e in p.fds:
        for lk in e.locks:
            if lk.kind == pb.FLOCK:
                res = t.sys("flock", e.fd, (LOCK_EX if lk.write else LOCK_SH) | LOCK_NB, check=False)
            else:
                fl = struct.pack("<hh4xqqi4x", F_WRLCK if lk.write else F_RDLCK, os.SEEK_SET,
                                 lk.start, lk.length, 0)
                res = t.sys("fcntl", e.fd, F_SETLK if lk.kind == pb.POSIX else F_OFD_SETLK,
                            t.put(fl), check=False)
            if res < 0:
                why = "another process holds a conflicting lock" if res in (-11, -13) else os.strerror(-res)
                raise RestoreError(
                    f"process {p.pid}: cannot take back its {KIND_NAMES[lk.kind]} "
                    f"{'write' if lk.write else 'read'} lock on {e.path} (fd {e.fd}): {why}")
