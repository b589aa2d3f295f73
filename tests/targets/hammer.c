/* Benchmark target: malloc/free pairs as fast as it can, or paced at --rate events/s (an event
 * is one hooked call), for --seconds. Waits for a stdin line first (the monitor attaches), then
 * prints "DONE {json}" with the events it made and the achieved rate, and waits for a line again
 * before exiting. --threads T splits the work (and the rate) over T threads. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "target_io.h"

static double g_seconds = 2.0, g_rate = 0; /* 0 = as fast as possible */
static int g_threads = 1;
/* Called through volatile pointers so the compiler cannot elide a malloc/free pair. */
static void *(*volatile g_malloc)(size_t) = malloc;
static void (*volatile g_free)(void *) = free;

struct worker {
    pthread_t th;
    unsigned long long events;
    double rate;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}


static void *work(void *arg) {
    struct worker *w = arg;
    double t0 = now_s(), end = t0 + g_seconds;
    double per_thread = g_rate / g_threads;
    unsigned long long ev = 0;
    void *keep[16] = {0};
    for (;;) {
        for (int k = 0; k < 256; k++) { /* 512 events between clock reads */
            size_t s = 16 + ((ev >> 1) & 255);
            void *p = g_malloc(s);
            void *old = keep[k & 15];
            keep[k & 15] = p;
            g_free(old);
            ev += old ? 2 : 1; /* free(NULL) is not an event */
        }
        double t = now_s();
        if (t >= end) break;
        if (per_thread > 0) {
            double ahead = ev / per_thread - (t - t0); /* seconds ahead of schedule */
            if (ahead > 0.0005) usleep((useconds_t)(ahead * 1e6));
        }
    }
    for (int k = 0; k < 16; k++) g_free(keep[k]);
    w->events = ev + 16;  /* the last 16 frees */
    w->rate = w->events / (now_s() - t0);
    return NULL;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--seconds")) g_seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--rate")) g_rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) g_threads = atoi(argv[i + 1]);
    }
    if (g_threads < 1) g_threads = 1;
    if (g_threads > 64) g_threads = 64;
    static struct worker ws[64];
    char msg[256];
    snprintf(msg, sizeof msg, "READY %ld\n", (long)getpid());
    out(msg);
    wait_line();
    double t0 = now_s();
    if (g_threads == 1) {
        work(&ws[0]);
    } else {
        for (int i = 0; i < g_threads; i++) pthread_create(&ws[i].th, NULL, work, &ws[i]);
        for (int i = 0; i < g_threads; i++) pthread_join(ws[i].th, NULL);
    }
    double el = now_s() - t0;
    unsigned long long ev = 0;
    for (int i = 0; i < g_threads; i++) ev += ws[i].events;
    snprintf(msg, sizeof msg, "DONE {\"events\":%llu,\"seconds\":%.6f,\"rate\":%.1f}\n", ev, el,
             ev / el);
    out(msg);
    wait_line();
    return 0;
}
