"""Issue 3's named applications: a sqlite3 writer checkpointed inside a transaction (its
locks and journal), and a client and server mid-conversation over a named Unix socket.
Each is stopped by a final checkpoint under `hpcckpt run`, resumed, and must end exactly
as an uninterrupted run does."""
import sqlite3
import sys

import pytest

from .helpers import PROGRAMS, reference
from .test_trees import interrupt_and_resume


def _lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _rows(db) -> list:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return list(con.iterdump())
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite_writer_inside_a_transaction(tmp_path, mode):
    """Rollback journal: the hot journal and the POSIX locks on the database; WAL: the
    -wal file and the -shm file the writer maps shared and locks."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    cmd = [sys.executable, PROGRAMS / "sqlite_writer.py", "w.db", 60, 0.03, mode]
    ref = reference([*cmd[:2], ref_dir / "w.db", *cmd[3:]], ref_dir / "out.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: _lines(out) >= 20)
    assert out.read_bytes() == ref
    assert ref.endswith(f"done {sum(range(60))} ok\n".encode())
    assert _rows(tmp_path / "w.db") == _rows(ref_dir / "w.db")


def test_unix_client_and_server_mid_conversation(tmp_path):
    """Answers queued in the client's socket at the checkpoint; the listener, bound to a
    path relative to its working directory, bound again to the same file."""
    cmd = [sys.executable, PROGRAMS / "unix_chat.py", "chat.sock", 60, 0.03]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = reference(["bash", "-c", f"cd {ref_dir} && {' '.join(map(str, cmd))}"], ref_dir / "out.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: _lines(out) >= 20)
    assert out.read_bytes() == ref
    assert b"served 60 client status 0" in ref
