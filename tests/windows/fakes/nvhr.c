/* A fake New Vegas Heap Replacer DLL (nvhr_fake.dll): nvhr_install() writes 5-byte JMPs over the
 * game's MemoryManager entry points with VirtualProtect, like NVHR on first use. Its blocks carry
 * NVHR_MAGIC: a block that reaches the game's own MemoryManager::Free (a patch undone by someone)
 * makes the game exit 3, as it would crash the real one. */
#include "pefake.h"

#ifndef FAKE_GECK
#define ADDR_MM_REALLOCATE 0x00AA4150u
#define ADDR_MM_REALLOCATE2 0x00AA4200u
#define ADDR_MM_SIZE 0x00AA44C0u

BOOL WINAPI DllMain (HINSTANCE h, DWORD why, void *r) { (void) h; (void) why; (void) r; return TRUE; }

static HANDLE heap;

static unsigned *header (void *p) {
  unsigned *h = (unsigned *) p - 4;
  if (h[0] != NVHR_MAGIC) ExitProcess (3);
  return h;
}

static void *block (size_t size) {
  unsigned *h = HeapAlloc (heap, 0, size + 16);
  if (h == NULL) return NULL;
  h[0] = NVHR_MAGIC;
  h[1] = (unsigned) size;
  return h + 4;
}

static void *THISCALL nvhr_alloc (void *self, size_t size) { (void) self; return block (size); }
static void THISCALL nvhr_free (void *self, void *p) {
  (void) self;
  if (p) { unsigned *h = header (p); h[0] = 0; HeapFree (heap, 0, h); }
}
static void *THISCALL nvhr_realloc (void *self, void *p, size_t size) {
  (void) self;
  if (p == NULL) return block (size);
  unsigned *h = HeapReAlloc (heap, 0, header (p), size + 16);
  if (h == NULL) return NULL;
  h[1] = (unsigned) size;
  return h + 4;
}
static size_t THISCALL nvhr_size (void *self, void *p) { (void) self; return header (p)[1]; }

static int patch (unsigned at, void *to) {
  DWORD old;
  unsigned char *p = (unsigned char *) at;
  if (!VirtualProtect (p, 5, PAGE_EXECUTE_READWRITE, &old)) return 1;
  int rel = (int) ((unsigned) to - (at + 5));
  p[0] = 0xE9;
  p[1] = (unsigned char) rel;
  p[2] = (unsigned char) (rel >> 8);
  p[3] = (unsigned char) (rel >> 16);
  p[4] = (unsigned char) (rel >> 24);
  FlushInstructionCache (GetCurrentProcess (), p, 5);
  return !VirtualProtect (p, 5, old, &old);
}

__declspec(dllexport) int nvhr_install (truth_fn truth) {
  (void) truth;
  heap = HeapCreate (0, 0, 0);
  int r = 0;
  r |= patch (ADDR_MM_ALLOCATE, (void *) nvhr_alloc);
  r |= patch (ADDR_MM_FREE, (void *) nvhr_free);
  r |= patch (ADDR_MM_REALLOCATE, (void *) nvhr_realloc);
  r |= patch (ADDR_MM_REALLOCATE2, (void *) nvhr_realloc);
  r |= patch (ADDR_MM_SIZE, (void *) nvhr_size);
  return r;
}
#endif
