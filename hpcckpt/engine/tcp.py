"""Established TCP connections: their kernel state read and written through TCP_REPAIR.

A socket in repair mode sends nothing and lets us read and set what the kernel keeps
for a connection (the approach of CRIU's soccr, re-done here): the sequence number at
the end of each queue, the queues' bytes (the receive queue: data arrived but not read;
the send queue: data written but not yet acknowledged by the peer, the tail of which may
never have been sent), the options negotiated at the handshake (MSS, window scaling,
SACK, timestamps), the window state and the timestamp clock. A socket made anew in repair
mode, bound to the same address, given those numbers and connected, is the same end of
the same connection: no handshake is sent, and the peer notices nothing once the network
lock (kernel/netlock.py) lets their packets through again.

Both functions here act on a socket object of our own process (a pidfd_getfd duplicate
of the target's socket: the same kernel socket), so they use plain setsockopt/recv/send.
Half-closed connections (a FIN sent or received) are rebuilt as established, then given
their FINs: ours by shutdown() (in repair mode: as sent), the peer's, and its
acknowledgement of ours, by a segment forged as the peer's (kernel/tcpforge.py).
SYN_SENT, TIME_WAIT and CLOSE are refused by the caller.
"""
import fcntl
import os
import socket
import struct
import termios
import time

from ..errors import HpcckptError, KernelError, RestoreError, UnsupportedError
from ..images import pb
from ..kernel import netlock, tcpforge
from . import tcpopts

SOL_SOCKET, SOL_TCP = 1, 6
TCP_MAXSEG, TCP_CORK, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT = 2, 3, 4, 5, 6
TCP_INFO, TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 11, 19, 20, 21, 22
TCP_TIMESTAMP, TCP_USER_TIMEOUT, TCP_REPAIR_WINDOW = 24, 18, 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = termios.FIONREAD, termios.TIOCOUTQ, 0x894B
SO_REUSEADDR, SO_KEEPALIVE, SO_SNDBUF, SO_RCVBUF, SO_LINGER = 2, 9, 7, 8, 13
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_PEEK_OFF, SO_OOBINLINE = 32, 33, 42, 10
SO_RCVLOWAT, SO_RCVTIMEO, SO_SNDTIMEO, TCP_NOTSENT_LOWAT = 18, 20, 21, 25
IP_TOS, IPV6_TCLASS, IP_FREEBIND, IPV6_FREEBIND, IP_TRANSPARENT, IPV6_TRANSPARENT = 1, 67, 15, 78, 19, 75
TCP_ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING = 1, 4, 5, 8, 9, 11
# Half-closed states (as soccr): a FIN this end sent first (SNDQ_FIRST_FIN) or after the
# peer's (SNDQ_SECOND_FIN), maybe acknowledged; a FIN received (RCVQ_FIN).
SNDQ_FIRST_FIN, SNDQ_SECOND_FIN, SNDQ_FIN_ACKED = {FIN_WAIT1, FIN_WAIT2, CLOSING}, {LAST_ACK}, {FIN_WAIT2}
RCVQ_FIN = {CLOSE_WAIT, LAST_ACK, CLOSING}
RESTORABLE = {TCP_ESTABLISHED} | SNDQ_FIRST_FIN | SNDQ_SECOND_FIN | RCVQ_FIN
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
               6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
               11: "CLOSING"}
CHUNK = 64 << 10     # receive queue refill: the kernel allocates each send as one skb


def info(s: socket.socket) -> bytes:
    """struct tcp_info (its first bytes: state, ca_state, ..., options, wscales)."""
    return s.getsockopt(SOL_TCP, TCP_INFO, 104)


def state(s: socket.socket) -> int:
    return info(s)[0]


def was_connected(s: socket.socket) -> bool:
    """A CLOSE socket that once had a connection (segments went both ways), unlike a new
    one: tcpi_segs_out and tcpi_segs_in, at offset 136 of struct tcp_info."""
    ti = s.getsockopt(SOL_TCP, TCP_INFO, 144)
    return len(ti) >= 144 and any(struct.unpack_from("II", ti, 136))


def _ioctl_int(s: socket.socket, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), req, b"\0" * 4))[0]


def _int(s: socket.socket, level: int, opt: int) -> int:
    return s.getsockopt(level, opt)


def repair(s: socket.socket, on: bool) -> None:
    """Turning repair off sends a window probe (which a network lock still drops) and
    clears SO_REUSEADDR (the kernel sets sk_reuse for repair): callers put it back."""
    s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON if on else TCP_REPAIR_OFF)


def _queue(s: socket.socket, which: int, length: int, where: str) -> tuple[int, bytes]:
    """(sequence number at the queue's end, its bytes), left in place."""
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, which)
    seq = struct.unpack("I", s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    data = b""
    if length:
        # one byte more than we expect: a queue holding more than its length says is a bug
        data = s.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) != length:
            name = "receive" if which == TCP_RECV_QUEUE else "send"
            raise KernelError(f"{where}: the {name} queue holds {len(data)} bytes, the kernel "
                              f"said {length}; the connection changed while locked")
    return seq, data


def save(s: socket.socket, where: str) -> pb.TcpConnection:
    """The connection state of `s`, which the caller has put in repair mode (and locked)."""
    ti = info(s)
    c = pb.TcpConnection(state=ti[0])
    outq = _ioctl_int(s, SIOCOUTQ)
    c.unsent = _ioctl_int(s, SIOCOUTQNSD)
    if c.state in SNDQ_FIRST_FIN | SNDQ_SECOND_FIN:    # the FIN counts in the send queue: no data
        outq, c.unsent = max(outq - 1, 0), max(c.unsent - 1, 0)
    inq = _ioctl_int(s, SIOCINQ)
    c.mss = _int(s, SOL_TCP, TCP_MAXSEG)
    c.options = ti[5]
    if c.options & TCPI_OPT_WSCALE:
        c.snd_wscale, c.rcv_wscale = ti[6] & 0xF, ti[6] >> 4
    if c.options & TCPI_OPT_TIMESTAMPS:
        c.timestamp = struct.unpack("I", s.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0]
    win = s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20)
    c.snd_wl1, c.snd_wnd, c.max_window, c.rcv_wnd, c.rcv_wup = struct.unpack("5I", win)
    if not _int(s, SOL_SOCKET, SO_OOBINLINE) and tcpopts.urgent_pending(s):
        raise UnsupportedError(f"{where}: the TCP connection has urgent data (MSG_OOB) the program has not "
                               "read yet; its urgent mark cannot be restored: checkpoint again once it is read")
    peek_off = _int(s, SOL_SOCKET, SO_PEEK_OFF)
    if peek_off >= 0:      # a peek offset the program set would make us skip bytes
        s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, -1)
    try:
        c.inq_seq, c.recv_queue = _queue(s, TCP_RECV_QUEUE, inq, where)
        c.outq_seq, c.send_queue = _queue(s, TCP_SEND_QUEUE, outq, where)
    finally:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        if peek_off >= 0:
            s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, peek_off)
    c.peek_off = peek_off
    return c


def save_options(s: socket.socket, family: int, c: pb.TcpConnection) -> None:
    """Socket options a connection carries that the listening-socket code does not save."""
    c.keepalive = bool(_int(s, SOL_SOCKET, SO_KEEPALIVE))
    c.keepidle = _int(s, SOL_TCP, TCP_KEEPIDLE)
    c.keepintvl = _int(s, SOL_TCP, TCP_KEEPINTVL)
    c.keepcnt = _int(s, SOL_TCP, TCP_KEEPCNT)
    c.user_timeout = _int(s, SOL_TCP, TCP_USER_TIMEOUT)
    c.cork = bool(_int(s, SOL_TCP, TCP_CORK))
    c.oobinline = bool(_int(s, SOL_SOCKET, SO_OOBINLINE))
    onoff, secs = struct.unpack("ii", s.getsockopt(SOL_SOCKET, SO_LINGER, 8))
    c.linger, c.linger_secs = bool(onoff), secs
    for name, opt in (("rcvtimeo_us", SO_RCVTIMEO), ("sndtimeo_us", SO_SNDTIMEO)):
        sec, usec = struct.unpack("qq", s.getsockopt(SOL_SOCKET, opt, 16))
        setattr(c, name, max(sec, 0) * 1_000_000 + max(usec, 0))
    c.rcvlowat = _int(s, SOL_SOCKET, SO_RCVLOWAT)
    c.notsent_lowat = _int(s, SOL_TCP, TCP_NOTSENT_LOWAT) & 0xFFFFFFFF
    c.tos = _int(s, socket.IPPROTO_IP, IP_TOS) if family == socket.AF_INET else \
        _int(s, socket.IPPROTO_IPV6, IPV6_TCLASS)


def _send_all(s: socket.socket, data: bytes, chunk: int, what: str, where: str) -> None:
    view, size = memoryview(data), max(chunk, 1)
    while view:
        try:
            n = s.send(view[:size], socket.MSG_DONTWAIT)
        except OSError as e:
            if size > 1024 and e.errno in (12, 11):    # ENOMEM / EAGAIN: smaller pieces
                size //= 2
                continue
            raise RestoreError(f"{where}: cannot give the connection its {what} back "
                               f"({len(view)} of {len(data)} bytes left): {e.strerror}") from None
        view = view[n:]


def restore(s: socket.socket, family: int, local: tuple, peer: tuple, c: pb.TcpConnection,
            reuseaddr: bool, where: str) -> None:
    """Make the fresh socket `s` (ours: a duplicate of the target's) the connection of `c`.
    Leaves it in repair mode; `resume` ends that once the whole tree is in place."""
    st = c.state
    inq_seq = c.inq_seq - (1 if st in RCVQ_FIN else 0)           # the FIN took a sequence number
    outq_seq = c.outq_seq - (1 if st in SNDQ_FIRST_FIN | SNDQ_SECOND_FIN else 0)
    try:
        repair(s, True)
        # the address may not be here yet (a migrated server's, moved once it is restored):
        # bind and connect regardless (IP_TRANSPARENT lets the route lookup take any source)
        v4 = family == socket.AF_INET
        free = [(socket.IPPROTO_IP, IP_FREEBIND) if v4 else (socket.IPPROTO_IPV6, IPV6_FREEBIND),
                (socket.IPPROTO_IP, IP_TRANSPARENT) if v4 else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)]
        for opt in free:
            s.setsockopt(*opt, 1)
        s.bind(local)
        _set_seq(s, TCP_RECV_QUEUE, inq_seq - len(c.recv_queue))
        _set_seq(s, TCP_SEND_QUEUE, outq_seq - len(c.send_queue))
        s.connect(peer)                 # in repair mode: ESTABLISHED at once, nothing sent
        for opt in free:
            s.setsockopt(*opt, 0)
        opts = []
        if c.options & TCPI_OPT_SACK:
            opts.append((TCPOPT_SACK_PERM, 0))
        if c.options & TCPI_OPT_WSCALE:
            opts.append((TCPOPT_WINDOW, c.snd_wscale | c.rcv_wscale << 16))
        if c.options & TCPI_OPT_TIMESTAMPS:
            opts.append((TCPOPT_TIMESTAMP, 0))
        opts.append((TCPOPT_MAXSEG, c.mss))
        s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", *o) for o in opts))
        if c.options & TCPI_OPT_TIMESTAMPS:
            s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("I", c.timestamp))
        room = len(c.recv_queue) + len(c.send_queue)
        if room:                        # the queues must fit whatever the buffers were
            s.setsockopt(SOL_SOCKET, SO_RCVBUFFORCE, max(_int(s, SOL_SOCKET, SO_RCVBUF), room))
            s.setsockopt(SOL_SOCKET, SO_SNDBUFFORCE, max(_int(s, SOL_SOCKET, SO_SNDBUF), room))
        if c.recv_queue:
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _send_all(s, c.recv_queue, CHUNK, "unread data", where)
        sent = len(c.send_queue) - c.unsent
        if sent:                        # sent, not acknowledged: queued as sent, MSS by MSS
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            _send_all(s, c.send_queue[:sent], c.mss, "unacknowledged data", where)
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        if c.unsent:                    # never sent: an ordinary send (the lock holds it back)
            repair(s, False)
            _send_all(s, c.send_queue[sent:], c.mss, "unsent data", where)
            repair(s, True)
        # after the queues: the kernel checks the window against rcv_nxt
        fin_in = st in RCVQ_FIN
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW,
                     struct.pack("5I", c.snd_wl1, c.snd_wnd, c.max_window, c.rcv_wnd + fin_in,
                                 (c.rcv_wup - fin_in) & 0xFFFFFFFF))
        if st != TCP_ESTABLISHED:
            _half_close(s, local, peer, c, inq_seq, outq_seq, where)
        _options(s, family, c)
        if reuseaddr:
            s.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    except OSError as e:
        raise RestoreError(f"{where}: cannot recreate TCP connection {fmt(local)} -> {fmt(peer)}: "
                           f"{e.strerror}{held(c)}") from None


def held(c: pb.TcpConnection) -> str:
    """What a failed restore tells about the connection's lock, which it leaves in place."""
    if not c.lock_table:
        return ""
    return (f" (its peer is still held off by nftables table inet {c.lock_table}: restore again once "
            f"the cause is fixed, or `nft delete table inet {c.lock_table}` to let the connection end)")


def _fin_out(s: socket.socket, acked: bool) -> None:
    """Our FIN into the send queue: as already sent (and acknowledged by the forged ACK
    that follows) when `acked`, else for the kernel to send (the lock holds it back)."""
    if acked:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    s.shutdown(socket.SHUT_WR)
    if acked:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def _half_close(s: socket.socket, local: tuple, peer: tuple, c: pb.TcpConnection, inq_seq: int,
                outq_seq: int, where: str) -> None:
    """Give an established socket the FINs of its half-closed state, in soccr's order."""
    own_ns = netlock.netns_of(s)
    try:
        if os.fstat(own_ns).st_ino != os.stat("/proc/self/ns/net").st_ino:
            raise RestoreError(f"{where}: a half-closed TCP connection ({STATE_NAMES[c.state]}) can only "
                               "be restored in the network namespace of the restore itself")
    finally:
        os.close(own_ns)
    st = c.state
    window = c.snd_wnd >> c.snd_wscale
    snd_una = outq_seq - len(c.send_queue)
    if st in SNDQ_FIRST_FIN:
        _fin_out(s, st in SNDQ_FIN_ACKED)
    if st in RCVQ_FIN:
        tcpforge.send(peer, local, inq_seq, snd_una, tcpforge.FIN | tcpforge.ACK, window, netlock.MARK)
        _wait_state(s, CLOSE_WAIT if st == LAST_ACK else st, where)
    if st in SNDQ_SECOND_FIN:
        _fin_out(s, False)
    if st in SNDQ_FIN_ACKED:
        tcpforge.send(peer, local, inq_seq + (st in RCVQ_FIN), outq_seq + 1, tcpforge.ACK, window, netlock.MARK)
    _wait_state(s, st, where)


def _wait_state(s: socket.socket, want: int, where: str) -> None:
    """The forged segment goes through loopback: its effect shows a moment later."""
    deadline = time.monotonic() + 2
    while state(s) != want:
        if time.monotonic() > deadline:
            raise RestoreError(f"{where}: the half-closed TCP connection did not come back to state "
                               f"{STATE_NAMES[want]} (it is {STATE_NAMES.get(state(s), state(s))}): "
                               "the kernel refused the segment restoring the peer's side")
        time.sleep(0.001)


def _set_seq(s: socket.socket, which: int, seq: int) -> None:
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, which)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", seq & 0xFFFFFFFF))


def _options(s: socket.socket, family: int, c: pb.TcpConnection) -> None:
    if c.keepidle:
        s.setsockopt(SOL_TCP, TCP_KEEPIDLE, c.keepidle)
    if c.keepintvl:
        s.setsockopt(SOL_TCP, TCP_KEEPINTVL, c.keepintvl)
    if c.keepcnt:
        s.setsockopt(SOL_TCP, TCP_KEEPCNT, c.keepcnt)
    if c.keepalive:
        s.setsockopt(SOL_SOCKET, SO_KEEPALIVE, 1)
    if c.user_timeout:
        s.setsockopt(SOL_TCP, TCP_USER_TIMEOUT, c.user_timeout)
    if c.cork:
        s.setsockopt(SOL_TCP, TCP_CORK, 1)
    if c.oobinline:
        s.setsockopt(SOL_SOCKET, SO_OOBINLINE, 1)
    if c.linger:
        s.setsockopt(SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, c.linger_secs))
    if c.tos:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_TOS, c.tos)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS, c.tos)
    if c.peek_off >= 0:
        s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, c.peek_off)
    for value, opt in ((c.rcvtimeo_us, SO_RCVTIMEO), (c.sndtimeo_us, SO_SNDTIMEO)):
        if value:
            s.setsockopt(SOL_SOCKET, opt, struct.pack("qq", value // 1_000_000, value % 1_000_000))
    if c.rcvlowat > 1:
        s.setsockopt(SOL_SOCKET, SO_RCVLOWAT, c.rcvlowat)
    if c.notsent_lowat and c.notsent_lowat != 0xFFFFFFFF:
        s.setsockopt(SOL_TCP, TCP_NOTSENT_LOWAT, c.notsent_lowat)


def resume(s: socket.socket, reuseaddr: bool) -> None:
    """Repair mode off (the kernel sends a window probe), SO_REUSEADDR as the program had it."""
    repair(s, False)
    s.setsockopt(SOL_SOCKET, SO_REUSEADDR, int(reuseaddr))


def fmt(addr) -> str:
    if isinstance(addr, tuple):
        return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
    return repr(addr)


class DumpConnections:
    """The established connections of one dump: locked, in repair mode, until the dump ends.

    Our duplicate of each socket stays open to the end (as CRIU keeps its `rfd`): when
    the tree is killed, the last close finds repair mode on and the kernel drops the
    connection without a FIN or a reset; when the tree runs on (--leave-running, or
    any failure) repair mode is turned off and the connections let through before it is
    thawed (`release`), and the lock's table deleted after (`cleanup`).
    """

    def __init__(self, enabled: bool, root_pid: int):
        self.enabled = enabled
        self.lock = netlock.NetLock(netlock.table_name(root_pid))
        self.held: list[tuple[socket.socket, bool]] = []     # (our duplicate, its SO_REUSEADDR)

    def dump(self, s: socket.socket, family: int, local: tuple, peer: tuple, reuseaddr: bool,
             where: str) -> pb.TcpConnection:
        mine = s.dup()
        try:
            self.lock.lock(mine, family, local, peer)
            repair(mine, True)
        except (OSError, HpcckptError) as e:
            mine.close()
            why = getattr(e, "strerror", None) or str(e)
            if getattr(e, "errno", None) == 1 or "Operation not permitted" in why:
                why += ("; checkpointing a TCP connection needs CAP_NET_ADMIN over its network "
                        "namespace (TCP_REPAIR, nftables): dump as root")
            raise KernelError(f"{where}: cannot lock TCP connection {fmt(local)} -> {fmt(peer)}: "
                              f"{why}") from None
        self.held.append((mine, reuseaddr))
        if state(mine) not in RESTORABLE:    # it changed between our look and the lock
            raise UnsupportedError(f"{where}: TCP connection {fmt(local)} -> {fmt(peer)} went to state "
                                   f"{STATE_NAMES.get(state(mine), '?')} while being checkpointed; "
                                   "try again")
        try:
            c = save(mine, where)
            save_options(mine, family, c)
        except OSError as e:
            raise KernelError(f"{where}: cannot read TCP connection {fmt(local)} -> {fmt(peer)} "
                              f"in repair mode: {e.strerror}") from None
        c.lock_table = self.lock.table
        return c

    def release(self) -> list[str]:
        """The tree will run on: repair off, options as they were, connections let through
        (the lock's table stays until `cleanup`, after the thaw). Returns notes."""
        notes = []
        for s, reuseaddr in self.held:
            try:
                resume(s, reuseaddr)
            except OSError as e:
                notes.append(f"a TCP connection may stay in repair mode: {e.strerror}")
            s.close()
        self.held.clear()
        return notes + self.lock.open()

    def cleanup(self) -> list[str]:
        """Once the tree runs: the lock's tables deleted (slow, so not while it is frozen)."""
        return self.lock.cleanup()

    def keep(self) -> None:
        """The tree is dead: close our duplicates (silently, repair is on), keep the lock
        until the restore has the connections back."""
        for s, _ in self.held:
            s.close()
        self.held.clear()
        self.lock.keep()
