"""A minimal terminal emulator: runs a program on a fresh pty whose master it holds.

Usage: pty_harness.py KEYS LOG -- PROGRAM ARGS...

The program leads a session of its own with the pty's slave as controlling terminal
and stdio. Whatever is appended to the file KEYS is typed into the terminal (written
to the master); everything the terminal shows (read from the master) is appended to
LOG. The harness ends when the program does, printing its exit status to LOG.
"""
import fcntl
import os
import select
import struct
import sys
import termios

keys, log = sys.argv[1], sys.argv[2]
cmd = sys.argv[sys.argv.index("--") + 1:]
master, slave = os.openpty()
fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("<4H", 31, 97, 0, 0))
pid = os.fork()
if pid == 0:
    os.close(master)
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)
    os.execvp(cmd[0], cmd)
os.close(slave)
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
typed = 0
status = None
while status is None:
    if select.select([master], [], [], 0.02)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:              # EIO: the slave side is closed everywhere
            data = b""
        os.write(out, data)
    try:
        with open(keys, "rb") as f:
            f.seek(typed)
            new = f.read()
    except FileNotFoundError:
        new = b""
    if new:
        os.write(master, new)
        typed += len(new)
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = st
while select.select([master], [], [], 0.05)[0]:
    try:
        data = os.read(master, 65536)
    except OSError:
        break
    if not data:
        break
    os.write(out, data)
os.write(out, f"\n[exit {os.waitstatus_to_exitcode(status)}]\n".encode())
