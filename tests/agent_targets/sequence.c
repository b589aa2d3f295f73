/* A known sequence of allocator calls, printed as ground truth.
 * Protocol on stdin/stdout (raw read/write, so stdio never allocates during the run):
 *   prints "ready <pid> <tid>\n"; waits for a line; runs the sequence; prints the truth lines
 *   and "done\n"; waits for a line; exits 0.
 * Truth lines: "<kind> <ptr> <old_ptr> <size>" with kind A (alloc), F (free), R (realloc),
 * X (failed), in call order, all on one thread (tid printed in "ready").
 * Marker: malloc(MARK) right before and after the sequence, so a test can cut the records. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#define MARK 0x7777
static char out[1 << 16];
static size_t outn;

static void line(const char *kind, void *p, void *old, unsigned long long size) {
  outn += snprintf(out + outn, sizeof out - outn, "%s %llu %llu %llu\n", kind,
                   (unsigned long long)(uintptr_t)p, (unsigned long long)(uintptr_t)old, size);
}
static void wait_line(void) { char c; while (read(0, &c, 1) == 1 && c != '\n') {} }

int main(void) {
  char hello[64];
  int n = snprintf(hello, sizeof hello, "ready %d %ld\n", getpid(), (long)syscall(SYS_gettid));
  write(1, hello, n);
  wait_line();

  void *m0 = malloc(MARK); line("A", m0, 0, MARK);
  void *keep[64]; int nk = 0;
  for (int i = 0; i < 20; i++) {
    size_t sz = 16 + i * 24;
    void *p = malloc(sz); line("A", p, 0, sz); keep[nk++] = p;
  }
  void *c = calloc(7, 13); line("A", c, 0, 7 * 13); keep[nk++] = c;
  void *r = realloc(keep[3], 5000); line("R", r, keep[3], 5000); keep[3] = r;
  void *volatile null = NULL;  /* gcc turns a literal realloc(NULL, n) into malloc(n) */
  void *r2 = realloc(null, 77); line("R", r2, 0, 77); keep[nk++] = r2;
  void *pm = NULL; int rc = posix_memalign(&pm, 64, 300); line(rc == 0 ? "A" : "X", pm, 0, 300); keep[nk++] = pm;
  void *aa = aligned_alloc(128, 256); line("A", aa, 0, 256); keep[nk++] = aa;
  void *ma = memalign(32, 100); line("A", ma, 0, 100); keep[nk++] = ma;
  void *big = malloc(3 << 20); line("A", big, 0, 3 << 20);
  free(big); line("F", big, 0, 0);
  size_t huge = (size_t)PTRDIFF_MAX + 1;  /* glibc refuses anything above PTRDIFF_MAX */
  void *fail = malloc(huge); line(fail ? "A" : "X", fail, 0, huge);
  /* calloc's size as the agent records it: the 64-bit product, saturated on overflow */
  unsigned long long cn = (size_t)-1 / 4, cm = 8, cs = cn * cm;
  if (cs / cm != cn) cs = ~0ULL;
  void *cfail = calloc((size_t)cn, (size_t)cm); line(cfail ? "A" : "X", cfail, 0, cs);
  void *rfail = realloc(keep[0], huge); line(rfail ? "R" : "X", rfail, keep[0], huge);
  free(NULL);  /* not recorded */
  void *r0 = realloc(keep[1], 0); line("R", r0, keep[1], 0); keep[1] = NULL;
  for (int i = 0; i < nk; i++) if (keep[i]) { free(keep[i]); line("F", keep[i], 0, 0); }
  void *m1 = malloc(MARK); line("A", m1, 0, MARK);
  free(m0); free(m1);

  write(1, out, outn);
  write(1, "done\n", 5);
  wait_line();
  return 0;
}
