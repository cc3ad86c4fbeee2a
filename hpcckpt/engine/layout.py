"""The tree's mappings read while it runs (a dump's pause holds no smaps page walk):
what is read here, what is checked again while frozen or after the thaw, and why."""
import os

from ..errors import ProcessGoneError
from ..images import pb
from ..kernel import proc
from . import memory


def tree_pids(pid: int, tree: bool) -> list[int]:
    """The root and, for a tree, its descendants as they are now (running)."""
    pids, k = [pid], 0
    while tree and k < len(pids):
        pids += _children_of(pids[k])
        k += 1
    return pids


def early_maps(pid: int, tree: bool) -> dict[int, list]:
    """smaps of the tree's processes, read while they run: the capture then reads only
    /proc/PID/maps while frozen and takes VmFlags and page counts from here where the
    layout is the same (proc.maps_since); 18 ms per GiB less in the pause. madvise may
    change VmFlags in place meanwhile: flags_now reads them again."""
    out = {}
    for h in tree_pids(pid, tree):
        try:
            out[h] = proc.maps(h)
        except (ProcessGoneError, OSError):    # gone, or not ours: the frozen capture says which
            pass
    return out


def flags_now(h: int, vmas: list, p: pb.Process, notes: list[str], after: bool = False) -> None:
    """VmFlags the capture took from before the freeze (early_maps), read again: while
    frozen (a fork route needs dontfork/wipeonfork exact), or `after` the thaw, when the
    pause is over. Then a flag that differs was changed by the job's madvise either
    before the instant or after it; the image takes the new value: had the call not
    been made at the instant, the restored job makes it again (setting a flag twice is
    setting it once). Two changes of one mapping's flags within those few milliseconds
    are not seen."""
    try:
        now = {v.start: v for v in proc.maps(h)}
    except (ProcessGoneError, OSError):
        return
    described = {v.start: v for v in p.mm.vmas}
    for v in vmas:
        n = now.get(v.start)
        if n is None or n.end != v.end or n.vmflags == v.vmflags:
            continue
        kept = [f for f in n.vmflags if f in memory.MADVISE]
        d = described.get(v.start)
        if after and d is not None and list(d.vmflags) != kept:
            notes.append(f"process {p.pid}: madvise flags of {v.start:#x}-{v.end:#x} changed during "
                         f"the dump ({' '.join(d.vmflags) or '-'} -> {' '.join(kept) or '-'}); "
                         "the image has the new ones")
        v.vmflags = n.vmflags
        if d is not None:
            del d.vmflags[:]
            d.vmflags.extend(kept)


def _children_of(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out
