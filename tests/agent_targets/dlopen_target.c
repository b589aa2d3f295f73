/* Loads a library after the monitor attached, allocates through it, unloads it.
 * Usage: dlopen_target LIBPATH
 * Protocol: "ready <pid>"; line; dlopen + 10 x (fa_malloc, fa_free) + 1 malloc/free pair,
 * truth lines "<kind> <ptr> <size> <fn>"; "done"; line; dlclose; "closed"; line;
 * 5 malloc/free pairs; "bye"; line; exit 0. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static char out[8192];
static size_t outn;
static void wait_line(void) { char c; while (read(0, &c, 1) == 1 && c != '\n') {} }
static void say(const char *s) { size_t n = 0; while (s[n]) n++; write(1, s, n); }
static void line(const char *kind, void *p, size_t size, const char *fn) {
  outn += snprintf(out + outn, sizeof out - outn, "%s %llu %llu %s\n", kind,
                   (unsigned long long)(uintptr_t)p, (unsigned long long)size, fn);
}

int main(int argc, char **argv) {
  char hello[64];
  snprintf(hello, sizeof hello, "ready %d\n", getpid());
  say(hello);
  wait_line();
  void *lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { say("dlopen failed\n"); return 1; }
  void *(*fa_malloc)(size_t) = (void *(*)(size_t))dlsym(lib, "fa_malloc");
  void (*fa_free)(void *) = (void (*)(void *))dlsym(lib, "fa_free");
  for (int i = 0; i < 10; i++) {
    size_t sz = 100 + i;
    void *p = fa_malloc(sz); line("A", p, sz, "fa_malloc");
    fa_free(p); line("F", p, 0, "fa_free");
  }
  void *q = malloc(4321); line("A", q, 4321, "malloc");
  free(q); line("F", q, 0, "free");
  write(1, out, outn);
  say("done\n");
  wait_line();
  dlclose(lib);
  say("closed\n");
  wait_line();
  for (int i = 0; i < 5; i++) free(malloc(1000 + i));
  say("bye\n");
  wait_line();
  return 0;
}
