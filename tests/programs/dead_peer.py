"""A process holding a unix stream socket whose peer has closed (as sshd's monitor holds
its end of the pair with the exited pre-authentication child), with unread data the peer
sent before it went. After some ticks it reads the data, then EOF, and a write fails with
EPIPE: a restored run must print exactly what an uninterrupted one does.

usage: dead_peer.py TICKS"""
import errno
import signal
import socket
import sys
import time

signal.signal(signal.SIGPIPE, signal.SIG_IGN)
ticks = int(sys.argv[1])
kinds = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}
held = {}
for name, kind in kinds.items():
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    b.sendall(f"last words of the {name} peer\n".encode())
    b.sendall(b"and a second message\n")
    b.close()
    held[name] = a
print("ready", flush=True)
for i in range(ticks):
    print("tick", i, flush=True)
    time.sleep(0.05)
for name, a in held.items():
    got = []
    while True:
        data = a.recv(4096)
        if not data:
            break
        got.append(data)
    print(name, "read", got, "then EOF", flush=True)
    try:
        a.send(b"anyone?")
        print(name, "write went through", flush=True)
    except OSError as e:
        print(name, "write failed:", errno.errorcode[e.errno], flush=True)
print("done", flush=True)
