/* A batch-job stand-in for bench_slurm.py: holds MIB MiB written once, then runs STEPS
 * steps, each a fixed amount of compute (ITERS iterations of an integer hash, in
 * registers) plus rewriting FRACTION of its pages (a different, spread-out set each
 * step). Prints one line per step with the wall-clock time, and at the end the elapsed
 * work time (monotonic, from after the initial fill) and a checksum of the memory.
 *
 *   stepjob MIB FRACTION STEPS ITERS        -> "step K t=UNIX_TIME", ..., "work_s S sum X"
 *   stepjob --calibrate ITERS               -> "ns_per_iter F"
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t compute(uint64_t x, uint64_t iters) {
    for (uint64_t i = 0; i < iters; i++) {   /* splitmix64 steps: no memory traffic */
        x += 0x9E3779B97F4A7C15ull;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        x ^= z ^ (z >> 31);
    }
    return x;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--calibrate") == 0) {
        uint64_t iters = strtoull(argv[2], NULL, 10);
        double t0 = now(CLOCK_MONOTONIC);
        uint64_t x = compute(1, iters);
        double dt = now(CLOCK_MONOTONIC) - t0;
        printf("ns_per_iter %.4f x %llx\n", dt * 1e9 / iters, (unsigned long long)x);
        return 0;
    }
    if (argc != 5) {
        fprintf(stderr, "usage: stepjob MIB FRACTION STEPS ITERS | stepjob --calibrate ITERS\n");
        return 2;
    }
    size_t npages = (size_t)atol(argv[1]) * 256;
    double fraction = atof(argv[2]);
    long steps = atol(argv[3]);
    uint64_t iters = strtoull(argv[4], NULL, 10);
    size_t per_step = (size_t)(npages * fraction + 0.5);
    if (per_step == 0 && fraction > 0) per_step = 1;
    uint64_t *mem = malloc(npages * 4096 + 1);
    if (!mem) { perror("malloc"); return 1; }
    size_t words = npages * 512;
    for (size_t i = 0; i < words; i++) mem[i] = i * 0x9E3779B97F4A7C15ull;
    printf("ready %zu pages, %zu rewritten per step\n", npages, per_step);
    fflush(stdout);

    double t0 = now(CLOCK_MONOTONIC);
    uint64_t x = 42;
    size_t cursor = 0;
    /* a stride coprime with npages spreads each step's pages over the whole region */
    size_t stride = npages > 1 ? 7919 % npages : 1;
    if (stride == 0) stride = 1;
    for (long k = 1; k <= steps; k++) {
        x = compute(x, iters);
        for (size_t j = 0; j < per_step; j++) {
            uint64_t *page = mem + cursor * 512;
            for (int w = 0; w < 512; w += 8) page[w] ^= x + w;   /* dirties the page */
            cursor = (cursor + stride) % npages;
        }
        printf("step %ld t=%.3f\n", k, now(CLOCK_REALTIME));
        fflush(stdout);
    }
    double work = now(CLOCK_MONOTONIC) - t0;
    uint64_t sum = x;
    for (size_t i = 0; i < words; i += 64) sum += mem[i];
    printf("work_s %.3f sum %llx\n", work, (unsigned long long)sum);
    return 0;
}
