"""Accepted unix connections and their names: a parent accepts three connections from its
child, which talks over all three, each side LAG messages ahead (data queued both ways):
  - stream, to a listener bound to srv.sock in the working directory, kept listening;
  - seqpacket, to a listener at an abstract name, closed once it has accepted;
  - stream, to gone.sock, whose listener is closed and its file removed after the accept,
    from a client bound to cli.sock itself.
Each step the parent prints getsockname/getpeername of its accepted ends and the child's
view of its own (sent over the connection). Usage: unix_names.py STEPS STEP_S"""
import hashlib
import os
import socket
import sys
import time

FRAME, LAG = 48, 2
steps, step_s = int(sys.argv[1]), float(sys.argv[2])
TAG = hashlib.sha1(os.getcwd().encode()).hexdigest()[:12]    # abstract names: per directory
ABSTRACT = f"\0trees-names-{TAG}-abs"


def show(name) -> str:
    if isinstance(name, bytes):
        name = name.decode()
    if not name:
        return "-"
    if name.startswith("\0"):
        return "@" + name.rsplit("-", 1)[1]
    return os.path.basename(name)


def view(s) -> str:
    return f"{show(s.getsockname())}>{show(s.getpeername())}"


def send(s, text):
    s.sendall(text.encode().ljust(FRAME, b"."))


def recv(s):
    buf = b""
    while len(buf) < FRAME:
        chunk = s.recv(FRAME - len(buf))
        if not chunk:
            raise SystemExit("closed")
        buf += chunk
    return buf.rstrip(b".").decode()


for stale in ("srv.sock", "gone.sock", "cli.sock"):
    if os.path.lexists(stale):
        os.unlink(stale)
l1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l1.bind("srv.sock")
l1.listen(4)
l2 = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
l2.bind(ABSTRACT)
l2.listen(4)
l3 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l3.bind("gone.sock")
l3.listen(4)
child = os.fork()
if child == 0:
    l1.close(), l2.close(), l3.close()
    c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c1.connect("srv.sock")
    c2 = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c2.connect(ABSTRACT)
    c3 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c3.bind("cli.sock")
    c3.connect("gone.sock")
    mine = [c1, c2, c3]
    for i in range(LAG):
        for s in mine:
            send(s, f"c{i} {view(s)}")
    for i in range(steps):
        for s in mine:
            got = recv(s)
            assert got == f"p{i}", got
            if i + LAG < steps:
                send(s, f"c{i + LAG} {view(s)}")
        time.sleep(step_s)
    os._exit(0)
conns = [l1.accept()[0], l2.accept()[0], l3.accept()[0]]
l2.close()
l3.close()
os.unlink("gone.sock")
for i in range(LAG):
    for s in conns:
        send(s, f"p{i}")
for i in range(steps):
    said = []
    for s in conns:
        said.append(recv(s))
        if i + LAG < steps:
            send(s, f"p{i + LAG}")
    print(i, " | ".join(f"{view(s)} {x}" for s, x in zip(conns, said)), flush=True)
    time.sleep(step_s)
_, status = os.waitpid(child, 0)
print("done", status, os.path.exists("gone.sock"), os.path.exists("srv.sock"), flush=True)
os.unlink("srv.sock"), os.unlink("cli.sock")
