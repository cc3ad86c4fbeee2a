"""Unix sockets whose peer has closed, with data still queued: a child writes RECORDS
records into a stream and a seqpacket socketpair and exits; the parent reads one record
per step, then finds the end (EOF on the stream, an empty read on the seqpacket) and a
write failing with EPIPE. A socket made long before with socket() and never connected is
connected at the end to a listener of the parent's. Usage: widowed.py RECORDS STEP_S"""
import errno
import os
import socket
import sys
import time

records, step_s = int(sys.argv[1]), float(sys.argv[2])
st = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
sp = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
child = os.fork()
if child == 0:
    st[0].close(), sp[0].close()
    for i in range(records):
        st[1].sendall(f"s{i:03d}".encode())
        sp[1].send(f"q{i}".encode() + b"x" * (i % 4))
    os._exit(0)
st[1].close(), sp[1].close()
os.waitpid(child, 0)
print("child gone", flush=True)
for i in range(records):
    print(i, st[0].recv(4).decode(), sp[0].recv(64).decode(), flush=True)
    time.sleep(step_s)
print("end", st[0].recv(64), sp[0].recv(64), flush=True)
try:
    st[0].send(b"late")
except OSError as e:
    print("write", errno.errorcode[e.errno], flush=True)
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind(f"\0trees-widowed-{os.getpid()}-{time.monotonic_ns()}")
lst.listen(1)
fresh.connect(lst.getsockname())
conn, _ = lst.accept()
fresh.sendall(b"hi")
print("fresh", conn.recv(2).decode(), flush=True)
