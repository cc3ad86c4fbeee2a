/* Every kind of mapping the engine must give back, checked at the end.
 * Usage: mappings STEPS SLEEP_MS DATAFILE SHAREDFILE
 * - private anonymous (heap, mmap), a PROT_NONE guard page holding data, a read-only page,
 *   MADV_DONTFORK and MADV_HUGEPAGE hints, shared anonymous memory, a private file
 *   mapping with some pages changed, a shared file mapping written through, brk growth
 *   after restore, a deep recursion that grows the stack after restore. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static int depth(int n) { volatile char pad[4096]; pad[0] = (char)n; return n ? depth(n - 1) + pad[0] % 2 : 0; }

int main(int argc, char **argv) {
    int steps = atoi(argv[1]), ms = atoi(argv[2]);
    long pg = sysconf(_SC_PAGESIZE);
    unsigned char *anon = mmap(NULL, 64 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *guard = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *ro = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *shared = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    unsigned char *hint = mmap(NULL, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int dfd = open(argv[3], O_RDONLY), sfd = open(argv[4], O_RDWR);
    unsigned char *fpriv = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE, dfd, 0);
    unsigned char *fshared = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    close(dfd);
    madvise(anon, 64 * pg, MADV_DONTFORK);
    madvise(hint, 4 << 20, MADV_HUGEPAGE);
    for (int i = 0; i < 64 * pg; i++) anon[i] = (unsigned char)(i * 7);
    memset(guard, 0x5a, 4 * pg);
    mprotect(guard + pg, pg, PROT_NONE);        /* data behind a PROT_NONE page */
    memset(ro, 0x33, 2 * pg);
    mprotect(ro, 2 * pg, PROT_READ);
    for (int i = 0; i < 8 * pg; i++) shared[i] = (unsigned char)(i ^ 0x55);
    for (int i = 0; i < (4 << 20); i += 4096) hint[i] = (unsigned char)i;
    fpriv[pg + 5] = 'X';                        /* one changed page, three from the file */
    for (int s = 0; s < steps; s++) {
        anon[s] += 1;
        shared[s] += 1;
        fshared[s] = 'a' + s % 26;
        printf("step %d %016llx\n", s, (unsigned long long)(mix(anon, 64 * pg) ^ mix(shared, 8 * pg)));
        fflush(stdout);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    mprotect(guard + pg, pg, PROT_READ);
    char *grown = sbrk(1 << 20);                /* brk still works where it was */
    memset(grown, 1, 1 << 20);
    printf("anon %016llx guard %016llx ro %016llx shared %016llx hint %016llx fpriv %016llx fshared %016llx "
           "brk %d stack %d\n",
           (unsigned long long)mix(anon, 64 * pg), (unsigned long long)mix(guard, 4 * pg),
           (unsigned long long)mix(ro, 2 * pg), (unsigned long long)mix(shared, 8 * pg),
           (unsigned long long)mix(hint, 4 << 20), (unsigned long long)mix(fpriv, 4 * pg),
           (unsigned long long)mix(fshared, 2 * pg), grown[12345], depth(1500));
    return 0;
}
