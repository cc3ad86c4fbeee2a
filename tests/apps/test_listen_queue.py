"""A connection still in a listener's accept queue when the server is checkpointed: a dump
that leaves the server running (--leave-running, --live) takes the server and notes that
the connection stays with it (the program accepts it as usual and answers). A dump that
kills the server locks its listeners first and lets the program drain its accept queue
(engine/listeners.py); one that never accepts is still refused (tests/engine/test_tcp.py)."""
import socket
import subprocess
import sys
import threading
import time

import pytest

from hpcckpt.kernel import listenlock, netlock
from tests.engine.helpers import Job, cli

ACCEPT_LATE = """
import socket, sys, time
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(4)
print("port", ls.getsockname()[1], flush=True)
for i in range(int(sys.argv[1])):
    time.sleep(0.05)
    print("tick", i, flush=True)
c, _ = ls.accept()
c.sendall(c.recv(100).upper())
print("answered", flush=True)
"""


@pytest.mark.parametrize("how", ["--leave-running", "--live"])
def test_waiting_connection_stays_with_a_running_server(tmp_path, how):
    job = Job.start([sys.executable, "-c", ACCEPT_LATE, 60], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        port = int(job.out.read_text().split()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            me = c.getsockname()
            res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", how)
            assert "1 connection(s) waiting to be accepted" in res.stderr, res.stderr
            assert f"from {me[0]}:{me[1]}" in res.stderr and "stay with the running program" in res.stderr
            c.sendall(b"still there?\n")
            assert c.recv(100) == b"STILL THERE?\n"
        assert job.proc.wait(timeout=30) == 0
        assert job.out.read_text().endswith("answered\n")
    finally:
        job.kill()


SERVE_SLOWLY = """
import socket, sys, time
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers do: its closed connections linger
ls.bind(("127.0.0.1", 0))
ls.listen(8)
print("port", ls.getsockname()[1], flush=True)
while True:
    c, _ = ls.accept()
    c.sendall(c.recv(100).upper())
    c.close()
    print("served", flush=True)
    time.sleep(0.3)
"""


def _ask(port: int, what: bytes, out: dict) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            c.sendall(what)
            out[what] = c.recv(100)
    except OSError as e:
        out[what] = e


def listener_tables() -> list[str]:
    res = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in res.stdout.splitlines() if listenlock.PREFIX in line]


def test_killed_server_holds_new_clients_off(tmp_path):
    """A dump that kills the server locks its listener first (new SYNs dropped) and lets
    it accept what was queued: a client queued at the dump and one connecting while the
    server is away both get their answer from the restored server, none is refused."""
    job = Job.start([sys.executable, "-c", SERVE_SLOWLY], tmp_path / "out.txt")
    rest = None
    answers: dict = {}
    try:
        job.wait_lines(1)
        port = int(job.out.read_text().split()[1])
        _ask(port, b"first\n", answers)             # served; the server now sleeps 0.3 s
        early = threading.Thread(target=_ask, args=(port, b"queued\n", answers))
        early.start()                               # waits in the accept queue meanwhile
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established")
        assert job.proc.wait(timeout=10) != 0
        late = threading.Thread(target=_ask, args=(port, b"while away\n", answers))
        late.start()
        time.sleep(0.5)                              # its SYN is dropped, not refused
        assert late.is_alive(), answers
        tables = listener_tables()
        assert any(t.endswith(f"_{job.pid}") for t in tables), (tables, res.stderr)
        rest = subprocess.Popen([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                                stdout=open(tmp_path / "out.txt", "ab"), stderr=open(tmp_path / "restore.txt", "wb"),
                                stdin=subprocess.DEVNULL)
        early.join(60)
        late.join(60)
        assert answers == {b"first\n": b"FIRST\n", b"queued\n": b"QUEUED\n", b"while away\n": b"WHILE AWAY\n"}
        deadline = time.monotonic() + 10
        while any(t.endswith(f"_{job.pid}") for t in listener_tables()):
            assert time.monotonic() < deadline, "the listener lock outlived the restore"
            time.sleep(0.05)
    finally:
        if rest is not None:
            rest.kill()
            rest.wait()
        job.kill()
        for t in listener_tables():
            if t.endswith(f"_{job.pid}"):
                netlock.nft(netlock.delete_script(t))
