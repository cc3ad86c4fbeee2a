"""Memory: which mappings a process has, which of their pages must be saved, and copying.

Private anonymous pages that were ever touched are saved; of private file mappings only
the pages the process changed (copy-on-write copies) are, the rest come back from the
file; shared file mappings live in their file; shared anonymous memory is saved whole
(holes skipped). The vDSO family is remapped, never saved.
"""
import ctypes
import errno
import mmap
import os
import struct
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import KernelError, ProcessGoneError, UnsupportedError
from ..images import pb
from ..kernel import proc
from ..kernel.libc import PAGE_SIZE, iovec, libc, vm_read

PROT = {"r": mmap.PROT_READ, "w": mmap.PROT_WRITE, "x": mmap.PROT_EXEC}
SPECIAL = {"[vdso]": pb.VDSO, "[vvar]": pb.VVAR, "[vvar_vclock]": pb.VVAR_VCLOCK,
           "[vsyscall]": pb.VSYSCALL}
# smaps VmFlags we give back with madvise(); the value is the MADV_* number
MADVISE = {"dc": 10, "wf": 18, "hg": 14, "nh": 15, "dd": 16}
CHUNK = 4 << 20
STAGE_MAX = 1 << 30
IOV_MAX = 1024     # the kernel's UIO_MAXIOV: iovecs per process_vm_readv
PM_SWAP_TYPE_MASK = 0x1F
PTE_MARKER_TYPE = 0x1F     # x86_64: the swap type pagemap gives a pte marker (no swap device has it)
SPARSE_MIN = 1 << 30       # mappings larger than this are saved by their populated ranges (_sparse_runs)


def mem_available() -> int:
    """MemAvailable in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def stage_budget() -> int:
    """Bytes of pages a dump may hold in memory while the process is frozen, written to
    the image after the thaw: 1 GiB, or a quarter of the available memory if less."""
    return min(STAGE_MAX, mem_available() // 4)


def vm_readv(pid: int, local: int, length: int, remote_iov: int, count: int) -> int:
    """process_vm_readv of `count` remote iovecs (an array at `remote_iov`) into one local
    buffer; bytes read, 0 if the first remote page is unreadable (the caller reads the
    rest through /proc/PID/mem); OSError for anything else (ESRCH: the process is gone)."""
    liov = iovec(local, length)
    n = libc.process_vm_readv(pid, ctypes.byref(liov), 1, ctypes.cast(remote_iov, ctypes.POINTER(iovec)),
                              count, 0)
    if n < 0:
        e = ctypes.get_errno()
        if e in (errno.EFAULT, errno.EIO):
            return 0
        raise OSError(e, f"{os.strerror(e)} (pid {pid}, {count} runs)")
    return n


def prot_bits(prot: str) -> int:
    return sum(bit for ch, bit in PROT.items() if ch in prot)


def describe(pid: int, v: proc.Vma) -> pb.Vma:
    """The image's view of one mapping; refuses kinds the engine cannot restore."""
    out = pb.Vma(start=v.start, end=v.end, prot=prot_bits(v.prot), shared=v.shared,
                 pgoff=v.pgoff, path=v.path,  # maps gives the offset in bytes
                 growsdown="gd" in v.vmflags, heap=v.path == "[heap]", stack=v.path == "[stack]",
                 vmflags=[f for f in v.vmflags if f in MADVISE], noreserve="nr" in v.vmflags)
    if v.path in SPECIAL:
        out.kind = SPECIAL[v.path]
    elif v.path.startswith("/SYSV") and v.shared:   # the inode is the segment's ID (engine/sysvipc.py)
        out.kind, out.sysv_shmid = pb.SYSV_SHM, v.inode
    elif v.inode == 0:
        if v.shared:
            raise UnsupportedError(f"process {pid}: shared mapping {v.start:#x}-{v.end:#x} without a file")
        out.kind = pb.ANON_PRIVATE
    elif v.shared and (v.path.startswith("/dev/zero") or v.path.startswith("/memfd:")
                       or v.path.endswith(" (deleted)")):
        out.kind = pb.ANON_SHARED
    elif v.path.endswith(" (deleted)"):
        raise UnsupportedError(
            f"process {pid}: mapping {v.start:#x}-{v.end:#x} of a deleted file {v.path}")
    elif v.shared:
        out.kind = pb.FILE_SHARED
    else:
        out.kind = pb.FILE_PRIVATE
    if out.kind != SPECIAL.get(v.path) and ("io" in v.vmflags or "pf" in v.vmflags):
        raise UnsupportedError(f"process {pid}: device mapping {v.start:#x}-{v.end:#x} ({v.path})")
    return out


def pages_to_save(pid: int, vma: pb.Vma) -> list[tuple[int, int]]:
    """(address, length) runs of one mapping whose content the image must hold."""
    if vma.kind in (pb.VDSO, pb.VVAR, pb.VVAR_VCLOCK, pb.VSYSCALL, pb.FILE_SHARED, pb.SYSV_SHM):
        return []
    if vma.shmid:      # saved once for the whole tree, in shmem-ID.img
        return []
    if vma.kind == pb.ANON_SHARED:
        return [(vma.start, vma.end - vma.start)]
    if vma.end - vma.start > SPARSE_MIN:
        return _sparse_runs(pid, vma)
    return proc.address_runs(save_mask(pid, vma), vma.start)


def _sparse_runs(pid: int, vma: pb.Vma) -> list[tuple[int, int]]:
    """pages_to_save for a huge mapping, in memory bounded by what it holds, not by its size.

    Servers reserve address space they may never touch: mariadbd maps 8 TiB PROT_NONE for
    its buffer pool's maximum size. A pagemap entry per page of that is 16 GiB read and a
    2 GiB mask (a dump of it was killed by the OOM killer). PAGEMAP_SCAN (Linux 6.7+) gives
    the populated ranges (present or swapped) instead; only those get pagemap's per-page
    rule. Without it the mapping is walked in SPARSE_MIN windows."""
    from ..tracking.scan import MAX_END, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, Scanner
    spans = [(a, min(a + SPARSE_MIN, vma.end)) for a in range(vma.start, vma.end, SPARSE_MIN)]
    if vma.end <= MAX_END:
        sc = Scanner(pid)
        try:
            starts, ends, _ = sc.scan(vma.start, vma.end, 0, PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                                      anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
            spans = list(zip(starts.tolist(), ends.tolist()))
        except KernelError:        # no PAGEMAP_SCAN on this kernel (before 6.7): windows
            pass
        finally:
            sc.close()
    return _runs_in(pid, vma, spans)


def huge_private(vmas) -> list[str]:
    """Private mappings larger than this node's memory (proc.Vma or pb.Vma), described.

    Such a mapping is a reservation that can never be populated (mariadbd's 8 TiB buffer
    pool range): arming uffd-wp on it makes the kernel build page tables for all of it, and
    the trackers report a changed mapping as an array of all its pages, so `hpcckpt run`
    takes full checkpoints of a job holding one. Arrays that fit in memory, however large,
    are tracked as usual."""
    limit = _mem_total()
    return [f"{v.start:#x}-{v.end:#x} ({(v.end - v.start) >> 30} GiB)"
            for v in vmas if not v.shared and v.end - v.start > limit]


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) << 10
    raise KernelError("/proc/meminfo has no MemTotal line")


def _runs_in(pid: int, vma: pb.Vma, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """pages_to_save's runs within each [start, end) span of `vma`, adjacent runs joined."""
    out: list[tuple[int, int]] = []
    part = pb.Vma()
    part.CopyFrom(vma)
    for a, b in spans:
        for lo in range(a, b, SPARSE_MIN):
            part.start, part.end = lo, min(lo + SPARSE_MIN, b)
            for i, n in proc.runs(save_mask(pid, part)):
                addr = lo + i * PAGE_SIZE
                if out and out[-1][0] + out[-1][1] == addr:
                    out[-1] = (out[-1][0], out[-1][1] + n * PAGE_SIZE)
                else:
                    out.append((addr, n * PAGE_SIZE))
    return out


def save_mask(pid: int, vma: pb.Vma) -> np.ndarray:
    """Per page of a private mapping: must the image hold it? Present or swapped out; of a
    private file mapping only the process's own copies. A userfaultfd-wp pte marker (left
    where a page was dropped while tracking; pagemap shows it as swap type 31) is absent."""
    pm = proc.pagemap(pid, vma.start, vma.end)
    if len(pm) != (vma.end - vma.start) // PAGE_SIZE:
        raise ProcessGoneError(f"process {pid} exited (or unmapped {vma.start:#x}) while its pagemap was read")
    present = (pm & np.uint64(proc.PM_PRESENT)) != 0
    swapped = (pm & np.uint64(proc.PM_SWAPPED)) != 0
    swapped &= (pm & np.uint64(PM_SWAP_TYPE_MASK)) != PTE_MARKER_TYPE
    if vma.kind == pb.FILE_PRIVATE:
        return (present & ((pm & np.uint64(proc.PM_FILE)) == 0)) | swapped
    return present | swapped


_local = threading.local()


def _chunk_buffer():
    """One CHUNK-sized copy buffer per thread, reused by every PageWriter: allocating
    (and zeroing) 4 MiB for each process of a tree cost ~3 ms per process."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = ctypes.create_string_buffer(CHUNK)
    return buf


@dataclass
class PageWriter:
    """Appends runs of a process's memory to its pages file, 4 KiB aligned."""
    pid: int
    fd: int
    offset: int = 0
    hasher: object = None    # an xxhash object fed every byte written (the inventory's digest)

    def __post_init__(self):
        self.buf = _chunk_buffer()
        self.addr = ctypes.addressof(self.buf)
        self.mem_fd = -1

    def copy(self, addr: int, length: int) -> int:
        """Copy one run; returns its offset in the file."""
        start = self.offset
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            try:
                got = vm_read(self.pid, self.addr, addr + done, n)
            except OSError as e:
                if e.errno not in (errno.EFAULT, errno.EIO):
                    raise
                got = self._read_forced(addr + done, n)
            if got < n:  # process_vm_readv stops at an unreadable page: finish forced
                got += self._read_forced(addr + done + got, n - got, into=got)
            self._emit(memoryview(self.buf).cast("B")[:n])
            done += n
        self.offset += length
        return start

    def copy_runs(self, runs: list[tuple[int, int]]) -> list[int]:
        """Copy many runs; returns each one's offset in the file. Small runs (scattered
        dirty pages of an incremental dump: ~26k single pages for 10% of 1 GiB) are
        gathered, up to IOV_MAX of them and CHUNK bytes, into one process_vm_readv with
        one remote iovec per run and one write, instead of two calls per run."""
        offsets: list[int] = []
        i = 0
        while i < len(runs):
            j, total = i, 0
            while j < len(runs) and j - i < IOV_MAX and total + runs[j][1] <= CHUNK:
                total += runs[j][1]
                j += 1
            if j - i <= 1:                      # a big run (or a lone one): as before
                offsets.append(self.copy(*runs[i]))
                i += 1
                continue
            batch = runs[i:j]
            iov = np.array(batch, dtype=np.uint64)
            got = vm_readv(self.pid, self.addr, total, iov.ctypes.data, len(batch))
            if got < total:  # an unreadable page (PROT_NONE, ...): /proc/PID/mem for the rest
                done = 0
                for addr, n in batch:
                    if done + n > got:
                        skip = max(got - done, 0)
                        self._read_forced(addr + skip, n - skip, into=done + skip)
                    done += n
            self._emit(memoryview(self.buf).cast("B")[:total])
            start = self.offset
            for _, n in batch:
                offsets.append(start)
                start += n
            self.offset = start
            i = j
        return offsets

    def _emit(self, view: memoryview) -> None:
        """The bytes just read, to the file (or a migration's connection), hashed on the way
        when `hasher` is set (a streamed page file's digest: engine/streamdump.py)."""
        if self.hasher is not None:
            self.hasher.update(view)
        w = 0
        while w < len(view):
            w += os.write(self.fd, view[w:])

    def _read_forced(self, addr: int, n: int, into: int = 0) -> int:
        """/proc/PID/mem ignores protections: PROT_NONE and exec-only pages."""
        if self.mem_fd < 0:
            self.mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        view = memoryview(self.buf).cast("B")[into:into + n]
        got = 0
        while got < n:
            try:
                k = os.preadv(self.mem_fd, [view[got:]], addr + got)
            except OSError:
                k = 0
            if k <= 0:  # nothing backs this page (beyond a file's end): zeros
                view[got:got + PAGE_SIZE] = bytes(min(PAGE_SIZE, n - got))
                k = min(PAGE_SIZE, n - got)
            got += k
        return n

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)


IOV_BATCH = 512
MAX_BATCH_BYTES = 1 << 30
ARRIVING_BATCH = 8 << 20


def _sliced(runs: list[pb.PageRun], pages: int) -> list[pb.PageRun]:
    """The same runs in pieces of at most `pages` pages."""
    out = []
    for r in runs:
        for k in range(0, r.nr_pages, pages):
            n = min(pages, r.nr_pages - k)
            out.append(pb.PageRun(vaddr=r.vaddr + k * PAGE_SIZE, nr_pages=n, offset=r.offset + k * PAGE_SIZE,
                                  in_parent=r.in_parent))
    return out


def fill_pages(t, fd: int, runs: list[pb.PageRun], progress=None, ready=None) -> None:
    """Have the restored process read its own pages from the page file (fd is its own).

    One copy, page cache to its memory, done by the kernel; consecutive runs are batched
    into one injected preadv, so a fragmented heap costs a few syscalls, not thousands.
    `ready(end)`: returns once the file holds its first `end` bytes (a file still arriving);
    reads then go in slices of ARRIVING_BATCH, so memory fills while the file arrives.
    """
    if ready:
        runs = _sliced(runs, ARRIVING_BATCH // PAGE_SIZE)
    i = 0
    while i < len(runs):
        batch = [runs[i]]
        total = runs[i].nr_pages * PAGE_SIZE
        limit = ARRIVING_BATCH if ready else MAX_BATCH_BYTES
        while (i + len(batch) < len(runs) and len(batch) < IOV_BATCH and total < limit
               and runs[i + len(batch)].offset == batch[-1].offset + batch[-1].nr_pages * PAGE_SIZE):
            batch.append(runs[i + len(batch)])
            total += batch[-1].nr_pages * PAGE_SIZE
        iov = b"".join(struct.pack("<QQ", r.vaddr, r.nr_pages * PAGE_SIZE) for r in batch)
        if ready:
            ready(batch[0].offset + total)
        got = t.sys("preadv", fd, t.put(iov), len(batch), batch[0].offset, check=False)
        if got != total:  # short or failed: finish run by run, so the error names a run
            done = max(got, 0)
            for r in batch:
                length = r.nr_pages * PAGE_SIZE
                skip = min(done, length)
                done -= skip
                while skip < length:
                    n = t.sys("pread64", fd, r.vaddr + skip, length - skip, r.offset + skip, check=False)
                    if n <= 0:
                        raise OSError(errno.EIO if n == 0 else -n,
                                      f"page file ends early or unreadable at run {r.vaddr:#x} "
                                      f"(offset {r.offset + skip})")
                    skip += n
        if progress:
            progress(total)
        i += len(batch)
