"""TCP options the checkpoint keeps or refuses (engine/tcpopts.py).

usage: tcp_opts.py options   a listener with Fast Open (queue 5) and congestion control
                             reno, an unbound socket with TCP_FASTOPEN_CONNECT and
                             TCP_FASTOPEN_NO_COOKIE; prints their options every 50 ms
       tcp_opts.py md5       a listener with a TCP-MD5 key; prints ticks
       tcp_opts.py urgent    a listener; a client (a thread) connects and sends 'a', an
                             urgent '!' and 'b', which the server never reads; ticks
"""
import socket
import struct
import sys
import threading
import time

TCP_CONGESTION, TCP_MD5SIG, TCP_FASTOPEN, TCP_FASTOPEN_CONNECT, TCP_FASTOPEN_NO_COOKIE = 13, 14, 23, 30, 34


def opts(ls: socket.socket, s: socket.socket) -> str:
    ca = ls.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).split(b"\0")[0].decode()
    return (f"opts {ls.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN)} {ca} "
            f"{s.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT)} "
            f"{s.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE)}")


def main() -> None:
    mode = sys.argv[1]
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    s = socket.socket()
    if mode == "options":
        ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 5)
        ls.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, b"reno")
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    if mode == "md5":
        addr = struct.pack("<HH4s", socket.AF_INET, 0, socket.inet_aton("127.0.0.1")) + bytes(120)
        ls.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, addr + struct.pack("<BBHI", 0, 0, 6, 0) + b"secret" + bytes(74))
    ls.listen(4)
    held = []
    if mode == "urgent":
        c = socket.create_connection(ls.getsockname())
        conn, _ = ls.accept()
        c.send(b"a")
        c.send(b"!", socket.MSG_OOB)
        c.send(b"b")
        held = [c, conn]
    print("port", ls.getsockname()[1], flush=True)
    for i in range(100000):
        print(f"tick {i}", opts(ls, s) if mode == "options" else "", flush=True)
        time.sleep(0.05)
    threading.Event().wait() if held else None


if __name__ == "__main__":
    main()
