"""Reading and writing one image set: a directory of framed messages and page files.

Every message file carries its own length and CRC, and the inventory (written last)
records the size and xxh3-128 digest of every other file, so damage anywhere is found
before a restore touches a process, and named by file.
"""
import errno
import os
import stat
import struct
import zlib
from pathlib import Path

import xxhash

from ..errors import ImageError, PermissionDeniedError
from . import FORMAT_VERSION, READABLE_VERSIONS, pb

MAGIC = b"HPCK"
_HEADER = struct.Struct("<4s4sII")
KINDS = {"inventory": b"INVT", "process": b"PROC", "pagemap": b"PMAP"}
_MSG_TYPES = {b"INVT": pb.Inventory, b"PROC": pb.Process, b"PMAP": pb.Pagemap}
INVENTORY = "inventory.img"


def digest_file(path: Path) -> pb.FileDigest:
    h = xxhash.xxh3_128()
    size = 0
    with os.fdopen(open_image_file(path, None), "rb", buffering=0) as f:
        # no bigger than the file: a fresh 8 MiB buffer costs ~2 ms (page faults, unmap),
        # 10x the hashing of a small process's 1 MiB page file, 3x per process restored
        buf = bytearray(min(8 << 20, os.fstat(f.fileno()).st_size + 1))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return pb.FileDigest(size=size, xxh3_128=h.hexdigest())


def open_image_file(path: Path, owner: int | None) -> int:
    """An image file opened for reading as a root restore must open a user's files: never
    through a symlink planted in its place (O_NOFOLLOW, relative to its directory), never
    blocking on a FIFO, a regular file, and for a user's image (`owner` not root) that
    user's own file, so a hard link to someone else's file or a directory swapped for
    another is refused too. Whoever reads the file reads this fd: what was opened is what
    the checks saw, whatever happens to the names afterwards."""
    path = Path(path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image directory {path.parent}: {e.strerror}") from None
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"image file {path} is a symlink: refused (an image holds regular files only)") from None
        if e.errno == errno.ENOENT:
            raise ImageError(f"image file {path} is missing") from None
        raise ImageError(f"cannot open image file {path}: {e.strerror}") from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError(f"image file {path} is not a regular file: refused")
    if owner and st.st_uid != owner:
        os.close(fd)
        raise PermissionDeniedError(f"image file {path} belongs to uid {st.st_uid}, not to the image's owner "
                                    f"(uid {owner}): refused")
    os.set_blocking(fd, True)
    return fd


class ImageSet:
    """An image directory; `create=True` makes it, refusing to overwrite an image set."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        # digests of files this process wrote whole, taken from the bytes as they were
        # written: seal() need not read them back (a tree's dump wrote hundreds)
        self.written: dict[str, pb.FileDigest] = {}
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            if (self.path / INVENTORY).exists():
                raise ImageError(f"{self.path} already holds an image set; choose an empty directory")
        elif not self.path.is_dir():
            raise ImageError(f"image directory {self.path} does not exist")

    # -- message files ---------------------------------------------------------------
    def write_message(self, name: str, kind: str, msg, sync: bool = True) -> None:
        """`sync=False`: the caller syncs the directory's files itself before sealing
        (a tree's dump syncs hundreds of files in one pass, not one fsync each); the
        file is then written in place, not through a temporary renamed: until the
        inventory seals the set, a half-written file is no image of anything."""
        payload = msg.SerializeToString()
        header = _HEADER.pack(MAGIC, KINDS[kind], len(payload), zlib.crc32(payload))
        data = header + payload
        if not sync:         # never through a symlink planted under the name
            fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            tmp = self.path / (name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        self.written[name] = pb.FileDigest(size=len(data), xxh3_128=xxhash.xxh3_128_hexdigest(data))

    def read_message(self, name: str, kind: str):
        path = self.path / name
        with os.fdopen(open_image_file(path, None), "rb") as f:    # never through a planted symlink
            data = f.read()
        if len(data) < _HEADER.size:
            raise ImageError(f"image file {path} is truncated ({len(data)} bytes, no header)")
        magic, tag, length, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ImageError(f"{path} is not an hpcckpt image file (bad magic {magic!r})")
        if tag != KINDS[kind]:
            raise ImageError(f"{path} holds a {tag!r} message where {KINDS[kind]!r} was expected")
        payload = data[_HEADER.size:]
        if len(payload) != length:
            raise ImageError(f"image file {path} is truncated: {len(payload)} of {length} payload bytes")
        if zlib.crc32(payload) != crc:
            raise ImageError(f"image file {path} is corrupt (CRC mismatch)")
        msg = _MSG_TYPES[tag]()
        try:
            msg.ParseFromString(payload)
        except Exception as e:  # protobuf's DecodeError and friends
            raise ImageError(f"image file {path} does not decode: {e}") from None
        return msg

    # -- the inventory -----------------------------------------------------------------
    def seal(self, inv: pb.Inventory) -> None:
        """Record every file's digest and write the inventory last: the set is complete."""
        with os.scandir(self.path) as it:   # one stat per file (a tree's dump wrote hundreds)
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:  # ours only: a store may keep files beside them
            if e.name != INVENTORY and e.name.endswith((".img", ".data")) and e.is_file():
                known = self.written.get(e.name)
                if known is None or known.size != e.stat().st_size:
                    known = digest_file(self.path / e.name)
                inv.digests[e.name].CopyFrom(known)
        inv.format_version = FORMAT_VERSION
        self.write_message(INVENTORY, "inventory", inv)

    def inventory(self) -> pb.Inventory:
        if not (self.path / INVENTORY).exists():
            raise ImageError(
                f"{self.path} has no {INVENTORY}: not an image set, or a dump that did not finish")
        inv = self.read_message(INVENTORY, "inventory")
        if inv.format_version not in READABLE_VERSIONS:
            raise ImageError(
                f"{self.path} is image format version {inv.format_version}; this hpcckpt reads "
                f"version {FORMAT_VERSION} (written by hpcckpt {inv.hpcckpt_version or 'unknown'})")
        return inv

    def verify(self, inv: pb.Inventory | None = None, digests: bool = True, skip=frozenset()) -> None:
        """Check every file the inventory names: present, full size, same digest (except
        `skip`: files still arriving, which the caller checks itself before anything runs)."""
        inv = inv or self.inventory()
        for name, d in sorted(inv.digests.items()):
            if name in skip:
                continue
            p = self.path / name
            if not p.exists():
                raise ImageError(f"image file {p} is missing")
            size = p.stat().st_size
            if size != d.size:
                raise ImageError(f"image file {p} has {size} bytes, the inventory says {d.size}: truncated or overwritten")
            if digests and digest_file(p).xxh3_128 != d.xxh3_128:
                raise ImageError(f"image file {p} is corrupt (xxh3-128 digest differs from the inventory)")

    def process(self, pid: int) -> pb.Process:
        return self.read_message(f"process-{pid}.img", "process")

    def pagemap(self, pid: int) -> pb.Pagemap:
        return self.read_message(f"pagemap-{pid}.img", "pagemap")
