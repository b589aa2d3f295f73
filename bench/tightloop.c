/* bench/bench_pipeline.py's tight loop: N malloc+free pairs on one thread, as fast as it can,
 * started monitored from its first instruction (spawn, heaptrack). Prints the loop's own time:
 * "LOOP <ns per call>" (a call = one malloc or one free). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void *(*volatile g_malloc)(size_t) = malloc; /* not elided by the compiler */
static void (*volatile g_free)(void *) = free;

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 5000000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) g_free(g_malloc(16 + (i & 255)));
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("LOOP %.2f\n", ns / (2.0 * n));
    return 0;
}
