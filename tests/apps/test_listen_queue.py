"""A connection still in a listener's accept queue when the server is checkpointed: a dump
that leaves the server running (--leave-running, --live) takes the server and notes that
the connection stays with it (the program accepts it as usual and answers); a dump that
kills the server is still refused (tests/engine/test_tcp.py), since it would be lost."""
import socket
import sys

import pytest

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
