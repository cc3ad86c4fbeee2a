"""The PAGEMAP_SCAN ioctl (Linux 6.7+): ranges of pages by category, optionally re-protecting.

Debian 12's headers predate it, so the numbers are written out here (measured in
../shared/notes/kernel-facts.md). The kernel merges adjacent pages of equal categories
into one region and stops early when the output vector is full; `walk_end` says where,
so we loop. With PM_SCAN_WP_MATCHING the pages reported are write-protected again in
the same walk, which is what makes report-and-re-arm atomic against a running target.
"""
import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass

import numpy as np

from ..errors import KernelError, ProcessGoneError
from ..kernel.libc import PAGE_SIZE

PAGEMAP_SCAN = 0xC0606610
MAX_END = 0x7FFFFFFFF000  # the ioctl refuses end beyond the user address space

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2

VEC_LEN = 8192


class ScanArg(ctypes.Structure):
    """struct pm_scan_arg (96 bytes)."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


@dataclass
class Scanner:
    """An open /proc/PID/pagemap and a reused output vector."""
    pid: int

    def __post_init__(self):
        try:
            self.fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGoneError(f"process {self.pid} does not exist (or exited)") from None
        self.vec = np.zeros((VEC_LEN, 3), dtype=np.uint64)

    def scan(self, start: int, end: int, category_mask: int, return_mask: int,
             flags: int = 0, anyof_mask: int = 0, inverted: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, categories) of the matching regions in [start, end). A page
        matches when (its categories ^ inverted) has every bit of category_mask."""
        end = min(end, MAX_END)
        parts = []
        arg = ScanArg(size=ctypes.sizeof(ScanArg), flags=flags, vec=self.vec.ctypes.data,
                      vec_len=VEC_LEN, category_mask=category_mask, category_inverted=inverted,
                      category_anyof_mask=anyof_mask, return_mask=return_mask)
        pos = start
        while pos < end:
            arg.start, arg.end, arg.walk_end = pos, end, 0
            try:
                n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg)
            except OSError as e:
                if e.errno == errno.ESRCH or not os.path.exists(f"/proc/{self.pid}"):
                    raise ProcessGoneError(f"process {self.pid} exited while its pages were scanned") from None
                raise KernelError(f"PAGEMAP_SCAN of process {self.pid} [{pos:#x}, {end:#x}): "
                                  f"{os.strerror(e.errno)}") from None
            if n:
                parts.append(self.vec[:n].copy())
            if arg.walk_end <= pos:  # no progress: nothing more to walk
                break
            pos = arg.walk_end
        if not parts:
            z = np.zeros(0, dtype=np.uint64)
            return z, z, z
        v = np.concatenate(parts)
        return v[:, 0], v[:, 1], v[:, 2]

    def wp_allowed(self, addr: int) -> bool:
        """Whether the mapping at `addr` is registered for async write-protect (one page
        walked: a registration covers whole mappings)."""
        return len(self.scan(addr, addr + PAGE_SIZE, PAGE_IS_WPALLOWED, PAGE_IS_WPALLOWED)[0]) > 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def supported(pid: int | None = None) -> bool:
    """Whether this kernel has PAGEMAP_SCAN (ENOTTY on kernels before 6.7)."""
    s = Scanner(pid or os.getpid())
    try:
        s.scan(0, 4096, 0, PAGE_IS_PRESENT)
        return True
    except KernelError:
        return False
    finally:
        s.close()
