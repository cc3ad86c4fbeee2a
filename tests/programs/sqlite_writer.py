"""A sqlite3 writer: each transaction holds the database lock across a pause, so a
checkpoint lands inside one. Usage: sqlite_writer.py DB ROWS PAUSE JOURNAL_MODE"""
import hashlib
import sqlite3
import sys
import time

db, rows, pause, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
con = sqlite3.connect(db, isolation_level=None)
print("journal", con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0], flush=True)
con.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
con.execute("CREATE TABLE c (k INTEGER PRIMARY KEY, total INTEGER)")
con.execute("INSERT INTO c VALUES (0, 0)")
for i in range(rows):
    con.execute("BEGIN IMMEDIATE")          # the write lock, held across the pause
    con.execute("INSERT INTO t VALUES (?, ?)", (i, hashlib.sha256(str(i).encode()).hexdigest() * 16))
    time.sleep(pause)
    con.execute("UPDATE c SET total = total + ? WHERE k = 0", (i,))
    con.execute("COMMIT")
    print("row", i, flush=True)
total = con.execute("SELECT total FROM c").fetchone()[0]
print("done", total, con.execute("PRAGMA integrity_check").fetchone()[0], flush=True)
