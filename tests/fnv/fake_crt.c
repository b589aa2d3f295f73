/* A fake Windows CRT DLL (ucrtbase.dll / msvcr*.dll) for Linux: the allocator exports under
 * their Windows names, built as libfake_ucrtbase.so, libfake_msvcr100.so, libfake_msvcr120.so.
 * Loaded with dlopen(RTLD_LOCAL) and called through dlsym, so like a DLL's exports it serves
 * only the modules that bind to it (the process's own malloc stays glibc's). */
#include <stddef.h>
#include <stdint.h>
#include <malloc.h>

#define EXPORT __attribute__((visibility("default"), noinline))

extern void *__libc_malloc (size_t);
extern void __libc_free (void *);
extern void *__libc_calloc (size_t, size_t);
extern void *__libc_realloc (void *, size_t);
extern void *__libc_memalign (size_t, size_t);

EXPORT void *malloc (size_t n) { return __libc_malloc (n); }
EXPORT void free (void *p) { __libc_free (p); }
EXPORT void *calloc (size_t n, size_t m) { return __libc_calloc (n, m); }
EXPORT void *realloc (void *p, size_t n) { return __libc_realloc (p, n); }
EXPORT size_t _msize (void *p) { return malloc_usable_size (p); }
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
