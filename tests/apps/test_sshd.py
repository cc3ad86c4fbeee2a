"""openssh-server under `hpcckpt run --tcp-established` on a port and config of its own
(key authentication, localhost; as root, and as a user made for the test): an ssh session running a shell fed a command stream is
checkpointed and killed with the server (the final signal) and resumed between two
batches of commands; the same ssh client finishes the stream and exits 0 with output
equal to an uninterrupted session's (shell variables and directory kept). A new login
works afterwards.

sshd's monitor process keeps its end of the socketpair with the exited pre-authentication
child: a unix stream socket whose peer is closed (engine/sockets.py `_dead_peer`), tested
on its own here too."""
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.engine.helpers import PROGRAMS, Job, cli, reference
from .helpers import RunJob, apt_install, free_port, lock_tables, wait_for

SSHD = "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def sshd():
    apt_install(["openssh-server", "openssh-client"], [SSHD, "ssh", "ssh-keygen"])
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)    # sshd's privilege separation directory
    return SSHD


@pytest.fixture(params=["root", "user"])
def login(request, tmp_path):
    """(user name, a directory that user can read and write): root, or a user of the
    test's own, made for it (its name derived from tmp_path) and removed after; sshd then
    runs a privileged monitor and an unprivileged child per session."""
    home = Path(tempfile.mkdtemp(prefix="apps-ssh-"))
    home.chmod(0o755)
    if request.param == "root":
        yield "root", home
        shutil.rmtree(home, ignore_errors=True)
        return
    name = "apps" + hashlib.sha256(bytes(tmp_path)).hexdigest()[:10]
    subprocess.run(["useradd", "-M", "-d", home, "-s", "/bin/bash", name], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "-p", "*", name], check=True)     # not locked: sshd would refuse it
        os.chown(home, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
        yield name, home
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def setup(tmp_path: Path, port: int, user: str, home: Path) -> list[str]:
    """Host and user keys, known_hosts and sshd_config in tmp_path, authorized_keys where
    the user can read it; returns the ssh command line (without the remote command)."""
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / name], check=True)
    (home / "authorized_keys").write_text((tmp_path / "user_key.pub").read_text())
    (home / "authorized_keys").chmod(0o644)
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {(tmp_path / 'host_key.pub').read_text()}")
    (tmp_path / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {tmp_path}/host_key
PidFile {tmp_path}/sshd.pid
AuthorizedKeysFile {home}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
PrintMotd no
LogLevel VERBOSE
""")
    return ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(tmp_path / "user_key"),
            "-o", f"UserKnownHostsFile={tmp_path}/known_hosts", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30", f"{user}@127.0.0.1"]


def batches(work: Path) -> list[str]:
    """The command stream: shell state set in the first batch is used in the second."""
    return [f"X=41; cd {work}; echo \"one $X $(pwd)\"; for i in 1 2 3; do echo loop $i; done; echo MARK1\n",
            "X=$((X+1)); echo \"two $X $(pwd)\"; head -c 300000 /dev/zero | tr '\\0' a | sha256sum; "
            "seq 1 20000; seq 1 2000 | awk '{s+=$1} END {print s}'; echo MARK2\n",
            "echo \"three $X\"; exit 0\n"]


class Session:
    """One ssh client running `bash --norc` on the server, fed command batches on stdin."""

    def __init__(self, ssh: list[str]):
        self.p = subprocess.Popen([*ssh, "bash --norc --noprofile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.out = b""

    def send(self, text: str, until: bytes | None) -> None:
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()
        while until is not None and until + b"\n" not in self.out:
            line = self.p.stdout.readline()
            assert line, f"the session ended: {self.p.stderr.read().decode()} {self.out[-500:]!r}"
            self.out += line

    def finish(self) -> tuple[int, bytes, str]:
        out, err = self.p.communicate(timeout=120)
        return self.p.returncode, self.out + out, err.decode()


def test_ssh_session_survives(tmp_path, sshd, login):
    user, home = login
    port = free_port()
    ssh = setup(tmp_path, port, user, home)
    work = home / "work"
    work.mkdir()
    shutil.chown(work, user, user)
    job = RunJob(tmp_path / "img", [sshd, "-D", "-E", tmp_path / "sshd.log", "-f", tmp_path / "sshd_config"], tmp_path / "run.txt")
    sessions: list[Session] = []
    try:
        job.start()
        wait_for(lambda: subprocess.run([*ssh, "true"], capture_output=True).returncode == 0, "sshd to let us in",
                 alive=(job.mon,))
        ref = Session(ssh)                       # the uninterrupted session
        sessions.append(ref)
        for text, mark in zip(batches(work), (b"MARK1", b"MARK2", None)):
            ref.send(text, mark)
        rc, want, err = ref.finish()
        assert rc == 0, err
        assert b"two 42 " + bytes(work) in want and b"\n2001000\nMARK2\n" in want, want[-300:]

        s = Session(ssh)
        sessions.append(s)
        first, second, last = batches(work)
        s.send(first, b"MARK1")
        job.checkpoint_and_stop()
        assert lock_tables(job.pids[-1]), "no network lock while sshd is away"
        assert s.p.poll() is None, "the ssh client ended while the server was away"
        job.resume()
        s.send(second, b"MARK2")
        s.send(last, None)
        rc, got, err = s.finish()
        assert rc == 0, err
        assert got == want
        assert "Connection reset" not in err and "Broken pipe" not in err, err

        again = subprocess.run([*ssh, "echo after; id -u"], capture_output=True, text=True, timeout=60)
        uid = pwd.getpwnam(user).pw_uid
        assert again.returncode == 0 and again.stdout == f"after\n{uid}\n", again.stdout + again.stderr
        wait_for(lambda: not lock_tables(job.pids[-1]), "the lock to be removed", timeout=10)
    finally:
        for x in sessions:
            if x.p.poll() is None:
                x.p.kill()
                x.p.wait()
        job.stop()


def test_unix_socket_whose_peer_closed(tmp_path):
    """Stream and seqpacket sockets whose peer closed after sending: the unread data, then
    EOF, then EPIPE on write, exactly as in an uninterrupted run."""
    prog = [sys.executable, PROGRAMS / "dead_peer.py", 40]
    want = reference(prog, tmp_path / "ref.txt")
    job = Job.start(prog, tmp_path / "out.txt")
    try:
        job.wait_lines(5)
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
        job.proc.wait(timeout=10)
        with open(tmp_path / "out.txt", "ab") as out:
            r = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                               stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
    finally:
        job.kill()
    assert (tmp_path / "out.txt").read_bytes() == want
