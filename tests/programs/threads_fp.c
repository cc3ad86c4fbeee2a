/* A multi-threaded floating-point computation with a deterministic output.
 * Each of NTHREADS workers integrates its own series; the main thread prints the
 * combined state after every step. Usage: threads_fp STEPS NTHREADS [SLEEP_MS] */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int steps, nthreads, sleep_ms;
static pthread_barrier_t start_bar, done_bar;
static double *acc;

static void *worker(void *arg) {
    long id = (long)arg;
    double x = 1.0 + id;
    for (int s = 0; s < steps; s++) {
        pthread_barrier_wait(&start_bar);
        for (int i = 0; i < 200000; i++) {
            x = x + sin(x * 1e-3 + i) * 1e-4 + sqrt(fabs(x)) * 1e-6;
        }
        acc[id] = x;
        pthread_barrier_wait(&done_bar);
    }
    return NULL;
}

int main(int argc, char **argv) {
    steps = argc > 1 ? atoi(argv[1]) : 100;
    nthreads = argc > 2 ? atoi(argv[2]) : 4;
    sleep_ms = argc > 3 ? atoi(argv[3]) : 0;
    acc = calloc(nthreads, sizeof(double));
    pthread_t *t = calloc(nthreads, sizeof(pthread_t));
    pthread_barrier_init(&start_bar, NULL, nthreads + 1);
    pthread_barrier_init(&done_bar, NULL, nthreads + 1);
    for (long i = 0; i < nthreads; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int s = 0; s < steps; s++) {
        pthread_barrier_wait(&start_bar);
        pthread_barrier_wait(&done_bar);
        double sum = 0;
        for (int i = 0; i < nthreads; i++) sum += acc[i];
        printf("step %d sum %.17g\n", s, sum);
        fflush(stdout);
        if (sleep_ms) {
            struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    for (int i = 0; i < nthreads; i++) pthread_join(t[i], NULL);
    printf("done\n");
    return 0;
}
