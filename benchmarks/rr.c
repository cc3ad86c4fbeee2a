/* Request/response over one TCP connection, for bench_tcp.py.
 *
 *   rr server HOST             listens on HOST, prints the port, answers each 64-byte
 *                              request with the same 64 bytes, until the client leaves
 *   rr client HOST PORT SECS OUT
 *                              sends numbered requests back to back for SECS seconds;
 *                              writes one record per request to OUT: (start, round trip)
 *                              as two doubles in seconds (CLOCK_MONOTONIC); exits 1 on a
 *                              reset or a wrong answer (a lost or duplicated request).
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REQ 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int full(int fd, char *buf, int n, int writing) {
    int done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
        if (r <= 0)
            return -1;
        done += r;
    }
    return 0;
}

static int server(const char *host) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai;
    if (getaddrinfo(host, "0", &hints, &ai))
        return 2;
    int ls = socket(ai->ai_family, SOCK_STREAM, 0);
    if (bind(ls, ai->ai_addr, ai->ai_addrlen) || listen(ls, 1))
        return 2;
    struct sockaddr_storage sa;
    socklen_t len = sizeof(sa);
    getsockname(ls, (struct sockaddr *)&sa, &len);
    printf("port %d\n", ntohs(((struct sockaddr_in *)&sa)->sin_port));
    fflush(stdout);
    int c = accept(ls, NULL, NULL), one = 1;
    close(ls);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char buf[REQ];
    while (full(c, buf, REQ, 0) == 0)
        if (full(c, buf, REQ, 1))
            return 1;
    return 0;
}

static int client(const char *host, const char *port, double secs, const char *out) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai))
        return 2;
    int s = socket(ai->ai_family, SOCK_STREAM, 0), one = 1;
    if (connect(s, ai->ai_addr, ai->ai_addrlen))
        return 2;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    FILE *f = fopen(out, "wb");
    printf("connected\n");
    fflush(stdout);
    char req[REQ], ans[REQ];
    double end = now() + secs;
    for (uint64_t i = 0; now() < end; i++) {
        memset(req, (int)(i & 0xff), REQ);
        memcpy(req, &i, sizeof(i));
        double t0 = now();
        if (full(s, req, REQ, 1) || full(s, ans, REQ, 0)) {
            fprintf(stderr, "request %llu: connection broken\n", (unsigned long long)i);
            return 1;
        }
        double rec[2] = {t0, now() - t0};
        fwrite(rec, sizeof(rec), 1, f);
        if (memcmp(req, ans, REQ)) {
            fprintf(stderr, "request %llu: wrong answer\n", (unsigned long long)i);
            return 1;
        }
    }
    fclose(f);
    close(s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server"))
        return server(argv[2]);
    if (argc == 6 && !strcmp(argv[1], "client"))
        return client(argv[2], argv[3], atof(argv[4]), argv[5]);
    fprintf(stderr, "usage: rr server HOST | rr client HOST PORT SECS OUT\n");
    return 2;
}
