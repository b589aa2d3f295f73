// C++ target for wrapper hooks on libstdc++'s operator new (tests/test_agent_attribution.py):
// "throw" calls operator new with an impossible size and catches std::bad_alloc (the exception
// unwinds through our wrapper's frame); "new N" allocates N blocks with new char[100] in
// new_blocks. Startup: "ready <address of main>".
#include <cstdio>
#include <cstring>
#include <new>

static char *kept[4096];
static int nkept;

extern "C" __attribute__((noinline)) void new_blocks(int n) {
  for (int i = 0; i < n && nkept < 4096; i++) kept[nkept++] = new char[100];
}

__attribute__((noinline)) bool throw_bad_alloc() {
  try {
    void *p = ::operator new(~static_cast<size_t>(0) - 4096);
    ::operator delete(p);
    return false;
  } catch (const std::bad_alloc &) {
    return true;
  }
}

int main() {
  char line[128];
  setvbuf(stdout, nullptr, _IOLBF, 0);
  std::printf("ready %p\n", reinterpret_cast<void *>(&main));
  while (std::fgets(line, sizeof line, stdin)) {
    int n = 0;
    char cmd[32] = "";
    std::sscanf(line, "%31s %d", cmd, &n);
    if (!std::strcmp(cmd, "throw")) std::printf("caught %d\n", throw_bad_alloc() ? 1 : 0);
    else if (!std::strcmp(cmd, "new")) new_blocks(n);
    else if (!std::strcmp(cmd, "end")) break;
    std::printf("done\n");
  }
  while (nkept > 0) delete[] kept[--nkept];
  return 0;
}
