"""The systemd unit docs/service.md gives sites: systemd accepts it without a warning, and
hpcckptd knows every option its ExecStart passes."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def _unit() -> tuple[str, str]:
    m = re.search(r"```ini\n# (/etc/systemd/system/\S+)\n(.*?)```", DOC.read_text(), re.S)
    assert m, "docs/service.md has no systemd unit"
    return m[1], m[2]


def test_the_documented_unit_is_valid(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    name, text = _unit()
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", text, re.M)[1])
    here = Path(sys.executable).with_name("hpcckptd")              # the installed entry point
    unit = tmp_path / Path(name).name
    unit.write_text(text.replace(exec_start[0], str(here)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    helptext = subprocess.run([str(here), "--help"], capture_output=True, text=True, timeout=60).stdout
    for opt in (a for a in exec_start[1:] if a.startswith("--")):
        assert opt in helptext, f"hpcckptd has no {opt}"
