/* A fake Windows CRT DLL (ucrtbase.dll / msvcr*.dll) for Linux: the allocator exports under
 * their Windows names, built as libfake_ucrtbase.so, libfake_msvcr100.so, libfake_msvcr120.so,
 * libfake_msvcrt.so. Loaded with dlopen(RTLD_LOCAL) and called through dlsym, so like a DLL's
 * exports it serves only the modules that bind to it (the process's own malloc stays glibc's).
 *
 * Built with -DFAKE_KERNEL32 it is instead a fake kernel32.dll (libfake_kernel32.so): HeapAlloc,
 * HeapReAlloc, HeapFree, HeapSize, VirtualAlloc, VirtualFree and GetProcessHeap, stdcall like
 * the real ones (the callee pops its arguments), with the real argument order. Each checks its
 * arguments (heap handle, flags, allocation type, protection) and aborts on a wrong one, so a
 * hook that passes them on shifted or pops the wrong number of bytes is caught. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <malloc.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default"), noinline))

extern void *__libc_malloc (size_t);
extern void __libc_free (void *);
extern void *__libc_calloc (size_t, size_t);
extern void *__libc_realloc (void *, size_t);
extern void *__libc_memalign (size_t, size_t);

#ifndef FAKE_KERNEL32

EXPORT void *malloc (size_t n) { return __libc_malloc (n); }
EXPORT void free (void *p) { __libc_free (p); }
EXPORT void *calloc (size_t n, size_t m) { return __libc_calloc (n, m); }
EXPORT void *realloc (void *p, size_t n) { return __libc_realloc (p, n); }
EXPORT size_t _msize (void *p) { return malloc_usable_size (p); }
EXPORT void *_recalloc (void *p, size_t n, size_t m) {
  size_t old = p ? malloc_usable_size (p) : 0;
  char *q = __libc_realloc (p, n * m);
  if (q != NULL && n * m > old) memset (q + old, 0, n * m - old);
  return q;
}
EXPORT void *_aligned_malloc (size_t n, size_t align) { return __libc_memalign (align, n); }
EXPORT void _aligned_free (void *p) { __libc_free (p); }
EXPORT void *_aligned_realloc (void *p, size_t n, size_t align) {
  void *q = __libc_memalign (align, n);
  if (q != NULL && p != NULL) {
    size_t old = malloc_usable_size (p);
    for (size_t i = 0; i < (old < n ? old : n); i++) ((char *) q)[i] = ((char *) p)[i];
    __libc_free (p);
  }
  return q;
}

#else /* FAKE_KERNEL32 */

#include <sys/mman.h>

/* the Windows values (winnt.h), also used by fake_plugin.c */
#define K32_HEAP_ZERO_MEMORY 0x00000008u
#define K32_MEM_COMMIT 0x00001000u
#define K32_MEM_RESERVE 0x00002000u
#define K32_MEM_RELEASE 0x00008000u
#define K32_PAGE_READWRITE 0x04u
#define K32_HEAP_MAGIC 0x48454150u /* "HEAP" */

#define STDCALL __attribute__((stdcall))

static uint32_t process_heap = K32_HEAP_MAGIC;

static void die (const char *what) {
  fprintf (stderr, "fake kernel32: %s\n", what);
  fflush (stderr);
  abort ();
}

static void check_heap (void *heap, uint32_t flags, uint32_t allowed) {
  if (heap != &process_heap || process_heap != K32_HEAP_MAGIC) die ("bad heap handle");
  if (flags & ~allowed) die ("bad heap flags");
}

EXPORT void *STDCALL GetProcessHeap (void) { return &process_heap; }

EXPORT void *STDCALL HeapAlloc (void *heap, uint32_t flags, size_t n) {
  check_heap (heap, flags, K32_HEAP_ZERO_MEMORY);
  return flags & K32_HEAP_ZERO_MEMORY ? __libc_calloc (1, n) : __libc_malloc (n);
}

EXPORT void *STDCALL HeapReAlloc (void *heap, uint32_t flags, void *p, size_t n) {
  check_heap (heap, flags, K32_HEAP_ZERO_MEMORY);
  if (p == NULL) die ("HeapReAlloc of NULL");
  return __libc_realloc (p, n);
}

EXPORT int STDCALL HeapFree (void *heap, uint32_t flags, void *p) {
  check_heap (heap, flags, 0);
  __libc_free (p);
  return 1;
}

EXPORT size_t STDCALL HeapSize (void *heap, uint32_t flags, const void *p) {
  check_heap (heap, flags, 0);
  return malloc_usable_size ((void *) p);
}

/* VirtualFree(MEM_RELEASE) takes size 0 and frees the whole region: remember region sizes */
#define MAX_REGIONS 256
static struct { void *base; size_t size; } regions[MAX_REGIONS];

EXPORT void *STDCALL VirtualAlloc (void *addr, size_t size, uint32_t type, uint32_t protect) {
  if (addr != NULL || type != (K32_MEM_COMMIT | K32_MEM_RESERVE) || protect != K32_PAGE_READWRITE)
    die ("VirtualAlloc: unexpected arguments");
  void *p = mmap (NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  for (int i = 0; i < MAX_REGIONS; i++)
    if (regions[i].base == NULL) {
      regions[i].base = p;
      regions[i].size = size;
      return p;
    }
  die ("VirtualAlloc: too many regions");
  return NULL;
}

EXPORT int STDCALL VirtualFree (void *addr, size_t size, uint32_t type) {
  if (size != 0 || type != K32_MEM_RELEASE) die ("VirtualFree: unexpected arguments");
  for (int i = 0; i < MAX_REGIONS; i++)
    if (regions[i].base == addr && addr != NULL) {
      munmap (addr, regions[i].size);
      regions[i].base = NULL;
      return 1;
    }
  die ("VirtualFree: not a region of VirtualAlloc");
  return 0;
}

#endif
