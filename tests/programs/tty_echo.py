"""Talks with its terminal: answers each line typed, reporting what it knows about the
terminal each time (name, size, whether it is the foreground, line mode), so a restore
that got any of it wrong shows in the transcript. Ends on the line "quit".
Usage: tty_echo.py"""
import fcntl
import os
import struct
import sys
import termios

n = 0
tty = os.open("/dev/tty", os.O_WRONLY)               # the controlling terminal, by its alias
print(f"hello from a pty: {os.ttyname(0).startswith('/dev/pts/')}", flush=True)
for line in sys.stdin:
    line = line.rstrip("\n")
    n += 1
    rows, cols = struct.unpack("<4H", fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))[:2]
    fg = os.tcgetpgrp(0) == os.getpgrp()
    canon = bool(termios.tcgetattr(0)[3] & termios.ICANON)
    sid = struct.unpack("<i", fcntl.ioctl(0, 0x5429, bytes(4)))[0]   # TIOCGSID: stdin is our ctty
    same = sid == os.getsid(0)
    print(f"#{n} {line[::-1]} size={rows}x{cols} fg={fg} canon={canon} ctty={same}", flush=True)
    os.write(tty, f"via /dev/tty {n}\n".encode())
    if line == "quit":
        break
