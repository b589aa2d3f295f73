/* Output and stdin handshake shared by the test targets: unbuffered writes (no stdio buffer
 * allocations in the measured window) and a blocking wait for one line from the test. */
#ifndef NVSE_TARGET_IO_H
#define NVSE_TARGET_IO_H
#include <string.h>
#include <unistd.h>

static void out(const char *s) {
    size_t n = strlen(s);
    while (n) {
        ssize_t w = write(1, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void wait_line(void) {
    char c;
    while (read(0, &c, 1) == 1 && c != '\n') {
    }
}

#endif
