/* Kernel objects a checkpoint must carry: POSIX timers (and setitimer), file locks,
 * eventfd / timerfd / signalfd (shared with a child).
 * usage: kobjects timers|locks|lease|fds STEPS STEP_MS [DIR]
 * Output is deterministic: work results per step, and at the end whether the objects
 * still behave (ticks kept arriving, locks still held, counters consistent). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t rt_ticks, tid_ticks, alrm_ticks, bad;
static int steps, step_ms;

static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    if (si->si_code != SI_TIMER || si->si_value.sival_int != (sig == SIGRTMIN ? 42 : 43)) bad = 1;
    if (sig == SIGRTMIN) rt_ticks++; else tid_ticks++;
}
static void on_alrm(int sig) { (void)sig; alrm_ticks++; }

static void nap(int ms) {   /* sleeps through signal interruptions */
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static uint64_t work(int i) {   /* deterministic step result */
    uint64_t h = 1469598103934665603ULL;
    for (int k = 0; k < 20000; k++) h = (h ^ (uint64_t)(i * 31 + k)) * 1099511628211ULL;
    return h;
}

static int timers(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_rt; sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN, &sa, 0); sigaction(SIGRTMIN + 1, &sa, 0);
    signal(SIGALRM, on_alrm);
    timer_t t1, t2, t3;
    struct sigevent se = {0};
    se.sigev_notify = SIGEV_SIGNAL; se.sigev_signo = SIGRTMIN; se.sigev_value.sival_int = 42;
    timer_create(CLOCK_MONOTONIC, &se, &t1);
    se.sigev_notify = SIGEV_THREAD_ID; se._sigev_un._tid = gettid();
    se.sigev_signo = SIGRTMIN + 1; se.sigev_value.sival_int = 43;
    timer_create(CLOCK_REALTIME, &se, &t2);
    se.sigev_notify = SIGEV_NONE;
    timer_create(CLOCK_MONOTONIC, &se, &t3);
    struct itimerspec p1 = {{0, 10000000}, {0, 10000000}}, p2 = {{0, 15000000}, {0, 15000000}};
    struct itimerspec p3 = {{0, 0}, {1000, 0}};
    timer_settime(t1, 0, &p1, 0); timer_settime(t2, 0, &p2, 0); timer_settime(t3, 0, &p3, 0);
    struct itimerval iv = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_REAL, &iv, 0);
    int rt[3] = {0}, td[3] = {0}, al[3] = {0};
    for (int i = 0; i < steps; i++) {
        nap(step_ms);
        printf("step %d %016llx\n", i, (unsigned long long)work(i));
        fflush(stdout);
        if (i >= steps - 3) { rt[i - steps + 3] = rt_ticks; td[i - steps + 3] = tid_ticks; al[i - steps + 3] = alrm_ticks; }
    }
    struct itimerspec cur;
    int ok1 = timer_gettime(t1, &cur) == 0 && cur.it_interval.tv_nsec == 10000000;
    int ok3 = timer_gettime(t3, &cur) == 0 && cur.it_value.tv_sec > 900 && cur.it_value.tv_sec < 1000;
    printf("timer ids valid: %d\n", ok1 && timer_getoverrun(t2) >= 0);
    printf("SIGEV_NONE timer still armed: %d\n", ok3);
    printf("signal ticks kept arriving: %d\n", rt[2] > rt[1] && rt[1] > rt[0]);
    printf("thread ticks kept arriving: %d\n", td[2] > td[1] && td[1] > td[0]);
    printf("itimer ticks kept arriving: %d\n", al[2] > al[1] && al[1] > al[0]);
    printf("bad siginfo: %d\n", bad);
    return 0;
}

static int open_in(const char *dir, const char *name, int flags) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, flags | O_CREAT, 0600);
    if (fd < 0) { perror(path); exit(1); }
    return fd;
}

static int locks(const char *dir, int lease) {
    int a = open_in(dir, "flock.dat", O_RDWR), b = open_in(dir, "posix.dat", O_RDWR);
    int c = open_in(dir, "ofd.dat", O_RDWR);
    if (flock(a, LOCK_EX)) { perror("flock"); return 1; }
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 20};
    if (fcntl(b, F_SETLK, &fl)) { perror("posix"); return 1; }
    fl.l_type = F_RDLCK; fl.l_start = 100; fl.l_len = 0;
    if (fcntl(b, F_SETLK, &fl)) { perror("posix2"); return 1; }
    struct flock ofd = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 5};
    if (fcntl(c, F_OFD_SETLK, &ofd)) { perror("ofd"); return 1; }
    if (lease) {
        int d = open_in(dir, "lease.dat", O_RDONLY);
        if (fcntl(d, F_SETLEASE, F_RDLCK)) { perror("lease"); return 1; }
    }
    for (int i = 0; i < steps; i++) {
        nap(step_ms);
        printf("step %d %016llx\n", i, (unsigned long long)work(i));
        fflush(stdout);
    }
    pid_t me = getpid(), child = fork();
    if (child == 0) {   /* another process: every lock must conflict */
        int a2 = open_in(dir, "flock.dat", O_RDWR), b2 = open_in(dir, "posix.dat", O_RDWR);
        int c2 = open_in(dir, "ofd.dat", O_RDWR);
        printf("flock held: %d\n", flock(a2, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK);
        struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        fcntl(b2, F_GETLK, &q);
        printf("posix lock held by parent: %d [%lld,+%lld) %s\n", q.l_pid == me, (long long)q.l_start,
               (long long)q.l_len, q.l_type == F_WRLCK ? "write" : "other");
        struct flock r = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 1};
        fcntl(b2, F_GETLK, &r);
        printf("posix read lock held: %d\n", r.l_type == F_RDLCK);
        struct flock o = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        fcntl(c2, F_OFD_GETLK, &o);
        printf("ofd lock held: %d len %lld\n", o.l_type == F_WRLCK && o.l_pid == -1, (long long)o.l_len);
        fflush(stdout);
        _exit(0);
    }
    waitpid(child, 0, 0);
    return 0;
}

static int fds(void) {
    int sem = eventfd(5, EFD_SEMAPHORE | EFD_NONBLOCK);
    int req = eventfd(0, 0), back = eventfd(0, EFD_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {{0, 10000000}, {0, 10000000}};
    timerfd_settime(tfd, 0, &its, 0);
    sigset_t m;
    sigemptyset(&m); sigaddset(&m, SIGUSR1); sigaddset(&m, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m, 0);
    int sfd = signalfd(-1, &m, SFD_NONBLOCK);
    int ep = epoll_create1(0), ep2 = epoll_create1(EPOLL_CLOEXEC);   /* shared with the child too */
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xabc};
    epoll_ctl(ep, EPOLL_CTL_ADD, back, &ev);
    ev.events = EPOLLIN | EPOLLET; ev.data.u64 = 0x51;
    epoll_ctl(ep2, EPOLL_CTL_ADD, sfd, &ev);
    ev.events = EPOLLIN; ev.data.u64 = 0x7f;
    epoll_ctl(ep2, EPOLL_CTL_ADD, tfd, &ev);
    pid_t child = fork();
    if (child == 0) {   /* answers every request on the shared eventfds with twice the value */
        for (;;) {
            uint64_t v;
            if (read(req, &v, 8) != 8) continue;
            if (v == 1000000) _exit(0);
            v *= 2;
            write(back, &v, 8);
        }
    }
    uint64_t ticks[3] = {0}, total = 0;
    for (int i = 0; i < steps; i++) {
        nap(step_ms);
        uint64_t v = 0, n;
        int got = read(sem, &v, 8) == 8;       /* 5 units, then empty, refilled every 4th step */
        if (i % 4 == 3) { uint64_t one = 1; write(sem, &one, 8); }
        uint64_t q = i + 1, ans = 0;
        write(req, &q, 8);
        struct epoll_event hit = {0};
        int nev = epoll_wait(ep, &hit, 1, -1);
        if (nev != 1 || hit.data.u64 != 0xabc) printf("epoll wrong: %d %llx\n", nev, (unsigned long long)hit.data.u64);
        read(back, &ans, 8);
        if (read(tfd, &n, 8) == 8) total += n;
        struct signalfd_siginfo si;
        int sig = read(sfd, &si, sizeof si) == sizeof si ? (int)si.ssi_signo : 0;
        kill(getpid(), i % 2 ? SIGUSR2 : SIGUSR1);    /* read back next step: pending across a dump */
        printf("step %d %016llx sem %d child %llu sig %d\n", i, (unsigned long long)work(i), got,
               (unsigned long long)ans, sig == SIGUSR1 ? 1 : sig == SIGUSR2 ? 2 : 0);
        fflush(stdout);
        if (i >= steps - 3) ticks[i - steps + 3] = total;
    }
    uint64_t stop = 1000000;
    write(req, &stop, 8);
    waitpid(child, 0, 0);
    printf("timerfd kept ticking: %d\n", ticks[2] > ticks[1] && ticks[1] > ticks[0]);
    struct epoll_event evs[2];
    int n = epoll_wait(ep2, evs, 2, 0), sig_ready = 0;
    for (int k = 0; k < n; k++) sig_ready |= evs[k].data.u64 == 0x51;
    printf("epoll sees the pending signal: %d\n", sig_ready);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: kobjects timers|locks|lease|fds STEPS STEP_MS [DIR]\n"); return 2; }
    steps = atoi(argv[2]); step_ms = atoi(argv[3]);
    if (!strcmp(argv[1], "timers")) return timers();
    if (!strcmp(argv[1], "locks")) return locks(argv[4], 0);
    if (!strcmp(argv[1], "lease")) return locks(argv[4], 1);
    if (!strcmp(argv[1], "fds")) return fds();
    return 2;
}
