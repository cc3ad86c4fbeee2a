"""Established TCP connections across a checkpoint: a client and a server stream data to
each other (both queues of both ends full of unread, unacknowledged or unsent bytes) while
one end is dumped, killed and restored. The end that stayed alive never sees a reset, and
both ends end with the SHA-256 of exactly the other's stream. Also: both ends inside the
dumped tree, two network namespaces joined by a veth pair (the network lock then holds
back real packets between "nodes"), and connections we cannot take, refused with the
process left running and no lock left behind."""
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcckpt.kernel import netlock
from .helpers import PROGRAMS, Job, cli

PROG = PROGRAMS / "tcp_stream.py"
TOTAL = 4_000_000
HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


@pytest.fixture(scope="module", autouse=True)
def nft():
    if not shutil.which("nft"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nftables"],
                       check=True, capture_output=True)


def expected() -> dict[str, str]:
    out = subprocess.run([sys.executable, PROG, "digests", "-", str(TOTAL)], capture_output=True,
                         text=True, check=True).stdout.split()
    return {"client": out[0], "server": out[1]}


def final_line(path: Path, role: str) -> list[str]:
    lines = [x for x in path.read_text().splitlines() if x.startswith(f"{role} sent")]
    assert len(lines) == 1, path.read_text()[-2000:]
    return lines[0].split()


def check_stream(path: Path, role: str, other: str, want: dict[str, str]) -> None:
    """`role` sent its whole stream and received exactly `other`'s, each byte once."""
    w = final_line(path, role)
    assert w[2] == str(TOTAL) and w[3] == want[role], w
    assert w[5] == str(TOTAL) and w[6] == want[other], w


def progress(path: Path, role: str) -> int:
    """Bytes `role` has received so far, by its last progress line."""
    lines = [x for x in path.read_text().splitlines() if x.startswith(f"progress {role}")]
    return int(lines[-1].split()[-1]) if lines else 0


def wait_for(cond, what: str, timeout: float = 30, alive: tuple = ()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in alive:
            assert p.poll() is None, f"{what}: process {p.pid} ended ({p.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def runs_on(job: Job) -> None:
    """The process was left running, not frozen: it goes on printing its ticks."""
    n = job.lines()
    wait_for(lambda: job.lines() >= n + 5, "the program to run on", alive=(job.proc,))


def restore_bg(images: Path, log: Path, prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), *HPCCKPT, "restore", "--images", str(images)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), stdin=subprocess.DEVNULL)


def our_tables(pid: int, ns: str | None = None) -> list[str]:
    """Lock tables a dump of `pid` left (in netns `ns`, else ours)."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["nft", "list", "tables"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.split()[-1].endswith(f"_{pid}")
            and netlock.PREFIX in line]


def drop_tables(pid: int, ns: str | None = None) -> None:
    """A failed test may leave a killed tree's lock behind: never let it outlive the test."""
    for t in our_tables(pid, ns):
        subprocess.run((["ip", "netns", "exec", ns] if ns else []) + ["nft", "-f", "-"],
                       input=netlock.delete_script(t), text=True, check=True)


def _server_dumped(tmp_path: Path, host: str, ns: tuple[str, str] | None = None, connect: str = "") -> None:
    """The server is dumped (killed) mid-stream and restored; the client runs throughout.
    With `ns` (server's, client's), each end lives in its own network namespace; the
    client connects to `connect` (default: where the server listens)."""
    want = expected()
    in_a = ["ip", "netns", "exec", ns[0]] if ns else []
    in_b = ["ip", "netns", "exec", ns[1]] if ns else []
    srv = Job.start([*in_a, sys.executable, PROG, "server", host, TOTAL], tmp_path / "server.txt")
    client = rest = None
    try:
        srv.wait_lines(1)
        port = srv.out.read_text().split()[1]
        client = Job.start([*in_b, sys.executable, PROG, "client", connect or host, port, TOTAL],
                           tmp_path / "client.txt")
        wait_for(lambda: progress(client.out, "client") > TOTAL // 10, "the stream to get going",
                 alive=(srv.proc, client.proc))
        cli("dump", "--pid", srv.pid, "--images", tmp_path / "img", "--tcp-established")
        assert srv.proc.wait(timeout=10) != 0                       # killed
        assert our_tables(srv.pid, ns[0] if ns else None), "no network lock while the server is away"
        if ns:
            assert not our_tables(srv.pid), "lock made outside the server's network namespace"
        time.sleep(0.5)                       # the client keeps sending into the lock meanwhile
        assert client.proc.poll() is None, client.out.read_text()[-500:]
        rest = restore_bg(tmp_path / "img", tmp_path / "restore.txt", in_a)
        assert client.proc.wait(timeout=60) == 0, client.out.read_text()[-1000:]
        assert rest.wait(timeout=60) == 0, (tmp_path / "restore.txt").read_text()
        check_stream(client.out, "client", "server", want)
        check_stream(srv.out, "server", "client", want)
        # TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, SO_RCVTIMEO's microseconds, SO_BUF_LOCK, TCP_CONGESTION
        assert "server opts 1 1 77 500000 0 reno" in srv.out.read_text()
        assert not our_tables(srv.pid, ns[0] if ns else None), "network lock left after the restore"
    finally:
        for p in (client, srv):
            if p is not None:
                p.kill()
        drop_tables(srv.pid, ns[0] if ns else None)
        if rest is not None and rest.poll() is None:
            rest.kill()
            rest.wait()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::>127.0.0.1"])
def test_server_dumped_mid_stream(tmp_path, host):
    """IPv4, IPv6, and an IPv6 server's IPv4 client (addresses ::ffff:127.0.0.1)."""
    listen, _, connect = host.partition(">")
    _server_dumped(tmp_path, listen, connect=connect)


def test_client_dumped_mid_stream(tmp_path):
    """The writer that fills its send queue is the one checkpointed: unsent and
    unacknowledged bytes go through the image."""
    want = expected()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    srv = subprocess.Popen([sys.executable, "-c", SERVE_ONE, str(ls.fileno()), str(TOTAL), str(PROG)],
                           pass_fds=(ls.fileno(),), stdout=open(tmp_path / "server.txt", "wb"),
                           stderr=subprocess.STDOUT)
    ls.close()
    client = Job.start([sys.executable, PROG, "client", "127.0.0.1", _port(srv, tmp_path), TOTAL],
                       tmp_path / "client.txt")
    rest = None
    try:
        wait_for(lambda: progress(tmp_path / "server.txt", "server") > TOTAL // 10, "the stream to get going",
                 alive=(srv, client.proc))
        cli("dump", "--pid", client.pid, "--images", tmp_path / "img", "--tcp-established")
        client.proc.wait(timeout=10)
        img = _connection_in_image(tmp_path / "img")
        assert len(img.send_queue) > 0, "the client's send queue was empty: nothing tested"
        shown = cli("show", tmp_path / "img").stdout
        assert f"B unacknowledged ({img.unsent} unsent)" in shown and "ESTABLISHED" in shown, shown
        time.sleep(0.5)
        rest = restore_bg(tmp_path / "img", tmp_path / "restore.txt")
        assert srv.wait(timeout=60) == 0, (tmp_path / "server.txt").read_text()[-1000:]
        assert rest.wait(timeout=60) == 0, (tmp_path / "restore.txt").read_text()
        check_stream(client.out, "client", "server", want)
        check_stream(tmp_path / "server.txt", "server", "client", want)
        assert not our_tables(client.pid)
    finally:
        client.kill()
        drop_tables(client.pid)
        if srv.poll() is None:
            srv.kill()
        srv.wait()
        if rest is not None and rest.poll() is None:
            rest.kill()
            rest.wait()


# The server end of test_client_dumped_mid_stream: the program's server role on a listening
# socket the test made (so the port is known before anything starts).
SERVE_ONE = """
import socket, sys, runpy
ls = socket.socket(fileno=int(sys.argv[1]))
mod = runpy.run_path(sys.argv[3])
mod["server_side"](ls, int(sys.argv[2]))
"""


def _port(srv: subprocess.Popen, tmp_path: Path) -> str:
    fd = next(int(f) for f in os.listdir(f"/proc/{srv.pid}/fd")
              if os.readlink(f"/proc/{srv.pid}/fd/{f}").startswith("socket:"))
    from hpcckpt.kernel.libc import pidfd_getfd, pidfd_open
    pidfd = pidfd_open(srv.pid)
    try:
        s = socket.socket(fileno=pidfd_getfd(pidfd, fd))
    finally:
        os.close(pidfd)
    try:
        return str(s.getsockname()[1])
    finally:
        s.close()


def _connection_in_image(images: Path):
    from hpcckpt.images.imageset import ImageSet
    iset = ImageSet(images)
    p = iset.process(iset.inventory().root_pid)
    conns = [e.socket.tcp for e in p.fds if e.socket.HasField("tcp")]
    assert len(conns) == 1, p.fds
    return conns[0]


def test_both_ends_in_the_tree(tmp_path):
    """A loopback connection between parent and child of one job, under `hpcckpt run`:
    both ends go into the image and come back connected to each other."""
    want = expected()
    out = tmp_path / "out.txt"
    cmd = [sys.executable, PROG, "both", "127.0.0.1", TOTAL]
    run = [*HPCCKPT, "run", "--tcp-established", "--images", str(tmp_path / "img"), "--", *map(str, cmd)]

    def start() -> subprocess.Popen:
        with open(out, "ab") as f:
            return subprocess.Popen(run, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                                    start_new_session=True)
    before = set(netlock.tables())
    mon = start()
    try:
        wait_for(lambda: progress(out, "server") > TOTAL // 10, "the stream to get going", alive=(mon,))
        mon.send_signal(15)
        said = mon.communicate(timeout=60)[1].decode()
        assert mon.returncode == 0 and "final checkpoint" in said, said
        mon = start()
        err = mon.communicate(timeout=120)[1].decode()
        assert mon.returncode == 0 and "resumed from" in err, err
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
        left = set(netlock.tables()) - before
        for t in left:
            netlock.nft(netlock.delete_script(t))
    assert not left, f"network lock tables left after the restore: {left}"
    check_stream(out, "client", "server", want)
    check_stream(out, "server", "client", want)
    assert "client status 0" in out.read_text()


def test_periodic_checkpoints_leave_connections_alone(tmp_path):
    """`run --every` with --tcp-established: each checkpoint locks the job's connection and
    puts it in repair mode while frozen, then lets it go; the stream never notices."""
    want = expected()
    out = tmp_path / "out.txt"
    cmd = [sys.executable, PROG, "both", "127.0.0.1", TOTAL]
    with open(out, "wb") as f:
        mon = subprocess.Popen([*HPCCKPT, "run", "--tcp-established", "--every", "0.4", "--full-every", "1",
                                "--images", str(tmp_path / "img"), "--", *map(str, cmd)],
                               stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE, start_new_session=True)
    try:
        err = mon.communicate(timeout=120)[1].decode()
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    assert mon.returncode == 0, err
    assert err.count("run: checkpoint ") >= 2, err
    check_stream(out, "client", "server", want)
    check_stream(out, "server", "client", want)


def test_server_in_its_own_namespace_over_veth(tmp_path, nodes):
    """Server and client on two "nodes": the dump runs outside both, locks the connection
    inside the server's namespace, and the restore runs in it."""
    _server_dumped(tmp_path, nodes.addr_a, (nodes.a, nodes.b))


# -- connections we cannot take ----------------------------------------------------------

def _held(tmp_path: Path, raw: bool = False):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    job = Job.start([sys.executable, PROG, "hold", "127.0.0.1", ls.getsockname()[1], 200]
                    + (["raw"] if raw else []), tmp_path / "out.txt")
    conn, _ = ls.accept()
    ls.close()
    job.wait_lines(1)
    words = job.out.read_text().split()
    return job, conn, words[2], words[5]


def test_raw_socket_refused_connection_unlocked(tmp_path):
    """The connection (a lower fd) is locked and in repair mode when the raw socket stops
    the dump: the lock goes, repair mode ends, and the connection still carries data."""
    job, conn, conn_fd, raw_fd = _held(tmp_path, raw=True)
    try:
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd {raw_fd} (IPv4 raw socket" in res.stderr, res.stderr
        assert int(conn_fd) < int(raw_fd)
        assert not (tmp_path / "img").exists() or not os.listdir(tmp_path / "img")
        assert not our_tables(job.pid)
        conn.settimeout(10)
        conn.sendall(b"still there\n")
        assert conn.recv(100) == b"STILL THERE\n"
        runs_on(job)
    finally:
        conn.close()
        job.kill()


def _half(tmp_path: Path, who: str, host: str = "127.0.0.1"):
    ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    ls.bind((host, 0))
    ls.listen(1)
    job = Job.start([sys.executable, PROG, "half", host, ls.getsockname()[1], 160, who],
                    tmp_path / "out.txt")
    conn, _ = ls.accept()
    ls.close()
    job.wait_lines(1)
    return job, conn


def _dump_restore(tmp_path: Path, job: Job, state: str) -> subprocess.Popen:
    res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established")
    job.proc.wait(timeout=10)
    assert _connection_in_image(tmp_path / "img").state == {"CLOSE_WAIT": 8, "FIN_WAIT2": 5}[state], res.stderr
    time.sleep(0.3)
    return restore_bg(tmp_path / "img", tmp_path / "restore.txt")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_peer_closed_its_side_close_wait(tmp_path, host):
    """The peer shut its sending side (the program read the EOF, and writes on: CLOSE_WAIT).
    Restored, it keeps writing with no line lost or repeated, and still reads EOF."""
    job, conn = _half(tmp_path, "peer-closes", host)
    rest = None
    try:
        conn.shutdown(socket.SHUT_WR)
        wait_for(lambda: "peer closed" in job.out.read_text(), "the program to see the EOF")
        conn.settimeout(30)
        got = b""
        while got.count(b"\n") < 5:
            got += conn.recv(4096)
        rest = _dump_restore(tmp_path, job, "CLOSE_WAIT")
        while data := conn.recv(4096):
            got += data
        numbers = [int(x.split()[1]) for x in got.decode().splitlines()]
        assert numbers == list(range(numbers[0], 160)), numbers
        assert rest.wait(timeout=60) == 0, (tmp_path / "restore.txt").read_text()
        out = job.out.read_text()
        assert "eof kept" in out and out.endswith("done\n"), out[-300:]
        assert not our_tables(job.pid)
    finally:
        conn.close()
        job.kill()
        drop_tables(job.pid)
        if rest is not None and rest.poll() is None:
            rest.kill()
            rest.wait()


def test_we_closed_our_side_fin_wait2(tmp_path):
    """The program shut its sending side (FIN_WAIT2, its FIN acknowledged) and counts the
    lines the peer still sends, before, during and after its checkpoint."""
    job, conn = _half(tmp_path, "we-close")
    rest = None
    try:
        conn.settimeout(30)
        got = b""
        while data := conn.recv(100):
            got += data
        assert got == b"bye\n"                     # then its FIN
        sent = 0
        for _ in range(10):
            conn.sendall(b"line %d\n" % sent)
            sent += 1
            time.sleep(0.02)
        rest = _dump_restore(tmp_path, job, "FIN_WAIT2")
        for _ in range(10):                         # into the lock, then into the restored socket
            conn.sendall(b"line %d\n" % sent)
            sent += 1
            time.sleep(0.02)
        conn.close()
        assert rest.wait(timeout=60) == 0, (tmp_path / "restore.txt").read_text()
        out = job.out.read_text()
        assert f"done lines {sent}" in out and "eof" in out, out[-300:]
        assert not our_tables(job.pid)
    finally:
        conn.close()
        job.kill()
        drop_tables(job.pid)
        if rest is not None and rest.poll() is None:
            rest.kill()
            rest.wait()


def test_peer_reset_refused(tmp_path):
    """The peer vanished with a reset: the process's socket has no connection left (CLOSE)."""
    job, conn, conn_fd, _ = _held(tmp_path)
    try:
        local = conn.getpeername()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()                                  # linger 0: a reset, not a FIN
        wait_for(lambda: "reset" in job.out.read_text(), "the program to see the reset")
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd {conn_fd}" in res.stderr and "state CLOSE" in res.stderr, res.stderr
        assert f"{local[0]}:{local[1]}" in res.stderr and "lost its connection" in res.stderr, res.stderr
        runs_on(job)
    finally:
        job.kill()


def test_established_needs_the_flag(tmp_path):
    job, conn, conn_fd, _ = _held(tmp_path)
    try:
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert f"fd {conn_fd}" in res.stderr and "--tcp-established" in res.stderr, res.stderr
        conn.settimeout(10)
        conn.sendall(b"ok\n")
        assert conn.recv(100) == b"OK\n"
        runs_on(job)
    finally:
        conn.close()
        job.kill()


def test_leave_running_then_restore_refused_while_original_lives(tmp_path):
    """--leave-running: the lock goes and repair mode ends before the thaw, so the
    connection carries data on; restoring that image next to the original is refused
    before anything is made, naming the process that holds the connection."""
    job, conn, conn_fd, _ = _held(tmp_path)
    try:
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", "--leave-running")
        assert not our_tables(job.pid)
        conn.settimeout(10)
        conn.sendall(b"after dump\n")
        assert conn.recv(100) == b"AFTER DUMP\n"
        res = cli("restore", "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert "already exists on this node" in res.stderr, res.stderr
        assert f"held by process {job.pid}" in res.stderr and f"fd {conn_fd}" in res.stderr, res.stderr
        runs_on(job)
    finally:
        conn.close()
        job.kill()


LISTEN_ONLY = """
import socket, sys, time
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(4)
print("port", ls.getsockname()[1], "fd", ls.fileno(), flush=True)
for i in range(int(sys.argv[1])):
    time.sleep(0.05)
    print("tick", i, flush=True)
print("done", flush=True)
"""


def test_connection_waiting_to_be_accepted_refused(tmp_path):
    job = Job.start([sys.executable, "-c", LISTEN_ONLY, 200], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        port, fd = job.out.read_text().splitlines()[0].split()[1::2]
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as c:
            me = c.getsockname()
            res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", check=False)
        assert res.returncode != 0
        assert f"from {me[0]}:{me[1]}" in res.stderr, res.stderr
        assert f"process {job.pid}: fd {fd}" in res.stderr and f"127.0.0.1:{port}" in res.stderr, res.stderr
        assert "state LISTEN" in res.stderr and "1 connection(s) waiting to be accepted" in res.stderr
        runs_on(job)
    finally:
        job.kill()


CONNECTING = """
import socket, sys, time
s = socket.socket()
s.setblocking(False)
s.connect_ex(("127.0.0.1", int(sys.argv[1])))
print("fd", s.fileno(), flush=True)
for i in range(int(sys.argv[2])):
    time.sleep(0.05)
    print("tick", i, flush=True)
print("done", flush=True)
"""


def test_connection_being_opened_refused(tmp_path):
    """SYN_SENT: the SYN is dropped by a table of the test's own, so the connect hangs."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    table = f"tcptest_{os.getpid()}"
    netlock.nft(f"add table inet {table}\nadd chain inet {table} out {{ type filter hook output priority 0; }}\n"
                f"add rule inet {table} out tcp dport {port} drop\n")
    job = Job.start([sys.executable, "-c", CONNECTING, port, 200], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        fd = job.out.read_text().split()[1]
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd {fd}" in res.stderr and "SYN_SENT" in res.stderr, res.stderr
        assert f"-> 127.0.0.1:{port}" in res.stderr, res.stderr
        runs_on(job)
    finally:
        job.kill()
        ls.close()
        netlock.nft(netlock.delete_script(table))


DROPPED_ROOT = """
import os, socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", int(sys.argv[1])))
os.setgroups([])
os.setgid(65534)
os.setuid(65534)          # as a daemon that dropped root: it keeps the port, not the right
print("fd", u.fileno(), flush=True)
for i in range(int(sys.argv[2])):
    time.sleep(0.05)
"""


def test_user_image_gets_no_privileged_port(tmp_path):
    """An image handed to a user claims only that user (check_owner); it also gets no port
    below 1024, which the restore (as root) could bind but the user could not."""
    port = 600 + os.getpid() % 300
    job = Job.start([sys.executable, "-c", DROPPED_ROOT, port, 400], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
        job.proc.wait(timeout=10)
        img = tmp_path / "img"
        for f in [img, *img.iterdir()]:
            os.chown(f, 65534, 65534)
        res = cli("restore", "--images", img, check=False)
        assert res.returncode != 0
        assert f"port {port}, which uid 65534 may not bind" in res.stderr, res.stderr
    finally:
        job.kill()


# -- a real server: redis ------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis():
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server",
                        "redis-tools"], check=True, capture_output=True, env={**os.environ,
                                                                              "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("redis-server")


class Resp:
    """A redis client on one connection the test keeps open throughout (RESP by hand)."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""

    def send(self, *args) -> None:
        parts = [str(x).encode() for x in args]
        self.s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.s.recv(65536)
            assert data, "redis closed the connection"
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self._line()
        if line[:1] == b"$":
            n = int(line[1:])
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.s.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data.decode()
        if line[:1] == b":":
            return int(line[1:])
        assert line[:1] == b"+", line
        return line[1:].decode()

    def __call__(self, *args):
        self.send(*args)
        return self.reply()


def test_redis_under_load_keeps_its_clients(tmp_path, redis):
    """redis-server, loaded by redis-benchmark (4 connections) and by a client of the test's
    own, is dumped (killed) and restored midway: the benchmark finishes without an error,
    a command sent while the server was away is answered once, and every key is intact."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = Job.start([redis, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", tmp_path, "--logfile", tmp_path / "redis.log"], tmp_path / "out.txt")
    bench = rest = None
    try:
        wait_for(lambda: "Ready to accept" in (tmp_path / "redis.log").read_text()
                 if (tmp_path / "redis.log").exists() else False, "redis to start", alive=(srv.proc,))
        c = Resp(port)
        for i in range(500):
            c.send("SET", f"tcptest:{i}", f"value-{i}-" + "x" * (i % 50))
        assert [c.reply() for _ in range(500)] == ["OK"] * 500
        bench = subprocess.Popen(["redis-benchmark", "-p", str(port), "-c", "4", "-n", "60000", "-t", "set,get",
                                  "-r", "1000", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.7)
        cli("dump", "--pid", srv.pid, "--images", tmp_path / "img", "--tcp-established")
        srv.proc.wait(timeout=10)
        c.send("INCR", "tcptest:counter")      # the server is gone: held back by the lock
        time.sleep(0.3)
        rest = restore_bg(tmp_path / "img", tmp_path / "restore.txt")
        assert c.reply() == 1
        out = bench.communicate(timeout=120)[0].decode()
        assert bench.returncode == 0 and "Error" not in out, out[-2000:]
        assert "SET:" in out and "GET:" in out and out.count("requests per second") == 2, out[-2000:]
        for i in range(500):
            c.send("GET", f"tcptest:{i}")
        assert [c.reply() for _ in range(500)] == [f"value-{i}-" + "x" * (i % 50) for i in range(500)]
        assert c("INCR", "tcptest:counter") == 2
        again = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "2", "-n", "2000", "-t", "ping", "-q"],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "requests per second" in again.stdout, again.stdout + again.stderr
        c.send("SHUTDOWN", "NOSAVE")
        assert rest.wait(timeout=30) == 0, (tmp_path / "restore.txt").read_text()
        assert not our_tables(srv.pid)
    finally:
        for p in (bench, rest):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        srv.kill()
        drop_tables(srv.pid)


def test_image_fields_bounded_and_pre_dump_lets_go(tmp_path):
    """A real image's connection passes images/validate.py; each field a restore acts on,
    edited out of bounds, is refused naming it. A pre-dump (its fds never restored) of a
    process holding a connection succeeds and leaves it working and unlocked."""
    from hpcckpt.errors import ImageError
    from hpcckpt.images.imageset import ImageSet
    from hpcckpt.images.validate import validate
    job, conn, conn_fd, _ = _held(tmp_path)
    try:
        cli("pre-dump", "--pid", job.pid, "--images", tmp_path / "pre")
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", "--leave-running")
        assert not our_tables(job.pid)
        conn.settimeout(10)
        conn.sendall(b"go on\n")
        assert conn.recv(100) == b"GO ON\n"
        iset = ImageSet(tmp_path / "img")
        p, pm = iset.process(job.pid), iset.pagemap(job.pid)
        size = (tmp_path / "img" / pm.pages_file).stat().st_size
        validate("img", p, pm, size)
        fd = next(f for f in p.fds if f.socket.HasField("tcp"))
        assert fd.fd == int(conn_fd) and fd.socket.tcp.lock_table.startswith(netlock.PREFIX)
        edits = {"lock_table": ("tcp", "filter", "network lock table 'filter'"),
                 "peer_address": ("socket", "10.0.0.1.5", "peer address '10.0.0.1.5'"),
                 "port": ("socket", 0, "port 0"),
                 "unsent": ("tcp", 1 << 20, "unsent"),
                 "state": ("tcp", 7, "state 7"),
                 "rcv_wscale": ("tcp", 15, "window scales")}
        for name, (where, value, said) in edits.items():
            bad = type(p)()
            bad.CopyFrom(p)
            f = next(f for f in bad.fds if f.fd == fd.fd)
            setattr(f.socket.tcp if where == "tcp" else f.socket, name, value)
            with pytest.raises(ImageError, match=said):
                validate("img", bad, pm, size)
        runs_on(job)
    finally:
        conn.close()
        job.kill()


# -- through hpcckptd, as a user ------------------------------------------------------------

from tests.service.conftest import _build_for_users, as_user, daemon, world_dir  # noqa: E402,F401


@pytest.fixture(scope="module")
def rr_exe():
    d, exe = _build_for_users("rr", Path(__file__).parents[2] / "benchmarks" / "rr.c")
    yield exe
    shutil.rmtree(d, ignore_errors=True)


def test_user_server_through_the_daemon(daemon, world_dir, rr_exe):  # noqa: F811 (fixtures)
    """A user's request/response server (uid 65534) is dumped and restored by hpcckptd on
    the user's request, with --tcp-established; the root client's connection carries on,
    a request sent while the server was away answered once."""
    from hpcckpt.client import Client
    _, sock = daemon
    out = world_dir / "out.txt"
    out.touch()
    os.chown(out, 65534, 65534)
    with open(out, "wb") as f:
        srv = subprocess.Popen([str(rr_exe), "server", "127.0.0.1"], stdout=f, stdin=subprocess.DEVNULL,
                               user=65534, group=65534, extra_groups=[])
    try:
        wait_for(lambda: out.read_text().startswith("port"), "the server to listen", alive=(srv,))
        c = socket.create_connection(("127.0.0.1", int(out.read_text().split()[1])), timeout=30)

        def ask(i: int) -> None:
            c.sendall(i.to_bytes(8, "little") * 8)
        def answer(i: int) -> None:
            got = b""
            while len(got) < 64:
                got += c.recv(64 - len(got))
            assert got == i.to_bytes(8, "little") * 8
        for i in range(100):
            ask(i)
            answer(i)
        img = str(world_dir / "img")
        assert as_user(lambda: Client(sock).dump(srv.pid, img, tcp_established=True).pages_bytes) > 0
        srv.wait(timeout=10)
        ask(100)                               # into the lock
        pid = as_user(lambda: Client(sock).restore(img, detach=True).pid)
        answer(100)
        for i in range(101, 200):
            ask(i)
            answer(i)
        assert not our_tables(srv.pid)
        os.kill(pid, 9)                        # before the close, which ends the server
        c.close()
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        drop_tables(srv.pid)


@pytest.fixture
def three_nodes():
    """Namespaces A and B (the server's old and new node) and C (the client), C joined to
    each by a veth pair; the server's address VIP starts on A, C routes it to A."""
    from tests.netnodes import netns_add, netns_del
    for k in range(200):        # names no other copy of the suite holds (`ip netns add` fails on those)
        n = (os.getpid() + k) % 200 + 20
        a, b, c = f"tcp{n}ma", f"tcp{n}mb", f"tcp{n}mc"
        made = [ns for ns in (a, b, c) if netns_add(ns)]
        if len(made) == 3:
            break
        for ns in made:
            netns_del(ns)
    else:
        raise RuntimeError("no free tcpNm* network namespace names")
    vip = f"10.235.{n}.1"
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)   # noqa: E731
    try:
        for node, net in ((a, "233"), (b, "234")):
            here, there = f"tcpm{n}{node[-1]}", f"tcpm{n}c{node[-1]}"
            sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            sh("ip", "link", "set", here, "netns", node)
            sh("ip", "link", "set", there, "netns", c)
            sh("ip", "-n", node, "addr", "add", f"10.{net}.{n}.2/24", "dev", here)
            sh("ip", "-n", c, "addr", "add", f"10.{net}.{n}.1/24", "dev", there)
            for ns, dev in ((node, here), (c, there)):
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", node, "route", "add", "default", "via", f"10.{net}.{n}.1")
        sh("ip", "-n", a, "addr", "add", f"{vip}/32", "dev", "lo")
        sh("ip", "-n", c, "route", "add", f"{vip}/32", "via", f"10.233.{n}.2")
        yield a, b, c, vip, f"10.234.{n}.2"
    finally:
        for ns in (a, b, c):
            subprocess.run(["ip", "netns", "del", ns])


def test_server_migrated_between_nodes(tmp_path, three_nodes):
    """Live migration, by hand: the server is dumped on node A, restored on node B, and
    its address moved to B; the client on C streams on throughout and never notices."""
    a, b, c, vip, b_addr = three_nodes
    want = expected()
    srv = Job.start(["ip", "netns", "exec", a, sys.executable, PROG, "server", vip, TOTAL], tmp_path / "server.txt")
    client = rest = None
    try:
        srv.wait_lines(1)
        port = srv.out.read_text().split()[1]
        client = Job.start(["ip", "netns", "exec", c, sys.executable, PROG, "client", vip, port, TOTAL],
                           tmp_path / "client.txt")
        wait_for(lambda: progress(client.out, "client") > TOTAL // 10, "the stream to get going",
                 alive=(srv.proc, client.proc))
        cli("dump", "--pid", srv.pid, "--images", tmp_path / "img", "--tcp-established")
        srv.proc.wait(timeout=10)
        assert our_tables(srv.pid, a)                  # held off on the old node meanwhile
        rest = restore_bg(tmp_path / "img", tmp_path / "restore.txt", ["ip", "netns", "exec", b])
        wait_for(lambda: "restored" in (tmp_path / "restore.txt").read_text(), "the restore on node B",
                 alive=(rest, client.proc))
        subprocess.run(["ip", "-n", a, "addr", "del", f"{vip}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "-n", b, "addr", "add", f"{vip}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "-n", c, "route", "replace", f"{vip}/32", "via", b_addr], check=True)
        assert client.proc.wait(timeout=120) == 0, client.out.read_text()[-1000:]
        assert rest.wait(timeout=60) == 0, (tmp_path / "restore.txt").read_text()
        check_stream(client.out, "client", "server", want)
        check_stream(srv.out, "server", "client", want)
    finally:
        for p in (client, srv):
            if p is not None:
                p.kill()
        if rest is not None and rest.poll() is None:
            rest.kill()
            rest.wait()


# -- TCP options (engine/tcpopts.py) ------------------------------------------------------

OPTS = PROGRAMS / "tcp_opts.py"


def test_congestion_control_and_fast_open_kept(tmp_path):
    """A listener with Fast Open and congestion control reno (not this node's default), a
    socket with TCP_FASTOPEN_CONNECT/NO_COOKIE: the restored program reads the same."""
    job = Job.start([sys.executable, OPTS, "options"], tmp_path / "out.txt")
    try:
        job.wait_lines(3)
        before = job.out.read_text().splitlines()[-1].split(" ", 2)[2]
        assert before == "opts 5 reno 1 1", before
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
        job.proc.wait(timeout=10)
        n = job.lines()
        rest = restore_bg(tmp_path / "img", tmp_path / "restore.txt")
        try:
            wait_for(lambda: job.lines() > n + 2, "the restored program's ticks", alive=(rest,))
            assert job.out.read_text().splitlines()[-1].split(" ", 2)[2] == before
        finally:
            subprocess.run(["kill", "-9", str(job.pid)])
            rest.wait(timeout=30)
    finally:
        job.kill()


@pytest.mark.parametrize("mode,message", [("md5", "uses TCP-MD5 signatures"),
                                          ("urgent", "urgent data (MSG_OOB) the program has not read")])
def test_md5_and_unread_urgent_data_refused(tmp_path, mode, message):
    """Refused by name, the program left running, no network lock left behind."""
    job = Job.start([sys.executable, OPTS, mode], tmp_path / "out.txt")
    try:
        job.wait_lines(2)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--tcp-established", check=False)
        assert res.returncode != 0 and message in res.stderr, res.stderr
        runs_on(job)
        assert not our_tables(job.pid)
        assert not (tmp_path / "img").exists()
    finally:
        job.kill()
