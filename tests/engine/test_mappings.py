"""Every kind of mapping comes back: anonymous, guard, read-only, hints, shared, files."""
import subprocess

from .helpers import PROGRAMS, Job, cli, reference, restore_fg
from hpcckpt.images.imageset import ImageSet


def test_every_kind_of_mapping(tmp_path):
    exe = tmp_path / "mappings"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(PROGRAMS / "mappings.c")], check=True)
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 64)
    shared = tmp_path / "shared.bin"

    def cmd():
        shared.write_bytes(b"\0" * 8192)
        return [exe, 80, 30, data, shared]

    ref = reference(cmd(), tmp_path / "ref.txt")
    ref_shared = shared.read_bytes()
    job = Job.start(cmd(), tmp_path / "out.txt")
    job.wait_lines(10)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    # the image saves only what it must: not the private file mapping's unchanged pages
    shown = cli("show", tmp_path / "img").stdout
    assert "ANON_SHARED" in shown and "FILE_SHARED" in shown
    fpriv = [l for l in shown.splitlines() if "FILE_PRIVATE" in l and str(data) in l]
    assert fpriv and "      1 pages" in fpriv[0]
    assert restore_fg(tmp_path / "img").returncode == 0
    assert job.out.read_bytes() == ref
    assert shared.read_bytes() == ref_shared


def test_vdso_of_another_kernel_is_refused(tmp_path, threads_fp):
    job = Job.start([threads_fp, 120, 2, 20], tmp_path / "out.txt")
    job.wait_lines(3)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    job.proc.wait(timeout=10)
    iset = ImageSet(tmp_path / "img")
    inv = iset.read_message("inventory.img", "inventory")
    inv.vdso_xxh3 = "0" * 32
    inv.kernel = "5.10.0-other"
    iset.write_message("inventory.img", "inventory", inv)
    res = cli("restore", "--images", tmp_path / "img", check=False)
    assert res.returncode == 2 and "vDSO" in res.stderr and "5.10.0-other" in res.stderr
