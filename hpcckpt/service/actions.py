"""`--action-script CMD`: a command run at each stage of a dump, restore or migration, as
CRIU's --action-script is, so a site or a user can act while the engine waits (flush a
file system, quiesce a license server, register the job elsewhere) or say no.

The command runs through /bin/sh with HPCCKPT_ACTION (the stage), HPCCKPT_PID (the
process) and HPCCKPT_IMAGES (the image directory, where there is one) in its environment.
Stages: "frozen" (the tree is stopped, nothing written yet), "dumped" (the image is
sealed, the tree still stopped), "restored" (the process is built but has not run an
instruction). A non-zero exit aborts: a dump is abandoned (the process thawed, running
as before, the image removed), a restore undone (what it made is killed); a migration's
"restored" refusal brings the process back on the source node.

Through hpcckptd the command runs in the client, with the user's own credentials and
environment; the daemon waits for its answer (the hooks of docs/service.md).
"""
import os
import subprocess
from dataclasses import dataclass

from ..errors import HpcckptError

STAGES = ("frozen", "dumped", "restored")
WHAT_FAILS = {"frozen": "the dump was abandoned and the process runs on",
              "dumped": "the dump was abandoned (image removed) and the process runs on",
              "restored": "the restore was undone"}


class ActionRefused(HpcckptError):
    """The action script said no (non-zero exit) at a stage that waits for it."""


@dataclass(frozen=True)
class ActionScript:
    command: str
    timeout: float | None = None

    def __call__(self, stage: str, pid: int, images: str = "", **extra: str) -> None:
        env = dict(os.environ, HPCCKPT_ACTION=stage, HPCCKPT_PID=str(pid), HPCCKPT_IMAGES=str(images),
                   **{f"HPCCKPT_{k.upper()}": str(v) for k, v in extra.items()})
        try:
            res = subprocess.run(["/bin/sh", "-c", self.command], env=env, stdin=subprocess.DEVNULL,
                                 timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ActionRefused(f"--action-script {self.command!r} did not finish within {self.timeout:g} s "
                                f"at {stage!r} for process {pid}: {WHAT_FAILS.get(stage, 'stopped')}") from None
        except OSError as e:
            raise ActionRefused(f"--action-script {self.command!r} could not run: {e}") from None
        if res.returncode != 0 and stage in STAGES:
            raise ActionRefused(f"--action-script {self.command!r} exited with status {res.returncode} at "
                                f"{stage!r} for process {pid}: {WHAT_FAILS[stage]}")

    def on_hook(self, n) -> bool:
        """hpcckpt.client's on_hook: the daemon's hook notification runs the script here."""
        self(n.event, n.pid, n.images, **({"node": n.node} if n.node else {}))
        return True
