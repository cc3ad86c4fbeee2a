"""Terminals: pty pairs held by the tree, controlling terminals, and shell jobs.

Two cases (docs/ttys.md; CRIU's criu/tty.c is the model):

- A pty whose master is held inside the tree (tmux, screen, a test harness): the pair
  is saved once (termios, locked termios, window size, packet mode, lock, owner, its
  session and foreground group, the bytes queued in each direction) and recreated on
  restore from /dev/ptmx, asking for the same index (as CRIU does: open /dev/ptmx until
  the kernel, which hands out the lowest free index, reaches it), so /dev/pts/N paths the
  programs remember stay right. If that index is taken, another is used and the
  restore says so (`Terminals.notes`).
- A terminal held outside the tree (the job runs in someone's shell: a "shell job"):
  refused unless the dump and the restore both say --shell-job; the restored tree then
  gets the terminal of the `hpcckpt restore` command, and, if the job was in the
  foreground of its terminal, the foreground of that one.

Controlling terminals are per session: a session leader gets its terminal right after
its setsid() during the tree's creation (injected open + TIOCSCTTY), before it forks the
rest of its session, which inherit it as they did originally; the foreground group is
set once all groups exist. Everything else (parameters, queues) is done from here
through our own duplicate of the master, since termios ioctls on a master act on its
slave.
"""
import errno
import fcntl
import os
import select
import signal
import stat
import struct
import time
from dataclasses import dataclass, field

from ..errors import KernelError, RestoreError, UnsupportedError
from ..images import pb
from ..kernel import proc
from ..kernel.inject import Mem
from ..kernel.libc import pidfd_getfd, pidfd_open

PTMX = "/dev/ptmx"
PTMX_RDEV = os.makedev(5, 2)
DEV_TTY_RDEV = os.makedev(5, 0)
PTS_MAJORS = range(136, 144)
TTY_MAJORS = {4, 5} | set(PTS_MAJORS)

TCGETS, TCSETS, TIOCGLCKTRMIOS, TIOCSLCKTRMIOS = 0x5401, 0x5402, 0x5456, 0x5457
TIOCGWINSZ, TIOCSWINSZ, TIOCPKT, TIOCSCTTY = 0x5413, 0x5414, 0x5420, 0x540E
TIOCGPGRP, TIOCSPGRP, TIOCGSID, TIOCINQ = 0x540F, 0x5410, 0x5429, 0x541B
TIOCEXCL, TIOCGEXCL = 0x540C, 0x80045440
TIOCGPTN, TIOCSPTLCK, TIOCGPKT, TIOCGPTLCK = 0x80045430, 0x40045431, 0x80045438, 0x80045439
TERMIOS_SIZE = 36                      # struct termios of the kernel (4 flags, c_line, 19 c_cc)
WINSIZE = struct.Struct("<4H")
O_NOCTTY, O_NONBLOCK, O_CLOEXEC, O_ACCMODE = 0o400, 0o4000, 0o2000000, 0o3
AT_FDCWD = -100
QUEUE_MAX = 1 << 20                    # bytes of queued data kept per direction
# termios bits (asm-generic): input translations, output processing, echo and signals
ICRNL, INLCR, IGNCR, ISTRIP, IUCLC, IXON = 0o400, 0o100, 0o200, 0o40, 0o1000, 0o2000
OPOST = 0o1
ISIG, ICANON, ECHO, ECHOE, ECHOK, ECHONL, IEXTEN = 0o1, 0o2, 0o10, 0o20, 0o40, 0o100, 0o100000
ECHOCTL, ECHOKE = 0o1000, 0o4000
VEOF, VEOL, VEOL2 = 4, 11, 16
MAX_INDEX = 1 << 20
SEARCH = 64                            # ptmx opens tried while asking for an index


def kind_of(st: os.stat_result) -> str | None:
    """'master', 'slave' (a pty's /dev/pts/N), 'dev_tty' (/dev/tty), 'other' (a console,
    serial line or virtual terminal) or None (not a terminal)."""
    if not stat.S_ISCHR(st.st_mode):
        return None
    if st.st_rdev == PTMX_RDEV:
        return "master"
    if st.st_rdev == DEV_TTY_RDEV:
        return "dev_tty"
    if os.major(st.st_rdev) in PTS_MAJORS:
        return "slave"
    return "other" if os.major(st.st_rdev) in TTY_MAJORS else None


def pts_index(rdev: int) -> int:
    return (os.major(rdev) - PTS_MAJORS[0]) * 256 + os.minor(rdev)


def _tty_nr(pid: int) -> tuple[int, int]:
    """(controlling terminal as a device number (0: none), its foreground group (host PID))."""
    f = proc.stat_fields(pid)
    nr = int(f[4])
    return os.makedev((nr >> 8) & 0xFFF, (nr & 0xFF) | ((nr >> 12) & 0xFFF00)), int(f[5])


def _local(pid: int, fd: int) -> int:
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


def _ioctl_int(fd: int, req: int, value: int | None = None) -> int:
    buf = bytearray(struct.pack("<i", value or 0))
    fcntl.ioctl(fd, req, buf)
    return struct.unpack("<i", buf)[0]


def _get(fd: int, req: int, size: int) -> bytes:
    buf = bytearray(size)
    fcntl.ioctl(fd, req, buf)
    return bytes(buf)


def _shell_job_error(pid: int, fd: int | None, path: str) -> UnsupportedError:
    where = f"fd {fd} is" if fd is not None else "its controlling terminal is"
    return UnsupportedError(
        f"process {pid}: {where} the terminal {path}, held outside the process tree (the job "
        "runs in someone's terminal: a shell job). Dump with --shell-job; `hpcckpt restore "
        "--shell-job` then gives the tree the terminal it is run from")


def masters(descs) -> dict[int, tuple[int, int]]:
    """pty index -> (host PID, fd) of a master held in the tree (its first holder)."""
    if "pty-masters" not in descs.cache:
        out: dict[int, tuple[int, int]] = {}
        for key, ref in sorted(descs.fds.items()):
            if ref.st.st_rdev == PTMX_RDEV and stat.S_ISCHR(ref.st.st_mode) and "tty-index" in ref.info:
                out.setdefault(int(ref.info["tty-index"]), key)
        descs.cache["pty-masters"] = out
    return descs.cache["pty-masters"]


def describe_fd(e: pb.Fd, pid: int, fd: int, st: os.stat_result, info: dict, descs,
                shell_job: bool) -> None:
    """Fill in a terminal fd (files.dump_fds calls this for every terminal)."""
    k = kind_of(st)
    if k == "master":
        e.kind = pb.TTY
        e.tty.CopyFrom(pb.TtyFd(index=int(info["tty-index"]), master=True))
        return
    if k == "slave" and pts_index(st.st_rdev) in masters(descs):
        e.kind = pb.TTY
        e.tty.CopyFrom(pb.TtyFd(index=pts_index(st.st_rdev)))
        return
    if k == "dev_tty":
        ctty, _ = _tty_nr(pid)
        if ctty == 0 or (os.major(ctty) in PTS_MAJORS and pts_index(ctty) in masters(descs)) or shell_job:
            e.kind = pb.TTY
            e.tty.CopyFrom(pb.TtyFd(dev_tty=True))
            return
        raise _shell_job_error(pid, fd, e.path)
    if not shell_job:
        raise _shell_job_error(pid, fd, e.path)
    descs.cache["shell-job"] = pts_index(st.st_rdev) if k == "slave" else 0   # an external Tty is due
    if fd <= 2:
        e.kind = pb.INHERITED            # the restore command's own stdio, as before
    else:
        e.kind = pb.TTY
        e.tty.CopyFrom(pb.TtyFd(external=True, index=pts_index(st.st_rdev) if k == "slave" else 0))


# -- dump ----------------------------------------------------------------------------

@dataclass
class DumpTerminals:
    """The terminals of a frozen tree: every process's controlling terminal, the pty
    pairs held in the tree, and the shell job's terminal; their queues, read last."""
    descs: object
    ns: dict[int, int]                   # host PID -> tree PID
    shell_job: bool
    ttys: dict[int, pb.Tty] = field(default_factory=dict)
    external: pb.Tty | None = None
    fds: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # index -> (master, slave) here
    _read: bool = False

    def process(self, host: int, p: pb.Process, sid_host: int) -> None:
        """Its controlling terminal, if any (zombies keep none)."""
        if p.zombie:
            return
        ctty, fg = _tty_nr(host)
        if not ctty:
            return
        if os.major(ctty) in PTS_MAJORS and pts_index(ctty) in masters(self.descs):
            p.ctty.CopyFrom(pb.TtyFd(index=pts_index(ctty)))
            return
        path = f"/dev/pts/{pts_index(ctty)}" if os.major(ctty) in PTS_MAJORS else \
            f"the terminal {os.major(ctty)}:{os.minor(ctty)}"
        if sid_host == host:
            raise UnsupportedError(
                f"process {host} leads a session whose controlling terminal {path} is held outside "
                "the process tree; dump the process that holds its master (e.g. the terminal "
                "emulator, tmux or screen server) with it")
        if not self.shell_job:
            # only a controlling terminal, no fd on it (those are refused in describe_fd):
            # restored, it has whatever session and terminal the restore command has, as
            # any tree whose session is outside it does
            return
        p.ctty.CopyFrom(pb.TtyFd(external=True))
        if self.external is None:
            self.external = pb.Tty(external=True, index=pts_index(ctty) if os.major(ctty) in PTS_MAJORS else 0,
                                   pgrp=self.ns.get(fg, 0))

    def collect(self) -> list[pb.Tty]:
        """Every pty pair of the tree, read through our duplicate of its master."""
        for index, (host, fd) in sorted(masters(self.descs).items()):
            try:
                self._collect_one(index, host, fd)
            except OSError as e:
                raise KernelError(f"pty /dev/pts/{index} (master: process {host} fd {fd}): cannot read "
                                  f"its state: {e.strerror}") from None
        if self.external is None and "shell-job" in self.descs.cache:
            self.external = pb.Tty(external=True, index=self.descs.cache["shell-job"])
        return list(self.ttys.values()) + ([self.external] if self.external else [])

    def _collect_one(self, index: int, host: int, fd: int) -> None:
        m = _local(host, fd)
        self.fds[index] = (m, None)
        t = pb.Tty(index=index)
        t.locked = _ioctl_int(m, TIOCGPTLCK) != 0
        t.packet_mode = _ioctl_int(m, TIOCGPKT) != 0
        t.termios = _get(m, TCGETS, TERMIOS_SIZE)
        t.termios_locked = _get(m, TIOCGLCKTRMIOS, TERMIOS_SIZE)
        t.rows, t.cols, t.xpixel, t.ypixel = WINSIZE.unpack(_get(m, TIOCGWINSZ, WINSIZE.size))
        for name, req in (("sid", TIOCGSID), ("pgrp", TIOCGPGRP)):
            try:
                who = _ioctl_int(m, req)
            except OSError:
                continue              # ENOTTY: no session has it as controlling terminal
            if who == 0:
                continue              # no foreground group
            if who not in self.ns:
                raise UnsupportedError(
                    f"pty /dev/pts/{index} (master: process {host} fd {fd}) is the controlling "
                    f"terminal of {'session' if name == 'sid' else 'foreground group'} {who}, "
                    "outside the process tree; dump that session too")
            setattr(t, name, self.ns[who])
        if not t.locked:
            path = f"/dev/pts/{index}"
            try:
                s = os.open(path, os.O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)
            except OSError as e:
                raise KernelError(f"pty {path} (master: process {host} fd {fd}): cannot open its "
                                  f"slave side: {e.strerror}") from None
            self.fds[index] = (m, s)
            st = os.fstat(s)
            t.uid, t.gid, t.mode = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
            t.exclusive = _ioctl_int(s, TIOCGEXCL) != 0
        self.ttys[index] = t

    def read_queues(self) -> None:
        """Take the bytes queued in both directions (destructive: `write_back` returns
        them if the tree lives on). Done last, once nothing else can fail."""
        self._read = True
        for index, t in self.ttys.items():
            m, s = self.fds[index]
            if s is None:
                continue
            t.output = _drain(m, packet=t.packet_mode)
            raw = bytearray(t.termios)
            lflag = struct.unpack_from("<I", raw, 12)[0]
            struct.pack_into("<I", raw, 12, lflag & ~(ICANON | ECHO | ISIG | IEXTEN))
            raw[17 + 6], raw[17 + 5] = 0, 0          # VMIN = VTIME = 0
            try:
                fcntl.ioctl(s, TCSETS, bytes(raw))  # a partial line becomes readable too
                try:
                    t.input = _drain(s, packet=False)
                finally:
                    fcntl.ioctl(s, TCSETS, t.termios)
            except OSError as e:
                raise KernelError(f"pty /dev/pts/{index}: cannot read its queued input: {e.strerror}") from None

    def write_back(self) -> None:
        """Give the queues back to the ptys (the tree runs on, or the dump failed)."""
        if not self._read:
            return
        self._read = False
        for index, t in self.ttys.items():
            m, s = self.fds[index]
            if s is not None:
                try:
                    put_queues(m, s, t.termios, t.output, t.input)
                except OSError:
                    pass                  # a terminal never promised delivery: best effort

    def close(self) -> None:
        for m, s in self.fds.values():
            for x in (m, s):
                if x is not None:
                    os.close(x)
        self.fds.clear()


def _drain(fd: int, packet: bool) -> bytes:
    """What can be read from `fd` now, without waiting (in packet mode each read starts
    with a status byte, dropped here)."""
    out = bytearray()
    while len(out) < QUEUE_MAX and select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EAGAIN):
                break
            raise
        if not chunk:
            break
        out += chunk[1:] if packet else chunk
    return bytes(out)


def put_queues(master: int, slave: int, termios_: bytes, output: bytes, input_: bytes) -> None:
    """Queue `output` for the master's reader and `input_` for the slave's, as they were,
    ending with `termios_` set. The bytes were processed by the line discipline once:
    output is written with output processing off, input with echo, signals and input
    translation off, so neither is changed or echoed a second time."""
    t = bytearray(termios_)
    iflag, oflag, cflag, lflag = struct.unpack_from("<4I", t)
    if output:
        struct.pack_into("<4I", t, 0, iflag, oflag & ~OPOST, cflag, lflag)
        fcntl.ioctl(slave, TCSETS, bytes(t))
        _write_all(slave, output)
    if input_:
        struct.pack_into("<4I", t, 0, iflag & ~(ICRNL | INLCR | IGNCR | ISTRIP | IUCLC | IXON), oflag, cflag,
                         lflag & ~(ECHO | ECHOE | ECHOK | ECHONL | ECHOCTL | ECHOKE | ISIG | IEXTEN))
        fcntl.ioctl(slave, TCSETS, bytes(t))
        _write_all(master, input_)
        _wait_received(slave, input_, termios_)
    fcntl.ioctl(slave, TCSETS, termios_)


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` (it came out of these very buffers, so it fits back in); a short
    write becomes an error naming how much was left."""
    view = memoryview(data)
    deadline = time.monotonic() + 1.0
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, f"{len(view)} of {len(data)} bytes did not fit") from None
            time.sleep(0.002)


def _wait_received(slave: int, data: bytes, termios_: bytes) -> None:
    """The line discipline takes written input asynchronously (a kernel worker): wait
    until the slave shows it before the final termios (with echo) applies."""
    lflag = struct.unpack_from("<I", termios_, 12)[0]
    cc = termios_[17:36]
    if lflag & ICANON:
        ends = {ord("\n"), cc[VEOF], cc[VEOL], cc[VEOL2]} - {0}
        last = max((i for i, b in enumerate(data) if b in ends), default=-1)
        want = last + 1
    else:
        want = len(data)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if want and _ioctl_int(slave, TIOCINQ) >= want:
            break
        time.sleep(0.002)
        if not want:                      # nothing countable: one short pause suffices
            time.sleep(0.02)
            break


# -- restore -------------------------------------------------------------------------

@dataclass
class Made:
    """One pty recreated for the restore: its master in the root stub and here."""
    tty: pb.Tty
    index: int                # its index now
    stub_fd: int              # the master's fd in the root stub (shared from there)
    local: int                # our own duplicate of the master
    slave: int = -1           # our own slave fd, for parameters and queues

    @property
    def path(self) -> str:
        return f"/dev/pts/{self.index}"


@dataclass
class Terminals:
    """The terminals of an image being restored."""
    ttys: dict[int, pb.Tty]
    external: pb.Tty | None
    shell_job: bool
    made: dict[int, Made] = field(default_factory=dict)
    owner_ns_pid: int = 0                # the root stub, holder of every new master
    terminal: str | None = None          # the restore command's terminal (shell job)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def prepare(cls, images: str, inv: pb.Inventory, procs: list[pb.Process], shell_job: bool) -> "Terminals":
        """Check what the image asks for before anything is touched."""
        from ..images.validate import validate_ttys
        validate_ttys(images, inv, procs)
        t = cls({x.index: x for x in inv.ttys if not x.external},
                next((x for x in inv.ttys if x.external), None), shell_job)
        needs_terminal = any(f.kind == pb.TTY and f.tty.external for p in procs for f in p.fds)
        if t.external is not None or needs_terminal:
            if not shell_job:
                raise RestoreError(
                    f"{images} was dumped from a shell job (its terminal was held outside the tree): "
                    "restore it with --shell-job; the tree then gets this command's terminal")
            t.terminal = own_terminal()
            if t.terminal is None and needs_terminal:
                raise RestoreError(f"{images}: the job had its terminal open beyond stdio; "
                                   "`hpcckpt restore --shell-job` must itself run in a terminal")
        return t

    def create(self, stub) -> None:
        """Every pty pair, made in the root stub (a create.Stub) before it forks anything,
        lowest index first so each can ask for its old one."""
        self.owner_ns_pid = stub.ns_pid
        for index in sorted(self.ttys):
            try:
                self._create_one(stub, index)
            except OSError as e:
                raise RestoreError(f"recreating pty /dev/pts/{index}: {e.strerror}") from None

    def _create_one(self, stub, index: int) -> None:
        t = self.ttys[index]
        fd, now = _open_ptmx(stub, index)
        if now != index:
            self.notes.append(f"pty /dev/pts/{index} is taken here: restored as /dev/pts/{now}")
        local = _local(stub.host, fd)
        m = Made(t, now, fd, local)
        self.made[index] = m
        _ioctl_int(local, TIOCSPTLCK, 0)
        m.slave = os.open(m.path, os.O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)
        if t.uid or t.gid or t.mode:
            os.fchown(m.slave, t.uid, t.gid)
            os.fchmod(m.slave, t.mode)
        if len(t.termios_locked) == TERMIOS_SIZE and any(t.termios_locked):
            fcntl.ioctl(local, TIOCSLCKTRMIOS, t.termios_locked)
        fcntl.ioctl(local, TCSETS, t.termios)
        # before any session owns it: a changed size would send SIGWINCH to nobody
        fcntl.ioctl(local, TIOCSWINSZ, WINSIZE.pack(t.rows, t.cols, t.xpixel, t.ypixel))
        if t.exclusive:
            fcntl.ioctl(m.slave, TIOCEXCL)

    def set_ctty(self, stub, p: pb.Process) -> None:
        """A session leader, right after its setsid(): its controlling terminal."""
        if not p.HasField("ctty") or p.ctty.external:
            return
        m = self.made[p.ctty.index]
        inj = stub.inj
        fd = inj.syscall("openat", AT_FDCWD, stub.put(m.path.encode() + b"\0", 1024),
                         os.O_RDWR | O_NOCTTY | O_CLOEXEC)
        try:
            res = inj.syscall("ioctl", fd, TIOCSCTTY, 0, check=False)
            if res < 0:
                raise RestoreError(f"process {p.pid} cannot take {m.path} as its controlling terminal: "
                                   f"{os.strerror(-res)}")
        finally:
            inj.syscall("close", fd, check=False)

    def set_foreground(self, stubs: dict) -> None:
        """Once every group exists: each pty's foreground group, set by its session
        leader (TIOCSPGRP is only allowed to a process whose controlling terminal it is)."""
        for m in self.made.values():
            if not (m.tty.sid and m.tty.pgrp):
                continue
            leader = stubs[m.tty.sid]
            inj = leader.inj
            fd = inj.syscall("openat", AT_FDCWD, leader.put(m.path.encode() + b"\0", 1024),
                             os.O_RDWR | O_NOCTTY | O_CLOEXEC)
            try:
                res = inj.syscall("ioctl", fd, TIOCSPGRP, leader.put(struct.pack("<i", m.tty.pgrp), 1088),
                                  check=False)
            finally:
                inj.syscall("close", fd, check=False)
            if res < 0:
                raise RestoreError(f"pty {m.path}: cannot make group {m.tty.pgrp} its foreground: "
                                   f"{os.strerror(-res)}")

    def open_fd(self, t, e: pb.Fd) -> int:
        """A terminal fd of restore target `t` (restore.Target), staged at any number."""
        flags = e.flags & ~(O_CLOEXEC | 0o100 | 0o200 | 0o1000)      # never O_CREAT, O_EXCL, O_TRUNC
        if e.tty.master:
            fd = t.take_fd(_Holder(self.owner_ns_pid), self.made[e.tty.index].stub_fd)
            t.sys("fcntl", fd, 4, flags & ~O_ACCMODE)          # F_SETFL: one description
            return fd
        if e.tty.dev_tty:
            path = "/dev/tty"
        elif e.tty.external:
            if self.terminal is None:
                raise RestoreError(f"process {t.ns_pid} fd {e.fd}: its terminal was outside the tree "
                                   "and this restore has no terminal to give it")
            path = self.terminal
        else:
            path = self.made[e.tty.index].path
        fd = t.sys("openat", AT_FDCWD, t.cstr(path), flags | O_NOCTTY, check=False)
        if fd < 0:
            raise RestoreError(f"process {t.ns_pid} fd {e.fd}: cannot open {path}: {os.strerror(-fd)}")
        return fd

    def finish(self, host_of) -> None:
        """Queued bytes, packet mode and lock, once every fd is in place; and a shell
        job's foreground. Then our own duplicates go."""
        for m in self.made.values():
            t = m.tty
            try:
                put_queues(m.local, m.slave, t.termios, t.output, t.input)
            except OSError as e:
                self.notes.append(f"pty {m.path}: queued data not restored ({e.strerror})")
            try:
                _ioctl_int(m.local, TIOCPKT, 1 if t.packet_mode else 0)
                if t.locked:
                    _ioctl_int(m.local, TIOCSPTLCK, 1)
            except OSError as e:
                raise RestoreError(f"pty {m.path}: cannot set packet mode or lock: {e.strerror}") from None
        if self.external is not None and self.external.pgrp and self.terminal:
            give_foreground(self.terminal, host_of(self.external.pgrp))
        self.close()

    def close(self) -> None:
        for m in self.made.values():
            for x in (m.local, m.slave):
                if x >= 0:
                    os.close(x)
            m.local = m.slave = -1


@dataclass
class _Holder:
    """What restore.Target.take_fd needs of the process holding an fd."""
    ns_pid: int

    def flush(self) -> None:
        """Nothing queued here: the fd exists already."""


def _open_ptmx(stub, want: int) -> tuple[int, int]:
    """Open /dev/ptmx in `stub` until the kernel gives index `want` (it hands out the
    lowest free one); if `want` is taken, the first index given. Returns (fd, index)."""
    inj = stub.inj
    path = stub.put(PTMX.encode() + b"\0", 1024)
    arg = stub.put(bytes(4), 1088)
    extra: list[tuple[int, int]] = []
    mem = Mem(stub.host)
    try:
        for _ in range(SEARCH):
            fd = inj.syscall("openat", AT_FDCWD, path, os.O_RDWR | O_NOCTTY | O_CLOEXEC, check=False)
            if fd < 0:
                raise RestoreError(f"cannot open {PTMX} to recreate pty /dev/pts/{want}: {os.strerror(-fd)}")
            inj.syscall("ioctl", fd, TIOCGPTN, arg)
            got = struct.unpack("<I", mem.read(arg, 4))[0]
            if got == want or got > want:
                break
            extra.append((fd, got))
        else:                              # want is far beyond free ones: the lowest will do
            fd, got = extra.pop(0)
        return fd, got
    finally:
        for x, _ in extra:
            inj.syscall("close", x, check=False)
        mem.close()


def own_terminal() -> str | None:
    """The terminal this command runs in (its stdin, stdout or stderr), as a path."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.ttyname(fd)
        except OSError:
            continue
    return None


_given: tuple[int, int] | None = None    # (our terminal fd, our group) after give_foreground


def give_foreground(terminal: str, pgrp_host: int) -> None:
    """Make the restored job the foreground of our terminal, as it was of its own; the
    restore command takes it back when the job ends (`take_back_foreground`)."""
    global _given
    fd = os.open(terminal, os.O_RDWR | O_NOCTTY | O_CLOEXEC)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            os.tcsetpgrp(fd, pgrp_host)
            _given = (fd, os.getpgrp())
            return
    except OSError:
        pass                              # not our controlling terminal: nothing to hand over
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(fd)


def take_back_foreground() -> None:
    global _given
    if _given is None:
        return
    fd, pgrp = _given
    _given = None
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, pgrp)
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(fd)

