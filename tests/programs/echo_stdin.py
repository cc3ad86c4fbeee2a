"""Blocked in read() on stdin (a pipe from outside): each line comes back upper-cased."""
import sys

n = 0
for line in sys.stdin:
    n += 1
    print(f"{n} {line.strip().upper()}", flush=True)
print("done", n, flush=True)
