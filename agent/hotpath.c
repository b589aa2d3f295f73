/*
 * nvse-monitor hot path, compiled in the target by Frida's CModule (TinyCC).
 *
 * agent.js prepends a few #defines (NV_WINDOWS, NV_BENCH_*; NV_WRAPPERS when the profile names
 * wrapper functions, NV_SAMPLING when stacks are sampled: without them the hot path is exactly
 * the plain one) and appends one replacement function per profile hook (generated for its role
 * and ABI). Everything writable lives in `nv_state` /
 * `nv_orig` (Memory.alloc'd by JS: CModule data is read-only) and in `nv_shared`, the header of
 * the ring's mapping, which the host maps too (docs/agent.md "Shared-memory transport").
 *
 * Ring: `slots` (power of two) slots of 64 bytes = 56-byte record + a publish word.
 *   producer: reserve a position with lock cmpxchg on head (bounded: never passes tail + slots),
 *             fill the record, then store publish word = pos + 1. A full ring makes it wait
 *             (policy `wait`, bounded by max_wait_us) or drop (policy `drop`), counted.
 *   consumer: the host's reader thread, straight from the mapping (or, where no mapping could be
 *             made, nv_drain() for JS's messages): copies slots from tail while publish word ==
 *             pos + 1, then advances tail.
 * x86 is TSO: stores are seen in program order, so the publish store (after a compiler barrier)
 * makes the whole record visible; loads are not reordered with older loads.
 *
 * Time: producers read no clock (it was the largest cost on some hosts). A record's time is its
 * ring position's: the consumer notes (head, now) at each look and interpolates between them.
 * Only calls above the large-allocation threshold read the monotonic clock, for their duration.
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
#define KIND_STACK 6         /* one chunk of a sampled call's stack (stream/events.py) */
#define NV_FLAG_SAMPLED 0x0001
#define NV_FLAG_VIA_WRAPPER 0x0002
#define NV_FLAG_REALLOC_HALF 0x0004  /* a FREE: the free half of a realloc that moved */
#define NV_STACK_PER_RECORD 4
#define NV_STACK_MAX 16
#define NV_EXP_N 4096        /* entries of the exponential table JS fills (nv_exp) */

#if defined (NV_WRAPPERS) || defined (NV_SAMPLING)
# define NV_FLAGS 1          /* records carry flags; threads have the extra TLS slots */
# define NV_FL_PARAM , guint flags
# define NV_FL_ARG(f) , (f)
# define NV_FL_VAL flags
#else
# define NV_FL_PARAM
# define NV_FL_ARG(f)
# define NV_FL_VAL 0
#endif

#define NV_BARRIER() asm volatile ("" : : : "memory")

typedef struct
{
  guint64 ts;        /* not written by producers; µs since time zero, set by the consumer */
  guint64 ptr;
  guint64 old_ptr;
  guint64 size;
  guint64 caller;
  guint32 tid;
  guint32 dur;       /* µs, only for calls above the large-allocation threshold */
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

#define NV_LINE(n) guint8 n[64 - sizeof (gsize)]

/*
 * The ring's header, at offset 0 of the mapping both sides map (host: Python mmap). Fixed
 * offsets (docs/format.md): 64-byte lines; every `gsize` is the TARGET's pointer width (4 on
 * ia32), positions and tallies wrap modulo 2^width and the host compares them that way.
 * The host writes line 0 and line 5's policy before the agent starts, `tail` and `host_polls`
 * while it reads; everything else is the agent's. The host trusts none of it beyond bounds.
 */
typedef struct
{
  /* 0: layout (host) */
  guint32 magic;          /* 0x524d564e "NVMR" */
  guint32 version;        /* 1 */
  guint32 ptr_size;       /* 4 or 8 */
  guint32 slot_size;      /* 64 */
  guint64 slots;
  guint64 header_bytes;   /* the ring starts here */
  guint8 pad0[32];
  /* 64: producers */
  volatile gsize head;
  NV_LINE (pad1);
  /* 128: consumer */
  volatile gsize tail;
  NV_LINE (pad2);
  /* 192: drop tallies (atomics, only when a record is dropped) */
  volatile gsize drop_n;
  volatile gsize drop_allocs;
  volatile gsize drop_frees;
  volatile gsize drop_reallocs;
  volatile gsize drop_failures;
  volatile gsize drop_bytes;
  guint8 pad3[64 - 6 * sizeof (gsize)];
  /* 256: waits on a full ring (atomics, only when a producer waited) */
  volatile gsize stall_n;
  volatile gsize stall_us;
  volatile gsize stall_max_us;
  guint8 pad4[64 - 3 * sizeof (gsize)];
  /* 320: control */
  volatile guint32 on_full;      /* 0 drop, 1 wait (host, before start) */
  volatile guint32 max_wait_us;  /* (host, before start) */
  volatile guint32 closing;      /* agent: unloading, nobody may wait any more */
  volatile guint32 host_stalled; /* agent sets, host clears: no look at the ring for a while */
  volatile gsize host_polls;     /* host: one more per look at the ring (its heartbeat) */
  guint8 pad5[64 - 16 - sizeof (gsize)];
  /* 384: thread classification (see nv_thread_slow, nv_classified) */
  volatile gsize new_head;       /* threads that made a first call */
  volatile gsize new_done;       /* of those, classified by JS (late Frida threads listed) */
  volatile gsize n_late;
  guint8 pad6[64 - 3 * sizeof (gsize)];
  guint8 pad7[64];  /* 448: reserved */
  /* 512: Frida threads found after init */
  volatile gsize late_tids[NV_LATE_TIDS];
} NvShared;

#define NV_HEADER_BYTES 4096
#define NV_KIND_MARK 5          /* a marker record: ptr = control message number (JS) */
#define NV_SPIN 64              /* full ring: pause this many times, */
#define NV_YIELDS 96            /* then yield up to here, then sleep, from NV_SLEEP_US up */
#define NV_SLEEP_US 50
#define NV_SLEEP_MAX_US 1000
#define NV_HOST_STALL_US 3000000 /* no heartbeat for this long: the host is gone or hung */

typedef struct
{
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
  /* new threads (tid, in first-call order; count in nv_shared.new_head): JS reads and clears */
  volatile gsize new_tids[NV_NEW_TIDS];
  gsize new_read;
  /* consumer-only state (message transport: nv_drain / nv_finish) */
  gint64 mono0;          /* g_get_monotonic_time() at time zero */
  gint64 wall0;          /* g_get_real_time() at time zero */
  gsize anchor_pos;      /* head / µs at the previous drain: records between are interpolated */
  guint64 anchor_us;
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
  guint64 c_dropped_frees;
  /* patch watch (see nv_on_protect): two tables of [lo, hi) ranges; JS fills the one not in
   * use, then publishes it with its length in watch_sel = table | (n << 1) */
  volatile gsize watch_sel;
  gsize watch_lo[2][NV_WATCH_MAX];
  gsize watch_hi[2][NV_WATCH_MAX];
  gpointer watch_cb;     /* JS NativeCallback: checks the hooks for foreign patches */
  volatile gsize watch_paused[NV_WATCH_PAUSED];  /* OS thread ids, 0 = free */
  /* two more TLS keys, created only with NV_WRAPPERS / NV_SAMPLING, with the same direct path
   * as the first (offset from the thread pointer, glibc sequence number; 0 = gum calls):
   * [1] wrapper slot: address of the outermost live wrapper's return address (0 = none);
   * [2] sampling countdown: bytes left before the next sampled call (0 = not armed yet) */
  GumTlsKey tls_key_w;
  GumTlsKey tls_key_s;
  gsize tls_off_w;
  gsize tls_seq_w;
  gsize tls_off_s;
  gsize tls_seq_s;
  /* sampling: exponential variates of mean sample_bytes (bytes, >= 1; JS fills NV_EXP_N) and
   * the random source: splitmix64 over a counter advanced only on the sampling path */
  gsize * exp_table;
  volatile gsize rng_ctr;
  guint64 rng_seed;
  gsize pid;             /* Linux: the stack walk reads through process_vm_readv on ourselves */
} NvState;

extern NvState nv_state;
extern NvShared nv_shared;
extern gpointer nv_orig[];

#ifdef NV_WINDOWS
extern guint32 __attribute__ ((stdcall)) GetCurrentThreadId (void);
extern gint32 __attribute__ ((stdcall)) SwitchToThread (void);
extern void __attribute__ ((stdcall)) Sleep (guint32 ms);
static gsize nv_os_tid (void) { return GetCurrentThreadId (); }
static void nv_yield (void) { SwitchToThread (); }
static void nv_sleep_step (guint32 us) { (void) us; Sleep (1); }  /* Windows' shortest */
#else
extern long syscall (long number, ...);
extern int sched_yield (void);
extern int usleep (guint32 us);
# if NV_PTR64
#  define NV_SYS_GETTID 186
# else
#  define NV_SYS_GETTID 224
# endif
static gsize nv_os_tid (void) { return (gsize) syscall (NV_SYS_GETTID); }
static void nv_yield (void) { sched_yield (); }
static void nv_sleep_step (guint32 us) { usleep (us); }
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

/* µs, for durations of calls above the large-allocation threshold only (and the wait path). */
static inline guint64
nv_clock (void)
{
  return (guint64) g_get_monotonic_time ();
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
#ifdef NV_FLAGS
  /* glibc: setting them stores the keys' sequence numbers in this thread's block, so the
     direct path finds them fresh from now on (and glibc clears them at thread exit) */
  gum_tls_key_set_value (nv_state.tls_key_w, NULL);
  gum_tls_key_set_value (nv_state.tls_key_s, NULL);
#endif
  nv_state.init_tids[slot] = 0;
  if (v & 1)
    return 0;
  /* JS asks Frida's cloak whether this is one of Frida's threads started after init; the entry
     is stored before this thread publishes any record (x86 TSO), see nv_finish() */
  i = nv_fetch_add (&nv_shared.new_head, 1);
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
# define NV_TLS_FRESH_SEQ(tl, seq) 1
#else
# define NV_TLS_FRESH_SEQ(tl, seq) ((tl)[-1] == (seq))
#endif
#define NV_TLS_FRESH(tl) NV_TLS_FRESH_SEQ (tl, nv_state.tls_seq)

/* The extra slots ([1] wrapper, [2] countdown): p_ = their word's address in this thread's
   block, or NULL (read and write through gum then). */
#define NV_SLOT(p_, off_, seq_) \
  do \
  { \
    gsize o2_ = (off_); \
    p_ = NULL; \
    if (o2_ != 0) \
    { \
      gsize tp2_; \
      NV_READ_TP (tp2_); \
      p_ = (volatile gsize *) (tp2_ + o2_); \
      if (!NV_TLS_FRESH_SEQ (p_, (seq_))) \
        p_ = NULL; \
    } \
  } while (0)
#define NV_SLOT_GET(p_, key_) \
  ((p_) != NULL ? *(p_) : GPOINTER_TO_SIZE (gum_tls_key_get_value (key_)))
#define NV_SLOT_SET(p_, key_, v_) \
  do \
  { \
    if ((p_) != NULL) \
      *(p_) = (v_); \
    else \
      gum_tls_key_set_value ((key_), GSIZE_TO_POINTER (v_)); \
  } while (0)

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

/* Is this thread one of Frida's found after init? (only asked on the full-ring path) */
static int
nv_is_late (gsize tid)
{
  gsize i, n = nv_shared.n_late;
  for (i = 0; i != n && i != NV_LATE_TIDS; i++)
    if (nv_shared.late_tids[i] == tid)
      return 1;
  return 0;
}

static void
nv_drop (guint kind, guint64 bytes)
{
  nv_fetch_add (&nv_shared.drop_n, 1);
  if (kind == KIND_ALLOC)
    nv_fetch_add (&nv_shared.drop_allocs, 1);
  else if (kind == KIND_FREE)
    nv_fetch_add (&nv_shared.drop_frees, 1);
  else if (kind == KIND_REALLOC)
    nv_fetch_add (&nv_shared.drop_reallocs, 1);
  else
    nv_fetch_add (&nv_shared.drop_failures, 1);
  if (bytes != 0)
    nv_fetch_add (&nv_shared.drop_bytes, (gsize) bytes);
}

static void
nv_count_stall (guint64 us)
{
  gsize m = nv_shared.stall_max_us;
  nv_fetch_add (&nv_shared.stall_n, 1);
  nv_fetch_add (&nv_shared.stall_us, (gsize) us);
  while ((gsize) us > m)
  {
    gsize prev = nv_cas (&nv_shared.stall_max_us, m, (gsize) us);
    if (prev == m)
      break;
    m = prev;
  }
}

/*
 * The ring is full. Policy `wait`: spin, then yield, then sleep in growing steps (50 µs to 1 ms:
 * waiting threads leave the CPU to the host) until the reader frees a slot (returns 1: reserve
 * again), at most max_wait_us. Returns 0, and the caller counts a drop, at once under policy
 * `drop`, while unloading, on a Frida thread, and while the host is marked stalled: it gave no
 * heartbeat for NV_HOST_STALL_US, or a wait ran out; the host clears the mark when it takes
 * records again, so a stuck host costs one wait, not one per call. Never called with a lock held
 * by us; the thread's TLS word says "inside", so what yield/sleep allocate passes through.
 */
static int
nv_full (gsize th)
{
  guint64 t0, now;
  gsize polls, i;
  guint64 polled_at;
  guint32 nap = NV_SLEEP_US;
  if (nv_shared.on_full == 0 || nv_shared.closing || nv_shared.host_stalled
      || nv_is_late (th >> 2))
    return 0;
  t0 = nv_clock ();
  now = t0;
  polled_at = t0;
  polls = nv_shared.host_polls;
  for (i = 0;; i++)
  {
    if ((gssize) (nv_shared.head - nv_shared.tail) < (gssize) nv_state.slots)
    {
      nv_count_stall (nv_clock () - t0);
      return 1;
    }
    if (nv_shared.closing)
      break;
    if (i < NV_SPIN)
      asm volatile ("pause" : : : "memory");
    else if (i < NV_YIELDS)
      nv_yield ();
    else
    {
      nv_sleep_step (nap);
      if (nap < NV_SLEEP_MAX_US)
        nap += nap;
    }
    if (i >= NV_SPIN)
    {
      now = nv_clock ();
      if (nv_shared.host_polls != polls)
      {
        polls = nv_shared.host_polls;
        polled_at = now;
      }
      else if (now - polled_at >= NV_HOST_STALL_US)
      {
        nv_shared.host_stalled = 1;  /* later calls drop at once until the host looks again */
        break;
      }
      if (now - t0 >= nv_shared.max_wait_us)
      {
        nv_shared.host_stalled = 1;
        break;
      }
      if (nv_is_late (th >> 2))
        break;
    }
  }
  nv_count_stall (now - t0);
  return 0;
}

/* A position for one record, or NULL when it is dropped (the caller counts the drop). th 0:
   never wait (JS's markers). */
static NvSlot *
nv_reserve (gsize * pos_out, gsize th)
{
  volatile gsize * headp = &nv_shared.head;
  gsize h = *headp;
  for (;;)
  {
    gsize prev;
    /* signed: h may be stale and already behind a tail read after it (then the CAS fails) */
    if ((gssize) (h - nv_shared.tail) >= (gssize) nv_state.slots)
    {
      if (th == 0 || !nv_full (th))
        return NULL;
      h = *headp;
      continue;
    }
    prev = nv_cas (headp, h, h + 1);
    if (prev == h)
      break;
    h = prev;
  }
  *pos_out = h;
  return &nv_state.ring[h & nv_state.mask];
}

/* Every field but the timestamp (the consumer sets it from the ring position). A macro: TinyCC
   does not inline, and nv_emit is on every hooked call. */
#define NV_FILL(r_, pos_, kind_, hook_, ptr_, old_ptr_, size_, caller_, th_, dur_, flags_) \
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
    (r_)->flags = (guint16) (flags_); \
    (r_)->seq = (guint32) (pos_); \
  } while (0)

static inline void
nv_publish (NvSlot * s, gsize pos)
{
  NV_BARRIER ();
  s->pub = pos + 1;
}

#define NV_DROPPED_BYTES(kind_, ptr_, size_) \
  (((kind_) == KIND_ALLOC || ((kind_) == KIND_REALLOC && (ptr_) != 0)) ? (size_) : 0)

/* One complete record written now. TinyCC does not inline, so the hot path is written flat here
   (reserve, fill, publish in one frame); only a full ring calls out (nv_reserve). */
static void
nv_emit (guint kind, guint hook, gsize ptr, gsize old_ptr, guint64 size, gpointer caller,
    gsize th, guint64 dur NV_FL_PARAM)
{
  /* through a pointer: TinyCC would address an extern in an asm "m" operand RIP-relative */
  volatile gsize * headp = &nv_shared.head;
  gsize h = *headp;
  NvSlot * s;
  NvRecord * r;
  for (;;)
  {
    gsize prev;
    if ((gssize) (h - nv_shared.tail) >= (gssize) nv_state.slots)  /* signed: see nv_reserve */
    {
      s = nv_reserve (&h, th);
      if (s == NULL)
      {
        nv_drop (kind, NV_DROPPED_BYTES (kind, ptr, size));
        return;
      }
      break;
    }
    asm volatile ("lock; cmpxchg %2, %1"
        : "=a" (prev), "+m" (*headp)
        : "r" (h + 1), "0" (h)
        : "memory", "cc");
    if (prev == h)
    {
      s = &nv_state.ring[h & nv_state.mask];
      break;
    }
    h = prev;
  }
  r = &s->rec;
#if defined (NV_BENCH_TSC)
  {
    guint32 lo, hi;  /* bench only: the 0.2.0 per-record rdtsc, for its cost */
    asm volatile ("rdtsc" : "=a" (lo), "=d" (hi));
    r->ts = ((guint64) hi << 32) | lo;
  }
#endif
  NV_FILL (r, h, kind, hook, ptr, old_ptr, size, caller, th, dur, NV_FL_VAL);
  NV_BARRIER ();
  s->pub = h + 1;
}

/* Outcome of an allocating call (alloc, calloc, aligned): ALLOC, or FAILED for NULL. */
static inline void
nv_alloc_done (guint hook, gsize result, guint64 size, gpointer caller, gsize th, guint64 t0
    NV_FL_PARAM)
{
  guint64 dur = 0;
  if (t0 != 0)
    dur = nv_clock () - t0;
  if (result != 0)
    nv_emit (KIND_ALLOC, hook, result, 0, size, caller, th, dur NV_FL_ARG (flags));
  else if (size != 0)
    nv_emit (KIND_FAILED, hook, 0, 0, size, caller, th, dur NV_FL_ARG (flags));
  /* NULL for 0 bytes is a legal answer, neither a block nor a failure: not recorded */
}

/* A FREE is published before the block is released, so its record precedes any reuse. */
static inline void
nv_free_before (guint hook, gsize ptr, gpointer caller, gsize th)
{
  nv_emit (KIND_FREE, hook, ptr, 0, 0, caller, th, 0 NV_FL_ARG (0));
}

/* A REALLOC holds its slot across the call: reserved before (the old block may be released),
   filled and published after (the new block is known); a drop is counted then, with its
   outcome. A realloc that moved its block is published as two records: its slot becomes the
   FREE of the old block (NV_FLAG_REALLOC_HALF: not a free call), and a REALLOC of the new block
   with old_ptr 0 is reserved after the call. Another thread may free the new block's address
   during the call and the allocator hand it to this realloc: that FREE was reserved before the
   call returned, so it must come before the new block's record, never after (the one-record
   form put it after: a replaced live block, then the new block freed, docs/agent.md). */
static inline NvSlot *
nv_realloc_begin (gsize * pos, guint64 * t0, guint64 size, gsize th)
{
  NvSlot * s = nv_reserve (pos, th);
  *t0 = size > nv_state.large_bytes ? nv_clock () : 0;
  return s;
}

static inline void
nv_realloc_end (NvSlot * s, gsize pos, guint64 t0, guint hook, gsize result, gsize old_ptr,
    guint64 size, gpointer caller, gsize th NV_FL_PARAM)
{
  guint kind = KIND_REALLOC;
  guint64 dur = 0;
  if (result == 0 && size != 0)
    kind = KIND_FAILED;
  if (s == NULL)
  {
    nv_drop (kind, NV_DROPPED_BYTES (kind, result, size));
    return;
  }
  /* The reader gave up on this slot (unpublished for its STUCK_SLOT_S: this thread was
     descheduled that long) and counted it lost: filling it now could overwrite a newer record
     once the ring wraps, so leave it. A thread stopped for as long between this check and the
     publish is the one case left (docs/agent.md Known problems). */
  if ((gssize) (nv_shared.tail - pos) > 0)
    return;
  if (t0 != 0)
    dur = nv_clock () - t0;
  if (kind == KIND_REALLOC && result != 0 && result != old_ptr)
  {
    NV_FILL (&s->rec, pos, KIND_FREE, hook, old_ptr, 0, 0, caller, th, 0, NV_FLAG_REALLOC_HALF);
    nv_publish (s, pos);
    nv_emit (KIND_REALLOC, hook, result, 0, size, caller, th, dur NV_FL_ARG (flags));
    return;
  }
  NV_FILL (&s->rec, pos, kind, hook, result, old_ptr,
      kind == KIND_REALLOC && result == 0 ? 0 : size, caller, th, dur, NV_FL_VAL);
  nv_publish (s, pos);
}

/* ---------------------------------------------------------------- JS-facing functions */

static void
nv_fold_drops (void)
{
  gsize cur[6];
  gsize i;
  guint64 d[6];
  cur[0] = nv_shared.drop_n;
  cur[1] = nv_shared.drop_allocs;
  cur[2] = nv_shared.drop_frees;
  cur[3] = nv_shared.drop_reallocs;
  cur[4] = nv_shared.drop_failures;
  cur[5] = nv_shared.drop_bytes;
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
  nv_state.c_dropped_frees += d[2] + d[3];
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
  nv_state.tls_key = gum_tls_key_new ();
#ifdef NV_FLAGS
  nv_state.tls_key_w = gum_tls_key_new ();
  nv_state.tls_key_s = gum_tls_key_new ();
#endif
  nv_state.mono0 = g_get_monotonic_time ();
  nv_state.wall0 = g_get_real_time ();
}

gint64
nv_wall0 (void)
{
  return nv_state.wall0;
}

/* g_get_monotonic_time() at time zero: the host maps its own clock onto ours with it. */
gint64
nv_mono0 (void)
{
  return nv_state.mono0;
}

/* Unloading: waiting producers give up at once, later ones drop without waiting. */
void
nv_set_closing (void)
{
  nv_shared.closing = 1;
}

/*
 * A marker record (JS, message transport off): a control message (a module loaded) numbered
 * `n` is sent right after; the host delivers it at this place among the records, so records
 * of a module's code never come before the module. Never waits: 0 when the ring is full.
 */
gsize
nv_mark (gsize n)
{
  gsize h;
  NvSlot * s = nv_reserve (&h, 0);
  if (s == NULL)
    return 0;
  NV_FILL (&s->rec, h, NV_KIND_MARK, 0, n, 0, 0, NULL, 0, 0, 0);
  nv_publish (s, h);
  return 1;
}

/* For agent.js's search of the TLS offset (on its own thread, before any hook). */
gsize
nv_thread_pointer (void)
{
  gsize tp;
  NV_READ_TP (tp);
  return tp;
}

/* Key k: 0 the thread word, 1 the wrapper slot, 2 the sampling countdown. */
static GumTlsKey
nv_key (gsize k)
{
  return k == 0 ? nv_state.tls_key : k == 1 ? nv_state.tls_key_w : nv_state.tls_key_s;
}

gsize
nv_tls_get (gsize k)
{
  return GPOINTER_TO_SIZE (gum_tls_key_get_value (nv_key (k)));
}

void
nv_tls_set (gsize k, gsize v)
{
  gum_tls_key_set_value (nv_key (k), GSIZE_TO_POINTER (v));
}

void
nv_set_tls_off (gsize k, gsize off, gsize seq)
{
  if (k == 0)
  {
    nv_state.tls_seq = seq;
    nv_state.tls_off = off;
  }
  else if (k == 1)
  {
    nv_state.tls_seq_w = seq;
    nv_state.tls_off_w = off;
  }
  else
  {
    nv_state.tls_seq_s = seq;
    nv_state.tls_off_s = off;
  }
}

/* Sampling (before nv_start's hooks go in): the exponential table, a seed, our pid. */
void
nv_configure_sampling (gsize * table, guint64 seed, gsize pid)
{
  nv_state.exp_table = table;
  nv_state.rng_seed = seed;
  nv_state.pid = pid;
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
 * Message transport: copies up to `max` published records in ring order into `out`, timing
 * them by position between the previous drain's (head, µs) and this one's (non-decreasing,
 * never later than now). Returns the number of records copied; nv_finish() completes them.
 */
guint
nv_drain (NvRecord * out, guint max)
{
  gsize t = nv_shared.tail;
  guint n = 0;
  gsize head = nv_shared.head;
  guint64 now_us = (guint64) (g_get_monotonic_time () - nv_state.mono0);
  gsize p0 = nv_state.anchor_pos;
  guint64 t0 = nv_state.anchor_us;
  double span = (double) (gssize) (head - p0);
  double per = span > 0 ? (double) (gint64) (now_us - t0) / span : 0;
  guint64 last = nv_state.last_ts_us;

  while (n != max)
  {
    NvSlot * s = &nv_state.ring[t & nv_state.mask];
    NvRecord * r = out + n;
    guint64 ts;
    gssize ahead;
    if (s->pub != t + 1)
      break;
    NV_BARRIER ();
    *r = s->rec;
    ahead = (gssize) (t - p0);  /* reserved after the previous drain's look at head */
    ts = ahead > 0 ? t0 + (guint64) (gint64) ((double) ahead * per) : t0;
    if (ts < last)
      ts = last;
    if (ts > now_us)
      ts = now_us;
    r->ts = ts;
    last = ts;
    n++;
    t++;
  }
  NV_BARRIER ();
  nv_shared.tail = t;
  nv_shared.host_polls++;
  nv_shared.host_stalled = 0;
  nv_state.last_ts_us = last;
  nv_state.now_us = now_us;
  nv_state.anchor_pos = head;
  nv_state.anchor_us = now_us;
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
  gsize nl = nv_shared.n_late;
  for (i = 0; i != n; i++)
  {
    NvRecord * r = out + i;
    gsize j;
    for (j = 0; j != nl; j++)
      if (nv_shared.late_tids[j] == r->tid)
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
      case KIND_FREE:  /* the free half of a moved realloc is no free call */
        if ((r->flags & NV_FLAG_REALLOC_HALF) == 0)
          nv_state.c_frees++;
        break;
      case KIND_REALLOC:
        nv_state.c_reallocs++;
        if (r->ptr != 0)
          nv_state.c_bytes += r->size;
        break;
      case KIND_STACK: break;  /* attribution only: no call */
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
  gsize head = nv_shared.new_head;
  gsize tid;
  if (i == head)
    return 0;
  if (head - i > NV_NEW_TIDS)
    i = head - NV_NEW_TIDS;  /* fell behind (thousands of new threads): skip */
  tid = nv_state.new_tids[i % NV_NEW_TIDS];
  if (tid == 0)
    return 0;  /* position taken, tid not stored yet: next time */
  nv_state.new_tids[i % NV_NEW_TIDS] = 0;
  nv_state.new_read = i + 1;
  return tid;
}

/* JS has classified every thread before new_read (late Frida threads are in late_tids). */
void
nv_classified (void)
{
  NV_BARRIER ();
  nv_shared.new_done = nv_state.new_read;
}

void
nv_ignore_late_tid (gsize tid)
{
  gsize n = nv_shared.n_late;
  if (n < NV_LATE_TIDS)
  {
    nv_shared.late_tids[n] = tid;
    NV_BARRIER ();
    nv_shared.n_late = n + 1;
  }
}

gsize
nv_state_size (void)
{
  return sizeof (NvState);
}

gsize
nv_shared_size (void)
{
  return sizeof (NvShared);
}

guint64 *
nv_counters (void)
{
  /* allocs, frees, reallocs, failures, bytes, dropped, published, now, dropped_frees */
  return &nv_state.c_allocs;
}

/* allocs... through the stall tallies, for the message transport's batches */
gsize
nv_shared_word (gsize i)
{
  switch (i)
  {
    case 0: return nv_shared.stall_n;
    case 1: return nv_shared.stall_us;
    case 2: return nv_shared.stall_max_us;
    default: return 0;
  }
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

/* ---------------------------------------------------------------- wrappers
 * A wrapper hook (role "wrapper": FormHeap_Allocate, operator new) records nothing. On entry it
 * stores in the thread's wrapper slot the address of the stack word holding its own return
 * address, unless an outer wrapper's frame is still live there (outermost wins); it calls
 * through NOT marked "inside" (the hooked heap call inside must be recorded), then clears the
 * slot again. An inner hook whose frame lies below the stored address (deeper: the wrapper's
 * frame is live) takes the word there as its caller and flags the record VIA_WRAPPER. A slot
 * left behind by a wrapper that never returned normally (exception, longjmp) is stale: its
 * address is at or below the frame of whoever looks next from a shallower depth, which clears
 * or replaces it. Left: a stale address ABOVE a later hook's frame (the wrapper was left by a
 * longjmp to a frame below the wrapper's caller and the thread then went deeper again without
 * passing a wrapper) still looks live: that call's caller is then whatever word sits there.
 * TinyCC keeps a frame pointer in every function: [fp] = saved fp, [fp + ptr] = return address.
 */
#define NV_WRAPPED(ra_, fl_) \
  do \
  { \
    volatile gsize * wp_; \
    gsize w_; \
    NV_SLOT (wp_, nv_state.tls_off_w, nv_state.tls_seq_w); \
    w_ = NV_SLOT_GET (wp_, nv_state.tls_key_w); \
    if (w_ != 0) \
    { \
      if (w_ > GPOINTER_TO_SIZE (__builtin_frame_address (0))) \
      { \
        ra_ = *(gpointer *) w_; \
        fl_ |= NV_FLAG_VIA_WRAPPER; \
      } \
      else \
        NV_SLOT_SET (wp_, nv_state.tls_key_w, 0); \
    } \
  } while (0)

/* In a wrapper's replacement: 1 when this wrapper took the slot (clear it after the call). */
#define NV_WRAP_ENTER(mine_) \
  do \
  { \
    volatile gsize * wp_; \
    gsize w_, me_ = GPOINTER_TO_SIZE (__builtin_frame_address (0)) + sizeof (gpointer); \
    NV_SLOT (wp_, nv_state.tls_off_w, nv_state.tls_seq_w); \
    w_ = NV_SLOT_GET (wp_, nv_state.tls_key_w); \
    mine_ = w_ == 0 || w_ <= me_;  /* empty, or stale (a frame at or below ours is dead) */ \
    if (mine_) \
      NV_SLOT_SET (wp_, nv_state.tls_key_w, me_); \
  } while (0)
#define NV_WRAP_LEAVE() \
  do \
  { \
    volatile gsize * wp_; \
    NV_SLOT (wp_, nv_state.tls_off_w, nv_state.tls_seq_w); \
    NV_SLOT_SET (wp_, nv_state.tls_key_w, 0); \
  } while (0)

/* ---------------------------------------------------------------- sampled stacks
 * Poisson sampling by bytes (tcmalloc, heapprofd): each thread counts down the bytes its
 * allocating calls ask for; the call that reaches zero is sampled and the countdown re-armed
 * with an exponential variate of mean sample_bytes (JS's table of quantiles, picked by random
 * bits). A sampled call emits its stack (up to NV_STACK_MAX return addresses, frame-pointer
 * walk) as STACK chunk records right before its own record, which gets FLAG_SAMPLED.
 * Compiled only with NV_SAMPLING (--sample-bytes 0: the code is not in the target at all).
 */
#ifdef NV_SAMPLING
static gsize
nv_draw (void)
{
  guint64 z = nv_state.rng_seed + (guint64) nv_fetch_add (&nv_state.rng_ctr, 1)
      * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return nv_state.exp_table[(gsize) (z >> 40) & (NV_EXP_N - 1)];
}

/* size >= countdown v: arm a fresh thread's countdown, or sample this call and re-arm.
   Returns 1 when the call is sampled. */
static int
nv_sample_slow (guint64 size, gsize v, volatile gsize * sp)
{
  if (v == 0)
  {
    v = nv_draw ();
    if (size < (guint64) v)
    {
      NV_SLOT_SET (sp, nv_state.tls_key_s, v - (gsize) size);
      return 0;
    }
  }
  v = nv_draw ();
  NV_SLOT_SET (sp, nv_state.tls_key_s, v);
  return 1;
}

#define NV_SAMPLE(size_, fl_) \
  do \
  { \
    volatile gsize * sp_; \
    gsize v_; \
    NV_SLOT (sp_, nv_state.tls_off_s, nv_state.tls_seq_s); \
    v_ = NV_SLOT_GET (sp_, nv_state.tls_key_s); \
    if ((guint64) (size_) < (guint64) v_) \
      NV_SLOT_SET (sp_, nv_state.tls_key_s, v_ - (gsize) (size_)); \
    else if (nv_sample_slow ((size_), v_, sp_)) \
      fl_ |= NV_FLAG_SAMPLED; \
  } while (0)

#define NV_PAGE 4096
#define NV_WALK_BUF 64  /* words read per look at the stack (Linux) */

/*
 * Reads the frame record (saved frame pointer, return address) at fp into w[0..1] without ever
 * touching an unmapped address. Windows: fp must lie inside this thread's stack, [StackLimit,
 * StackBase) from the TEB. Linux: the words come from process_vm_readv on ourselves (a bad
 * address is an error return, never a fault); one call reads NV_WALK_BUF words into `buf`,
 * split at the page boundary (a partial read stops at the first page that fails), and later
 * frames inside what was read cost nothing. Returns 0 to stop the walk.
 */
#ifdef NV_WINDOWS
static int
nv_frame_read (gsize fp, gsize * w, gsize * buf, gsize * lo, gsize * hi)
{
  gsize tp;
  (void) buf; (void) lo; (void) hi;
  NV_READ_TP (tp);
  if (fp < ((gsize *) tp)[2] || fp + 2 * sizeof (gsize) > ((gsize *) tp)[1])
    return 0;
  w[0] = ((gsize *) fp)[0];
  w[1] = ((gsize *) fp)[1];
  return 1;
}
#else
# if NV_PTR64
#  define NV_SYS_PROCESS_VM_READV 310
# else
#  define NV_SYS_PROCESS_VM_READV 347
# endif
typedef struct
{
  gsize base;
  gsize len;
} NvIovec;

static int
nv_frame_read (gsize fp, gsize * w, gsize * buf, gsize * lo, gsize * hi)
{
  if (fp < *lo || fp + 2 * sizeof (gsize) > *hi)
  {
    NvIovec local, remote[2];
    gsize want = NV_WALK_BUF * sizeof (gsize);
    gsize first = NV_PAGE - (fp & (NV_PAGE - 1));
    long got;
    if (fp + want < fp)
      return 0;
    local.base = GPOINTER_TO_SIZE (buf);
    local.len = want;
    remote[0].base = fp;
    remote[0].len = first < want ? first : want;
    remote[1].base = fp + remote[0].len;
    remote[1].len = want - remote[0].len;
    got = syscall (NV_SYS_PROCESS_VM_READV, nv_state.pid, &local, 1, remote,
        remote[1].len != 0 ? 2 : 1, 0);
    if (got < (long) (2 * sizeof (gsize)))
      return 0;
    *lo = fp;
    *hi = fp + (gsize) got;
  }
  w[0] = buf[(fp - *lo) / sizeof (gsize)];
  w[1] = buf[(fp - *lo) / sizeof (gsize) + 1];
  return 1;
}
#endif

/*
 * The stack of a sampled call: frame 0 = ra (the hooked call's own return address), then the
 * return addresses of the frame-pointer chain from the replacement's frame fp0 (its saved frame
 * pointer is the hooked function's caller's), stopping at a non-increasing or misaligned frame
 * pointer, a null return address, an unreadable frame, or NV_STACK_MAX frames. `walk` 0: frame 0
 * only (a replacement under Interceptor.replace sits below Gum's frames). Published as STACK
 * chunks through nv_reserve (the waiting policy applies). Returns 0 when a chunk was dropped
 * (the ring stayed full): the call's record is then not flagged as sampled (the engine discards
 * chunks without their call); dropped chunks are not counted, they carry no call.
 */
static int
nv_stack (gpointer ra, gpointer fp0, gsize th, int walk)
{
  gsize fr[NV_STACK_MAX];
  gsize buf[NV_WALK_BUF];
  gsize lo = 1, hi = 0;
  guint n = 0, c;
  gsize fp, prev;
  fr[n++] = GPOINTER_TO_SIZE (ra);
  prev = GPOINTER_TO_SIZE (fp0);
  fp = walk ? *(gsize *) fp0 : 0;  /* our own frame: readable */
  while (walk && n != NV_STACK_MAX)
  {
    gsize w[2];
    if (fp <= prev || (fp & (sizeof (gsize) - 1)) != 0)
      break;
    if (!nv_frame_read (fp, w, buf, &lo, &hi) || w[1] == 0)
      break;
    fr[n++] = w[1];
    prev = fp;
    fp = w[0];
  }
  for (c = 0; c * NV_STACK_PER_RECORD < n; c++)
  {
    gsize pos;
    NvSlot * s = nv_reserve (&pos, th);
    guint i = c * NV_STACK_PER_RECORD;
    if (s == NULL)
      return 0;
    NV_FILL (&s->rec, pos, KIND_STACK, c, fr[i], i + 1 < n ? fr[i + 1] : 0,
        i + 2 < n ? fr[i + 2] : 0, GSIZE_TO_POINTER (i + 3 < n ? fr[i + 3] : 0), th, 0, n);
    nv_publish (s, pos);
  }
  return 1;
}
#endif /* NV_SAMPLING */

/* ---------------------------------------------------------------- generated replacements */
