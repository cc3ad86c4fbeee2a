"""The shape of a tree, as `ps` shows it, is the same before the dump and after the restore.

A job under `hpcckpt run` (its own PID namespace) builds several sessions and process
groups, zombies (an exit status and a signal), orphans adopted by the namespace's init,
a daemon in a session whose leader exited, children forked by threads, and a session on
a pty held in the tree with a foreground group (tests/programs/ps_tree.py). `ps` is run inside the job's
PID namespace (nsenter + a private /proc), so the PIDs it prints are the job's own, the
ones a restore gives back; the table before the final checkpoint and after the resume
must be equal, then the job finishes with the output of an uninterrupted run.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcckpt.kernel import proc

from .helpers import PROGRAMS

RUN = [sys.executable, "-m", "hpcckpt.cli", "run"]
COLUMNS = "pid,ppid,pgid,sid,tpgid,stat,tty,comm"
READY = 16     # "ready NAME" lines of ps_tree.py


def ns_init(monitor: int) -> int:
    """The host PID of the init of the monitor's job namespace (its child that is PID 1 there)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(proc.stat_fields(int(name))[1]) == monitor and proc.ns_pids(int(name))[-1] == 1:
                    return int(name)
            except Exception:
                continue
    raise AssertionError(f"monitor {monitor} has no PID namespace init")


def ns_ps(init: int, exclude_ps: bool = True) -> list[list[str]]:
    """`ps` of every process of init's PID namespace, as that namespace numbers them."""
    out = subprocess.run(["nsenter", "-t", str(init), "-p", "--", "unshare", "-m", "--mount-proc",
                          "ps", "-e", "-o", COLUMNS], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, len(COLUMNS.split(",")) - 1) for line in out.splitlines()[1:]]
    return [r for r in rows if not (exclude_ps and r[-1] == "ps")]


def normalized(rows: list[list[str]]) -> list[tuple]:
    """The STAT column's first letter is the scheduler's state at that instant (R, S, D
    come and go as a process runs), not something a checkpoint keeps: it is reduced to
    alive/zombie/stopped. Every flag after it (s session leader, l multithreaded, + in the
    terminal's foreground group, < N priority) must come back exactly."""
    state = {"R": "alive", "S": "alive", "D": "alive", "I": "alive", "Z": "zombie", "T": "stopped", "t": "stopped"}
    cols = COLUMNS.split(",")
    out = []
    for r in rows:
        d = dict(zip(cols, r))
        d["stat"] = (state[d["stat"][0]], "".join(sorted(d["stat"][1:])))
        out.append(tuple(d[c] for c in cols))
    return out


def start(images: Path, go: Path, cwd: Path, out: Path, err: Path) -> subprocess.Popen:
    with open(out, "ab") as o, open(err, "ab") as e:
        return subprocess.Popen([*RUN, "--images", str(images), "--", sys.executable,
                                 str(PROGRAMS / "ps_tree.py"), str(go)], cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=o, stderr=e, start_new_session=True)


def wait_for(cond, what: str, mon: subprocess.Popen, err: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert mon.poll() is None, f"monitor exited before {what}: {err.read_text()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s: {err.read_text()}"
        time.sleep(0.05)


def test_ps_same_before_and_after(tmp_path):
    ref_out, go_ref = tmp_path / "ref.txt", tmp_path / "go-ref"
    with open(ref_out, "wb") as f:
        ref = subprocess.Popen([sys.executable, str(PROGRAMS / "ps_tree.py"), str(go_ref)], stdout=f,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while ref_out.read_bytes().count(b"ready") < READY:
        assert time.monotonic() < deadline and ref.poll() is None, ref_out.read_text()
        time.sleep(0.05)
    go_ref.touch()
    assert ref.wait(timeout=60) == 0

    images, go, out, err = tmp_path / "img", tmp_path / "go", tmp_path / "out.txt", tmp_path / "err.txt"
    mon = start(images, go, tmp_path, out, err)
    try:
        wait_for(lambda: out.read_bytes().count(b"ready") >= READY, "ready tree", mon, err)
        before = ns_ps(ns_init(mon.pid))
        mon.send_signal(signal.SIGTERM)
        assert mon.wait(timeout=60) == 0, err.read_text()
        assert "final checkpoint" in err.read_text()
    finally:
        if mon.poll() is None:
            mon.kill()
    mon = start(images, go, tmp_path, out, err)
    try:
        wait_for(lambda: "resumed from" in err.read_text(), "resume", mon, err)
        after = ns_ps(ns_init(mon.pid))
        go.touch()
        assert mon.wait(timeout=60) == 0, err.read_text()
    finally:
        if mon.poll() is None:
            os.killpg(mon.pid, signal.SIGKILL)
            mon.wait()

    # the tree really has every shape the test is about
    n = normalized(before)
    by_pid = {r[0]: r for r in n}
    assert sum(r[5][0] == "zombie" for r in n) == 2, before
    assert sum(r[1] == "1" for r in n) == 3, before                 # orphans adopted by init
    assert sum(r[3] not in by_pid and r[3] != "0" for r in n) == 2, before   # a session without leader
    assert len({r[3] for r in n}) >= 3 and len({r[2] for r in n}) >= 5, before   # sessions, groups
    assert sum("l" in r[5][1] for r in n) >= 2, before              # multithreaded (thread parents)
    assert sum("s" in r[5][1] for r in n) >= 2 and by_pid["1"][6] == "?", before
    on_pty = [r for r in n if r[6] != "?"]                          # a session on a pty, PT1 in front
    assert len(on_pty) == 2 and sum("+" in r[5][1] for r in on_pty) == 1, before
    assert normalized(after) == n, f"before:\n{before}\nafter:\n{after}"
    lines = out.read_text().splitlines()
    ref_lines = ref_out.read_text().splitlines()
    assert sorted(lines) == sorted(ref_lines), (lines, ref_lines)
    assert "root (True, True) Z 5" in lines and any(x.endswith("AZ -15") for x in lines)
