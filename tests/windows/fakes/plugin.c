/* Fake NVSE plugins (PE DLLs for Data\NVSE\Plugins), one source built four ways by
 * tests/windows/fakes.py (-DPLUGIN_NAME="..." and one of):
 *   -DVIA_MSVCRT    malloc/calloc/realloc/free imported from msvcrt.dll (hooks msvcr!*)
 *   -DVIA_UCRT      the same and _aligned_malloc/_aligned_free/_recalloc from ucrtbase.dll, bound
 *                   with GetProcAddress like a DLL import (hooks ucrtbase!*)
 *   -DVIA_FORMHEAP  FormHeap_Allocate/FormHeap_Free, the game's cdecl wrappers (recorded under
 *                   MemoryManager::Allocate/Free; the profiles hook the wrappers as role
 *                   "wrapper", so the calls are attributed to the plugin, the wrapper's caller),
 *                   and MemoryManager::Allocate called by address (thiscall, attributed to the
 *                   plugin) like JIP's ThisCall(0xAA3E40, 0x11F6238, size)
 * Exports NVSEPlugin_Query/NVSEPlugin_Load like a real plugin and plugin_run for the fake game.
 * Linked -nostdlib with DllMain as entry: no CRT start-up allocation outside the ground truth.
 * Each plugin leaves some blocks allocated (its live bytes at the end).
 */
#include "pefake.h"

#ifndef PLUGIN_NAME
#error PLUGIN_NAME
#endif

BOOL WINAPI DllMain (HINSTANCE h, DWORD why, void *r) { (void) h; (void) why; (void) r; return TRUE; }
__declspec(dllexport) int NVSEPlugin_Query (void *nvse, void *info) { (void) nvse; (void) info; return 1; }
__declspec(dllexport) int NVSEPlugin_Load (void *nvse) { (void) nvse; return 1; }

#define N 200

#if defined(VIA_MSVCRT) || defined(VIA_UCRT)
#ifdef VIA_MSVCRT
#define P "msvcr!"
__declspec(dllimport) void *__cdecl malloc (size_t);
__declspec(dllimport) void *__cdecl calloc (size_t, size_t);
__declspec(dllimport) void *__cdecl realloc (void *, size_t);
__declspec(dllimport) void __cdecl free (void *);
static int bind_crt (void) { return 0; }
#else
#define P "ucrtbase!"
#define malloc ucrt_malloc /* windows.h declared the CRT's: these are pointers into ucrtbase */
#define calloc ucrt_calloc
#define realloc ucrt_realloc
#define free ucrt_free
static void *(__cdecl *malloc) (size_t);
static void *(__cdecl *calloc) (size_t, size_t);
static void *(__cdecl *realloc) (void *, size_t);
static void (__cdecl *free) (void *);
static void *(__cdecl *aligned_malloc) (size_t, size_t);
static void (__cdecl *aligned_free) (void *);
static void *(__cdecl *recalloc) (void *, size_t, size_t);
static int bind_crt (void) {
  HMODULE u = LoadLibraryA ("ucrtbase.dll");
  if (u == NULL) return 1;
  malloc = (void *) GetProcAddress (u, "malloc");
  calloc = (void *) GetProcAddress (u, "calloc");
  realloc = (void *) GetProcAddress (u, "realloc");
  free = (void *) GetProcAddress (u, "free");
  aligned_malloc = (void *) GetProcAddress (u, "_aligned_malloc");
  aligned_free = (void *) GetProcAddress (u, "_aligned_free");
  recalloc = (void *) GetProcAddress (u, "_recalloc");
  return !malloc || !calloc || !realloc || !free || !aligned_malloc || !aligned_free || !recalloc;
}
#endif

__declspec(dllexport) int plugin_run (truth_fn truth) {
  const char *me = PLUGIN_NAME;
  if (bind_crt ()) return 1;
  for (unsigned i = 0; i < N; i++) {
    unsigned sz = 24 + (i * 13u) % 700u;
    char *p = malloc (sz);
    truth (me, P "malloc", sz, me, (int) sz);
    if (p == NULL) return 2;
    fk_memset (p, 0x5A, sz);
    p = realloc (p, sz * 2);
    truth (me, P "realloc", sz * 2, me, (int) sz);
    if (p == NULL || p[sz - 1] != 0x5A) return 3;
    char *z = calloc (4, sz);
    truth (me, P "calloc", 4 * sz, me, (int) (4 * sz));
    if (z == NULL || z[4 * sz - 1] != 0) return 4;
#ifdef VIA_UCRT
    z = recalloc (z, 5, sz);
    truth (me, P "_recalloc", 5 * sz, me, (int) sz);
    if (z == NULL || z[5 * sz - 1] != 0) return 5;
    char *a = aligned_malloc (sz, 64);
    truth (me, P "_aligned_malloc", sz, me, (int) sz);
    if (a == NULL || ((size_t) a & 63)) return 6;
    aligned_free (a);
    truth (me, P "_aligned_free", 0, me, -(int) sz);
    unsigned zsz = 5 * sz;
#else
    unsigned zsz = 4 * sz;
#endif
    free (z);
    truth (me, P "free", 0, me, -(int) zsz);
    if (i % 5 != 0) {  /* every fifth block stays allocated */
      free (p);
      truth (me, P "free", 0, me, -(int) (sz * 2));
    }
  }
  return 0;
}
#endif

#ifdef VIA_FORMHEAP
typedef void *(__cdecl *formheap_alloc_fn) (size_t);
typedef void (__cdecl *formheap_free_fn) (void *);
typedef void *(THISCALL *mm_alloc_fn) (void *, size_t);

__declspec(dllexport) int plugin_run (truth_fn truth) {
  const char *me = PLUGIN_NAME;
#ifdef FAKE_GECK
  const char *free_name = "MemoryManager::Deallocate";
#else
  const char *free_name = "MemoryManager::Free";
#endif
  formheap_alloc_fn fh_alloc = (formheap_alloc_fn) ADDR_FORMHEAP_ALLOC;
  formheap_free_fn fh_free = (formheap_free_fn) ADDR_FORMHEAP_FREE;
  mm_alloc_fn mm_alloc = (mm_alloc_fn) ADDR_MM_ALLOCATE;
  for (unsigned i = 0; i < N; i++) {
    unsigned sz = 32 + (i * 7u) % 300u;
    char *p = fh_alloc (sz);
    truth (me, "MemoryManager::Allocate", sz, me, (int) sz);  /* through the wrapper */
    if (p == NULL) return 2;
    if (i % 4 != 0) {
      fh_free (p);
      truth (me, free_name, 0, me, -(int) sz);
    }
    char *q = mm_alloc ((void *) ADDR_HEAP, sz + 1);
    truth (me, "MemoryManager::Allocate", sz + 1, me, (int) (sz + 1));
    if (q == NULL) return 3;
    if (i % 3 != 0) {
      fh_free (q);  /* allocated by the plugin, freed through the game's wrapper */
      truth (me, free_name, 0, me, -(int) (sz + 1));
    }
  }
  return 0;
}
#endif
