/* The host's per-record loops, compiled (issue 13: the monitor's CPU per event is the lossless
 * rate's limit). Plain C99 with no Python headers: loaded with ctypes (nvse_monitor/native), so
 * one build serves every CPython of a platform. Each function has a numpy twin that gives the
 * same results (NVSE_MONITOR_NATIVE=0 runs those; tests run both).
 *
 * Everything read from the ring is untrusted (a buggy or hostile target writes it): positions
 * are bounded by the caller, and no value read from a record indexes memory here unchecked. */

#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define NVSM_API __declspec(dllexport)
#else
#define NVSM_API __attribute__((visibility("default")))
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static uint64_t load_acquire_u64(const volatile uint64_t *p) { uint64_t v = *p; _ReadWriteBarrier(); return v; }
static uint32_t load_acquire_u32(const volatile uint32_t *p) { uint32_t v = *p; _ReadWriteBarrier(); return v; }
#else
static uint64_t load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static uint32_t load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
#endif

#define NVSM_ABI 1
#define SLOT_SIZE 64
#define RECORD_SIZE 56

/* record field offsets (nvse_monitor/stream/events.py RECORD_DTYPE) */
#define OFF_PTR 8
#define OFF_SIZE 24
#define OFF_TID 40
#define OFF_KIND 48
#define OFF_HOOK 49
#define OFF_FLAGS 50
#define OFF_SEQ 52

enum { K_ALLOC = 1, K_FREE = 2, K_REALLOC = 3, K_FAILED = 4, K_MARK = 5, K_STACK = 6 };
#define FLAG_REALLOC_HALF 0x0004

NVSM_API int nvsm_abi(void) { return NVSM_ABI; }

/* setuptools links a Windows extension with /EXPORT:PyInit__kernels: never called (the library
 * is loaded with ctypes, not imported). */
NVSM_API void *PyInit__kernels(void) { return 0; }

/* Copies the published records from ring position `tail` on (unwrapped), at most head - tail,
 * into `out` (56-byte rows), stopping at the first slot not yet published. Slot p is published
 * when its publish word (the target's width: 4 or 8 bytes, after the record) equals
 * (p + 1) & wrap_mask. Returns the number copied. `nslots` is a power of two. */
NVSM_API uint64_t nvsm_take(const uint8_t *slots, uint64_t nslots, uint32_t word_bytes,
                            uint64_t wrap_mask, uint64_t tail, uint64_t head, uint8_t *out)
{
    uint64_t pos = tail, mask = nslots - 1;
    for (; pos < head; pos++, out += RECORD_SIZE) {
        const uint8_t *s = slots + (pos & mask) * SLOT_SIZE;
        uint64_t want = (pos + 1) & wrap_mask, pub;
        if (word_bytes == 8)
            pub = load_acquire_u64((const uint64_t *)(s + RECORD_SIZE));
        else
            pub = load_acquire_u32((const uint32_t *)(s + RECORD_SIZE));
        if (pub != want)
            break;
        memcpy(out, s, RECORD_SIZE);
    }
    return pos - tail;
}

/* What nvsm_records adds up, in this order (capture/reader.py RingReader._c). */
enum { C_ALLOCS, C_FREES, C_REALLOCS, C_FAILURES, C_BYTES, C_PUBLISHED, C_UNKNOWN, C_N };

/* The reader's checks of up to n rows, in place: a row is kept when `valid[kind | hook << 8]`
 * (and, for a STACK chunk, its frame count in 1..max_frames and chunk * per_chunk < frames)
 * and its tid is not one of the `late` ones. Kept rows are moved to the front, numbered from
 * seq0 (u32, wrapping), their flags masked with keep_flags[kind], and counted into `counts`
 * (C_*). Stops before the first marker row (kind K_MARK), which it does not consume.
 * Returns the rows consumed; *kept gets the rows kept. */
NVSM_API uint64_t nvsm_records(uint8_t *rows, uint64_t n, const uint8_t *valid,
                               const uint16_t *keep_flags, uint32_t max_frames,
                               uint32_t per_chunk, const uint32_t *late, uint32_t n_late,
                               uint32_t seq0, uint64_t *counts, uint64_t *kept)
{
    uint64_t i, k = 0;
    uint64_t c[C_N] = {0};
    uint32_t j;
    uint8_t *out = rows;
    for (i = 0; i < n; i++) {
        uint8_t *r = rows + i * RECORD_SIZE;
        uint8_t kind = r[OFF_KIND], hook = r[OFF_HOOK];
        uint16_t flags;
        uint32_t tid;
        int late_tid = 0;
        if (kind == K_MARK)
            break;
        memcpy(&flags, r + OFF_FLAGS, 2);
        if (!valid[kind | (uint32_t)hook << 8] ||
            (kind == K_STACK && (flags < 1 || flags > max_frames || (uint32_t)hook * per_chunk >= flags))) {
            c[C_UNKNOWN]++;
            continue;
        }
        memcpy(&tid, r + OFF_TID, 4);
        for (j = 0; j < n_late; j++)
            late_tid |= late[j] == tid;
        if (late_tid)
            continue;
        flags &= keep_flags[kind];
        if (out != r)
            memmove(out, r, RECORD_SIZE);
        memcpy(out + OFF_FLAGS, &flags, 2);
        {
            uint32_t seq = seq0 + (uint32_t)k;
            memcpy(out + OFF_SEQ, &seq, 4);
        }
        switch (kind) {
        case K_ALLOC:
        case K_REALLOC: {
            uint64_t size, ptr;
            memcpy(&size, out + OFF_SIZE, 8);
            memcpy(&ptr, out + OFF_PTR, 8);
            if (kind == K_ALLOC)
                c[C_ALLOCS]++;
            else
                c[C_REALLOCS]++;
            if (kind == K_ALLOC || ptr != 0)
                c[C_BYTES] += size;
            break;
        }
        case K_FREE:
            if (!(flags & FLAG_REALLOC_HALF))
                c[C_FREES]++;
            break;
        case K_FAILED:
            c[C_FAILURES]++;
            break;
        default:
            break;
        }
        out += RECORD_SIZE;
        k++;
    }
    c[C_PUBLISHED] = k;
    for (j = 0; j < C_N; j++)
        counts[j] += c[j];
    *kept = k;
    return i;
}
