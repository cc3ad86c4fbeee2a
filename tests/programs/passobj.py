"""A parent passes unix sockets and pipes (SCM_RIGHTS) to its child over a socketpair and
closes its own copies, so the queue is their only reference; the child takes each message
only after a pause, so at any instant several are in flight. Each message carries:
  - the read end of a pipe holding data, its write end closed (read to EOF);
  - one end of a socketpair with a greeting queued in it, the parent keeping the other
    end (the child answers through it; the parent reads every answer at the end);
  - a listening socket bound to a path in the working directory (the child connects to
    it and accepts: names and one byte each way);
  - both ends of a socketpair, one holding a queued message;
  - the write end of a second pipe whose read end the parent keeps (read at the end).
Usage: passobj.py stream|dgram ROUNDS PAUSE
       passobj.py nested PAUSE      a socket in flight that carries a passed fd itself (the
                                    child takes it after PAUSE)"""
import array
import os
import socket
import sys
import time

if sys.argv[1] == "nested":
    courier, inbox = socket.socketpair()
    a, b = socket.socketpair()
    devnull = os.open("/dev/null", os.O_RDONLY)
    a.sendmsg([b"inner"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [devnull]))])
    courier.sendmsg([b"outer"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [b.fileno()]))])
    b.close(), os.close(devnull)
    print("sent", flush=True)
    time.sleep(float(sys.argv[2]))
    msg, anc, _flags, _ = inbox.recvmsg(64, socket.CMSG_SPACE(4))
    inner = socket.socket(fileno=array.array("i", anc[0][2])[0])
    msg2, anc2, _flags, _ = inner.recvmsg(64, socket.CMSG_SPACE(4))
    print("got", msg.decode(), msg2.decode(), len(anc2), "done", flush=True)
    sys.exit(0)
mode, rounds, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
courier, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if mode == "stream" else socket.SOCK_DGRAM)
NFDS = 6


def take(i):
    msg, anc, _flags, _ = inbox.recvmsg(64, socket.CMSG_SPACE(NFDS * 4))
    fds = array.array("i")
    for _level, _kind, payload in anc:
        fds.frombytes(payload[:len(payload) - len(payload) % 4])
    r, y, lst, a, b, w2 = fds
    with os.fdopen(r, "rb") as f:
        piped = f.read().decode()
    y = socket.socket(fileno=y)
    hello = y.recv(64).decode()
    y.sendall(f"reply{i}".encode())
    kept.append(y)                           # (closed at exit: the parent reads the answer after)
    lst = socket.socket(fileno=lst)
    name = os.path.basename(lst.getsockname())
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(lst.getsockname())
    conn, _ = lst.accept()
    cli.sendall(b"c")
    conn.sendall(b"s")
    talk = conn.recv(1) + cli.recv(1)
    os.unlink(lst.getsockname())
    for s in (cli, conn, lst):
        s.close()
    a, b = socket.socket(fileno=a), socket.socket(fileno=b)
    queued = b.recv(64).decode()
    a.sendall(b"again")
    again = b.recv(64).decode()
    a.close(), b.close()
    os.write(w2, f"late{i};".encode())
    os.close(w2)
    print(i, msg.decode(), piped, hello, name, talk.decode(), queued, again, flush=True)


kept = []
child = os.fork()
if child == 0:
    courier.close()
    for i in range(rounds):
        time.sleep(pause)                    # the message and its fds wait in the queue
        take(i)
    os._exit(0)
inbox.close()
keep, late = [], []
for i in range(rounds):
    r, w = os.pipe()
    os.write(w, f"pipe{i}:".encode() + b"p" * (i % 5))
    os.close(w)
    x, y = socket.socketpair()
    x.sendall(f"hello{i}".encode())
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"l{i}.sock")
    lst.listen(4)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.send(f"queued{i}".encode())
    r2, w2 = os.pipe()
    fds = [r, y.fileno(), lst.fileno(), a.fileno(), b.fileno(), w2]
    courier.sendmsg([f"m{i:03d}".encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    os.close(r), os.close(w2)
    for s in (y, lst, a, b):
        s.close()
    keep.append(x)
    late.append(r2)
    time.sleep(pause / 2)
_, status = os.waitpid(child, 0)
for i, (x, r2) in enumerate(zip(keep, late)):
    print("answer", i, x.recv(64).decode(), os.read(r2, 64).decode(), flush=True)
print("done", status, flush=True)
