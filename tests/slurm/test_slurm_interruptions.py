"""What a job sees when Slurm interrupts it: signals, preemption, a crashed node.

These are the events hpcckpt's Slurm integration reacts to; the tests pin down how
Slurm 22.05 on the test cluster actually delivers them, so the integration is built on
measured behaviour rather than on the manual.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from hpcckpt.scheduler import CommandsBackend, JobSubmitDescription
from tests.slurm_cluster.jobs import PRINT_CONTEXT, kill_node, wait_for_line

# Generous: the first test's set-up may include apt-get install on a fresh machine
# (pytest-timeout counts fixture set-up); every wait inside has its own bound.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

#: A batch script that logs every signal it gets and idles on its first run; later
#: runs (SLURM_RESTART_COUNT >= 1) say where they run and finish.
TRAPPING_SCRIPT = """#!/bin/bash
echo "START gen=${SLURM_RESTART_COUNT:-0} node=$SLURMD_NODENAME t=$(date +%s.%N)"
for sig in USR1 USR2 TERM CONT; do
  trap "echo SIG $sig gen=\\${SLURM_RESTART_COUNT:-0} t=\\$(date +%s.%N)" $sig
done
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo DONE; exit 0; fi
# Short sleeps: bash runs a trap only when the foreground command returns.
for i in $(seq 1200); do sleep 0.25; done
"""


def _epoch(line: str) -> float:
    return float(re.search(r"t=([\d.]+)", line).group(1))


def test_signal_to_batch_shell(backend: CommandsBackend, cluster, tmp_path):
    out = tmp_path / "sig.out"
    job_id = backend.submit(JobSubmitDescription(
        script=TRAPPING_SCRIPT, name="sig", output=str(out), time_limit=5))
    backend.wait_state(job_id, {"RUNNING"}, timeout=30)
    wait_for_line(out, "START", timeout=30)
    backend.cancel(job_id, signal="USR1", batch_only=True)
    wait_for_line(out, "SIG USR1 gen=0", timeout=10)
    assert backend.load(job_id).state == "RUNNING"  # a signal is not a cancel


def test_preemption_signals_batch_shell_then_requeues(backend: CommandsBackend, cluster,
                                                      tmp_path):
    node = cluster.nodes[0]
    low_out, high_out = tmp_path / "low.out", tmp_path / "high.out"
    low = backend.submit(JobSubmitDescription(
        script=TRAPPING_SCRIPT, name="low", partition="low", nodelist=node,
        requeue=True, signal="B:USR2@30", output=str(low_out), time_limit=10,
        extra_options=["--open-mode=append"]))
    backend.wait_state(low, {"RUNNING"}, timeout=30)
    wait_for_line(low_out, "START gen=0", timeout=30)

    submitted = time.time()
    high = backend.submit(JobSubmitDescription(
        script="#!/bin/bash\necho HIGH t=$(date +%s.%N)\nsleep 2\n", name="high",
        partition=cluster.preemptor_partition, nodelist=node, output=str(high_out),
        time_limit=2))

    # --signal=B:USR2 reaches the batch shell as soon as preemption starts
    # (preempt_send_user_signal), long before the grace period ends.
    usr2 = wait_for_line(low_out, "SIG USR2 gen=0", timeout=30)[0]
    signal_latency = _epoch(usr2) - submitted
    assert signal_latency < 15, signal_latency

    # Slurm itself requeues the preempted job once the grace time is over (SIGTERM
    # first); the preemptor runs, then the preempted job runs again as generation 1.
    backend.wait_state(high, {"COMPLETED"}, timeout=90)
    term = wait_for_line(low_out, "SIG TERM gen=0", timeout=10)[0]
    rerun = backend.wait_state(low, {"COMPLETED"}, timeout=60)
    total = time.time() - submitted
    print(f"preemption: USR2 after {signal_latency:.1f} s, SIGTERM after "
          f"{_epoch(term) - submitted:.1f} s, preempted job done (gen 1) after "
          f"{total:.1f} s")

    assert rerun.restart_count == 1
    assert _epoch(usr2) < _epoch(term) <= _epoch(wait_for_line(high_out, "HIGH", 5)[0])
    wait_for_line(low_out, "START gen=1", timeout=10)
    wait_for_line(low_out, "DONE", timeout=10)


def test_killed_node_requeues_job_on_other_node(backend: CommandsBackend, cluster, tmp_path):
    out = tmp_path / "crash.out"
    job_id = backend.submit(JobSubmitDescription(
        script=TRAPPING_SCRIPT, name="crash", requeue=True, output=str(out),
        time_limit=10, extra_options=["--open-mode=append"]))
    job = backend.wait_state(job_id, {"RUNNING"}, timeout=30)
    wait_for_line(out, "START gen=0", timeout=30)
    dead = job.batch_host
    (survivor,) = [n for n in cluster.nodes if n != dead]

    t0 = time.monotonic()
    killed = kill_node(cluster.slurmd_pid(dead), job_id, cluster.conf)
    assert killed, "found no process of the job to kill"
    requeued = backend.wait_state(job_id, {"PENDING", "RUNNING", "COMPLETED"}, timeout=60,
                                  where=lambda j: j.restart_count >= 1)
    t_requeued = time.monotonic() - t0
    rerun = backend.wait_state(job_id, {"RUNNING", "COMPLETED"}, timeout=90,
                               where=lambda j: j.restart_count >= 1)
    t_running = time.monotonic() - t0
    print(f"node crash: requeued after {t_requeued:.1f} s, running on {rerun.batch_host} "
          f"after {t_running:.1f} s")

    assert requeued.restart_count == 1
    assert rerun.batch_host == survivor
    wait_for_line(out, f"START gen=1 node={survivor}", timeout=30)
    assert backend.wait_state(job_id, {"COMPLETED"}, timeout=30).restart_count == 1
    # The dead node is reported down; restarting its slurmd brings it back
    # (ReturnToService=2), ready for the next test.
    state = cluster.run("sinfo", "-h", "-n", dead, "-o", "%t").split()
    assert state and all(s.startswith("down") for s in state), state
    t1 = time.monotonic()
    cluster.start()
    print(f"killed node idle again {time.monotonic() - t1:.1f} s after restarting slurmd")


def test_time_limit_warning_then_self_requeue(backend: CommandsBackend, cluster, tmp_path):
    """The walltime path: --signal warns before the limit, the job requeues itself.

    The job sees how much time it has left through JobContext (22.05 has no
    SLURM_JOB_END_TIME, so the backend asked the controller), and after the warning
    runs ``scontrol requeue`` on itself: the next run is generation 1.
    """
    out = tmp_path / "walltime.out"
    script = f"""#!/bin/bash
gen=${{SLURM_RESTART_COUNT:-0}}
echo "START gen=$gen t=$(date +%s.%N)"
{PRINT_CONTEXT}
if [ "$gen" -ge 1 ]; then echo DONE; exit 0; fi
warned=0
trap 'warned=1; echo "SIG USR1 gen=$gen t=$(date +%s.%N)"' USR1
for i in $(seq 400); do
  sleep 0.25
  if [ $warned = 1 ]; then
    echo "REQUEUING t=$(date +%s.%N)"   # before: the requeue SIGTERMs us at once
    scontrol requeue "$SLURM_JOB_ID"
    sleep 30   # requeue kills this run; never exit on our own (that would COMPLETE)
  fi
done
"""
    job_id = backend.submit(JobSubmitDescription(
        script=script, name="walltime", time_limit=1, signal="B:USR1@40", requeue=True,
        output=str(out), extra_options=["--open-mode=append"]))
    backend.wait_state(job_id, {"RUNNING"}, timeout=30)
    start = _epoch(wait_for_line(out, "START gen=0", timeout=30)[0])
    ctx = json.loads(wait_for_line(out, "CTX ", timeout=30)[0].split(" ", 1)[1])
    assert ctx["time_limit"] == "0:01:00" and ctx["generation"] == 0

    # Slurm checks for due warnings periodically (the notes saw one a minute early;
    # here it came ~7 s late): only "before the limit" is certain.
    warned = _epoch(wait_for_line(out, "SIG USR1 gen=0", timeout=40)[0])
    wait_for_line(out, "REQUEUING", timeout=10)
    done = backend.wait_state(job_id, {"COMPLETED"}, timeout=60,
                              where=lambda j: j.restart_count >= 1)
    print(f"walltime: USR1 {warned - start:.1f} s after start (limit 60 s, asked 40 s "
          f"before); self-requeued run done after {time.time() - start:.1f} s")
    assert done.restart_count == 1
    assert warned - start < 60
    wait_for_line(out, "START gen=1", timeout=10)
    wait_for_line(out, "DONE", timeout=10)
