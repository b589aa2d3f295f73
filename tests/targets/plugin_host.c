/* Waits for the monitor, then dlopen()s the plugin given as argv[1] and uses its allocator:
 * N plugin_malloc calls of known sizes, every third block plugin_free'd. Prints the truth.
 * usage: plugin_host PLUGIN.so [N [REPLACER.so]]: with a replacer (tests/targets/replacer.c),
 * it patches plugin_malloc/plugin_free right after the plugin loaded, before the first call. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "target_io.h"

typedef void *(*alloc_fn)(size_t);
typedef void (*free_fn)(void *);
typedef int (*install_fn)(void *, void *);
typedef unsigned long (*calls_fn)(void);


int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int n = argc > 2 ? atoi(argv[2]) : 500;
    static void *blk[100000];
    if (n > 100000) n = 100000;
    char msg[512];
    snprintf(msg, sizeof msg, "READY %ld\n", (long)getpid());
    out(msg);
    wait_line();
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(msg, sizeof msg, "ERROR %s\n", dlerror());
        out(msg);
        return 3;
    }
    alloc_fn pm = (alloc_fn)dlsym(h, "plugin_malloc");
    free_fn pf = (free_fn)dlsym(h, "plugin_free");
    void *r = NULL;
    if (argc > 3) {
        r = dlopen(argv[3], RTLD_NOW | RTLD_LOCAL);
        install_fn install = r ? (install_fn)dlsym(r, "replacer_install") : NULL;
        if (!install || install((void *)pm, (void *)pf) != 0) {
            snprintf(msg, sizeof msg, "ERROR replacer %s\n", r ? "install failed" : dlerror());
            out(msg);
            return 3;
        }
    }
    unsigned long long allocs = 0, frees = 0, bytes = 0, freed = 0;
    for (int i = 0; i < n; i++) {
        size_t s = 8 + (size_t)(i * 37 % 500);
        blk[i] = pm(s);
        if (blk[i]) {
            allocs++;
            bytes += s;
        }
        if (i % 3 == 2 && blk[i - 1]) {
            pf(blk[i - 1]);
            frees++;
            freed += 8 + (size_t)((i - 1) * 37 % 500);
            blk[i - 1] = NULL;
        }
    }
    snprintf(msg, sizeof msg,
             "DONE {\"total_allocations\":%llu,\"total_frees\":%llu,\"total_bytes_allocated\":%llu,"
             "\"total_bytes_freed\":%llu,\"current_allocations\":%llu,"
             "\"current_bytes_allocated\":%llu}\n",
             allocs, frees, bytes, freed, allocs - frees, bytes - freed);
    out(msg);
    wait_line();
    if (r != NULL) {
        /* the monitor has left: the replacer's patch must still be in place */
        calls_fn calls = (calls_fn)dlsym(r, "replacer_calls");
        unsigned long before = calls();
        pf(pm(100));
        if (calls() != before + 1) {
            out("ERROR replacer patch gone after the monitor left\n");
            return 4;
        }
    }
    return 0;
}
