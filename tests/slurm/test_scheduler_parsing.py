"""The scheduler interface's readers, on output captured from the Slurm 22.05 test cluster.

These need no cluster: they pin down how scontrol's text, squeue's JSON, host lists,
time strings and the job environment are read, including 22.05's quirks (raw wait
status as exit_code, unexpanded %j in squeue's standard_output, a year-ahead end time
for unlimited jobs).
"""
from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from hpcckpt.errors import HpcckptError
from hpcckpt.scheduler import (CommandsBackend, JobContext, JobSubmitDescription,
                               NotInJobError, SchedulerBackend, SchedulerError,
                               select_backend)
from hpcckpt.scheduler.commands import sbatch_options
from hpcckpt.scheduler.hostlist import expand
from hpcckpt.scheduler.pyslurm_backend import same_release
from hpcckpt.scheduler.scontrol_text import parse_jobs, parse_record
from hpcckpt.scheduler.squeue_json import job_from_json
from hpcckpt.scheduler.timefmt import format_duration, parse_duration

FAILED_LINE = (
    "JobId=1 JobName=my job UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=4294901759 Nice=0 Account=(null) QOS=(null) JobState=FAILED "
    "Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 "
    "ExitCode=3:0 RunTime=00:00:00 TimeLimit=1-02:04:00 TimeMin=N/A "
    "SubmitTime=2026-11-27T13:23:04 EligibleTime=2026-11-27T13:23:04 "
    "StartTime=2026-11-27T13:23:06 EndTime=2026-11-27T13:23:06 Deadline=N/A "
    "Partition=low AllocNode:Sid=localhost:2162 ReqNodeList=(null) NodeList=node1 "
    "BatchHost=node1 NumNodes=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 "
    "WorkDir=/tmp StdErr=/tmp/hk-my job-1.out StdIn=/dev/null StdOut=/tmp/hk-my job-1.out "
    "Power= ")
RUNNING_UNLIMITED_LINE = (
    "JobId=2 JobName=wrap UserId=root(0) JobState=RUNNING Reason=None Requeue=1 "
    "Restarts=2 ExitCode=0:0 TimeLimit=UNLIMITED StartTime=2026-11-27T13:23:06 "
    "EndTime=Unknown Partition=low NodeList=node[1-2] BatchHost=node2 StdOut=/dev/null")

FAILED_JSON = {
    "job_id": 1, "name": "my job", "job_state": "FAILED", "exit_code": 768,
    "time_limit": 1564, "end_time": 1795785786, "start_time": 1795785786,
    "submit_time": 1795785784, "standard_output": "/tmp/hk-%x-%j.out", "nodes": "node1",
    "restart_cnt": 0, "state_reason": "NonZeroExitCode", "requeue": True,
    "batch_host": "node1", "user_name": "root", "partition": "low",
    "current_working_directory": "/tmp", "array_job_id": 0}
RUNNING_UNLIMITED_JSON = {
    "job_id": 2, "name": "wrap", "job_state": "RUNNING", "exit_code": 0,
    "time_limit": None, "end_time": 1827321786, "start_time": 1795785786,
    "standard_output": "/dev/null", "nodes": "node[1-2]", "restart_cnt": 2,
    "state_reason": "None", "requeue": True, "batch_host": "node2", "user_name": "root",
    "partition": "low"}


def test_scontrol_record_keeps_values_with_spaces():
    rec = parse_record(FAILED_LINE)
    assert rec["JobName"] == "my job"
    assert rec["StdOut"] == "/tmp/hk-my job-1.out"
    assert rec["AllocNode:Sid"] == "localhost:2162"
    assert rec["TRES"] == "cpu=1,node=1,billing=1"
    assert rec["Power"] == ""


def test_scontrol_and_squeue_agree_on_a_failed_job():
    (a,) = parse_jobs(FAILED_LINE)
    b = job_from_json(FAILED_JSON)
    for job in (a, b):
        assert (job.job_id, job.name, job.state, job.exit_code) == (1, "my job", "FAILED", 3)
        assert job.state_reason == "NonZeroExitCode" and job.is_final
        assert job.time_limit == timedelta(days=1, hours=2, minutes=4)
        assert job.nodes == ("node1",) and job.batch_host == "node1"
        assert job.user == "root" and job.partition == "low" and job.requeue is True
        assert job.standard_output == "/tmp/hk-my job-1.out"
    assert a.start_time == b.start_time and a.end_time == b.end_time


def test_unlimited_running_job_has_no_end_time():
    (a,) = parse_jobs(RUNNING_UNLIMITED_LINE)
    b = job_from_json(RUNNING_UNLIMITED_JSON)
    for job in (a, b):
        assert job.time_limit is None and job.end_time is None
        assert job.state_reason is None and not job.is_final
        assert job.restart_count == 2 and job.nodes == ("node1", "node2")


@pytest.mark.parametrize("text,names", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("n[01-02,7],gpu5", ["n01", "n02", "n7", "gpu5"]),
    ("a[8-10]-ib", ["a8-ib", "a9-ib", "a10-ib"]),
    ("(null)", []),
    ("", []),
])
def test_hostlist(text, names):
    assert expand(text) == names


@pytest.mark.parametrize("text,value", [
    ("5", timedelta(minutes=5)),
    ("5:30", timedelta(minutes=5, seconds=30)),
    ("01:02:03", timedelta(hours=1, minutes=2, seconds=3)),
    ("2-3", timedelta(days=2, hours=3)),
    ("1-02:04:00", timedelta(days=1, hours=2, minutes=4)),
    ("UNLIMITED", None),
    ("N/A", None),
])
def test_durations(text, value):
    assert parse_duration(text) == value
    if value is not None:
        assert parse_duration(format_duration(value)) == value


def test_sbatch_options():
    desc = JobSubmitDescription(
        script="echo hi", name="n", partition="high", time_limit=90, requeue=True,
        signal="B:USR2@60", output="/o", nodelist="node1",
        environment={"A": "1"}, extra_options=["--open-mode=append"])
    assert sbatch_options(desc) == [
        "--job-name=n", "--partition=high", "--time=0-01:30:00", "--requeue",
        "--signal=B:USR2@60", "--output=/o", "--nodelist=node1", "--export=ALL,A=1",
        "--open-mode=append"]
    assert desc.script_text() == "#!/bin/sh\necho hi"
    assert sbatch_options(JobSubmitDescription(script="x", requeue=False)) == ["--no-requeue"]


def test_context_of_first_run_and_requeued_batch_step():
    env = {"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "node2", "SLURM_JOB_NAME": "app",
           "SLURM_JOB_PARTITION": "low", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_CLUSTER_NAME": "hpcckpt", "SLURM_SUBMIT_DIR": "/w"}
    first = JobContext.from_environ(env)
    assert (first.job_id, first.generation, first.node_name) == (42, 0, "node2")
    assert first.in_batch_step and first.nodes == ("node1", "node2")
    again = JobContext.from_environ({**env, "SLURM_RESTART_COUNT": "3"})
    assert again.generation == 3
    step = JobContext.from_environ({**env, "SLURM_STEP_ID": "0"})
    assert not step.in_batch_step and step.step_id == "0"
    salloc_shell = JobContext.from_environ({"SLURM_JOB_ID": "42"})
    assert not salloc_shell.in_batch_step and salloc_shell.seconds_left() is None


def test_context_outside_a_job():
    with pytest.raises(NotInJobError, match="SLURM_JOB_ID is not set"):
        JobContext.from_environ({})
    with pytest.raises(SchedulerError, match="SLURM_RESTART_COUNT='x'"):
        JobContext.from_environ({"SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "x"})


def test_pyslurm_release_matching():
    assert same_release("25.11.0", "25.11.2")
    assert not same_release("25.11.0", "22.05.8")
    assert not same_release("garbage", "22.05.8")


def test_select_backend_says_why_it_uses_commands(caplog):
    with caplog.at_level(logging.DEBUG, logger="hpcckpt.scheduler"):
        backend = select_backend()
    if backend.name == "commands":
        assert isinstance(backend, CommandsBackend)
        assert "scheduler backend: commands, because" in caplog.text
    assert select_backend(prefer="commands").name == "commands"
    with pytest.raises(ValueError):
        select_backend(prefer="nope")


def test_command_backend_fits_the_protocol_and_errors_fit_the_hierarchy():
    assert isinstance(CommandsBackend(), SchedulerBackend)
    assert issubclass(SchedulerError, HpcckptError)
