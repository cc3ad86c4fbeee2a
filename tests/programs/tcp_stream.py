"""Two ends of a TCP connection streaming to each other, for the TCP checkpoint tests.

usage: tcp_stream.py server HOST TOTAL        listens on HOST (port printed), serves one client
       tcp_stream.py client HOST PORT TOTAL   connects to HOST:PORT
       tcp_stream.py both HOST TOTAL          server in this process, client in a forked child
       tcp_stream.py hold HOST PORT STEPS [raw]  connects, echoes lines upper-cased for STEPS
                                              ticks of 50 ms (a raw socket open beside it)
       tcp_stream.py half HOST PORT STEPS we-close|peer-closes
                                              a half-closed connection: we shut our side
                                              (FIN_WAIT2) and count the lines still coming,
                                              or the peer shuts its side (CLOSE_WAIT) and we
                                              send it a "tick N" line every 50 ms

Each end sends TOTAL bytes of its own deterministic stream (seeded by its role) and reads
the other's TOTAL bytes. The client writes as fast as the connection takes it, the server
reads slowly and writes throttled, so at any instant both ends hold data in both queues
(unread, unacknowledged, unsent). Each end prints "progress N" lines while it runs and at
the end "ROLE sent N SHA256 received N SHA256"; a reset or a short stream fails the run.
"""
import hashlib
import os
import random
import select
import socket
import struct
import sys
import time


def stream(role: str, total: int) -> bytes:
    return random.Random(f"hpcckpt-tcp-{role}").randbytes(total)


def digest(role: str, total: int) -> str:
    return hashlib.sha256(stream(role, total)).hexdigest()


def exchange(s: socket.socket, role: str, other: str, total: int, read_step: int, read_pause: float,
             write_step: int, write_pause: float) -> None:
    out = memoryview(stream(role, total))
    got = hashlib.sha256()
    sent = received = 0
    next_read = next_write = next_report = 0.0
    s.setblocking(False)
    while sent < total or received < total:
        now = time.monotonic()
        want_r = received < total and now >= next_read
        want_w = sent < total and now >= next_write
        wait = min([t for t, on in ((next_read, received < total), (next_write, sent < total)) if on]) - now
        r, w, _ = select.select([s] if want_r else [], [s] if want_w else [], [],
                                max(wait, 0) if not (want_r or want_w) else 0.05)
        if r:
            data = s.recv(read_step)
            if not data:
                raise SystemExit(f"{role}: connection closed after {received} of {total} bytes")
            got.update(data)
            received += len(data)
            next_read = time.monotonic() + read_pause
        if w:
            n = s.send(out[sent:sent + write_step])
            sent += n
            next_write = time.monotonic() + write_pause
        if now >= next_report:
            print(f"progress {role} sent {sent} received {received}", flush=True)
            next_report = now + 0.1
    print(f"{role} sent {sent} {hashlib.sha256(out).hexdigest()} received {received} {got.hexdigest()}",
          flush=True)


def server_side(ls: socket.socket, total: int) -> None:
    conn, _ = ls.accept()
    ls.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("qq", 3, 500000))
    conn.setsockopt(socket.IPPROTO_TCP, 13, b"reno")          # TCP_CONGESTION (not the default)
    # slow reader, throttled writer: ~1.6 MB/s each way at most
    exchange(conn, "server", "client", total, 8192, 0.005, 8192, 0.005)
    opts = (conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            struct.unpack("qq", conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))[1],
            conn.getsockopt(socket.SOL_SOCKET, 72),       # SO_BUF_LOCK: 0, buffers autotuned
            conn.getsockopt(socket.IPPROTO_TCP, 13, 16).split(b"\0")[0].decode())
    print("server opts", *opts, flush=True)
    conn.close()


def client_side(host: str, port: int, total: int) -> None:
    s = socket.create_connection((host, port))
    exchange(s, "client", "server", total, 1 << 16, 0.0, 1 << 16, 0.0)
    # wait for the server's close: a reset instead would raise here
    s.setblocking(True)
    s.settimeout(60)
    if s.recv(1):
        raise SystemExit("client: unexpected data after the stream")
    s.close()


def hold(host: str, port: int, steps: int, raw: bool) -> None:
    s = socket.create_connection((host, port))
    extra = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) if raw else None
    print("connected fd", s.fileno(), "raw fd", extra.fileno() if extra else -1, flush=True)
    open_ = True
    for i in range(steps):
        r, _, _ = select.select([s] if open_ else [], [], [], 0.05)
        if r:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                print("reset", flush=True)        # the socket stays open, in CLOSE
                open_ = False
                continue
            if not data:
                print("peer closed", flush=True)   # the socket stays open, in CLOSE_WAIT
                open_ = False
            else:
                s.sendall(data.upper())
        print("tick", i, flush=True)
    print("done", flush=True)


def half(host: str, port: int, steps: int, who: str) -> None:
    s = socket.create_connection((host, port))
    print("connected fd", s.fileno(), flush=True)
    if who == "we-close":
        s.sendall(b"bye\n")
        s.shutdown(socket.SHUT_WR)
        lines = 0
        for i in range(steps):
            if select.select([s], [], [], 0.05)[0]:
                data = s.recv(4096)
                if not data:
                    print("eof", flush=True)
                    break
                lines += data.count(b"\n")
            print("tick", i, "lines", lines, flush=True)
        print("done lines", lines, flush=True)
        return
    eof = False
    for i in range(steps):
        if select.select([] if eof else [s], [], [], 0.05)[0]:
            if not s.recv(4096):
                eof = True
                print("peer closed", flush=True)
        if eof:
            s.sendall(b"tick %d\n" % i)
        print("tick", i, flush=True)
    s.setblocking(False)
    try:
        print("eof kept" if s.recv(10) == b"" else "data after eof", flush=True)
    except BlockingIOError:
        print("eof lost", flush=True)
    s.close()
    print("done", flush=True)


def listener(host: str) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(fam)
    ls.bind((host, 0))
    ls.listen(1)
    return ls


def main() -> None:
    role, host = sys.argv[1], sys.argv[2]
    if role == "server":
        total = int(sys.argv[3])
        ls = listener(host)
        print("port", ls.getsockname()[1], flush=True)
        server_side(ls, total)
    elif role == "client":
        client_side(host, int(sys.argv[3]), int(sys.argv[4]))
    elif role == "both":
        total = int(sys.argv[3])
        ls = listener(host)
        port = ls.getsockname()[1]
        print("port", port, flush=True)
        child = os.fork()
        if child == 0:
            ls.close()
            code = 1
            try:
                client_side(host, port, total)
                code = 0
            except BaseException as e:
                print("client failed:", e, flush=True)
            finally:
                sys.stdout.flush()
                os._exit(code)
        server_side(ls, total)
        _, status = os.waitpid(child, 0)
        print("client status", status, flush=True)
    elif role == "hold":
        hold(host, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] == ["raw"])
    elif role == "half":
        half(host, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif role == "digests":
        total = int(sys.argv[3])
        print(digest("client", total), digest("server", total))


if __name__ == "__main__":
    main()
