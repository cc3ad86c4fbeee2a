"""Terminals: pty pairs held in the tree, controlling terminals, shell jobs, tmux.

Each test drives a real program through a real terminal, checkpoints it midway (the tree
killed), restores it and drives it on; the transcript is compared with an uninterrupted
run's, and `ps` (with the tty column) before and after.
"""
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcckpt.images.imageset import ImageSet

from .helpers import PROGRAMS, cli
from .test_tree_shape import COLUMNS as PS, normalized

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


def ps(pids) -> list[list[str]]:
    out = subprocess.run(["ps", "-o", PS, "-p", ",".join(map(str, pids))], capture_output=True,
                         text=True).stdout
    return [line.split() for line in out.splitlines()[1:]]


def wait_until(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return sorted(out)


# -- a pty pair inside the tree ------------------------------------------------------

def test_pty_queues_and_settings(tmp_path):
    """Bytes queued both ways, termios, window size, packet mode: as without a checkpoint."""
    prog = [sys.executable, str(PROGRAMS / "pty_queues.py")]
    (tmp_path / "go-ref").touch()
    ref = subprocess.run([*prog, str(tmp_path / "go-ref")], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        p = subprocess.Popen([*prog, str(tmp_path / "go")], stdout=f, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    wait_until(lambda: b"ready" in out.read_bytes(), "ready")
    cli("dump", "--pid", p.pid, "--images", tmp_path / "img")
    p.wait()
    shown = cli("show", tmp_path / "img").stdout
    assert ": 43x121, session -, foreground -, queued " in shown and "packet mode" in shown, shown
    (tmp_path / "go").touch()
    res = cli("restore", "--images", tmp_path / "img", timeout=60)
    lines = out.read_text().splitlines()
    ref_lines = ref.stdout.splitlines()
    assert lines[1:-1] == ref_lines[1:-1], res.stderr
    assert "master read b'out\\r\\nput \\x01 bytesfirst line\\r\\npar" in lines[1], lines[1]
    assert lines[2] == "slave read [b'first line\\n', b'partial end\\n']"
    assert lines[-1] == f"name {lines[0].split()[1]}"      # the same /dev/pts/N came back


def test_pty_queues_left_running(tmp_path):
    """--leave-running: the queues read for the image are given back to the running tree."""
    prog = [sys.executable, str(PROGRAMS / "pty_queues.py")]
    (tmp_path / "go-ref").touch()
    ref = subprocess.run([*prog, str(tmp_path / "go-ref")], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        p = subprocess.Popen([*prog, str(tmp_path / "go")], stdout=f, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    wait_until(lambda: b"ready" in out.read_bytes(), "ready")
    cli("dump", "--pid", p.pid, "--leave-running", "--images", tmp_path / "img")
    (tmp_path / "go").touch()
    assert p.wait(timeout=30) == 0
    inv = ImageSet(tmp_path / "img").inventory()
    assert len(inv.ttys) == 1 and inv.ttys[0].output.startswith(b"out\r\nput") and inv.ttys[0].input
    assert out.read_text().splitlines()[1:-1] == ref.stdout.splitlines()[1:-1]


@pytest.fixture
def pty_image(tmp_path):
    """A sealed image of pty_queues.py (killed after the dump): (image dir, its PID)."""
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        p = subprocess.Popen([sys.executable, str(PROGRAMS / "pty_queues.py"), str(tmp_path / "go")],
                             stdout=f, stdin=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: b"ready" in out.read_bytes(), "ready")
    cli("dump", "--pid", p.pid, "--images", tmp_path / "img")
    p.wait()
    return tmp_path / "img", p.pid


def test_pty_index_taken(pty_image, tmp_path):
    """The pty's old index is in use here: another one is taken, and the restore says so;
    the program works on."""
    img, pid = pty_image
    want = ImageSet(img).inventory().ttys[0].index
    held = []
    try:
        for _ in range(64):
            m, s = os.openpty()
            held += [m, s]
            if os.ttyname(s) == f"/dev/pts/{want}":
                break
        else:
            pytest.skip(f"could not take /dev/pts/{want} for the test")
        (tmp_path / "go").touch()
        res = cli("restore", "--images", img)
    finally:
        for fd in held:
            os.close(fd)
    assert f"pty /dev/pts/{want} is taken here: restored as /dev/pts/" in res.stderr, res.stderr
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines[2] == "slave read [b'first line\\n', b'partial end\\n']", lines
    assert lines[-1] != f"name /dev/pts/{want}" and lines[-1].startswith("name /dev/pts/")


@pytest.mark.parametrize("field,value,says", [
    ("uid", 4242, "owner 4242:"),
    ("sid", 99999, "session 99999 has no leader"),
    ("termios", b"\x01\x02", "termios of 2/36 bytes"),
    ("rows", 1 << 20, "window size"),
    ("output", b"x" * (2 << 20), "queued data beyond"),
], ids=["uid", "sid", "termios", "rows", "output"])   # a 2 MiB id would not fit in PYTEST_CURRENT_TEST
def test_crafted_terminal_is_refused(pty_image, field, value, says):
    """An image's terminal fields are untrusted: each bad one is refused, naming it, before
    any process exists."""
    img, pid = pty_image
    iset = ImageSet(img)
    inv = iset.read_message("inventory.img", "inventory")
    setattr(inv.ttys[0], field, value)
    iset.write_message("inventory.img", "inventory", inv)
    res = cli("restore", "--images", img, check=False)
    assert res.returncode != 0 and f"image {img}" in res.stderr and says in res.stderr, res.stderr
    assert not os.path.exists(f"/proc/{pid}")


def start_harness(d: Path, keys: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PROGRAMS / "pty_harness.py"), str(keys), str(log), "--",
                             sys.executable, str(PROGRAMS / "tty_echo.py")], cwd=d,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


def text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def type_and_wait(keys: Path, log: Path, typed: str, expect: str) -> None:
    with open(keys, "a") as f:
        f.write(typed)
    wait_until(lambda: expect in text(log), f"{expect!r} in {text(log)!r}")


def test_program_in_a_pty_held_by_the_tree(tmp_path):
    """A terminal emulator (the harness) and the program in its pty, checkpointed together:
    after the restore the program still reads and writes its terminal, is in its
    foreground with it as controlling terminal, and the transcript is the uninterrupted one."""
    ref_dir, job_dir = tmp_path / "ref", tmp_path / "job"
    transcripts = {}
    for d in (ref_dir, job_dir):
        d.mkdir()
        keys, log = d / "keys", d / "log"
        keys.touch()
        h = start_harness(d, keys, log)
        try:
            wait_until(lambda: "hello" in text(log), "hello")
            type_and_wait(keys, log, "abc\n", "#1 cba")
            if d is job_dir:
                prog = children(h.pid)
                before = ps([h.pid, *prog])
                assert before[1][6].startswith("pts/") and "+" in before[1][5], before
                cli("dump", "--pid", h.pid, "--images", d / "img")
                h.wait()
                wait_until(lambda: not os.path.exists(f"/proc/{prog[0]}"), "program gone")
                r = subprocess.Popen([*HPCCKPT, "restore", "--images", str(d / "img")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                wait_until(lambda: children(r.pid) == [h.pid] and children(h.pid) == prog, "restored tree")
                time.sleep(0.2)
                after = ps([h.pid, *prog])
                before[0][1] = after[0][1] = "-"    # the harness's parent: the test, then restore
                # Another process on this machine may have taken the pty's number meanwhile
                # (the restore then says so): the tty is compared after the restore ended.
                ttys = before[1][6], after[1][6]
                before[1][6] = after[1][6] = "pts"
                assert normalized(after) == normalized(before), (before, after)
            type_and_wait(keys, log, "defg\n", "#2 gfed")
            type_and_wait(keys, log, "quit\n", "[exit 0]")
            if d is job_dir:
                assert r.wait(timeout=30) == 0, r.stderr.read()
                assert ttys[0] == ttys[1] or f"{ttys[0]} is taken here: restored as /dev/{ttys[1]}" \
                    in r.stderr.read().decode(), ttys
        finally:
            if h.poll() is None and d is ref_dir:
                h.kill()
        transcripts[d] = log.read_text()
    assert transcripts[job_dir] == transcripts[ref_dir]
    last = [x for x in transcripts[job_dir].splitlines() if x.startswith("#3 tiuq")]
    assert last and last[0].endswith("size=31x97 fg=True canon=True ctty=True"), transcripts[job_dir]
    assert "via /dev/tty 3" in transcripts[job_dir]


# -- a shell job -----------------------------------------------------------------------

class Terminal:
    """bash on a pty whose master this test holds: the user's terminal, outside any tree."""

    def __init__(self, cwd: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env.update(PS1="$ ", TERM="xterm", HISTFILE="/dev/null")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(cwd)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))   # a user's shell: no strays of ours
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.buf = b""

    def read(self) -> str:
        while select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.buf += chunk
        return self.buf.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, what: str, after: int = 0, timeout: float = 60) -> int:
        wait_until(lambda: what in self.read()[after:], repr(what) + f" in terminal:\n{self.read()[-2000:]}",
                   timeout)
        return self.read().index(what, after) + len(what)

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_shell_job(tmp_path):
    """A program run from an interactive shell in a terminal held outside the tree: refused
    without --shell-job (and left running), dumped with it, killed, and restored by a
    command typed into the same shell: it gets that terminal and its foreground, and
    goes on answering what is typed."""
    term = Terminal(tmp_path)
    try:
        pos = term.expect("$ ")
        term.type(f"{sys.executable} {PROGRAMS / 'tty_echo.py'}\n")
        pos = term.expect("hello from a pty: True", pos)
        term.type("abc\n")
        pos = term.expect("#1 cba size=", pos)
        prog = [c for c in children(term.pid)]
        assert len(prog) == 1
        res = cli("dump", "--pid", term.pid, "--shell-job", "--images", tmp_path / "no", check=False)
        assert res.returncode != 0 and f"process {term.pid} leads a session whose controlling terminal" \
            in res.stderr, res.stderr                 # the shell itself: its terminal's master is ours
        res = cli("dump", "--pid", prog[0], "--images", tmp_path / "no", check=False)
        assert res.returncode != 0 and "shell job" in res.stderr and "--shell-job" in res.stderr, res.stderr
        assert f"process {prog[0]}: fd 0 is the terminal /dev/pts/" in res.stderr, res.stderr
        term.type("def\n")
        pos = term.expect("#2 fed size=", pos)
        cli("dump", "--pid", prog[0], "--shell-job", "--images", tmp_path / "img")
        pos = term.expect("$ ", pos)                # the shell saw its job killed
        res = cli("restore", "--images", tmp_path / "img", check=False)
        assert res.returncode != 0 and "--shell-job" in res.stderr, res.stderr
        term.type(f"cd {tmp_path} && {' '.join(HPCCKPT)} -q restore --shell-job --images img; echo rc=$?\n")
        wait_until(lambda: os.path.exists(f"/proc/{prog[0]}"), "restored program")
        term.type("ghi\n")
        pos = term.expect("#3 ihg size=", pos)
        line = term.read()[pos:].splitlines()[0]
        assert line.endswith("fg=True canon=True ctty=True"), line
        pos = term.expect("via /dev/tty 3", pos)     # its /dev/tty fd: this terminal too
        term.type("quit\n")
        pos = term.expect("#4 tiuq", pos)
        pos = term.expect("rc=0", pos)
        term.type("echo back $((6*7))\n")
        term.expect("back 42", pos)                 # the shell has its terminal back
    finally:
        term.close()


# -- tmux with bash and top --------------------------------------------------------------

@pytest.fixture(scope="module")
def tmux() -> str:
    if not shutil.which("tmux"):
        subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("tmux")


def test_tmux_with_bash_and_top(tmp_path, tmux):
    """The tmux server runs as the job of `hpcckpt run` (-D: it does not daemonize, so the
    job's PID namespace holds it with every pane); bash and top run in its panes. After a
    final checkpoint and the resume, tmux answers its socket, bash finishes the command line
    typed half before the checkpoint and runs new ones, top refreshes and takes keys, and
    `ps` of the namespace (with the tty column and + for each terminal's foreground) is
    the same as before."""
    from .test_tree_shape import ns_init, ns_ps
    sock = f"ttys-{os.getpid()}"
    images, out, err = tmp_path / "img", tmp_path / "out.txt", tmp_path / "err.txt"

    def run_server() -> subprocess.Popen:
        with open(out, "ab") as o, open(err, "ab") as e:
            return subprocess.Popen([*HPCCKPT, "run", "--images", str(images), "--", tmux, "-L", sock,
                                     "-f", "/dev/null", "-D"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                                    stdout=o, stderr=e, start_new_session=True)

    def tm(*args, check=True) -> str:
        res = subprocess.run([tmux, "-L", sock, *args], capture_output=True, text=True, timeout=30)
        assert not check or res.returncode == 0, f"tmux {args}: {res.stderr}\n{err.read_text()}"
        return res.stdout

    def pane(n: int) -> list[str]:
        return [line.rstrip() for line in tm("capture-pane", "-p", "-t", f"main:{n}").splitlines() if line.strip()]

    mon = run_server()
    try:
        wait_until(lambda: os.path.exists(f"/tmp/tmux-{os.getuid()}/{sock}"), "tmux server's socket")
        tm("new-session", "-d", "-x", "90", "-y", "30", "-s", "main", "env PS1='$ ' bash --norc --noprofile")
        tm("new-window", "-d", "-t", "main:1", "top -d 1")
        wait_until(lambda: pane(0) == ["$"], "bash prompt")
        wait_until(lambda: any(x.startswith("top - ") for x in pane(1)), "top")
        tm("send-keys", "-t", "main:0", "echo before $((6*7))", "Enter")
        wait_until(lambda: pane(0)[-2:] == ["before 42", "$"], "before 42")
        tm("send-keys", "-t", "main:0", "echo par")          # half a command line, in bash
        wait_until(lambda: pane(0)[-1] == "$ echo par", "typed half")
        before = normalized(ns_ps(ns_init(mon.pid)))
        mon.send_signal(signal.SIGTERM)
        assert mon.wait(timeout=60) == 0, err.read_text()
        assert "final checkpoint" in err.read_text() and "job stopped" in err.read_text()
        assert subprocess.run([tmux, "-L", sock, "ls"], capture_output=True).returncode != 0
        mon = run_server()
        wait_until(lambda: "resumed from" in err.read_text(), f"resume: {err.read_text()}")
        after = normalized(ns_ps(ns_init(mon.pid)))
        assert after == before, f"before:\n{before}\nafter:\n{after}"
        ttys = [r for r in after if r[6] != "?"]
        assert len(ttys) == 2 and all("+" in r[5][1] and "s" in r[5][1] for r in ttys), after
        tm("send-keys", "-t", "main:0", "tial $((2+3))", "Enter")
        wait_until(lambda: pane(0)[-2:] == ["partial 5", "$"], f"partial 5 in {pane(0)}")
        tm("send-keys", "-t", "main:0", "echo after $((6*8)); tty", "Enter")
        wait_until(lambda: len(pane(0)) >= 8 and pane(0)[-1] == "$", f"after 48 in {pane(0)}")
        assert pane(0)[:-2] == ["$ echo before $((6*7))", "before 42", "$ echo partial $((2+3))", "partial 5",
                                "$ echo after $((6*8)); tty", "after 48"], pane(0)
        assert pane(0)[-2].startswith("/dev/pts/")
        first = next(x for x in pane(1) if x.startswith("top - "))
        wait_until(lambda: next(x for x in pane(1) if x.startswith("top - ")) != first, "top refreshing")
        tm("send-keys", "-t", "main:1", "q")
        wait_until(lambda: tm("list-windows", "-t", "main").count("\n") == 1, "top quit on its key")
        tm("kill-server")
        assert mon.wait(timeout=30) == 0, err.read_text()
    finally:
        subprocess.run([tmux, "-L", sock, "kill-server"], capture_output=True)
        if mon.poll() is None:
            os.killpg(mon.pid, signal.SIGKILL)
            mon.wait()
