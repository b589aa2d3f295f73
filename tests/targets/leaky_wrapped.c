/* Issue 11 end to end (tests/test_attribution_live.py): named functions leak directly and
 * through a wrapper (plugin_alloc, which the test's profile names as a wrapper), each called
 * from a named caller, so the leak report must name leak_direct and leak_wrapped (never the
 * wrapper) and the sampled stacks must show caller_* and main. Built by the test with frame
 * pointers and -rdynamic (the wrapper is hooked by export).
 *   leak_direct:  16 x malloc(64)
 *   leak_wrapped: 12 x plugin_alloc(128) -> malloc(128)
 * Protocol: READY <pid>, wait for a line, work, DONE {json}, wait for a line, exit. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "target_io.h"

#define NOINLINE __attribute__((noinline))
#define KEEP_FRAME() __asm__ volatile("" ::: "memory") /* no tail call: the frame stays */

void *keep[64];
int nkeep;
volatile unsigned long wrapper_calls;

/* Some work before the call, as a plugin's allocator wrapper has: a 4-instruction function is
 * too short for Frida's fast hook on x86_64, and wrappers get no slow one (docs/agent.md). */
NOINLINE void *plugin_alloc(size_t n) {
    wrapper_calls += n;
    void *p = malloc(n ? n : 1);
    KEEP_FRAME();
    return p;
}

NOINLINE void leak_direct(void) {
    for (int i = 0; i < 16; i++) keep[nkeep++] = malloc(64);
    KEEP_FRAME();
}

NOINLINE void leak_wrapped(void) {
    for (int i = 0; i < 12; i++) keep[nkeep++] = plugin_alloc(128);
    KEEP_FRAME();
}

NOINLINE void caller_direct(void) {
    leak_direct();
    KEEP_FRAME();
}

NOINLINE void caller_wrapped(void) {
    leak_wrapped();
    KEEP_FRAME();
}

int main(void) {
    char msg[64];
    snprintf(msg, sizeof msg, "READY %ld\n", (long)getpid());
    out(msg);
    wait_line();
    caller_direct();
    caller_wrapped();
    out("DONE {\"ok\":true}\n");
    wait_line();
    return 0;
}
