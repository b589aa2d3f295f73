/* A fake FalloutNV.exe 1.4.0.525 (or, with -DFAKE_GECK, GECK.exe 1.4.0.518) as a real 32-bit PE:
 * image base 0x00400000 without ASLR, every allocator entry point at the real game's address with
 * a real prologue (push ebp; mov ebp, esp: no JMP), thiscall where the game's are, the
 * MemoryManager object at the real address, FormHeap_Allocate/Free wrappers at 0x00401000 and
 * worker threads with their own scrap heaps. Linked -nostdlib: no CRT code of its own, so every
 * call through a hooked entry point is one the game counts. Built by tests/windows/fakes.py.
 *
 * Environment:
 *   FAKE_GAME_TRUTH  file for the ground truth (default fnv_truth.txt in the working directory):
 *                    "pid N", then "gt call MODULE HOOK calls bytes live" lines and "done"
 *   FAKE_GAME_READY  file written with "PID\n" once the early plugins are loaded
 *   FAKE_GAME_GO     the workload waits until this file exists (unset: runs at once)
 *   FAKE_GAME_HOLD   after the truth, waits until this file exists before freeing what it kept
 *                    (unset: frees it before the truth, counted in it)
 *   FAKE_GAME_THREADS (4), FAKE_GAME_ITERS (300)
 *   FAKE_GAME_CRASH=1  an access violation right after the truth is written
 *   FAKE_GAME_BENCH=N  time N crt_malloc + crt_free pairs instead (see bench ())
 *   FAKE_REPLACER=early|late  nvhr_fake.dll patches the entry points before READY / after GO
 *   FAKE_GAME_PLUGINS  early plugins (DLL names in Data\NVSE\Plugins, ';'-separated) loaded
 *                      before READY, run after the workers; FAKE_GAME_LATE_PLUGINS: loaded and
 *                      run after them
 * Exit code 0; 3 on an inconsistency (a wrong `this`, a block freed by a heap that does not own
 * it, a wrong result), with the reason in the truth file.
 */
#include "pefake.h"

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
/* Entry points at fixed addresses: a section per page (placed by --section-start), padded up to
 * the entry with .org. The separator function makes GCC believe it is in .text again, so that
 * it names the page's section before the next function (COFF gas has no .previous). */
#define PAGE_AT(page, off)                                                               \
  __attribute__((used, noinline)) static void CAT (sep_, __LINE__) (void) {}             \
  __asm__ (".section .fnv_" #page ",\"x\"\n\t.org 0x" #off "\n\t.text\n");
#define IN_PAGE(page) __attribute__((section (".fnv_" #page), noinline, noipa, used))

typedef struct MemoryManager {
  unsigned magic;
  volatile LONG calls;
} MemoryManager;

typedef struct ScrapHeap {
  unsigned magic;
  DWORD owner; /* thread id */
} ScrapHeap;
#define SCRAP_MAGIC 0x53435250u

static HANDLE backing; /* a private Win32 heap behind every fake allocator */
static HANDLE truth_file;
static CRITICAL_SECTION truth_lock;

static void say (const char *s) {
  DWORD n = 0, len = 0;
  while (s[len]) len++;
  if (truth_file != NULL) WriteFile (truth_file, s, len, &n, NULL);
}

static void die (const char *why) {
  say ("error ");
  say (why);
  say ("\n");
  ExitProcess (3);
}

/* ---------------------------------------------------------------- the heap object */
#ifdef FAKE_GECK
struct heap_page { char pad[0xB5C]; MemoryManager heap; };
__attribute__((section (".fnv_00f21000"), used)) struct heap_page heap_page = { {0}, { GAME_MAGIC, 0 } };
#else
struct heap_page { char pad[0x238]; MemoryManager heap; };
__attribute__((section (".fnv_011f6000"), used)) struct heap_page heap_page = { {0}, { GAME_MAGIC, 0 } };
#endif
#define g_heap (heap_page.heap)

static void *game_block (size_t size) {
  unsigned *h = HeapAlloc (backing, 0, size + 16);
  if (h == NULL) return NULL;
  h[0] = GAME_MAGIC;
  h[1] = (unsigned) size;
  return h + 4;
}

static unsigned *game_header (void *p) {
  unsigned *h = (unsigned *) p - 4;
  if (h[0] != GAME_MAGIC) die ("MemoryManager got a block it does not own");
  return h;
}

static void check_heap (MemoryManager *self) {
  if (self != &g_heap || self->magic != GAME_MAGIC) die ("MemoryManager: wrong this");
  InterlockedIncrement (&self->calls);
}

static void *mm_allocate (MemoryManager *self, size_t size) {
  check_heap (self);
  return game_block (size);
}

static void mm_free (MemoryManager *self, void *p) {
  check_heap (self);
  if (p != NULL) {
    unsigned *h = game_header (p);
    h[0] = 0;
    HeapFree (backing, 0, h);
  }
}

static void *mm_reallocate (MemoryManager *self, void *p, size_t size) {
  check_heap (self);
  if (p == NULL) return game_block (size);
  unsigned *h = HeapReAlloc (backing, 0, game_header (p), size + 16);
  if (h == NULL) return NULL;
  h[1] = (unsigned) size;
  return h + 4;
}

static size_t mm_size (MemoryManager *self, void *p) {
  check_heap (self);
  return game_header (p)[1];
}

static void check_scrap (ScrapHeap *self) {
  if (self == NULL || self->magic != SCRAP_MAGIC || self->owner != GetCurrentThreadId ())
    die ("ScrapHeap: wrong this");
}

static void *scrap_allocate (ScrapHeap *self, size_t size, size_t align) {
  check_scrap (self);
  char *raw = HeapAlloc (backing, 0, size + align + sizeof (void *));
  if (raw == NULL) return NULL;
  size_t p = ((size_t) raw + sizeof (void *) + align - 1) & ~(align - 1);
  ((void **) p)[-1] = raw;
  return (void *) p;
}

static void scrap_deallocate (ScrapHeap *self, void *p) {
  check_scrap (self);
  if (p != NULL) HeapFree (backing, 0, ((void **) p)[-1]);
}

__attribute__((unused)) static void *crt_alloc (size_t n) { return HeapAlloc (backing, 0, n ? n : 1); }
static void *crt_zalloc (size_t n) { return HeapAlloc (backing, HEAP_ZERO_MEMORY, n ? n : 1); }
__attribute__((unused)) static void *crt_resize (void *p, size_t n) {
  return p ? HeapReAlloc (backing, HEAP_ZERO_MEMORY, p, n ? n : 1) : crt_zalloc (n);
}

/* ---------------------------------------------------------------- entry points at the addresses */
void *THISCALL MM_Allocate (MemoryManager *s, size_t n);
void THISCALL MM_Free (MemoryManager *s, void *p);
/* FormHeap_Allocate/Free: thin wrappers that end in the MemoryManager entry points */
#ifdef FAKE_GECK
PAGE_AT (00401000, 000)
IN_PAGE (00401000) void *FormHeap_Allocate (size_t size) { return MM_Allocate (&g_heap, size); }
PAGE_AT (00401000, 180)
IN_PAGE (00401000) void FormHeap_Free (void *p) { MM_Free (&g_heap, p); }
PAGE_AT (00854000, 0a0)
IN_PAGE (00854000) void *THISCALL MM_Allocate (MemoryManager *s, size_t n) { return mm_allocate (s, n); }
PAGE_AT (00854000, 2c0)
IN_PAGE (00854000) void THISCALL MM_Free (MemoryManager *s, void *p) { mm_free (s, p); }
PAGE_AT (00854000, 3b0)
IN_PAGE (00854000) void *THISCALL MM_Reallocate (MemoryManager *s, void *p, size_t n) { return mm_reallocate (s, p, n); }
PAGE_AT (00854000, 720)
IN_PAGE (00854000) size_t THISCALL MM_Size (MemoryManager *s, void *p) { return mm_size (s, p); }
PAGE_AT (00855000, 9c0)
IN_PAGE (00855000) void *THISCALL Scrap_Allocate (ScrapHeap *s, size_t n, size_t a) { return scrap_allocate (s, n, a); }
PAGE_AT (00855000, b30)
IN_PAGE (00855000) void THISCALL Scrap_Deallocate (ScrapHeap *s, void *p) { scrap_deallocate (s, p); }
#define NAME_FREE "MemoryManager::Deallocate"
#define EXE_NAME "GECK.exe"
#else
PAGE_AT (00401000, 000)
IN_PAGE (00401000) void *FormHeap_Allocate (size_t size) { return MM_Allocate (&g_heap, size); }
PAGE_AT (00401000, 030)
IN_PAGE (00401000) void FormHeap_Free (void *p) { MM_Free (&g_heap, p); }
PAGE_AT (00aa3000, e40)
IN_PAGE (00aa3000) void *THISCALL MM_Allocate (MemoryManager *s, size_t n) { return mm_allocate (s, n); }
PAGE_AT (00aa4000, 060)
IN_PAGE (00aa4000) void THISCALL MM_Free (MemoryManager *s, void *p) { mm_free (s, p); }
PAGE_AT (00aa4000, 150)
IN_PAGE (00aa4000) void *THISCALL MM_Reallocate (MemoryManager *s, void *p, size_t n) { return mm_reallocate (s, p, n); }
PAGE_AT (00aa4000, 200)
IN_PAGE (00aa4000) void *THISCALL MM_Reallocate2 (MemoryManager *s, void *p, size_t n) { return mm_reallocate (s, p, n); }
PAGE_AT (00aa4000, 4c0)
IN_PAGE (00aa4000) size_t THISCALL MM_Size (MemoryManager *s, void *p) { return mm_size (s, p); }
PAGE_AT (00aa5000, 4a0)
IN_PAGE (00aa5000) void *THISCALL Scrap_Allocate (ScrapHeap *s, size_t n, size_t a) { return scrap_allocate (s, n, a); }
PAGE_AT (00aa5000, 610)
IN_PAGE (00aa5000) void THISCALL Scrap_Deallocate (ScrapHeap *s, void *p) { scrap_deallocate (s, p); }
/* the statically linked CRT (cdecl) */
PAGE_AT (00ecc000, f5d)
IN_PAGE (00ecc000) void *crt_realloc (void *p, size_t n) { return crt_resize (p, n); }
PAGE_AT (00ecd000, 1c7)
IN_PAGE (00ecd000) void *crt_malloc (size_t n) { return crt_alloc (n); }
PAGE_AT (00ecd000, 291)
IN_PAGE (00ecd000) void crt_free (void *p) { if (p) HeapFree (backing, 0, p); }
PAGE_AT (00ecd000, 31f)
IN_PAGE (00ecd000) size_t crt_msize (void *p) { return HeapSize (backing, 0, p); }
PAGE_AT (00ed0000, cdf)
IN_PAGE (00ed0000) void *crt_malloc2 (size_t n) { return crt_alloc (n); }
PAGE_AT (00ed0000, d24)
IN_PAGE (00ed0000) void *crt_calloc2 (size_t n, size_t m) { return crt_zalloc (n * m); }
PAGE_AT (00ed0000, d70)
IN_PAGE (00ed0000) void *crt_realloc2 (void *p, size_t n) { return crt_resize (p, n); }
PAGE_AT (00ed0000, dbe)
IN_PAGE (00ed0000) void *crt_recalloc2 (void *p, size_t n, size_t m) { return crt_resize (p, n * m); }
PAGE_AT (00edd000, d7d)
IN_PAGE (00edd000) void *crt_calloc (size_t n, size_t m) { return crt_zalloc (n * m); }
PAGE_AT (00ee1000, 700)
IN_PAGE (00ee1000) void *crt_recalloc (void *p, size_t n, size_t m) { return crt_resize (p, n * m); }
#define NAME_FREE "MemoryManager::Free"
#define EXE_NAME "FalloutNV.exe"
#endif

/* ---------------------------------------------------------------- ground truth */
#define MAX_TRUTH 128
/* rows: calls and bytes by (caller, hook); live bytes by (owner, hook) */
static struct { const char *module, *hook; unsigned long long calls, bytes; long long live; } calls[MAX_TRUTH], lives[MAX_TRUTH];
static int ncalls, nlives;

static int row (void *table, int *n, const char *module, const char *hook) {
  typeof (calls[0]) *t = table;
  int i;
  for (i = 0; i < *n && !(fk_streq (t[i].module, module) && fk_streq (t[i].hook, hook)); i++)
    ;
  if (i == *n) {
    if (*n == MAX_TRUTH) die ("too many truth rows");
    t[i].module = module;
    t[i].hook = hook;
    ++*n;
  }
  return i;
}

static void count (const char *caller, const char *hook, unsigned bytes, const char *owner, int live) {
  EnterCriticalSection (&truth_lock);
  int i = row (calls, &ncalls, caller, hook);
  calls[i].calls++;
  calls[i].bytes += bytes;
  lives[row (lives, &nlives, owner, hook)].live += live;
  LeaveCriticalSection (&truth_lock);
}

static char *fmt_u64 (char *out, unsigned long long v) {
  char tmp[24];
  int n = 0;
  do tmp[n++] = (char) ('0' + v % 10); while ((v /= 10) != 0);
  while (n) *out++ = tmp[--n];
  *out = 0;
  return out;
}

static void say_num (long long v) {
  char buf[32];
  char *p = buf;
  if (v < 0) { *p++ = '-'; v = -v; }
  fmt_u64 (p, (unsigned long long) v);
  say (buf);
}

/* ---------------------------------------------------------------- the workload */
#define MAX_KEPT 65536
static void *kept_game[MAX_KEPT];
__attribute__((unused)) static void *kept_crt[MAX_KEPT];
static volatile LONG nkept_game, nkept_crt;
static int iters = 300;

static void keep (void **list, volatile LONG *n, void *p) {
  LONG i = InterlockedIncrement (n) - 1;
  if (i >= MAX_KEPT) die ("too many kept blocks");
  list[i] = p;
}

static DWORD WINAPI worker (void *arg) {
  unsigned t = (unsigned) (size_t) arg;
  ScrapHeap scrap = { SCRAP_MAGIC, GetCurrentThreadId () };
  const char *me = EXE_NAME;
  for (int i = 0; i < iters; i++) {
    unsigned sz = 16 + (i * 37u + t * 11u) % 500u;

    char *p = MM_Allocate (&g_heap, sz);
    if (p == NULL) die ("MM_Allocate failed");
    count (me, "MemoryManager::Allocate", sz, me, (int) sz);
    fk_memset (p, 0xAB, sz);
    unsigned cur = sz;
    if (i % 3 == 0) {
      p = MM_Reallocate (&g_heap, p, sz * 2);
      count (me, "MemoryManager::Reallocate", sz * 2, me, (int) (sz * 2 - cur));
      cur = sz * 2;
    }
#ifndef FAKE_GECK
    if (i % 5 == 0) {
      p = MM_Reallocate2 (&g_heap, p, sz + 8);
      count (me, "MemoryManager::Reallocate2", sz + 8, me, (int) (sz + 8 - cur));
      cur = sz + 8;
    }
#endif
    if (p == NULL || (unsigned char) p[0] != 0xAB) die ("game heap realloc lost the block");
    if (MM_Size (&g_heap, p) != cur) die ("MM_Size disagrees");
    if (i % 4 == 0) {
      keep (kept_game, &nkept_game, p);
    } else {
      MM_Free (&g_heap, p);
      count (me, NAME_FREE, 0, me, -(int) cur);
    }

    unsigned align = 8u << (i % 3);
    void *s = Scrap_Allocate (&scrap, sz, align);
    if (s == NULL || ((size_t) s & (align - 1))) die ("scrap allocation");
    count (me, "ScrapHeap::Allocate", sz, me, (int) sz);
    Scrap_Deallocate (&scrap, s);
    count (me, "ScrapHeap::Deallocate", 0, me, -(int) sz);

#ifndef FAKE_GECK
    char *c = crt_malloc (sz);
    count (me, "crt!malloc", sz, me, (int) sz);
    unsigned csz = sz;
    if (i % 2) {
      c = crt_realloc (c, sz + 1);
      count (me, "crt!realloc", sz + 1, me, 1);
      csz = sz + 1;
    }
    if (c == NULL || crt_msize (c) < sz) die ("crt malloc");
    if (i % 7 == 0) {
      keep (kept_crt, &nkept_crt, c);
    } else {
      crt_free (c);
      count (me, "crt!free", 0, me, -(int) csz);
    }
    char *z = crt_calloc (3, sz);
    count (me, "crt!calloc", 3 * sz, me, (int) (3 * sz));
    if (z == NULL || z[3 * sz - 1] != 0) die ("crt calloc");
    unsigned zsz = 3 * sz;
    if (i % 3 == 0) {
      z = crt_recalloc (z, 5, sz);
      count (me, "crt!_recalloc", 5 * sz, me, (int) (2 * sz));
      zsz = 5 * sz;
      if (z == NULL || z[5 * sz - 1] != 0) die ("crt _recalloc");
    }
    crt_free (z);
    count (me, "crt!free", 0, me, -(int) zsz);
    if (i % 10 == 0) {
      char *a = crt_malloc2 (sz);
      count (me, "crt!malloc2", sz, me, (int) sz);
      a = crt_realloc2 (a, 2 * sz);
      count (me, "crt!realloc2", 2 * sz, me, (int) sz);
      crt_free (a);
      count (me, "crt!free", 0, me, -(int) (2 * sz));
      char *b = crt_calloc2 (2, sz);
      count (me, "crt!calloc2", 2 * sz, me, (int) (2 * sz));
      b = crt_recalloc2 (b, 3, sz);
      count (me, "crt!_recalloc2", 3 * sz, me, (int) sz);
      if (b == NULL || b[3 * sz - 1] != 0) die ("crt _recalloc2");
      crt_free (b);
      count (me, "crt!free", 0, me, -(int) (3 * sz));
    }
#endif
  }
  return 0;
}

/* ---------------------------------------------------------------- process plumbing */
static int env (const char *name, char *buf, DWORD size) {
  DWORD n = GetEnvironmentVariableA (name, buf, size);
  return n > 0 && n < size;
}

static int env_int (const char *name, int dflt) {
  char buf[32];
  if (!env (name, buf, sizeof buf)) return dflt;
  int v = 0;
  for (char *p = buf; *p >= '0' && *p <= '9'; p++) v = v * 10 + (*p - '0');
  return v;
}

static void wait_file (const char *var) {
  char path[MAX_PATH];
  if (!env (var, path, sizeof path)) return;
  for (int i = 0; i < 6000 && GetFileAttributesA (path) == INVALID_FILE_ATTRIBUTES; i++) Sleep (50);
}

#define MAX_PLUGINS 16
static plugin_run_fn loaded[MAX_PLUGINS];
static int nloaded;

/* LoadLibrary each DLL of a ';'-separated list from Data\NVSE\Plugins; their plugin_run waits */
static void load_plugins (const char *var) {
  char list[1024], path[MAX_PATH + 64];
  if (!env (var, list, sizeof list)) return;
  char *name = list;
  for (char *p = list;; p++) {
    if (*p != ';' && *p != 0) continue;
    char end = *p;
    *p = 0;
    if (*name) {
      char *o = path;
      for (const char *d = "Data\\NVSE\\Plugins\\"; *d;) *o++ = *d++;
      for (const char *n = name; *n && o < path + sizeof path - 1;) *o++ = *n++;
      *o = 0;
      HMODULE h = LoadLibraryA (path);
      if (h == NULL) die ("a plugin did not load");
      plugin_run_fn run = (plugin_run_fn) (void *) GetProcAddress (h, "plugin_run");
      if (run == NULL || nloaded == MAX_PLUGINS) die ("plugin_run missing or too many plugins");
      loaded[nloaded++] = run;
    }
    if (end == 0) break;
    name = p + 1;
  }
}

static void run_plugins (void) {
  for (int i = 0; i < nloaded; i++)
    if (loaded[i] (count) != 0) die ("a plugin's check failed");
  nloaded = 0;
}

static void free_kept (int counted) {
  for (LONG i = 0; i < nkept_game; i++) {
    unsigned size = (unsigned) MM_Size (&g_heap, kept_game[i]); /* a replacer's block maybe */
    MM_Free (&g_heap, kept_game[i]);
    if (counted) count (EXE_NAME, NAME_FREE, 0, EXE_NAME, -(int) size);
  }
  nkept_game = 0;
#ifndef FAKE_GECK
  for (LONG i = 0; i < nkept_crt; i++) {
    unsigned size = (unsigned) crt_msize (kept_crt[i]);
    crt_free (kept_crt[i]);
    if (counted) count (EXE_NAME, "crt!free", 0, EXE_NAME, -(int) size);
  }
  nkept_crt = 0;
#endif
}

static void replacer (const char *when) {
  char v[16];
  if (!env ("FAKE_REPLACER", v, sizeof v) || !fk_streq (v, when)) return;
  HMODULE h = LoadLibraryA ("nvhr_fake.dll");
  if (h == NULL) die ("nvhr_fake.dll did not load");
  int (*install) (truth_fn) = (int (*) (truth_fn)) (void *) GetProcAddress (h, "nvhr_install");
  if (install == NULL || install (count) != 0) die ("nvhr_install failed");
}

static void write_file (const char *var, const char *text) {
  char path[MAX_PATH];
  if (!env (var, path, sizeof path)) return;
  HANDLE f = CreateFileA (path, GENERIC_WRITE, FILE_SHARE_READ, NULL, CREATE_ALWAYS, 0, NULL);
  DWORD n, len = 0;
  while (text[len]) len++;
  WriteFile (f, text, len, &n, NULL);
  CloseHandle (f);
}

/* The game's own view of its address space (what the monitor's sampler must agree with):
 * free bytes, the largest free block, committed and reserved bytes up to the highest user
 * address, walked with VirtualQuery like the sampler does. */
static void say_address_space (void) {
  SYSTEM_INFO si;
  GetSystemInfo (&si);
  unsigned long long free_b = 0, largest = 0, committed = 0, reserved = 0;
  char *a = si.lpMinimumApplicationAddress, *top = si.lpMaximumApplicationAddress;
  MEMORY_BASIC_INFORMATION m;
  while (a < top && VirtualQuery (a, &m, sizeof m) == sizeof m) {
    unsigned long long size = m.RegionSize;
    if ((char *) m.BaseAddress + size > top + 1) size = (unsigned long long) (top + 1 - (char *) m.BaseAddress);
    if (m.State == MEM_FREE) {
      free_b += size;
      if (size > largest) largest = size;
    } else if (m.State == MEM_COMMIT) {
      committed += size;
    } else {
      reserved += size;
    }
    a = (char *) m.BaseAddress + m.RegionSize;
  }
  say ("gt vq ");
  say_num ((long long) free_b);
  say (" ");
  say_num ((long long) largest);
  say (" ");
  say_num ((long long) committed);
  say (" ");
  say_num ((long long) reserved);
  say ("\n");
}

/* what the game was started with: the Steam variables and its working directory */
static void say_env (void) {
  char v[MAX_PATH];
  say ("gt env SteamAppID=");
  say (env ("SteamAppID", v, sizeof v) ? v : "-");
  say (" SteamGameId=");
  say (env ("SteamGameId", v, sizeof v) ? v : "-");
  say ("\ngt cwd ");
  say (GetCurrentDirectoryA (sizeof v, v) ? v : "?");
  say ("\n");
}

static LONG WINAPI on_crash (EXCEPTION_POINTERS *e) {
  ExitProcess (e->ExceptionRecord->ExceptionCode);
  return EXCEPTION_EXECUTE_HANDLER;
}

/* FAKE_GAME_BENCH=N (bench/bench_windows.py): FAKE_GAME_ROUNDS rounds of N crt_malloc(64) +
 * crt_free pairs on the main thread, "bench pair_ps X" per round (picoseconds a pair), then
 * exit: the hook cost on the Windows path, with and without the monitor. */
#ifndef FAKE_GECK
static void bench (int pairs) {
  LARGE_INTEGER f, a, b;
  QueryPerformanceFrequency (&f);
  int rounds = env_int ("FAKE_GAME_ROUNDS", 9);
  for (int r = 0; r < rounds; r++) {
    QueryPerformanceCounter (&a);
    for (int i = 0; i < pairs; i++) crt_free (crt_malloc (64));
    QueryPerformanceCounter (&b);
    say ("bench pair_ps ");
    say_num ((b.QuadPart - a.QuadPart) * 1000000000000LL / f.QuadPart / pairs);
    say ("\n");
  }
  FlushFileBuffers (truth_file);
  ExitProcess (0);
}
#endif

void game_main (void) {
  char path[MAX_PATH] = "fnv_truth.txt", pid[16];
  backing = HeapCreate (0, 0, 0);
  InitializeCriticalSection (&truth_lock);
  SetErrorMode (SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);
  SetUnhandledExceptionFilter (on_crash);
  env ("FAKE_GAME_TRUTH", path, sizeof path);
  truth_file = CreateFileA (path, GENERIC_WRITE, FILE_SHARE_READ, NULL, CREATE_ALWAYS, 0, NULL);
  if (truth_file == INVALID_HANDLE_VALUE) ExitProcess (4);
  int nthreads = env_int ("FAKE_GAME_THREADS", 4);
  iters = env_int ("FAKE_GAME_ITERS", 300);
  char *e = fmt_u64 (pid, GetCurrentProcessId ());
  e[0] = '\n';
  e[1] = 0;
  say ("pid ");
  say (pid);

  replacer ("early");
  load_plugins ("FAKE_GAME_PLUGINS");
  write_file ("FAKE_GAME_READY", pid);
  wait_file ("FAKE_GAME_GO");
  replacer ("late");

#ifndef FAKE_GECK
  if (env_int ("FAKE_GAME_BENCH", 0) > 0) bench (env_int ("FAKE_GAME_BENCH", 0));
#endif
  LARGE_INTEGER f, t0, t1;
  QueryPerformanceFrequency (&f);
  QueryPerformanceCounter (&t0);
  HANDLE th[64];
  if (nthreads < 1 || nthreads > 64) die ("FAKE_GAME_THREADS out of range");
  for (int t = 0; t < nthreads; t++)
    if ((th[t] = CreateThread (NULL, 0, worker, (void *) (size_t) t, 0, NULL)) == NULL)
      die ("CreateThread");
  WaitForMultipleObjects ((DWORD) nthreads, th, TRUE, INFINITE);
  QueryPerformanceCounter (&t1);
  say ("gt workload_us ");
  say_num ((t1.QuadPart - t0.QuadPart) * 1000000 / f.QuadPart);
  say ("\n");
  run_plugins ();  /* the early ones, loaded before READY */
  load_plugins ("FAKE_GAME_LATE_PLUGINS");
  run_plugins ();
  char hold[MAX_PATH];
  int holding = env ("FAKE_GAME_HOLD", hold, sizeof hold);
  if (!holding) free_kept (1);  /* no one looks before the end: the frees are in the truth */

  for (int i = 0; i < ncalls; i++) {
    say ("gt call ");
    say (calls[i].module);
    say (" ");
    say (calls[i].hook);
    say (" ");
    say_num ((long long) calls[i].calls);
    say (" ");
    say_num ((long long) calls[i].bytes);
    say ("\n");
  }
  for (int i = 0; i < nlives; i++) {
    say ("gt live ");
    say (lives[i].module);
    say (" ");
    say (lives[i].hook);
    say (" ");
    say_num (lives[i].live);
    say ("\n");
  }
  say_env ();
  say_address_space ();
  say (GetModuleHandleA ("nvse_steam_loader.dll") ? "gt injected 1\n" : "gt injected 0\n");
  say ("gt game_calls ");
  say_num (g_heap.calls);
  say ("\ndone\n");
  FlushFileBuffers (truth_file);
  if (env_int ("FAKE_GAME_CRASH", 0)) *(volatile int *) 0 = 1;
  wait_file ("FAKE_GAME_HOLD");
  free_kept (0);  /* after the monitor left: the game goes on unharmed */
  say ("bye\n");
  CloseHandle (truth_file);
  ExitProcess (0);
}

/* GCC may emit calls to these even freestanding */
void *memset (void *d, int c, size_t n) { return fk_memset (d, c, (unsigned) n); }
void *memcpy (void *d, const void *s, size_t n) {
  char *o = d;
  const char *i = s;
  while (n--) *o++ = *i++;
  return d;
}
