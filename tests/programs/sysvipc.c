/* A parent and a child taking turns through SysV IPC (tests/engine/test_ipc.py).
 *
 *   sysvipc STEPS DELAY_MS [private|undo|undo-threads|huge]
 *
 * private: every object IPC_PRIVATE (for a run in the host's namespace, where keys could
 * clash); undo: the child's counter increments use SEM_UNDO; undo-threads: so, and the
 * child has a second thread (sharing its SEM_UNDO list); huge: the shared segment is
 * SHM_HUGETLB (4 MiB, attached whole: no hole, no read-only page), its page size shown.
 * Objects: a segment both have attached (the child by fork), a keyed segment nobody has
 * attached between its set-up and the end, a segment removed (IPC_RMID) while attached, a
 * keyed set of 3 semaphores (turns and a counter), a queue the parent feeds two messages
 * of types 1..3 per step while the child takes one (lowest type first): messages wait in
 * it at any checkpoint. Every line is deterministic in a fresh IPC namespace, including
 * the IDs, which the end checks are still the objects' (same IDs after a restore).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>

#define KEY_PLAIN 0x5e5e0001
#define KEY_SEM   0x5e5e0002
#define SHM_SIZE  (3 * 4096 + 100)
#define HUGE_SIZE (4 << 20)

struct msg { long type; char text[32]; };
union semun { int val; struct semid_ds *buf; unsigned short *array; };

static int semid, undo;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void sem_op(int num, int op)
{
    struct sembuf b = { .sem_num = num, .sem_op = op, .sem_flg = undo && num == 2 ? SEM_UNDO : 0 };
    while (semop(semid, &b, 1) < 0) {
        perror("semop");
        exit(2);
    }
}

/* the parent's mappings of the shared segment, relative to where it was attached */
static void show_maps(void *base)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long b = (unsigned long)base, s, e;
    char prot[8];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx %7s", &s, &e, prot) == 3 && s >= b && s < b + 4 * 4096)
            say("segment mapping +%#lx-+%#lx %s\n", s - b, e - b, prot);
    fclose(f);
}

static void pause_ms(int ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0)
        ;
}

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

/* the kernel page size of the mapping at `base` (kB), from smaps */
static long page_kb(void *base)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    unsigned long s, e, b = (unsigned long)base;
    long kb = -1;
    int in = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' '))
            in = s == b;
        else if (in && sscanf(line, "KernelPageSize: %ld kB", &kb) == 1)
            break;
    }
    fclose(f);
    return kb;
}

int main(int argc, char **argv)
{
    int steps = argc > 1 ? atoi(argv[1]) : 20, delay = argc > 2 ? atoi(argv[2]) : 50;
    int private = argc > 3 && !strcmp(argv[3], "private");
    int threads = argc > 3 && !strcmp(argv[3], "undo-threads");
    int huge = argc > 3 && !strcmp(argv[3], "huge");
    undo = threads || (argc > 3 && !strcmp(argv[3], "undo"));
    int shared = shmget(IPC_PRIVATE, huge ? HUGE_SIZE : SHM_SIZE, IPC_CREAT | 0600 | (huge ? SHM_HUGETLB : 0));
    int plain = shmget(private ? IPC_PRIVATE : KEY_PLAIN, 5000, IPC_CREAT | IPC_EXCL | 0640);
    int gone = shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0600);
    int q = msgget(IPC_PRIVATE, IPC_CREAT | 0620);
    semid = semget(private ? IPC_PRIVATE : KEY_SEM, 3, IPC_CREAT | IPC_EXCL | 0660);
    if (shared < 0 || plain < 0 || gone < 0 || q < 0 || semid < 0) {
        perror("creating SysV objects (run in a fresh IPC namespace)");
        return 1;
    }
    say("ids: shm %d plain %d gone %d sem %d msg %d\n", shared, plain, gone, semid, q);
    unsigned char *p = shmat(plain, NULL, 0);
    for (int i = 0; i < 5000; i++)
        p[i] = (unsigned char)(i * 7 + 3);
    shmdt(p);
    unsigned char *g = shmat(gone, NULL, 0);
    shmctl(gone, IPC_RMID, NULL);
    memset(g, 0xA5, 8192);
    long *arr = shmat(shared, NULL, 0);
    unsigned short init[3] = { 1, 0, 0 };
    union semun su = { .array = init };
    semctl(semid, 0, SETALL, su);

    pid_t child = fork();
    if (child == 0) {
        pthread_t helper;
        if (threads && pthread_create(&helper, NULL, idle, NULL) != 0)
            _exit(3);
        for (int i = 0; i < steps; i++) {
            sem_op(1, -1);
            long sum = 0;
            for (int k = 0; k <= i; k++)
                sum += arr[k];
            struct msg m;
            ssize_t n = msgrcv(q, &m, sizeof m.text, -3, 0);
            say("child %d: shm sum %ld, message type %ld '%.*s'\n", i, sum, m.type, (int)n, m.text);
            sem_op(2, 1);
            sem_op(0, 1);
        }
        struct msg m;
        ssize_t n;
        while ((n = msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT)) >= 0)
            say("left in queue: type %ld '%.*s'\n", m.type, (int)n, m.text);
        _exit(0);
    }
    /* the parent keeps only part of its attachment, the last page read-only */
    if (!huge) {
        munmap((char *)arr + 2 * 4096, 4096);
        mprotect((char *)arr + 3 * 4096, 4096, PROT_READ);
    }
    for (int i = 0; i < steps; i++) {
        sem_op(0, -1);
        arr[i] = (long)i * i + arr[i > 0 ? i - 1 : 0];
        for (int k = 0; k < 2; k++) {
            struct msg m = { .type = (2 * i + k) % 3 + 1 };
            int len = snprintf(m.text, sizeof m.text, "m%d.%d", i, k);
            if (msgsnd(q, &m, len, 0) < 0)
                perror("msgsnd");
        }
        say("parent %d: wrote %ld, gone[%d] = %#x\n", i, arr[i], i, g[i * 97 % 8192]);
        pause_ms(delay);
        sem_op(1, 1);
    }
    int status;
    waitpid(child, &status, 0);
    unsigned short vals[3];
    su.array = vals;
    semctl(semid, 0, GETALL, su);
    p = shmat(plain, NULL, SHM_RDONLY);
    long psum = 0;
    for (int i = 0; i < 5000; i++)
        psum += p[i] * (i % 13 + 1);
    shmdt(p);
    int gone_ok = 1;
    for (int i = 0; i < 8192; i++)
        gone_ok &= g[i] == 0xA5;
    struct shmid_ds sd;
    struct semid_ds semd;
    struct msqid_ds md;
    union semun sst = { .buf = &semd };
    shmctl(plain, IPC_STAT, &sd);
    semctl(semid, 0, IPC_STAT, sst);
    msgctl(q, IPC_STAT, &md);
    say("child exit %d; sem values %d %d %d\n", WEXITSTATUS(status), vals[0], vals[1], vals[2]);
    if (!private)
        say("same ids by key: %d %d\n", shmget(KEY_PLAIN, 0, 0) == plain, semget(KEY_SEM, 0, 0) == semid);
    say("plain segment: sum %ld, size %zu, mode %o, key %#x, attached %lu\n", psum, (size_t)sd.shm_segsz,
        sd.shm_perm.mode & 0777, private ? 0 : sd.shm_perm.__key, (unsigned long)sd.shm_nattch);
    say("sem mode %o nsems %lu; queue mode %o, %lu left\n", semd.sem_perm.mode & 0777,
        (unsigned long)semd.sem_nsems, md.msg_perm.mode & 0777, (unsigned long)md.msg_qnum);
    say("removed segment intact: %d, still removed: %d\n", gone_ok, shmctl(gone, IPC_STAT, &sd) < 0 || (sd.shm_perm.mode & SHM_DEST) != 0);
    show_maps(arr);
    if (huge)
        say("shared segment: %d kB pages\n", (int)page_kb(arr));
    shmdt(arr);
    shmdt(g);
    shmctl(shared, IPC_RMID, NULL);
    shmctl(plain, IPC_RMID, NULL);
    semctl(semid, 0, IPC_RMID);
    msgctl(q, IPC_RMID, NULL);
    say("done\n");
    return 0;
}
