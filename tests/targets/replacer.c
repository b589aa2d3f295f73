/* A heap replacer for tests/targets/plugin.c, like NVHR for the game: replacer_install() writes a
 * jump over plugin_malloc / plugin_free into its own functions (libc malloc/free), the way code
 * patchers do it: make the page writable, write, restore the protection. x86_64 uses the 14-byte
 * absolute form (jmp [rip+0]; .quad dest: a library can be > 2 GiB away), ia32 a 5-byte JMP. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned long calls;

static void *rep_malloc(size_t n) {
    __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    return malloc(n);
}

/* how many plugin_malloc calls reached the replacer (its patch is still there) */
__attribute__((visibility("default"))) unsigned long replacer_calls(void) { return calls; }
static void rep_free(void *p) { free(p); }

static int patch(void *at, void *to) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)at & ~(page - 1);
    size_t len = (((uintptr_t)at + 16 - start) + page - 1) & ~(page - 1);
    if (mprotect((void *)start, len, PROT_READ | PROT_WRITE | PROT_EXEC) != 0) return -1;
    unsigned char *p = at;
#if UINTPTR_MAX > 0xffffffffu
    static const unsigned char jmp_rip[6] = {0xFF, 0x25, 0, 0, 0, 0};
    uint64_t dest = (uint64_t)(uintptr_t)to;
    memcpy(p, jmp_rip, 6);
    memcpy(p + 6, &dest, 8);
    __builtin___clear_cache((char *)p, (char *)p + 14);
#else
    int32_t rel = (int32_t)((uintptr_t)to - ((uintptr_t)at + 5));
    p[0] = 0xE9;
    memcpy(p + 1, &rel, 4);
    __builtin___clear_cache((char *)p, (char *)p + 5);
#endif
    return mprotect((void *)start, len, PROT_READ | PROT_EXEC);
}

__attribute__((visibility("default"))) int replacer_install(void *plugin_malloc, void *plugin_free) {
    return patch(plugin_malloc, (void *)rep_malloc) | patch(plugin_free, (void *)rep_free);
}
