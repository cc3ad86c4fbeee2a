"""Images are untrusted input: every field a restore acts on is bounded and checked first.

A crafted image (kernel addresses, overlapping or unaligned mappings, page runs outside
their mappings or beyond the page file, absurd counts, relative paths) is refused here
with an error naming the image and the field, before any process exists.
"""
from ..errors import ImageError
from ..kernel.arch import current as arch
from . import pb

PAGE = 4096
USER_TOP = 0x7FFFFFFFF000          # x86_64, 4-level paging
VSYSCALL = 0xFFFFFFFFFF600000
PID_MAX = 1 << 22
FD_MAX = 1 << 20
REGS = len(arch.Regs._fields_)


def _fail(where: str, what: str) -> None:
    raise ImageError(f"image {where} is invalid: {what}")


def validate(where: str, p: pb.Process, pm: pb.Pagemap, pages_size: int) -> None:
    """Called by every restore for every process of the image and of each parent image
    holding it (engine.restore.check_pages); in_parent runs are checked like the others
    except against the page file (their pages are in an ancestor's)."""
    if not 0 < p.pid < PID_MAX:
        _fail(where, f"PID {p.pid}")
    tids = [t.tid for t in p.threads]
    if not tids or tids[0] != p.pid or len(set(tids)) != len(tids) or not all(0 < t < PID_MAX for t in tids):
        _fail(where, f"thread list {tids[:8]} (the first must be the process {p.pid}, all distinct)")
    for t in p.threads:
        if len(t.regs) != REGS:
            _fail(where, f"thread {t.tid} has {len(t.regs)} registers, this architecture {REGS}")
        if len(t.xstate) > arch.XSTATE_MAX:
            _fail(where, f"thread {t.tid}'s vector state is {len(t.xstate)} bytes")
    prev_end = 0
    usable = []
    for v in p.mm.vmas:
        span = f"mapping {v.start:#x}-{v.end:#x}"
        if v.kind not in pb.VmaKind.values():
            _fail(where, f"{span} has unknown kind {v.kind}")
        if v.start % PAGE or v.end % PAGE or v.pgoff % PAGE or v.start >= v.end:
            _fail(where, f"{span} is not page-aligned or is empty")
        if v.kind == pb.VSYSCALL:
            if v.start != VSYSCALL:
                _fail(where, f"{span} is no vsyscall page")
            continue
        if v.end > USER_TOP or v.start < PAGE:
            _fail(where, f"{span} lies outside user space")
        if v.start < prev_end:
            _fail(where, f"{span} overlaps the mapping before it")
        prev_end = v.end
        if v.kind in (pb.FILE_PRIVATE, pb.FILE_SHARED) and not v.path.startswith("/"):
            _fail(where, f"{span} names a file by a relative path {v.path!r}")
        if v.kind in (pb.ANON_PRIVATE, pb.FILE_PRIVATE, pb.ANON_SHARED):
            usable.append((v.start, v.end))
    for r in pm.runs:
        end = r.vaddr + r.nr_pages * PAGE
        if r.vaddr % PAGE or r.offset % PAGE or r.nr_pages == 0 or r.nr_pages > USER_TOP // PAGE:
            _fail(where, f"page run at {r.vaddr:#x} is malformed")
        if not r.in_parent and r.offset + r.nr_pages * PAGE > pages_size:
            _fail(where, f"page run at {r.vaddr:#x} reads beyond the page file ({pages_size} bytes)")
        if not any(s <= r.vaddr and end <= e for s, e in usable):
            _fail(where, f"page run {r.vaddr:#x}-{end:#x} is not inside a mapping that holds pages")
    prev = 0
    for r in sorted(pm.runs, key=lambda r: r.vaddr):
        if r.vaddr < prev:
            _fail(where, f"page run at {r.vaddr:#x} overlaps another run (a page listed twice)")
        prev = r.vaddr + r.nr_pages * PAGE
    for f in p.fds:
        if not 0 <= f.fd < FD_MAX or f.kind not in pb.FdKind.values():
            _fail(where, f"fd {f.fd} (kind {f.kind})")
        if f.kind in (pb.REGULAR, pb.DIRECTORY, pb.CHAR_DEVICE) and not f.path.startswith("/"):
            _fail(where, f"fd {f.fd} names a relative path {f.path!r}")
        if f.data_file and ("/" in f.data_file or f.data_file.startswith(".")):
            _fail(where, f"fd {f.fd} names data file {f.data_file!r} outside the image")
    for a in p.sigactions:
        if not 1 <= a.signo <= 64:
            _fail(where, f"signal handler for signal {a.signo}")
    mm = p.mm
    for name in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
                 "arg_start", "arg_end", "env_start", "env_end"):
        if getattr(mm, name) >= USER_TOP:
            _fail(where, f"mm field {name} = {getattr(mm, name):#x} lies outside user space")
    if len(mm.auxv) > 1024 or len(mm.auxv) % 16:
        _fail(where, f"auxv of {len(mm.auxv)} bytes")
    if not mm.exe.startswith("/") or not p.cwd.startswith("/"):
        _fail(where, f"exe {mm.exe!r} or cwd {p.cwd!r} is not an absolute path")


TTY_INDEX_MAX = 1 << 20
TTY_QUEUE_MAX = 1 << 20
TERMIOS_SIZE = 36
TTY_GROUP = 5                      # Debian's "tty" group: devpts' usual gid= for slaves


def validate_ttys(where: str, inv: pb.Inventory, procs: list[pb.Process]) -> None:
    """Sessions and groups in range; terminals of an image (engine/ttys.py): indices bounded and known, termios and
    window sizes of the kernel's shape, queues bounded, sessions and groups members of
    the tree, and a slave's owner one of the image's own users and groups."""
    live = [p for p in procs if not p.zombie]
    uids = {inv.uid} | {p.creds.uid for p in live}
    gids = {TTY_GROUP} | {g for p in live for g in (p.creds.gid, p.creds.egid, *p.creds.groups)}
    by_pid = {p.pid: p for p in procs}
    internal = set()
    for t in inv.ttys:
        what = f"terminal /dev/pts/{t.index}"
        if t.index >= TTY_INDEX_MAX:
            _fail(where, f"{what}: index out of range")
        if t.external:
            if len([x for x in inv.ttys if x.external]) > 1:
                _fail(where, "more than one shell-job terminal")
            if t.pgrp and not any(p.pgid == t.pgrp for p in procs):
                _fail(where, f"shell-job terminal: foreground group {t.pgrp} is no group of the tree")
            continue
        if t.index in internal:
            _fail(where, f"{what} listed twice")
        internal.add(t.index)
        if len(t.termios) != TERMIOS_SIZE or len(t.termios_locked) not in (0, TERMIOS_SIZE):
            _fail(where, f"{what}: termios of {len(t.termios)}/{len(t.termios_locked)} bytes")
        if max(t.rows, t.cols, t.xpixel, t.ypixel) > 0xFFFF:
            _fail(where, f"{what}: window size {t.rows}x{t.cols}")
        if len(t.output) > TTY_QUEUE_MAX or len(t.input) > TTY_QUEUE_MAX:
            _fail(where, f"{what}: queued data beyond {TTY_QUEUE_MAX} bytes")
        if t.mode & ~0o666 or (t.uid or t.gid or t.mode) and (t.uid not in uids or t.gid not in gids):
            _fail(where, f"{what}: owner {t.uid}:{t.gid} mode {t.mode:o} is not the image's own")
        if t.sid and (t.sid not in by_pid or by_pid[t.sid].sid != t.sid):
            _fail(where, f"{what}: session {t.sid} has no leader in the tree")
        if t.pgrp and (not t.sid or not any(p.pgid == t.pgrp and p.sid == t.sid for p in procs)):
            _fail(where, f"{what}: foreground group {t.pgrp} is not a group of its session")
    for p in procs:
        if not (0 <= p.sid < PID_MAX and 0 <= p.pgid < PID_MAX):
            _fail(where, f"process {p.pid}: session {p.sid} or group {p.pgid} out of range")
        refs = [(f"fd {f.fd}", f.tty) for f in p.fds if f.kind == pb.TTY]
        if p.HasField("ctty"):
            refs.append(("controlling terminal", p.ctty))
        for name, r in refs:
            if not (r.external or r.dev_tty) and r.index not in internal:
                _fail(where, f"process {p.pid} {name}: pty {r.index} is not in the image")
