"""State the restore must carry: a pipe inside the process with unread data, a deleted
temporary file, a file read at an offset, signal handlers. Usage: pipes.py STEPS SLEEP DATAFILE"""
import os
import signal
import sys
import tempfile
import time

steps, pause, datafile = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
r, w = os.pipe()
os.write(w, b"pipe-payload " * 50)
tmp = tempfile.TemporaryFile()
tmp.write(b"deleted-file-content\n" * 100)
src = open(datafile, "rb")
src.seek(7)
hits = []
signal.signal(signal.SIGUSR2, lambda s, f: hits.append(s))
for step in range(steps):
    print(f"step {step} {src.read(3)!r}", flush=True)
    time.sleep(pause)
os.kill(os.getpid(), signal.SIGUSR2)
os.close(w)
tmp.seek(0)
print(len(os.read(r, 1 << 16)), tmp.read().count(b"content"), hits, flush=True)
print("done", flush=True)
