"""mariadbd under `hpcckpt run --tcp-established`, with a `mariadb` client connected over
TCP holding a session: a temporary table, a user variable and an open transaction with
uncommitted rows. The server is checkpointed and killed (the final signal) and resumed;
the same client connection goes on with its session, commits, and every answer it gets
equals those of the same session run uninterrupted (a reference client, same server,
another database); a second client sees the committed data with equal checksums.

mariadbd reserves 8 TiB of address space for its buffer pool's largest size
(engine/memory.py `_sparse_runs`); `run` takes full checkpoints of it (dirty-page
tracking of such a reservation is not bounded yet) and says so."""
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import RunJob, apt_install, free_port, lock_tables, wait_for

ROWS = 3000
# (before the checkpoint, after it): one session's statements, each batch ending with a marker
BEFORE = [
    "CREATE TABLE IF NOT EXISTS k (id INT PRIMARY KEY, v VARCHAR(64), n BIGINT) ENGINE=InnoDB",
    "CREATE TEMPORARY TABLE tmp (a INT, s VARCHAR(32))",
    "INSERT INTO tmp VALUES " + ",".join(f"({i}, 'tmp-{i * 7}')" for i in range(200)),
    "SET @x = 4242, @label = 'session kept'",
    "INSERT INTO k VALUES " + ",".join(f"({i}, 'committed-{i}', {i * i})" for i in range(ROWS)),
    "BEGIN",
    "INSERT INTO k VALUES " + ",".join(f"({ROWS + i}, 'in-transaction-{i}', {i * 3})" for i in range(500)),
    "UPDATE k SET n = n + 1 WHERE id % 7 = 0",
    "SELECT COUNT(*), SUM(n) FROM k",
]
AFTER = [
    "SELECT @x, @label",
    "SELECT COUNT(*), SUM(a), MAX(s) FROM tmp",
    "SELECT COUNT(*), SUM(n) FROM k",                       # sees its own uncommitted rows
    "INSERT INTO k SELECT a + 100000, s, a FROM tmp",
    "COMMIT",
    "SELECT COUNT(*), SUM(n), MD5(GROUP_CONCAT(id, v, n ORDER BY id)) FROM k",
    "CHECKSUM TABLE k",
]


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    """An initialized data directory of our own (copied per test)."""
    apt_install(["mariadb-server", "mariadb-client"], ["/usr/sbin/mariadbd", "mariadb", "mariadb-install-db"])
    base = tmp_path_factory.mktemp("mariadb-base")
    res = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={base / 'data'}", "--user=root",
                          "--auth-root-authentication-method=normal", "--skip-test-db"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return base / "data"


class Client:
    """The `mariadb` command-line client on one TCP connection, fed statement batches on
    stdin; each batch ends with a marker so its answers can be read back."""

    def __init__(self, port: int, database: str = ""):
        self.p = subprocess.Popen(["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{port}", "-uroot", "--protocol=TCP",
                                   "-B", "-N", "--unbuffered", *([database] if database else [])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1)

    def run(self, statements: list[str]) -> list[str]:
        self.p.stdin.write("".join(s + ";\n" for s in statements) + "SELECT 'END-OF-BATCH';\n")
        self.p.stdin.flush()
        out = []
        while True:
            line = self.p.stdout.readline()
            assert line, f"the client ended: {out}"
            if line.strip() == "END-OF-BATCH":
                return out
            assert not line.startswith("ERROR"), line
            out.append(line.rstrip("\n"))

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def server(tmp_path: Path, datadir: Path, port: int) -> list:
    (tmp_path / "tmp").mkdir()
    return ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root", f"--port={port}",
            "--bind-address=127.0.0.1", f"--socket={tmp_path / 'mysqld.sock'}", f"--pid-file={tmp_path / 'mysqld.pid'}",
            f"--log-error={tmp_path / 'mysqld.err'}", f"--tmpdir={tmp_path / 'tmp'}", "--skip-name-resolve",
            "--innodb-use-native-aio=0", "--innodb-buffer-pool-size=32M", "--performance-schema=0",
            "--skip-log-bin", "--max-connections=20"]


def test_mariadb_session_survives(tmp_path, mariadb):
    datadir = tmp_path / "data"
    subprocess.run(["cp", "-a", mariadb, datadir], check=True)
    port = free_port()
    job = RunJob(tmp_path / "img", server(tmp_path, datadir, port), tmp_path / "run.txt")
    clients: list[Client] = []
    try:
        job.start()
        err = tmp_path / "mysqld.err"
        wait_for(lambda: err.exists() and "ready for connections" in err.read_text(), "mariadbd to start",
                 timeout=60, alive=(job.mon,))
        admin = Client(port)
        clients.append(admin)
        admin.run(["CREATE DATABASE ref", "CREATE DATABASE t"])
        ref = Client(port, "ref")                     # the uninterrupted session
        clients.append(ref)
        want = ref.run(BEFORE) + ref.run(AFTER)
        ref.close()

        s = Client(port, "t")
        clients.append(s)
        conn_id = s.run(["SELECT CONNECTION_ID()"])
        got = s.run(BEFORE)
        job.checkpoint_and_stop()
        assert "full checkpoints only" in job.said(), job.said()
        assert lock_tables(job.pids[-1]), "no network lock while the server is away"
        time.sleep(0.3)
        job.resume()
        assert s.run(["SELECT CONNECTION_ID()"]) == conn_id          # the same connection, same session
        got += s.run(AFTER)
        assert got == [x.replace("ref.k", "t.k") for x in want]

        second = Client(port)
        clients.append(second)
        a = second.run(["CHECKSUM TABLE t.k", "SELECT COUNT(*), SUM(n) FROM t.k"])
        b = second.run(["CHECKSUM TABLE ref.k", "SELECT COUNT(*), SUM(n) FROM ref.k"])
        assert a == [x.replace("ref.k", "t.k") for x in b] and a[1] == f"{ROWS + 700}\t{a[1].split()[1]}", (a, b)
        for c in clients:
            c.close()
        wait_for(lambda: not lock_tables(job.pids[-1]), "the lock to be removed", timeout=10)
    finally:
        for c in clients:
            c.close()
        job.stop()
