/* A fake New Vegas Heap Replacer: writes 5-byte JMPs over the game's MemoryManager and CRT
 * entry points into its own functions, like NVHR does on first use. Its game-heap blocks carry
 * NVHR_MAGIC, so a block that reaches the game's own MemoryManager::Free (an entry point whose
 * patch was undone) aborts the game, as it would crash the real one. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fake_game.h"

#define EXPORT __attribute__((visibility("default")))

extern void *__libc_malloc (size_t);
extern void __libc_free (void *);
extern void *__libc_calloc (size_t, size_t);
extern void *__libc_realloc (void *, size_t);

static uint32_t *header (void *p) {
  uint32_t *h = (uint32_t *) p - 4;
  if (h[0] != NVHR_MAGIC) {
    fprintf (stderr, "fake_nvhr: got a block it does not own\n");
    abort ();
  }
  return h;
}

static void *block (size_t size) {
  uint32_t *h = __libc_malloc (size + 16);
  if (h == NULL) return NULL;
  h[0] = NVHR_MAGIC;
  h[1] = (uint32_t) size;
  return h + 4;
}

static void *THISCALL nvhr_alloc (MemoryManager *self, size_t size) { (void) self; return block (size); }
static void THISCALL nvhr_free (MemoryManager *self, void *p) {
  (void) self;
  if (p) { uint32_t *h = header (p); h[0] = 0; __libc_free (h); }
}
static void *THISCALL nvhr_realloc (MemoryManager *self, void *p, size_t size) {
  (void) self;
  if (p == NULL) return block (size);
  uint32_t *h = __libc_realloc (header (p), size + 16);
  if (h == NULL) return NULL;
  h[1] = (uint32_t) size;
  return h + 4;
}
static size_t THISCALL nvhr_size (MemoryManager *self, void *p) { (void) self; return header (p)[1]; }
static void *crt_malloc (size_t n) { return __libc_malloc (n); }
static void crt_free (void *p) { __libc_free (p); }
static void *crt_calloc (size_t n, size_t m) { return __libc_calloc (n, m); }
static void *crt_realloc (void *p, size_t n) { return __libc_realloc (p, n); }

static int patch (uint32_t at, void *to) {
  long page = sysconf (_SC_PAGESIZE);
  uintptr_t start = at & ~(uintptr_t) (page - 1);
  size_t len = ((at + 5 - start) + (size_t) page - 1) & ~(size_t) (page - 1);
  if (mprotect ((void *) start, len, PROT_READ | PROT_WRITE | PROT_EXEC) != 0) return -1;
  unsigned char *p = (unsigned char *) (uintptr_t) at;
  int32_t rel = (int32_t) ((uintptr_t) to - (at + 5));
  p[0] = 0xE9;
  memcpy (p + 1, &rel, 4);
  __builtin___clear_cache ((char *) p, (char *) p + 5);
  return mprotect ((void *) start, len, PROT_READ | PROT_EXEC);
}

EXPORT int nvhr_install (void) {
  int r = 0;
  r |= patch (ADDR_MM_ALLOCATE, (void *) nvhr_alloc);
  r |= patch (ADDR_MM_FREE, (void *) nvhr_free);
  r |= patch (ADDR_MM_REALLOCATE, (void *) nvhr_realloc);
  r |= patch (ADDR_MM_REALLOCATE2, (void *) nvhr_realloc);
  r |= patch (ADDR_MM_SIZE, (void *) nvhr_size);
  r |= patch (ADDR_CRT_MALLOC, (void *) crt_malloc);
  r |= patch (ADDR_CRT_FREE, (void *) crt_free);
  r |= patch (ADDR_CRT_CALLOC, (void *) crt_calloc);
  r |= patch (ADDR_CRT_REALLOC, (void *) crt_realloc);
  return r;
}
