"""Images are untrusted input: every field a restore acts on is bounded and checked first.

A crafted image (kernel addresses, overlapping or unaligned mappings, page runs outside
their mappings or beyond the page file, absurd counts, relative paths) is refused here
with an error naming the image and the field, before any process exists.
"""
import bisect
import ipaddress
import re

from ..errors import ImageError
from ..kernel import listenlock
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
    vma_kinds, fd_kinds = set(pb.VmaKind.values()), set(pb.FdKind.values())  # once, not per item
    for v in p.mm.vmas:
        span = f"mapping {v.start:#x}-{v.end:#x}"
        if v.kind not in vma_kinds:
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
        if v.noreserve and v.kind not in (pb.ANON_PRIVATE, pb.FILE_PRIVATE):
            _fail(where, f"{span} asks for MAP_NORESERVE, which only private mappings keep")
        if v.kind in (pb.FILE_PRIVATE, pb.FILE_SHARED) and not v.path.startswith("/"):
            _fail(where, f"{span} names a file by a relative path {v.path!r}")
        if v.kind in (pb.ANON_PRIVATE, pb.FILE_PRIVATE, pb.ANON_SHARED):
            usable.append((v.start, v.end))
    starts = [s for s, _ in usable]
    for r in pm.runs:
        end = r.vaddr + r.nr_pages * PAGE
        if r.vaddr % PAGE or r.offset % PAGE or r.nr_pages == 0 or r.nr_pages > USER_TOP // PAGE:
            _fail(where, f"page run at {r.vaddr:#x} is malformed")
        if not r.in_parent and r.offset + r.nr_pages * PAGE > pages_size:
            _fail(where, f"page run at {r.vaddr:#x} reads beyond the page file ({pages_size} bytes)")
        i = bisect.bisect_right(starts, r.vaddr) - 1    # usable is sorted, disjoint
        if i < 0 or end > usable[i][1]:
            _fail(where, f"page run {r.vaddr:#x}-{end:#x} is not inside a mapping that holds pages")
    prev = 0
    for r in sorted(pm.runs, key=lambda r: r.vaddr):
        if r.vaddr < prev:
            _fail(where, f"page run at {r.vaddr:#x} overlaps another run (a page listed twice)")
        prev = r.vaddr + r.nr_pages * PAGE
    for f in p.fds:
        if not 0 <= f.fd < FD_MAX or f.kind not in fd_kinds:
            _fail(where, f"fd {f.fd} (kind {f.kind})")
        if f.kind in (pb.REGULAR, pb.DIRECTORY, pb.CHAR_DEVICE) and not f.path.startswith("/"):
            _fail(where, f"fd {f.fd} names a relative path {f.path!r}")
        if f.kind == pb.PIPE and not (f.path.startswith("pipe:") or f.path.startswith("/") and "\0" not in f.path):
            _fail(where, f"fd {f.fd}: pipe or FIFO path {f.path!r}")
        if f.data_file and ("/" in f.data_file or f.data_file.startswith(".")):
            _fail(where, f"fd {f.fd} names data file {f.data_file!r} outside the image")
        if f.kind == pb.SOCKET and (f.socket.congestion or f.socket.fastopen_qlen) and \
                (not CA_NAME.match(f.socket.congestion) or f.socket.type != 1 or f.socket.fastopen_qlen > 1 << 20):
            _fail(where, f"fd {f.fd}: TCP congestion control {f.socket.congestion!r} or Fast Open queue "
                  f"{f.socket.fastopen_qlen} on a socket of type {f.socket.type}")
        if f.kind == pb.SOCKET and f.socket.HasField("tcp"):
            _tcp(where, f.fd, f.socket)
        if f.kind == pb.SOCKET and f.socket.dead_peer and (
                f.socket.family != 1 or f.socket.type not in (1, 5) or f.socket.end != 0):
            _fail(where, f"fd {f.fd} is a socket with a closed peer that is no unix stream or seqpacket end 0")
        if f.kind == pb.SOCKET and f.socket.listen_lock and (
                not f.socket.listening or f.socket.family not in (2, 10)
                or not listenlock.valid_name(f.socket.listen_lock)):
            _fail(where, f"fd {f.fd} names listener lock table {f.socket.listen_lock!r}")
        if f.kind == pb.SOCKET and f.socket.in_flight:
            _in_flight(where, f.fd, f.socket)
        if f.kind == pb.SOCKET and f.socket.family == UNIX and f.socket.address:
            _unix_name(where, f"fd {f.fd}", f.socket.address)
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


CA_NAME = re.compile(r"^[a-z0-9_]{0,15}$")
SCM_MAX_FD = 253
O_CREAT, O_EXCL, O_TRUNC = 0o100, 0o200, 0o1000


UNIX = 1
UNIX_PATH_MAX = 108
PIPE_MAX = 1 << 30


def _unix_name(where: str, what: str, name: str) -> None:
    """A unix socket name a restore binds: an absolute path or an abstract name, that fits."""
    raw = name.encode(errors="surrogateescape")
    if not (raw.startswith(b"/") and b"\0" not in raw or raw.startswith(b"\0")) or len(raw) >= UNIX_PATH_MAX:
        _fail(where, f"{what}: unix socket name {name!r}")


def _in_flight(where: str, fd: int, k: pb.Socket) -> None:
    """Passed files: attached to messages that exist, as many as the kernel allows; files by
    absolute path, never asking the restore to create or truncate anything; sockets and
    pipes by file id, or described in full once (unix sockets not carrying passed fds
    themselves, pipes of bounded size)."""
    for m in k.in_flight:
        if m.message >= len(k.queue) or not 0 < len(m.files) <= SCM_MAX_FD:
            _fail(where, f"fd {fd}: {len(m.files)} passed file(s) on message {m.message} of {len(k.queue)}")
        for pf in m.files:
            if pf.file_id or pf.HasField("object"):
                if pf.path or (pf.file_id and pf.HasField("object")):
                    _fail(where, f"fd {fd}: a passed file has a path and a file id, or two file ids")
                if pf.HasField("object"):
                    _flight_object(where, fd, pf.object)
            elif not pf.path.startswith("/") or "\0" in pf.path or pf.flags & (O_CREAT | O_EXCL | O_TRUNC):
                _fail(where, f"fd {fd}: passed file {pf.path!r} (flags {pf.flags:o})")


def _flight_object(where: str, fd: int, o: pb.Fd) -> None:
    what = f"fd {fd}: {pb.FdKind.Name(o.kind) if o.kind in pb.FdKind.values() else o.kind} in flight"
    if not o.file_id or o.locks or o.data_file or o.epoll_watches or o.inotify or o.HasField("tty"):
        _fail(where, f"{what}: no file id, or fields no socket or pipe has")
    if o.kind == pb.PIPE:
        if not (o.path.startswith("pipe:") or o.path.startswith("/") and "\0" not in o.path):
            _fail(where, f"{what}: pipe or FIFO path {o.path!r}")
        if not o.pipe_id or len(o.pipe_data) > PIPE_MAX or o.pipe_size > PIPE_MAX:
            _fail(where, f"{what}: pipe {o.pipe_id} with {len(o.pipe_data)} bytes, size {o.pipe_size}")
        return
    k = o.socket
    if o.kind != pb.SOCKET or k.family != UNIX or k.type not in (1, 2, 5) or k.in_flight \
            or k.HasField("tcp") or k.port:
        _fail(where, f"{what}: only unix sockets (not carrying passed fds) and pipes may be in flight")
    if k.address:
        _unix_name(where, what, k.address)


def validate_in_flight(where: str, procs: list[pb.Process]) -> None:
    """Every file id passed in flight is one the image makes (an fd's or an in-flight
    object's), and no in-flight object reuses one."""
    have = {f.file_id for p in procs for f in p.fds if f.file_id and f.kind != pb.INHERITED}
    objects, refs = set(), []
    for p in procs:
        for f in p.fds:
            if f.kind != pb.SOCKET:
                continue
            for m in f.socket.in_flight:
                for pf in m.files:
                    if pf.HasField("object"):
                        if pf.object.file_id in have or pf.object.file_id in objects:
                            _fail(where, f"process {p.pid} fd {f.fd}: in-flight object with file id "
                                  f"{pf.object.file_id}, which another description has")
                        objects.add(pf.object.file_id)
                    elif pf.file_id:
                        refs.append((p.pid, f.fd, pf.file_id))
    for pid, fd, fid in refs:
        if fid not in have and fid not in objects:
            _fail(where, f"process {pid} fd {fd} passes file id {fid} in flight, which no fd or "
                  "in-flight object of the image has")


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


IPC_ID_MAX = 1 << 31
SEMMSL_MAX = 32000          # the kernel's ceiling for semaphores per set (SEMMSL)
SEMVMX = 32767              # the largest semaphore value
SHM_SIZE_MAX = 1 << 46
MSG_TOTAL_MAX = 1 << 30


def validate_ipc(where: str, inv: pb.Inventory, owner: int, procs: list[pb.Process]) -> None:
    """The SysV IPC objects an image recreates (engine/sysvipc.py), and the attachments
    naming them. An image never creates an object owned by another user than the image's
    owner, nor of a group none of its processes had."""
    ipc = inv.ipc
    if not inv.own_ipc_namespace and (ipc.shm or ipc.sem or ipc.msg):
        _fail(where, "SysV IPC objects without an IPC namespace of the job's own")
    gids = {g for p in procs if not p.zombie for g in (p.creds.gid, p.creds.egid, p.creds.sgid,
                                                       p.creds.fsgid, *p.creds.groups)}
    sizes = {}
    for kind, objs in (("shm", ipc.shm), ("sem", ipc.sem), ("msg", ipc.msg)):
        seen = set()
        for o in objs:
            q = o.perm
            what = f"SysV {kind} {q.id}"
            if not 0 <= q.id < IPC_ID_MAX or q.id in seen:
                _fail(where, f"{what}: bad or repeated ID")
            seen.add(q.id)
            if q.mode & ~0o777:
                _fail(where, f"{what}: mode {q.mode:#o}")
            if owner != 0 and q.uid != owner:
                _fail(where, f"{what} would be owned by uid {q.uid}, the image's owner is uid {owner}")
            if owner != 0 and q.gid not in gids:
                _fail(where, f"{what} would belong to group {q.gid}, which no process of the image has")
        if kind == "shm":
            for o in objs:
                if not 0 < o.size <= SHM_SIZE_MAX:
                    _fail(where, f"SysV shm {o.perm.id}: size {o.size}")
                hp = o.huge_page_size
                if hp and (hp & (hp - 1) or not 1 << 16 <= hp <= 1 << 34):
                    _fail(where, f"SysV shm {o.perm.id}: huge page size {hp}")
                if o.data_file != f"sysvshm-{o.perm.id}.img" or o.data_file not in inv.digests \
                        or inv.digests[o.data_file].size != o.size:
                    _fail(where, f"SysV shm {o.perm.id}: data file {o.data_file!r} is not the one "
                          "the inventory lists with the segment's size")
                sizes[o.perm.id] = o.size
        elif kind == "sem":
            for o in objs:
                if not 0 < len(o.values) <= SEMMSL_MAX or any(v > SEMVMX for v in o.values):
                    _fail(where, f"SysV sem {o.perm.id}: {len(o.values)} semaphores or a value above {SEMVMX}")
        else:
            for o in objs:
                if sum(len(m.data) for m in o.messages) > MSG_TOTAL_MAX or any(m.type <= 0 for m in o.messages):
                    _fail(where, f"SysV msg {o.perm.id}: too much data or a message type <= 0")
    nsems = {o.perm.id: len(o.values) for o in ipc.sem}
    for p in procs:
        for u in p.sem_undo:
            if nsems.get(u.semid) != len(u.adj) or any(abs(a) > SEMVMX for a in u.adj):
                _fail(where, f"process {p.pid}: SEM_UNDO adjustments {list(u.adj)[:8]} for semaphore "
                      f"set {u.semid}, which the image lacks or sizes otherwise")
        for v in p.mm.vmas:
            if v.kind != pb.SYSV_SHM:
                continue
            size = sizes.get(v.sysv_shmid)
            if size is None:
                _fail(where, f"process {p.pid} attaches SysV segment {v.sysv_shmid}, which the image lacks")
            if v.start < v.pgoff or v.pgoff + (v.end - v.start) > (size + PAGE - 1) // PAGE * PAGE:
                _fail(where, f"process {p.pid}: attachment {v.start:#x}-{v.end:#x} of SysV segment "
                      f"{v.sysv_shmid} lies outside the segment")


WATCHES_MAX = 1 << 20
# fanotify_init flags only CAP_SYS_ADMIN may use (FANOTIFY_ADMIN_INIT_FLAGS): permission
# classes, FAN_ENABLE_AUDIT, FAN_REPORT_PIDFD, FAN_REPORT_TID, FAN_UNLIMITED_QUEUE/MARKS
FAN_ADMIN_FLAGS = 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x10 | 0x20
FAN_REPORT_ID_FLAGS = 0x200 | 0x400 | 0x800 | 0x4000   # FID, DIR_FID, NAME, MNT
FAN_MARK_TYPES = (0, 1, 2)


def validate_fsnotify(where: str, p: pb.Process, owner: int) -> None:
    """inotify watches and fanotify marks (engine/fsnotify.py). Watches are added as the
    image's owner, so the kernel checks read access to each path; what it does not check
    for a process that is still root while being restored is the fanotify privilege: an
    image of a non-root owner may only hold what the kernel lets users set up unprivileged
    (notification class with file-id reporting, inode marks)."""
    for f in p.fds:
        if f.kind == pb.INOTIFY:
            wds = [w.wd for w in f.inotify]
            if len(wds) > WATCHES_MAX or len(set(wds)) != len(wds) or any(not 0 < w < IPC_ID_MAX for w in wds):
                _fail(where, f"process {p.pid} fd {f.fd}: inotify watch numbers {sorted(wds)[:8]}")
            for w in f.inotify:
                if not w.path.startswith("/"):
                    _fail(where, f"process {p.pid} fd {f.fd}: inotify watch {w.wd} on relative path {w.path!r}")
        elif f.kind == pb.FANOTIFY:
            fa = f.fanotify
            if len(fa.marks) > WATCHES_MAX:
                _fail(where, f"process {p.pid} fd {f.fd}: {len(fa.marks)} fanotify marks")
            for m in fa.marks:
                if m.type not in FAN_MARK_TYPES or not m.path.startswith("/"):
                    _fail(where, f"process {p.pid} fd {f.fd}: fanotify mark {m.type} on {m.path!r}")
            if owner != 0:
                if fa.flags & FAN_ADMIN_FLAGS or not fa.flags & FAN_REPORT_ID_FLAGS:
                    _fail(where, f"process {p.pid} fd {f.fd}: fanotify flags {fa.flags:#x} need "
                          f"CAP_SYS_ADMIN, which the image's owner (uid {owner}) lacks")
                if any(m.type != 0 for m in fa.marks):
                    _fail(where, f"process {p.pid} fd {f.fd}: fanotify mount or file system marks "
                          f"need CAP_SYS_ADMIN, which the image's owner (uid {owner}) lacks")


TCP_QUEUE_MAX = 1 << 30
TCP_OPTIONS = 1 | 2 | 4           # TCPI_OPT_TIMESTAMPS | SACK | WSCALE


def _tcp(where: str, fd: int, k: pb.Socket) -> None:
    """An established TCP connection (engine/tcp.py): a restore binds and connects it and
    deletes the nftables table it names, so each of those is bounded."""
    import ipaddress
    c, what = k.tcp, f"fd {fd} (TCP connection)"
    if k.family not in (2, 10) or k.type != 1:
        _fail(where, f"{what} is of family {k.family} type {k.type}, not TCP")
    for name, addr, port in (("address", k.address, k.port), ("peer address", k.peer_address, k.peer_port)):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            _fail(where, f"{what} has {name} {addr!r}")
        if (ip.version == 4) != (k.family == 2) or not 0 < port < 65536:
            _fail(where, f"{what} has {name} {addr!r} port {port}")
    if c.state not in (1, 4, 5, 8, 9, 11):
        _fail(where, f"{what} is in state {c.state}; only ESTABLISHED and half-closed ones are restored")
    if len(c.recv_queue) > TCP_QUEUE_MAX or len(c.send_queue) > TCP_QUEUE_MAX or c.unsent > len(c.send_queue):
        _fail(where, f"{what} has queues of {len(c.recv_queue)}/{len(c.send_queue)} bytes, {c.unsent} unsent")
    if not 0 < c.mss < 65536 or c.options & ~TCP_OPTIONS or c.snd_wscale > 14 or c.rcv_wscale > 14:
        _fail(where, f"{what} has MSS {c.mss}, options {c.options:#x}, window scales {c.snd_wscale}/{c.rcv_wscale}")
    if k.buf_lock > 3 or c.tos > 255 or c.peek_off < -1 or c.linger_secs < 0:
        _fail(where, f"{what} has TOS {c.tos}, peek offset {c.peek_off} or linger {c.linger_secs}")
    from ..kernel.netlock import valid_name
    if c.lock_table and not valid_name(c.lock_table):
        _fail(where, f"{what} names network lock table {c.lock_table!r}, not one hpcckpt makes")


NET_ITEMS_MAX = 4096
IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
NET_KINDS = ("loopback", "veth")


def _ifname(where: str, what: str, name: str, optional: bool = False) -> None:
    if optional and not name:
        return
    if not IFNAME.match(name) or name in (".", ".."):
        _fail(where, f"{what}: interface name {name!r}")


def _ip(where: str, what: str, text: str, v6: bool, optional: bool = True) -> None:
    if optional and not text:
        return
    try:
        ok = ipaddress.ip_address(text).version == (6 if v6 else 4)
    except ValueError:
        ok = False
    if not ok:
        _fail(where, f"{what}: {text!r} is not an IPv{6 if v6 else 4} address")


def validate_netns(where: str, inv: pb.Inventory, owner: int) -> None:
    """The job's network namespace an image rebuilds (engine/netns.py): only from root's
    images (it puts interfaces on the node's bridges), every name an interface name, every
    address an address of its family, every reference to an interface one the image makes."""
    if not inv.HasField("netns"):
        return
    net = inv.netns
    if owner != 0:
        _fail(where, f"a network namespace in an image owned by uid {owner}: only root's images may "
              "create one (it attaches interfaces to the node's bridges)")
    if max(len(net.links), len(net.addresses), len(net.routes), len(net.rules)) > NET_ITEMS_MAX:
        _fail(where, "network namespace: too many interfaces, addresses, routes or rules")
    names = set()
    for ln in net.links:
        what = f"network interface {ln.name!r}"
        _ifname(where, what, ln.name)
        if ln.name in names:
            _fail(where, f"{what} appears twice")
        names.add(ln.name)
        if ln.kind not in NET_KINDS or (ln.kind == "loopback") != (ln.name == "lo"):
            _fail(where, f"{what}: kind {ln.kind!r} (loopback is lo; others: veth)")
        if len(ln.mac) not in (0, 6) or len(ln.peer_mac) not in (0, 6):
            _fail(where, f"{what}: a MAC address is not 6 bytes")
        if any(m and not 68 <= m <= 65536 for m in (ln.mtu, ln.peer_mtu)):
            _fail(where, f"{what}: MTU {ln.mtu}/{ln.peer_mtu}")
        if ln.kind == "veth":
            _ifname(where, what + " (node side)", ln.peer_name)
            _ifname(where, what + " (node side's bridge)", ln.peer_master, optional=True)
        elif ln.peer_name or ln.peer_master or ln.peer_mac or ln.peer_mtu:
            _fail(where, f"{what}: a node side for a {ln.kind} interface")
    if "lo" not in names:
        _fail(where, "network namespace without its loopback interface lo")
    for a in net.addresses:
        what = f"address {a.address!r}"
        if a.link not in names:
            _fail(where, f"{what} on interface {a.link!r}, which the image does not make")
        _ip(where, what, a.address, a.v6, optional=False)
        _ip(where, what + " (peer)", a.peer, a.v6)
        _ip(where, what + " (broadcast)", a.broadcast, False)
        if a.prefixlen > (128 if a.v6 else 32) or a.scope > 255 or len(a.label) > 15:
            _fail(where, f"{what}: prefix length {a.prefixlen}, scope {a.scope} or label {a.label!r}")
    for r in net.routes:
        what = f"route to {r.dst or 'default'}/{r.dst_len} (table {r.table})"
        if r.link and r.link not in names:
            _fail(where, f"{what} through interface {r.link!r}, which the image does not make")
        for field, text in (("destination", r.dst), ("gateway", r.gateway), ("source", r.prefsrc)):
            _ip(where, f"{what} ({field})", text, r.v6)
        if r.dst_len > (128 if r.v6 else 32) or r.scope > 255 or r.protocol > 255 or not 0 < r.type <= 12 \
                or r.mtu > 65536 or r.table == 0:
            _fail(where, f"{what}: length, scope, protocol, type, table or MTU out of range")
    for r in net.rules:
        what = f"routing rule {r.priority} (table {r.table})"
        _ip(where, f"{what} (from)", r.src, r.v6)
        _ip(where, f"{what} (to)", r.dst, r.v6)
        _ifname(where, f"{what} (iif)", r.iif, optional=True)
        _ifname(where, f"{what} (oif)", r.oif, optional=True)
        if max(r.src_len, r.dst_len) > (128 if r.v6 else 32) or not 0 < r.action <= 8 or r.tos > 255:
            _fail(where, f"{what}: prefix length, action or TOS out of range")
