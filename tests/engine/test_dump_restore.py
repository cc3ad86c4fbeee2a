"""The core promise: dumped midway, killed, restored, the output is byte-identical."""
import os
import subprocess
import sys
import time


from .helpers import PROGRAMS, Job, cli, pid_alive, reference, restore_fg


def checkpoint_and_resume(tmp_path, cmd, lines_before, env=None):
    ref = reference(cmd, tmp_path / "ref.txt", env=env)
    job = Job.start(cmd, tmp_path / "out.txt", env=env)
    job.wait_lines(lines_before)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)            # killed by the dump, reaped by its parent
    assert job.proc.returncode == -9
    partial = job.out.read_bytes()
    assert 0 < len(partial) < len(ref)
    res = restore_fg(tmp_path / "img")
    assert res.returncode == 0
    return ref, job.out.read_bytes()


def test_threads_c_program(tmp_path, threads_fp):
    ref, out = checkpoint_and_resume(tmp_path, [threads_fp, 100, 4, 20], 10)
    assert out == ref


def test_cpython_program(tmp_path):
    ref, out = checkpoint_and_resume(tmp_path, [sys.executable, PROGRAMS / "compute.py", 30, 0.06], 10)
    assert out == ref


def test_numpy_openblas_two_threads(tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    ref, out = checkpoint_and_resume(tmp_path, [sys.executable, PROGRAMS / "blas.py", 100, 0.02], 10, env=env)
    assert out == ref


def test_pipe_deleted_file_offsets_and_handlers(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 4)
    ref, out = checkpoint_and_resume(tmp_path, [sys.executable, PROGRAMS / "pipes.py", 40, 0.08, data], 5)
    assert out == ref
    assert b"650 100 [12]" in out  # pipe bytes, deleted file content, handler ran


def test_leave_running_then_restore_twice(tmp_path, threads_fp):
    cmd = [threads_fp, 100, 2, 20]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(8)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--leave-running")
    assert job.proc.wait(timeout=60) == 0          # the original finishes, unharmed
    assert job.out.read_bytes() == ref
    for _ in range(2):                             # and the image restores, twice
        assert restore_fg(tmp_path / "img").returncode == 0
        assert job.out.read_bytes() == ref


def test_blocked_in_sleep(tmp_path, threads_fp):
    # 1.5 s sleeps between steps: the dump finds the main thread in nanosleep
    ref, out = checkpoint_and_resume(tmp_path, [threads_fp, 4, 2, 1500], 2)
    assert out == ref


def test_blocked_in_read_on_stdin_pipe(tmp_path):
    cmd = [sys.executable, PROGRAMS / "echo_stdin.py"]
    job = Job.start(cmd, tmp_path / "out.txt", stdin=subprocess.PIPE)
    job.proc.stdin.write(b"alpha\nbeta\n")
    job.proc.stdin.flush()
    job.wait_lines(2)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    # the restored process reads from the restore command's stdin
    res = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                         input=b"gamma\ndelta\n", capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert job.out.read_bytes() == b"1 ALPHA\n2 BETA\n3 GAMMA\n4 DELTA\ndone 4\n"


def test_restore_exit_status_and_signals(tmp_path, threads_fp):
    job = Job.start([threads_fp, 1000, 1, 50], tmp_path / "out.txt")
    job.wait_lines(2)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    r = subprocess.Popen([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                         stderr=subprocess.PIPE)
    n = job.lines()
    deadline = time.monotonic() + 30
    while job.lines() < n + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    r.send_signal(15)                     # forwarded to the restored program
    assert r.wait(timeout=30) == -15      # and we exit as it did: killed by SIGTERM
    assert not pid_alive(job.pid)


def test_detach(tmp_path, threads_fp):
    cmd = [threads_fp, 40, 2, 80]   # ~2.8 s left after line 5: a loaded machine still dumps in time
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(5)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    res = cli("restore", "--images", tmp_path / "img", "--detach")
    pid = int(res.stdout.strip())
    assert pid == job.pid
    deadline = time.monotonic() + 60
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.out.read_bytes() == ref
