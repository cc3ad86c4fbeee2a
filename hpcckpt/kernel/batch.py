"""Many syscalls in a frozen thread for the price of one stop.

Injecting one syscall costs a register write, a single step, a wait and a register
read (0.1-0.7 ms on a busy node); capturing a process took ~12 of them, most of a
tree's per-process dump time. A `Batch` queues the calls (each with an output buffer
in the dump's scratch block), writes machine code running them all into that block
(which is mapped executable), and lets the thread run it to an int3: one stop. The
outputs are read back in one read. Where the code cannot run (a scratch block mapped
without PROT_EXEC: W^X policies refuse writable executable memory), the same calls are
injected one by one, with the same results.

The calls must not depend on each other's results (the code is written before any
runs), and must only read state: a fault stops the batch, and it is redone one by one.
`start` and `finish` split `run` so that a dump sets every process of a tree off on its
batch before waiting for the first: their stops overlap (engine/capture.py capture_tree).
"""
import os
import signal
import struct
from dataclasses import dataclass

from ..errors import KernelError
from . import ptrace
from .arch import current as arch

OUT = object()      # stands for the call's own output buffer among its arguments


@dataclass
class Call:
    name: str
    args: tuple
    out_size: int
    out_addr: int = 0
    result_addr: int = 0
    result: int = 0
    data: bytes = b""

    def u64s(self, n: int) -> tuple[int, ...]:
        return struct.unpack_from(f"<{n}Q", self.data)


class Batch:
    """Calls queued for one thread; `run` executes them, then each Call has its result
    (the syscall's return value) and data (its output buffer's bytes)."""

    def __init__(self, base: int, size: int, code_ok: bool):
        self.base, self.size, self.code_ok = base, size, code_ok
        self.calls: list[Call] = []
        self.used = 0
        self.as_code = False      # the last run was one stop (else: one by one)
        self._end: int | None = None   # where the code started stops (its int3), once started

    def add(self, name: str, *args, out: int = 0) -> Call:
        c = Call(name, args, out)
        c.result_addr = self._alloc(8)
        if out:
            c.out_addr = self._alloc(out)
        self.calls.append(c)
        return c

    def _alloc(self, n: int) -> int:
        addr = self.base + self.used
        self.used += (n + 7) & ~7
        if self.used > self.size:
            raise KernelError(f"syscall batch needs more than its {self.size} bytes of scratch")
        return addr

    def _args(self, c: Call) -> tuple[int, ...]:
        return tuple(c.out_addr if a is OUT else a for a in c.args)

    def run(self, inj, mem, code_addr: int, code_room: int) -> None:
        """Run every call in `inj`'s thread (stopped, ours); `mem` reads/writes its memory.
        Raises KernelError naming the first call that failed (negative errno)."""
        self.start(inj, mem, code_addr, code_room)
        self.finish(inj, mem)

    def start(self, inj, mem, code_addr: int, code_room: int) -> None:
        """Set the thread off on the batch's code and return at once (`finish` waits):
        a tree's processes run theirs at the same time. Calls that cannot run as code
        are all made one by one in `finish`."""
        self._end = None
        if not self.calls or not self.code_ok:
            return
        code = arch.syscall_batch_code([(arch.SYSCALLS[c.name], self._args(c), c.result_addr)
                                        for c in self.calls])
        if len(code) <= code_room:
            mem.write(code_addr, code)
            inj.run_code(code_addr)
            self._end = code_addr + len(code)

    def finish(self, inj, mem) -> None:
        """Each call's result and output, once the code `start` set off stopped (or made
        one by one). Raises KernelError naming the first call that failed."""
        if not self.calls:
            return
        done = self._end is not None and code_ended(inj, self._end)
        self.as_code = done
        if done:
            raw = mem.read(self.base, self.used)
            for c in self.calls:
                off = c.result_addr - self.base
                c.result = arch.signed(int.from_bytes(raw[off:off + 8], "little"))
        else:
            for c in self.calls:
                c.result = inj.syscall(c.name, *self._args(c), check=False)
            raw = mem.read(self.base, self.used)
        for c in self.calls:
            if c.out_size:
                off = c.out_addr - self.base
                c.data = raw[off:off + c.out_size]
            if -4096 < c.result < 0:
                raise KernelError(f"{c.name}{self._args(c)} in process {inj.tid} failed: {os.strerror(-c.result)}")


def code_ended(inj, end: int) -> bool:
    """True once the code stopped at the int3 at its `end`; False (nothing delivered,
    registers as before the batch) if it stopped anywhere else."""
    st = inj.wait_code()
    if st.sig == signal.SIGTRAP and arch.ip(ptrace.get_regs(inj.tid)) == end:
        return True
    # a fault in the code (it should not happen): forget it, go one by one
    ptrace.set_regs(inj.tid, inj.saved_regs)
    return False
