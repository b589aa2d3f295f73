/* A realloc that moves its block to the address another thread frees during the call
 * (tests/test_realloc_race.py, docs/agent.md "Ordering guarantees"). The program's own allocator,
 * exported (built with -rdynamic) and hooked through a profile: rr_malloc / rr_free / rr_realloc
 * over a pool of 4 slots, first free slot first. rr_realloc waits, inside the call, until the
 * other thread has freed block q, then takes the first free slot, which is q's: the realloc's
 * record was reserved before q's FREE, its new block is q.
 *   round 1: a = rr_malloc(16), q1 = rr_malloc(32); rr_realloc(a, 64) moves a to q1
 *   round 2: q2 = rr_malloc(24) (a's old slot); rr_realloc(NULL, 48) gets q2's slot
 * Live at the end (never freed): q1 with 64 bytes, q2 with 48.
 * Protocol: READY <pid>, wait for a line, work, DONE {json}, wait for a line, exit. */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "target_io.h"

#define API __attribute__((noinline, noipa, visibility("default")))
#define SLOTS 4
#define SLOT_BYTES 256

static _Alignas(16) unsigned char pool[SLOTS][SLOT_BYTES];
static int used[SLOTS] = {0, 0, 1, 1}; /* 2 and 3 stay taken: q's slot is the first free one */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int in_realloc, q_freed; /* __atomic */

static int wait_for(int *flag) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (!__atomic_load_n(flag, __ATOMIC_ACQUIRE)) {
        sched_yield();
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 20) return 0;
    }
    return 1;
}

static void *take_first_free(void) {
    for (int i = 0; i < SLOTS; i++)
        if (!used[i]) {
            used[i] = 1;
            return pool[i];
        }
    return NULL;
}

static int slot_of(void *p) { return (int)(((unsigned char *)p - &pool[0][0]) / SLOT_BYTES); }

API void *rr_malloc(size_t n) {
    void *p = NULL;
    pthread_mutex_lock(&lock);
    if (n <= SLOT_BYTES) p = take_first_free();
    pthread_mutex_unlock(&lock);
    return p;
}

API void rr_free(void *p) {
    if (p == NULL) return;
    pthread_mutex_lock(&lock);
    used[slot_of(p)] = 0;
    pthread_mutex_unlock(&lock);
}

API void *rr_realloc(void *p, size_t n) {
    void *q = NULL;
    __atomic_store_n(&in_realloc, 1, __ATOMIC_RELEASE);
    if (!wait_for(&q_freed)) return NULL; /* the other thread frees q now */
    pthread_mutex_lock(&lock);
    if (n <= SLOT_BYTES) q = take_first_free();
    if (q != NULL && p != NULL) {
        memcpy(q, p, SLOT_BYTES);
        used[slot_of(p)] = 0;
    }
    pthread_mutex_unlock(&lock);
    return q;
}

static void *q_block;

static void *freer(void *arg) {
    (void)arg;
    if (wait_for(&in_realloc)) rr_free(q_block);
    __atomic_store_n(&q_freed, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* One round: q is freed by another thread while rr_realloc(p, n) runs; returns its result. */
static void *round_trip(void *p, size_t n) {
    pthread_t t;
    __atomic_store_n(&in_realloc, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&q_freed, 0, __ATOMIC_RELEASE);
    pthread_create(&t, NULL, freer, NULL);
    void *r = rr_realloc(p, n);
    pthread_join(t, NULL);
    return r;
}

int main(void) {
    char buf[320];
    snprintf(buf, sizeof buf, "READY %d\n", (int)getpid());
    out(buf);
    wait_line();
    void *a = rr_malloc(16);
    q_block = rr_malloc(32);
    void *q1 = q_block;
    void *r1 = round_trip(a, 64);
    q_block = rr_malloc(24);
    void *q2 = q_block;
    void *r2 = round_trip(NULL, 48);
    snprintf(buf, sizeof buf,
             "DONE {\"ok\": %s, \"r1\": %lu, \"r2\": %lu, \"q1\": %lu, \"q2\": %lu}\n",
             (r1 == q1 && r2 == q2 && r1 != a && a == q2) ? "true" : "false",
             (unsigned long)(uintptr_t)r1, (unsigned long)(uintptr_t)r2,
             (unsigned long)(uintptr_t)q1, (unsigned long)(uintptr_t)q2);
    out(buf);
    wait_line();
    return 0;
}
