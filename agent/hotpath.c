/*
 * nvse-monitor hot path, compiled in the target by Frida's CModule (TinyCC).
 *
 * agent.js prepends a few #defines (NV_WINDOWS, NV_CLOCK_TSC, NV_NHOOKS) and appends one
 * replacement function per profile hook (generated for its role and ABI). Everything writable
 * lives in `nv_state` / `nv_orig`, allocated by JS (CModule data is read-only).
 *
 * Ring: `slots` (power of two) slots of 64 bytes = 56-byte record + a publish word.
 *   producer: reserve a position with lock cmpxchg on head (bounded: never passes tail + slots),
 *             fill the record, then store publish word = pos + 1.
 *   consumer: nv_drain() copies slots from tail while publish word == pos + 1, then advances tail.
 * x86 is TSO: stores are seen in program order, so the publish store (after a compiler barrier)
 * makes the whole record visible; loads are not reordered with older loads.
 *
 * No floating-point literals, string literals or initialised data: TinyCC places such constants
 * in a section that Frida 17's CModule does not map (RIP-relative loads land past the module, in
 * whatever memory follows, and fault once that is unmapped: seen in nv_drain while a crashing or
 * stopping target freed memory). tests/test_agent.py::test_code_references_stay_in_module checks.
 */
#include <glib.h>
#include <gum/guminterceptor.h>
#include <gum/gumtls.h>

#if GLIB_SIZEOF_VOID_P == 8
# define NV_PTR64 1
#else
# define NV_PTR64 0
#endif

#define KIND_ALLOC 1
#define KIND_FREE 2
#define KIND_REALLOC 3
#define KIND_FAILED 4

#define NV_BARRIER() asm volatile ("" : : : "memory")

typedef struct
{
  guint64 ts;        /* raw clock value in the ring; µs since time zero after nv_drain() */
  guint64 ptr;
  guint64 old_ptr;
  guint64 size;
  guint64 caller;
  guint32 tid;
  guint32 dur;       /* raw clock ticks in the ring; µs after nv_drain() */
  guint8 kind;
  guint8 hook;
  guint16 flags;
  guint32 seq;
} NvRecord;

typedef struct
{
  NvRecord rec;
  volatile gsize pub;  /* pos + 1 once the record at pos is complete */
#if !NV_PTR64
  guint32 pad;
#endif
} NvSlot;

#define NV_INIT_TIDS 64
#define NV_IGNORED_TIDS 64
#define NV_NEW_TIDS 1024   /* first calls of new threads, for JS to ask Frida's cloak about */
#define NV_LATE_TIDS 32    /* Frida threads found after init: their records are filtered out */
#define NV_WATCH_MAX 128   /* code ranges of our hooks, watched for foreign patches */
#define NV_WATCH_PAUSED 8  /* threads writing our own hooks (their protection calls are ours) */

typedef struct
{
  /* producers' line */
  volatile gsize head;
  guint8 pad0[64 - sizeof (gsize)];
  /* consumer's line (read by producers for the fullness check) */
  volatile gsize tail;
  guint8 pad1[64 - sizeof (gsize)];
  /* drop tallies: atomics, only touched when the ring is full (wrap; folded by nv_drain) */
  volatile gsize drop_n;
  volatile gsize drop_allocs;
  volatile gsize drop_frees;
  volatile gsize drop_reallocs;
  volatile gsize drop_failures;
  volatile gsize drop_bytes;
  guint8 pad2[64 - 6 * sizeof (gsize)];
  /* read-mostly configuration */
  gsize slots;
  gsize mask;
  NvSlot * ring;
  GumTlsKey tls_key;
  guint64 large_bytes;
  gsize tls_off;         /* thread pointer -> our TLS key's value (0: through gum calls) */
  gsize tls_seq;         /* glibc: the key's sequence number, stored just before the value */
  /* threads whose calls are never recorded (Frida's own), and threads initialising TLS */
  volatile gsize init_tids[NV_INIT_TIDS];
  gsize ignored_tids[NV_IGNORED_TIDS];
  gsize n_ignored;
  /* new threads (tid, in first-call order): producers append, JS reads and clears */
  volatile gsize new_head;
  volatile gsize new_tids[NV_NEW_TIDS];
  gsize new_read;
  /* Frida threads seen only after init (JS thread writes; nv_finish filters their records) */
  gsize late_tids[NV_LATE_TIDS];
  gsize n_late;
  /* consumer-only state */
  guint64 clock0;        /* raw clock at time zero */
  gint64 mono0;          /* g_get_monotonic_time() at time zero */
  gint64 wall0;          /* g_get_real_time() at time zero */
  guint64 anchor_clock;  /* raw clock / µs pair of the previous drain (tsc conversion) */
  gint64 anchor_us;
  double us_per_tick;    /* TSC rate of the previous drain (or of nv_start) */
  guint64 last_ts_us;    /* records leave nv_drain() with non-decreasing ts */
  gsize last_drop[6];
  /* exact cumulative counters (published + dropped), consumer-only writes */
  guint64 c_allocs;
  guint64 c_frees;
  guint64 c_reallocs;
  guint64 c_failures;
  guint64 c_bytes;
  guint64 c_dropped;
  guint64 c_published;
  guint64 now_us;
  /* patch watch (see nv_on_protect): two tables of [lo, hi) ranges; JS fills the one not in
   * use, then publishes it with its length in watch_sel = table | (n << 1) */
  volatile gsize watch_sel;
  gsize watch_lo[2][NV_WATCH_MAX];
  gsize watch_hi[2][NV_WATCH_MAX];
  gpointer watch_cb;     /* JS NativeCallback: checks the hooks for foreign patches */
  volatile gsize watch_paused[NV_WATCH_PAUSED];  /* OS thread ids, 0 = free */
} NvState;

extern NvState nv_state;
extern gpointer nv_orig[];

#ifdef NV_WINDOWS
extern guint32 __attribute__ ((stdcall)) GetCurrentThreadId (void);
static gsize nv_os_tid (void) { return GetCurrentThreadId (); }
#else
extern long syscall (long number, ...);
# if NV_PTR64
#  define NV_SYS_GETTID 186
# else
#  define NV_SYS_GETTID 224
# endif
static gsize nv_os_tid (void) { return (gsize) syscall (NV_SYS_GETTID); }
#endif

/* Durations are stored in clock units >> NV_DUR_SHIFT so a u32 spans minutes of TSC ticks. */
#ifdef NV_CLOCK_TSC
# define NV_DUR_SHIFT 10
#else
# define NV_DUR_SHIFT 0
#endif

static inline gsize
nv_cas (volatile gsize * p, gsize expected, gsize desired)
{
  gsize prev;
  asm volatile ("lock; cmpxchg %2, %1"
      : "=a" (prev), "+m" (*p)
      : "r" (desired), "0" (expected)
      : "memory", "cc");
  return prev;
}

static inline gsize
nv_fetch_add (volatile gsize * p, gsize v)
{
  asm volatile ("lock; xadd %0, %1" : "+r" (v), "+m" (*p) : : "memory", "cc");
  return v;
}

static inline guint64
nv_clock (void)
{
#if defined (NV_BENCH_NO_CLOCK)
  return 1;  /* bench only: the clock's share of the cost */
#elif defined (NV_CLOCK_TSC)
  guint32 lo, hi;
  asm volatile ("rdtsc" : "=a" (lo), "=d" (hi));
  return ((guint64) hi << 32) | lo;
#else
  return (guint64) g_get_monotonic_time ();
#endif
}

/* ---------------------------------------------------------------- per-thread state
 * One TLS word per thread: (tid << 2) | 2 (initialised) | 1 (inside a hook).
 * The first call in a thread takes the slow path: ask the OS for the tid, and set the TLS word
 * while the tid is listed in init_tids, because pthread_setspecific may itself calloc() (glibc,
 * keys >= 32) and that nested call must pass straight through.
 */

static gsize
nv_thread_slow (void)
{
  gsize tid = nv_os_tid ();
  gsize i, slot;
  gsize v;

  for (i = 0; i != NV_INIT_TIDS; i++)
    if (nv_state.init_tids[i] == tid)
      return 0;  /* nested call from our own pthread_setspecific: pass through */

  v = (tid << 2) | 2;
  for (i = 0; i != nv_state.n_ignored; i++)
    if (nv_state.ignored_tids[i] == tid)
      v |= 1;  /* a Frida thread: permanently "inside", so never recorded */
  if ((v >> 2) != tid)
    return 0;  /* tid does not fit (ia32 with a huge tid): leave unrecorded */

  for (slot = 0; slot != NV_INIT_TIDS; slot++)
    if (nv_cas (&nv_state.init_tids[slot], 0, tid) == 0)
      break;
  if (slot == NV_INIT_TIDS)
    return 0;
  gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v));
  nv_state.init_tids[slot] = 0;
  if (v & 1)
    return 0;
  /* JS asks Frida's cloak whether this is one of Frida's threads started after init; the entry
     is stored before this thread publishes any record (x86 TSO), see nv_finish() */
  i = nv_fetch_add (&nv_state.new_head, 1);
  nv_state.new_tids[i % NV_NEW_TIDS] = tid;
  return v;
}

/* Returns the thread word (tid << 2 | 2) and marks the thread "inside", or 0 = pass through. */
static inline gsize
nv_enter (void)
{
#if defined (NV_BENCH_PASSTHROUGH)
  return 0;  /* bench only: replaceFast + a call through, nothing recorded */
#elif defined (NV_BENCH_NO_THREAD_STATE)
  return (1 << 2) | 2;  /* bench only: no TLS, no re-entrancy guard, tid 1 */
#endif
  gsize v = GPOINTER_TO_SIZE (gum_tls_key_get_value (nv_state.tls_key));
  if (v & 1)
    return 0;
  if (v == 0)
  {
    v = nv_thread_slow ();
    if (v == 0)
      return 0;
  }
  gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v | 1));
  return v;
}

static inline void
nv_leave (gsize v)
{
#if defined (NV_BENCH_PASSTHROUGH) || defined (NV_BENCH_NO_THREAD_STATE)
  return;
#endif
  gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v));
}

/*
 * The same thread word without a library call per hooked call. Our gum TLS key's value lives at
 * a fixed offset from the thread pointer (glibc: struct pthread's specific_1stblock[key].data for
 * keys < 32; Windows: TEB TlsSlots[key] for keys < 64). agent.js finds that offset at init by a
 * round trip of sentinels through gum on its own thread and sets nv_state.tls_off; when it is not
 * found (another C library, a key in glibc's second level) tls_off stays 0 and the gum calls are
 * used. A thread's first call still goes through gum (pthread_setspecific marks the key in use,
 * so glibc clears the value at thread exit and a reused thread block starts at 0).
 */
#if !defined (NV_WINDOWS) && NV_PTR64
# define NV_READ_TP(tp) asm volatile ("mov %%fs:0x10, %0" : "=r" (tp))  /* tcbhead_t.self */
#elif !defined (NV_WINDOWS)
# define NV_READ_TP(tp) asm volatile ("mov %%gs:0x8, %0" : "=r" (tp))   /* tcbhead_t.self */
#elif NV_PTR64
# define NV_READ_TP(tp) asm volatile ("mov %%gs:0x30, %0" : "=r" (tp))  /* NT_TIB.Self */
#else
# define NV_READ_TP(tp) asm volatile ("mov %%fs:0x18, %0" : "=r" (tp))  /* NT_TIB.Self */
#endif

/* glibc keeps a stale value of a deleted key whose index was reused until the owner thread reads
   it through pthread_getspecific (which checks the sequence number): so do we, through gum.
   Windows clears every thread's slot in TlsFree. */
#ifdef NV_WINDOWS
# define NV_TLS_FRESH(tl) 1
#else
# define NV_TLS_FRESH(tl) ((tl)[-1] == nv_state.tls_seq)
#endif

#if defined (NV_BENCH_PASSTHROUGH)
# define NV_ENTER(tl, th) do { tl = NULL; th = 0; } while (0)
#elif defined (NV_BENCH_NO_THREAD_STATE)
# define NV_ENTER(tl, th) do { tl = NULL; th = (1 << 2) | 2; } while (0)
#elif defined (NV_BENCH_TLS_CALLS)
# define NV_ENTER(tl, th) do { tl = NULL; th = nv_enter (); } while (0)
#else
/* written out in each replacement: TinyCC does not inline */
# define NV_ENTER(tl, th) \
  do \
  { \
    gsize off_ = nv_state.tls_off; \
    tl = NULL; \
    if (off_ != 0) \
    { \
      gsize tp_; \
      NV_READ_TP (tp_); \
      tl = (volatile gsize *) (tp_ + off_); \
      th = *tl; \
      if (th == 0 || !NV_TLS_FRESH (tl)) \
        th = nv_enter (); \
      else if (th & 1) \
        th = 0; \
      else \
        *tl = th | 1; \
    } \
    else \
      th = nv_enter (); \
  } while (0)
#endif
#define NV_LEAVE(tl, th) do { if ((tl) != NULL) *(tl) = (th); else nv_leave (th); } while (0)

/* ---------------------------------------------------------------- ring */

/* A position for one record, or NULL when the ring is full (the caller counts a drop). */
static inline NvSlot *
nv_reserve (gsize * pos_out)
{
  gsize h = nv_state.head;
  for (;;)
  {
    gsize prev;
    /* signed: h may be stale and already behind a tail read after it (then the CAS fails) */
    if ((gssize) (h - nv_state.tail) >= (gssize) nv_state.slots)
      return NULL;
    prev = nv_cas (&nv_state.head, h, h + 1);
    if (prev == h)
      break;
    h = prev;
  }
  *pos_out = h;
  return &nv_state.ring[h & nv_state.mask];
}

/* Every field but the timestamp (each writer takes its clock at its own moment). A macro: TinyCC
   does not inline, and nv_emit is on every hooked call. */
#define NV_FILL(r_, pos_, kind_, hook_, ptr_, old_ptr_, size_, caller_, th_, dur_) \
  do \
  { \
    (r_)->ptr = (ptr_); \
    (r_)->old_ptr = (old_ptr_); \
    (r_)->size = (size_); \
    (r_)->caller = GPOINTER_TO_SIZE (caller_); \
    (r_)->tid = (guint32) ((th_) >> 2); \
    (r_)->dur = (guint32) (dur_); \
    (r_)->kind = (guint8) (kind_); \
    (r_)->hook = (guint8) (hook_); \
    (r_)->flags = 0; \
    (r_)->seq = (guint32) (pos_); \
  } while (0)

static inline void
nv_publish (NvSlot * s, gsize pos)
{
  NV_BARRIER ();
  s->pub = pos + 1;
}

static void
nv_drop (guint kind, guint64 bytes)
{
  nv_fetch_add (&nv_state.drop_n, 1);
  if (kind == KIND_ALLOC)
    nv_fetch_add (&nv_state.drop_allocs, 1);
  else if (kind == KIND_FREE)
    nv_fetch_add (&nv_state.drop_frees, 1);
  else if (kind == KIND_REALLOC)
    nv_fetch_add (&nv_state.drop_reallocs, 1);
  else
    nv_fetch_add (&nv_state.drop_failures, 1);
  if (bytes != 0)
    nv_fetch_add (&nv_state.drop_bytes, (gsize) bytes);
}

/* One complete record written now. TinyCC does not inline, so the hot path is written flat here
   (reserve, clock, fill, publish in one frame) rather than as calls to the helpers above. */
static void
nv_emit (guint kind, guint hook, gsize ptr, gsize old_ptr, guint64 size, gpointer caller,
    gsize th, guint64 dur)
{
  /* through a pointer: TinyCC would address an extern in an asm "m" operand RIP-relative */
  volatile gsize * headp = &nv_state.head;
  gsize h = *headp;
  NvSlot * s;
  NvRecord * r;
  for (;;)
  {
    gsize prev;
    if ((gssize) (h - nv_state.tail) >= (gssize) nv_state.slots)  /* signed: see nv_reserve */
    {
      nv_drop (kind, (kind == KIND_ALLOC || (kind == KIND_REALLOC && ptr != 0)) ? size : 0);
      return;
    }
    asm volatile ("lock; cmpxchg %2, %1"
        : "=a" (prev), "+m" (*headp)
        : "r" (h + 1), "0" (h)
        : "memory", "cc");
    if (prev == h)
      break;
    h = prev;
  }
  s = &nv_state.ring[h & nv_state.mask];
  r = &s->rec;
#if defined (NV_BENCH_NO_CLOCK)
  r->ts = 1;
#elif defined (NV_CLOCK_TSC)
  {
    guint32 lo, hi;
    asm volatile ("rdtsc" : "=a" (lo), "=d" (hi));
    r->ts = ((guint64) hi << 32) | lo;
  }
#else
  r->ts = (guint64) g_get_monotonic_time ();
#endif
  NV_FILL (r, h, kind, hook, ptr, old_ptr, size, caller, th, dur);
  NV_BARRIER ();
  s->pub = h + 1;
}

/* Outcome of an allocating call (alloc, calloc, aligned): ALLOC, or FAILED for NULL. */
static inline void
nv_alloc_done (guint hook, gsize result, guint64 size, gpointer caller, gsize th, guint64 t0)
{
  guint64 dur = 0;
  if (t0 != 0)
    dur = (nv_clock () - t0) >> NV_DUR_SHIFT;
  if (result != 0)
    nv_emit (KIND_ALLOC, hook, result, 0, size, caller, th, dur);
  else if (size != 0)
    nv_emit (KIND_FAILED, hook, 0, 0, size, caller, th, dur);
  /* NULL for 0 bytes is a legal answer, neither a block nor a failure: not recorded */
}

/* A FREE is published before the block is released, so its record precedes any reuse. */
static inline void
nv_free_before (guint hook, gsize ptr, gpointer caller, gsize th)
{
  nv_emit (KIND_FREE, hook, ptr, 0, 0, caller, th, 0);
}

/* A REALLOC holds its slot across the call: reserved before (the old block may be released),
   filled and published after (the new block is known). */
static inline NvSlot *
nv_realloc_begin (gsize * pos, guint64 * ts)
{
  NvSlot * s = nv_reserve (pos);
  *ts = nv_clock ();
  return s;
}

static inline void
nv_realloc_end (NvSlot * s, gsize pos, guint64 ts, guint hook, gsize result, gsize old_ptr,
    guint64 size, gpointer caller, gsize th)
{
  guint kind = KIND_REALLOC;
  guint64 dur = 0;
  if (result == 0 && size != 0)
    kind = KIND_FAILED;
  if (size > nv_state.large_bytes)
    dur = (nv_clock () - ts) >> NV_DUR_SHIFT;
  if (s == NULL)
  {
    nv_drop (kind, (kind == KIND_REALLOC && result != 0) ? size : 0);
    return;
  }
  s->rec.ts = ts;
  NV_FILL (&s->rec, pos, kind, hook, result, old_ptr,
      kind == KIND_REALLOC && result == 0 ? 0 : size, caller, th, dur);
  nv_publish (s, pos);
}

/* ---------------------------------------------------------------- JS-facing functions */

static void
nv_fold_drops (void)
{
  gsize cur[6];
  gsize i;
  guint64 d[6];
  cur[0] = nv_state.drop_n;
  cur[1] = nv_state.drop_allocs;
  cur[2] = nv_state.drop_frees;
  cur[3] = nv_state.drop_reallocs;
  cur[4] = nv_state.drop_failures;
  cur[5] = nv_state.drop_bytes;
  for (i = 0; i != 6; i++)
  {
    d[i] = (guint64) (gsize) (cur[i] - nv_state.last_drop[i]);  /* modular: ia32 wraps */
    nv_state.last_drop[i] = cur[i];
  }
  nv_state.c_dropped += d[0];
  nv_state.c_allocs += d[1];
  nv_state.c_frees += d[2];
  nv_state.c_reallocs += d[3];
  nv_state.c_failures += d[4];
  nv_state.c_bytes += d[5];
}

/* Configuration from JS (before nv_start). */
void
nv_configure (gsize slots, NvSlot * ring, guint64 large_bytes)
{
  nv_state.slots = slots;
  nv_state.mask = slots - 1;
  nv_state.ring = ring;
  nv_state.large_bytes = large_bytes;
}

/* µs since time zero, for JS control messages. */
guint64
nv_now_us (void)
{
  return (guint64) (g_get_monotonic_time () - nv_state.mono0);
}

/* Time zero. JS calls this once, after filling the configuration, before installing hooks. */
void
nv_start (void)
{
  gint64 m0, m1;
  guint64 c0, c1;

  nv_state.tls_key = gum_tls_key_new ();
  m0 = g_get_monotonic_time ();
  c0 = nv_clock ();
  nv_state.wall0 = g_get_real_time ();
#ifdef NV_CLOCK_TSC
  /* rough rate for the first drain; every drain re-anchors on the monotonic clock */
  do
    m1 = g_get_monotonic_time ();
  while (m1 - m0 < 2000);
  c1 = nv_clock ();
  nv_state.us_per_tick = (double) (m1 - m0) / (double) (gint64) (c1 - c0);
#else
  m1 = m0;
  c1 = c0;
#endif
  nv_state.mono0 = m0;
  nv_state.clock0 = c0;
  nv_state.anchor_clock = c1;
  nv_state.anchor_us = m1 - m0;
}

gint64
nv_wall0 (void)
{
  return nv_state.wall0;
}

/* For agent.js's search of the TLS offset (on its own thread, before any hook). */
gsize
nv_thread_pointer (void)
{
  gsize tp;
  NV_READ_TP (tp);
  return tp;
}

gsize
nv_tls_get (void)
{
  return GPOINTER_TO_SIZE (gum_tls_key_get_value (nv_state.tls_key));
}

void
nv_tls_set (gsize v)
{
  gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v));
}

void
nv_set_tls_off (gsize off, gsize seq)
{
  nv_state.tls_seq = seq;
  nv_state.tls_off = off;
}

/* The calling thread (Frida's JS thread) is never recorded. */
void
nv_ignore_tid (gsize tid)
{
  if (nv_state.n_ignored < NV_IGNORED_TIDS)
    nv_state.ignored_tids[nv_state.n_ignored++] = tid;
}

/* JS running on a target thread (a module observer callback on the thread that loads the
   module): its allocations are Frida's, not the target's. Returns the word to restore. */
gsize
nv_suspend_current_thread (void)
{
  gsize v = GPOINTER_TO_SIZE (gum_tls_key_get_value (nv_state.tls_key));
  if (v == 0)
    v = nv_thread_slow ();
  if (v == 0 || (v & 1))
    return 0;
  gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v | 1));
  return v;
}

void
nv_resume_current_thread (gsize v)
{
  if (v != 0)
    gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v));
}

void
nv_ignore_current_thread (void)
{
  gsize v = GPOINTER_TO_SIZE (gum_tls_key_get_value (nv_state.tls_key));
  if (v == 0)
    v = (nv_os_tid () << 2) | 2;
  gum_tls_key_set_value (nv_state.tls_key, GSIZE_TO_POINTER (v | 1));
}

/*
 * Copies up to `max` published records in ring order into `out`, converting the raw clock to
 * µs since time zero (non-decreasing, never later than this drain's now_us), and tallies the
 * exact counters. Returns the number of records copied.
 */
guint
nv_drain (NvRecord * out, guint max)
{
  gsize t = nv_state.tail;
  guint n = 0;
  gint64 now_us;
  guint64 now_clock;
#ifdef NV_CLOCK_TSC
  double us_per_tick;
#endif
  guint64 last = nv_state.last_ts_us;

  now_clock = nv_clock ();
  now_us = g_get_monotonic_time () - nv_state.mono0;
#ifdef NV_CLOCK_TSC
  if (now_clock > nv_state.anchor_clock && now_us > nv_state.anchor_us + 1000)
    us_per_tick = (double) (now_us - nv_state.anchor_us)
        / (double) (gint64) (now_clock - nv_state.anchor_clock);
  else
    us_per_tick = nv_state.us_per_tick;
#endif

  while (n != max)
  {
    NvSlot * s = &nv_state.ring[t & nv_state.mask];
    NvRecord * r = out + n;
    guint64 ts;
    if (s->pub != t + 1)
      break;
    NV_BARRIER ();
    *r = s->rec;
#ifdef NV_CLOCK_TSC
    {
      gint64 dt = (gint64) (r->ts - nv_state.anchor_clock);
      gint64 us = (gint64) ((double) nv_state.anchor_us + (double) dt * us_per_tick);
      ts = us < 0 ? 0 : (guint64) us;
      if (r->dur != 0)
      {
        gint64 d = (gint64) ((double) ((gint64) r->dur << NV_DUR_SHIFT) * us_per_tick);
        r->dur = (d < 0 || d > (gint64) 0xffffffffU) ? 0xffffffffU : (guint32) d;
      }
    }
#else
    ts = r->ts - (guint64) nv_state.mono0;
#endif
    if (ts < last)
      ts = last;
    if (ts > (guint64) now_us)
      ts = (guint64) now_us;
    r->ts = ts;
    last = ts;
    n++;
    t++;
  }
  NV_BARRIER ();
  nv_state.tail = t;
  nv_state.last_ts_us = last;
  nv_state.now_us = (guint64) now_us;
#ifdef NV_CLOCK_TSC
  if (now_us > nv_state.anchor_us + 1000)
  {
    nv_state.anchor_clock = now_clock;
    nv_state.anchor_us = now_us;
    nv_state.us_per_tick = us_per_tick;
  }
#endif
  nv_fold_drops ();
  return n;
}

/*
 * Second half of a drain, after JS has classified the threads listed since the last drain:
 * drops the records of Frida threads found late (their first calls looked like the target's),
 * numbers the rest contiguously (`seq`) and tallies the exact counters. Returns the count kept.
 */
guint
nv_finish (NvRecord * out, guint n)
{
  guint i, k = 0;
  gsize nl = nv_state.n_late;
  for (i = 0; i != n; i++)
  {
    NvRecord * r = out + i;
    gsize j;
    for (j = 0; j != nl; j++)
      if (nv_state.late_tids[j] == r->tid)
        break;
    if (j != nl)
      continue;
    if (k != i)
      out[k] = *r;
    r = out + k;
    r->seq = (guint32) (nv_state.c_published + k);
    switch (r->kind)
    {
      case KIND_ALLOC: nv_state.c_allocs++; nv_state.c_bytes += r->size; break;
      case KIND_FREE: nv_state.c_frees++; break;
      case KIND_REALLOC:
        nv_state.c_reallocs++;
        if (r->ptr != 0)
          nv_state.c_bytes += r->size;
        break;
      default: nv_state.c_failures++; break;
    }
    k++;
  }
  nv_state.c_published += k;
  return k;
}

/* Next thread that made its first call, or 0 when none is pending (JS thread only). */
gsize
nv_next_new_tid (void)
{
  gsize i = nv_state.new_read;
  gsize tid;
  if (i == nv_state.new_head)
    return 0;
  if (nv_state.new_head - i > NV_NEW_TIDS)
    i = nv_state.new_head - NV_NEW_TIDS;  /* fell behind (thousands of new threads): skip */
  tid = nv_state.new_tids[i % NV_NEW_TIDS];
  if (tid == 0)
    return 0;  /* position taken, tid not stored yet: next drain */
  nv_state.new_tids[i % NV_NEW_TIDS] = 0;
  nv_state.new_read = i + 1;
  return tid;
}

void
nv_ignore_late_tid (gsize tid)
{
  if (nv_state.n_late < NV_LATE_TIDS)
    nv_state.late_tids[nv_state.n_late++] = tid;
}

gsize
nv_state_size (void)
{
  return sizeof (NvState);
}

guint64 *
nv_counters (void)
{
  return &nv_state.c_allocs;  /* allocs, frees, reallocs, failures, bytes, dropped, published, now */
}

/*
 * Patch watch: onEnter of the memory-protection call (mprotect, VirtualProtect; address and size
 * are its first two arguments). A heap replacer makes an entry point's page writable, writes its
 * JMP and restores the protection: at that second call the JMP is there, and this thread has not
 * gone on to call through it yet. Only calls whose range covers one of our hooks reach JS.
 */
void
nv_on_protect (GumInvocationContext * ic)
{
  gsize a = GPOINTER_TO_SIZE (gum_invocation_context_get_nth_argument (ic, 0));
  gsize n = GPOINTER_TO_SIZE (gum_invocation_context_get_nth_argument (ic, 1));
  gsize sel = nv_state.watch_sel;
  gsize t = sel & 1, count = sel >> 1;
  gsize i;

  if (nv_state.watch_cb == NULL)
    return;
  for (i = 0; i != count && i != NV_WATCH_MAX; i++)
  {
    if (a < nv_state.watch_hi[t][i] && a + n > nv_state.watch_lo[t][i])
    {
      /* not when it is us writing our hooks (per thread: another thread's patch meanwhile
       * must still be seen; its callback waits for the JS lock until we are done) */
      gsize tid = nv_os_tid ();
      for (i = 0; i != NV_WATCH_PAUSED; i++)
      {
        if (nv_state.watch_paused[i] == tid)
          return;
      }
      ((void (*) (void)) nv_state.watch_cb) ();
      return;
    }
  }
}

/* JS: fill table `t` (the one not in use), then nv_watch_publish (t, n, cb). */
void
nv_watch_set (gsize t, gsize i, gsize lo, gsize hi)
{
  if (t < 2 && i < NV_WATCH_MAX)
  {
    nv_state.watch_lo[t][i] = lo;
    nv_state.watch_hi[t][i] = hi;
  }
}

gsize
nv_watch_publish (gsize t, gsize n, gpointer cb)
{
  nv_state.watch_cb = cb;
  NV_BARRIER ();
  nv_state.watch_sel = (t & 1) | ((n < NV_WATCH_MAX ? n : NV_WATCH_MAX) << 1);
  return nv_state.watch_sel;
}

/* The calling thread's protection calls are ours (on) or not any more (off). */
void
nv_watch_pause (gsize tid, gsize on)
{
  gsize i;

  for (i = 0; i != NV_WATCH_PAUSED; i++)
  {
    if (nv_state.watch_paused[i] == (on ? 0 : tid))
    {
      nv_state.watch_paused[i] = on ? tid : 0;
      return;
    }
  }
}

/* Caller of a hook installed with Interceptor.replace (the slow fallback). */
static gpointer
nv_slow_ra (void)
{
  GumInvocationContext * ic = gum_interceptor_get_current_invocation ();
  return ic != NULL ? gum_invocation_context_get_return_address (ic) : NULL;
}

/* ---------------------------------------------------------------- generated replacements */
