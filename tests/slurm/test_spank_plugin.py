"""The SPANK plugin: `#SBATCH --checkpoint=SCHEDULE` in a script that knows nothing of
hpcckpt. The plugin (built by slurm_plugin/build.sh, registered in the cluster's
plugstack.conf with the site store) runs the batch script under `hpcckpt run`; a
requeued or preempted job resumes from its newest checkpoint and its Slurm output file,
in Slurm's default truncate mode, holds every line once."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpcckpt.scheduler import CommandsBackend, JobSubmitDescription
from tests.engine.helpers import PROGRAMS
from tests.slurm.conftest import PLUGSTACK
from tests.slurm_cluster.jobs import wait_for_line

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
STEPS, PAUSE = 80, 0.1
HPCCKPT = Path(sys.executable).with_name("hpcckpt")

# A plain job: a shell that prints, runs a computation as its child, prints again.
BODY = ("echo start\n"
        f"{sys.executable} {PROGRAMS / 'compute.py'} {STEPS} {PAUSE}\n"
        "echo end\n")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spank")
    subprocess.run(["bash", str(REPO / "slurm_plugin" / "build.sh"), str(out)], check=True,
                   capture_output=True, timeout=300)
    return out / "hpcckpt_spank.so"


@pytest.fixture
def site_store(plugin, cluster, tmp_path) -> Path:
    conf = cluster.conf.read_text()
    assert f"PlugStackConfig={PLUGSTACK}" in conf, (
        "the session cluster was started without this session's PlugStackConfig "
        f"(a kept HPCCKPT_SLURM_STATE cluster?); stop it and rerun:\n{conf[-400:]}")
    store = tmp_path / "site-store"
    PLUGSTACK.write_text(f"required {plugin} store={store} hpcckpt={HPCCKPT} "
                         f"exec={REPO / 'slurm_plugin' / 'hpcckpt-spank-exec'}\n")
    yield store
    PLUGSTACK.write_text("")


@pytest.fixture
def ref(tmp_path) -> bytes:
    r = subprocess.run(["bash", "-c", BODY], capture_output=True, check=True, timeout=120)
    return r.stdout


def submit(backend, tmp_path, name, checkpoint="every=1s", **kw) -> tuple[int, Path]:
    out = tmp_path / f"{name}.out"
    job = backend.submit(JobSubmitDescription(
        script=f"#!/bin/bash\n#SBATCH --checkpoint={checkpoint}\n{BODY}", name=name, output=str(out),
        requeue=True, time_limit=10, **kw))
    return job, out


def job_lines(out: Path) -> bytes:
    """The job's own lines: hpcckpt's notes and slurmstepd's "CANCELLED ... DUE TO JOB
    REQUEUE" share the output file (stdout = stderr)."""
    return b"".join(ln for ln in out.read_bytes().splitlines(keepends=True)
                    if not ln.startswith((b"hpcckpt run:", b"slurmstepd")))


def test_checkpoint_option_is_known_to_sbatch(site_store, cluster):
    help_text = cluster.run("sbatch", "--help")
    assert "--checkpoint=SCHEDULE" in help_text


def test_plugin_job_requeued_resumes(backend: CommandsBackend, cluster, site_store, tmp_path, ref):
    job, out = submit(backend, tmp_path, "spank-rq")
    backend.wait_state(job, {"RUNNING"}, timeout=30)
    wait_for_line(out, "step 15 ", timeout=60)
    deadline = time.monotonic() + 30
    while len(list((site_store / f"slurm-{job}").glob("0*"))) < 2:
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.2)
    backend.requeue(job)
    done = backend.wait_state(job, {"COMPLETED"}, timeout=120, where=lambda j: j.restart_count >= 1)
    text = out.read_text()
    assert "resumed from" in text, text
    assert job_lines(out) == ref, text
    assert done.restart_count == 1
    st = subprocess.run([str(HPCCKPT), "status", str(job), "--store", str(site_store)], capture_output=True,
                        text=True, check=True).stdout
    assert "schedule: every=1s (every)" in st and "run: finished" in st, st


def test_plugin_job_preempted_resumes(backend, cluster, site_store, tmp_path, ref):
    node = cluster.nodes[0]
    # B:TERM: with preempt_send_user_signal the batch shell (hpcckpt run) hears of the
    # preemption at once instead of when the grace time ends
    job, out = submit(backend, tmp_path, "spank-low", partition="low", nodelist=node, signal="B:TERM@30")
    backend.wait_state(job, {"RUNNING"}, timeout=30)
    wait_for_line(out, "step 5 ", timeout=60)
    high = backend.submit(JobSubmitDescription(
        script="#!/bin/bash\nsleep 1\n", name="high", partition=cluster.preemptor_partition,
        nodelist=node, output=str(tmp_path / "high.out"), time_limit=2))
    backend.wait_state(high, {"COMPLETED"}, timeout=120)
    backend.wait_state(job, {"COMPLETED"}, timeout=150, where=lambda j: j.restart_count >= 1)
    text = out.read_text()
    assert "resumed from" in text, text
    assert job_lines(out) == ref, text


def test_bad_schedule_runs_the_job_and_says_why(backend, cluster, site_store, tmp_path, ref):
    job, out = submit(backend, tmp_path, "spank-bad", checkpoint="fortnightly")
    backend.wait_state(job, {"COMPLETED"}, timeout=90)
    text = out.read_text()
    assert "unknown schedule 'fortnightly'" in text, text
    assert job_lines(out) == ref
    st = subprocess.run([str(HPCCKPT), "status", str(job), "--store", str(site_store)], capture_output=True,
                        text=True, check=True).stdout
    assert "error: unknown schedule 'fortnightly'" in st, st


def test_plugin_user_job_requeued_resumes(backend: CommandsBackend, cluster, plugin, user_env, tmp_path):
    """An ordinary user's `#SBATCH --checkpoint` job (sbatch --uid 65534): the plugin's
    wrapper runs hpcckpt as the user, rootless; requeued, it resumes exactly."""
    nobody = 65534
    home = Path(tempfile.mkdtemp(prefix="hpcckpt-spank-user-", dir="/tmp"))
    try:
        os.chown(home, nobody, nobody)
        store = home / "site-store"
        store.mkdir(mode=0o1777)
        store.chmod(0o1777)                     # the site's store: each job makes its own dir
        wrapper = user_env.root / "hpcckpt-cli"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={user_env.root} exec {user_env.python} -m hpcckpt.cli \"$@\"\n")
        wrapper.chmod(0o755)
        spank_exec = user_env.root / "hpcckpt-spank-exec"
        shutil.copy(REPO / "slurm_plugin" / "hpcckpt-spank-exec", spank_exec)
        spank_exec.chmod(0o755)
        PLUGSTACK.write_text(f"required {plugin} store={store} hpcckpt={wrapper} exec={spank_exec}\n")
        body = (f"echo start\n{user_env.python} {user_env.program('compute.py')} {STEPS} {PAUSE}\necho end\n")
        ref = subprocess.run(["bash", "-c", body], capture_output=True, check=True, timeout=120).stdout
        out = home / "user.out"
        job = backend.submit(JobSubmitDescription(
            script=f"#!/bin/bash\n#SBATCH --checkpoint=every=1s\n{body}", name="spank-user", output=str(out),
            requeue=True, time_limit=10, work_dir=str(home), extra_options=[f"--uid={nobody}", f"--gid={nobody}"]))
        backend.wait_state(job, {"RUNNING"}, timeout=30)
        wait_for_line(out, "step 15 ", timeout=60)
        deadline = time.monotonic() + 30
        while len(list((store / f"slurm-{job}").glob("0*"))) < 2:
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        backend.requeue(job)
        backend.wait_state(job, {"COMPLETED"}, timeout=120, where=lambda j: j.restart_count >= 1)
        text = out.read_text()
        assert "resumed from" in text, text
        assert job_lines(out) == ref, text
        assert {p.stat().st_uid for p in (store / f"slurm-{job}").glob("0*")} == {nobody}
    finally:
        PLUGSTACK.write_text("")
        shutil.rmtree(home, ignore_errors=True)
