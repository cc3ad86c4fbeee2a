"""The scheduler interface against the real test cluster: submit, look, requeue, cancel.

No mocks: every job here is run by slurmctld/slurmd, and what a job reports about
itself comes from hpcckpt's JobContext evaluated inside the job.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from hpcckpt.scheduler import (CommandsBackend, JobEndedError, JobNotFoundError,
                               JobSubmitDescription, WaitTimeoutError)
from hpcckpt.scheduler.pyslurm_backend import installed_slurm_version
from tests.slurm_cluster.jobs import PRINT_CONTEXT, wait_for_line

# Generous: the first test's set-up may include apt-get install on a fresh machine
# (pytest-timeout counts fixture set-up); every wait inside has its own bound.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_cluster_has_two_idle_nodes_and_two_partitions(cluster):
    print(f"cluster start-up (install check + start): {cluster.startup_seconds:.1f} s")
    nodes = cluster.run("sinfo", "-h", "-N", "-o", "%N %P %t").split("\n")
    seen = {tuple(line.split()) for line in nodes if line}
    assert seen == {(n, p, "idle") for n in cluster.nodes
                    for p in ("low*", "high")}, seen
    assert re.fullmatch(r"\d+\.\d+\.\d+", installed_slurm_version(cluster.env) or "")


def test_submit_runs_to_completion_with_output(backend: CommandsBackend, cluster, tmp_path):
    out = tmp_path / "hello-%j.out"
    t0 = time.monotonic()
    job_id = backend.submit(JobSubmitDescription(
        script="#!/bin/bash\necho hello from $SLURM_JOB_ID on $SLURMD_NODENAME\n",
        name="hello", time_limit=2, output=str(out), work_dir=str(tmp_path)))
    job = backend.wait_state(job_id, {"COMPLETED"}, timeout=45)
    elapsed = time.monotonic() - t0

    path = tmp_path / f"hello-{job_id}.out"
    assert path.read_text().split() == ["hello", "from", str(job_id), "on", job.batch_host]
    assert job.name == "hello"
    assert job.partition == cluster.default_partition
    assert job.batch_host in cluster.nodes and job.nodes == (job.batch_host,)
    assert job.exit_code == 0 and job.restart_count == 0
    assert job.time_limit is not None and job.time_limit.total_seconds() == 120
    assert job.standard_output == str(path)
    assert job.user == "root"
    print(f"submit -> COMPLETED in {elapsed:.1f} s")

    # squeue --json lists the same job with the same facts (it ignores -j: we filter).
    listed = {j.job_id: j for j in backend.jobs()}
    same = listed[job_id]
    for attr in ("name", "state", "partition", "nodes", "batch_host", "restart_count",
                 "exit_code", "time_limit", "standard_output", "user", "requeue"):
        assert getattr(same, attr) == getattr(job, attr), attr


def test_failed_job_reports_exit_code_and_stops_the_wait(backend, cluster, tmp_path):
    job_id = backend.submit(JobSubmitDescription(
        script="#!/bin/bash\nexit 3\n", name="fails", output=str(tmp_path / "o")))
    with pytest.raises(JobEndedError, match=rf"job {job_id}: ended FAILED"):
        backend.wait_state(job_id, {"COMPLETED"}, timeout=45)
    job = backend.load(job_id)
    assert (job.state, job.exit_code) == ("FAILED", 3)
    assert {j.job_id: j for j in backend.jobs()}[job_id].exit_code == 3


def test_errors_name_the_job_and_command(backend, cluster, tmp_path):
    with pytest.raises(JobNotFoundError, match="job 999999: .*scontrol show job"):
        backend.load(999999)
    with pytest.raises(JobNotFoundError, match="job 999999"):
        backend.requeue(999999)
    with pytest.raises(JobNotFoundError, match="job 999999"):
        backend.cancel(999999)

    job_id = backend.submit(JobSubmitDescription(
        script="#!/bin/bash\nsleep 300\n", name="waits", output=str(tmp_path / "o")))
    with pytest.raises(WaitTimeoutError, match=rf"job {job_id}: not in COMPLETED after 1 s"):
        backend.wait_state(job_id, {"COMPLETED"}, timeout=1)
    backend.wait_state(job_id, {"RUNNING"}, timeout=30)
    backend.cancel(job_id)
    assert backend.wait_state(job_id, {"CANCELLED"}, timeout=30).state == "CANCELLED"


def test_requeue_gives_restart_count_and_generation(backend: CommandsBackend, cluster,
                                                    tmp_path):
    out = tmp_path / "requeue.out"
    script = f"""#!/bin/bash
{PRINT_CONTEXT}
echo "ENV SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT-unset}}"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then exit 0; fi
for i in $(seq 600); do sleep 0.5; done
"""
    job_id = backend.submit(JobSubmitDescription(
        script=script, name="requeue-me", time_limit=10, requeue=True, output=str(out),
        extra_options=["--open-mode=append"]))
    backend.wait_state(job_id, {"RUNNING"}, timeout=30)
    wait_for_line(out, "ENV ", timeout=30)

    t0 = time.monotonic()
    backend.requeue(job_id)
    rerun = backend.wait_state(job_id, {"RUNNING", "COMPLETED"}, timeout=60,
                               where=lambda j: j.restart_count >= 1)
    requeue_to_running = time.monotonic() - t0
    done = backend.wait_state(job_id, {"COMPLETED"}, timeout=30)
    print(f"requeue -> running again in {requeue_to_running:.1f} s")

    assert rerun.restart_count == 1 and done.restart_count == 1
    envs = wait_for_line(out, "ENV ", timeout=10, count=2)
    assert envs == ["ENV SLURM_RESTART_COUNT=unset", "ENV SLURM_RESTART_COUNT=1"]
    first, second = (json.loads(line.split(" ", 1)[1])
                     for line in wait_for_line(out, "CTX ", timeout=10, count=2))
    for ctx, generation in ((first, 0), (second, 1)):
        assert ctx["job_id"] == job_id
        assert ctx["generation"] == generation
        assert ctx["job_name"] == "requeue-me"
        assert ctx["in_batch_step"] is True and ctx["step_id"] is None
        assert ctx["node_name"] in cluster.nodes
        assert ctx["partition"] == cluster.default_partition
        # 22.05 has no SLURM_JOB_END_TIME: the backend asked the controller.
        assert ctx["time_limit"] == "0:10:00"
        assert ctx["end_time"] is not None
