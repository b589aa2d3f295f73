/* Times N malloc+free pairs per round; prints "round <ns per call>" (two calls per pair).
 * Usage: bench_target N ROUNDS. Protocol: "ready <pid>"; then for each of ROUNDS lines read
 * from stdin: run one timed round, print "<ns_per_call>\n". Exit on EOF. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1000000;
  /* sizes 16 + (i & mask): 63 (default) = 16..79 bytes, 4095 = 16 B..4 KiB (mean ~2 KiB) */
  long mask = argc > 2 ? atol(argv[2]) : 63;
  void *(*volatile m)(size_t) = malloc;  /* through a pointer: gcc may not elide the pairs */
  void (*volatile f)(void *) = free;
  char buf[64];
  int len = snprintf(buf, sizeof buf, "ready %d\n", getpid());
  write(1, buf, len);
  char c;
  for (;;) {
    /* one command line per round */
    ssize_t r;
    while ((r = read(0, &c, 1)) == 1 && c != '\n') {}
    if (r != 1) break;
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
      void *p = m(16 + (i & mask));
      f(p);
    }
    double t1 = now_ns();
    len = snprintf(buf, sizeof buf, "%.2f\n", (t1 - t0) / (2.0 * n));
    write(1, buf, len);
  }
  return 0;
}
