"""numpy with OpenBLAS threads doing matrix products. Usage: blas.py STEPS SLEEP"""
import sys
import time

import numpy as np

steps, pause = int(sys.argv[1]), float(sys.argv[2])
rng = np.random.default_rng(7)
a = rng.standard_normal((256, 256))
for step in range(steps):
    a = np.tanh(a @ a.T / 256.0 + 0.01 * step)
    print(f"step {step} {a.sum().hex()} {float(np.linalg.norm(a)).hex()}", flush=True)
    time.sleep(pause)
print("done", flush=True)
