/* Holds N MiB of written memory, then waits. Usage: memhog MIB */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) << 20;
    uint64_t *p = malloc(n);
    for (size_t i = 0; i < n / 8; i++) p[i] = i * 0x9E3779B97F4A7C15ull;
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
