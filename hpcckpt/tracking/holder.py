"""Keeping uffd-wp tracking alive between two hpcckpt processes (pre-dump, then dump).

A write-protect registration lives as long as its userfaultfd is open, and the fd lives
in the monitor: when a one-shot `hpcckpt pre-dump` exits, its tracking would be gone and
the final `hpcckpt dump --parent` would have to read all memory (hashing) while the job
is frozen. So the dump that arms tracking and then exits hands its userfaultfds to a
small detached *holder* process that only keeps them open. The next dump takes them
over with pidfd_getfd (the kernel's fd-stealing call, which needs ptrace rights over the
holder: only its owner or root can), then stops the holder.

Why a holder and not the target itself (creating the uffd in the target by an injected
syscall and leaving it there): an fd in the target is visible to the program
(/proc/self/fd, close_range() in a daemonizing job would silently end the tracking, fd
numbers it expects free are taken), and it would be inherited by its children. The
holder is invisible to the job; it costs one small process (stdlib only, ~10 MB) and it
cleans up after itself: it exits when every process it tracks has exited (pidfd poll), or
when the next dump takes the tracking over; a holder whose record is stale is noticed
(start times, its command line names the image its state is relative to).

The record beside the image (`tracking-holder.json`) is only a hint; everything in it is
checked against the running holder and target before the fd is trusted.

This file is also the holder's program: `python -I -S holder.py MARKER BASE PID:START:FD...`
(stdlib only, isolated: nothing from the package is imported there).
"""
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "hpcckpt-tracking-holder"
RECORD = "tracking-holder.json"


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2:].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def _holder_main(argv: list[str]) -> None:
    """The holder: keep the fds open until their processes exit; report ready, detach."""
    os.chdir("/")
    if os.fork():                # the spawner reaps this one at once: the holder is
        os._exit(0)              # nobody's child but init's (or a subreaper's)
    watch: dict[int, int] = {}   # pidfd -> userfaultfd
    for spec in argv[3:]:   # argv: script MARKER BASE PID:START:FD...
        pid, start, fd = (int(x) for x in spec.split(":"))
        try:
            pfd = os.pidfd_open(pid)
        except OSError:
            pfd = -1
        if pfd < 0 or _start_time(pid) != start:
            os.close(fd)
            if pfd >= 0:
                os.close(pfd)
            continue
        watch[pfd] = fd
    os.write(1, f"ready {os.getpid()}\n".encode())
    null = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    os.close(null)
    while watch:
        ready, _, _ = select.select(list(watch), [], [])
        for pfd in ready:
            os.close(watch.pop(pfd))
            os.close(pfd)
    os._exit(0)


# -- the dump's side -------------------------------------------------------------------

@dataclass
class HeldProcess:
    ns_pid: int
    host_pid: int
    start: int
    fd: int                       # the fd number in the holder
    layout: list[list]            # Tracker.layout values at the hand-off


@dataclass
class HolderRecord:
    holder_pid: int
    holder_start: int
    base_id: str                  # the image the tracking state is relative to
    processes: list[HeldProcess] = field(default_factory=list)

    def write(self, images: Path) -> None:
        tmp = images / (RECORD + ".tmp")
        tmp.write_text(json.dumps({"holder_pid": self.holder_pid, "holder_start": self.holder_start,
                                   "base_id": self.base_id,
                                   "processes": [vars(p) for p in self.processes]}))
        os.replace(tmp, images / RECORD)

    @classmethod
    def read(cls, images: Path) -> "HolderRecord | None":
        """The record beside an image; None if there is none. ValueError if malformed."""
        try:
            d = json.loads((images / RECORD).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable: {e}") from None
        try:
            procs = [HeldProcess(int(p["ns_pid"]), int(p["host_pid"]), int(p["start"]), int(p["fd"]),
                                 [list(k) for k in p["layout"]]) for p in d["processes"]]
            return cls(int(d["holder_pid"]), int(d["holder_start"]), str(d["base_id"]), procs)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed: {e!r}") from None


def spawn(base_id: str, entries: list[tuple[int, int, int, int, list]]) -> HolderRecord:
    """Start a holder for (ns_pid, host_pid, start, fd, layout) entries; our fds stay
    ours (the caller closes them). The holder's fds have the same numbers."""
    specs = [f"{pid}:{start}:{fd}" for _, pid, start, fd, _ in entries]
    p = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), MARKER, base_id, *specs],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         pass_fds=[e[3] for e in entries], start_new_session=True)
    try:
        line = p.stdout.readline().decode()
    finally:
        p.stdout.close()
        p.wait()
    if not line.startswith("ready "):
        raise OSError(f"the tracking holder did not start (exit status {p.returncode})")
    hpid = int(line.split()[1])
    start = _start_time(hpid)
    if start is None:
        raise OSError(f"the tracking holder {hpid} exited at once (its processes are gone?)")
    return HolderRecord(hpid, start, base_id,
                        [HeldProcess(ns, pid, st, fd, [list(k) for k in lay]) for ns, pid, st, fd, lay in entries])


def holder_args(pid: int) -> list[str] | None:
    """The holder's arguments after MARKER, if `pid` is a holder."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if MARKER not in args:
        return None
    return [a for a in args[args.index(MARKER) + 1:] if a]


def take_over(rec: HolderRecord, base_id: str) -> dict[int, tuple[HeldProcess, int]]:
    """Every fd the holder keeps, now ours ({ns_pid: (entry, our fd)}, fd -1 where that
    process is not the one tracked any more); the holder is stopped. OSError/ValueError saying why if the holder is not (any more) the one the
    record describes, or its state is not relative to `base_id`."""
    from ..kernel.libc import pidfd_getfd, pidfd_open
    if rec.base_id != base_id:
        raise ValueError(f"the record is for image {rec.base_id}, not {base_id}")
    try:
        pfd = pidfd_open(rec.holder_pid)
    except OSError:
        raise ValueError(f"tracking holder {rec.holder_pid} is gone (its processes exited, "
                         "or a later dump took the tracking over)") from None
    try:
        args = holder_args(rec.holder_pid)
        if _start_time(rec.holder_pid) != rec.holder_start or not args:
            raise ValueError(f"tracking holder {rec.holder_pid} is gone (the PID is another process's)")
        if args[0] != base_id:
            raise ValueError(f"tracking holder {rec.holder_pid} tracks changes since image {args[0]}, "
                             f"not {base_id}")
        held = {tuple(int(x) for x in a.split(":")) for a in args[1:]}
        out: dict[int, tuple[HeldProcess, int]] = {}
        try:
            for p in rec.processes:
                if (p.host_pid, p.start, p.fd) not in held:
                    continue     # not what this holder keeps: a forged or mixed-up record
                if _start_time(p.host_pid) != p.start:
                    # exited, or restarted by someone else with the same PID: its writes
                    # since the image are not in this uffd (it tracked the old process)
                    out[p.ns_pid] = (p, -1)
                    continue
                try:
                    out[p.ns_pid] = (p, pidfd_getfd(pfd, p.fd))
                except OSError:
                    out[p.ns_pid] = (p, -1)  # that process exited: the holder closed its fd
        except BaseException:
            for _, fd in out.values():
                if fd >= 0:
                    os.close(fd)
            raise
        signal.pidfd_send_signal(pfd, signal.SIGTERM)
        return out
    finally:
        os.close(pfd)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == MARKER:
    _holder_main(sys.argv)
