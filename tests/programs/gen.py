"""A slow, deterministic producer for pipelines: CHUNKS chunks of text, PAUSE s apart.
Usage: gen.py CHUNKS PAUSE"""
import sys
import time

chunks, pause = int(sys.argv[1]), float(sys.argv[2])
out = sys.stdout.buffer
x = 12345
for c in range(chunks):
    lines = []
    for i in range(2000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        lines.append(b"%d %d %x %s\n" % (c, i, x, b"abcdefghij"[x % 10:] * (x % 7)))
    out.write(b"".join(lines))
    out.flush()
    time.sleep(pause)
