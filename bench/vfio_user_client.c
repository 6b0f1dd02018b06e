/* A vfio-user client in C for bench/run: 8-byte REGION_READs of BAR0 (region 0, offset 0),
 * timed one by one, against several servers in turn so machine noise hits them all alike.
 *
 * usage: vfio_user_client READS CHUNK SOCKET...
 * Connects to every SOCKET, does the VERSION handshake (0.1, no capabilities; a SOCKET written
 * raw:PATH gets none: the do-nothing floor server answers every 32-byte request), then, until
 * each has had READS reads: CHUNK reads of the first server, CHUNK of the second, ... Prints one
 * line per server, in the order given: the latencies of its reads in nanoseconds, separated by
 * spaces. Exits 1 with a message on stderr if a server misbehaves. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { CMD_VERSION = 1, CMD_REGION_READ = 9, F_REPLY = 1, F_ERROR = 0x20 };

struct header {
    uint16_t msg_id;
    uint16_t cmd;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
};

struct access {
    struct header h;
    uint64_t offset;
    uint32_t region;
    uint32_t count;
};

static void fail(const char *what, const char *path) {
    fprintf(stderr, "vfio_user_client: %s: %s (%s)\n", path, what, errno ? strerror(errno) : "-");
    exit(1);
}

static void read_all(int s, void *buf, size_t len, const char *path) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(s, (char *)buf + got, len - got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            fail("connection closed", path);
        }
        got += (size_t)n;
    }
}

static void write_all(int s, const void *buf, size_t len, const char *path) {
    if (write(s, buf, len) != (ssize_t)len)
        fail("short write", path);
}

static int connect_to(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (s < 0 || strlen(path) >= sizeof(addr.sun_path))
        fail("cannot make a socket", path);
    strcpy(addr.sun_path, path);
    if (connect(s, (struct sockaddr *)&addr, sizeof(addr)))
        fail("cannot connect", path);
    return s;
}

static void version(int s, const char *path) {
    unsigned char msg[20] = {0};
    struct header h = {.msg_id = 1, .cmd = CMD_VERSION, .size = sizeof(msg)};
    uint16_t major = 0, minor = 1;
    memcpy(msg, &h, sizeof(h));
    memcpy(msg + 16, &major, 2);
    memcpy(msg + 18, &minor, 2);
    write_all(s, msg, sizeof(msg), path);
    struct header r;
    read_all(s, &r, sizeof(r), path);
    if (r.cmd != CMD_VERSION || !(r.flags & F_REPLY) || (r.flags & F_ERROR) || r.size < 20 ||
        r.size > 65536)
        fail("bad VERSION reply", path);
    char rest[65536];
    read_all(s, rest, r.size - sizeof(r), path);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s READS CHUNK SOCKET...\n", argv[0]);
        return 2;
    }
    long reads = atol(argv[1]), chunk = atol(argv[2]);
    int n = argc - 3;
    if (reads <= 0 || chunk <= 0) {
        fprintf(stderr, "READS and CHUNK must be positive\n");
        return 2;
    }
    int *socks = calloc((size_t)n, sizeof(int));
    uint64_t *lat = calloc((size_t)n * (size_t)reads, sizeof(uint64_t));
    const char **paths = calloc((size_t)n, sizeof(char *));
    if (!socks || !lat || !paths)
        return 1;
    for (int i = 0; i < n; i++) {
        const char *arg = argv[3 + i];
        int raw = strncmp(arg, "raw:", 4) == 0;
        paths[i] = raw ? arg + 4 : arg;
        socks[i] = connect_to(paths[i]);
        if (!raw)
            version(socks[i], paths[i]);
    }
    uint16_t msg_id = 2;
    for (long done = 0; done < reads; done += chunk) {
        long upto = done + chunk < reads ? done + chunk : reads;
        for (int i = 0; i < n; i++) {
            for (long k = done; k < upto; k++) {
                struct access req = {
                    .h = {.msg_id = msg_id++, .cmd = CMD_REGION_READ, .size = sizeof(req)},
                    .offset = 0,
                    .region = 0,
                    .count = 8,
                };
                unsigned char rep[40];
                uint64_t t0 = now_ns();
                write_all(socks[i], &req, sizeof(req), paths[i]);
                read_all(socks[i], rep, sizeof(rep), paths[i]);
                lat[(size_t)i * (size_t)reads + (size_t)k] = now_ns() - t0;
                struct header r;
                memcpy(&r, rep, sizeof(r));
                if (r.size != 40 || !(r.flags & F_REPLY) || (r.flags & F_ERROR))
                    fail("bad REGION_READ reply", paths[i]);
            }
        }
    }
    for (int i = 0; i < n; i++) {
        close(socks[i]);
        for (long k = 0; k < reads; k++)
            printf(k ? " %llu" : "%llu", (unsigned long long)lat[(size_t)i * (size_t)reads + (size_t)k]);
        printf("\n");
    }
    return 0;
}
