/* Named functions that leak on purpose (tests/test_symbols.py, issue 11): the leak report must
 * name them. leak_one: 40 x malloc(24); leak_two: 9 x malloc(700); leak_big: 1 x malloc(3 MiB)
 * (the largest allocation); a static helper leaks 5 x calloc(4, 8). Built with -g, not
 * stripped. Protocol: READY <pid>, wait for a line, work, DONE {json}, wait for a line, exit. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "target_io.h"

void *keep[100];
int nkeep;

__attribute__((noinline)) void leak_one(void) {
    for (int i = 0; i < 40; i++) keep[nkeep++] = malloc(24);
}

__attribute__((noinline)) void leak_two(void) {
    for (int i = 0; i < 9; i++) keep[nkeep++] = malloc(700);
}

__attribute__((noinline)) void leak_big(void) { keep[nkeep++] = malloc(3 << 20); }

static __attribute__((noinline)) void leak_static(void) {
    for (int i = 0; i < 5; i++) keep[nkeep++] = calloc(4, 8);
}

int main(void) {
    char msg[64];
    snprintf(msg, sizeof msg, "READY %ld\n", (long)getpid());
    out(msg);
    wait_line();
    leak_one();
    leak_two();
    leak_big();
    leak_static();
    out("DONE {\"ok\":true}\n");
    wait_line();
    return 0;
}
