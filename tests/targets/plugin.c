/* A "plugin" with its own allocator exports, loaded by plugin_host with dlopen after the monitor
 * attached: the test profile hooks plugin_malloc / plugin_free by module + export on load.
 * A bump allocator over a static arena with a size header: no libc allocator calls at all. */
#include <stddef.h>
#include <string.h>

#define ARENA (8u << 20)
static unsigned char arena[ARENA] __attribute__((aligned(16)));
static size_t top;
static size_t live_blocks;

__attribute__((noinline, visibility("default"))) void *plugin_malloc(size_t n) {
    size_t need = (n + sizeof(size_t) + 15) & ~(size_t)15;
    if (n == 0 || need > ARENA - top) return NULL;
    size_t *h = (size_t *)(arena + top);
    top += need;
    *h = n;
    live_blocks++;
    memset(h + 1, 0xA5, n < 64 ? n : 64);
    return h + 1;
}

__attribute__((noinline, visibility("default"))) void plugin_free(void *p) {
    if (!p) return;
    size_t *h = (size_t *)p - 1;
    if (*h == 0) return; /* double free: ignore */
    memset(p, 0xDD, *h < 64 ? *h : 64);
    *h = 0;
    live_blocks--;
}

__attribute__((visibility("default"))) size_t plugin_live_blocks(void) { return live_blocks; }
