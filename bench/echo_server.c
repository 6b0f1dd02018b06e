/* The floor for a trapped access: a C server that answers every 32-byte vfio-user
 * REGION_READ header with a 40-byte reply (header + access + 8 data bytes), doing no other
 * work. Built and started by bench_vfio_user.py so both servers are measured in one run. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
        return 2;
    }
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
    unlink(argv[1]);
    if (bind(ls, (struct sockaddr *)&addr, sizeof(addr)) || listen(ls, 1)) {
        perror("listen");
        return 1;
    }
    for (;;) {
        int s = accept(ls, NULL, NULL);
        if (s < 0)
            continue;
        unsigned char req[32], rep[40] = {0};
        for (;;) {
            size_t got = 0;
            while (got < sizeof(req)) {
                ssize_t n = read(s, req + got, sizeof(req) - got);
                if (n <= 0)
                    goto done;
                got += (size_t)n;
            }
            memcpy(rep, req, 32);
            uint32_t size = 40, flags = 1;
            memcpy(rep + 4, &size, 4);
            memcpy(rep + 8, &flags, 4);
            if (write(s, rep, sizeof(rep)) != sizeof(rep))
                break;
        }
    done:
        close(s);
    }
}
