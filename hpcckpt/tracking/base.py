"""The one interface every dirty-page tracking backend offers, and what they share.

Life cycle, driven by the dump (the target is frozen around arm and collect):

    t = choose()                       # or a named backend
    t.arm(pid, injector_or_frozen, vmas)   # from now on every write is seen
    ... the process runs ...
    dirty = t.collect(pid, vmas)       # {vma.start: page indices written since}, re-armed
    ... the process runs ...
    dirty = t.collect(pid, vmas)
    t.disarm()

`collect` reports, for every mapping passed in, the pages of that mapping that may
differ from what the previous checkpoint saved: exact for mappings that are unchanged
since the previous arm/collect, the whole mapping for new or changed ones and for
shared ones. A page reported dirty may be absent now (dropped by MADV_DONTNEED,
unmapped); a page not reported was present-and-saved before with the same content, or
absent both times. See docs/tracking.md for how the dump turns this into an image.
"""
import os
import select as _select
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..errors import HpcckptError, ProcessGoneError
from ..kernel.libc import pidfd_open
from .regions import NO_PAGES, Region, regions

Dirty = dict[int, np.ndarray]


class TrackingError(HpcckptError):
    """A tracking backend cannot work here or failed; the caller takes a full dump."""


class TrackingLostError(TrackingError):
    """Tracking state no longer describes the process (it exited, exec'd, was restarted):
    the next dump must be full and the tracker armed again."""


class Tracker(ABC):
    """Base of the backends: keeps the mapping layout seen at the last arm/collect."""

    name: ClassVar[str] = "?"

    def __init__(self) -> None:
        self.pid: int | None = None
        self.layout: dict[int, tuple] = {}     # start -> Region.key at the last arm/collect
        self.start_time: int | None = None     # /proc/PID/stat starttime: which incarnation
        self.notes: list[str] = []             # fallbacks taken, for the dump to report
        self._pidfd = -1

    # -- the interface ------------------------------------------------------------------
    @abstractmethod
    def arm(self, pid: int, target, vmas) -> None:
        """Start tracking `pid`. `target` is the dump's Injector on the frozen process, a
        Frozen, or None (then the tracker freezes and thaws the process itself if it must
        run code in it)."""

    @abstractmethod
    def collect(self, pid: int, vmas) -> Dirty:
        """Pages written since the last arm/collect, per mapping start; re-arms."""

    def disarm(self) -> None:
        """Stop tracking and release every kernel object held; safe to call twice."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.pid = None
        self.start_time = None
        self.layout = {}

    def take_notes(self) -> list[str]:
        """The notes gathered since the last call (the dump shows them to the user)."""
        out, self.notes = self.notes, []
        return out

    # -- shared helpers -----------------------------------------------------------------
    def _start(self, pid: int) -> None:
        """Remember which process we track (a pidfd, so a reused PID is noticed)."""
        self.disarm()
        try:
            self._pidfd = pidfd_open(pid)
        except OSError:
            raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None
        self.pid = pid
        self.start_time = start_time(pid)

    def _check_same(self, pid: int) -> None:
        if self.pid is None:
            raise TrackingLostError(f"{self.name} tracker is not armed (arm process {pid} first; "
                                    "a fresh hpcckpt process has no tracking state: take a full dump)")
        if pid != self.pid:
            raise TrackingLostError(f"{self.name} tracker is armed on process {self.pid}, not {pid}")
        gone = self._pidfd >= 0 and bool(_select.select([self._pidfd], [], [], 0)[0])
        now = start_time(pid)
        if now is None:
            raise ProcessGoneError(f"process {pid} exited since tracking was armed; "
                                   "its tracking state is lost")
        if gone or (self.start_time is not None and now != self.start_time):
            # someone else restarted the job (a restore, a requeue) and the new process
            # got the same PID: our state describes the old one's memory
            raise TrackingLostError(
                f"process {pid} is not the one {self.name} tracking was armed on (it was "
                "restarted since, e.g. restored by someone else, and has the same PID): "
                "its changes are unknown; compare with the parent image or take a full dump")

    def _split(self, regs: list[Region]) -> tuple[list[Region], Dirty]:
        """Regions that the backend must answer for (trackable and unchanged) and the
        answers already known: whole for new/changed/shared ones, none for the vDSO."""
        keep, known = [], {}
        for r in regs:
            if r.special:
                known[r.start] = NO_PAGES
            elif not r.trackable or self.layout.get(r.start) != r.key:
                known[r.start] = r.all_pages()
            else:
                keep.append(r)
        return keep, known

    def _remember(self, regs: list[Region]) -> None:
        self.layout = {r.start: r.key for r in regs}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()

    def __del__(self):
        try:
            self.disarm()
        except Exception:
            pass


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it does not exist):
    with the PID, it names one incarnation of a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def as_regions(vmas) -> list[Region]:
    return regions(vmas)
