/* Threads that write their memory without pause and check it as they go, for live
 * snapshots: the image must be one instant, so a restored copy must find every page as
 * its own sweeps left it.
 *
 * Each of THREADS threads owns PAGES pages; sweep s writes s+1 into word 0 of page 0,
 * 1, 2, ... after checking the page still holds s (a page the snapshot copied after the
 * job wrote it, with the job's registers from before, fails this check after restore:
 * exit 3 and the page named). Prints "ready" once every page holds 0, and at the end
 * "done" and a digest of all pages.   Usage: livewriter THREADS PAGES SWEEPS */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define PAGE 4096
static long pages, sweeps;

static void *worker(void *arg)
{
    volatile uint64_t *mem = arg;
    for (long s = 0; s < sweeps; s++)
        for (long p = 0; p < pages; p++) {
            volatile uint64_t *w = mem + p * (PAGE / 8);
            if (*w != (uint64_t)s) {
                fprintf(stdout, "torn: page %ld holds %lu in sweep %ld\n", p, (unsigned long)*w, s);
                fflush(stdout);
                exit(3);
            }
            *w = s + 1;
            w[1 + (p % 500)] += s;      /* and something else in the page */
        }
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = atoi(argv[1]);
    pages = atol(argv[2]);
    sweeps = atol(argv[3]);
    pthread_t tid[64];
    uint64_t *mem[64];
    for (int t = 0; t < threads; t++) {
        mem[t] = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem[t] == MAP_FAILED)
            return 2;
        for (long p = 0; p < pages; p++)
            mem[t][p * (PAGE / 8)] = 0;
    }
    printf("ready\n");
    fflush(stdout);
    for (int t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, worker, mem[t]);
    uint64_t h = 1469598103934665603ULL;
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
        for (long i = 0; i < pages * (PAGE / 8); i++)
            h = (h ^ mem[t][i]) * 1099511628211ULL;
    }
    printf("done %016lx\n", (unsigned long)h);
    return 0;
}
