"""Running real programs, checkpointing them with the real CLI, comparing their output."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"


def cli(*args, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `hpcckpt ARGS` as a user would."""
    res = subprocess.run([sys.executable, "-m", "hpcckpt.cli", *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"hpcckpt {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr}")
    return res


@dataclass
class Job:
    """A program started with clean fds: stdin /dev/null (or a pipe), stdout to a file."""
    proc: subprocess.Popen
    out: Path

    @classmethod
    def start(cls, cmd: list, out: Path, stdin=subprocess.DEVNULL, env=None) -> "Job":
        with open(out, "wb") as f:
            p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.DEVNULL,
                                 stdin=stdin, start_new_session=True, env=env)
        return cls(p, out)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_lines(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.lines() < n:
            if self.proc.poll() is not None:
                raise AssertionError(f"program exited ({self.proc.returncode}) before {n} lines")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {n} lines of output after {timeout} s")
            time.sleep(0.02)

    def lines(self) -> int:
        return self.out.read_bytes().count(b"\n")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def reference(cmd: list, out: Path, env=None) -> bytes:
    """The output of an uninterrupted run."""
    with open(out, "wb") as f:
        subprocess.run([str(c) for c in cmd], stdout=f, stdin=subprocess.DEVNULL, check=True,
                       env=env, timeout=300)
    return out.read_bytes()


def restore_fg(images: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`hpcckpt restore` in the foreground, as a batch script would run it."""
    return cli("restore", "--images", images, timeout=timeout, **kw)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
