/* A libc allocator workload that prints its own ground truth, for the live tests.
 *
 * It goes through malloc, calloc, realloc (grow, shrink, NULL -> alloc, n -> 0 = free),
 * aligned_alloc, posix_memalign and free with deterministic sizes, and counts what a monitor
 * must see in the engine's terms (realloc(p, n) = free(old) + alloc(new)).
 *
 * Nothing but the workload may call the allocator while a monitor watches, so output goes
 * through snprintf into stack buffers + write(2), and waiting uses read(2) on stdin.
 *
 * Usage: workload [--wait] [--threads T] [--iters N] [--pre P] [--rounds R] [--seed S]
 *   --wait      print "READY <pid>" and wait for a line on stdin before the workload (attach
 *               mode), then print "DONE {json}" and wait for another line before exiting so
 *               thread teardown happens after the monitor left.
 *   --threads   T worker threads (created before READY), each running the workload.
 *   --iters     blocks per round and thread.
 *   --pre       P blocks malloc'd before READY and freed during the workload: untracked frees.
 *   --rounds    rounds of the workload (each leaves no block behind except the last round's
 *               leaks); with --checksum each block is filled and verified before it is freed.
 *   --pause-us  sleep between rounds (lets a test interrupt the monitor mid-run).
 *   --crash     after DONE, write through a NULL pointer (SIGSEGV): a target that crashes.
 *   --abort     after DONE, call abort() (SIGABRT): a target that gives up.
 * With --wait, after the second stdin line it prints "AFTER {json}" telling whether the first
 * bytes of malloc/free/calloc/realloc are again what they were before READY (hooks removed).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <ucontext.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "target_io.h"

typedef unsigned long long u64;

struct truth {
    u64 allocs, frees, bytes_alloc, bytes_freed, failures;
    u64 cur_allocs, cur_bytes, peak_allocs, peak_bytes;
    u64 n_malloc, n_calloc, n_realloc, n_free, n_aligned;
    u64 checksum;
    int bad; /* a block's content did not survive: the monitor harmed the target */
    long tid;
};

static int g_iters = 1000, g_rounds = 1, g_pre = 0, g_threads = 0, g_pause_us = 0;
static unsigned g_seed = 1;
static volatile uintptr_t g_crash_address = 0; /* volatile: a real store, not UB folding */
static pthread_barrier_t g_start, g_done, g_exit;


static unsigned next(unsigned *s) { /* xorshift32: same sizes on every run and arch */
    unsigned x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static void on_alloc(struct truth *t, size_t n) {
    t->allocs++;
    t->bytes_alloc += n;
    t->cur_allocs++;
    t->cur_bytes += n;
    if (t->cur_allocs > t->peak_allocs) t->peak_allocs = t->cur_allocs;
    if (t->cur_bytes > t->peak_bytes) t->peak_bytes = t->cur_bytes;
}

static void on_free(struct truth *t, size_t n) {
    t->frees++;
    t->bytes_freed += n;
    t->cur_allocs--;
    t->cur_bytes -= n;
}

static void fill(unsigned char *p, size_t n, unsigned key) {
    for (size_t i = 0; i < n; i += 61) p[i] = (unsigned char)(key + i);
}

static u64 verify(struct truth *t, const unsigned char *p, size_t n, unsigned key) {
    u64 sum = 0;
    for (size_t i = 0; i < n; i += 61) {
        if (p[i] != (unsigned char)(key + i)) t->bad = 1;
        sum += p[i];
    }
    return sum;
}

/* One round: phase 1 allocates (peak here), phase 2 frees half, phase 3 reallocs the rest to
 * at most their size + 64 (so the byte peak stays in phase 1 whatever order the engine applies
 * a realloc's free and alloc), phase 4 frees everything but `leak` blocks. */
static void round_(struct truth *t, unsigned *seed, void **blk, size_t *sz, int leak) {
    int n = g_iters;
    for (int i = 0; i < n; i++) {
        unsigned r = next(seed);
        size_t s = 16 + r % 2000;
        void *p;
        switch (r % 8) {
        case 0:
            p = calloc(s / 8, 8);
            s = (s / 8) * 8;
            t->n_calloc++;
            break;
        case 1:
            p = realloc(NULL, s);
            t->n_realloc++;
            break;
        case 2:
            p = aligned_alloc(64, (s + 63) & ~(size_t)63);
            s = (s + 63) & ~(size_t)63;
            t->n_aligned++;
            break;
        case 3:
            if (posix_memalign(&p, 32, s) != 0) p = NULL;
            t->n_aligned++;
            break;
        default:
            p = malloc(s);
            t->n_malloc++;
        }
        if (!p) {
            t->bad = 1;
            continue;
        }
        blk[i] = p;
        sz[i] = s;
        on_alloc(t, s);
        fill(p, s, (unsigned)i);
    }
    for (int i = 0; i < n; i += 2) {
        t->checksum += verify(t, blk[i], sz[i], (unsigned)i);
        free(blk[i]);
        t->n_free++;
        on_free(t, sz[i]);
        blk[i] = NULL;
    }
    for (int i = 1; i < n; i += 2) {
        size_t s = sz[i] + (next(seed) % 128);
        s = s > 64 + 8 ? s - 64 : 8; /* shrink or grow by up to 64 bytes */
        t->checksum += verify(t, blk[i], s < sz[i] ? s : sz[i], (unsigned)i);
        void *p = realloc(blk[i], s);
        t->n_realloc++;
        if (!p) {
            t->bad = 1;
            continue;
        }
        on_free(t, sz[i]);
        on_alloc(t, s);
        blk[i] = p;
        sz[i] = s;
    }
    for (int i = 1; i < n; i += 2) {
        if (i / 2 < leak) continue; /* leaked on purpose: live at the end */
        if (i % 4 == 1) {
            void *p = realloc(blk[i], 0); /* glibc: frees, returns NULL */
            t->n_realloc++;
            if (p) {
                free(p); /* not glibc behaviour; keep the truth right anyway */
                t->n_free++;
            }
        } else {
            free(blk[i]);
            t->n_free++;
        }
        on_free(t, sz[i]);
        blk[i] = NULL;
    }
}

static volatile size_t g_huge = SIZE_MAX - 4096; /* volatile: gcc must not fold these calls */

static void failures(struct truth *t) {
    /* Requests glibc refuses at once (no memory is touched): counted as failures. */
    for (int i = 0; i < 3; i++) {
        void *p = malloc(g_huge - 4096 * (size_t)i);
        t->n_malloc++;
        if (p) t->bad = 1; else t->failures++;
    }
    void *q = malloc(100);
    t->n_malloc++;
    on_alloc(t, 100);
    void *r = realloc(q, g_huge - 8192); /* fails: q stays allocated */
    t->n_realloc++;
    if (r) t->bad = 1; else t->failures++;
    free(r ? r : q);
    t->n_free++;
    on_free(t, 100);
}

struct worker {
    pthread_t th;
    struct truth t;
    unsigned seed;
    void **blk;
    size_t *sz;
    void **pre;
    int npre;
};

static void run(struct worker *w) {
    w->t.tid = (long)syscall(SYS_gettid);
    for (int r = 0; r < g_rounds; r++) {
        round_(&w->t, &w->seed, w->blk, w->sz, r == g_rounds - 1 ? 7 : 0);
        if (r == 0) {
            for (int i = 0; i < w->npre; i++) free(w->pre[i]); /* untracked after attach */
            w->t.n_free += (u64)w->npre;
            failures(&w->t);
        }
        if (g_pause_us) usleep((useconds_t)g_pause_us);
    }
}

static void *thread_main(void *arg) {
    struct worker *w = arg;
    pthread_barrier_wait(&g_start);
    run(w);
    pthread_barrier_wait(&g_done);
    pthread_barrier_wait(&g_exit); /* stay alive: thread exit frees libc's own TLS blocks */
    return NULL;
}

static void emit(const char *tag, struct worker *ws, int nw, u64 untracked) {
    struct truth s = {0};
    char buf[1024];
    char tids[8192];
    size_t tl = 0;
    tids[0] = 0;
    for (int i = 0; i < nw; i++) {
        struct truth *t = &ws[i].t;
        s.allocs += t->allocs;
        s.frees += t->frees;
        s.bytes_alloc += t->bytes_alloc;
        s.bytes_freed += t->bytes_freed;
        s.failures += t->failures;
        s.cur_allocs += t->cur_allocs;
        s.cur_bytes += t->cur_bytes;
        s.peak_allocs += t->peak_allocs;
        s.peak_bytes += t->peak_bytes;
        s.n_malloc += t->n_malloc;
        s.n_calloc += t->n_calloc;
        s.n_realloc += t->n_realloc;
        s.n_free += t->n_free;
        s.n_aligned += t->n_aligned;
        s.checksum += t->checksum;
        s.bad |= t->bad;
        tl += (size_t)snprintf(tids + tl, sizeof tids - tl,
                               "%s{\"tid\":%ld,\"allocs\":%llu,\"frees\":%llu,\"failures\":%llu}",
                               i ? "," : "", t->tid, t->allocs, t->frees, t->failures);
    }
    /* Peaks are exact only for one thread (several threads interleave in any order). */
    int exact_peaks = nw == 1;
    snprintf(buf, sizeof buf,
             "%s {\"total_allocations\":%llu,\"total_frees\":%llu,"
             "\"total_bytes_allocated\":%llu,\"total_bytes_freed\":%llu,"
             "\"current_allocations\":%llu,\"current_bytes_allocated\":%llu,"
             "\"peak_allocations\":%lld,\"peak_bytes_allocated\":%lld,"
             "\"allocation_failures\":%llu,\"untracked_frees\":%llu,"
             "\"calls\":{\"malloc\":%llu,\"calloc\":%llu,\"realloc\":%llu,\"free\":%llu,"
             "\"aligned\":%llu},\"checksum\":%llu,\"ok\":%s,\"pointer_bits\":%d,\"threads\":[",
             tag, s.allocs, s.frees, s.bytes_alloc, s.bytes_freed, s.cur_allocs, s.cur_bytes,
             exact_peaks ? (long long)s.peak_allocs : -1LL,
             exact_peaks ? (long long)s.peak_bytes : -1LL, s.failures, untracked, s.n_malloc,
             s.n_calloc, s.n_realloc, s.n_free, s.n_aligned, s.checksum, s.bad ? "false" : "true",
             (int)(8 * sizeof(void *)));
    out(buf);
    out(tids);
    out("]}\n");
}

static const char *const g_fn_names[] = {"malloc", "free", "calloc", "realloc"};
static unsigned char g_prologue[4][16];

static void save_prologues(unsigned char (*dst)[16]) {
    for (int i = 0; i < 4; i++) {
        const unsigned char *f = dlsym(RTLD_DEFAULT, g_fn_names[i]);
        if (f) memcpy(dst[i], f, 16);
    }
}

/* A crash report on stderr (the faulting pc and address, and the mapping the pc is in), then
 * the default action: when a test sees this target die after the monitor left, it says where. */
static void on_fault(int sig, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
#if defined(__x86_64__)
    unsigned long pc = (unsigned long)uc->uc_mcontext.gregs[REG_RIP];
#else
    unsigned long pc = (unsigned long)uc->uc_mcontext.gregs[REG_EIP];
#endif
    char msg[160];
    int n = snprintf(msg, sizeof msg, "FAULT signal %d pc %#lx address %p\n", sig, pc, si->si_addr);
    if (write(2, msg, (size_t)n) < 0) _exit(128 + sig);
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    while (maps != NULL && fgets(line, sizeof line, maps) != NULL) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= pc && pc < hi &&
            write(2, line, strlen(line)) < 0)
            break;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

int main(int argc, char **argv) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGILL, &sa, NULL);
    int wait = 0, crash = 0, give_up = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "0";
        if (!strcmp(a, "--wait")) wait = 1;
        else if (!strcmp(a, "--crash")) crash = 1;
        else if (!strcmp(a, "--abort")) give_up = 1;
        else if (!strcmp(a, "--threads")) g_threads = atoi(v), i++;
        else if (!strcmp(a, "--iters")) g_iters = atoi(v), i++;
        else if (!strcmp(a, "--pre")) g_pre = atoi(v), i++;
        else if (!strcmp(a, "--rounds")) g_rounds = atoi(v), i++;
        else if (!strcmp(a, "--seed")) g_seed = (unsigned)atoi(v), i++;
        else if (!strcmp(a, "--pause-us")) g_pause_us = atoi(v), i++;
        else {
            char msg[256];
            snprintf(msg, sizeof msg, "workload: unknown argument %s\n", a);
            out(msg);
            return 2;
        }
    }
    if (g_iters < 16) g_iters = 16;
    if (g_rounds < 1) g_rounds = 1;
    int nw = g_threads > 0 ? g_threads : 1;
    if (nw > 64) nw = 64;
    static struct worker ws[64];
    /* Bookkeeping memory comes from mmap, never from the monitored allocator. */
    size_t per = (size_t)g_iters * (sizeof(void *) + sizeof(size_t)) + (size_t)g_pre * sizeof(void *);
    char *tables = mmap(NULL, per * (size_t)nw + 4096, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tables == MAP_FAILED) return 3;
    for (int i = 0; i < nw; i++) {
        struct worker *w = &ws[i];
        char *base = tables + per * (size_t)i;
        w->blk = (void **)base;
        w->sz = (size_t *)(base + (size_t)g_iters * sizeof(void *));
        w->pre = (void **)(base + (size_t)g_iters * (sizeof(void *) + sizeof(size_t)));
        w->seed = g_seed * 2654435761u + (unsigned)i * 40503u + 1u;
        /* Allocated before the monitor attaches (attach mode): freed later = untracked frees. */
        w->npre = g_pre;
        for (int k = 0; k < g_pre; k++) w->pre[k] = malloc(24 + (size_t)k);
    }
    int threaded = g_threads > 0;
    if (threaded) {
        pthread_barrier_init(&g_start, NULL, (unsigned)nw + 1);
        pthread_barrier_init(&g_done, NULL, (unsigned)nw + 1);
        pthread_barrier_init(&g_exit, NULL, (unsigned)nw + 1);
        for (int i = 0; i < nw; i++)
            if (pthread_create(&ws[i].th, NULL, thread_main, &ws[i]) != 0) return 4;
    }
    save_prologues(g_prologue);
    if (wait) {
        char msg[64];
        snprintf(msg, sizeof msg, "READY %ld\n", (long)getpid());
        out(msg);
        wait_line();
    }
    if (threaded) {
        pthread_barrier_wait(&g_start);
        pthread_barrier_wait(&g_done);
    } else {
        run(&ws[0]);
    }
    emit("DONE", ws, nw, (u64)g_pre * (u64)nw);
    if (crash) *(volatile int *)(uintptr_t)g_crash_address = 42;
    if (give_up) abort();
    if (wait) {
        wait_line(); /* the monitor leaves before threads end and the process exits */
        unsigned char now[4][16];
        save_prologues(now);
        out(memcmp(now, g_prologue, sizeof now) ? "AFTER {\"prologue_restored\":false}\n"
                                                 : "AFTER {\"prologue_restored\":true}\n");
    }
    if (threaded) {
        pthread_barrier_wait(&g_exit);
        for (int i = 0; i < nw; i++) pthread_join(ws[i].th, NULL);
    }
    return 0;
}
