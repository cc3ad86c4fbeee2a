"""A tree of every shape `ps` can tell apart, which sits still until GO_FILE exists.

Usage: ps_tree.py GO_FILE

  root (keeps the session and group it was started in) with a helper thread
  ├── A      leads a session of its own (setsid)
  │   ├── A1 leads a process group inside A's session (setpgid(0, 0))
  │   ├── A2 joins A1's group (setpgid(0, A1))
  │   └── AZ zombie: killed by SIGTERM, never waited for until the end
  ├── G      leads a group in root's session; G1, its child, in G's group
  ├── Z      zombie: exit status 5
  ├── T      forked by root's helper thread (a child of a thread)
  ├── M      two threads; M's second thread forks M1 (a child of a thread)
  ├── C      exits at once, leaving O (root's session) and OS (setsid) behind:
  O, OS      orphans, adopted by the namespace's init
  ├── X      a daemon's start: setsid, forks DM and exits (reaped by root):
  DM         an orphan in a session (and group) whose leader is gone, with a child DM1
  └── P      holds a pty's master; its child PT leads a session with the slave as
             controlling terminal, and PT's child PT1 (a group of its own) is its foreground
Each process prints "ready NAME" once in place and, when GO_FILE shows up, a line of
True/False checks of its relations before it exits; every parent waits for its
children (zombies last), so the output is the same however the tree is interrupted.
"""
import fcntl
import os
import signal
import sys
import threading
import time

go = sys.argv[1]


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())   # one write: lines from processes never mix


def wait_go() -> None:
    while not os.path.exists(go):
        time.sleep(0.02)


def child(name: str, body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def leaf(name: str, check, setup=None):
    def body():
        if setup:
            setup()
        say(f"ready {name}")
        wait_go()
        say(f"{name} {check()}")
    return body


root = os.getpid()
root_sid, root_pgid = os.getsid(0), os.getpgid(0)
r_fd, w_fd = os.pipe()             # the orphans hold the write end: EOF says they are done


def a_body():
    os.setsid()
    a = os.getpid()
    a1 = child("A1", leaf("A1", lambda: (os.getppid() == a, os.getsid(0) == a, os.getpgid(0) == os.getpid()),
                          lambda: os.setpgid(0, 0)))
    while True:                    # A2 may only join A1's group once A1 leads it
        try:
            if os.getpgid(a1) == a1:
                break
        except ProcessLookupError:
            break
        time.sleep(0.01)
    a2 = child("A2", leaf("A2", lambda: (os.getppid() == a, os.getsid(0) == a, os.getpgid(0) == a1),
                          lambda: os.setpgid(0, a1)))
    az = child("AZ", lambda: signal.pause())
    os.kill(az, signal.SIGTERM)
    os.waitid(os.P_PID, az, os.WEXITED | os.WNOWAIT)   # a zombie now, left unreaped
    say("ready A")
    wait_go()
    os.waitpid(a1, 0), os.waitpid(a2, 0)
    _, st = os.waitpid(az, 0)
    say(f"A {(os.getppid() == root, os.getsid(0) == a, os.getpgid(0) == a)} AZ {os.waitstatus_to_exitcode(st)}")


def g_body():
    os.setpgid(0, 0)
    g = os.getpid()
    g1 = child("G1", leaf("G1", lambda: (os.getppid() == g, os.getsid(0) == root_sid, os.getpgid(0) == g)))
    say("ready G")
    wait_go()
    os.waitpid(g1, 0)
    say(f"G {(os.getppid() == root, os.getsid(0) == root_sid, os.getpgid(0) == g)}")


def m_body():
    m = os.getpid()
    kid = []
    t = threading.Thread(target=lambda: kid.append(child("M1", leaf(
        "M1", lambda: (os.getppid() == m, os.getsid(0) == root_sid)))))
    t.start()
    t.join()
    spin = threading.Thread(target=wait_go, daemon=True)   # M stays multithreaded
    spin.start()
    say("ready M")
    wait_go()
    os.waitpid(kid[0], 0)
    say(f"M {(os.getppid() == root, threading.active_count() >= 1)}")


def c_body():
    os.close(r_fd)
    child("O", leaf("O", lambda: (os.getppid() == 1, os.getsid(0) == root_sid)))
    child("OS", leaf("OS", lambda: (os.getppid() == 1, os.getsid(0) == os.getpid()), os.setsid))


def x_body():
    os.setsid()

    def dm_body():
        sid = os.getsid(0)
        dm = os.getpid()
        dm1 = child("DM1", leaf("DM1", lambda: (os.getppid() == dm, os.getsid(0) == sid, os.getpgid(0) == sid)))
        say("ready DM")
        wait_go()
        os.waitpid(dm1, 0)
        say(f"DM {(os.getppid() == 1, os.getsid(0) == sid != dm, os.getpgid(0) == sid)}")
    child("DM", dm_body)


def p_body():
    m, s = os.openpty()

    def pt_body():
        os.close(m)
        os.setsid()
        fcntl.ioctl(s, 0x540E, 0)                    # TIOCSCTTY
        pt = os.getpid()
        pt1 = child("PT1", leaf("PT1", lambda: (os.getsid(0) == pt, os.tcgetpgrp(s) == os.getpgrp() == os.getpid()),
                                lambda: os.setpgid(0, 0)))
        while os.getpgid(pt1) != pt1:
            time.sleep(0.01)
        os.tcsetpgrp(s, pt1)
        say("ready PT")
        wait_go()
        os.waitpid(pt1, 0)
        say(f"PT {(os.getsid(0) == pt, os.tcgetpgrp(s) == pt1, os.ttyname(s).startswith('/dev/pts/'))}")
    ptc = child("PT", pt_body)
    os.close(s)
    say("ready P")
    wait_go()
    os.waitpid(ptc, 0)
    say(f"P {os.getppid() == root}")


pids = {"A": child("A", a_body), "P": child("P", p_body), "G": child("G", g_body), "M": child("M", m_body)}
z = os.fork()
if z == 0:
    os._exit(5)
c = child("C", c_body)
x = child("X", x_body)
os.close(w_fd)
os.waitpid(c, 0)
os.waitpid(x, 0)
tkid = []
helper = threading.Thread(target=lambda: tkid.append(child("T", leaf(
    "T", lambda: (os.getppid() == root, os.getsid(0) == root_sid)))))
helper.start()
helper.join()
idle = threading.Thread(target=wait_go, daemon=True)       # root stays multithreaded
idle.start()
say("ready root")
wait_go()
for name, pid in pids.items():
    os.waitpid(pid, 0)
os.waitpid(tkid[0], 0)
_, st = os.waitpid(z, 0)
while os.read(r_fd, 1):
    pass
say(f"root {(os.getsid(0) == root_sid, os.getpgid(0) == root_pgid)} Z {os.waitstatus_to_exitcode(st)}")
