/* A fake nvse_loader: starts the game as its own direct child, "created suspended" (the child
 * stops itself with SIGSTOP before its first allocation: FAKE_GAME_SUSPEND=1), waits until it is
 * stopped (where the real loader injects nvse_steam_loader.dll), resumes it with SIGCONT and
 * exits without waiting for it (like nvse_loader without -waitforclose), unless
 * FAKE_LOADER_WAIT=1 (then it waits and returns the game's exit status).
 * Like nvse_loader it takes the game from its working directory (./FalloutNV.exe) and passes
 * its own arguments on.
 * usage: fake_loader [ARGS...]   (prints "loader child PID") */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main (int argc, char **argv) {
  setvbuf (stdout, NULL, _IOLBF, 0);
  static char game[] = "./FalloutNV.exe";
  (void) argc;
  argv[0] = game;
  setenv ("FAKE_GAME_SUSPEND", "1", 1);
  setenv ("SteamAppID", "22380", 1);
  setenv ("SteamGameId", "22380", 1);
  pid_t pid = fork ();
  if (pid < 0) { perror ("fork"); return 1; }
  if (pid == 0) {
    execv (game, argv);
    perror ("execv");
    _exit (127);
  }
  printf ("loader child %d\n", (int) pid);
  int status;
  if (waitpid (pid, &status, WUNTRACED) != pid) { perror ("waitpid"); return 1; }
  if (!WIFSTOPPED (status)) {
    fprintf (stderr, "fake_loader: the game did not start suspended (status %#x)\n", status);
    return 1;
  }
  kill (pid, SIGCONT);
  const char *w = getenv ("FAKE_LOADER_WAIT");
  if (w && *w == '1') {
    if (waitpid (pid, &status, 0) != pid) return 1;
    return WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
  }
  return 0;
}
