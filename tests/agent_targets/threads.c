/* N threads x M mixed allocator calls at once; prints per-thread tids and the exact totals.
 * Usage: threads NTHREADS OPS
 * Protocol: workers are created first and wait; prints "ready <pid>\n"; waits for a line; runs;
 * prints "tid <tid> <allocs> <frees> <reallocs> <failures> <bytes>" per worker, then
 * "total ..." and "done\n"; waits for a line; lets the workers exit and joins them.
 * Counting follows the agent: allocs = malloc/calloc results, reallocs = realloc calls,
 * frees = non-NULL frees, bytes = sizes of successful allocs and reallocs. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

typedef struct { long tid; unsigned long long allocs, frees, reallocs, failures, bytes; } Tally;
static pthread_barrier_t go, finished, leave;
static int ops;
static Tally tally[64];

static void *worker(void *arg) {
  Tally *t = arg;
  void *live[32] = {0};
  unsigned x = (unsigned)(uintptr_t)arg * 2654435761u + 1;
  t->tid = syscall(SYS_gettid);
  pthread_barrier_wait(&go);
  for (int i = 0; i < ops; i++) {
    x = x * 1103515245u + 12345u;
    int slot = (x >> 8) & 31;
    size_t size = 8 + ((x >> 16) & 1023);
    if (live[slot]) {
      if ((x >> 4) & 1) {
        void *p = realloc(live[slot], size);
        t->reallocs++; t->bytes += size; live[slot] = p;
      } else {
        free(live[slot]); t->frees++; live[slot] = NULL;
      }
    } else if ((x >> 5) & 1) {
      live[slot] = calloc(1 + (size & 7), 16); t->allocs++; t->bytes += (1 + (size & 7)) * 16;
    } else {
      live[slot] = malloc(size); t->allocs++; t->bytes += size;
    }
  }
  for (int s = 0; s < 32; s++) if (live[s]) { free(live[s]); t->frees++; }
  pthread_barrier_wait(&finished);
  pthread_barrier_wait(&leave);
  return NULL;
}

static void wait_line(void) { char c; while (read(0, &c, 1) == 1 && c != '\n') {} }

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 8;
  ops = argc > 2 ? atoi(argv[2]) : 10000;
  if (n > 64) n = 64;
  pthread_t th[64];
  pthread_barrier_init(&go, NULL, n + 1);
  pthread_barrier_init(&finished, NULL, n + 1);
  pthread_barrier_init(&leave, NULL, n + 1);
  for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, worker, &tally[i]);
  char buf[1 << 14]; size_t len = 0;
  len = snprintf(buf, sizeof buf, "ready %d\n", getpid());
  write(1, buf, len);
  wait_line();
  pthread_barrier_wait(&go);
  pthread_barrier_wait(&finished);
  Tally tot = {0};
  len = 0;
  for (int i = 0; i < n; i++) {
    Tally *t = &tally[i];
    len += snprintf(buf + len, sizeof buf - len, "tid %ld %llu %llu %llu %llu %llu\n", t->tid,
                    t->allocs, t->frees, t->reallocs, t->failures, t->bytes);
    tot.allocs += t->allocs; tot.frees += t->frees; tot.reallocs += t->reallocs;
    tot.failures += t->failures; tot.bytes += t->bytes;
  }
  len += snprintf(buf + len, sizeof buf - len, "total 0 %llu %llu %llu %llu %llu\ndone\n",
                  tot.allocs, tot.frees, tot.reallocs, tot.failures, tot.bytes);
  write(1, buf, len);
  wait_line();
  pthread_barrier_wait(&leave);
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  return 0;
}
