"""The vDSO family of this kernel: a restored process must find the same code where it was."""
import os

import xxhash

from . import proc
from .libc import read_mem

NAMES = ("[vdso]", "[vvar]", "[vvar_vclock]")


def layout(pid: int | str = "self") -> dict[str, proc.Vma]:
    return {v.path: v for v in proc.maps(pid, with_flags=False) if v.path in NAMES}


def digest(pid: int | str = "self") -> str:
    """xxh3-128 of the [vdso] code; "" when the process has none."""
    v = layout(pid).get("[vdso]")
    if v is None:
        return ""
    return xxhash.xxh3_128(read_mem(os.getpid() if pid == "self" else pid, v.start, v.size)).hexdigest()
