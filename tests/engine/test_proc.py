"""kernel/proc.py's smaps parse: the block-at-a-time reading equals the line-by-line one
on real processes, and gives way to it where a block is laid out otherwise."""
import os

from hpcckpt.kernel import proc

from tests.tracking.helpers import Target


def _lines(pid) -> list[str]:
    with open(f"/proc/{pid}/smaps") as f:
        return f.read().splitlines()


def test_smaps_blocks_equal_the_line_parse():
    t = Target()
    try:
        buf = t.alloc(64)
        t.write(buf, 10)                  # anonymous pages in a mapping of its own
        for pid in (os.getpid(), t.pid):
            lines = _lines(pid)
            fast = proc._smaps_by_block(lines)
            assert fast is not None and fast == proc._parse_maps(lines)
            assert any(v.anon_kb for v in fast) and all(v.vmflags for v in fast)
        assert next(v for v in proc.maps(t.pid) if v.start <= buf < v.end).anon_kb >= 40
    finally:
        t.close()


def test_smaps_block_laid_out_otherwise_is_parsed_line_by_line():
    lines = _lines(os.getpid())
    size = next(i for i, line in enumerate(lines) if line.startswith("VmFlags:")) + 1
    anon = next(i for i in range(size) if lines[i].startswith("Anonymous:"))
    longer = lines[:size + 1] + ["ProtectionKey:         0"] + lines[size + 1:]
    moved = list(lines)       # the second block's Anonymous line one further down
    moved[size + anon], moved[size + anon + 1] = moved[size + anon + 1], moved[size + anon]
    for odd in (longer, moved):
        assert proc._smaps_by_block(odd) is None
        assert proc._parse_maps(odd) == proc._parse_maps(lines)
