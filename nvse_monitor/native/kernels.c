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

#define NVSM_ABI 3

/* A read of what the loop needs a few iterations later, issued now: the records come from
 * another core's cache (the target's, or the reader's), and the wait for each line was most of
 * records -> events (tight loop: -2.4 ns a call, docs/engine.md "The tight loop, live"). */
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)0)
#endif
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
#define FLAG_SAMPLED 0x0001
#define FLAG_REALLOC_HALF 0x0004

NVSM_API int nvsm_abi(void) { return NVSM_ABI; }

/* setuptools links a Windows extension with /EXPORT:PyInit__kernels: never called (the library
 * is loaded with ctypes, not imported). */
NVSM_API void *PyInit__kernels(void) { return 0; }

/* np.interp(x, xp, fp) for x at or after xp[*j] (*j: the caller's walk through xp, as x only
 * grows), the same double as numpy's: the last anchor at or before x, the right-hand one of
 * equal anchors; fp[0] before the first, fp[n - 1] from the last on. */
static double interp_at(double x, const double *xp, const double *fp, uint64_t n, uint64_t *j)
{
    double slope, r;
    uint64_t k;
    while (*j + 1 < n && xp[*j + 1] <= x)
        ++*j;
    k = *j;
    if (x < xp[0])
        return fp[0];
    if (k == n - 1 || xp[k] == x)
        return fp[k];
    slope = (fp[k + 1] - fp[k]) / (xp[k + 1] - xp[k]);
    r = slope * (x - xp[k]) + fp[k];
    if (r != r) {  /* NaN one way: numpy tries the other */
        r = slope * (x - xp[k + 1]) + fp[k + 1];
        if (r != r && fp[k] == fp[k + 1])
            r = fp[k];
    }
    return r;
}

/* What nvsm_take_checked adds up, in this order (capture/reader.py RingReader._c). */
enum { C_ALLOCS, C_FREES, C_REALLOCS, C_FAILURES, C_BYTES, C_PUBLISHED, C_UNKNOWN, C_N };

/* The reader's take and checks in one pass (capture/reader.py RingReader._take_checked), so that
 * each record is checked while it is in this core's cache rather than read again.
 *
 * From ring position `tail` on (unwrapped), at most `max_slots` slots before `head`, stopping
 * at the first slot not yet published: slot p is published when its publish word (the
 * target's width: 4 or 8 bytes, after the record) equals (p + 1) & wrap_mask. Each record's
 * time is interpolated from its position between the reader's anchors (xp: positions, fp: µs;
 * n_anchors >= 1), as np.interp does, and kept at or after *last_ts, which gets the time of the
 * last slot consumed.
 *
 * A record is kept when `valid[kind | hook << 8]` (and, for a STACK chunk, its frame count is
 * in 1..max_frames and chunk * per_chunk < frames) and its tid is not one of the `late` ones;
 * else it is skipped, counted in C_UNKNOWN unless it is a late thread's. Kept records are
 * copied to `out` (56-byte rows) with their time, numbered from seq0 (u32, wrapping), their
 * flags masked with keep_flags[kind], and counted into `counts` (C_*). A marker record (kind
 * K_MARK) is consumed, not kept, and ends the call: mark[0] = 1, mark[1] = its ptr (else
 * mark[0] = 0).
 * Returns the slots consumed; *kept gets the rows kept. `nslots` is a power of two. */
NVSM_API uint64_t nvsm_take_checked(const uint8_t *slots, uint64_t nslots, uint32_t word_bytes,
                                    uint64_t wrap_mask, uint64_t tail, uint64_t head,
                                    uint64_t max_slots, uint8_t *out, const double *xp,
                                    const double *fp, uint64_t n_anchors, uint64_t *last_ts,
                                    const uint8_t *valid, const uint16_t *keep_flags,
                                    uint32_t max_frames, uint32_t per_chunk,
                                    const uint32_t *late, uint32_t n_late, uint32_t seq0,
                                    uint64_t *counts, uint64_t *kept, uint64_t *mark)
{
    uint64_t pos = tail, mask = nslots - 1, j = 0, k = 0, lts = *last_ts, ts = lts;
    uint64_t c[C_N] = {0};
    uint64_t end = head - tail > max_slots ? tail + max_slots : head;
    uint32_t t;
    mark[0] = 0;
    for (; pos < end; pos++) {
        const uint8_t *s = slots + (pos & mask) * SLOT_SIZE;
        uint64_t want = (pos + 1) & wrap_mask, pub;
        uint8_t kind, hook;
        uint16_t flags;
        uint32_t tid, seq;
        int late_tid = 0;
        if (pos + 16 < end)  /* before head only: slots already reserved, nearly always written */
            PREFETCH(slots + ((pos + 16) & mask) * SLOT_SIZE);
        if (word_bytes == 8)
            pub = load_acquire_u64((const uint64_t *)(s + RECORD_SIZE));
        else
            pub = load_acquire_u32((const uint32_t *)(s + RECORD_SIZE));
        if (pub != want)
            break;
        ts = (uint64_t)interp_at((double)pos, xp, fp, n_anchors, &j);
        if (ts < lts)
            ts = lts;
        kind = s[OFF_KIND];
        hook = s[OFF_HOOK];
        if (kind == K_MARK) {
            mark[0] = 1;
            memcpy(&mark[1], s + OFF_PTR, 8);
            pos++;
            break;
        }
        memcpy(&flags, s + OFF_FLAGS, 2);
        if (!valid[kind | (uint32_t)hook << 8] ||
            (kind == K_STACK && (flags < 1 || flags > max_frames || (uint32_t)hook * per_chunk >= flags))) {
            c[C_UNKNOWN]++;
            continue;
        }
        memcpy(&tid, s + OFF_TID, 4);
        for (t = 0; t < n_late; t++)
            late_tid |= late[t] == tid;
        if (late_tid)
            continue;
        flags &= keep_flags[kind];
        memcpy(out, s, RECORD_SIZE);
        memcpy(out, &ts, 8);
        memcpy(out + OFF_FLAGS, &flags, 2);
        seq = seq0 + (uint32_t)k;
        memcpy(out + OFF_SEQ, &seq, 4);
        switch (kind) {
        case K_ALLOC:
        case K_REALLOC: {
            uint64_t size, ptr;
            memcpy(&size, s + OFF_SIZE, 8);
            memcpy(&ptr, s + OFF_PTR, 8);
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
    if (pos > tail)
        *last_ts = ts;
    c[C_PUBLISHED] = k;
    for (t = 0; t < C_N; t++)
        counts[t] += c[t];
    *kept = k;
    return pos - tail;
}

/* classify.expand_records, compiled: records -> events, in one pass. The rules stay in
 * Python: per 6-bit record code (kind 0-7, ptr == 0 << 3, size == 0 << 4, old_ptr == 0 << 5)
 * the tables give the number of events (t_cnt), the type of the first (t_etype: 0 free,
 * 1 alloc, 2 failure), whether that free is of old_ptr (t_free_old) and whether the kind is
 * unknown (t_unknown); a second event is the alloc half of a realloc. Times: each record's is
 * raised to the running maximum of `now`, floor[i] (if given) and the times before it.
 * Per record: ts, kind, flags; per event (room for 2n): its record, type, pointer (0 for a
 * failure), time, size, hook, caller. st, sm: the indices of the STACK records and of the
 * other records flagged SAMPLED (samples.py). out[0]: unknown records, out[1]: 1 when every
 * record makes exactly one event (the event arrays are then the records' columns), out[2]: 1
 * when some event is a failure, out[3]: events, out[4], out[5]: how many st, sm. */
#define OFF_OLD 16
#define OFF_CALLER 32
NVSM_API void nvsm_expand(const uint8_t *rows, uint64_t n, uint64_t now, const uint64_t *floor,
                          uint64_t *ts, uint8_t *kind, uint16_t *flags,
                          const int64_t *t_cnt, const int8_t *t_etype, const uint8_t *t_free_old,
                          const uint8_t *t_unknown,
                          int64_t *rec, int8_t *etype, uint64_t *evp, uint64_t *ev_ts,
                          uint64_t *ev_size, uint8_t *ev_hook, uint64_t *ev_caller,
                          int64_t *st, int64_t *sm, uint64_t *out)
{
    uint64_t i, m = 0, unknown = 0, t = now, nst = 0, nsm = 0;
    int all_one = 1, any_fail = 0;
    for (i = 0; i < n; i++) {
        const uint8_t *r = rows + i * RECORD_SIZE;
        uint64_t p, z, o, c, tt, cl;
        uint8_t k = r[OFF_KIND], h = r[OFF_HOOK];
        int64_t cnt;
        if (i + 40 < n)
            PREFETCH(r + 40 * RECORD_SIZE);
        memcpy(&p, r + OFF_PTR, 8);
        memcpy(&z, r + OFF_SIZE, 8);
        memcpy(&o, r + OFF_OLD, 8);
        memcpy(&tt, r, 8);
        memcpy(&cl, r + OFF_CALLER, 8);
        memcpy(&flags[i], r + OFF_FLAGS, 2);
        if (floor && floor[i] > tt)
            tt = floor[i];
        if (tt > t)
            t = tt;
        ts[i] = t; kind[i] = k;
        if (k == K_STACK)
            st[nst++] = (int64_t)i;
        else if (flags[i] & FLAG_SAMPLED)
            sm[nsm++] = (int64_t)i;
        c = (k < 7 ? k : 7) | (uint64_t)(p == 0) << 3 | (uint64_t)(z == 0) << 4
            | (uint64_t)(o == 0) << 5;
        cnt = t_cnt[c];
        all_one &= cnt == 1;
        unknown += t_unknown[c];
        if (cnt >= 1) {
            int8_t e = t_etype[c];
            rec[m] = (int64_t)i; etype[m] = e;
            evp[m] = e == 2 ? 0 : (t_free_old[c] ? o : p);
            any_fail |= e == 2;
            ev_ts[m] = t; ev_size[m] = z; ev_hook[m] = h; ev_caller[m] = cl;
            m++;
        }
        if (cnt >= 2) {  /* the alloc half of a realloc */
            rec[m] = (int64_t)i; etype[m] = 1; evp[m] = p;
            ev_ts[m] = t; ev_size[m] = z; ev_hook[m] = h; ev_caller[m] = cl;
            m++;
        }
    }
    out[0] = unknown; out[1] = (uint64_t)all_one; out[2] = (uint64_t)any_fail; out[3] = m;
    out[4] = nst; out[5] = nsm;
}

/* The engine's tracking (engine._track, classify + apply_plan), compiled: each event in time
 * order against the live table, the table updated as it goes. The table is the engine's own
 * (engine/tracking.py LiveTable: keys, 16-bit fingerprints and packed 27-byte values of
 * nbuckets buckets of 8 ways; a key lives in one of its two buckets), so the numpy code keeps
 * working on it: growth and one-step cuckoo moves stay there. This loop stops before an insert
 * that needs either (the load would pass `load_limit`, or both buckets are full) and returns
 * that event's index; the engine inserts it and calls again from the next.
 *
 * Per event: outcome (out: NEW, REPLACE, OVERFLOW once `cap` blocks are live, FREE_T, FREE_U),
 * the size/hook/module of the block it ends (0 where none), and the links samples.py finds the
 * sampled blocks' ends with: next, the next event on the same pointer in this batch (-1 for the
 * last), and firsts[*n_firsts++], the events that are the first on their pointer in it (in
 * order; failures, pointer 0, are always). bkeys/blast: the batch's own map pointer -> last
 * event (bmask + 1 entries, a power of two >= 2 events, zeroed by the caller before the batch's
 * first call). */
#define WAYS 8
#define C1 0x9E3779B97F4A7C15ULL
#define C2 0xC2B2AE3D27D4EB4FULL
#define C3 0xD6E8FEB86659FD93ULL
#define VAL_BYTES 27
enum { O_NEW = 1, O_REPLACE = 2, O_OVERFLOW = 3, O_FREE_T = 4, O_FREE_U = 5 };

static uint64_t bucket(uint64_t k, uint64_t c, uint64_t nb) { return ((k * c) >> 32) * nb >> 32; }

static int64_t find(const uint64_t *keys, uint64_t nb, uint64_t k)
{
    uint64_t b = bucket(k, C1, nb) * WAYS, w;
    for (w = 0; w < WAYS; w++)
        if (keys[b + w] == k)
            return (int64_t)(b + w);
    b = bucket(k, C2, nb) * WAYS;
    for (w = 0; w < WAYS; w++)
        if (keys[b + w] == k)
            return (int64_t)(b + w);
    return -1;
}

static void put_val(uint8_t *v, uint64_t size, uint64_t ts, uint64_t caller, uint8_t hook,
                    uint16_t mod)
{
    memcpy(v, &size, 8); memcpy(v + 8, &ts, 8); memcpy(v + 16, &caller, 8);
    v[24] = hook; memcpy(v + 25, &mod, 2);
}

NVSM_API uint64_t nvsm_track(uint64_t start, uint64_t m, const uint64_t *p,
                             const uint8_t *isalloc, const uint64_t *size, const uint64_t *ts,
                             const uint64_t *caller, const uint8_t *hook, const uint16_t *mod,
                             uint64_t *keys, uint16_t *fp, uint8_t *vals, uint64_t nb,
                             uint64_t *count, uint64_t load_limit, uint64_t cap,
                             uint8_t *out, uint64_t *osz, uint8_t *ohk, uint16_t *omd,
                             uint64_t *bkeys, int64_t *blast, uint64_t bmask, int64_t *next,
                             int64_t *firsts, uint64_t *n_firsts)
{
    uint64_t e, n_live = *count;
    for (e = start; e < m; e++) {
        uint64_t k = p[e];
        int64_t slot = -1;
        if (k != 0) {
            /* the batch's map: previous event on k */
            uint64_t h = (k * C1) >> 20 & bmask;
            while (bkeys[h] != 0 && bkeys[h] != k)
                h = (h + 1) & bmask;
            if (bkeys[h] == k)
                next[blast[h]] = (int64_t)e;
            else
                firsts[(*n_firsts)++] = (int64_t)e;
            next[e] = -1;
            bkeys[h] = k;
            blast[h] = (int64_t)e;
            if (n_live)
                slot = find(keys, nb, k);
        } else {
            next[e] = -1;
            firsts[(*n_firsts)++] = (int64_t)e;
        }
        if (slot >= 0) {
            const uint8_t *v = vals + (uint64_t)slot * VAL_BYTES;
            memcpy(&osz[e], v, 8); ohk[e] = v[24]; memcpy(&omd[e], v + 25, 2);
        } else {
            osz[e] = 0; ohk[e] = 0; omd[e] = 0;
        }
        if (isalloc[e]) {
            if (slot >= 0) {
                out[e] = O_REPLACE;
                put_val(vals + (uint64_t)slot * VAL_BYTES, size[e], ts[e], caller[e], hook[e],
                        mod[e]);
            } else if (n_live >= cap) {
                out[e] = O_OVERFLOW;
            } else {
                uint64_t b1 = bucket(k, C1, nb) * WAYS, b2 = bucket(k, C2, nb) * WAYS, w;
                int f1 = 0, f2 = 0, first = -1, last = -1;
                uint64_t b;
                if (n_live + 1 > load_limit)
                    break;  /* the table grows first: the engine's insert */
                for (w = 0; w < WAYS; w++) {
                    f1 += keys[b1 + w] == 0;
                    f2 += keys[b2 + w] == 0;
                }
                if (f1 == 0 && f2 == 0)
                    break;  /* a cuckoo move: the engine's insert */
                b = f2 > f1 ? b2 : b1;
                for (w = 0; w < WAYS; w++)
                    if (keys[b + w] == 0) {
                        if (first < 0)
                            first = (int)w;
                        last = (int)w;
                    }
                b += (uint64_t)((k & 16) ? first : last);
                keys[b] = k;
                fp[b] = (uint16_t)((k * C3) >> 48) | 1;
                put_val(vals + b * VAL_BYTES, size[e], ts[e], caller[e], hook[e], mod[e]);
                n_live++;
                out[e] = O_NEW;
            }
        } else if (slot >= 0) {
            out[e] = O_FREE_T;
            keys[slot] = 0;
            fp[slot] = 0;
            n_live--;
        } else {
            out[e] = O_FREE_U;
        }
    }
    *count = n_live;
    return e;
}

/* The running sums of engine._aggregate in one pass over a batch's outcomes: per event,
 * whether it adds a tracked block (to_new = t_plus[o]), its bytes added (plus) and the change
 * of live bytes (delta = plus - old_size), and from the batch's start the running live bytes
 * (cur_b), live count change (cur_c: t_dcount) and allocations (acum: t_alloc); counts of
 * each outcome. Wrapping int64 arithmetic, as numpy's. */
NVSM_API void nvsm_sums(uint64_t m, const uint8_t *o, const uint64_t *size,
                        const uint64_t *old_size, const uint8_t *t_plus, const uint8_t *t_alloc,
                        const int8_t *t_dcount, uint8_t *to_new, int64_t *plus, int64_t *delta,
                        int64_t *cur_b, int64_t *cur_c, int64_t *acum, int64_t *counts)
{
    uint64_t i, b = 0;
    int64_t c = 0, a = 0;
    for (i = 0; i < m; i++) {
        uint8_t k = o[i] < 7 ? o[i] : 0;
        uint64_t pl = t_plus[k] ? size[i] : 0, d = pl - old_size[i];
        to_new[i] = t_plus[k];
        plus[i] = (int64_t)pl;
        delta[i] = (int64_t)d;
        b += d;
        cur_b[i] = (int64_t)b;
        c += t_dcount[k];
        cur_c[i] = c;
        a += t_alloc[k];
        acum[i] = a;
        counts[k]++;
    }
}

/* The figures of engine._state_span over events [lo, hi) of a batch, in one pass:
 * f[0..6]: counts of each outcome; f[7], f[8]: max of cur_c and cur_b; f[9], f[10]: sums of
 * plus and minus (wrapping int64); f[11]: bytes of the OVERFLOW allocations; f[12]: max of
 * plus. dm (k + 1 doubles, zeroed by the caller): each event's delta added to its module
 * (min(mod, k) when it adds a block, min(old_mod, k) else) exactly as numpy does it: one int64
 * sum converted once when every event has the same module, else a double sum in event order;
 * a REPLACE across modules then adds its old size back to the new block's module and takes it
 * from the old one's (rep_a, rep_b: two more zeroed arrays, combined as dm + (a - b)).
 * sc (n_bins, zeroed): events per biased float64 exponent of plus, and of the OVERFLOW sizes
 * in sc_ovf. */
enum { S_MAXC = 7, S_MAXB, S_PLUS, S_MINUS, S_OVF, S_MAXP, S_N };
#define OUT_OVERFLOW 3
#define OUT_REPLACE 2

static uint64_t exponent_bin(uint64_t v)
{
    double d = (double)v;
    uint64_t bits;
    memcpy(&bits, &d, 8);
    return bits >> 52;
}

NVSM_API void nvsm_span(uint64_t lo, uint64_t hi, const uint8_t *o, const int64_t *plus,
                        const int64_t *minus, const int64_t *delta, const int64_t *cur_b,
                        const int64_t *cur_c, const uint64_t *size, const uint16_t *mod,
                        const uint16_t *old_mod, const uint8_t *to_new, uint64_t k,
                        int64_t *f, double *dm, double *rep_a, double *rep_b,
                        int64_t *sc, int64_t *sc_ovf, uint64_t n_bins)
{
    uint64_t i, first_m = 0;
    int64_t maxc = INT64_MIN, maxb = INT64_MIN, maxp = INT64_MIN;
    uint64_t sp = 0, sm = 0, sovf = 0, sdelta = 0;
    int same = 1, any_rep = 0;
    for (i = lo; i < hi; i++) {
        uint8_t oc = o[i] < 7 ? o[i] : 0;
        uint64_t mp = mod[i] < k ? mod[i] : k, mm = old_mod[i] < k ? old_mod[i] : k;
        uint64_t em = to_new[i] ? mp : mm, b;
        f[oc]++;
        if (cur_c[i] > maxc) maxc = cur_c[i];
        if (cur_b[i] > maxb) maxb = cur_b[i];
        if (plus[i] > maxp) maxp = plus[i];
        sp += (uint64_t)plus[i];
        sm += (uint64_t)minus[i];
        sdelta += (uint64_t)delta[i];
        if (i == lo)
            first_m = em;
        same &= em == first_m;
        dm[em] += (double)delta[i];
        if (oc == OUT_REPLACE && mp != mm) {
            any_rep = 1;
            rep_a[mp] += (double)minus[i];
            rep_b[mm] += (double)minus[i];
        }
        b = exponent_bin((uint64_t)plus[i]);
        if (b < n_bins) sc[b]++;
        if (oc == OUT_OVERFLOW) {
            sovf += size[i];
            b = exponent_bin(size[i]);
            if (b < n_bins) sc_ovf[b]++;
        }
    }
    if (hi > lo && same) {  /* numpy: one int64 sum, converted once */
        for (i = 0; i <= k; i++)
            dm[i] = 0.0;
        dm[first_m] = (double)(int64_t)sdelta;
    }
    if (any_rep)
        for (i = 0; i <= k; i++)
            dm[i] = dm[i] + (rep_a[i] - rep_b[i]);
    f[S_MAXC] = maxc; f[S_MAXB] = maxb; f[S_PLUS] = (int64_t)sp; f[S_MINUS] = (int64_t)sm;
    f[S_OVF] = (int64_t)sovf; f[S_MAXP] = maxp;
}

/* engine/modmap.py ModuleMap.lookup's cache probe: each caller's module from the direct-mapped
 * cache (slot (caller * C1) >> shift), and the indices of the callers the cache does not hold
 * (the engine resolves those and fills the cache, as numpy's path does). Returns their number. */
NVSM_API uint64_t nvsm_modmap(const uint64_t *callers, uint64_t n, const uint64_t *ckeys,
                              const uint16_t *cvals, uint32_t shift, uint16_t *out, int64_t *miss)
{
    uint64_t i, nm = 0;
    for (i = 0; i < n; i++) {
        uint64_t c = callers[i], h = (c * C1) >> shift;
        out[i] = cvals[h];
        if (ckeys[h] != c)
            miss[nm++] = (int64_t)i;
    }
    return nm;
}
