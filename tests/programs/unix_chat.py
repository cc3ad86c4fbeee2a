"""A server and its client over a named Unix stream socket, mid-conversation at any
instant: the client sends a request and reads the answer only after a pause, so answers
sit queued in its socket. Usage: unix_chat.py PATH ROUNDS PAUSE"""
import hashlib
import os
import socket
import sys
import time

path, rounds, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
child = os.fork()
if child == 0:                               # the client: prints every answer it gets
    srv.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    f = c.makefile("rwb")
    for i in range(rounds):
        f.write(f"req {i}\n".encode())
        f.flush()
        time.sleep(pause)
        print(f.readline().decode().strip(), flush=True)
    f.write(b"bye\n")
    f.flush()
    os._exit(0)
conn, _ = srv.accept()
f = conn.makefile("rwb")
served, h = 0, hashlib.sha256()
for line in f:
    if line == b"bye\n":
        break
    h.update(line)
    f.write(b"resp " + line.split()[1] + b" " + h.hexdigest()[:12].encode() + b"\n")
    f.flush()
    served += 1
_, status = os.waitpid(child, 0)
print("served", served, "client status", status, flush=True)
os.unlink(path)
