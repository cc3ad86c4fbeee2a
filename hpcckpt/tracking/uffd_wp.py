"""Write-protect tracking: userfaultfd in WP_ASYNC mode, read and re-armed by PAGEMAP_SCAN.

Arm: the target creates a userfaultfd (one injected syscall), we keep it, register the
target's private mappings for write-protect and write-protect every page with one
PAGEMAP_SCAN. A write to a protected page then costs the target one minor fault (the
kernel clears the page's wp bit and goes on; no message, no waiting on us). Collect is
a single PAGEMAP_SCAN with PAGE_IS_WRITTEN and PM_SCAN_WP_MATCHING: it reports the pages
whose wp bit is gone and protects them again in the same walk, so no write is lost even
if the target runs meanwhile.

The fd lives in this (monitor) process: the tracker object must live as long as the
job is tracked (`hpcckpt run` keeps it). A fresh `hpcckpt dump` process has no tracker,
so its first dump is full and it arms a new one.

A mapping the kernel refuses to register (another userfaultfd holds it, a device
mapping...) is tracked by the fallback backend (content hashing) instead, per mapping.
A mapping that was unmapped and re-created at the same place is noticed because it is
no longer registered (PAGE_IS_WPALLOWED) and is reported whole.
"""
import errno
import os

import numpy as np

from ..errors import HpcckptError, KernelError, ProcessGoneError
from ..kernel import proc
from .base import Dirty, Tracker, TrackingError, TrackingLostError
from .hashing import HashingTracker
from .regions import Region, pages_from_ranges, region, regions, split_by_region
from .scan import MAX_END, PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING, Scanner
from .target import injector
from . import userfaultfd


class UffdWpTracker(Tracker):
    name = "uffd-wp"

    def __init__(self, fallback: Tracker | None = None) -> None:
        super().__init__()
        self.fd = -1
        self.scanner: Scanner | None = None
        self.fallback: Tracker = fallback or HashingTracker()
        self.fallback_starts: set[int] = set()   # mappings the kernel would not register
        self.refused: dict[int, str] = {}         # start -> why (for reports)

    # -- arm ----------------------------------------------------------------------------
    def arm(self, pid: int, target, vmas) -> None:
        self._start(pid)
        try:
            with injector(pid, target) as inj:
                self.fd = userfaultfd.open_in_target(inj, pid)
            userfaultfd.enable_wp_async(self.fd)
            self.scanner = Scanner(pid)
            regs = regions(vmas)
            failed = self._register([r for r in regs if r.trackable])
            self._scan_written(regs)  # protects every page: from now on writes are seen
            if failed:
                self.fallback.arm(pid, None, failed)
            self._remember_layout(regs, reread=True)
        except BaseException:
            self.disarm()
            raise

    @classmethod
    def adopt(cls, pid: int, fd: int, layout: dict[int, tuple]) -> "UffdWpTracker":
        """A tracker on an armed userfaultfd another hpcckpt process left us (holder.py):
        `fd` (now ours; closed on failure) must be a userfaultfd holding `pid`'s
        registrations, `layout` the mapping layout at its last arm/collect."""
        t = cls()
        try:
            t._start(pid)
            t.fd = fd
            t._check_fd()
            t.scanner = Scanner(pid)
            t.layout = dict(layout)
            t._check_owner(proc.maps(pid))
        except BaseException:
            if t.fd < 0:
                os.close(fd)
            t.disarm()
            raise
        return t

    def _check_owner(self, vmas) -> None:
        """Our fd holds the process's registrations: registering a registered mapping
        again is a no-op for the same userfaultfd and EBUSY for any other."""
        for r in regions(vmas):
            if "uw" in r.vmflags and self.layout.get(r.start) == r.key:
                try:
                    userfaultfd.register_wp(self.fd, r.start, r.end - r.start)
                except OSError as e:
                    raise TrackingLostError(f"the userfaultfd handed over does not track process "
                                            f"{self.pid} ({e.strerror} on {r.start:#x})") from None
                return

    # -- collect ------------------------------------------------------------------------
    def collect(self, pid: int, vmas) -> Dirty:
        self._check_same(pid)
        self._check_fd()
        regs = regions(vmas)
        keep, out = self._split(regs)
        try:
            # Which unchanged mappings are still ours: one re-created at the same place
            # by munmap+mmap has the same key but is not registered any more. A mapping
            # is registered whole, so PAGEMAP_SCAN of its first page says it (smaps'
            # "uw" would too, but the caller's smaps may be from before the freeze).
            tracked, fb = [], []
            for r in keep:
                if r.start in self.fallback_starts:
                    fb.append(r)
                elif self.scanner.wp_allowed(r.start):
                    tracked.append(r)
                else:
                    out[r.start] = r.all_pages()
            # new, changed or re-created mappings: all reported whole above; (re-)register
            seen = {r.start for r in tracked} | {r.start for r in fb}
            new = [r for r in regs if r.trackable and r.start not in seen]
            failed = self._register(new)
            written = self._scan_written(regs)
            out.update(split_by_region(written, tracked))
            fb_regs = fb + failed
            self.fallback_starts = {r.start for r in fb_regs}
            if fb_regs:
                fb_out = self._fallback_collect(pid, fb_regs)
                for r in fb:
                    out[r.start] = fb_out[r.start]
            self._remember_layout(regs, reread=bool(new))
            self._check_same(pid)  # died during the collect: the scan saw a dying mm
        except ProcessGoneError:
            raise
        except OSError as e:
            if not os.path.exists(f"/proc/{pid}"):
                raise ProcessGoneError(f"process {pid} exited during the collect") from None
            raise KernelError(f"uffd-wp collect on process {pid}: {e}") from None
        return out

    def disarm(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)  # the kernel unregisters every range of this userfaultfd
            self.fd = -1
        if getattr(self, "scanner", None) is not None:
            self.scanner.close()
            self.scanner = None
        if getattr(self, "fallback", None) is not None:
            self.fallback.disarm()
        self.fallback_starts = set()
        super().disarm()

    # -- helpers ------------------------------------------------------------------------
    def _check_fd(self) -> None:
        """Our userfaultfd must still be one: if it was closed (or replaced) under us, the
        kernel dropped every registration and no write since was recorded."""
        try:
            ok = os.readlink(f"/proc/self/fd/{self.fd}") == "anon_inode:[userfaultfd]"
        except OSError:
            ok = False
        if not ok:
            raise TrackingLostError(f"the userfaultfd (fd {self.fd}) tracking process {self.pid} "
                                    "was closed: writes since the last checkpoint are unknown")

    def _register(self, regs: list[Region]) -> list[Region]:
        """Register each mapping; the ones refused are returned (fallback's job)."""
        failed = []
        for r in regs:
            try:
                userfaultfd.register_wp(self.fd, r.start, r.end - r.start)
            except OSError as e:
                if not os.path.exists(f"/proc/{self.pid}"):
                    raise ProcessGoneError(f"process {self.pid} exited while being armed") from None
                if e.errno in (errno.EBADF, errno.ENOTTY):
                    self._check_fd()
                    raise KernelError(f"UFFDIO_REGISTER for process {self.pid}: {e.strerror}") from None
                self.refused[r.start] = os.strerror(e.errno)
                self.notes.append(
                    f"process {self.pid}: mapping {r.start:#x}-{r.end:#x}"
                    + (f" ({r.path})" if r.path else "")
                    + f" cannot be registered for write-protect ({e.strerror}); "
                    f"tracked by content hashing instead")
                failed.append(r)
        self.fallback_starts |= {r.start for r in failed}
        return failed

    def _bounds(self, regs: list[Region]) -> tuple[int, int]:
        tr = [r for r in regs if r.trackable and r.start < MAX_END]
        if not tr:
            return 0, 0
        return min(r.start for r in tr), min(max(r.end for r in tr), MAX_END)

    def _scan_written(self, regs: list[Region]) -> np.ndarray:
        """Page addresses written since the last scan, in all registered mappings;
        re-protects them."""
        lo, hi = self._bounds(regs)
        if lo >= hi:
            return np.zeros(0, dtype=np.int64)
        s, e, _ = self.scanner.scan(lo, hi, PAGE_IS_WRITTEN, PAGE_IS_WRITTEN, flags=PM_SCAN_WP_MATCHING)
        return pages_from_ranges(s, e)

    def written_bytes(self, vmas) -> int:
        """Bytes written since the last collect in the tracked mappings, nothing
        re-protected: two of these a moment apart give the job's write rate."""
        n = 0
        for r in regions(vmas):
            if r.trackable and r.start < MAX_END:
                s, e, _ = self.scanner.scan(r.start, r.end, PAGE_IS_WRITTEN, PAGE_IS_WRITTEN)
                n += int((e - s).sum())
        return n

    def _fallback_collect(self, pid: int, fb_regs: list[Region]) -> Dirty:
        if self.fallback.pid is None:
            self.fallback.arm(pid, None, fb_regs)
            return {r.start: r.all_pages() for r in fb_regs}
        return self.fallback.collect(pid, fb_regs)

    def _remember_layout(self, regs: list[Region], reread: bool) -> None:
        """Remember the layout as it is after registration: registering a new mapping
        next to a registered one can merge the two in the kernel, and the merged mapping
        must not look "changed" at the next collect."""
        if not reread:
            self._remember(regs)
            return
        try:
            now = [region(v) for v in proc.maps(self.pid, with_flags=False)]
        except HpcckptError:
            self._remember(regs)
            return
        if regs and all(r.inode == -1 for r in regs):  # caller gives pb.Vma: no inode
            now = [Region(r.start, r.end, r.prot, r.shared, r.path, r.pgoff, -1) for r in now]
        self._remember(now)


def check_supported() -> None:
    """Raise TrackingError when this kernel lacks what the backend needs."""
    from .scan import supported
    if not supported():
        raise TrackingError("PAGEMAP_SCAN is missing (Linux 6.7+ needed)")
