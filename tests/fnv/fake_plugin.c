/* A fake NVSE plugin: allocates known amounts through "its" CRT DLL (bound with dlopen/dlsym like
 * a DLL import) and, for the first plugin, through the game heap by absolute address, as plugins
 * do (ThisCall(0x00AA3E40, 0x011F6238, size)). Built twice (libfnvplugin_a.so, _b.so); tests copy
 * it under other names for more plugins.
 *
 * The fake game passes each plugin a CRT path and a tag (the profile's hook-name prefix). Tags
 * with a job of their own:
 *   kernel32  CRT path = the fake kernel32 (fake_crt.c -DFAKE_KERNEL32): HeapAlloc / HeapReAlloc /
 *             HeapFree and VirtualAlloc / VirtualFree (stdcall), counted as "kernel32!..." hooks;
 *             the stack pointer is checked around every call (a hook popping the wrong number of
 *             bytes aborts the game). Leaves some HeapAlloc blocks allocated.
 *   hog       the address-space headroom test, driven by lines on stdin: prints "hog ready",
 *             waits for a line, fills the 32-bit address space with 64 MiB reservations, prints
 *             "hog filled N", waits for a line, releases them, prints "hog freed", waits for a
 *             last line.
 *   env       prints "plugin env SteamAppID=... SteamGameId=... cwd=..." (what the game was
 *             started with).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fake_game.h"

#define EXPORT __attribute__((visibility("default")))
#define STDCALL __attribute__((stdcall))

typedef void *(THISCALL *mm_alloc_t) (void *self, size_t size);
typedef void (THISCALL *mm_free_t) (void *self, void *p);
typedef void *(*formheap_alloc_t) (size_t size);
typedef void (*formheap_free_t) (void *p);

static void hook (count_fn count, const char *tag, const char *fn, unsigned long long bytes) {
  char name[64];
  snprintf (name, sizeof name, "%s!%s", tag, fn);
  count (name, bytes);
}

static void die (const char *what) {
  fprintf (stderr, "fake plugin: %s\n", what);
  fflush (stderr);
  abort ();
}

static void *sym (void *lib, const char *name) {
  void *f = dlsym (lib, name);
  if (f == NULL) die (name);
  return f;
}

/* ---------------------------------------------------------------- kernel32 (stdcall) */

/* winnt.h values, as in fake_crt.c */
#define K32_HEAP_ZERO_MEMORY 0x00000008u
#define K32_MEM_COMMIT 0x00001000u
#define K32_MEM_RESERVE 0x00002000u
#define K32_MEM_RELEASE 0x00008000u
#define K32_PAGE_READWRITE 0x04u

/* the value of expr, aborting when the stack pointer is not the same after the call (a stdcall
 * callee pops its own arguments: a replacement that pops more or fewer bytes moves it) */
#define SP_SAME(expr) ({                                                   \
    uintptr_t sp0_, sp1_;                                                  \
    __asm__ volatile ("mov %%esp, %0" : "=r" (sp0_));                      \
    __typeof__ (expr) r_ = (expr);                                         \
    __asm__ volatile ("mov %%esp, %0" : "=r" (sp1_));                      \
    if (sp0_ != sp1_) die ("the stack pointer moved across a stdcall call"); \
    r_; })

static unsigned long long run_kernel32 (const char *path, count_fn count) {
  void *k32 = dlopen (path, RTLD_NOW | RTLD_LOCAL);
  if (k32 == NULL) die (dlerror ());
  void *(STDCALL *get_heap) (void) = sym (k32, "GetProcessHeap");
  void *(STDCALL *heap_alloc) (void *, uint32_t, size_t) = sym (k32, "HeapAlloc");
  void *(STDCALL *heap_realloc) (void *, uint32_t, void *, size_t) = sym (k32, "HeapReAlloc");
  int (STDCALL *heap_free) (void *, uint32_t, void *) = sym (k32, "HeapFree");
  size_t (STDCALL *heap_size) (void *, uint32_t, const void *) = sym (k32, "HeapSize");
  void *(STDCALL *virtual_alloc) (void *, size_t, uint32_t, uint32_t) = sym (k32, "VirtualAlloc");
  int (STDCALL *virtual_free) (void *, size_t, uint32_t) = sym (k32, "VirtualFree");

  void *heap = SP_SAME (get_heap ());
  unsigned long long live = 0;
  for (int i = 0; i < 20; i++) {
    size_t n = 700 + (size_t) i;
    uint32_t flags = i % 2 ? K32_HEAP_ZERO_MEMORY : 0;
    char *p = SP_SAME (heap_alloc (heap, flags, n));
    hook (count, "kernel32", "HeapAlloc", n);
    if (p == NULL || SP_SAME (heap_size (heap, 0, p)) < n) die ("HeapAlloc");
    if (flags && p[n - 1] != 0) die ("HEAP_ZERO_MEMORY");
    if (i % 3 == 0) {
      n *= 2;
      p = SP_SAME (heap_realloc (heap, 0, p, n));
      hook (count, "kernel32", "HeapReAlloc", n);
      if (p == NULL) die ("HeapReAlloc");
    }
    if (i % 4 == 0) {
      live += n; /* left allocated: attributed to this plugin, heap win32-heap */
    } else {
      if (SP_SAME (heap_free (heap, 0, p)) != 1) die ("HeapFree");
      hook (count, "kernel32", "HeapFree", 0);
    }
  }
  for (int i = 0; i < 4; i++) {
    size_t n = (size_t) (i + 1) << 16;
    char *v = SP_SAME (virtual_alloc (NULL, n, K32_MEM_COMMIT | K32_MEM_RESERVE,
                                      K32_PAGE_READWRITE));
    hook (count, "kernel32", "VirtualAlloc", n);
    if (v == NULL) die ("VirtualAlloc");
    memset (v, 0x5A, n);
    if (SP_SAME (virtual_free (v, 0, K32_MEM_RELEASE)) != 1) die ("VirtualFree");
    hook (count, "kernel32", "VirtualFree", 0);
  }
  return live;
}

/* ---------------------------------------------------------------- address-space hog */

static void wait_line (void) {
  char buf[64];
  if (fgets (buf, sizeof buf, stdin) == NULL) die ("hog: stdin closed");
}

static unsigned long long run_hog (void) {
  enum { REGION = 64 << 20, MAX = 128 };
  static void *blocks[MAX];
  int n = 0;
  printf ("hog ready\n");
  fflush (stdout);
  wait_line ();
  while (n < MAX) {  /* reservations only (PROT_NONE, no memory behind them) */
    void *p = mmap (NULL, REGION, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) break;
    blocks[n++] = p;
  }
  printf ("hog filled %d\n", n);
  fflush (stdout);
  wait_line ();
  while (n > 0) munmap (blocks[--n], REGION);
  printf ("hog freed\n");
  fflush (stdout);
  wait_line ();
  return 0;
}

/* ---------------------------------------------------------------- CRT DLL plugins */

EXPORT unsigned long long plugin_run (const char *crt_path, const char *tag, count_fn count,
                                      int use_game_heap) {
  if (strcmp (tag, "kernel32") == 0) return run_kernel32 (crt_path, count);
  if (strcmp (tag, "hog") == 0) return run_hog ();
  if (strcmp (tag, "env") == 0) {
    const char *a = getenv ("SteamAppID"), *g = getenv ("SteamGameId");
    char cwd[4096];
    if (getcwd (cwd, sizeof cwd) == NULL) die ("getcwd");
    printf ("plugin env SteamAppID=%s SteamGameId=%s cwd=%s\n", a ? a : "-", g ? g : "-", cwd);
    fflush (stdout);
    return 0;
  }
  void *crt = dlopen (crt_path, RTLD_NOW | RTLD_LOCAL);
  if (crt == NULL) { fprintf (stderr, "plugin: %s\n", dlerror ()); abort (); }
  void *(*p_malloc) (size_t) = (void *(*) (size_t)) dlsym (crt, "malloc");
  void (*p_free) (void *) = (void (*) (void *)) dlsym (crt, "free");
  void *(*p_calloc) (size_t, size_t) = (void *(*) (size_t, size_t)) dlsym (crt, "calloc");
  void *(*p_realloc) (void *, size_t) = (void *(*) (void *, size_t)) dlsym (crt, "realloc");
  void *(*p_amalloc) (size_t, size_t) = (void *(*) (size_t, size_t)) dlsym (crt, "_aligned_malloc");
  void *(*p_arealloc) (void *, size_t, size_t) =
      (void *(*) (void *, size_t, size_t)) dlsym (crt, "_aligned_realloc");
  void (*p_afree) (void *) = (void (*) (void *)) dlsym (crt, "_aligned_free");
  size_t (*p_msize) (void *) = (size_t (*) (void *)) dlsym (crt, "_msize");
  void *(*p_recalloc) (void *, size_t, size_t) =
      (void *(*) (void *, size_t, size_t)) dlsym (crt, "_recalloc");
  if (!p_malloc || !p_free || !p_calloc || !p_realloc || !p_amalloc || !p_arealloc || !p_afree
      || !p_msize || !p_recalloc)
    abort ();

  unsigned long long live = 0;
  /* a distinct amount per plugin: the per-module figures must not be swapped */
  size_t unit = use_game_heap ? 100 : 250;
  for (int i = 0; i < 20; i++) {
    size_t n = unit + (size_t) i;
    char *p = p_malloc (n);
    hook (count, tag, "malloc", n);
    if (p == NULL || p_msize (p) < n) abort ();
    if (i % 4 == 0) {
      p = p_realloc (p, 2 * n);
      hook (count, tag, "realloc", 2 * n);
      n *= 2;
    }
    if (i % 3 == 0) {
      live += n;
    } else {
      p_free (p);
      hook (count, tag, "free", 0);
    }
    char *c = p_calloc (4, n);
    hook (count, tag, "calloc", 4 * n);
    if (i % 2 == 0) {
      c = p_recalloc (c, 6, n);
      hook (count, tag, "_recalloc", 6 * n);
      if (c == NULL || c[6 * n - 1] != 0) abort ();
    }
    p_free (c);
    hook (count, tag, "free", 0);
    void *a = p_amalloc (n, 64);
    hook (count, tag, "_aligned_malloc", n);
    if (a == NULL || ((size_t) a & 63)) abort ();
    if (i % 5 == 0) {
      a = p_arealloc (a, n + 64, 64);
      hook (count, tag, "_aligned_realloc", n + 64);
    }
    p_afree (a);
    hook (count, tag, "_aligned_free", 0);
  }
  if (use_game_heap) {
    mm_alloc_t alloc = (mm_alloc_t) (size_t) ADDR_MM_ALLOCATE;
    mm_free_t release = (mm_free_t) (size_t) ADDR_MM_FREE;
    void *heap = (void *) (size_t) ADDR_HEAP;
    for (int i = 0; i < 4; i++) {
      void *g = alloc (heap, 300 + (size_t) i);
      count ("MemoryManager::Allocate", 300 + (unsigned long long) i);
      if (g == NULL) abort ();
      if (i == 3) {
        release (heap, g);
        count ("MemoryManager::Free", 0);
      } else {
        live += 300 + (unsigned long long) i; /* 300 + 301 + 302: fake_game.c knows */
      }
    }
    /* through the game's FormHeap_Allocate wrapper: the block is the plugin's (issue 11),
       not FalloutNV.exe's, where the wrapper's own call to MemoryManager::Allocate is */
    formheap_alloc_t fh_alloc = (formheap_alloc_t) (size_t) ADDR_FORMHEAP_ALLOCATE;
    formheap_free_t fh_free = (formheap_free_t) (size_t) ADDR_FORMHEAP_FREE;
    void *w = fh_alloc (400);
    count ("MemoryManager::Allocate", 400);
    void *w2 = fh_alloc (401);
    count ("MemoryManager::Allocate", 401);
    if (w == NULL || w2 == NULL) abort ();
    fh_free (w2);
    count ("MemoryManager::Free", 0);
    live += 400; /* fake_game.c knows */
  }
  return live;
}
