"""engine/pidns.py: the monitor's PID namespace ends without hanging, also when the job
(the monitor's own child, PID 2 in it) is a zombie nobody collected yet. Seen once: an
`hpcckpt run` monitor waited in shutdown() for its init forever, while the init, in the
kernel's zap_pid_ns_processes, waited for that zombie to be reaped (by the monitor)."""
import subprocess
import sys

import pytest

MONITOR = """
import os, sys, time
from hpcckpt.engine import pidns
pidns.ensure()
job = os.fork()
if job == 0:
    os._exit(3)
while open(f"/proc/{job}/stat").read().split(") ")[1][0] != "Z":
    time.sleep(0.01)
pidns.shutdown(%s)
print("ended")
"""


@pytest.mark.parametrize("known", ["job", ""])
def test_shutdown_with_the_job_a_zombie_of_ours(known):
    """`known`: the caller names its job (run does), or not (the init's other children
    are then collected all the same)."""
    res = subprocess.run([sys.executable, "-c", MONITOR % known], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0 and res.stdout == "ended\n", res.stderr
