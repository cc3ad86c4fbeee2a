"""Fixtures for the tracking tests: the target process and the backends to test.

A backend that does not work on this kernel is skipped here with the probe's reason;
the soft-dirty backend, absent on our 6.18 machines, is run by
tests/qemu_guest/test_soft_dirty_guest.py inside Debian's 6.1 kernel, which sets
HPCCKPT_REQUIRE_BACKEND=soft-dirty so that a non-working backend fails instead.
"""
import os

import pytest

from hpcckpt.tracking.select import BACKENDS, probe

from .helpers import Target


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    """A fresh tracker of each backend that works here."""
    name = request.param
    result = {r.name: r for r in probe()}[name]
    if not result.works:
        if os.environ.get("HPCCKPT_REQUIRE_BACKEND") == name:
            pytest.fail(f"backend {name} is required here but does not work: {result.detail}")
        pytest.skip(f"{name} does not work on this kernel: {result.detail}")
    tracker = BACKENDS[name]()
    yield tracker
    tracker.disarm()
