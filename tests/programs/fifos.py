"""Named pipes (FIFOs) in the working directory: a child writes RECORDS records into
jobs.fifo (the parent holds the read end, opened before the child's write end) and exits;
the parent takes one record per step. The child also opens done.fifo read-write, writes a
line into it and passes that fd to the parent over a socketpair (SCM_RIGHTS), which
receives it only at the end: the FIFO, its data and the fd in flight all wait in queues.
Usage: fifos.py RECORDS STEP_S"""
import array
import os
import socket
import sys
import time

records, step_s = int(sys.argv[1]), float(sys.argv[2])
for name in ("jobs.fifo", "done.fifo"):
    if os.path.lexists(name):
        os.unlink(name)
    os.mkfifo(name)
a, b = socket.socketpair()
r = os.open("jobs.fifo", os.O_RDONLY | os.O_NONBLOCK)
os.set_blocking(r, True)
child = os.fork()
if child == 0:
    w = os.open("jobs.fifo", os.O_WRONLY)
    for i in range(records):
        os.write(w, f"r{i:03d}".encode())
    d = os.open("done.fifo", os.O_RDWR)
    os.write(d, b"all written\n")
    b.sendmsg([b"d"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [d]))])
    os._exit(0)
os.waitpid(child, 0)
print("child gone", flush=True)
for i in range(records):
    print(i, os.read(r, 4).decode(), flush=True)
    time.sleep(step_s)
print("end", os.read(r, 16), flush=True)
_, anc, _, _ = a.recvmsg(1, socket.CMSG_SPACE(4))
d = array.array("i", anc[0][2])[0]
print("passed", os.read(d, 64).decode().strip(), os.path.basename(os.readlink(f"/proc/self/fd/{d}")), flush=True)
os.unlink("jobs.fifo"), os.unlink("done.fifo")
