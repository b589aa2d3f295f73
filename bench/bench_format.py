"""Recording format benchmark: bytes per event, encode and decode throughput.

    python bench/bench_format.py [--events 5000000] [--repeat 3] [--no-real] [--level 3]

Measures, in one run (throughputs are medians of --repeat runs):
  - the committed fixtures (fixtures/*.nvmrec): bytes per event;
  - a synthetic stream of --events events (nvse_monitor.stream.synthetic): bytes per event, encode
    (RecordingWriter) and decode (iterating open_recording) events/s;
  - a real allocation trace: a Python workload run with PYTHONMALLOC=malloc under a small
    LD_PRELOAD shim (compiled here with gcc) that writes one 56-byte record per
    malloc/calloc/realloc/free with real pointers, sizes, callers, threads and times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nvse_monitor.stream.events import RECORD_DTYPE
from nvse_monitor.stream.messages import AgentCounters, Batch, SessionEnd, StreamMessage
from nvse_monitor.stream.recording import RecordingWriter, open_recording
from nvse_monitor.stream.synthetic import generate, synthetic_meta

ROOT = Path(__file__).resolve().parent.parent

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#pragma pack(push, 1)
typedef struct { uint64_t ts, ptr, old, size, caller; uint32_t tid, dur;
                 uint8_t kind, hook; uint16_t flags; uint32_t seq; } rec_t;
#pragma pack(pop)
_Static_assert(sizeof(rec_t) == 56, "record size");
static void *(*r_malloc)(size_t); static void (*r_free)(void *);
static void *(*r_calloc)(size_t, size_t); static void *(*r_realloc)(void *, size_t);
static __thread int inside;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
#define CAP 65536
static rec_t buf[CAP]; static int nbuf; static uint32_t seq; static int fd = -1;
static uint64_t t0; static long limit = -1, total;
static char boot[1 << 16]; static size_t bootn;  /* dlsym's own allocations */
static uint64_t now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000ull + t.tv_nsec / 1000; }
static void init(void) {
  if (r_malloc) return;
  inside = 1;
  r_malloc = dlsym(RTLD_NEXT, "malloc"); r_free = dlsym(RTLD_NEXT, "free");
  r_calloc = dlsym(RTLD_NEXT, "calloc"); r_realloc = dlsym(RTLD_NEXT, "realloc");
  const char *p = getenv("SHIM_OUT"); if (p) fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const char *l = getenv("SHIM_LIMIT"); if (l) limit = atol(l);
  t0 = now(); inside = 0;
}
static void emit(uint8_t kind, uint8_t hook, void *p, void *old, size_t sz, void *caller,
                 uint64_t ts, uint32_t dur) {
  if (fd < 0) return;
  pthread_mutex_lock(&mu);
  if (limit < 0 || total < limit) {
    rec_t *r = &buf[nbuf++];
    r->ts = ts - t0; r->ptr = (uintptr_t)p; r->old = (uintptr_t)old; r->size = sz;
    r->caller = (uintptr_t)caller; r->tid = (uint32_t)syscall(SYS_gettid); r->dur = dur;
    r->kind = kind; r->hook = hook; r->flags = 0; r->seq = seq++; total++;
    if (nbuf == CAP) { if (write(fd, buf, sizeof(buf)) < 0) {} nbuf = 0; }
  }
  pthread_mutex_unlock(&mu);
}
__attribute__((destructor)) static void fin(void) {
  if (fd >= 0) { pthread_mutex_lock(&mu); if (write(fd, buf, nbuf * sizeof(rec_t)) < 0) {}
                 nbuf = 0; pthread_mutex_unlock(&mu); }
}
#define BIG(n) ((n) >= 1048576)
void *malloc(size_t n) {
  if (!r_malloc) { if (inside) { void *p = boot + bootn; bootn += (n + 15) & ~15ul; return p; }
                   init(); }
  if (inside) return r_malloc(n);
  inside = 1; uint64_t a = now(); void *p = r_malloc(n); uint64_t b = now();
  emit(p ? 1 : 4, 0, p, 0, n, __builtin_return_address(0), a, BIG(n) ? (uint32_t)(b - a) : 0);
  inside = 0; return p;
}
void *calloc(size_t m, size_t n) {
  if (!r_calloc) { if (inside) { void *p = boot + bootn; memset(p, 0, m * n);
                                 bootn += (m * n + 15) & ~15ul; return p; }
                   init(); }
  if (inside) return r_calloc(m, n);
  inside = 1; uint64_t a = now(); void *p = r_calloc(m, n); uint64_t b = now();
  emit(p ? 1 : 4, 1, p, 0, m * n, __builtin_return_address(0), a,
       BIG(m * n) ? (uint32_t)(b - a) : 0);
  inside = 0; return p;
}
void *realloc(void *o, size_t n) {
  if (!r_realloc) init();
  if (inside) return r_realloc(o, n);
  inside = 1; uint64_t a = now(); void *p = r_realloc(o, n); uint64_t b = now();
  if (p || n == 0) emit(3, 2, p, o, n, __builtin_return_address(0), a,
                        BIG(n) ? (uint32_t)(b - a) : 0);
  else emit(4, 2, 0, o, n, __builtin_return_address(0), a, 0);
  inside = 0; return p;
}
void free(void *p) {
  if ((char *)p >= boot && (char *)p < boot + sizeof(boot)) return;
  if (!r_free) init();
  if (!p) return;
  if (inside) { r_free(p); return; }
  inside = 1; uint64_t a = now(); r_free(p);
  emit(2, 3, p, 0, 0, __builtin_return_address(0), a, 0); inside = 0;
}
"""

WORKLOAD_PY = r"""
import collections, json, random, threading
random.seed(1)
def work(k):
    d = {}
    for i in range(60000):
        d[str(i) + "x" * (i % 7)] = [random.random() for _ in range(i % 5)]
        if i % 3 == 0:
            d.pop(str(i // 2) + "x" * ((i // 2) % 7), None)
    s = json.dumps(list(d.items())[:20000]); json.loads(s)
    collections.Counter(random.choice("abcdefgh") * random.randint(1, 40) for _ in range(50000))
ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def real_trace(tmp: Path, limit: int) -> np.ndarray | None:
    """Records of a real program's allocations (None when gcc is unavailable)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    (tmp / "shim.c").write_text(SHIM_C)
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(tmp / "shim.so"),
                    str(tmp / "shim.c"), "-ldl", "-lpthread"], check=True)
    (tmp / "work.py").write_text(WORKLOAD_PY)
    out = tmp / "trace.bin"
    env = dict(os.environ, PYTHONMALLOC="malloc", SHIM_OUT=str(out), SHIM_LIMIT=str(limit),
               LD_PRELOAD=str(tmp / "shim.so"))
    subprocess.run([sys.executable, str(tmp / "work.py")], env=env, check=True)
    return np.fromfile(out, dtype=RECORD_DTYPE)


def as_messages(recs: np.ndarray, batch: int = 4096) -> list[StreamMessage]:
    msgs: list[StreamMessage] = []
    for i in range(0, len(recs), batch):
        r = recs[i : i + batch]
        msgs.append(Batch(int(r["ts_us"].max()), AgentCounters(published=i + len(r)), r))
    msgs.append(SessionEnd(int(recs["ts_us"].max()) if len(recs) else 0, "end-of-recording",
                           True, counters=AgentCounters(published=len(recs))))
    return msgs


def measure(name: str, meta, msgs: list[StreamMessage], path: Path, repeat: int,
            level: int) -> dict:
    n = sum(len(m.records) for m in msgs if isinstance(m, Batch))
    enc, dec = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        with RecordingWriter(path, meta, level=level) as w:
            for m in msgs:
                w.write(m)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = 0
        for m in open_recording(path):
            if isinstance(m, Batch):
                got += len(m.records)
        dec.append(time.perf_counter() - t)
        assert got == n
    size = path.stat().st_size
    row = {
        "name": name, "events": n, "bytes": size, "B/event": size / n,
        "encode Mev/s": n / statistics.median(enc) / 1e6,
        "decode Mev/s": n / statistics.median(dec) / 1e6,
    }
    print(f"{name:34s} {n:>10,d} ev  {size / n:6.2f} B/event  "
          f"encode {row['encode Mev/s']:5.2f} M ev/s  decode {row['decode Mev/s']:5.2f} M ev/s",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--level", type=int, default=3, help="zlib level for the writer")
    ap.add_argument("--no-real", action="store_true", help="skip the LD_PRELOAD real trace")
    args = ap.parse_args()

    print("fixtures (as committed):")
    for f in sorted((ROOT / "fixtures").glob("*.nvmrec")):
        n = sum(len(m.records) for m in open_recording(f) if isinstance(m, Batch))
        print(f"  {f.name:32s} {n:>10,d} ev  {f.stat().st_size / n:6.2f} B/event")

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        meta, gen = generate(args.events, seed=1)
        msgs = list(gen)
        print(f"synthetic stream generated in {time.perf_counter() - t:.1f} s")
        measure(f"synthetic {args.events:,d} events", meta, msgs, tmp / "s.nvmrec",
                args.repeat, args.level)
        del msgs
        if not args.no_real:
            recs = real_trace(tmp, limit=args.events)
            if recs is None:
                print("real trace: skipped (no gcc)")
            else:
                measure("real trace (python, LD_PRELOAD)", synthetic_meta(seed=0, n_events=0),
                        as_messages(recs), tmp / "r.nvmrec", args.repeat, args.level)


if __name__ == "__main__":
    main()
