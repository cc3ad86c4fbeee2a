"""Compressed stores: page files stored in independent frames, checked, and materialized
back into byte-identical plain files (with the parent chain) for the engine."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hpcckpt.store import (Checkpoint, Compression, CorruptDataError, MaterializeError, Store, StoreConfigError)
from hpcckpt.store.codec import DEFAULT_FRAME

from store_helpers import flip_byte

FRAME = DEFAULT_FRAME
CODECS = ["zstd", "zstd-1", "lz4"]


def page_bytes(seed: int, size: int) -> bytes:
    """Page-like data: zero pages, repeated structures and some random pages."""
    rnd = __import__("random").Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rnd.randrange(3)
        if kind == 0:
            out += bytes(4096)
        elif kind == 1:
            out += (seed.to_bytes(4, "little") + bytes(range(60))) * 64
        else:
            out += rnd.randbytes(4096)
    return bytes(out[:size])


def write_set(path: Path, seed: int, size: int = 2 * FRAME + 12345) -> dict[str, bytes]:
    """An engine-like image set; returns name -> content for comparison."""
    files = {
        "core-1.img": f"core {seed}\n".encode() * 10,
        f"pages-{seed}.img": page_bytes(seed, size),
        "pages-99.img": os.urandom(64 << 10),          # incompressible: stays plain
        "sub/digests-1.img": bytes(2 << 20),            # big non-page file: stays plain (engine reads it)
    }
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return files


def publish_set(store: Store, job: str, seed: int, parent: int | None = None, **kw) -> tuple[Checkpoint, dict]:
    w = store.begin(job, 0, parent=parent)
    files = write_set(w.path, seed, **kw)
    return w.publish({"nprocs": 1}), files


def plain_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "local-scratch"
    d.mkdir()
    monkeypatch.setenv("HPCCKPT_TMPDIR", str(d))
    return d


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(tmp_path: Path, tmpdir_env: Path, codec: str) -> None:
    store = Store(tmp_path / "s", compression=codec)
    assert json.loads((store.root / "STORE.json").read_text())["compression"] == codec.split("-")[0]
    ckpt, files = publish_set(store, "j", 7)
    stored = sorted(p.name for p in ckpt.path.rglob("*.img*"))
    suffix = ".zst" if codec.startswith("zstd") else ".lz4"
    assert f"pages-7.img{suffix}" in stored and "pages-99.img" in stored and "digests-1.img" in stored
    assert "pages-7.img" not in stored and "core-1.img" in stored          # small message files stay plain
    assert ckpt.extra["compression"] == Compression.parse(codec).label
    assert ckpt.extra["raw_bytes"] == sum(map(len, files.values()))
    assert ckpt.image_bytes < 0.8 * ckpt.extra["raw_bytes"]
    manifest = json.loads((ckpt.path / "MANIFEST.json").read_text())
    assert manifest["format"] == 2
    entry = next(f for f in manifest["files"] if f["name"] == f"pages-7.img{suffix}")
    assert len(entry["frames"]) == 3 and entry["raw_size"] == 2 * FRAME + 12345
    assert store.verify(ckpt) == [] and store.restore_candidate("j").seq == ckpt.seq
    with store.materialize(ckpt) as path:
        assert path.parent.parent == tmpdir_env and path.name == "00000001"
        assert plain_files(path) == files
    assert not any(tmpdir_env.iterdir())                                   # cleaned up


def test_reopen_uses_recorded_setting_and_refuses_another(tmp_path: Path) -> None:
    Store(tmp_path / "s", compression="zstd", level=5)
    again = Store(tmp_path / "s")
    assert again.compression == Compression("zstd", 5)
    assert Store(tmp_path / "s", compression="zstd-5").compression.level == 5
    with pytest.raises(StoreConfigError, match="compression zstd-5, not lz4.*set_compression"):
        Store(tmp_path / "s", compression="lz4")
    with pytest.raises(StoreConfigError, match="unknown compression 'gzip'"):
        Store(tmp_path / "t", compression="gzip")
    with pytest.raises(StoreConfigError, match="out of range"):
        Store(tmp_path / "t", compression="zstd", level=40)
    assert Store(tmp_path / "plain").compression == Compression()


def test_setting_change_keeps_old_checkpoints_readable(tmp_path: Path, tmpdir_env: Path) -> None:
    store = Store(tmp_path / "s", compression="lz4")
    c1, f1 = publish_set(store, "j", 1)
    store.set_compression("none")
    c2, f2 = publish_set(store, "j", 2, parent=1)
    assert not list(c2.path.glob("*.lz4")) and json.loads((c2.path / "MANIFEST.json").read_text())["format"] == 1
    assert Store(tmp_path / "s").compression == Compression()
    with store.materialize(c2) as path:            # a mixed chain: everything goes to plain dirs
        assert plain_files(path) == f2 and plain_files(path.parent / "00000001") == f1


def test_flipped_byte_in_compressed_file(tmp_path: Path, tmpdir_env: Path, caplog) -> None:
    store = Store(tmp_path / "s", compression="zstd")
    good, files = publish_set(store, "j", 1)
    bad, _ = publish_set(store, "j", 2)
    flip_byte(bad.path / "pages-2.img.zst", 5000)
    problems = store.verify(bad)
    assert problems and "j/00000002: file pages-2.img.zst fails its xxh3_128 checksum" in problems[0]
    with pytest.raises(CorruptDataError, match=r"checkpoint j/00000002: file pages-2.img.zst"):
        store.materialize(bad)
    assert not any(tmpdir_env.iterdir())          # a failed materialize leaves nothing behind
    cand = store.restore_candidate("j")
    assert cand.seq == 1 and cand.skipped[0][0] == 2
    with store.materialize(cand) as path:
        assert plain_files(path) == files


def test_corruption_caught_even_without_verify(tmp_path: Path, tmpdir_env: Path) -> None:
    """Damage that keeps the stored digest out of the loop (manifest frame index lies)
    still fails decoding with a message naming the file."""
    store = Store(tmp_path / "s", compression="zstd")
    c, _ = publish_set(store, "j", 1)
    p = c.path / "pages-1.img.zst"
    data = bytearray(p.read_bytes())
    data[-10:] = bytes(10)
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="pages-1.img.zst"):
        store.materialize(c)


def test_chain_materialize(tmp_path: Path, tmpdir_env: Path) -> None:
    store = Store(tmp_path / "s", compression="zstd-1")
    c1, f1 = publish_set(store, "j", 1, size=FRAME // 2)
    c2, f2 = publish_set(store, "j", 2, parent=1, size=FRAME // 3)
    c3, f3 = publish_set(store, "j", 3, parent=2, size=FRAME + 4096)
    m = store.materialize(c3)
    with m as path:
        assert [p.name for p in m.chain] == ["00000001", "00000002", "00000003"]
        assert m.chain[-1] == path and all(p.parent == path.parent for p in m.chain)
        assert [plain_files(p) for p in m.chain] == [f1, f2, f3]
        assert [c.seq for c in m.checkpoints] == [1, 2, 3] and m.checkpoints[0].path == m.chain[0]
    assert not path.parent.exists()


def test_dest_dir_and_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "s", compression="lz4")
    c, files = publish_set(store, "j", 1)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with store.materialize(c, dest) as path:
        assert path == dest / "00000001" and plain_files(path) == files
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]   # only what materialize wrote is removed

    class Full:
        f_bavail, f_frsize = 10, 4096
    monkeypatch.setattr(os, "statvfs", lambda p: Full())
    with pytest.raises(MaterializeError, match=r"j/00000001 needs 0.0\d GiB in .*HPCCKPT_TMPDIR"):
        store.materialize(c, tmp_path / "other")


def test_uncompressed_store_materializes_in_place(store: Store) -> None:
    w = store.begin("j", 0)
    files = write_set(w.path, 1)
    c = w.publish({})
    m = store.materialize(c)
    with m as path:
        assert path == c.path and not m.copied
    assert c.path.is_dir() and {k: v for k, v in plain_files(c.path).items() if k in files} == files


def test_compact_compressed_chain(tmp_path: Path, tmpdir_env: Path) -> None:
    store = Store(tmp_path / "s", compression="zstd")
    publish_set(store, "j", 1)
    tip, _ = publish_set(store, "j", 2, parent=1)
    seen: list[list[str]] = []

    def merge(chain: list[Checkpoint], out: Path) -> None:      # newer files win, as the engine's would
        seen.append([p.name for c in chain for p in c.path.iterdir()])
        for c in chain:
            for f in c.path.rglob("*"):
                if f.is_file():
                    (out / f.relative_to(c.path)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, out / f.relative_to(c.path))

    new = store.compact_job("j", merge)
    assert new.seq == 2 and new.parent is None and new.compacted_from == (1,)
    assert not any(n.endswith((".zst", ".lz4")) for names in seen for n in names)   # engine saw plain files
    assert (new.path / "pages-1.img.zst").exists() and store.verify(new) == []
    with store.materialize(new) as path:
        names = sorted(plain_files(path))
    assert "pages-1.img" in names and "pages-2.img" in names
    assert not any(tmpdir_env.iterdir())


def test_compact_job_without_checkpoints(store: Store) -> None:
    from hpcckpt.store import CheckpointNotFoundError
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        store.compact_job("nothing", lambda chain, out: None)


def test_commands(tmp_path: Path, tmpdir_env: Path) -> None:
    from hpcckpt.store import commands
    store = Store(tmp_path / "s", compression="zstd")
    c1, f1 = publish_set(store, "j", 1)
    c2, f2 = publish_set(store, "j", 2, parent=1)
    with commands.restore_images(store.root, "j") as path:
        assert plain_files(path) == f2 and plain_files(path.parent / "00000001") == f1
    with commands.restore_images(store.root, "j", 1) as path:
        assert plain_files(path) == f1
    flip_byte(c2.path / "pages-2.img.zst", 100)
    with pytest.raises(Exception, match="00000002 is damaged"):
        commands.restore_images(store.root, "j", 2)
    m = commands.restore_images(store.root, "j")
    with m as path:
        assert path.name == "00000001" and m.checkpoints[-1].skipped[0][0] == 2
    assert "2 checkpoints" in commands.catalog_rebuild(store.root)
    assert "already standalone" in commands.compact(store.root, "j", lambda ch, out: None, 1)
    assert not any(tmpdir_env.iterdir())
