"""The main job on a local default: a real computation checkpointed, killed, resumed.

1. runs examples/heat.py uninterrupted, for the reference answer;
2. runs it under `hpcckpt run --every 2`, and kills everything with SIGKILL halfway
   (as a node crash would);
3. runs the very same command again: it resumes from the newest checkpoint;
4. compares the resumed run's complete output with the reference, and prints figures.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = "2000"


def main() -> int:
    work = ROOT / "demo-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    job = [sys.executable, str(ROOT / "examples" / "heat.py"), STEPS]
    run = [sys.executable, "-m", "hpcckpt.cli", "run", "--images", str(work / "checkpoints"),
           "--every", "2", "--"] + job

    print("1/4 uninterrupted reference run ...", flush=True)
    t0 = time.monotonic()
    ref = subprocess.run(job, capture_output=True, check=True).stdout
    t_ref = time.monotonic() - t0

    print("2/4 the same job under hpcckpt run --every 2, killed with SIGKILL halfway ...", flush=True)
    out = work / "output.txt"
    log = work / "hpcckpt.log"
    with open(out, "wb") as o, open(log, "wb") as e:
        first = subprocess.Popen(run, stdout=o, stderr=e, start_new_session=True)
    while out.read_bytes().count(b"\n") < 10:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    lines_at_kill = out.read_bytes().count(b"\n")
    ckpts = sorted(p.name for p in (work / "checkpoints").glob("ckpt-*"))
    print(f"    killed after {lines_at_kill} of 21 output lines; checkpoints on disk: {', '.join(ckpts)}")

    print("3/4 the same command again: it resumes from the newest checkpoint ...", flush=True)
    t1 = time.monotonic()
    with open(out, "ab") as o, open(log, "ab") as e:
        rc = subprocess.run(run, stdout=o, stderr=e).returncode
    t_resume = time.monotonic() - t1

    print("4/4 comparing with the uninterrupted run")
    got = out.read_bytes()
    text = log.read_text()
    frozen = [int(m) for m in re.findall(r"frozen (\d+) ms", text)]
    sizes = [float(m) for m in re.findall(r": ([\d.]+) MiB, frozen", text)]
    restored = re.search(r"resumed from (\S+) as PID \d+ in ([\d.]+) s", text)
    print(f"    {got.splitlines()[-1].decode() if got else '(no output)'}")
    print(f"    reference run {t_ref:.1f} s; resumed part {t_resume:.1f} s; exit status {rc}")
    if frozen:
        print(f"    {len(frozen)} checkpoints (both runs) of {sum(sizes) / len(sizes):.1f} MiB on average, "
              f"job frozen {sum(frozen) / len(frozen):.0f} ms each (max {max(frozen)} ms)")
    if restored:
        print(f"    restored from {Path(restored[1]).name} in {float(restored[2]):.3f} s")
    if got == ref and rc == 0:
        print("RESULT: the resumed job's whole output is byte-identical to the uninterrupted run's")
        return 0
    print("RESULT: MISMATCH between resumed and uninterrupted output; see", out, log)
    return 1


if __name__ == "__main__":
    sys.exit(main())
