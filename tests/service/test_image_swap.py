"""A root restore of a user's image (what hpcckptd's worker does) reads only that user's
own regular files: a page file swapped, after the digests were checked, for a symlink or a
hard link to a file the user may not read is refused, the half-built process is killed,
and none of the file's bytes reach the user's process."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hpcckpt.engine import restore as restore_mod
from hpcckpt.engine.dump import dump
from hpcckpt.errors import HpcckptError
from tests.engine.helpers import pid_alive

from .conftest import NOBODY, start_as_nobody

SECRET = b"root-only-secret "


@pytest.fixture
def secret():
    """A file only root may read, in a directory only root may enter."""
    d = Path(tempfile.mkdtemp(prefix="migrate-secret-", dir="/tmp"))
    d.chmod(0o700)
    yield d / "secret"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def user_image(world_dir, user_exe):
    """A user's process dumped (and killed) into an image the user owns, as hpcckptd gives it."""
    job = start_as_nobody([user_exe, 300, 1, 20], world_dir / "out.txt")
    job.wait_lines(3)
    img = world_dir / "img"
    r = dump(job.proc.pid, img, show_progress=False)
    job.proc.wait(timeout=10)
    for p in [img, *img.iterdir()]:
        os.chown(p, NOBODY, NOBODY)
    return img, r.pid


@pytest.mark.parametrize("how", ["symlink", "hardlink", "fifo", "replaced"])
def test_page_file_swapped_after_the_check_is_refused(user_image, secret, monkeypatch, how):
    img, pid = user_image
    pages = img / f"pages-{pid}.img"
    size = pages.stat().st_size
    secret.write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
    secret.chmod(0o600)
    clear, opener = restore_mod._clear_stub, restore_mod.open_image_file

    def opened_then_swapped(path, owner):
        """The user's move just after the restore opened the file to check it: the name
        now leads to a symlink to root's file."""
        fd = opener(path, owner)
        if path == pages:
            pages.unlink()
            pages.symlink_to(secret)
        return fd

    def swap_then_clear(t, vmas):
        """The user's move, after every digest was checked, before the stub opens its pages."""
        if how == "replaced":
            monkeypatch.setattr(restore_mod, "open_image_file", opened_then_swapped)
            return clear(t, vmas)
        pages.unlink()
        if how == "symlink":
            pages.symlink_to(secret)
        elif how == "hardlink":      # protected_hardlinks stops a user; the owner check stops it anyway
            os.link(secret, pages)
        else:                        # a FIFO nobody writes: the restore must not hang on it
            os.mkfifo(pages)
            os.chown(pages, NOBODY, NOBODY)
        return clear(t, vmas)
    monkeypatch.setattr(restore_mod, "_clear_stub", swap_then_clear)
    with pytest.raises(HpcckptError) as e:
        restore_mod.restore(img, show_progress=False)
    msg = str(e.value)
    assert str(pages) in msg, msg
    assert {"symlink": "is a symlink: refused", "hardlink": "belongs to uid 0, not to the image's owner",
            "fifo": "is not a regular file", "replaced": "could not be opened again after it was checked"}[how] in msg, msg
    assert not pid_alive(pid)        # the half-built process is gone
