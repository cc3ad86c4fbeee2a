"""Syscalls with effects, queued for a stopped thread and run as one block of code.

A restore turns a stub into its process with ~130 injected syscalls (unmap, map, open,
dup, close, set ...), each a ptrace round trip: registers written, a single step, a wait,
registers read. Most of them do not need Python between them: their arguments are known
in advance, or are the result of an earlier call (an fd opened, then mapped or moved).
A `Queue` collects such calls and runs them in the thread as machine code in its scratch
block (`arch.effect_block_code`): one stop for all. Unlike kernel/batch.py's read-only
batches, these calls change the process, so they can be neither redone nor skipped: the
block stops at the first call whose result fails its check, and that call is named; the
calls after it did not run. Where the scratch block is not executable (W^X), the same
calls are injected one by one with the same stop-at-first-failure rule.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import KernelError
from .arch import current as arch
from .batch import code_ended

ERRNO = -1              # check: stop the block on an errno (the default)
NOT_RUN = 1 << 63       # a result slot's value before its call runs: no syscall returns it


@dataclass(eq=False)
class Step:
    """One queued call. An argument that is a Step stands for that call's result."""
    name: str
    args: tuple
    check: int | None       # None: any result; ERRNO: no errno; else the one result wanted
    fail: str               # what failed, for the error (else the call and its arguments)
    slot: int = 0
    result: int | None = None

    @property
    def value(self) -> int:
        if self.result is None:
            raise KernelError(f"{self.name} was queued but has not run yet")
        return self.result


class Queue:
    """Calls queued for one thread (`inj`, stopped, ours), run in order by `run` (or
    before anything else is injected into it: the caller's part). `area` is `size` bytes of
    the thread's scratch memory (executable when `code_ok`) for the result slots and the
    code. Raises `error` naming the first call that failed its check."""

    def __init__(self, inj, mem, area: int, size: int, code_ok: bool, error=KernelError):
        self.inj, self.mem, self.area, self.size, self.code_ok = inj, mem, area, size, code_ok
        self.error = error
        self.steps: list[Step] = []
        self.stops = 0            # ptrace stops spent by all runs (for benchmarks)

    def add(self, name: str, *args, check: int | None = ERRNO, fail: str = "") -> Step:
        if len(self.steps) >= self.size // 256:    # 8 bytes of slot, < 140 of code each
            self.run()
        s = Step(name, args, check, fail)
        self.steps.append(s)
        return s

    def run(self) -> None:
        steps, self.steps = self.steps, []
        if not steps:
            return
        if self.code_ok:
            self._run_code(steps)
        else:
            self._run_one_by_one(steps)
        for s in steps:
            if s.result is None:
                break
            if not _passes(s):
                raise self.error(self._failure(s))

    def _arg(self, a) -> tuple[bool, int]:
        if isinstance(a, Step):
            return (False, a.value) if a.result is not None else (True, a.slot)
        return False, a

    def _run_code(self, steps: list[Step]) -> None:
        for i, s in enumerate(steps):
            s.slot = self.area + 8 * i
        code = arch.effect_block_code([(arch.SYSCALLS[s.name], tuple(self._arg(a) for a in s.args),
                                        s.slot, s.check) for s in steps])
        start = self.area + 8 * len(steps)
        if start + len(code) > self.area + self.size:
            raise KernelError(f"a block of {len(steps)} syscalls needs more than {self.size} bytes")
        self.mem.write(self.area, struct.pack(f"<{len(steps)}Q", *[NOT_RUN] * len(steps)) + code)
        self.stops += 1
        self.inj.run_code(start)
        if not code_ended(self.inj, start + len(code)):
            raise KernelError(f"process {self.inj.tid}: a block of {len(steps)} injected syscalls "
                              "stopped on a fault; what it did is unknown")
        raw = struct.unpack(f"<{len(steps)}Q", self.mem.read(self.area, 8 * len(steps)))
        for s, r in zip(steps, raw):
            s.result = None if r == NOT_RUN else arch.signed(r)

    def _run_one_by_one(self, steps: list[Step]) -> None:
        for s in steps:
            s.result = self.inj.syscall(s.name, *(a.value if isinstance(a, Step) else a for a in s.args),
                                        check=False)
            self.stops += 1
            if not _passes(s):
                return

    def _failure(self, s: Step) -> str:
        r = s.result
        why = os.strerror(-r) if -4096 < r < 0 else f"got {r:#x}, not {s.check:#x}"
        if s.fail:
            return f"{s.fail}: {why}"
        args = tuple(a.value if isinstance(a, Step) else a for a in s.args)
        return f"{s.name}{args} in process {self.inj.tid} failed: {why}"


def _passes(s: Step) -> bool:
    if s.check is None:
        return True
    if s.check == ERRNO:
        return not -4096 < s.result < 0
    return s.result == s.check
