"""A multiprocessing Pool (fork; pipes, locks and semaphores in shared memory, helper
threads) computing a known result. Usage: pool.py TASKS PAUSE"""
import hashlib
import multiprocessing as mp
import sys
import time


def work(i):
    time.sleep(PAUSE)
    return i, hashlib.sha256(str(i).encode() * 1000).hexdigest()[:16]


PAUSE = float(sys.argv[2])
if __name__ == "__main__":
    mp.set_start_method("fork")
    with mp.Pool(2) as pool:
        for i, h in pool.imap(work, range(int(sys.argv[1]))):
            print(i, h, flush=True)
    print("done", flush=True)
