"""A tree with a session, a process group, a zombie and an orphan; every process checks
its relations each step and prints them. Usage: tree_shape.py STEPS PAUSE"""
import os
import sys
import time

steps, pause = int(sys.argv[1]), float(sys.argv[2])
out = sys.stdout


def say(line):
    os.write(1, (line + "\n").encode())   # one write: lines from processes never mix


def loop(name, check):
    for k in range(steps):
        say(f"{name} {k} {check()}")
        time.sleep(pause)


root = os.getpid()
a = os.fork()
if a == 0:                       # A: leads a session of its own
    os.setsid()
    me = os.getpid()
    a1 = os.fork()
    if a1 == 0:                  # A1: its own group inside A's session
        os.setpgid(0, 0)
        loop("A1", lambda: (os.getppid() == me, os.getsid(0) == me, os.getpgid(0) == os.getpid()))
        os._exit(0)
    loop("A", lambda: (os.getppid() == root, os.getsid(0) == me, os.getpgid(0) == me))
    os.waitpid(a1, 0)
    os._exit(0)
b = os.fork()
if b == 0:                       # B: exits at once and stays a zombie until the end
    os._exit(7)
r, w = os.pipe()                 # C1 holds the write end: EOF tells P it has finished
c = os.fork()
if c == 0:                       # C: leaves an orphan C1 behind, which init adopts
    if os.fork() == 0:
        os.close(r)
        time.sleep(0.3)
        loop("C1", lambda: (os.getppid() == 1, os.getsid(0) == os.getsid(root)))
        os._exit(0)
    os._exit(0)
os.close(w)
os.waitpid(c, 0)
loop("P", lambda: (os.getsid(0) != root,))
os.waitpid(a, 0)
_, status = os.waitpid(b, 0)
say(f"B exited {os.waitstatus_to_exitcode(status)}")
while os.read(r, 1):             # C1 finishes before the job (and its namespace) ends
    pass
say("done")
