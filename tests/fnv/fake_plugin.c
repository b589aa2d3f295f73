/* A fake NVSE plugin: allocates known amounts through "its" CRT DLL (bound with dlopen/dlsym like
 * a DLL import) and, for the first plugin, through the game heap by absolute address, as plugins
 * do (ThisCall(0x00AA3E40, 0x011F6238, size)). Built twice (libfnvplugin_a.so, _b.so). */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#include "fake_game.h"

#define EXPORT __attribute__((visibility("default")))

typedef void *(THISCALL *mm_alloc_t) (void *self, size_t size);
typedef void (THISCALL *mm_free_t) (void *self, void *p);

static void hook (count_fn count, const char *tag, const char *fn, unsigned long long bytes) {
  char name[64];
  snprintf (name, sizeof name, "%s!%s", tag, fn);
  count (name, bytes);
}

EXPORT unsigned long long plugin_run (const char *crt_path, const char *tag, count_fn count,
                                      int use_game_heap) {
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
  if (!p_malloc || !p_free || !p_calloc || !p_realloc || !p_amalloc || !p_arealloc || !p_afree
      || !p_msize)
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
  }
  return live;
}
