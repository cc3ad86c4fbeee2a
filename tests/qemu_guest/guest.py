#!/usr/bin/env python3
"""Run a command inside Debian's 6.1 kernel (which has soft-dirty) under QEMU.

    python tests/qemu_guest/guest.py [--timeout S] [--env K=V ...] [--rw-dir DIR] -- CMD ...

prints the command's output and exits with its exit status (124 on timeout, 125 when
the guest could not be set up or booted, with the reason on stderr).

How (facts in ../shared/notes/kernel-facts.md): `apt-get download` fetches the kernel
package named by linux-image-amd64 (nothing is installed on the host), the uncompressed
kernel and the virtio/9p modules are taken out of it, and a ~1.3 MB initramfs (static
busybox + those modules + an init script) is built. QEMU's `microvm` machine under
software emulation (the host's /dev/kvm cannot run a guest kernel) boots it; init mounts
the host's root filesystem read-only over virtio-9p and chroots into it, so the host's
Python and venv run in the guest. One writable host directory (--rw-dir) is shared too,
at the same path. Missing host tools (qemu-system-x86, busybox-static) are installed
with apt-get; `apt-get update` runs only if a package or the kernel cannot be found.
Everything prepared is cached in $HPCCKPT_GUEST_CACHE (default /var/tmp/hpcckpt-guest).
"""
import argparse
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("HPCCKPT_GUEST_CACHE", "/var/tmp/hpcckpt-guest"))
MODULES = ["virtio_mmio", "9pnet_virtio", "9p"]   # plus what they depend on
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static"}
MARK = "@@HPCCKPT-GUEST-EXIT="


class GuestError(Exception):
    """The guest could not be prepared or booted (the message says why)."""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _apt_install(pkgs: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *pkgs]
    r = _run(cmd, env=env)
    if r.returncode != 0:  # the package lists may be missing or stale
        _run(["apt-get", "update"], env=env)
        r = _run(cmd, env=env)
    if r.returncode != 0:
        raise GuestError(f"apt-get install {' '.join(pkgs)} failed: {r.stderr.strip()[-500:]}")


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)]
    if not Path("/bin/busybox").exists() or not _is_static("/bin/busybox"):
        missing.append("busybox-static")
    if missing:
        _apt_install(sorted(set(missing)))


def _is_static(path: str) -> bool:
    with open(path, "rb") as f:
        return b"/lib64/ld-linux" not in f.read(1 << 16)


def _kernel_package() -> str:
    r = _run(["apt-cache", "depends", "linux-image-amd64"])
    if r.returncode != 0 or "Depends:" not in r.stdout:
        _run(["apt-get", "update"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        r = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*)", r.stdout)
    if not m:
        raise GuestError(f"cannot resolve linux-image-amd64 with apt-cache: {r.stdout}{r.stderr}")
    return m[1]


def _vmlinux(bzimage: Path, out: Path) -> None:
    """The uncompressed ELF kernel out of a bzImage (Debian compresses it with xz)."""
    data = bzimage.read_bytes()
    i = data.find(b"\xfd7zXZ\x00")
    if i < 0:
        raise GuestError(f"{bzimage}: no xz stream found (not a Debian xz kernel?)")
    d = lzma.LZMADecompressor()
    elf = d.decompress(data[i:])
    if not elf.startswith(b"\x7fELF"):
        raise GuestError(f"{bzimage}: the xz stream is not an ELF kernel")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    tmp.rename(out)


def prepare_kernel() -> tuple[Path, Path]:
    """(vmlinux, modules dir) for the current linux-image-amd64, cached."""
    pkg = _kernel_package()
    root = CACHE / pkg
    vmlinux = root / "vmlinux"
    if vmlinux.exists():
        return vmlinux, next((root / "x/lib/modules").iterdir())
    root.mkdir(parents=True, exist_ok=True)
    debs = list(root.glob(f"{pkg}_*.deb"))
    if not debs:
        r = _run(["apt-get", "download", pkg], cwd=root)
        debs = list(root.glob(f"{pkg}_*.deb"))
        if not debs:
            raise GuestError(f"apt-get download {pkg} failed: {r.stderr.strip()[-500:]}")
    x = root / "x"
    if x.exists():
        shutil.rmtree(x)
    r = _run(["dpkg-deb", "-x", str(debs[0]), str(x)])
    if r.returncode:
        raise GuestError(f"dpkg-deb -x {debs[0]}: {r.stderr}")
    _vmlinux(next((x / "boot").glob("vmlinuz-*")), vmlinux)
    debs[0].unlink()  # 70 MB we no longer need
    return vmlinux, next((x / "lib/modules").iterdir())


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", data)
    return [d for d in (m[1].decode().split(",") if m else []) if d]


def module_order(moddir: Path, wanted: list[str]) -> list[Path]:
    """The .ko files for `wanted` and their dependencies, dependencies first."""
    index = {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko*")}
    order: list[Path] = []

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key not in index:
            raise GuestError(f"module {name} not in {moddir}")
        p = index[key]
        if p in order:
            return
        for dep in _modinfo_depends(p):
            visit(dep)
        order.append(p)

    for w in wanted:
        visit(w)
    return order


INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in MODULES; do /bin/busybox insmod /lib/$m || echo "insmod $m failed"; done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt || { echo "mount of the host root failed"; /bin/busybox poweroff -f; }
/bin/busybox mount -t proc proc /mnt/proc
/bin/busybox mount -t sysfs sys /mnt/sys
/bin/busybox mount -t devtmpfs dev /mnt/dev
/bin/busybox mount -t tmpfs tmp /mnt/run
/bin/busybox mkdir -p /mnt/dev/shm; /bin/busybox mount -t tmpfs shm /mnt/dev/shm
RWMOUNT
/bin/busybox chroot /mnt /bin/sh -c '. /hpcckpt-guest-cmd' 2>&1 < /dev/null
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories have empty data."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        nb = name.encode() + b"\x00"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out += hdr.encode() + nb
        out += b"\x00" * (-len(out) % 4)
        out += data
        out += b"\x00" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(moddir: Path, rw_dir: str | None, cmdfile: Path, out: Path) -> None:
    mods = module_order(moddir, MODULES)
    init = INIT.replace("MODULES", " ".join(p.name for p in mods))
    init = init.replace("/hpcckpt-guest-cmd", shlex.quote(str(cmdfile)))
    rw = ""
    if rw_dir:
        rw = (f"/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 hostrw "
              f"/mnt{shlex.quote(rw_dir)} || echo 'mount of {rw_dir} failed'")
    init = init.replace("RWMOUNT", rw)
    entries = [("bin", 0o40755, b""), ("lib", 0o40755, b""),
               ("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()),
               ("init", 0o100755, init.encode())]
    for p in mods:
        data = p.read_bytes()
        if p.name.endswith(".xz"):
            data = lzma.decompress(data)
        entries.append((f"lib/{p.name}", 0o100644, data))
    out.write_bytes(_cpio_newc(entries))


def host_khz() -> int:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2000000


def run(command: str, timeout: float = 120, env: dict[str, str] | None = None,
        rw_dir: str | None = None, memory_mb: int = 1024, cwd: str | None = None) -> tuple[int, str]:
    """Run `command` (a shell command line) in the guest: (exit status, output).

    Raises GuestError when the guest cannot be prepared or does not come up."""
    ensure_tools()
    vmlinux, moddir = prepare_kernel()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    try:
        # The command runs from a file on the shared host root (read-only in the guest).
        # The guest's writable scratch is a tmpfs on /run (TMPDIR), not on /tmp: a checkout
        # under the host's /tmp (as CI may make) must stay visible.
        cmdfile = work / "cmd.sh"
        initrd = work / "initrd.cpio"
        build_initramfs(moddir, rw_dir, cmdfile, initrd)
        lines = [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
        lines += ["export PYTHONDONTWRITEBYTECODE=1 HOME=/run TMPDIR=/run", f"cd {shlex.quote(cwd or os.getcwd())}",
                  command, f'echo "{MARK}$?"', "/bin/busybox poweroff -f"]
        cmdfile.write_text("\n".join(lines) + "\n")
        append = " ".join([
            "console=ttyS0", "quiet", "panic=-1", "reboot=t", "tsc=reliable",
            f"tsc_early_khz={host_khz()}", "8250.nr_uarts=1"])
        qemu = ["qemu-system-x86_64", "-M", "microvm,acpi=on,pit=on,pic=off,rtc=off", "-accel", "tcg",
                "-cpu", "max", "-smp", "1", "-m", str(memory_mb), "-nodefaults", "-no-user-config",
                "-nographic", "-no-reboot", "-serial", "stdio",
                "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", append,
                "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-device,fsdev=root,mount_tag=hostroot"]
        if rw_dir:
            qemu += ["-fsdev", f"local,id=rw,path={rw_dir},security_model=none,multidevs=remap",
                     "-device", "virtio-9p-device,fsdev=rw,mount_tag=hostrw"]
        t0 = time.monotonic()
        try:
            r = subprocess.run(qemu, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")
            return 124, out + f"\n[guest timed out after {timeout:.0f} s]\n"
        out = r.stdout.decode(errors="replace").replace("\r\n", "\n")
        m = re.search(re.escape(MARK) + r"(\d+)", out)
        if not m:
            raise GuestError(f"the guest did not run the command (qemu exit {r.returncode}, "
                             f"{time.monotonic() - t0:.1f} s); console:\n{out[-3000:]}"
                             f"\nqemu stderr:\n{r.stderr.decode(errors='replace')[-2000:]}")
        return int(m[1]), out[:m.start()]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--env", action="append", default=[], metavar="K=V")
    ap.add_argument("--rw-dir")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    try:
        status, out = run(shlex.join(cmd), a.timeout, dict(e.split("=", 1) for e in a.env), a.rw_dir)
    except GuestError as e:
        print(f"guest: {e}", file=sys.stderr)
        return 125
    sys.stdout.write(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
