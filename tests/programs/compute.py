"""A deterministic CPython computation: floats, dicts, big ints. Usage: compute.py STEPS SLEEP"""
import hashlib
import math
import random
import sys
import time

steps, pause = int(sys.argv[1]), float(sys.argv[2])
rng = random.Random(42)
total, table, big = 0.0, {}, 1
for step in range(steps):
    for _ in range(20000):
        total += math.sin(rng.random() * 1e3)
    table[step] = total
    big = big * 3 + step
    digest = hashlib.sha256(repr(sorted(table.items())).encode()).hexdigest()[:16]
    print(f"step {step} {total!r} {big % 1000003} {digest}", flush=True)
    time.sleep(pause)
print("done", flush=True)
