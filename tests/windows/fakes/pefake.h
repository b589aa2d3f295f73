/* Shared by the PE fakes (tests/windows/fakes): freestanding helpers (no CRT: the fakes link
 * -nostdlib so that no CRT start-up code allocates through a hooked DLL CRT behind the ground
 * truth's back), the ground-truth call the plugins report through, and the game's addresses. */
#ifndef PEFAKE_H
#define PEFAKE_H

#include <windows.h>

#define THISCALL __attribute__((thiscall))

/* FalloutNV.exe 1.4.0.525 / GECK.exe 1.4.0.518 (shared/reference/fnv-entry-points.md) */
#ifdef FAKE_GECK
#define ADDR_HEAP         0x00F21B5Cu
#define ADDR_MM_ALLOCATE  0x008540A0u
#define ADDR_MM_FREE      0x008542C0u
#define ADDR_FORMHEAP_ALLOC 0x00401000u
#define ADDR_FORMHEAP_FREE  0x00401180u
#else
#define ADDR_HEAP         0x011F6238u
#define ADDR_MM_ALLOCATE  0x00AA3E40u
#define ADDR_MM_FREE      0x00AA4060u
#define ADDR_FORMHEAP_ALLOC 0x00401000u
#define ADDR_FORMHEAP_FREE  0x00401030u
#endif
#define GAME_MAGIC 0x47414D45u /* "GAME": a block of the game's own MemoryManager */
#define NVHR_MAGIC 0x4E564852u /* "NVHR": a block of the fake heap replacer */

/* Ground truth: CALLER (the module the call returns to) called HOOK (the profile's name) once,
 * `bytes` as the monitor records them (the new size; 0 for a free), changing the live bytes of
 * OWNER (the module that allocated the block) on the hook's heap by `live`. */
typedef void (*truth_fn) (const char *caller, const char *hook, unsigned bytes, const char *owner,
                          int live);

/* A plugin's workload: returns 0 when every check passed. */
typedef int (*plugin_run_fn) (truth_fn truth);

static inline void *fk_memset (void *d, int c, unsigned n) {
  unsigned char *p = d;
  while (n--) *p++ = (unsigned char) c;
  return d;
}

static inline int fk_streq (const char *a, const char *b) {
  while (*a && *a == *b) a++, b++;
  return *a == *b;
}

#endif
