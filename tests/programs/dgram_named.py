"""A datagram server bound to a name and a client connected to it one way: the client sends
numbered records faster than the server takes them, so records wait in the server's
queue at any instant. Usage: dgram_named.py PATH ROUNDS PAUSE"""
import hashlib
import os
import socket
import sys
import time

path, rounds, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(path)
child = os.fork()
if child == 0:
    srv.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    c.connect(path)
    for i in range(rounds):
        c.send(f"rec {i} {hashlib.sha256(str(i).encode()).hexdigest()[:8]}".encode())
        time.sleep(pause / 2)
    c.send(b"bye")
    os._exit(0)
h = hashlib.sha256()
while True:
    time.sleep(pause)
    msg = srv.recv(256)
    if msg == b"bye":
        break
    h.update(msg)
    print(msg.decode(), flush=True)
_, status = os.waitpid(child, 0)
print("done", status, h.hexdigest()[:16], flush=True)
os.unlink(path)
