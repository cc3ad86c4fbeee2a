"""Real servers under `hpcckpt run --tcp-established`: installing them, private ports, and
the job's checkpoint (final signal: dump, job stopped) and resume (the same command again)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpcckpt.kernel import netlock

HPCCKPT = [sys.executable, "-m", "hpcckpt.cli"]


def apt_install(packages: list[str], binaries: list[str]) -> None:
    """Debian packages a test needs, installed when one of `binaries` is missing; the test
    is skipped, with apt's reason, only if apt-get cannot install them."""
    if all(shutil.which(b) or os.path.exists(b) for b in binaries):
        return
    if not shutil.which("nft"):
        packages = [*packages, "nftables"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:       # an old package list: update once and try again
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        pytest.skip(f"apt-get could not install {' '.join(packages)}: {res.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what: str, timeout: float = 30, alive: tuple = ()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in alive:
            assert p.poll() is None, f"{what}: process {p.pid} ended ({p.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lock_tables(job_pid: int) -> list[str]:
    """Network-lock tables left for the job (their names end with its root PID)."""
    return [t for t in netlock.tables() if t.endswith(f"_{job_pid}")]


@dataclass
class RunJob:
    """A server under `hpcckpt run --tcp-established --images DIR -- CMD`."""
    images: Path
    cmd: list
    log: Path
    extra: list = field(default_factory=list)
    mon: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)     # the job's PID in each incarnation

    def start(self) -> "RunJob":
        # a log per incarnation: the job inherits the monitor's stderr, and a restore rolls
        # files the job wrote back to their size at the checkpoint (the monitor's lines too)
        with open(self._log(len(self.pids)), "ab") as err:
            self.mon = subprocess.Popen([*HPCCKPT, "run", "--tcp-established", *self.extra,
                                         "--images", str(self.images), "--", *map(str, self.cmd)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True)
        n = len(self.pids)
        wait_for(lambda: self.said().count(" as PID ") > n, "the job to start", alive=(self.mon,))
        line = [x for x in self.said().splitlines() if " as PID " in x][-1]
        self.pids.append(int(line.split(" as PID ")[1].split()[0]))
        return self

    def _log(self, i: int) -> Path:
        return self.log.with_name(f"{self.log.stem}-{i}{self.log.suffix}")

    def said(self) -> str:
        return "".join(self._log(i).read_text(errors="replace") for i in range(len(self.pids) + 1)
                       if self._log(i).exists())

    def checkpoint_and_stop(self) -> None:
        """The final signal: a checkpoint with the connections locked, then the job is killed."""
        self.mon.send_signal(signal.SIGTERM)
        rc = self.mon.wait(timeout=60)
        assert rc == 0 and "final checkpoint" in self.said() and "job stopped" in self.said(), self.said()[-3000:]

    def resume(self) -> None:
        n = self.said().count("resumed from")
        self.start()
        assert self.said().count("resumed from") == n + 1, self.said()[-3000:]

    def stop(self) -> None:
        """End the job without a checkpoint: the monitor's group killed, its PID namespace
        goes with its init."""
        if self.mon is not None and self.mon.poll() is None:
            os.killpg(self.mon.pid, signal.SIGKILL)
            self.mon.wait()
        if self.pids:
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{self.pids[-1]}") and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in self.pids:         # a failed test must not leave a lock behind
            for t in lock_tables(pid):
                netlock.nft(netlock.delete_script(t))
