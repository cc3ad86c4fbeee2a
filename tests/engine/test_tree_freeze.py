"""Freezing whole trees under stress: a fork bomb bounded by a pids cgroup, a process
that dies mid-dump, and the cgroup v2 freezer path dumping a tree that keeps forking.

Every dump either succeeds with a consistent image (restored and checked) or fails with
a clear error; in every case the tree is left running and unfrozen: no task in a stopped
or traced state, none still ptraced (TracerPid 0).
"""
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpcckpt.engine.cgroup_freezer import v2_mount
from hpcckpt.images.imageset import ImageSet

from .helpers import cli

PIDS_V1 = Path("/sys/fs/cgroup/pids")
PREFIX = f"treeperf-{os.getpid()}"
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

# The root forks forever; every other process forks up to 8 times (failed forks count,
# pids.max makes most fail) and exits. The root is a subreaper that ignores SIGCHLD, so
# orphans come back to it and exits are reaped at once (PID 1 here reaps ~1.4 s late):
# the tree keeps changing, fast, while it is being frozen.
BOMB_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(void) {
    signal(SIGCHLD, SIG_IGN);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    printf("%d\n", getpid());
    fflush(stdout);
    int root = 1;
    unsigned n = 0;
    for (;;) {
        pid_t p = fork();
        if (p == 0) { root = 0; n = 0; continue; }
        if (p < 0) usleep(2000);     /* ~4000 forks/s: PIDs (pid_max 32768) wrap in ~8 s */
        if (!root && ++n > 8) _exit(0);
    }
}
"""

# A parent forks one short-lived child per step; the child's exit status carries its
# part of the result; the parent prints a running sum. Forks all the time, deterministic.
FORKER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int steps = atoi(argv[1]);
    unsigned long sum = 0;
    struct timespec ts = {0, 2000000};
    for (int i = 1; i <= steps; i++) {
        pid_t p = fork();
        if (p == 0) _exit((i * 7919) % 251);
        int st;
        if (waitpid(p, &st, 0) != p || !WIFEXITED(st)) return 2;
        sum = sum * 31 + WEXITSTATUS(st);
        if (i % 50 == 0) { printf("%d %lu\n", i, sum); fflush(stdout); }
        nanosleep(&ts, NULL);
    }
    printf("done %lu\n", sum);
    return 0;
}
"""

# 16 processes, each with 8 MiB written, waiting: a tree whose dump takes a while.
WAITERS_C = r"""
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(void) {
    pid_t kids[15];
    for (int i = 0; i < 15; i++) {
        kids[i] = fork();
        if (kids[i] == 0) break;
    }
    size_t n = 8 << 20;
    volatile uint64_t *m = malloc(n);
    for (size_t i = 0; i < n / 8; i++) m[i] = i * 0x9E3779B97F4A7C15ull + getpid();
    if (getpid() == getpgrp()) {      /* the root (a session leader): report when all are up */
        usleep(100000);
        printf("ready\n");
        fflush(stdout);
    }
    for (;;) pause();
}
"""


def build(tmp: Path, name: str, src: str) -> Path:
    c, exe = tmp / f"{name}.c", tmp / name
    c.write_text(src)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(c)], check=True)
    return exe


def tasks_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def task_status(pid: int, tid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def assert_running_unfrozen(pids) -> None:
    """No task of these processes stopped, traced or held by a tracer (zombies are fine)."""
    for pid in pids:
        for tid in tasks_of(pid):
            st = task_status(pid, tid)
            if not st:
                continue
            state = st["State"].split()[0]
            assert state not in "tT", f"task {tid} of {pid} left in state {st['State']}"
            assert st.get("TracerPid") == "0", f"task {tid} of {pid} still traced by {st.get('TracerPid')}"


def procs_in(cg: Path) -> set[int]:
    out: set[int] = set()
    for d, _, _ in os.walk(cg):
        try:
            out |= {int(x) for x in (Path(d) / "cgroup.procs").read_text().split()}
        except FileNotFoundError:
            pass
    return out


def descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                text = Path(f"/proc/{name}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            kids.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def kill_cgroup(cg: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (pids := procs_in(cg)) and time.monotonic() < deadline:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    assert not procs_in(cg), f"processes left in {cg}"


@contextmanager
def cgroup(base: Path, name: str, **limits):
    path = base / f"{PREFIX}-{name}"
    path.mkdir()
    try:
        for k, v in limits.items():
            (path / k.replace("_", ".")).write_text(str(v))
        yield path
    finally:
        if (path / "cgroup.freeze").exists():
            (path / "cgroup.freeze").write_text("0")
        kill_cgroup(path)
        for _ in range(200):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def joiner(*cgs: Path):
    def join() -> None:
        for cg in cgs:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
    return join


def taken(pids) -> set[int]:
    """Those of `pids` still in use: as a process or thread, or as the process group or
    session of any process (zombies included: a PID lives on while a zombie names it)."""
    want, out = set(pids), set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        f = text[text.rindex(")") + 2:].split()
        out |= want & {int(name), int(f[2]), int(f[3])}
    return out | {p for p in want if os.path.exists(f"/proc/{p}")}


def wait_free(pids, timeout: float = 15) -> None:
    """PID 1 here reaps orphans ~1.4 s late: the image's PIDs must be free to restore."""
    deadline = time.monotonic() + timeout
    while busy := taken(pids):
        assert time.monotonic() < deadline, f"PIDs {sorted(busy)} stay taken"
        time.sleep(0.05)


def image_pids(img: Path) -> list[int]:
    return list(ImageSet(img).inventory().pids)


def needs_v1_pids():
    if not (PIDS_V1 / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids controller at /sys/fs/cgroup/pids")


def needs_v2():
    if v2_mount() is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    return v2_mount()


@pytest.mark.parametrize("through_cgroup", [False, True], ids=["ptrace", "cgroup"])
def test_fork_bomb_dump_is_consistent_or_refused_and_bomb_runs_on(tmp_path, through_cgroup):
    """A fork bomb (bounded by pids.max=64) that forks and orphans faster than ptrace can
    stop it: the dump either succeeds (the image restores to a bomb that runs on) or says
    why not; either way every process is left running, none stopped or traced."""
    needs_v1_pids()
    bomb = build(tmp_path, "bomb", BOMB_C)
    v2 = needs_v2() if through_cgroup else None
    with cgroup(PIDS_V1, "bomb", pids_max=64) as pcg, \
            (cgroup(v2, "bomb") if v2 else _nothing()) as fcg:
        out = tmp_path / "out"
        with open(out, "wb") as f:
            root = subprocess.Popen([str(bomb)], stdout=f, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=joiner(*[c for c in (pcg, fcg) if c]))
        time.sleep(0.5)          # let it fill its pids.max
        assert len(procs_in(pcg)) > 32
        img = tmp_path / "img"
        args = ["dump", "--pid", root.pid, "--images", img, "--leave-running"]
        if fcg:
            args += ["--freeze-cgroup", fcg]
        res = cli(*args, check=False)
        print(f"dump: exit {res.returncode}: {res.stderr.strip()}")
        assert "Traceback" not in res.stderr, res.stderr
        assert_running_unfrozen(procs_in(pcg))
        assert root.poll() is None
        before = procs_in(pcg)
        time.sleep(0.1)
        assert procs_in(pcg) - before, "the bomb stopped forking"
        assert_running_unfrozen(procs_in(pcg))
        if fcg:
            assert res.returncode == 0, res.stderr
            assert "frozen through cgroup" in res.stderr
        if res.returncode != 0:
            assert res.stderr.startswith("hpcckpt") and str(root.pid) in res.stderr, res.stderr
            assert not img.exists()
            return
        pids = image_pids(img)
        assert pids[0] == root.pid and len(pids) >= 2
        kill_cgroup(pcg)
        root.wait()
        wait_free(pids)
        (pcg / "pids.max").write_text("128")     # the restore's own tasks count too
        rst = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", str(img), "--detach"],
                             capture_output=True, text=True, env=ENV, preexec_fn=joiner(pcg), timeout=120)
        assert rst.returncode == 0, rst.stderr
        assert os.path.exists(f"/proc/{root.pid}") and root.pid in procs_in(pcg)
        assert_running_unfrozen([root.pid])
        before = procs_in(pcg)
        time.sleep(0.3)
        assert procs_in(pcg) - before, "the restored bomb does not fork"
        assert_running_unfrozen(procs_in(pcg))


@contextmanager
def _nothing():
    yield None


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15])
def test_process_killed_mid_dump(tmp_path, delay):
    """A member of a 16-process tree is killed while the tree is frozen for its dump:
    the dump fails naming the process, or its image is that of the frozen instant and
    restores; the rest of the tree is left running, untraced."""
    exe = build(tmp_path, "waiters", WAITERS_C)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        root = subprocess.Popen([str(exe)], stdout=f, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while b"ready" not in out.read_bytes():
            time.sleep(0.01)
        tree = descendants(root.pid)
        assert len(tree) == 16
        victim = max(tree)
        killed = threading.Event()

        def kill_when_frozen() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if task_status(victim, victim).get("TracerPid", "0") != "0":
                    time.sleep(delay)
                    os.kill(victim, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.0005)
        t = threading.Thread(target=kill_when_frozen)
        t.start()
        img = tmp_path / "img"
        res = cli("dump", "--pid", root.pid, "--images", img, "--leave-running", check=False)
        t.join()
        print(f"dump: exit {res.returncode}: {res.stderr.strip()}")
        assert killed.is_set(), "the victim was never seen traced"
        assert "Traceback" not in res.stderr, res.stderr
        rest = [p for p in tree if p != victim]
        assert_running_unfrozen(rest)
        assert all(os.path.exists(f"/proc/{p}") for p in rest)
        if res.returncode != 0:
            assert res.stderr.startswith("hpcckpt") and f"{victim}" in res.stderr, res.stderr
            assert not img.exists()
            return
        pids = image_pids(img)
        assert pids[0] == root.pid and victim in pids and len(pids) == 16
        for p in tree:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        root.wait()
        wait_free(pids)
        rst = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", str(img), "--detach"],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert rst.returncode == 0, rst.stderr
        back = descendants(root.pid)
        try:
            assert sorted(back) == sorted(pids)
            assert_running_unfrozen(back)
        finally:
            for p in back:
                os.kill(p, signal.SIGKILL)
    finally:
        for p in descendants(root.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        root.wait()


@pytest.mark.parametrize("flag", [True, False], ids=["named", "auto"])
def test_cgroup_freezer_dumps_a_forking_tree(tmp_path, flag):
    """A job that forks a child per step, alone in a cgroup v2: dumped through the cgroup
    freezer (named with --freeze-cgroup, or found because the cgroup holds exactly the
    tree) midway, killed, restored: it finishes with the uninterrupted run's output."""
    v2 = needs_v2()
    exe = build(tmp_path, "forker", FORKER_C)
    ref = subprocess.run([str(exe), "1500"], capture_output=True, check=True, timeout=60).stdout
    with cgroup(v2, "forker") as cg:
        out = tmp_path / "out"
        with open(out, "wb") as f:
            root = subprocess.Popen([str(exe), "1500"], stdout=f, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=joiner(cg))
        while out.read_bytes().count(b"\n") < 2:
            assert root.poll() is None
            time.sleep(0.01)
        img = tmp_path / "img"
        args = ["dump", "--pid", root.pid, "--images", img] + (["--freeze-cgroup", cg] if flag else [])
        res = cli(*args)
        assert f"frozen through cgroup {cg}" in res.stderr, res.stderr
        assert root.wait(timeout=30) == -signal.SIGKILL
        assert (cg / "cgroup.freeze").read_text().strip() == "0"
        wait_free(image_pids(img))
        rst = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", str(img)],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert rst.returncode == 0, rst.stderr
        assert out.read_bytes() == ref


def test_run_puts_the_job_in_a_cgroup_of_its_own(tmp_path):
    """`hpcckpt run` gives the job a cgroup v2 of its own (under the runner's), so its
    checkpoints freeze it through cgroup.freeze; the resumed job goes back into one; the
    forking job finishes with the uninterrupted run's output; the cgroups are removed."""
    v2 = needs_v2()
    exe = build(tmp_path, "forker", FORKER_C)
    ref = subprocess.run([str(exe), "300"], capture_output=True, check=True, timeout=60).stdout
    out, images = tmp_path / "out", tmp_path / "img"
    run = [sys.executable, "-m", "hpcckpt.cli", "run", "--images", str(images), "--", str(exe), "300"]

    def job_cgroup(mon: subprocess.Popen) -> str:
        kids = [p for p in descendants(mon.pid) if p != mon.pid]
        for p in kids:
            cg = next(line[3:].strip() for line in Path(f"/proc/{p}/cgroup").read_text().splitlines()
                      if line.startswith("0::"))
            if cg.endswith(f"hpcckpt-job-{mon.pid}"):
                return cg
        raise AssertionError(f"no process of the job is in a cgroup hpcckpt-job-{mon.pid}")

    dead = subprocess.Popen(["true"])
    dead.wait()                       # a runner killed with SIGKILL left its cgroup behind:
    stale = v2 / f"hpcckpt-job-{dead.pid}"
    stale.mkdir()                     # the next run sweeps it
    with open(out, "ab") as f:
        mon = subprocess.Popen(run, stdout=f, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=ENV)
    while out.read_bytes().count(b"\n") < 2:
        assert mon.poll() is None, mon.stderr.read().decode()
        time.sleep(0.01)
    first = job_cgroup(mon)
    assert not stale.exists(), "a dead runner's empty cgroup was not swept"
    mon.send_signal(signal.SIGTERM)
    said = mon.communicate(timeout=60)[1].decode()
    assert mon.returncode == 0 and "final checkpoint" in said, said
    assert not (v2 / first.lstrip("/")).exists(), "the job's cgroup was left behind"
    with open(out, "ab") as f:
        again = subprocess.Popen(run, stdout=f, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=ENV)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                second = job_cgroup(again)
                break
            except (AssertionError, FileNotFoundError, ProcessLookupError, StopIteration):
                assert again.poll() is None and time.monotonic() < deadline, again.stderr.read().decode()
                time.sleep(0.02)
        err = again.communicate(timeout=120)[1].decode()
    finally:
        if again.poll() is None:
            again.kill()
    assert again.returncode == 0 and "resumed from" in err, err
    assert not (v2 / second.lstrip("/")).exists()
    assert out.read_bytes() == ref
