"""The soft-dirty backend's tests, run inside Debian's 6.1 kernel (CONFIG_MEM_SOFT_DIRTY=y).

Our machines' kernel has no soft-dirty, so tests/tracking skips that backend here; this
test boots the guest (guest.py) and runs the same tests there with the backend
required, so a soft-dirty failure or a guest that does not come up fails this test with
the reason. About 15-25 s (software emulation).
"""
import sys
import time
from pathlib import Path

import pytest

from tests.qemu_guest import guest
from tests.tracking import helpers

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soft_dirty_backend_in_guest(monkeypatch):
    # binaries built on the host (gcc under emulation is slow), somewhere the guest sees:
    # the host root is shared read-only, but the guest's /tmp is its own
    bindir = guest.CACHE / "bin"
    monkeypatch.setenv("HPCCKPT_TEST_BIN_DIR", str(bindir))
    helpers.build()
    t0 = time.monotonic()
    try:
        status, out = guest.run(
            f"{sys.executable} -m pytest -q -p no:cacheprovider --color=no -rs tests/tracking -k soft",
            timeout=180, cwd=str(REPO),
            env={"HPCCKPT_TEST_BIN_DIR": str(bindir), "HPCCKPT_REQUIRE_BACKEND": "soft-dirty"})
    except guest.GuestError as e:
        pytest.fail(f"the soft-dirty guest could not run: {e}")
    took = time.monotonic() - t0
    print(out)
    print(f"guest run took {took:.1f} s")
    assert status == 0, f"soft-dirty tests failed in the guest (status {status}):\n{out[-4000:]}"
    assert " passed" in out and "skipped" not in out and "deselected" in out, out[-2000:]
