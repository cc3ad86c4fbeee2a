"""POSIX timers (timer_create): read at dump, recreated with the same IDs on restore.

The process holds timer IDs in its own memory (timer_t), so a restored timer must get
its old ID back: Linux 6.15+ lets a process ask for that with
prctl(PR_TIMER_CREATE_RESTORE_IDS), after which timer_create takes the ID from
*timerid. /proc/PID/timers gives ID, signal, sigev_value, notify mode, target and
clock; what is left until expiry and the interval come from an injected timer_gettime.
"""
import ctypes
import os
import struct
from dataclasses import dataclass

from ..errors import RestoreError, UnsupportedError
from ..images import pb
from ..kernel import proc

PR_TIMER_CREATE_RESTORE_IDS = 77
RESTORE_IDS_OFF, RESTORE_IDS_ON, RESTORE_IDS_GET = 0, 1, 2
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}
SIGEVENT_SIZE = 64          # struct sigevent on Linux
MAX_CLOCK = 11              # CLOCK_REALTIME .. CLOCK_TAI (negative: a CPU clock of a PID)


@dataclass
class TimerInfo:
    """One /proc/PID/timers entry."""
    id: int
    signo: int
    sigval: int
    notify: int
    target: int             # PID or TID (host numbering) the signal goes to
    clockid: int


def parse(text: str) -> list[TimerInfo]:
    """/proc/PID/timers: blocks of 'ID:', 'signal: N/PTR', 'notify: KIND/pid|tid.N', 'ClockID:'."""
    out, cur = [], {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        cur[key.strip()] = val.strip()
        if key.strip() == "ClockID":
            signo, _, ptr = cur["signal"].partition("/")
            how, _, target = cur["notify"].partition("/")
            whom, _, num = target.partition(".")
            notify = NOTIFY[how] | (SIGEV_THREAD_ID if whom == "tid" else 0)
            out.append(TimerInfo(int(cur["ID"]), int(signo), int(ptr, 16), notify, int(num),
                                 int(cur["ClockID"])))
            cur = {}
    return sorted(out, key=lambda t: t.id)


def listed(pid: int, tids: dict[int, int]) -> list[tuple[TimerInfo, int]]:
    """Every POSIX timer of `pid` with the TID (as the process sees it) it signals, 0 for
    none. `tids`: host TID -> TID as the process sees it. Refuses what cannot be recreated."""
    out = []
    for t in parse(proc.posix_timers(pid)):
        if not 0 <= t.clockid <= MAX_CLOCK:
            raise UnsupportedError(
                f"process {pid}: POSIX timer {t.id} counts clock {t.clockid} (the CPU-time clock "
                "of a given process or thread), which hpcckpt cannot checkpoint yet")
        tid = 0
        if t.notify & SIGEV_THREAD_ID:
            if t.target not in tids:
                raise UnsupportedError(f"process {pid}: POSIX timer {t.id} signals thread {t.target}, "
                                       "which is not one of the process's threads")
            tid = tids[t.target]
        out.append((t, tid))
    return out


def calls(timers, batch) -> list:
    """A timer_gettime per timer, queued in a syscall batch (kernel/batch.py)."""
    from ..kernel.batch import OUT
    return [batch.add("timer_gettime", t.id, OUT, out=32) for t, _ in timers]


def from_calls(timers, done) -> list[pb.PosixTimer]:
    out = []
    for (t, tid), c in zip(timers, done):
        isec, insec, vsec, vnsec = c.u64s(4)
        out.append(pb.PosixTimer(id=t.id, clockid=t.clockid, notify=t.notify, signo=t.signo,
                                 sigval=t.sigval, tid=tid, value_sec=vsec, value_nsec=vnsec,
                                 interval_sec=isec, interval_nsec=insec))
    return out


def check_kernel(procs: list[pb.Process]) -> None:
    """Before touching anything: this kernel can give timers their IDs back."""
    if not any(p.posix_timers for p in procs):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_GET, 0, 0, 0) < 0:
        who = next(p.pid for p in procs if p.posix_timers)
        raise RestoreError(
            f"process {who} has POSIX timers, and this kernel cannot recreate them with their IDs "
            "(PR_TIMER_CREATE_RESTORE_IDS needs Linux 6.15 or later)")


def restore(t, p: pb.Process) -> None:
    """Recreate and arm every timer in target `t` (a restore.Target whose threads exist)."""
    if not p.posix_timers:
        return
    t.sys("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0)
    try:
        for tm in p.posix_timers:
            ev = struct.pack("<Qii", tm.sigval, tm.signo, tm.notify)
            ev += struct.pack("<i", tm.tid) + bytes(SIGEVENT_SIZE - len(ev) - 4)
            sev = t.put(ev)
            idp = t.put(struct.pack("<i", tm.id))
            res = t.sys("timer_create", tm.clockid, sev, idp, check=False)
            got = struct.unpack("<i", t.mem.read(idp, 4))[0]
            if res < 0 or got != tm.id:
                raise RestoreError(f"process {p.pid}: cannot recreate POSIX timer {tm.id}: "
                                   + (os.strerror(-res) if res < 0 else f"got ID {got}"))
            value = (tm.value_sec, tm.value_nsec)
            if value == (0, 0):    # a periodic timer waiting for its signal to be taken
                value = (tm.interval_sec, tm.interval_nsec)
            if value != (0, 0):
                spec = struct.pack("<4Q", tm.interval_sec, tm.interval_nsec, *value)
                t.sys("timer_settime", tm.id, 0, t.put(spec), 0)
    finally:
        t.sys("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0, check=False)

