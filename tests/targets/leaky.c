/* Leaks known amounts from known call sites (tests/test_leaks_live.py):
 *   leak_a: 100 x malloc(48)                       one call site
 *   leak_b: 37 x malloc(1000) and 11 x calloc(10, 10)  two call sites
 *   libleaky_plugin.so's plugin_leak (dlopen'd): 23 x malloc(333)   one call site
 * plus 1000 malloc/free pairs in main that leave nothing behind. Protocol: READY <pid>, wait for
 * a line, work, DONE {json}, wait for a line, exit (blocks still live: that is the point). */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "target_io.h"

typedef int (*leak_fn)(int, size_t);
void *keep[1000]; /* global: the stores (and so the mallocs) must stay */
int nkeep;


__attribute__((noinline)) void leak_a(void) {
    for (int i = 0; i < 100; i++) keep[nkeep++] = malloc(48);
}

__attribute__((noinline)) void leak_b(void) {
    for (int i = 0; i < 37; i++) keep[nkeep++] = malloc(1000);
    for (int i = 0; i < 11; i++) keep[nkeep++] = calloc(10, 10);
}

__attribute__((noinline)) void churn(void) {
    for (int i = 0; i < 1000; i++) {
        void *volatile p = malloc(16 + (size_t)(i % 200));
        free(p);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    char msg[256];
    snprintf(msg, sizeof msg, "READY %ld\n", (long)getpid());
    out(msg);
    wait_line();
    churn();
    leak_a();
    leak_b();
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(msg, sizeof msg, "ERROR %s\n", dlerror());
        out(msg);
        return 3;
    }
    usleep(300000); /* the module's load event reaches the monitor before its allocations */
    leak_fn pl = (leak_fn)dlsym(h, "plugin_leak");
    int n = pl(23, 333);
    out(n == 23 ? "DONE {\"ok\":true}\n" : "DONE {\"ok\":false}\n");
    wait_line();
    return 0;
}
