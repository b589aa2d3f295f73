/* A fake nvse_loader.exe: like xNVSE's loader it takes the game from its working directory
 * (.\FalloutNV.exe), sets SteamAppID/SteamGameId = 22380, creates the game suspended as its own
 * direct child, injects nvse_steam_loader.dll with VirtualAllocEx + WriteProcessMemory +
 * CreateRemoteThread(LoadLibraryA), resumes the game and exits without waiting for it. It writes
 * "loader child PID" to loader_child.txt in the working directory. Exit code 0, or 1..5 on a
 * failed step. */
#include "pefake.h"

static void write_pid (DWORD pid) {
  char text[48] = "loader child ", *o = text + 13, tmp[12];
  int n = 0;
  do tmp[n++] = (char) ('0' + pid % 10); while ((pid /= 10) != 0);
  while (n) *o++ = tmp[--n];
  *o++ = '\n';
  HANDLE f = CreateFileA ("loader_child.txt", GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, 0, NULL);
  DWORD w;
  WriteFile (f, text, (DWORD) (o - text), &w, NULL);
  CloseHandle (f);
}

void loader_main (void) {
  char dll[MAX_PATH];
  DWORD n = GetFullPathNameA ("nvse_steam_loader.dll", sizeof dll, dll, NULL);
  SetEnvironmentVariableA ("SteamAppID", "22380");
  SetEnvironmentVariableA ("SteamGameId", "22380");
  STARTUPINFOA si;
  PROCESS_INFORMATION pi;
  fk_memset (&si, 0, sizeof si);
  si.cb = sizeof si;
  char cmd[] = "FalloutNV.exe";
  if (!CreateProcessA (".\\FalloutNV.exe", cmd, NULL, NULL, FALSE, CREATE_SUSPENDED, NULL, NULL,
                       &si, &pi))
    ExitProcess (1);
  write_pid (pi.dwProcessId);
  void *remote = VirtualAllocEx (pi.hProcess, NULL, n + 1, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE);
  if (remote == NULL || !WriteProcessMemory (pi.hProcess, remote, dll, n + 1, NULL)) ExitProcess (2);
  FARPROC load = GetProcAddress (GetModuleHandleA ("kernel32.dll"), "LoadLibraryA");
  HANDLE t = CreateRemoteThread (pi.hProcess, NULL, 0, (LPTHREAD_START_ROUTINE) (void *) load,
                                 remote, 0, NULL);
  if (t == NULL) ExitProcess (3);
  if (WaitForSingleObject (t, 30000) != WAIT_OBJECT_0) ExitProcess (4);
  if (ResumeThread (pi.hThread) == (DWORD) -1) ExitProcess (5);
  ExitProcess (0);
}

void *memset (void *d, int c, size_t n) { return fk_memset (d, c, (unsigned) n); }
