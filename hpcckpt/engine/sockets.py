"""Sockets: unix socket pairs inside the tree, and TCP/UDP sockets that hold no connection.

A unix socket whose peer is also held in the tree (socketpair, or an accepted connection)
is saved as one end of a pair, keyed by the smaller inode of the two; the restore makes
one socketpair() and gives each end to its process, as pipes are done. Unread data is read
at dump without being consumed (a duplicate taken with pidfd_getfd, MSG_PEEK, and
SO_PEEK_OFF to step over messages one by one, keeping their boundaries), and on restore
sent into the peer end, so it lands in this end's queue again.

A listening TCP socket or a bound UDP socket is recreated, given its options, and bound
(with SO_REUSEADDR while binding: the killed original may leave TIME_WAIT behind) to the
same address and port. An established TCP connection is saved and recreated through
TCP_REPAIR (engine/tcp.py) when the dump was asked to (--tcp-established), locked from the
dump until the restore has every process in place (`resume`), half-closed ones too;
connecting or reset ones are refused naming the addresses and the state.
"""
import fcntl
import os
import socket
import stat
import struct
import sys
import termios
from dataclasses import dataclass

from ..errors import HpcckptError, ImageError, RestoreError, UnsupportedError
from ..images import pb
from ..kernel import listenlock, netlock, sockdiag
from ..kernel.libc import pidfd_getfd, pidfd_open
from . import tcp, tcpopts, unixlisten

SOL_SOCKET, SOL_TCP, SOL_IPV6 = 1, 6, 41
SO_REUSEADDR, SO_SNDBUF, SO_RCVBUF, SO_REUSEPORT = 2, 7, 8, 15
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_PEEK_OFF, SO_BUF_LOCK = 32, 33, 42, 72
IPV6_V6ONLY, TCP_NODELAY = 26, 1
O_NONBLOCK, SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o4000, 0o2000000
F_SETFL = 4
SCM_RIGHTS = 1
TYPE_NAMES = {1: "stream", 2: "datagram", 3: "raw", 4: "rdm", 5: "seqpacket", 10: "packet"}
FAMILY_NAMES = {1: "unix", 2: "IPv4", 10: "IPv6", 16: "netlink", 17: "packet"}
ANC_SPACE = socket.CMSG_SPACE(253 * 4)
TCP_CLOSE = 7                                      # a unix socket never connected (sock_diag state)
AT_FDCWD = -100


def _dup(pid: int, fd: int) -> socket.socket:
    """Our own duplicate of the process's socket (the same socket, not a copy).
    Never change its blocking mode: that would change the process's too."""
    pidfd = pidfd_open(pid)
    try:
        local = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    return socket.socket(fileno=local)


def unix_table(descs) -> dict[int, sockdiag.UnixSock]:
    if "unix" not in descs.cache:
        descs.cache["unix"] = sockdiag.unix_sockets()
    return descs.cache["unix"]


def tree_sockets(descs) -> set[int]:
    """Inodes of every socket an fd of the tree leads to."""
    if "inodes" not in descs.cache:
        descs.cache["inodes"] = {r.st.st_ino for r in descs.fds.values() if r.target.startswith("socket:")}
    return descs.cache["inodes"]


def pair_inside(descs, ino: int) -> bool:
    """A unix socket connected to a socket the tree holds too, or one in flight in a queue
    of the tree's (so not stdio leading out)."""
    u = unix_table(descs).get(ino)
    return u is not None and u.peer != 0 and held(descs, u.peer)


def held(descs, ino: int) -> bool:
    """A socket an fd of the tree holds, or one passed (SCM_RIGHTS) and still queued in a
    unix socket of the tree's; the queues are only looked at when the fds do not tell."""
    return ino in tree_sockets(descs) or ino in in_flight_sockets(descs)


def in_flight_sockets(descs) -> set[int]:
    """Inodes of the sockets passed with SCM_RIGHTS and not yet received, in the queues of
    the unix sockets the tree holds (what those carry in turn is refused when described)."""
    if "flight" in descs.cache:
        return descs.cache["flight"]
    found: set[int] = set()
    table, seen = unix_table(descs), set()

    def note(x: int) -> pb.PassedFile:
        st = os.fstat(x)
        if stat.S_ISSOCK(st.st_mode):
            found.add(st.st_ino)
        return pb.PassedFile()

    for (pid, fd), ref in sorted(descs.fds.items()):
        u = table.get(ref.st.st_ino) if ref.target.startswith("socket:") else None
        if u is None or u.ino in seen or u.state == sockdiag.TCP_LISTEN:
            continue
        seen.add(u.ino)
        try:
            s = _dup(pid, fd)
        except OSError:
            continue
        try:
            _peek(s, u.type == socket.SOCK_STREAM, f"process {pid}: fd {fd}", note, dead=bool(u.shutdown & 1))
        except (OSError, UnsupportedError):
            pass               # described (and refused, if need be) with the fd itself
        finally:
            s.close()
    descs.cache["flight"] = found
    return found


def _fmt(addr) -> str:
    if isinstance(addr, tuple):
        return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
    return repr(addr)


def _passed(x: int, where: str, descs, pid: int) -> pb.PassedFile:
    """What a file passed in flight is (our duplicate `x`, from a peek). A unix socket or a
    pipe is the description an fd of the tree holds too (by file id), or else described
    in full as an object of its own; a regular file, directory or device is taken by
    path; anything else is refused."""
    st = os.fstat(x)
    target = os.readlink(f"/proc/self/fd/{x}")
    fifo = stat.S_ISFIFO(st.st_mode) and (target.startswith("pipe:") or (
        target.startswith("/") and not target.endswith(" (deleted)")))
    if stat.S_ISSOCK(st.st_mode) or fifo:
        fid = _tree_description(x, st, target, where, descs)
        return pb.PassedFile(file_id=fid) if fid else _flight_object(x, st, target, where, descs, pid)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISCHR(st.st_mode)) \
            or not target.startswith("/") or target.endswith(" (deleted)"):
        raise UnsupportedError(f"{where} has {target} in flight (passed with SCM_RIGHTS, not yet received); "
                               "only files, directories, devices, unix sockets and pipes can be "
                               "checkpointed in flight")
    return pb.PassedFile(path=target, flags=_fdinfo_flags(x), pos=_fdinfo(x)["pos"])


def _fdinfo(x: int) -> dict[str, int]:
    with open(f"/proc/self/fdinfo/{x}") as f:
        info = dict(line.split(":", 1) for line in f if ":" in line)
    return {"flags": int(info["flags"], 8), "pos": int(info["pos"])}


def _fdinfo_flags(x: int) -> int:
    return _fdinfo(x)["flags"] & ~os.O_CLOEXEC


def _tree_description(x: int, st: os.stat_result, target: str, where: str, descs) -> int:
    """The file id of the tree's description `x` (ours, from a peek) is, 0 if no fd of the
    tree holds it (kcmp among the fds leading to the same inode)."""
    from .shared import same_description
    index = descs.cache.get("by_inode")
    if index is None:
        index = descs.cache["by_inode"] = {}
        for key, ref in descs.fds.items():
            index.setdefault((ref.st.st_dev, ref.st.st_ino), []).append(key)
    me = os.getpid()
    for p2, fd2 in index.get((st.st_dev, st.st_ino), ()):
        if not same_description(me, x, p2, fd2):
            continue
        outside = (not descs.pipe_inside(st.st_ino)) if stat.S_ISFIFO(st.st_mode) else \
            (not pair_inside(descs, st.st_ino) and unix_table(descs).get(st.st_ino) is not None
             and unix_table(descs)[st.st_ino].state != sockdiag.TCP_LISTEN)
        if fd2 <= 2 and outside:
            raise UnsupportedError(f"{where} has {target} in flight, which is also process {p2}'s "
                                   f"fd {fd2} leading outside the tree; it cannot be passed again")
        return descs.ids[(p2, fd2)]
    return 0


def _flight_object(x: int, st: os.stat_result, target: str, where: str, descs, pid: int) -> pb.PassedFile:
    """A unix socket or pipe end held by no fd of the tree, only by queues: described as an
    fd would be, once (a second reference names it by its file id). Sockets have one
    description each; pipe ends are told apart by access mode only."""
    flags = _fdinfo_flags(x)
    pipe = stat.S_ISFIFO(st.st_mode)          # a pipe, or a FIFO (by its path)
    key = (st.st_ino, flags & 3) if pipe else st.st_ino
    objs = descs.cache.setdefault("flight_objects", {})
    if key in objs:
        return pb.PassedFile(file_id=objs[key])
    fid = objs[key] = max(descs.ids.values(), default=0) + 1 + len(objs)
    e = pb.Fd(fd=0, flags=flags, file_id=fid, path=target)
    at = f"{where}: {target} in flight"
    if pipe:
        from . import files
        descs.pipe_modes.setdefault(st.st_ino, set()).add(flags & 3)
        if not descs.pipe_inside(st.st_ino):
            raise UnsupportedError(f"{at} (passed with SCM_RIGHTS) is a pipe or FIFO leading outside "
                                   "the process tree; only those with both ends inside can be checkpointed")
        e.kind, e.pipe_id = pb.PIPE, st.st_ino
        e.pipe_size = fcntl.fcntl(x, files.F_GETPIPE_SZ)
        if flags & 3 != os.O_WRONLY and descs.first(("pipe", st.st_ino)):
            e.pipe_data = files.tee_pipe(x)
        return pb.PassedFile(object=e)
    s = socket.socket(fileno=os.dup(x))
    try:
        _describe(e, s, pid, st.st_ino, descs, True, at)
    finally:
        s.close()
    if e.socket.family != socket.AF_UNIX:
        raise UnsupportedError(f"{at}: only unix sockets (and pipes) can be checkpointed in flight, "
                               f"not {FAMILY_NAMES.get(e.socket.family, e.socket.family)} ones")
    if e.socket.in_flight:
        raise UnsupportedError(f"{at} has fds in flight in its own queue (passed fds nested in a "
                               "passed socket); this cannot be checkpointed yet: let the receiver "
                               "take them first")
    return pb.PassedFile(object=e)


def _peek(s: socket.socket, stream: bool, where: str, passed,
          dead: bool = False) -> tuple[list[bytes], list[pb.InFlight]]:
    """The receive queue, message by message, left in place, with the files passed along
    (`passed(our duplicate)` says what each is; a stream's chunks are kept apart then:
    each goes back with its own sendmsg). `dead`: shut down for reading (the peer closed,
    or shut its sending side), where an empty queue reads as an empty message (seqpacket)
    or EOF, not EAGAIN: an empty message without fds ends the queue then (one the peer
    sent before is taken for the end)."""
    inq = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    size = max(inq, s.getsockopt(SOL_SOCKET, SO_RCVBUF), 1 << 16)
    old = s.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
    s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
    out: list[bytes] = []
    flight: list[pb.InFlight] = []
    try:
        while True:
            try:
                data, anc, flags, _ = s.recvmsg(size, ANC_SPACE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for level, kind, payload in anc:
                if level == SOL_SOCKET and kind == SCM_RIGHTS:
                    fds = struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4])
                    try:
                        flight.append(pb.InFlight(message=len(out), files=[passed(x) for x in fds]))
                    finally:
                        for x in fds:
                            os.close(x)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise UnsupportedError(f"{where} holds a message larger than {size} bytes (or with more "
                                       "passed fds than one message may carry)")
            if not data and not anc and (stream or dead):
                break
            out.append(data)
    finally:
        s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, old)
    return ([b"".join(out)] if stream and out and not flight else out), flight


def describe(e: pb.Fd, pid: int, ino: int, descs, first: bool) -> None:
    """Fill `e` for a socket, or refuse it naming process, fd and the socket.
    `first`: this is the first fd of its description (it carries the queued data)."""
    s = _dup(pid, e.fd)
    try:
        _describe(e, s, pid, ino, descs, first, f"process {pid}: fd {e.fd}")
    finally:
        s.close()


def _describe(e: pb.Fd, s: socket.socket, pid: int, ino: int, descs, first: bool, at: str) -> None:
    """Fill `e` for socket `s` (our duplicate of a socket of process `pid`, held by an fd or
    in flight in a queue of its: `at` says which)."""
    k = pb.Socket(family=s.getsockopt(SOL_SOCKET, socket.SO_DOMAIN),
                  type=s.getsockopt(SOL_SOCKET, socket.SO_TYPE),
                  protocol=s.getsockopt(SOL_SOCKET, socket.SO_PROTOCOL),
                  sndbuf=s.getsockopt(SOL_SOCKET, SO_SNDBUF), rcvbuf=s.getsockopt(SOL_SOCKET, SO_RCVBUF))
    where = f"{at} ({FAMILY_NAMES.get(k.family, k.family)} {TYPE_NAMES.get(k.type, k.type)} socket:[{ino}])"
    if k.family == socket.AF_UNIX:
        _unix(k, s, ino, descs, first, where, pid)
    elif k.family in (socket.AF_INET, socket.AF_INET6) and k.type in (1, 2):
        _inet(k, s, ino, descs, first, where)
    else:
        raise UnsupportedError(f"{where}: this kind of socket cannot be checkpointed yet")
    e.kind = pb.SOCKET
    e.socket.CopyFrom(k)


def _unix(k: pb.Socket, s: socket.socket, ino: int, descs, first: bool, where: str, pid: int) -> None:
    u = unix_table(descs).get(ino)
    if u is None:
        raise UnsupportedError(f"{where}: not found through sock_diag (another network namespace?)")
    name = u.name.decode(errors="replace").replace("\0", "@")
    if u.state == sockdiag.TCP_LISTEN:
        unixlisten.describe(k, unixlisten.absolute(u, pid), u.rqueue, where)
        return
    table = unix_table(descs)
    one_way = bool(u.peer) and u.peer in table and table[u.peer].peer != ino
    if k.type == socket.SOCK_DGRAM and (not u.peer or one_way):
        _named_dgram(k, s, u, pid, descs, first, where)
        return
    if not u.peer and dead_peer(k, u):
        _dead_peer(k, s, ino, u, first, where, descs, pid)
        return
    if not u.peer and u.state == TCP_CLOSE and not u.name:
        return                          # never connected nor bound: socket() makes it again
    if not u.peer:
        raise UnsupportedError(f"{where}{' bound to ' + repr(name) if name else ''} is not connected "
                               "to a peer; only connected pairs, listening sockets and unconnected "
                               "unnamed ones can be checkpointed")
    if not held(descs, u.peer):
        raise UnsupportedError(f"{where} is connected to socket:[{u.peer}], which no process of the "
                               "tree holds; only unix sockets with both ends in the tree are supported")
    k.pair_id, k.end, k.shutdown = min(ino, u.peer), int(ino > u.peer), u.shutdown
    if k.type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET) and u.peer in table:
        _pair_names(k, u, table[u.peer], descs, pid, where)
    if first:
        queue, flight = _peek(s, k.type == socket.SOCK_STREAM, where, lambda x: _passed(x, where, descs, pid),
                              dead=bool(u.shutdown & 1))
        k.queue.extend(queue)
        k.in_flight.extend(flight)


def dead_peer(k: pb.Socket, u) -> bool:
    """A stream or seqpacket socket that was connected and whose peer has been closed:
    sock_diag still says ESTABLISHED but names no peer. sshd's monitor holds one (its end
    of the pair with the pre-authentication child, which has exited)."""
    return k.type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET) and u.state == sockdiag.TCP_ESTABLISHED


def _dead_peer(k: pb.Socket, s: socket.socket, ino: int, u, first: bool, where: str, descs, pid: int) -> None:
    """Saved as one end of a pair of its own (CRIU's way): the restore makes a socketpair,
    gives this end its unread data back through the other, and closes the other with
    the staged fds, so reads drain the queue then see EOF and writes fail with EPIPE, as
    they would have."""
    k.pair_id, k.end, k.shutdown, k.dead_peer = ino, 0, u.shutdown, True
    if first:
        queue, flight = _peek(s, k.type == socket.SOCK_STREAM, where,
                              lambda x: _passed(x, where, descs, pid), dead=True)
        k.queue.extend(queue)
        k.in_flight.extend(flight)


def _name_key(u):
    """What makes two unix sockets' names the same: the socket file (path names), or the
    abstract name; None if unnamed."""
    return ("vfs", u.vfs_ino) if u.vfs_ino else ("name", u.name) if u.name else None


def _pair_names(k: pb.Socket, u, peer, descs, pid: int, where: str) -> None:
    """A connected stream/seqpacket pair whose ends have names (an accept()ed connection
    carries its listener's, a client may have bound one): this end's name, and whether it
    is the accepted end, decided alike from both ends: the end named like a listening
    socket, else the only named one, else the one with the smaller inode."""
    if not (u.name or peer.name):
        return
    if "listen_keys" not in descs.cache:
        descs.cache["listen_keys"] = {_name_key(x) for x in unix_table(descs).values()
                                      if x.state == sockdiag.TCP_LISTEN and _name_key(x)}
    keys = descs.cache["listen_keys"]
    ends = sorted((u, peer), key=lambda x: x.ino)
    like = [x for x in ends if _name_key(x) in keys]
    named = [x for x in ends if x.name]
    acceptor = like[0] if len(like) == 1 else named[0]
    k.accepted = acceptor is u
    if not u.name:
        return
    name = unixlisten.absolute(u, pid)
    if not name.startswith(b"\0"):
        name = name.rstrip(b"\0")
    if not name.startswith((b"/", b"\0")):    # relative, its file gone: from the working directory
        try:
            name = os.path.join(os.readlink(f"/proc/{pid}/cwd").encode(), name)
        except OSError:
            name = b"/" + name
    k.address = os.fsdecode(name)


def _named_dgram(k: pb.Socket, s: socket.socket, u, pid: int, descs, first: bool, where: str) -> None:
    """A datagram socket outside any pair: bound to a name others send to, and/or connected
    one way to a named socket of the tree. Restored by bind and (after every fd) connect."""
    if u.name:
        unixlisten.bound_name(k, unixlisten.absolute(u, pid), where)
    if u.peer:
        peer = unix_table(descs)[u.peer]
        name = unixlisten.absolute(peer, pid)
        if not held(descs, u.peer) or not name.startswith((b"/", b"\0")):
            raise UnsupportedError(f"{where} is connected to {name!r}, a socket outside the tree (or "
                                   "not reachable by name from here); only its own sockets can be reconnected")
        k.peer_address = os.fsdecode(name)
    if first:
        queue, flight = _peek(s, False, where, lambda x: _passed(x, where, descs, pid))
        if queue and not k.address:
            raise UnsupportedError(f"{where} has {len(queue)} datagram(s) queued but no name to send "
                                   "them to again on restore")
        k.queue.extend(queue)
        k.in_flight.extend(flight)
        if queue:
            descs.notes.append(f"{where} ({k.address!r}): {len(queue)} queued datagram(s) kept; "
                               "their senders' names are not")


def _inet(k: pb.Socket, s: socket.socket, ino: int, descs, first: bool, where: str) -> None:
    try:
        k.buf_lock = s.getsockopt(SOL_SOCKET, SO_BUF_LOCK)
    except OSError:                     # before Linux 5.14: no telling, keep them as they are
        k.buf_lock = 3
    name = s.getsockname()
    try:
        peer = s.getpeername()
    except OSError:
        peer = None
    k.address, k.port = name[0], name[1]
    if k.address in ("0.0.0.0", "::") and k.port == 0:
        k.address = ""
    k.reuseaddr = bool(s.getsockopt(SOL_SOCKET, SO_REUSEADDR))
    k.reuseport = bool(s.getsockopt(SOL_SOCKET, SO_REUSEPORT))
    if k.family == socket.AF_INET6:
        k.v6only = bool(s.getsockopt(SOL_IPV6, IPV6_V6ONLY))
    if k.type == socket.SOCK_STREAM:
        k.nodelay = bool(s.getsockopt(SOL_TCP, TCP_NODELAY))
        state = tcp.state(s)
        k.listening = state == sockdiag.TCP_LISTEN
        tcpopts.save(k, s, ino, descs, where)
        if state in tcp.RESTORABLE and peer is not None:
            _established(k, s, name, peer, descs, first, where)
            return
        if state == 7 and tcp.was_connected(s):
            raise UnsupportedError(
                f"{where}: TCP socket {_fmt(name)} has lost its connection (state CLOSE: reset by the "
                "peer, or closed on both sides) and the program has yet to close it; such a socket "
                "cannot be checkpointed: checkpoint again once the program has closed it")
        if peer is not None or state not in (sockdiag.TCP_LISTEN, 7):
            peer = peer or _peer_by_inode(ino)
            raise UnsupportedError(
                f"{where}: TCP connection {_fmt(name)} -> {_fmt(peer) if peer else '?'} is in state "
                f"{tcp.STATE_NAMES.get(state, state)}; {STATE_HELP.get(state, 'this state cannot be checkpointed')}")
        k.listening = state == sockdiag.TCP_LISTEN
        if k.listening:
            q = sockdiag.tcp_listen_queue(ino, k.family)
            backlog, waiting = q if q else (socket.SOMAXCONN, 0)
            if waiting:
                _waiting_connections(name, waiting, descs, where)
            k.backlog = backlog
            k.listen_lock = getattr(descs.cache.get("tcp"), "locked", {}).get(ino, "")
        return
    if peer is not None:
        k.peer_address, k.peer_port = peer[0], peer[1]
    if first:
        dropped, _ = _peek(s, False, where, lambda x: pb.PassedFile())   # (UDP carries no files)
        if dropped:
            descs.notes.append(f"{where} on {_fmt(name)}: {len(dropped)} queued datagram(s) "
                               "dropped (their senders' addresses cannot be given back)")


def _waiting_connections(name, waiting: int, descs, where: str) -> None:
    """Connections in a listener's accept queue cannot be put back into one (CRIU refuses
    them too, or skips them with --tcp-skip-in-flight). When the tree runs on after the
    dump (--leave-running, --live, pre-dump) its program accepts them as usual and the
    image, a snapshot of the server, simply lacks them: noted. When the tree is to be
    killed they would be lost (their clients reset): refused."""
    peers = ", ".join(_fmt(p) for p in _unaccepted(name[1])) or "?"
    if descs.cache.get("runs_on"):
        descs.notes.append(f"{where} listening on {_fmt(name)}: {waiting} connection(s) waiting to be "
                           f"accepted (from {peers}) stay with the running program; a restore of this "
                           "image will not have them")
        return
    raise UnsupportedError(f"{where} listening on {_fmt(name)} (state LISTEN) has {waiting} "
                           f"connection(s) waiting to be accepted (from {peers}); they cannot "
                           "be checkpointed yet: checkpoint again once the program has "
                           "accepted them")


STATE_HELP = {
    2: "a connection still being opened (SYN_SENT) cannot be checkpointed: try again once it is "
       "established",
}


def _established(k: pb.Socket, s: socket.socket, name, peer, descs, first: bool, where: str) -> None:
    """An established TCP connection: saved through TCP_REPAIR (engine/tcp.py), locked
    from now until the restore, when the dump was asked to (--tcp-established)."""
    k.peer_address, k.peer_port = peer[0], peer[1]
    conns = descs.cache.get("tcp")
    if conns is None or not conns.enabled:
        raise UnsupportedError(
            f"{where} is an established TCP connection {_fmt(name)} -> {_fmt(peer)} "
            f"(state {tcp.STATE_NAMES[tcp.state(s)]}); "
            "pass --tcp-established to checkpoint it (its peer then waits, its packets held back, "
            "until the restore; only a restore of this very checkpoint can take it up again)")
    if len(name) > 3 and (name[3] or peer[3]):
        raise UnsupportedError(f"{where}: TCP connection {_fmt(name)} -> {_fmt(peer)} uses link-local "
                               "IPv6 addresses (scoped to an interface); not supported yet")
    if first:
        k.tcp.CopyFrom(conns.dump(s, k.family, (name[0], name[1]), (peer[0], peer[1]), k.reuseaddr, where))


# -- restore -----------------------------------------------------------------------------

@dataclass
class Pair:
    owners: tuple          # the restore.Targets holding each end, staged
    ends: tuple[int, int]  # the staged fd of each end in its owner


def _setint(t, fd: int, level: int, opt: int, value: int, check: bool = True) -> int:
    return t.sys("setsockopt", fd, level, opt, t.put(struct.pack("<i", value)), 4, check=check)


def _buffers(t, fd: int, k: pb.Socket) -> None:
    for opt, force, v in ((SO_SNDBUF, SO_SNDBUFFORCE, k.sndbuf), (SO_RCVBUF, SO_RCVBUFFORCE, k.rcvbuf)):
        if v and _setint(t, fd, SOL_SOCKET, force, v // 2, check=False) < 0:
            _setint(t, fd, SOL_SOCKET, opt, v // 2, check=False)


def sockaddr(family: int, address: str, port: int) -> bytes:
    if family == socket.AF_INET:
        return struct.pack("<H", family) + struct.pack(">H", port) + socket.inet_pton(family, address or "0.0.0.0") + bytes(8)
    return (struct.pack("<H", family) + struct.pack(">HI", port, 0)
            + socket.inet_pton(family, address or "::") + bytes(4))


def create(t, e: pb.Fd, pairs: "Restoring", local_copy) -> int:
    """The socket of `e` in target `t` (a restore.Target); returns its fd there. A queue
    carrying passed fds is refilled later (`pass_in_flight`), once every fd exists."""
    k = e.socket
    where = f"process {t.ns_pid} fd {e.fd}"

    def refill(local_fd, to=None):
        run = lambda: _refill(local_fd(), k, where, lambda f: pairs.passed_fd(t, f, where), to=to)  # noqa: E731
        pairs.deferred.append(run) if k.in_flight else run()

    if k.family == socket.AF_UNIX and k.listening:
        return unixlisten.create(t, e)
    if unixlisten.named_dgram(k):
        fd = unixlisten.create(t, e)
        if k.queue:   # sent again to its name, from a socket of ours
            refill(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach(), to=os.fsencode(k.address))
        return fd
    if k.family == socket.AF_UNIX and not k.pair_id:      # never connected: a plain socket
        return t.sys("socket", socket.AF_UNIX, k.type | (SOCK_NONBLOCK if e.flags & O_NONBLOCK else 0), 0)
    if k.family == socket.AF_UNIX:
        if k.pair_id not in pairs:
            pairs[k.pair_id] = _connect_pair(pairs, k.pair_id, where) or _socketpair(t, k)
        pair = pairs[k.pair_id]
        fd = t.take_fd(pair.owners[k.end], pair.ends[k.end])
        _buffers(t, fd, k)
        if k.queue:
            refill(lambda: local_copy(pair.owners[1 - k.end], pair.ends[1 - k.end]))
        t.sys("fcntl", fd, F_SETFL, e.flags & O_NONBLOCK)
        return fd
    fd = t.sys("socket", k.family, k.type | (SOCK_NONBLOCK if e.flags & O_NONBLOCK else 0), k.protocol)
    if k.HasField("tcp"):
        return _connection(t, fd, k, pairs, local_copy, where)
    _setint(t, fd, SOL_SOCKET, SO_REUSEADDR, 1)
    _inet_options(t, fd, k)
    _setint(t, fd, SOL_SOCKET, SO_BUF_LOCK, k.buf_lock & 3, check=False)   # autotuning back on
    if k.address or k.port:
        sa = sockaddr(k.family, k.address, k.port)
        res = t.sys("bind", fd, t.put(sa), len(sa), check=False)
        if res < 0:
            proto = "TCP" if k.type == socket.SOCK_STREAM else "UDP"
            raise RestoreError(f"{where}: cannot bind {proto} {_fmt((k.address, k.port))} again: "
                               f"{os.strerror(-res)}{holder(k)}")
    if k.listening:
        t.sys("listen", fd, k.backlog or socket.SOMAXCONN)
        if k.listen_lock:
            _locked_listener(t, fd, k, pairs, local_copy)
    if k.peer_port:
        sa = sockaddr(k.family, k.peer_address, k.peer_port)
        t.sys("connect", fd, t.put(sa), len(sa))
    if not k.reuseaddr:
        _setint(t, fd, SOL_SOCKET, SO_REUSEADDR, 0)
    return fd


def _inet_options(t, fd: int, k: pb.Socket) -> None:
    """The options every inet socket gets back before it is bound or connected."""
    if k.reuseport:
        _setint(t, fd, SOL_SOCKET, SO_REUSEPORT, 1)
    if k.family == socket.AF_INET6:
        _setint(t, fd, SOL_IPV6, IPV6_V6ONLY, int(k.v6only))
    if k.nodelay:
        _setint(t, fd, SOL_TCP, TCP_NODELAY, 1)
    if k.type == socket.SOCK_STREAM:
        tcpopts.restore(t, fd, k, f"process {t.ns_pid} socket fd {fd}")
    _buffers(t, fd, k)


class Restoring(dict):
    """What a restore builds socket by socket: unix pairs by id (the dict), and the TCP
    connections made so far, in repair mode until `resume` once the whole tree is in place.
    `setup` gives it the tree: the targets, the descriptions made so far (file id ->
    (target, staged fd), shared with restore.Shared) and how to make one fd of an image."""

    def __init__(self):
        super().__init__()
        self.tcp: list[tuple[socket.socket, pb.Socket]] = []    # (our duplicate, the image's socket)
        self.locks: dict[tuple[str, int], tuple[int, list]] = {}  # (table, netns) -> (netns fd, connections)
        self.listen_locks: dict[tuple[str, int], tuple[int, list]] = {}   # the same for listeners (listenlock)
        self.deferred: list = []        # refills of queues carrying passed fds, run by pass_in_flight
        self.ends: dict[int, dict[int, tuple[int, pb.Fd]]] = {}   # pair id -> end -> (holder pid, its Fd)
        self.listeners: dict[str, tuple[int, pb.Fd]] = {}       # unix name -> (holder pid, listening Fd)
        self.flight: list[tuple[int, pb.Fd]] = []               # (queue holder pid, in-flight object)
        self.targets: dict = {}
        self.desc: dict = {}
        self.make = None
        self.local_copy = None

    def setup(self, procs: list[pb.Process], targets: dict, desc: dict, make, local_copy) -> None:
        self.targets, self.desc, self.make, self.local_copy = targets, desc, make, local_copy
        for p in procs:
            for e in p.fds:
                if e.kind != pb.SOCKET or e.socket.family != socket.AF_UNIX:
                    continue
                self._note(p.pid, e)
                for f in in_flight_objects(e):
                    self.flight.append((p.pid, f))
                    if f.kind == pb.SOCKET:
                        self._note(p.pid, f)

    def _note(self, pid: int, e: pb.Fd) -> None:
        k = e.socket
        if k.pair_id:
            self.ends.setdefault(k.pair_id, {}).setdefault(k.end, (pid, e))
        if k.listening and k.address:
            self.listeners.setdefault(k.address, (pid, e))

    def staged(self, pid: int, e: pb.Fd) -> tuple:
        """(target, staged fd) of description `e` of process `pid`, made now in that process
        if it does not exist yet (its own staging takes it then)."""
        if e.file_id not in self.desc:
            t = self.targets[pid]
            fd = self.make(t, e)
            high = t.sys("fcntl", fd, F_DUPFD_CLOEXEC, t.fd_base)
            t.sys("close", fd)
            t.extra_fds.append(high)
            self.desc[e.file_id] = (t, high)
        return self.desc[e.file_id]

    def passed_fd(self, t, f: pb.PassedFile, where: str) -> int:
        """A file passed in flight, as our fd: the description made for it (an fd of the tree
        or an in-flight object), or (files, directories, devices) opened again by `t`."""
        fid = f.object.file_id if f.HasField("object") else f.file_id
        if not fid:
            return _open_passed(t, f, self.local_copy, where)
        if fid not in self.desc:
            raise ImageError(f"image is invalid: {where} passes file id {fid} in flight, which no fd "
                             "or in-flight object of the image has")
        return self.local_copy(*self.desc[fid])


F_DUPFD_CLOEXEC = 1030


def in_flight_objects(e: pb.Fd) -> list[pb.Fd]:
    """The unix sockets and pipe ends only `e`'s queue holds (passed, not yet received)."""
    if e.kind != pb.SOCKET:
        return []
    return [f.object for m in e.socket.in_flight for f in m.files if f.HasField("object")]


def _socketpair(t, k: pb.Socket) -> Pair:
    """Both ends made by `t` with socketpair() (unnamed, as socketpair makes them)."""
    sv = t.put(bytes(8))
    t.sys("socketpair", socket.AF_UNIX, k.type, 0, sv)
    a, b = struct.unpack("<ii", t.mem.read(sv, 8))
    ends = tuple(t.sys("fcntl", x, F_DUPFD_CLOEXEC, t.fd_base) for x in (a, b))
    t.sys("close", a)
    t.sys("close", b)
    t.extra_fds += list(ends)
    return Pair((t, t), ends)


SO_PEERCRED = 17


def _connect_pair(r: Restoring, pair_id: int, where: str) -> Pair | None:
    """A pair whose accepted end is named: the other end (bound to its own name first, if
    it had one) connects to that name and the accepted end's holder accepts, so both ends'
    getsockname/getpeername are what they were. The listener is the restored one bound to
    the name, if the image has it, else a temporary one (its socket file removed after, if
    it made one). None (a socketpair then) if the name is taken by a live socket outside."""
    ends = r.ends.get(pair_id, {})
    acc = next((x for x in ends.values() if x[1].socket.accepted and x[1].socket.address), None)
    if acc is None or len(ends) != 2:
        return None
    con = ends[1 - acc[1].socket.end]
    ka, kc = acc[1].socket, con[1].socket
    ta, tc = r.targets[acc[0]], r.targets[con[0]]
    name = ka.address
    made_file = False
    if name in r.listeners:
        lfd = ta.take_fd(*r.staged(*r.listeners[name]))
    else:
        if unixlisten.live(name, ka.type):
            print(f"hpcckpt: {where}: unix socket name {name!r} is taken by a live socket; the "
                  "connection comes back unnamed (as a socketpair)", file=sys.stderr)
            return None
        made_file = not name.startswith("\0") and not os.path.lexists(name)
        lfd = ta.sys("socket", socket.AF_UNIX, ka.type | SOCK_CLOEXEC, 0)
        res = unixlisten.bind(ta, lfd, name)
        if res < 0:
            ta.sys("close", lfd)
            print(f"hpcckpt: {where}: cannot bind {name!r} to connect the pair again "
                  f"({os.strerror(-res)}); it comes back unnamed (as a socketpair)", file=sys.stderr)
            return None
        ta.sys("listen", lfd, 1)
    c = -1
    # a name's socket file exists after the restore only if it did before (the program may
    # have removed it; the name stays the socket's all the same)
    con_file = bool(kc.address) and not kc.address.startswith("\0") and not os.path.lexists(kc.address)
    try:
        c = tc.sys("socket", socket.AF_UNIX, kc.type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)
        if kc.address:
            res = unixlisten.bind(tc, c, kc.address)
            if res < 0:
                print(f"hpcckpt: {where}: cannot bind {kc.address!r} again ({os.strerror(-res)}); "
                      "the pair comes back unnamed (as a socketpair)", file=sys.stderr)
                tc.sys("close", c)
                return None
        sa = unixlisten.sockaddr(name)
        res = tc.sys("connect", c, tc.put(sa), len(sa), check=False)
        if res < 0:
            raise RestoreError(f"{where}: cannot connect to unix socket {name!r} again: {os.strerror(-res)}")
        a = _accept_from(ta, lfd, tc, where)
    finally:
        ta.sys("close", lfd)
        if made_file:
            ta.sys("unlinkat", unixlisten.AT_FDCWD, ta.cstr(name), 0, check=False)
        if con_file:
            tc.sys("unlinkat", unixlisten.AT_FDCWD, tc.cstr(kc.address), 0, check=False)
    owners, fds = [None, None], [0, 0]
    for end, t, fd in ((ka.end, ta, a), (kc.end, tc, c)):
        owners[end] = t
        fds[end] = t.sys("fcntl", fd, F_DUPFD_CLOEXEC, t.fd_base)
        t.sys("close", fd)
        t.extra_fds.append(fds[end])
    return Pair(tuple(owners), tuple(fds))


def _accept_from(ta, lfd: int, tc, where: str) -> int:
    """Accept, in `ta`, the connection `tc` just made; one made meanwhile by a process
    outside (SO_PEERCRED names another process) is closed, as a server that was down would."""
    for _ in range(64):
        a = ta.sys("accept4", lfd, 0, 0, SOCK_CLOEXEC, check=False)
        if a < 0:
            raise RestoreError(f"{where}: cannot accept the pair's connection again: {os.strerror(-a)}")
        s = socket.socket(fileno=_local(ta, a))
        try:
            pid = struct.unpack("<3i", s.getsockopt(SOL_SOCKET, SO_PEERCRED, 12))[0]
        finally:
            s.close()
        if pid == tc.pid:
            return a
        ta.sys("close", a)
    raise RestoreError(f"{where}: the listener kept taking connections from outside the tree")


def _local(t, fd: int) -> int:
    pidfd = pidfd_open(t.pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


def pass_in_flight(r: Restoring) -> None:
    """Every fd of every process staged: the objects only queues held are made (by the
    process holding the queue), then the queues carrying passed fds are refilled."""
    for pid, e in r.flight:
        if e.file_id in r.desc:
            continue
        t, fd = r.staged(pid, e)
        k = e.socket
        where = f"process {t.ns_pid}: socket in flight"
        if e.kind == pb.SOCKET and unixlisten.named_dgram(k) and k.peer_address:
            sa = unixlisten.sockaddr(k.peer_address)
            res = t.sys("connect", fd, t.put(sa), len(sa), check=False)
            if res < 0:
                raise RestoreError(f"{where}: cannot connect to unix socket {k.peer_address!r} again: "
                                   f"{os.strerror(-res)}")
        if e.kind == pb.SOCKET and k.shutdown:
            t.sys("shutdown", fd, {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}[k.shutdown & 3])
    for run in r.deferred:
        run()
    r.deferred.clear()


def _connection(t, fd: int, k: pb.Socket, pairs, local_copy, where: str) -> int:
    """An established TCP connection in target `t`'s new socket `fd`: options set by
    injection as for any inet socket, the connection itself through our duplicate."""
    _inet_options(t, fd, k)
    s = socket.socket(fileno=local_copy(t, fd))
    try:
        tcp.restore(s, k.family, (k.address, k.port), (k.peer_address, k.peer_port), k.tcp,
                    k.reuseaddr, where)
    except BaseException:
        s.close()
        raise
    try:
        s.setsockopt(SOL_SOCKET, SO_BUF_LOCK, k.buf_lock & 3)   # after the queues forced room
    except OSError:
        pass
    pairs.tcp.append((s, k))
    return fd


def _locked_listener(t, fd: int, k: pb.Socket, restoring: "Restoring", local_copy) -> None:
    """A listener whose dump locked its port (kernel/listenlock.py): remembered, by lock
    table and network namespace, to be let through in `resume`."""
    s = socket.socket(fileno=local_copy(t, fd))
    try:
        nsfd = netlock.netns_of(s)
    finally:
        s.close()
    key = (k.listen_lock, os.fstat(nsfd).st_ino)
    if key in restoring.listen_locks:
        os.close(nsfd)
    else:
        restoring.listen_locks[key] = (nsfd, [])
    restoring.listen_locks[key][1].append((k.family, k.address, k.port))


def resume(restoring: "Restoring") -> None:
    """Every process in place, none running yet: the connections leave repair mode and the
    network locks their dumps left let them through again (`cleanup` tidies up later)."""
    try:
        for s, k in restoring.tcp:
            tcp.resume(s, k.reuseaddr)
            if k.tcp.lock_table:
                nsfd = netlock.netns_of(s)
                key = (k.tcp.lock_table, os.fstat(nsfd).st_ino)
                if key in restoring.locks:
                    os.close(nsfd)
                else:
                    restoring.locks[key] = (nsfd, [])
                restoring.locks[key][1].append((k.family, (k.address, k.port), (k.peer_address, k.peer_port)))
        for (table, _), (nsfd, conns) in restoring.locks.items():
            netlock.unlock(table, conns, nsfd)
        for (table, _), (nsfd, found) in restoring.listen_locks.items():
            listenlock.unlock(table, found, nsfd)
    except OSError as e:
        raise RestoreError(f"cannot take a restored TCP connection out of repair mode: {e.strerror}") from None
    finally:
        for s, _ in restoring.tcp:
            s.close()
        restoring.tcp.clear()


def cleanup(restoring: "Restoring") -> list[str]:
    """Once the restored tree runs: its connections leave the lock tables, and a table
    that locks nothing more goes (deletions are slow, so they wait until now)."""
    notes = []
    for (table, _), (nsfd, conns) in restoring.locks.items():
        try:
            netlock.forget(table, conns, nsfd)
        except HpcckptError as e:
            notes.append(f"network lock table inet {table} not cleaned up: {e}")
        finally:
            os.close(nsfd)
    restoring.locks.clear()
    for (table, _), (nsfd, _) in restoring.listen_locks.items():
        try:
            listenlock.drop(table, nsfd)
        except HpcckptError as e:
            notes.append(f"listener lock table inet {table} not removed: {e}")
        finally:
            os.close(nsfd)
    restoring.listen_locks.clear()
    return notes


def _open_passed(t, f: pb.PassedFile, local_copy, where: str) -> int:
    """A file passed in flight, opened again by the target (so with the image owner's file
    credentials), as our fd; its position set on the shared description."""
    flags = f.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC) | os.O_CLOEXEC
    fd = t.sys("openat", AT_FDCWD, t.cstr(f.path), flags, check=False)
    if fd < 0:
        raise RestoreError(f"{where}: cannot open {f.path}, passed in flight in the socket's queue: "
                           f"{os.strerror(-fd)}")
    try:
        local = local_copy(t, fd)
    finally:
        t.sys("close", fd)
    if f.pos:
        os.lseek(local, f.pos, os.SEEK_SET)
    return local


def _refill(local: int, k: pb.Socket, where: str, open_passed, to: bytes | None = None) -> None:
    """Send the saved queue of one end through its peer (our duplicate `local`), with the
    files that were in flight attached to their messages again."""
    s = socket.socket(fileno=local)
    passed = {m.message: m.files for m in k.in_flight}
    try:
        total = sum(len(m) for m in k.queue)
        if total > s.getsockopt(SOL_SOCKET, SO_SNDBUF) // 2:
            s.setsockopt(SOL_SOCKET, SO_SNDBUFFORCE, total * 2 + (1 << 16))
        for i, m in enumerate(k.queue):
            view = memoryview(m)
            fds = [open_passed(f) for f in passed.get(i, ())]
            try:
                while True:
                    anc = [(SOL_SOCKET, SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                    n = s.sendmsg([view], anc, socket.MSG_DONTWAIT, *([to] if to else []))
                    fds_sent, fds = fds, []
                    for x in fds_sent:
                        os.close(x)
                    if k.type != socket.SOCK_STREAM or n == len(view):
                        break
                    view = view[n:]
            finally:
                for x in fds:
                    os.close(x)
    except OSError as ex:
        raise RestoreError(f"{where}: cannot give the socket its {len(k.queue)} queued "
                           f"message(s) back: {ex.strerror}") from None
    finally:
        s.close()


def finish(t, p: pb.Process, local_copy) -> None:
    """Once every fd is in place and every queue refilled: datagram sockets connect to the
    names they were connected to (bound by now, whichever process holds them); then shut
    down what was shut down."""
    for e in p.fds:
        if e.kind == pb.SOCKET and unixlisten.named_dgram(e.socket) and e.socket.peer_address:
            sa = unixlisten.sockaddr(e.socket.peer_address)
            res = t.sys("connect", e.fd, t.put(sa), len(sa), check=False)
            if res < 0:
                raise RestoreError(f"process {p.pid} fd {e.fd}: cannot connect to unix socket "
                                   f"{e.socket.peer_address!r} again: {os.strerror(-res)}")
    for e in p.fds:
        if e.kind == pb.SOCKET and e.socket.shutdown:
            how = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}[e.socket.shutdown & 3]
            s = socket.socket(fileno=local_copy(t, e.fd))
            try:
                s.shutdown(how)
            except OSError as ex:
                raise RestoreError(f"process {p.pid} fd {e.fd}: cannot shut the socket down again: "
                                   f"{ex.strerror}") from None
            finally:
                s.close()


# -- checks before a restore touches anything ------------------------------------------

def _proc_net(*names: str):
    """The split rows of /proc/net/NAME tables (header skipped; a table the kernel lacks,
    e.g. without IPv6, is skipped)."""
    for name in names:
        try:
            with open(f"/proc/net/{name}") as f:
                next(f)
                rows = [line.split() for line in f]
        except FileNotFoundError:
            continue
        yield from rows


def _holder_of(ino: int) -> tuple[str, str, str] | None:
    """(pid, comm, fd) of a process holding socket inode `ino`, None if none we can see."""
    target = f"socket:[{ino}]"
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                    with open(f"/proc/{name}/comm") as f:
                        return name, f.read().strip(), fd
        except OSError:
            continue
    return None


def _bound_here(k: pb.Socket) -> int:
    """Inode of a socket of this node on the same port and protocol, 0 if none."""
    tcp = k.type == socket.SOCK_STREAM
    for x in _proc_net(*(("tcp", "tcp6") if tcp else ("udp", "udp6"))):
        if int(x[1].rsplit(":", 1)[1], 16) == k.port and (not tcp or x[3] == "0A"):
            return int(x[9])
    return 0


def holder(k: pb.Socket) -> str:
    ino = _bound_here(k)
    if not ino:
        return ""
    h = _holder_of(ino)
    if h is None:
        return f" (port {k.port} is held by socket:[{ino}], of a process we cannot see)"
    return f" (port {k.port} is held by process {h[0]}, {h[1]})"


def _proc_addr(text: str) -> tuple[str, int]:
    """'0100007F:1F90' (/proc/net/tcp: 32-bit words in host order) -> ('127.0.0.1', 8080)."""
    addr, port = text.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw), int(port, 16)


def _peer_by_inode(ino: int):
    """The remote end /proc/net/tcp{,6} shows for socket `ino` (getpeername fails before
    the handshake ends), None if not found."""
    for x in _proc_net("tcp", "tcp6"):
        if x[9] == str(ino):
            return _proc_addr(x[2])
    return None


def _unaccepted(port: int) -> list[tuple[str, int]]:
    """Peers of connections to local `port` that no fd holds yet (inode 0: still in a
    listener's accept queue)."""
    return [_proc_addr(x[2]) for x in _proc_net("tcp", "tcp6")
            if x[3] in ("01", "03") and x[9] == "0" and _proc_addr(x[1])[1] == port]


def _connection_here(k: pb.Socket) -> int:
    """Inode of a socket of this node holding the same connection (4-tuple), 0 if none;
    -1 when one exists but no socket holds it any more (TIME_WAIT and the like)."""
    want = (k.address, k.port, k.peer_address, k.peer_port)
    for x in _proc_net("tcp", "tcp6"):
        if (*_proc_addr(x[1]), *_proc_addr(x[2])) == want:
            return int(x[9]) or -1
    return 0


def _connection_holder(ino: int) -> str:
    if ino < 0:
        return " (closing, no process holds it; wait for it to time out)"
    h = _holder_of(ino)
    return f" (held by process {h[0]}, {h[1]}, fd {h[2]})" if h else f" (socket:[{ino}])"


CAP_NET_BIND_SERVICE = 10


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def check(pid: int, fds: list[pb.Fd], creds: pb.Creds | None = None, fresh_netns: bool = False) -> None:
    """Every port the process had bound is free here, and no connection it had exists.
    With `creds` (given for an image a user, not root, owns; check_owner made sure it claims
    only that user): the restore binds as root, so a port below ip_unprivileged_port_start
    is only given back to a process that could have bound it itself (CAP_NET_BIND_SERVICE).
    `fresh_netns`: the sockets go into a new network namespace (engine/netns.py), where
    every port is free and no connection exists: only the privilege check applies."""
    privileged = creds is not None and (creds.euid == 0 or creds.cap_eff >> CAP_NET_BIND_SERVICE & 1)
    fds = list(fds) + [o for e in fds for o in in_flight_objects(e)]
    unixlisten.check(pid, fds)
    for e in fds:
        k = e.socket
        if e.kind != pb.SOCKET or k.family == socket.AF_UNIX:
            continue
        if k.type == socket.SOCK_STREAM:
            tcpopts.check(pid, e.fd, k, creds is not None)
        if not k.port:
            continue
        if creds is not None and not privileged and k.port < _unprivileged_port_start():
            raise RestoreError(f"process {pid} fd {e.fd}: the image gives it port {k.port}, which uid "
                               f"{creds.euid} may not bind (below ip_unprivileged_port_start); refused")
        if fresh_netns:
            continue
        if k.HasField("tcp"):
            ino = _connection_here(k)
            if ino:
                raise RestoreError(
                    f"process {pid} fd {e.fd}: TCP connection {_fmt((k.address, k.port))} -> "
                    f"{_fmt((k.peer_address, k.peer_port))} already exists on this node"
                    f"{_connection_holder(ino)}; was the checkpointed process left running? "
                    "A connection can only be restored once its original is gone")
            continue
        if (k.listening or k.type == socket.SOCK_DGRAM) and _bound_here(k) and not k.reuseport:
            proto = "TCP" if k.type == socket.SOCK_STREAM else "UDP"
            raise RestoreError(f"process {pid} fd {e.fd}: {proto} port {k.port} "
                               f"({_fmt((k.address or '*', k.port))}) is taken on this node"
                               f"{holder(k) or ''}; free it and restore again")
