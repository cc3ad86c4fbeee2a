"""A 2-D heat-diffusion solver (explicit finite differences on a 1024x1024 grid).

Prints its progress and, at the end, the grid's total heat and a digest of the field:
an interrupted-and-resumed run must print exactly what an uninterrupted one prints.
Usage: heat.py [STEPS]
"""
import hashlib
import sys

import numpy as np

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
n = 1024
u = np.zeros((n, n))
u[n // 4: n // 2, n // 4: n // 2] = 100.0       # a hot square
u[3 * n // 5: 4 * n // 5, n // 2: 7 * n // 8] = 50.0
alpha = 0.2
for step in range(1, steps + 1):
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    u[1:-1, 1:-1] += alpha * lap
    if step % (steps // 20) == 0:
        print(f"step {step:5d}  total heat {float(u.sum())!r}  max {float(u.max())!r}", flush=True)
print(f"answer: total heat {float(u.sum())!r}, field sha256 {hashlib.sha256(u.tobytes()).hexdigest()}", flush=True)
