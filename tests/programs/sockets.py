"""Socket test program for the engine tests.

usage: sockets.py pair STEPS STEP_S    parent and child over stream, datagram and seqpacket
                                       socketpairs, each side 3 messages ahead of the other
                                       (so both directions always hold queued data)
       sockets.py serve                TCP (127.0.0.1 and ::1) and UDP (127.0.0.1) echo server;
                                       prints its ports, answers until told "quit"
       sockets.py connected STEPS STEP_S  holds an established loopback TCP connection
"""
import fcntl
import os
import select
import socket
import sys
import time

FRAME = 32
LAG = 3


def stream_send(s, text):
    s.sendall(text.encode().ljust(FRAME, b"."))


def stream_recv(s):
    buf = b""
    while len(buf) < FRAME:
        chunk = s.recv(FRAME - len(buf))
        if not chunk:
            raise SystemExit("stream closed")
        buf += chunk
    return buf.rstrip(b".").decode()


def msg(side, i):
    return f"{side}{i}:" + "x" * (i % 7)      # varying lengths: boundaries must survive


def pair(steps, step_s):
    socks = {t: socket.socketpair(socket.AF_UNIX, t) for t in
             (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)}
    socks[socket.SOCK_STREAM][0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    child = os.fork()
    mine = {t: p[1 if child == 0 else 0] for t, p in socks.items()}
    for p in socks.values():
        p[0 if child == 0 else 1].close()
    side = "c" if child == 0 else "p"

    def send(i):
        for t, s in mine.items():
            stream_send(s, msg(side, i)) if t == socket.SOCK_STREAM else s.send(msg(side, i).encode())

    def recv():
        return [stream_recv(s) if t == socket.SOCK_STREAM else s.recv(4096).decode() for t, s in mine.items()]

    for i in range(LAG):
        send(i)
    if child == 0:
        for i in range(steps):
            got = recv()
            assert len(set(got)) == 1, got
            if i + LAG < steps:       # only what the parent will read (see below)
                send(i + LAG)
            time.sleep(step_s)
        os._exit(0)
    nb = mine[socket.SOCK_DGRAM]
    fcntl.fcntl(nb.fileno(), fcntl.F_SETFL, os.O_NONBLOCK)
    # Each side sends only the messages the other will read: a send past the end could
    # find the other side gone (EPIPE) whenever it ran LAG steps ahead, as it may under load
    for i in range(steps):
        if i + LAG < steps:
            send(i + LAG)
        select.select([nb], [], [])
        got = recv()
        print(i, *got, "same" if len(set(got)) == 1 else "DIFFER", flush=True)
        time.sleep(step_s)
    _, status = os.waitpid(child, 0)
    s = mine[socket.SOCK_STREAM]
    print("child status", status, "sndbuf", s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 >= 65536,
          "nonblocking", bool(fcntl.fcntl(nb.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK), flush=True)


def serve():
    t4 = socket.socket()
    t4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t4.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t4.bind(("127.0.0.1", 0))
    t4.listen(5)
    t6 = socket.socket(socket.AF_INET6)
    t6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    t6.bind(("::1", 0))
    t6.listen(3)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    print("ports", t4.getsockname()[1], t6.getsockname()[1], u.getsockname()[1], flush=True)
    served = 0
    while True:
        ready, _, _ = select.select([t4, t6, u], [], [])
        for s in ready:
            if s is u:
                data, addr = u.recvfrom(4096)
                line = data.decode()
                u.sendto(f"udp echo {line.upper()}".encode(), addr)
            else:
                c, _ = s.accept()
                with c:
                    line = c.makefile().readline().strip()
                    c.sendall(f"tcp{'6' if s is t6 else ''} echo {line.upper()}\n".encode())
            served += 1
            print("served", served, line, flush=True)
            if line == "quit":
                print("opts", t4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
                      t4.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                      t6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), flush=True)
                return


def connected(steps, step_s):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    print("fd", cli.fileno(), "ports", cli.getsockname()[1], srv.getsockname()[1], flush=True)
    for i in range(steps):
        cli.sendall(b"ping")
        conn.recv(4)
        print("step", i, flush=True)
        time.sleep(step_s)
    print("done", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "pair":
        pair(int(sys.argv[2]), float(sys.argv[3]))
    elif mode == "serve":
        serve()
    else:
        connected(int(sys.argv[2]), float(sys.argv[3]))
