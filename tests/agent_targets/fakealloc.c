/* A shared library with its own allocator entry points (for the dlopen test). fa_malloc calls
 * libc malloc, so the agent's re-entrancy guard must record only the outer fa_malloc call. */
#include <stdlib.h>

static unsigned long calls;

void *fa_malloc(size_t size) {
  calls++;
  if (size == 0)
    size = 1;
  return malloc(size);
}

void fa_free(void *p) {
  calls++;
  free(p);
}
