"""A progress line for work that takes more than a second, on stderr.

A listener (`set_listener`) also sees every update: hpcckptd's worker turns them into
progress notifications for its caller, without the engine knowing about the service.
"""
import sys
import time
from typing import Callable

Listener = Callable[["Progress"], None]
_listener: Listener | None = None


def set_listener(fn: Listener | None) -> None:
    """Call fn(progress) on every update and at finish (fn rate-limits itself); None stops."""
    global _listener
    _listener = fn


class Progress:
    """Bytes done out of a total; silent for the first second, then a refreshed line."""

    def __init__(self, label: str, total: int, stream=None, enabled: bool = True):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.shown = False
        self.finished = False

    def __call__(self, n: int) -> None:
        self.done += n
        if _listener is not None:
            _listener(self)
        now = time.monotonic()
        if self.enabled and now - self.start > 1.0 and now - self.last > 0.25:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9) / 1e9
        tty = self.stream.isatty()
        line = (f"{self.label}: {self.done / 2**20:,.0f} of {self.total / 2**20:,.0f} MiB "
                f"({100 * self.done / self.total:.0f}%, {rate:.2f} GB/s)")
        self.stream.write("\r" + line if tty else line + "\n")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        self.finished = True
        if _listener is not None:
            _listener(self)
        if self.shown:
            self._show(time.monotonic())
            if self.stream.isatty():
                self.stream.write("\n")
