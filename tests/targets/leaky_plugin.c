/* The dlopen'd part of leaky.c: leaks n blocks of `size` bytes from one call site. */
#include <stdlib.h>

void *plugin_keep[1000];

__attribute__((noinline, visibility("default"))) int plugin_leak(int n, size_t size) {
    int ok = 0;
    for (int i = 0; i < n && i < 1000; i++) {
        plugin_keep[i] = malloc(size);
        ok += plugin_keep[i] != NULL;
    }
    return ok;
}
