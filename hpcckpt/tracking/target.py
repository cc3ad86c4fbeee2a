"""Getting a syscall injector on the target, from whatever the caller holds.

The dump already has an Injector on the frozen process (and a scratch page); tests and
the backend probe have only a PID. Either way the target must be frozen while we run
code in it and thawed afterwards, also when something fails half-way.
"""
from contextlib import contextmanager
from typing import Iterator

from ..engine.freeze import Frozen, freeze
from ..kernel import proc
from ..kernel.inject import Injector, find_syscall_insn


@contextmanager
def injector(pid: int, target, ip: int | None = None) -> Iterator[Injector]:
    """An Injector in `pid`: the given one, one made on a Frozen's first thread, or one on
    a process we freeze here (and always thaw). `ip`: a syscall instruction found before
    the stop (find_syscall_insn), for a stop as short as can be."""
    if isinstance(target, Injector):
        yield target
        return
    fr = target if isinstance(target, Frozen) else freeze(pid)
    inj = None
    try:
        if ip is None:
            ip = find_syscall_insn(pid, proc.maps(pid, with_flags=False))
        inj = Injector(fr.tids[0], ip)
        yield inj
    finally:
        if inj is not None:
            try:
                inj.restore()
            finally:
                fr.deferred.setdefault(inj.tid, []).extend(inj.pending_signals)
        if fr is not target:
            fr.thaw()
