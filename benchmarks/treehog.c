/* A tree of N processes (fan-out 4, breadth first), each holding KIB KiB of written
 * memory and a few fds (/dev/null, its own pipe, a file read-only), then waiting.
 * The root prints "ready" once every process is set up. Usage: treehog N KIB FILE */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void fill(size_t kib, unsigned idx) {
    size_t n = kib << 10;
    volatile uint64_t *p = malloc(n);
    for (size_t i = 0; i < n / 8; i++) p[i] = (i + idx) * 0x9E3779B97F4A7C15ull;
}

int main(int argc, char **argv) {
    unsigned n = (unsigned)atoi(argv[1]), idx = 0;
    size_t kib = (size_t)atol(argv[2]);
    int ready[2];
    if (pipe(ready)) return 1;
    for (;;) {                      /* process idx forks children 4*idx+1 .. 4*idx+4 */
        unsigned forked = 0;
        for (unsigned c = 4 * idx + 1; c <= 4 * idx + 4 && c < n; c++) {
            pid_t p = fork();
            if (p < 0) return 2;
            if (p == 0) { idx = c; forked = 1; break; }
        }
        if (!forked) break;
    }
    fill(kib, idx);
    int own[2];
    if (pipe(own)) return 1;
    if (write(own[1], "x", 1) != 1) return 1;
    open("/dev/null", O_RDWR);
    open(argv[3], O_RDONLY);
    if (idx) {
        if (write(ready[1], "r", 1) != 1) return 1;
    } else {
        char c;
        close(ready[1]);
        for (unsigned got = 1; got < n; got++)
            if (read(ready[0], &c, 1) != 1) return 3;
        printf("ready\n");
        fflush(stdout);
    }
    for (;;) pause();
}
