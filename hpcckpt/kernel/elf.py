"""The GNU build-id of an ELF file: how a restore elsewhere knows a library is the same."""
import struct

NT_GNU_BUILD_ID = 3
PT_NOTE = 4


def build_id(path: str) -> str:
    """Hex build-id, or "" for a file that is not a 64-bit ELF or has none."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2:
                return ""
            phoff, = struct.unpack_from("<Q", hdr, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
            f.seek(phoff)
            phdrs = f.read(phentsize * phnum)
            for i in range(phnum):
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", phdrs, i * phentsize)
                if p_type != PT_NOTE:
                    continue
                f.seek(p_offset)
                notes = f.read(min(p_filesz, 4096))
                pos = 0
                while pos + 12 <= len(notes):
                    namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                    pos += 12
                    name = notes[pos:pos + namesz]
                    pos += (namesz + 3) & ~3
                    desc = notes[pos:pos + descsz]
                    pos += (descsz + 3) & ~3
                    if ntype == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU":
                        return desc.hex()
    except OSError:
        return ""
    return ""
