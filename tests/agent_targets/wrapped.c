/* Wrapper-aware callers and sampled stacks (tests/test_agent_wrappers.py, test_agent_sampling.py).
 * Built with -fno-omit-frame-pointer -rdynamic (the test profile names the wrappers by export).
 * stdin commands, each answered by "done":
 *   direct N     N x malloc(100) in direct_alloc
 *   wrapped N    N x my_wrapper(100) in via_wrapper (my_wrapper -> malloc)
 *   outer N      N x outer_wrapper(100) in via_outer (outer_wrapper -> my_wrapper -> malloc)
 *   wcalloc N    N x my_wrapper_calloc(100) in via_wrapper_calloc (-> calloc)
 *   chain N S    N x f1 -> f2 -> f3 -> malloc(S)
 *   bytes N S    N x malloc(S) + free in churn
 *   release      every block kept so far: my_wrapper_free in release_all (-> free)
 * Startup: "ready <address of main>" (the test computes the load bias from nm). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__ ((noinline))

static void *kept[1 << 16];
static int nkept;

static void keep(void *p) { if (nkept < (int) (sizeof kept / sizeof kept[0])) kept[nkept++] = p; else free(p); }

NOINLINE void *my_wrapper(size_t n) { void *p = malloc(n); __asm__ volatile ("" ::: "memory"); return p; }
NOINLINE void *my_wrapper_calloc(size_t n) { void *p = calloc(1, n); __asm__ volatile ("" ::: "memory"); return p; }
NOINLINE void my_wrapper_free(void *p) { free(p); __asm__ volatile ("" ::: "memory"); }
NOINLINE void *outer_wrapper(size_t n) { void *p = my_wrapper(n); __asm__ volatile ("" ::: "memory"); return p; }

NOINLINE void direct_alloc(int n) { for (int i = 0; i < n; i++) keep(malloc(100)); }
NOINLINE void via_wrapper(int n) { for (int i = 0; i < n; i++) keep(my_wrapper(100)); }
NOINLINE void via_outer(int n) { for (int i = 0; i < n; i++) keep(outer_wrapper(100)); }
NOINLINE void via_wrapper_calloc(int n) { for (int i = 0; i < n; i++) keep(my_wrapper_calloc(100)); }
NOINLINE void release_all(void) { while (nkept > 0) my_wrapper_free(kept[--nkept]); }

NOINLINE void *f3(size_t s) { void *p = malloc(s); __asm__ volatile ("" ::: "memory"); return p; }
NOINLINE void *f2(size_t s) { void *p = f3(s); __asm__ volatile ("" ::: "memory"); return p; }
NOINLINE void *f1(size_t s) { void *p = f2(s); __asm__ volatile ("" ::: "memory"); return p; }
NOINLINE void chain(int n, size_t s) { for (int i = 0; i < n; i++) free(f1(s)); }

NOINLINE void churn(int n, size_t s) { for (int i = 0; i < n; i++) free(malloc(s)); }

int main(void) {
    char line[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %p\n", (void *) main);
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "";
        long n = 0, s = 0;
        sscanf(line, "%31s %ld %ld", cmd, &n, &s);
        if (!strcmp(cmd, "direct")) direct_alloc((int) n);
        else if (!strcmp(cmd, "wrapped")) via_wrapper((int) n);
        else if (!strcmp(cmd, "outer")) via_outer((int) n);
        else if (!strcmp(cmd, "wcalloc")) via_wrapper_calloc((int) n);
        else if (!strcmp(cmd, "chain")) chain((int) n, (size_t) s);
        else if (!strcmp(cmd, "bytes")) churn((int) n, (size_t) s);
        else if (!strcmp(cmd, "release")) release_all();
        else if (!strcmp(cmd, "end")) break;
        printf("done\n");
    }
    return 0;
}
