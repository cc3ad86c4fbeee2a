/* inotify (and fanotify) watchers for tests/engine/test_inotify.py.
 *
 *   fswatch DIR STEPS DELAY_MS [fanotify]
 *
 * Makes DIR/a DIR/b DIR/c, watches them (wds 1 2 3), then drops the watch on a, so the
 * live wds are 2 and 3 with a gap before them. Each step creates a file in b and one in c
 * and prints the events it reads for them, with their wd. At the end it watches DIR/d:
 * an uninterrupted run gets wd 4. With "fanotify" it also marks DIR/e (close-write of
 * its files, a notification group) and prints what each step's write there reports.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char dir[4096];

static void touch(const char *sub, const char *name, int i)
{
    char p[8192];
    snprintf(p, sizeof p, "%s/%s/%s%d", dir, sub, name, i);
    int fd = open(p, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "x\n", 2) != 2) {
        perror(p);
        exit(2);
    }
    close(fd);
}

static void pause_ms(int ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0)
        ;
}

/* print inotify events until `want` IN_CLOSE_WRITE events (each file's last) were seen */
static void read_inotify(int in, int want)
{
    char buf[4096] __attribute__((aligned(8)));
    while (want > 0) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n <= 0) {
            perror("read inotify");
            exit(2);
        }
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if (ev->mask & IN_CREATE) {
                printf("  inotify wd %d create %s\n", ev->wd, ev->len ? ev->name : "");
            } else if (ev->mask & IN_CLOSE_WRITE) {
                printf("  inotify wd %d close_write %s\n", ev->wd, ev->len ? ev->name : "");
                want--;
            } else {
                printf("  inotify wd %d mask %#x\n", ev->wd, ev->mask);
            }
            p += sizeof *ev + ev->len;
        }
    }
}

static void read_fanotify(int fan)
{
    char buf[4096] __attribute__((aligned(8)));
    ssize_t n = read(fan, buf, sizeof buf);
    if (n <= 0) {
        perror("read fanotify");
        exit(2);
    }
    for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
        char link[64], path[4096] = "";
        snprintf(link, sizeof link, "/proc/self/fd/%d", m->fd);
        ssize_t k = readlink(link, path, sizeof path - 1);
        path[k > 0 ? k : 0] = 0;
        char *base = strrchr(path, '/');
        printf("  fanotify mask %#llx file %s\n", (unsigned long long)m->mask, base ? base + 1 : path);
        close(m->fd);
    }
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 1;
    snprintf(dir, sizeof dir, "%s", argv[1]);
    int steps = atoi(argv[2]), delay = atoi(argv[3]);
    int fanon = argc > 4 && !strcmp(argv[4], "fanotify");
    const char *subs[] = { "a", "b", "c", "d", "e" };
    for (int i = 0; i < 5; i++) {
        char p[8192];
        snprintf(p, sizeof p, "%s/%s", dir, subs[i]);
        mkdir(p, 0755);
    }
    int in = inotify_init1(IN_CLOEXEC);
    int wd[3];
    for (int i = 0; i < 3; i++) {
        char p[8192];
        snprintf(p, sizeof p, "%s/%s", dir, subs[i]);
        wd[i] = inotify_add_watch(in, p, IN_CREATE | IN_CLOSE_WRITE);
    }
    inotify_rm_watch(in, wd[0]);
    char ign[64];
    ssize_t n = read(in, ign, sizeof ign);      /* the IN_IGNORED of the removed watch */
    printf("watches: %d %d %d, removed %d (%zd bytes of IN_IGNORED)\n", wd[0], wd[1], wd[2], wd[0], n);
    int fan = -1;
    if (fanon) {
        char p[8192];
        snprintf(p, sizeof p, "%s/e", dir);
        fan = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC, O_RDONLY);
        if (fan < 0 || fanotify_mark(fan, FAN_MARK_ADD, FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, AT_FDCWD, p) < 0) {
            perror("fanotify");
            return 1;
        }
    }
    fflush(stdout);
    for (int i = 0; i < steps; i++) {
        printf("step %d\n", i);
        touch("b", "f", i);
        touch("c", "g", i);
        read_inotify(in, 2);
        if (fanon) {
            touch("e", "h", i);
            read_fanotify(fan);
        }
        fflush(stdout);
        pause_ms(delay);
    }
    char p[8192];
    snprintf(p, sizeof p, "%s/d", dir);
    printf("new watch: %d\n", inotify_add_watch(in, p, IN_CREATE));
    printf("done\n");
    return 0;
}
