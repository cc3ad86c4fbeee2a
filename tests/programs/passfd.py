"""A parent passes open files (SCM_RIGHTS) to its child over a socketpair; the child takes
each only after a pause, so at any instant a file is in flight in the queue. The child
reads 16 bytes from where the parent left the file's position.
Usage: passfd.py stream|dgram ROUNDS PAUSE DATAFILE"""
import array
import os
import socket
import sys
import time

mode, rounds, pause, data = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if mode == "stream" else socket.SOCK_DGRAM)
child = os.fork()
if child == 0:
    a.close()
    for i in range(rounds):
        time.sleep(pause)                    # the message and its file wait in the queue
        msg, anc, _flags, _ = b.recvmsg(64, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for _level, _kind, payload in anc:
            fds.frombytes(payload[:len(payload) - len(payload) % 4])
        with os.fdopen(fds[0], "rb") as f:
            print(i, msg.decode(), len(fds), f.read(16).hex(), flush=True)
    os._exit(0)
b.close()
for i in range(rounds):
    fd = os.open(data, os.O_RDONLY)
    os.lseek(fd, i * 7, os.SEEK_SET)
    a.sendmsg([f"m{i:03d}".encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    time.sleep(pause / 2)
_, status = os.waitpid(child, 0)
print("done", status, flush=True)
