"""Whole process trees under `hpcckpt run`: checkpointed midway with the final signal
(dump, then the whole tree killed), resumed by running the same command line again,
and compared with an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .helpers import PROGRAMS

RUN = [sys.executable, "-m", "hpcckpt.cli", "run"]


def start_run(images: Path, cmd: list, cwd: Path, out: Path) -> subprocess.Popen:
    with open(out, "ab") as f:
        return subprocess.Popen([*RUN, "--images", str(images), "--", *map(str, cmd)], cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE,
                                start_new_session=True)


def interrupt_and_resume(tmp_path: Path, cmd: list, ready, cwd: Path | None = None,
                         timeout: float = 60) -> str:
    """Run `cmd`, stop it with a final checkpoint once `ready()`, resume it to the end.
    Returns what the first monitor said (on stderr)."""
    cwd = cwd or tmp_path
    images, out = tmp_path / "img", tmp_path / "stdout.txt"
    mon = start_run(images, cmd, cwd, out)
    deadline = time.monotonic() + timeout
    while not ready():
        assert mon.poll() is None, f"job ended before the checkpoint: {mon.stderr.read().decode()}"
        assert time.monotonic() < deadline, "job never got ready"
        time.sleep(0.02)
    mon.send_signal(signal.SIGTERM)
    said = mon.communicate(timeout=60)[1].decode()
    assert "final checkpoint" in said and "job stopped" in said, said
    assert mon.returncode == 0, said
    again = start_run(images, cmd, cwd, out)
    err = again.communicate(timeout=timeout)[1].decode()
    assert again.returncode == 0, err
    assert "resumed from" in err, err
    return said


def test_pipeline_gen_bzip2(tmp_path):
    """`gen | bzip2 -9 > out`: the pipe between them (with what it held) and both ends."""
    gen = f"{sys.executable} {PROGRAMS / 'gen.py'} 60 0.04"
    subprocess.run(["bash", "-c", f"{gen} | bzip2 -9 > {tmp_path / 'ref.bz2'}"], check=True)
    out = tmp_path / "out.bz2"
    interrupt_and_resume(tmp_path, ["bash", "-c", f"{gen} | bzip2 -9 > out.bz2"],
                         lambda: out.exists() and out.stat().st_size > 0)
    assert out.read_bytes() == (tmp_path / "ref.bz2").read_bytes()
    subprocess.run(["bzip2", "-t", str(out)], check=True)


def test_bash_background_jobs_and_wait(tmp_path):
    ref, job = tmp_path / "ref", tmp_path / "job"
    ref.mkdir(), job.mkdir()
    script = PROGRAMS / "bgjobs.sh"
    subprocess.run(["bash", script, "25", "0.04"], cwd=ref, check=True)
    interrupt_and_resume(tmp_path, ["bash", script, "25", "0.04"],
                         lambda: (job / "out3.txt").exists() and (job / "out3.txt").read_bytes().count(b"\n") >= 8,
                         cwd=job)
    for name in ("out1.txt", "out2.txt", "out3.txt", "done.txt"):
        assert (job / name).read_bytes() == (ref / name).read_bytes(), name


def test_multiprocessing_pool(tmp_path):
    cmd = [sys.executable, PROGRAMS / "pool.py", 40, 0.05]
    ref = subprocess.run(list(map(str, cmd)), capture_output=True, check=True).stdout
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    assert out.read_bytes() == ref


def test_sessions_groups_zombie_orphan(tmp_path):
    """A session leader, a group leader in it, a zombie (exit status 7 waited for after
    the restore) and an orphan adopted by the namespace's init: each process checks its
    relations every step, before and after the restore; every line comes exactly once."""
    cmd = [sys.executable, PROGRAMS / "tree_shape.py", 30, 0.05]
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"C1 ") >= 5)
    lines = out.read_text().splitlines()
    expect = ([f"A {k} (True, True, True)" for k in range(30)]
              + [f"A1 {k} (True, True, True)" for k in range(30)]
              + [f"C1 {k} (True, True)" for k in range(30)]
              + [f"P {k} (True,)" for k in range(30)] + ["B exited 7", "done"])
    assert sorted(lines) == sorted(expect)


MAKEFILE = """\
CFLAGS = -O2 -g0
OBJS = {objs}
prog: $(OBJS)
\t$(CC) $(CFLAGS) -o $@ $(OBJS)
%.o: %.c
\t$(CC) $(CFLAGS) -c -o $@ $<
"""


def _project(d: Path, n: int = 6, funcs: int = 400) -> None:
    d.mkdir()
    for i in range(n):
        body = "\n".join(
            f"double f{i}_{k}(double x) {{ double s = 0; for (int j = 0; j < {k % 13 + 3}; j++) "
            f"s += x * j / (j + {k + 1}.0) - s * {k % 7}.5; return s; }}" for k in range(funcs))
        calls = " + ".join(f"f{i}_{k}(x)" for k in range(0, funcs, 37))
        (d / f"m{i}.c").write_text(f"{body}\ndouble mod{i}(double x) {{ return {calls}; }}\n")
    decls = "".join(f"double mod{i}(double);\n" for i in range(n))
    total = " + ".join(f"mod{i}(1.5)" for i in range(n))
    (d / "main.c").write_text(f'#include <stdio.h>\n{decls}int main(void) {{ printf("%f\\n", {total}); return 0; }}\n')
    objs = " ".join(f"m{i}.o" for i in range(n)) + " main.o"
    (d / "Makefile").write_text(MAKEFILE.format(objs=objs))


def test_make_j2(tmp_path):
    ref, job = tmp_path / "ref", tmp_path / "job"
    _project(ref)
    _project(job)
    t = time.monotonic()
    subprocess.run(["make", "-s", "-j2"], cwd=ref, check=True, capture_output=True)
    build_s = time.monotonic() - t
    interrupt_and_resume(tmp_path, ["make", "-s", "-j2"],
                         lambda: len(list(job.glob("*.o"))) >= 2, cwd=job, timeout=60 + 5 * build_s)
    for name in ["prog"] + [f"m{i}.o" for i in range(6)] + ["main.o"]:
        assert (job / name).read_bytes() == (ref / name).read_bytes(), name
    assert subprocess.run([job / "prog"], capture_output=True).stdout == \
        subprocess.run([ref / "prog"], capture_output=True).stdout


def test_unsupported_fd_deep_in_tree_leaves_it_running(tmp_path):
    """A netlink socket in a grandchild stops the dump, naming that process, fd and kind; the
    whole tree was thawed and finishes as if nothing happened."""
    code = ("import os,socket,sys,time\n"
            "if os.fork()==0:\n"
            "  if os.fork()==0:\n"
            "    s=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW); sys.stdout.write(f'{os.getpid()} {s.fileno()}\\n'); sys.stdout.flush()\n"
            "    [time.sleep(0.02) for _ in range(150)]; print('grandchild done', flush=True); os._exit(0)\n"
            "  os.wait(); os._exit(0)\n"
            "os.wait(); print('root done', flush=True)\n")
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        root = subprocess.Popen([sys.executable, "-c", code], stdout=f, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    while out.read_bytes().count(b"\n") < 1:
        time.sleep(0.01)
    gpid, sfd = out.read_text().split()[:2]
    res = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "dump", "--pid", str(root.pid),
                          "--images", str(tmp_path / "img")], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert f"process {gpid}: fd {sfd} (netlink" in res.stderr and "cannot be checkpointed" in res.stderr
    assert root.wait(timeout=30) == 0
    assert out.read_text().splitlines()[1:] == ["grandchild done", "root done"]
    assert not (tmp_path / "img").exists()


def test_shared_description_anon_memfd_and_dev_shm(tmp_path):
    """Parent and child alternate through a shared page, append to one shared file
    position, count in a memfd and a /dev/shm file: after the restore all are still one."""
    ref, job = tmp_path / "ref", tmp_path / "job"
    ref.mkdir(), job.mkdir()
    prog = PROGRAMS / "shared_state.py"
    name = f"hpcckpt-test-{os.getpid()}"
    want = subprocess.run([sys.executable, prog, "40", "0.02", name], cwd=ref, check=True,
                          capture_output=True).stdout
    out = tmp_path / "stdout.txt"
    log = job / "log.txt"
    interrupt_and_resume(tmp_path, [sys.executable, prog, 40, 0.02, name],
                         lambda: log.exists() and log.read_bytes().count(b"\n") >= 15, cwd=job)
    assert out.read_bytes() == want
    assert log.read_bytes() == (ref / "log.txt").read_bytes()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_single_process_dump_of_a_parent(tmp_path):
    """tree=False (the CLI's --single) takes the process alone, its child untouched."""
    from hpcckpt.engine.dump import dump
    from hpcckpt.images.imageset import ImageSet
    p = subprocess.Popen([sys.executable, "-c", "import os,time; os.fork(); time.sleep(3)"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.5)
    try:
        r = dump(p.pid, tmp_path / "one", leave_running=True, show_progress=False, tree=False)
        assert r.processes == 1 and list(ImageSet(tmp_path / "one").inventory().pids) == [p.pid]
        r = dump(p.pid, tmp_path / "all", leave_running=True, show_progress=False)
        assert r.processes == 2 and len(ImageSet(tmp_path / "all").inventory().pids) == 2
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
