"""One process holding both sides of a pty, with bytes queued in each direction and
unusual settings, until GO_FILE exists; then it reads everything back and reports.
Usage: pty_queues.py GO_FILE

Queued at the checkpoint: output written on the slave side that the master has not read
(processed by the line discipline: "\\n" became "\\r\\n"), the echo of typed input, a
complete input line and a partial one typed into the master and not read by the slave.
The report shows each byte as read, the terminal's settings, window size, packet mode
and the pty's path, so anything a restore changes or duplicates differs from a run
without a checkpoint.
"""
import fcntl
import os
import select
import struct
import sys
import termios
import time

TIOCPKT, TIOCGPKT = 0x5420, 0x80045438
go = sys.argv[1]
m, s = os.openpty()
attrs = termios.tcgetattr(s)
attrs[3] |= termios.ECHO | termios.ICANON | termios.ECHOCTL
attrs[6][termios.VERASE] = b"#"
termios.tcsetattr(s, termios.TCSANOW, attrs)
fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("<4H", 43, 121, 800, 600))
fcntl.ioctl(m, TIOCPKT, struct.pack("<i", 1))
name = os.ttyname(s)
os.write(s, b"out\nput \x01 bytes")           # output queue
os.write(m, b"first line\npar#rtial")          # input queue: a line and a partial one
time.sleep(0.2)                                # the line discipline takes input in a worker
print(f"ready {name}", flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
got = b""
while select.select([m], [], [], 0.2)[0]:
    chunk = os.read(m, 4096)
    got += chunk[1:]                           # packet mode: a status byte per read
os.write(m, b" end\n")
fcntl.fcntl(s, fcntl.F_SETFL, os.O_NONBLOCK)
lines = []
deadline = time.monotonic() + 5
while len(lines) < 2 and time.monotonic() < deadline:
    try:
        lines.append(os.read(s, 4096))
    except BlockingIOError:
        time.sleep(0.01)
pkt = struct.unpack("<i", fcntl.ioctl(m, TIOCGPKT, bytes(4)))[0]
a = termios.tcgetattr(s)
ws = struct.unpack("<4H", fcntl.ioctl(s, termios.TIOCGWINSZ, bytes(8)))
print(f"master read {got!r}")
print(f"slave read {lines!r}")
print(f"flags {a[:4]} erase {a[6][termios.VERASE]!r} winsize {ws} packet {pkt}")
print(f"name {os.ttyname(s)}")              # as the kernel names it now
