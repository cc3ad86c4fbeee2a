/* A target for the tracking tests: it changes its memory only when told to, so the
 * tests know exactly which pages were written. One command per line on stdin, one
 * answer line on stdout ("ok" or an address in hex). Addresses are absolute.
 *   a NPAGES HUGE     map NPAGES anonymous pages (2 MiB aligned; HUGE=1 asks for THP,
 *                     0 forbids it), write every page; answer the address
 *   w ADDR N STEP     write one byte in N pages: ADDR, ADDR+STEP pages, ...
 *   r ADDR N          read N pages (touch without writing)
 *   d ADDR N          madvise(MADV_DONTNEED)
 *   u ADDR N          munmap
 *   f ADDR N          munmap and map again at the same place (MAP_FIXED), no writes
 *   g ADDR N M        mremap N pages to M pages, may move; answer the new address
 *   p ADDR N PROT     mprotect (PROT as a number)
 *   b NBYTES          grow the heap with sbrk and write it; answer the old break
 *   U ADDR N          register the range with a userfaultfd of our own (missing mode),
 *                     so nobody else can register it (the fallback test)
 *   t ADDR N STEP     like w, but answer the nanoseconds the writes took (benchmarks)
 *   z ADDR N PERMILLE SEED  write one byte in each of the N pages with probability
 *                     PERMILLE/1000 (a fixed pseudo-random choice per SEED); answer the
 *                     count and the nanoseconds the writes took
 *   m ADDR N ADVICE   madvise(ADVICE) (a number: 10 MADV_DONTFORK, 18 MADV_WIPEONFORK)
 *   x                 exit(0) at once
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <fcntl.h>
#include <time.h>

#define PG 4096UL

static void reply_addr(void *p) { printf("%lx\n", (unsigned long)p); fflush(stdout); }
static void ok(void) { puts("ok"); fflush(stdout); }

int main(void) {
    char line[256];
    volatile unsigned long sink = 0;
    unsigned long counter = 1;
    setvbuf(stdin, NULL, _IONBF, 0);
    puts("ready");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        unsigned long a = 0, n = 0, m = 0;
        char c = line[0];
        sscanf(line + 1, "%lx %lu %lu", &a, &n, &m);
        if (c == 'a') {
            unsigned long np = strtoul(line + 2, NULL, 10), huge = 0;
            sscanf(line + 2, "%lu %lu", &np, &huge);
            size_t len = np * PG, align = 2UL << 20;
            char *raw = mmap(NULL, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (raw == MAP_FAILED) { puts("err"); fflush(stdout); continue; }
            char *p = (char *)(((uintptr_t)raw + align - 1) & ~(align - 1));
            if (p > raw) munmap(raw, p - raw);
            munmap(p + len, raw + len + align - (p + len));
            madvise(p, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
            for (size_t i = 0; i < len; i += PG) p[i] = 1;
            reply_addr(p);
        } else if (c == 'w') {
            for (unsigned long i = 0; i < n; i++) *(volatile unsigned long *)(a + i * (m ? m : 1) * PG + 8) = ++counter;  /* always a new value */
            ok();
        } else if (c == 't') {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (unsigned long i = 0; i < n; i++) *(volatile unsigned long *)(a + i * (m ? m : 1) * PG + 8) = ++counter;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("%ld\n", (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec));
            fflush(stdout);
        } else if (c == 'r') {
            for (unsigned long i = 0; i < n; i++) sink += ((volatile char *)a)[i * PG];
            ok();
        } else if (c == 'd') {
            madvise((void *)a, n * PG, MADV_DONTNEED); ok();
        } else if (c == 'u') {
            munmap((void *)a, n * PG); ok();
        } else if (c == 'f') {
            munmap((void *)a, n * PG);
            void *p = mmap((void *)a, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            madvise(p, n * PG, MADV_NOHUGEPAGE);
            ok();
        } else if (c == 'g') {
            void *p = mremap((void *)a, n * PG, m * PG, MREMAP_MAYMOVE);
            reply_addr(p);
        } else if (c == 'p') {
            mprotect((void *)a, n * PG, (int)m); ok();
        } else if (c == 'b') {
            unsigned long nb = strtoul(line + 2, NULL, 10);
            char *old = sbrk(nb);
            for (unsigned long i = 0; i < nb; i += PG) old[i] = 1;
            reply_addr(old);
        } else if (c == 'U') {
            int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
            struct uffdio_api api = {.api = UFFD_API};
            struct uffdio_register reg = {.range = {a, n * PG}, .mode = UFFDIO_REGISTER_MODE_MISSING};
            if (fd < 0 || ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg)) puts("err");
            else puts("ok");
            fflush(stdout);
        } else if (c == 'z') {
            unsigned long permille = 0, seed = 0, count = 0;
            sscanf(line + 1, "%lx %lu %lu %lu", &a, &n, &permille, &seed);
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (unsigned long i = 0; i < n; i++) {
                uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ULL ^ (seed + 1) * 0xBF58476D1CE4E5B9ULL;
                h ^= h >> 31; h *= 0x94D049BB133111EBULL; h ^= h >> 29;
                if (h % 1000 < permille) { *(volatile unsigned long *)(a + i * PG + 8) = ++counter; count++; }
            }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("%lu %ld\n", count, (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec));
            fflush(stdout);
        } else if (c == 'm') {
            puts(madvise((void *)a, n * PG, (int)m) ? "err" : "ok"); fflush(stdout);
        } else if (c == 'x') {
            _exit(0);
        }
    }
    return 0;
}
