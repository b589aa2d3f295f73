/* Shared between the fake game, its plugins and the fake heap replacer (tests/fnv/). */
#ifndef FAKE_GAME_H
#define FAKE_GAME_H

#include <stddef.h>
#include <stdint.h>

#define THISCALL __attribute__((thiscall))

/* FalloutNV.exe 1.4.0.525 addresses (shared/reference/fnv-entry-points.md) */
#define ADDR_HEAP            0x011F6238u
/* FormHeap_Allocate/Free really live at 0x00401000/0x00401030, where the linker puts the fake's
 * own .init/.plt: the fake has them here instead (tests/fnv/fakeprofile.py maps the addresses) */
#define ADDR_FORMHEAP_ALLOCATE 0x00A01000u
#define ADDR_FORMHEAP_FREE   0x00A01030u
#define ADDR_MM_ALLOCATE     0x00AA3E40u
#define ADDR_MM_FREE         0x00AA4060u
#define ADDR_MM_REALLOCATE   0x00AA4150u
#define ADDR_MM_REALLOCATE2  0x00AA4200u
#define ADDR_MM_SIZE         0x00AA44C0u
#define ADDR_CRT_MALLOC      0x00ECD1C7u
#define ADDR_CRT_FREE        0x00ECD291u
#define ADDR_CRT_CALLOC      0x00EDDD7Du
#define ADDR_CRT_REALLOC     0x00ECCF5Du

#define GAME_MAGIC 0x47414D45u /* "GAME": a block of the game's own MemoryManager */
#define NVHR_MAGIC 0x4E564852u /* "NVHR": a block of the fake heap replacer */

typedef struct MemoryManager {
  uint32_t magic;
  volatile int32_t calls;
} MemoryManager;

/* Ground-truth counting: the game, its plugins and the replacer report every call they make
 * through a hooked entry point, by the profile's hook name. */
typedef void (*count_fn) (const char *hook, unsigned long long bytes);

/* plugin entry: allocate through the CRT module at crt_path (tag = profile hook prefix), report
 * each call, return the bytes left allocated (attributed to the plugin by caller address) */
typedef unsigned long long (*plugin_run_fn) (const char *crt_path, const char *tag, count_fn count,
                                            int use_game_heap);

/* the fake replacer's installer: patches the entry points with 5-byte JMPs into itself */
typedef int (*nvhr_install_fn) (void);

#endif
