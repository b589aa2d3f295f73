/* A fake FalloutNV.exe for Linux (-m32 -no-pie): the allocator entry points of the real game at
 * the real addresses (each function in its own section, placed with --section-start by the
 * build, see tests/fnv/build.py), thiscall where the game's are, a MemoryManager object at
 * 0x011F6238, and a known multi-threaded workload. Prints its ground truth per hook name, per
 * heap and per module so a test can compare the monitor's records and JSON exactly.
 *
 * usage: fake_game CRT_DIR [PLUGIN.so TAG CRT.so]...
 *   stdin/stdout protocol (tests/agent_harness.Monitored): prints "ready PID", waits for a
 *   line (unless FAKE_GAME_AUTORUN=1), runs the workload, prints "gt ..." lines then "done",
 *   waits for a line (or EOF), frees what it had kept (the game goes on after
 *   the monitor left), prints "bye" and exits 0. Aborts (exit by SIGABRT) on any inconsistency: a
 *   wrong `this`, a block freed by a heap that does not own it, a bad result.
 * env: FAKE_GAME_THREADS (4), FAKE_GAME_ITERS (300), FAKE_GAME_SUSPEND=1 (SIGSTOP itself first:
 *   "created suspended", for the fake loader), FAKE_REPLACER=early|late (load libfake_nvhr.so
 *   from CRT_DIR and let it patch the entry points before "ready" or after the go line).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <ucontext.h>

#include "fake_game.h"

#define AT(addr) __attribute__((section(".fnv_" #addr), noinline, used))

extern void *__libc_malloc (size_t);
extern void __libc_free (void *);
extern void *__libc_calloc (size_t, size_t);
extern void *__libc_realloc (void *, size_t);
extern void *__libc_memalign (size_t, size_t);

static void die (const char *what) {
  fprintf (stderr, "fake_game: %s\n", what);
  fflush (stderr);
  abort ();
}

/* ---------------------------------------------------------------- the game's heap object */

MemoryManager g_heap __attribute__((section(".fnv_011f6238"), used)) = { GAME_MAGIC, 0 };

typedef struct ScrapHeap {
  uint32_t magic;
  uint32_t owner; /* thread id */
} ScrapHeap;
#define SCRAP_MAGIC 0x53435250u

/* game heap blocks carry a 16-byte header: magic, size */
static void *game_block (size_t size) {
  uint32_t *h = __libc_malloc (size + 16);
  if (h == NULL) return NULL;
  h[0] = GAME_MAGIC;
  h[1] = (uint32_t) size;
  return h + 4;
}

static uint32_t *game_header (void *p) {
  uint32_t *h = (uint32_t *) p - 4;
  if (h[0] != GAME_MAGIC) die ("MemoryManager got a block it does not own");
  return h;
}

static void check_heap (MemoryManager *self) {
  if (self != &g_heap || self->magic != GAME_MAGIC) die ("MemoryManager: wrong this");
  __atomic_add_fetch (&self->calls, 1, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- entry points at FNV addresses */

AT(00aa3e40) void *THISCALL MM_Allocate (MemoryManager *self, size_t size) {
  check_heap (self);
  return game_block (size);
}

AT(00aa4060) void THISCALL MM_Free (MemoryManager *self, void *p) {
  check_heap (self);
  if (p != NULL) {
    uint32_t *h = game_header (p);
    h[0] = 0;
    __libc_free (h);
  }
}

AT(00aa4150) void *THISCALL MM_Reallocate (MemoryManager *self, void *p, size_t size) {
  check_heap (self);
  if (p == NULL) return game_block (size);
  uint32_t *h = game_header (p);
  h = __libc_realloc (h, size + 16);
  if (h == NULL) return NULL;
  h[1] = (uint32_t) size;
  return h + 4;
}

AT(00aa4200) void *THISCALL MM_Reallocate2 (MemoryManager *self, void *p, size_t size) {
  return MM_Reallocate (self, p, size); /* nested: recorded once, under this entry */
}

AT(00aa44c0) size_t THISCALL MM_Size (MemoryManager *self, void *p) {
  check_heap (self);
  return game_header (p)[1];
}

static void check_scrap (ScrapHeap *self) {
  if (self == NULL || self->magic != SCRAP_MAGIC || self->owner != (uint32_t) syscall (SYS_gettid))
    die ("ScrapHeap: wrong this");
}

AT(00aa54a0) void *THISCALL Scrap_Allocate (ScrapHeap *self, size_t size, size_t align) {
  check_scrap (self);
  return __libc_memalign (align, size);
}

AT(00aa5610) void THISCALL Scrap_Deallocate (ScrapHeap *self, void *p) {
  check_scrap (self);
  __libc_free (p);
}

AT(00aa5710) size_t THISCALL Scrap_Size (ScrapHeap *self, void *p) {
  check_scrap (self);
  return malloc_usable_size (p);
}

/* cdecl wrappers of the game heap (profile role "wrapper"): FormHeap_Allocate/Free (at fake
 * addresses, see fake_game.h) and Gamebryo's Ni_Alloc/Ni_Free (at theirs) */
AT(00a01000) void *FormHeap_Allocate (size_t size) { return MM_Allocate (&g_heap, size); }
AT(00a01030) void FormHeap_Free (void *p) { MM_Free (&g_heap, p); }
AT(00aa13e0) void *Ni_Alloc (size_t size) { return MM_Allocate (&g_heap, size); }
AT(00aa1460) void Ni_Free (void *p, size_t size) { (void) size; MM_Free (&g_heap, p); }

/* the statically linked CRT (cdecl) */
AT(00ecd1c7) void *crt_malloc (size_t n) { return __libc_malloc (n); }
AT(00ecd291) void crt_free (void *p) { __libc_free (p); }
AT(00eddd7d) void *crt_calloc (size_t n, size_t m) { return __libc_calloc (n, m); }
AT(00eccf5d) void *crt_realloc (void *p, size_t n) { return __libc_realloc (p, n); }
AT(00ecd31f) size_t crt_msize (void *p) { return malloc_usable_size (p); }
AT(00ed0cdf) void *crt_malloc2 (size_t n) { return __libc_malloc (n); }
AT(00ed0d24) void *crt_calloc2 (size_t n, size_t m) { return __libc_calloc (n, m); }
AT(00ed0d70) void *crt_realloc2 (void *p, size_t n) { return __libc_realloc (p, n); }
/* _recalloc: realloc to n * m bytes, the added bytes zeroed */
static void *recalloc_impl (void *p, size_t n, size_t m) {
  size_t old = p ? malloc_usable_size (p) : 0;
  char *q = __libc_realloc (p, n * m);
  if (q != NULL && n * m > old) memset (q + old, 0, n * m - old);
  return q;
}
AT(00ee1700) void *crt_recalloc (void *p, size_t n, size_t m) { return recalloc_impl (p, n, m); }
AT(00ed0dbe) void *crt_recalloc2 (void *p, size_t n, size_t m) { return recalloc_impl (p, n, m); }

/* ---------------------------------------------------------------- ground truth */

#define MAX_TRUTH 64
static struct { char name[48]; unsigned long long calls, bytes; } truth[MAX_TRUTH];
static int ntruth;
static pthread_mutex_t truth_lock = PTHREAD_MUTEX_INITIALIZER;

static void count (const char *hook, unsigned long long bytes) {
  pthread_mutex_lock (&truth_lock);
  int i;
  for (i = 0; i < ntruth && strcmp (truth[i].name, hook) != 0; i++)
    ;
  if (i == ntruth) {
    if (ntruth == MAX_TRUTH) die ("too many hooks");
    snprintf (truth[ntruth++].name, sizeof truth[0].name, "%s", hook);
  }
  truth[i].calls++;
  truth[i].bytes += bytes;
  pthread_mutex_unlock (&truth_lock);
}

static unsigned long long live_game, live_crt, live_main_dll;
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
/* blocks left allocated, freed after the monitor left: the game must keep running unharmed */
#define MAX_KEPT 65536
static void *kept_game[MAX_KEPT], *kept_crt[MAX_KEPT];
static int nkept_game, nkept_crt;

static void keep (void **list, int *n, void *p) {
  pthread_mutex_lock (&live_lock);
  if (*n < MAX_KEPT) list[(*n)++] = p;
  pthread_mutex_unlock (&live_lock);
}
static int iters = 300;

static void *worker (void *arg) {
  unsigned t = (unsigned) (size_t) arg;
  ScrapHeap scrap = { SCRAP_MAGIC, (uint32_t) syscall (SYS_gettid) };
  unsigned long long lg = 0, lc = 0;
  for (int i = 0; i < iters; i++) {
    size_t sz = 16 + (size_t) ((i * 37u + t * 11u) % 500u);

    /* game heap */
    char *p = MM_Allocate (&g_heap, sz);
    count ("MemoryManager::Allocate", sz);
    if (p == NULL) die ("MM_Allocate failed");
    memset (p, 0xAB, sz);
    size_t cur = sz;
    if (i % 3 == 0) {
      cur = sz * 2;
      p = MM_Reallocate (&g_heap, p, cur);
      count ("MemoryManager::Reallocate", cur);
    }
    if (i % 5 == 0) {
      cur = sz + 8;
      p = MM_Reallocate2 (&g_heap, p, cur);
      count ("MemoryManager::Reallocate2", cur);
    }
    if (p == NULL || (unsigned char) p[0] != 0xAB) die ("game heap realloc lost the block");
    if (MM_Size (&g_heap, p) != cur) die ("MM_Size disagrees");
    if (i % 4 == 0) {
      lg += cur; /* left allocated */
      keep (kept_game, &nkept_game, p);
    } else {
      MM_Free (&g_heap, p);
      count ("MemoryManager::Free", 0);
    }

    /* scrap heap */
    size_t align = (size_t) 8 << (i % 3);
    void *s = Scrap_Allocate (&scrap, sz, align);
    count ("ScrapHeap::Allocate", sz);
    if (s == NULL || ((size_t) s & (align - 1)) || Scrap_Size (&scrap, s) < sz)
      die ("scrap allocation");
    Scrap_Deallocate (&scrap, s);
    count ("ScrapHeap::Deallocate", 0);

    /* static CRT */
    char *c = crt_malloc (sz);
    count ("crt!malloc", sz);
    if (i % 2) {
      c = crt_realloc (c, sz + 1);
      count ("crt!realloc", sz + 1);
    }
    if (c == NULL || crt_msize (c) < sz) die ("crt malloc");
    if (i % 7 == 0) {
      lc += i % 2 ? sz + 1 : sz;
      keep (kept_crt, &nkept_crt, c);
    } else {
      crt_free (c);
      count ("crt!free", 0);
    }
    char *z = crt_calloc (3, sz);
    count ("crt!calloc", 3 * sz);
    if (z == NULL || z[3 * sz - 1] != 0) die ("crt calloc");
    if (i % 3 == 0) {
      z = crt_recalloc (z, 5, sz);
      count ("crt!_recalloc", 5 * sz);
      if (z == NULL || z[5 * sz - 1] != 0) die ("crt _recalloc");
    }
    crt_free (z);
    count ("crt!free", 0);
    if (i % 10 == 0) {
      char *a = crt_malloc2 (sz);
      count ("crt!malloc2", sz);
      a = crt_realloc2 (a, 2 * sz);
      count ("crt!realloc2", 2 * sz);
      crt_free (a);
      count ("crt!free", 0);
      char *b = crt_calloc2 (2, sz);
      count ("crt!calloc2", 2 * sz);
      b = crt_recalloc2 (b, 3, sz);
      count ("crt!_recalloc2", 3 * sz);
      if (b == NULL || b[3 * sz - 1] != 0) die ("crt _recalloc2");
      crt_free (b);
      count ("crt!free", 0);
    }
  }
  pthread_mutex_lock (&live_lock);
  live_game += lg;
  live_crt += lc;
  pthread_mutex_unlock (&live_lock);
  return NULL;
}

static const char *base_name (const char *path) {
  const char *s = strrchr (path, '/');
  return s ? s + 1 : path;
}

static void load_replacer (const char *crt_dir) {
  char path[4096];
  snprintf (path, sizeof path, "%s/libfake_nvhr.so", crt_dir);
  void *h = dlopen (path, RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) die (dlerror ());
  nvhr_install_fn install = (nvhr_install_fn) dlsym (h, "nvhr_install");
  if (install == NULL || install () != 0) die ("nvhr_install failed");
}

/* a crash report naming the faulting instruction, for tests that check the game survives */
static void on_fault (int sig, siginfo_t *si, void *uc_) {
  ucontext_t *uc = uc_;
  char msg[200];
  unsigned long esp = (unsigned long) uc->uc_mcontext.gregs[REG_ESP];
  int n = snprintf (msg, sizeof msg, "fake_game: signal %d at eip %#lx, address %p, [esp] %#lx\n",
                    sig, (unsigned long) uc->uc_mcontext.gregs[REG_EIP], si->si_addr,
                    esp ? (unsigned long) *(uint32_t *) esp : 0ul);
  if (write (2, msg, (size_t) n) < 0) _exit (128 + sig);
  _exit (128 + sig);
}

static void wait_line (void) {
  char buf[256];
  if (fgets (buf, sizeof buf, stdin) == NULL) return;
}

int main (int argc, char **argv) {
  setvbuf (stdout, NULL, _IOLBF, 0);
  struct sigaction sa;
  memset (&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigaction (SIGSEGV, &sa, NULL);
  sigaction (SIGILL, &sa, NULL);
  sigaction (SIGBUS, &sa, NULL);
  if (argc < 2 || (argc - 2) % 3 != 0) {
    fprintf (stderr, "usage: %s CRT_DIR [PLUGIN.so TAG CRT.so]...\n", argv[0]);
    return 2;
  }
  const char *env;
  if ((env = getenv ("FAKE_GAME_SUSPEND")) && *env == '1') raise (SIGSTOP);
  int nthreads = (env = getenv ("FAKE_GAME_THREADS")) ? atoi (env) : 4;
  if ((env = getenv ("FAKE_GAME_ITERS"))) iters = atoi (env);
  const char *replacer = getenv ("FAKE_REPLACER");
  int autorun = (env = getenv ("FAKE_GAME_AUTORUN")) && *env == '1';

  if (replacer && strcmp (replacer, "early") == 0) load_replacer (argv[1]);
  printf ("ready %d\n", (int) getpid ());
  if (!autorun) wait_line ();
  if (replacer && strcmp (replacer, "late") == 0) load_replacer (argv[1]);

  pthread_t th[64];
  if (nthreads < 1 || nthreads > 64) die ("FAKE_GAME_THREADS out of range");
  for (int t = 0; t < nthreads; t++)
    if (pthread_create (&th[t], NULL, worker, (void *) (size_t) t) != 0) die ("pthread_create");
  for (int t = 0; t < nthreads; t++) pthread_join (th[t], NULL);

  /* the game's own use of a CRT DLL (like d3dx9 with msvcrt): attributed to the executable */
  char path[4096];
  snprintf (path, sizeof path, "%s/libfake_msvcr120.so", argv[1]);
  void *crt = dlopen (path, RTLD_NOW | RTLD_LOCAL);
  if (crt == NULL) die (dlerror ());
  void *(*dll_malloc) (size_t) = (void *(*) (size_t)) dlsym (crt, "malloc");
  void (*dll_free) (void *) = (void (*) (void *)) dlsym (crt, "free");
  if (!dll_malloc || !dll_free) die ("libfake_msvcr120.so exports");
  for (int i = 0; i < 10; i++) {
    void *q = dll_malloc (1000 + i);
    count ("msvcr!malloc", 1000 + i);
    if (i % 2) {
      dll_free (q);
      count ("msvcr!free", 0);
    } else {
      live_main_dll += 1000 + i;
    }
  }

  /* plugins (loaded after attach, like NVSE plugins) */
  unsigned long long plugin_live[16];
  int nplugins = (argc - 2) / 3;
  for (int k = 0; k < nplugins && k < 16; k++) {
    void *h = dlopen (argv[2 + 3 * k], RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) die (dlerror ());
    plugin_run_fn run = (plugin_run_fn) dlsym (h, "plugin_run");
    if (run == NULL) die ("plugin_run missing");
    plugin_live[k] = run (argv[4 + 3 * k], argv[3 + 3 * k], count, k == 0);
  }

  unsigned long long plugin_game_live = 0;
  for (int i = 0; i < ntruth; i++)
    printf ("gt hook %s %llu %llu\n", truth[i].name, truth[i].calls, truth[i].bytes);
  /* the first plugin leaves 4 game-heap blocks (see fake_plugin.c), one through FormHeap */
  if (nplugins > 0) plugin_game_live = 300 + 301 + 302 + 400;
  printf ("gt heap game %llu\n", live_game + plugin_game_live);
  printf ("gt heap scrap 0\n");
  printf ("gt heap crt %llu\n", live_crt);
  unsigned long long dll_live = live_main_dll;
  for (int k = 0; k < nplugins; k++) dll_live += plugin_live[k] - (k == 0 ? plugin_game_live : 0);
  printf ("gt heap dll-crt %llu\n", dll_live);
  printf ("gt module %s %llu\n", base_name (argv[0]), live_game + live_crt + live_main_dll);
  for (int k = 0; k < nplugins; k++)
    printf ("gt module %s %llu\n", base_name (argv[2 + 3 * k]), plugin_live[k]);
  /* live bytes by (calling module, heap) */
  printf ("gt live %s game %llu\n", base_name (argv[0]), live_game);
  printf ("gt live %s crt %llu\n", base_name (argv[0]), live_crt);
  printf ("gt live %s dll-crt %llu\n", base_name (argv[0]), live_main_dll);
  for (int k = 0; k < nplugins; k++) {
    unsigned long long g = k == 0 ? plugin_game_live : 0;
    if (g) printf ("gt live %s game %llu\n", base_name (argv[2 + 3 * k]), g);
    printf ("gt live %s dll-crt %llu\n", base_name (argv[2 + 3 * k]), plugin_live[k] - g);
  }
  printf ("gt game_calls %d\n", (int) g_heap.calls);
  printf ("done\n");
  wait_line ();
  for (int i = 0; i < nkept_game; i++) {
    if (MM_Size (&g_heap, kept_game[i]) == 0) die ("kept game block has size 0");
    MM_Free (&g_heap, kept_game[i]);
  }
  for (int i = 0; i < nkept_crt; i++) crt_free (kept_crt[i]);
  printf ("bye\n");
  return 0;
}
