"""Sockets: a socketpair (stream, datagram, seqpacket) between parent and child with data
queued both ways; listening TCP (IPv4, IPv6) and bound UDP sockets still serving after a
restore; an established TCP connection refused without --tcp-established (test_tcp.py has
the connections themselves), the program running on."""
import socket
import subprocess
import sys
import time

import pytest

from .helpers import PROGRAMS, Job, cli, reference
from .test_trees import interrupt_and_resume

PROG = PROGRAMS / "sockets.py"


def test_socketpairs_with_queued_data_both_ways(tmp_path):
    """Under `hpcckpt run` (a tree: the child's PID must be free again at once)."""
    cmd = [sys.executable, PROG, "pair", 40, 0.03]
    ref = reference(cmd, tmp_path / "ref.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 12)
    out = out.read_bytes()
    assert out == ref
    assert b"DIFFER" not in out and b"child status 0 sndbuf True nonblocking True" in out


def _ask_tcp(port: int, text: str, family=socket.AF_INET) -> str:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.create_connection((host, port), timeout=10) as c:
        c.sendall(text.encode() + b"\n")
        return c.makefile().readline().strip()


def _ask_udp(port: int, text: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(text.encode(), ("127.0.0.1", port))
        return u.recv(4096).decode()


def test_listening_tcp_and_udp_serve_after_restore(tmp_path):
    job = Job.start([sys.executable, PROG, "serve"], tmp_path / "out.txt")
    rest = None
    try:
        job.wait_lines(1)
        t4, t6, u = (int(x) for x in job.out.read_text().split()[1:4])
        assert _ask_tcp(t4, "before") == "tcp echo BEFORE"
        assert _ask_udp(u, "one") == "udp echo ONE"
        job.wait_lines(3)
        said = cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
        assert "dropped" not in said.stdout + said.stderr   # nothing was queued
        job.proc.wait(timeout=10)
        rest = subprocess.Popen([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = _ask_tcp(t4, "after")
                break
            except OSError:
                assert rest.poll() is None, rest.communicate()[1].decode()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert answer == "tcp echo AFTER"
        assert _ask_tcp(t6, "six", socket.AF_INET6) == "tcp6 echo SIX"
        assert _ask_udp(u, "two") == "udp echo TWO"
        assert _ask_tcp(t4, "quit") == "tcp echo QUIT"
        assert rest.wait(timeout=30) == 0, rest.communicate()[1].decode()
        assert job.out.read_text().splitlines()[1:] == [
            "served 1 before", "served 2 one", "served 3 after", "served 4 six", "served 5 two",
            "served 6 quit", "opts 1 1 1"]
    finally:
        job.kill()
        if rest is not None and rest.poll() is None:
            rest.kill()
            rest.wait()


def test_port_taken_at_restore_is_named(tmp_path):
    job = Job.start([sys.executable, PROG, "serve"], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        t4 = int(job.out.read_text().split()[1])
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
        job.proc.wait(timeout=10)
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", t4))
            squatter.listen(1)
            res = cli("restore", "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert f"TCP port {t4}" in res.stderr and "is taken" in res.stderr, res.stderr
        assert "held by process" in res.stderr, res.stderr
    finally:
        job.kill()


def test_established_tcp_refused_naming_connection(tmp_path):
    job = Job.start([sys.executable, PROG, "connected", 100, 0.02], tmp_path / "out.txt")
    try:
        job.wait_lines(2)
        words = job.out.read_text().split()
        fd, cport, sport = words[1], words[3], words[4]
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd" in res.stderr and "established TCP connection" in res.stderr, res.stderr
        assert f"127.0.0.1:{sport}" in res.stderr and f"127.0.0.1:{cport}" in res.stderr
        assert job.proc.wait(timeout=30) == 0            # thawed, ran to its end
        assert job.out.read_text().endswith("done\n")
        assert fd
    finally:
        job.kill()


@pytest.mark.parametrize("mode", ["stream", "dgram"])
def test_files_in_flight_are_passed_after_restore(tmp_path, mode):
    """Files passed with SCM_RIGHTS and not yet received at the checkpoint arrive after
    the resume, each open at the position its sender left."""
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 8)
    cmd = [sys.executable, PROGRAMS / "passfd.py", mode, 40, 0.05, data]
    ref = reference(cmd, tmp_path / "ref.txt")
    out = tmp_path / "stdout.txt"
    said = interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    assert out.read_bytes() == ref
    assert ref.endswith(b"done 0\n")
    assert "in flight" not in said


def test_named_datagram_server_and_its_client(tmp_path):
    """A datagram socket bound to a path (records queued in it at the checkpoint) and a
    client connected to it one way: bound and connected again, nothing lost or repeated."""
    cmd = [sys.executable, PROGRAMS / "dgram_named.py", "log.sock", 40, 0.05]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = reference(["bash", "-c", f"cd {ref_dir} && {' '.join(map(str, cmd))}"], ref_dir / "out.txt")
    out = tmp_path / "stdout.txt"
    # the client sends twice as fast as the server takes: ~10 records are queued by then
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    assert out.read_bytes() == ref
    assert b"done 0 " in ref


@pytest.mark.parametrize("mode", ["stream", "dgram"])
def test_sockets_and_pipes_in_flight_are_passed_after_restore(tmp_path, mode):
    """Unix sockets (socketpair halves with queued data, both ends of a pair, listening
    named sockets) and pipe ends (with buffered data) passed with SCM_RIGHTS, held by
    nothing but the queue at the checkpoint, arrive after the resume and work: the pipe's
    data read to EOF, a conversation over the socket, a connection to the listener."""
    cmd = [sys.executable, PROGRAMS / "passobj.py", mode, 30, 0.05]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = reference(["bash", "-c", f"cd {ref_dir} && {' '.join(map(str, cmd))}"], ref_dir / "out.txt")
    out = tmp_path / "stdout.txt"
    # the parent sends twice as fast as the child takes: ~5 messages (30 fds) in flight then
    said = interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 5)
    assert out.read_bytes() == ref
    assert ref.endswith(b"done 0\n") and ref.count(b"answer") == 30
    assert "in flight" not in said


def test_nested_in_flight_refused_program_runs_on(tmp_path):
    """A socket in flight whose own queue carries a passed fd: refused, naming the process,
    the queue's fd and the socket; the program runs on to its normal end."""
    job = Job.start([sys.executable, PROGRAMS / "passobj.py", "nested", 3], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd" in res.stderr and "in flight" in res.stderr, res.stderr
        assert "nested" in res.stderr and "socket:[" in res.stderr, res.stderr
        assert job.proc.wait(timeout=30) == 0
        assert job.out.read_text() == "sent\ngot outer inner 1 done\n"
        assert not (tmp_path / "img").exists() or not any((tmp_path / "img").iterdir())
    finally:
        job.kill()


def test_accepted_unix_connections_keep_their_names(tmp_path):
    """Accepted unix connections (stream to a listener still open, seqpacket to an abstract
    name whose listener closed, stream from a client bound to a name of its own to a
    listener closed and unlinked): restored by connecting and accepting again, so
    getsockname/getpeername of both ends, and the data queued both ways, are as they were;
    no socket file is left behind where none was."""
    cmd = [sys.executable, PROGRAMS / "unix_names.py", 40, 0.03]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = reference(["bash", "-c", f"cd {ref_dir} && {' '.join(map(str, cmd))}"], ref_dir / "out.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    assert out.read_bytes() == ref
    assert ref.endswith(b"done 0 False True\n")
    assert b"gone.sock>cli.sock c39 cli.sock>gone.sock" in ref and b"@abs>- c39 ->@abs" in ref


def test_sockets_whose_peer_closed_and_unconnected_ones(tmp_path):
    """A stream and a seqpacket socket whose peer exited with records still queued, and a
    socket never connected: the records come back, then the end (EOF, EPIPE) as the peer
    is gone; the fresh socket connects afterwards."""
    cmd = [sys.executable, PROGRAMS / "widowed.py", 40, 0.03]
    ref = reference(cmd, tmp_path / "ref.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    assert out.read_bytes() == ref
    assert ref.endswith(b"end b'' b''\nwrite EPIPE\nfresh hi\n")


def test_fifos_with_data_and_in_flight(tmp_path):
    """FIFOs (named pipes) opened by path: a read end whose writer exited with records
    buffered, and a read-write end held only by a socket's queue (passed, not received):
    opened by path again, their data buffered again; EOF once the records are read."""
    cmd = [sys.executable, PROGRAMS / "fifos.py", 40, 0.03]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = reference(["bash", "-c", f"cd {ref_dir} && {' '.join(map(str, cmd))}"], ref_dir / "out.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    assert out.read_bytes() == ref
    assert ref.endswith(b"end b''\npassed all written done.fifo\n")
