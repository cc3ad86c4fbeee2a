"""Migration of a running computation between two "nodes": network namespaces joined by
a veth pair (private test link), the destination's hpcckptd authenticating by munge."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpcckpt.engine.dump import dump
from hpcckpt.images import service_pb2 as spb
from hpcckpt.service import framing
from tests.engine.helpers import PROGRAMS, Job, pid_alive, reference

from .conftest import start_hog

PORT = 7077


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def munged():
    yield from _munged_daemon()


@pytest.fixture(scope="module")
def other_munged():
    """Another cluster's munged: its own key."""
    yield from _munged_daemon()


def _munged_daemon():
    if not shutil.which("munged"):
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", "munge")
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-munge-", dir="/tmp"))
    d.chmod(0o755)
    m = d / "m"
    m.mkdir()
    key = m / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(m, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    sock = m / "munge.socket"
    sh("runuser", "-u", "munge", "--", "munged", "--force", f"--socket={sock}", f"--key-file={key}",
       f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
    m.chmod(0o711)
    yield str(sock)
    try:
        os.kill(int((m / "munged.pid").read_text()), 15)
    except (OSError, ValueError):
        pass
    shutil.rmtree(d, ignore_errors=True)


DEST: dict = {}    # the running destination hpcckptd (its Popen), for tests that look under it


@pytest.fixture
def dest_daemon(nodes, munged, tmp_path):
    b, addr = nodes.b, nodes.addr_b
    run_dir = Path(tempfile.mkdtemp(prefix="hpcckptd-b-", dir="/tmp"))
    p = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-m", "hpcckpt.service.daemon",
                          "--socket", str(run_dir / "d.sock"), "--listen", f"{addr}:{PORT}",
                          "--spool", str(run_dir / "spool"), "--munge-socket", munged],
                         stderr=open(tmp_path / "daemon-b.log", "wb"))
    deadline = time.monotonic() + 20
    while not (run_dir / "d.sock").exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon-b.log").read_text()
        time.sleep(0.02)
    DEST["proc"] = p
    yield addr
    p.terminate()
    p.wait(timeout=10)
    shutil.rmtree(run_dir, ignore_errors=True)


def _descendant(root: int, word: str) -> int:
    """The process under `root` whose command line contains `word`."""
    ppid, cmd = {}, {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid[int(name)] = int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1])
            cmd[int(name)] = open(f"/proc/{name}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    for pid, c in cmd.items():
        p = pid
        while word in c and "hpcckpt.cli" not in c and p in ppid and p > 1:
            p = ppid[p]
            if p == root:
                return pid
    raise AssertionError(f"no process running {word} under {root}")


def _descendants(root: int, word: str) -> list[int]:
    """Processes under `root` whose command line contains `word`."""
    ppid, found = {}, []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid[int(name)] = int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1])
            if word in open(f"/proc/{name}/cmdline", "rb").read().decode(errors="replace"):
                found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    out = []
    for pid in found:
        p = pid
        while p in ppid and p > 1:
            p = ppid[p]
            if p == root:
                out.append(pid)
                break
    return out


def _job_on_node_a(a: str, tmp_path: Path, program: str = "compute.py", *args):
    """compute.py under `hpcckpt run` (own PID namespace) on node a, midway: (monitor, job
    PID, output file, the uninterrupted output)."""
    cmd = [sys.executable, PROGRAMS / program, *(args or (60, 0.05))]   # long enough for a loaded machine
    ref = reference(cmd, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    with open(out, "wb") as o:
        run = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.cli", "run", "--",
                                *map(str, cmd)], stdout=o, stderr=subprocess.DEVNULL)
    while out.read_bytes().count(b"\n") < 5:
        time.sleep(0.02)
    return run, _descendant(run.pid, program), out, ref     # ours, not another suite copy's


def _finishes(out: Path, ref: bytes) -> None:
    deadline = time.monotonic() + 120
    while not out.read_bytes().endswith(b"done\n"):
        assert time.monotonic() < deadline, out.read_text()[-500:]
        time.sleep(0.05)
    assert out.read_bytes() == ref


def test_migrate_running_job_between_nodes(nodes, munged, dest_daemon, tmp_path):
    a, addr = nodes.a, nodes.addr_b
    run, job, out, ref = _job_on_node_a(a, tmp_path)
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.cli", "migrate",
                          "--pid", str(job), "--to", f"{addr}:{PORT}", "--munge-socket", munged],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "now runs on" in res.stderr
    run.wait(timeout=30)                     # the source's monitor saw its job leave
    _finishes(out, ref)


ACTION = r"""#!/bin/sh
st=$(sed -n 's/^State:\t\(.\).*/\1/p' /proc/$HPCCKPT_PID/status 2>/dev/null)
echo "$HPCCKPT_ACTION $HPCCKPT_PID ${HPCCKPT_NODE:-here} $st" >> LOG
[ "$HPCCKPT_ACTION" != "$1" ]
"""

MIGRATE = """
import json, sys
from hpcckpt.service.actions import ActionScript
from hpcckpt.service.migrate import migrate
seen = []
r = migrate(int(sys.argv[1]), sys.argv[2], sys.argv[3], show_progress=False, action=ActionScript(sys.argv[4]),
            on_notify=lambda n: seen.append([n.event, n.done, n.total, n.wait]))
print(json.dumps({"pid": r.pid, "seen": seen}))
"""


def test_migration_hooks_and_progress_on_both_sides(nodes, munged, dest_daemon, tmp_path):
    """The source's action script runs at its "frozen" and "dumped" and at the destination's
    "restored" (the process built there, not yet running); the destination's restore
    reports its progress back."""
    a, addr = nodes.a, nodes.addr_b
    log = tmp_path / "actions.log"
    script = tmp_path / "action.sh"
    script.write_text(ACTION.replace("LOG", str(log)))
    script.chmod(0o755)
    run, job, out, ref = _job_on_node_a(a, tmp_path)
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", MIGRATE, str(job), f"{addr}:{PORT}",
                          munged, f"{script} none"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    run.wait(timeout=30)
    progress = [e for e in got["seen"] if e[0] == "progress"]
    assert progress and progress[-1][1] == progress[-1][2] > 0           # the restore's bytes, to 100%
    assert ["restored", 0, 0, True] in got["seen"]
    lines = log.read_text().splitlines()
    # one host here: the remote process has the same PID, seen stopped (built, not yet run)
    assert lines == [f"frozen {job} here t", f"dumped {job} here t", f"restored {got['pid']} {addr}:{PORT} t"]
    _finishes(out, ref)


def test_migration_refused_at_restored_comes_back_to_the_source(nodes, munged, dest_daemon, tmp_path):
    a, addr = nodes.a, nodes.addr_b
    log = tmp_path / "actions.log"
    script = tmp_path / "action.sh"
    script.write_text(ACTION.replace("LOG", str(log)))
    script.chmod(0o755)
    run, job, out, ref = _job_on_node_a(a, tmp_path)
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.cli", "migrate",
                          "--pid", str(job), "--to", f"{addr}:{PORT}", "--munge-socket", munged,
                          "--action-script", f"{script} restored"], capture_output=True, text=True, timeout=120)
    # it was never killed here: thawed, it runs on under its own monitor
    assert res.returncode == 1 and "at 'restored'" in res.stderr and "runs on here" in res.stderr, res.stderr
    _finishes(out, ref)
    assert run.wait(timeout=30) == 0
    assert [x.split()[0] for x in log.read_text().splitlines()] == ["frozen", "dumped", "restored"]


def test_unauthenticated_migration_is_refused(dest_daemon, nodes):
    a, addr = nodes.a, nodes.addr_b
    req = spb.Request(version=framing.VERSION, migrate=spb.MigrateRequest(
        files=[spb.MigrateFile(name="inventory.img", size=4)], credential=b"MUNGE:forged:"))
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2]))); "
            "s.sendall(sys.stdin.buffer.read()); s.shutdown(1); sys.stdout.buffer.write(s.recv(65536))")
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", code, addr, str(PORT)],
                         input=framing.encode(req) + b"\0\0\0\0", capture_output=True, timeout=60)
    resp = framing.decode(spb.Response, res.stdout[4:])
    assert not resp.ok and "munge credential refused" in resp.error


CRAFTED = """
import socket, sys
from pathlib import Path
from hpcckpt.images import service_pb2 as spb
from hpcckpt.service import framing, migrate, munge
img, host, port, msock, mode = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
req = migrate.request_for(img)
req.credential = munge.encode(migrate.binding(req), msock)
s = socket.create_connection((host, port))
s.sendall(framing.encode(spb.Request(version=framing.VERSION, migrate=req)))
for f in req.files:
    data = (img / f.name).read_bytes()
    if f.name.startswith("pages-") and mode == "cut":
        s.sendall(data[: len(data) // 2])
        s.close()
        sys.exit(0)
    if f.name.startswith("pages-") and mode == "corrupt":
        data = data[:-1] + bytes([data[-1] ^ 1])
    s.sendall(data)
while True:
    r = framing.decode(spb.Response, framing.read_frame(framing.sock_reader(s)))
    if r.final:
        print(r.error)
        break
"""


@pytest.mark.parametrize("mode", ["cut", "corrupt"])
def test_a_broken_or_corrupt_stream_leaves_nothing_at_the_destination(nodes, munged, dest_daemon, tmp_path,
                                                                       memhog, mode):
    """The destination restores while the pages still arrive: a stream that breaks off, or
    whose pages do not match the inventory's digest, kills what the restore built (nothing
    ever ran) and removes the staged files."""
    a, addr = nodes.a, nodes.addr_b
    hog = start_hog(memhog, 64)
    img = tmp_path / "img"
    dump(hog.pid, img, show_progress=False)
    hog.wait(timeout=10)
    staged = set(Path("/dev/shm").glob("hpcckpt-migrate-0-*"))
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", CRAFTED, img, addr, str(PORT), munged, mode],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr
    if mode == "corrupt":
        assert "corrupt (xxh3-128 digest differs" in res.stdout, res.stdout
    deadline = time.monotonic() + 30
    while pid_alive(hog.pid) or set(Path("/dev/shm").glob("hpcckpt-migrate-0-*")) - staged:
        assert time.monotonic() < deadline, "the half-restored process or its staged files stayed"
        time.sleep(0.05)


def test_migrate_a_process_tree(nodes, munged, dest_daemon, tmp_path):
    """A multiprocessing Pool (parent, workers, pipes and semaphores between them): its page
    files stream in the order the destination fills them; the result is exact."""
    a, addr = nodes.a, nodes.addr_b
    run, job, out, ref = _job_on_node_a(a, tmp_path, "pool.py", 60, 0.05)
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.cli", "migrate",
                          "--pid", str(job), "--to", f"{addr}:{PORT}", "--munge-socket", munged],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    run.wait(timeout=30)
    _finishes(out, ref)


PROXY = r"""
import socket, struct, sys, threading
from hpcckpt.images import service_pb2 as spb
port, dest, dport, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
srv = socket.create_server(("127.0.0.1", port))
print("ready", flush=True)
c, _ = srv.accept()
d = socket.create_connection((dest, dport))
def back():                       # the destination's answers, to the source
    try:
        while data := d.recv(65536):
            c.sendall(data)
    except OSError:
        pass
    try:
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=back, daemon=True).start()
def exact(n):
    buf = b""
    while len(buf) < n:
        buf += c.recv(n - len(buf))
    return buf
head = exact(4)
body = exact(struct.unpack("<I", head)[0])
files = spb.Request.FromString(body).migrate.files
meta = sum(f.size for f in files if not f.name.startswith("pages-"))
pages = sum(f.size for f in files if f.name.startswith("pages-"))
assert pages > 1 << 20, pages
d.sendall(head + body)
at = meta + (pages // 2 if mode == "cut" else pages - 1)    # in the bytes after the request
seen = 0
while data := c.recv(1 << 20):
    if seen <= at < seen + len(data):
        if mode == "cut":         # both ways, mid-page-file
            d.sendall(data[:at - seen])
            d.close()
            c.close()
            sys.exit(0)
        data = bytearray(data)
        data[at - seen] ^= 1      # the last byte of the last page file
    d.sendall(data)
    seen += len(data)
"""


@pytest.mark.parametrize("mode", ["cut", "corrupt"])
def test_a_broken_or_corrupt_stream_from_a_real_source_keeps_the_process_there(nodes, munged, dest_daemon,
                                                                              tmp_path, mode):
    """The source streams while it dumps: the process is frozen, not killed, until the
    destination has checked every page. A connection cut mid-page, or one flipped bit in
    the last page, leaves nothing at the destination (no process, no staged file), and the
    process thaws at the source and finishes exactly under its own monitor."""
    a, addr = nodes.a, nodes.addr_b
    run, job, out, ref = _job_on_node_a(a, tmp_path)
    staged = set(Path("/dev/shm").glob("hpcckpt-migrate-0-*"))
    proxy = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c", PROXY, str(PORT + 1), addr, str(PORT),
                              mode], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert proxy.stdout.readline() == "ready\n"
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.cli", "migrate",
                          "--pid", str(job), "--to", f"127.0.0.1:{PORT + 1}", "--munge-socket", munged],
                         capture_output=True, text=True, timeout=120)
    proxy.wait(timeout=30)
    assert res.returncode == 1 and "runs on here" in res.stderr, res.stderr
    if mode == "corrupt":
        assert "corrupt (xxh3-128 digest differs" in res.stderr, res.stderr
    else:
        assert "broke off" in res.stderr or "without an answer" in res.stderr, res.stderr
    deadline = time.monotonic() + 30
    while _descendants(DEST["proc"].pid, "compute.py") or set(Path("/dev/shm").glob("hpcckpt-migrate-0-*")) - staged:
        assert time.monotonic() < deadline, "the half-restored process or its staged files stayed"
        time.sleep(0.05)
    _finishes(out, ref)
    assert run.wait(timeout=30) == 0


TWICE = """
import socket, sys
from hpcckpt.images import service_pb2 as spb
from hpcckpt.service import framing, migrate, munge
req = spb.MigrateRequest(files=[spb.MigrateFile(name="inventory.img", size=4)] * 2)
req.credential = munge.encode(migrate.binding(req), sys.argv[3])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(framing.encode(spb.Request(version=framing.VERSION, migrate=req)))
print(framing.decode(spb.Response, framing.read_frame(framing.sock_reader(s))).error)
"""


def test_a_file_named_twice_is_refused(nodes, munged, dest_daemon):
    """Each file is made under a temporary name and renamed into place: a second file of
    the same name must be refused before, not replace the first."""
    a, addr = nodes.a, nodes.addr_b
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", TWICE, addr, str(PORT), munged],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert "migration names a file twice" in res.stdout, res.stdout + res.stderr


def test_a_sender_of_another_cluster_is_refused_and_its_process_runs_on(nodes, munged, other_munged, dest_daemon,
                                                                        tmp_path):
    """A credential made with another key: the destination refuses it before any byte of
    the image, the source says why and thaws its process, which ends exactly."""
    a, addr = nodes.a, nodes.addr_b
    run, job, out, ref = _job_on_node_a(a, tmp_path)
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-m", "hpcckpt.cli", "migrate",
                          "--pid", str(job), "--to", f"{addr}:{PORT}", "--munge-socket", other_munged],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "refused the migration: munge credential refused" in res.stderr, res.stderr
    assert "runs on here" in res.stderr, res.stderr
    _finishes(out, ref)
    assert run.wait(timeout=30) == 0


SLOW = """
import json, sys
from hpcckpt.service import migrate, outgoing
outgoing.HOOK_TIMEOUT = 1          # the destination holds its copy 1 s for our answer
def action(stage, pid, images, **kw):
    if stage == "restored":
        import time
        time.sleep(6)              # ... and our action takes longer: it gives its copy up
try:
    migrate.migrate(int(sys.argv[1]), sys.argv[2], sys.argv[3], show_progress=False, action=action)
except migrate.MigrationFailed as e:
    print(e)
"""


def test_a_destination_that_gave_up_its_copy_keeps_the_process_here(nodes, munged, dest_daemon, tmp_path):
    """The destination stops waiting at "restored" (its hook timed out while the source's
    action ran) and kills its copy: the source must then not kill its own."""
    a, addr = nodes.a, nodes.addr_b
    run, job, out, ref = _job_on_node_a(a, tmp_path, "compute.py", 200, 0.05)
    res = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", SLOW, str(job), f"{addr}:{PORT}", munged],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert "gave up its copy" in res.stdout and "runs on here" in res.stdout, res.stdout + res.stderr
    _finishes(out, ref)
    assert run.wait(timeout=30) == 0


def test_migrate_tcp_server_with_its_namespace_client_never_notices(nodes, munged, dest_daemon, tmp_path):
    """A TCP server in a network namespace of its own on node A (its veth a port of A's
    bridge), a client in a third namespace on the same segment streaming to it: `hpcckpt
    migrate --tcp-established --netns` moves the server, its namespace and its address to
    node B; the client runs through (no reset) and both ends received exactly the other's
    stream (SHA-256 both sides). The server's veth left A and is a port of B's bridge."""
    from tests.engine.test_tcp import PROG, TOTAL, check_stream, expected, progress, wait_for
    from tests.engine.test_netns import _job_of, node_side
    want = expected()
    j, c = nodes.namespace("mj"), nodes.namespace("mc")
    addr = nodes.ip(10)
    nodes.attach(j, nodes.a, "mjv0", f"{addr}/24")
    nodes.attach(c, nodes.a, "mcv0", f"{nodes.ip(20)}/24")
    # under `hpcckpt run` (own PID namespace: one machine plays both nodes, so PIDs must be free)
    srv = Job.start(["ip", "netns", "exec", nodes.a, sys.executable, "-m", "hpcckpt.cli", "run", "--netns",
                     f"/run/netns/{j}", "--", "sh", "-c", f"{sys.executable} {PROG} server {addr} {TOTAL}; exec sleep 600"],
                    tmp_path / "server.txt")
    client = moved = None
    try:
        srv.wait_lines(1)
        job = _job_of(srv.pid, nodes.a)
        subprocess.run(["ip", "netns", "del", j], check=True)     # the job's own: only it holds it now
        port = srv.out.read_text().split()[1]
        client = Job.start(["ip", "netns", "exec", c, sys.executable, PROG, "client", addr, port, TOTAL],
                           tmp_path / "client.txt")
        wait_for(lambda: progress(client.out, "client") > TOTAL // 10, "the stream to get going",
                 alive=(srv.proc, client.proc))
        res = subprocess.run(["ip", "netns", "exec", nodes.a, sys.executable, "-m", "hpcckpt.cli", "migrate",
                              "--pid", str(job), "--to", f"{nodes.addr_b}:{PORT}", "--munge-socket", munged,
                              "--tcp-established", "--netns"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        moved = int(res.stderr.split("as PID")[1].split()[0])
        srv.proc.wait(timeout=30)                                   # the source's monitor saw its job leave
        assert node_side(nodes.a, "mjv0") is None
        assert client.proc.wait(timeout=120) == 0, client.out.read_text()[-1000:]
        check_stream(client.out, "client", "server", want)
        wait_for(lambda: "server sent" in srv.out.read_text(), "the migrated server's last line")
        check_stream(srv.out, "server", "client", want)
        side = node_side(nodes.b, "mjv0")
        assert side and side.get("master") == "br0" and "UP" in side["flags"], side
    finally:
        for p in (client, srv):
            if p is not None:
                p.kill()
        if moved is not None and pid_alive(moved):
            os.kill(moved, 9)
