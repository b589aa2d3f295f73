/* The fake nvse_steam_loader.dll that fake nvse_loader.exe injects: nothing but being there (the
 * fake game reports whether it is loaded, "gt injected 1"). */
#include <windows.h>

BOOL WINAPI DllMain (HINSTANCE h, DWORD why, void *r) { (void) h; (void) why; (void) r; return TRUE; }
__declspec(dllexport) int nvse_steam_loader (void) { return 1; }
