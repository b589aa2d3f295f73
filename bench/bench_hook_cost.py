"""Added cost per hooked allocator call: a C target times malloc+free pairs with and without
the agent, in one run (rounds alternate between the targets; medians; ratios).

    python bench/bench_hook_cost.py [--pairs 100000] [--rounds 15] [--arch x64]

Targets (each its own process of tests/agent_targets/bench_target.c, -O2):
  native        no monitor
  passthrough   replaceFast into a C replacement that only calls the original (the floor)
  full          the agent as shipped (no clock per record, direct TLS slot, shared ring read
                by the host's reader thread meanwhile)
  messages      same with the message transport (the fallback: JS drains and sends)
  rdtsc         same plus the 0.2.0 per-record rdtsc (what dropping the clock saved)
  gum-tls       same as full with the thread state through gum_tls_key_get/set_value calls
                (the fallback where the direct TLS slot is not found; the agent before 0.1.1)
  no-tls        same without the per-thread TLS word (no re-entrancy guard: unsafe, bench only)
  wrappers      full with linux-libc as shipped, whose libstdc++ operator new/delete wrappers
                (pending in this C target) make every hooked call look at the wrapper slot;
                every other variant uses linux-libc without its wrappers (the plain hot path)
  sample-<N>    full with --sample-bytes N (stacks sampled; off in every variant above)
--baseline DIR adds "baseline": full with the agent (agent/hotpath.c, agent/agent.js) of another
checkout, e.g. `git archive <commit> agent | tar -x -C DIR`: today's against a change, one run.
--mask 4095 gives sizes 16 B..4 KiB (mean ~2 KiB) instead of 16..79 B: more bytes per call,
so more sampled calls.
The ring is big enough for a round (no waits, no drops: checked); the host reads meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import frida  # noqa: E402
from agent_harness import build  # noqa: E402
from benchutil import cpu_model

from nvse_monitor.capture import agent_host  # noqa: E402
from nvse_monitor.capture.agent_host import DEFAULT_SAMPLE_BYTES, AgentConfig, load_agent  # noqa: E402
from nvse_monitor.capture.hookprofile import Profile, load_profile  # noqa: E402
from nvse_monitor.stream.messages import Batch  # noqa: E402

VARIANTS: dict[str, dict | None] = {
    "native": None,
    "passthrough": {"defines": ("NV_BENCH_PASSTHROUGH",)},
    "full": {},
    "messages": {"transport": "messages"},
    "rdtsc": {"defines": ("NV_BENCH_TSC",)},
    "gum-tls": {"defines": ("NV_BENCH_TLS_CALLS",)},
    "no-tls": {"defines": ("NV_BENCH_NO_THREAD_STATE",)},
    "wrappers": {"profile": "wrappers"},
    "sample-4k": {"sample_bytes": 4 << 10},
    "sample-64k": {"sample_bytes": 64 << 10},
    f"sample-{DEFAULT_SAMPLE_BYTES >> 10}k": {"sample_bytes": DEFAULT_SAMPLE_BYTES},
    "sample-512k": {"sample_bytes": 512 << 10},
}


def bench_profile(name: str) -> Profile:
    libc = load_profile("linux-libc")
    if name == "wrappers":
        return libc
    return dataclasses.replace(libc, hooks=tuple(h for h in libc.hooks if h.role != "wrapper"))


class Target:
    def __init__(self, exe: Path, pairs: int, agent: dict | None, ring_slots: int,
                 mask: int) -> None:
        self.proc = subprocess.Popen([str(exe), str(pairs), str(mask)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().startswith(b"ready")
        self.records = 0
        self.lock = threading.Lock()
        self.session = self.handle = None
        if agent is not None:
            self.session = frida.attach(self.proc.pid)
            agent = dict(agent)
            profile = bench_profile(agent.pop("profile", "linux-libc"))
            source = agent.pop("source", None)
            cfg = AgentConfig(ring_slots=ring_slots, **agent)
            saved = agent_host.agent_source
            if source is not None:  # another checkout's agent (same host protocol)
                agent_host.agent_source = lambda: source
            try:
                self.handle = load_agent(self.session, profile, cfg,
                                         on_message=self._on_message)
            finally:
                agent_host.agent_source = saved

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, Batch):  # the host consumes: decode and count every record
            n = int((msg.records["kind"] != 0).sum())
            with self.lock:
                self.records += n

    def round(self) -> float:
        self.proc.stdin.write(b"r\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> dict:
        info = {}
        if self.handle is not None:
            final = self.handle.stop()
            info = {"dropped": final.dropped, "published": final.published,
                    "stalls": final.stalls,
                    "agent_bytes": self.handle.init_result["agent_bytes"],
                    "ring_bytes": self.handle.init_result["ring_bytes"]}
            self.handle.unload()
            self.session.detach()
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # seen now and then after an unload: report, go on
            self.proc.kill()
            self.proc.wait()
            print(f"warning: {self.proc.args[0]} did not exit after the agent left: killed",
                  file=sys.stderr)
        return info




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=100_000, help="malloc+free pairs per round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--arch", default="x64", choices=["x64", "ia32"])
    ap.add_argument("--ring-slots", type=int, default=1 << 19)
    ap.add_argument("--mask", type=int, default=63, help="sizes 16 + (i & mask)")
    ap.add_argument("--baseline", type=Path, help="checkout whose agent/ is the baseline")
    ap.add_argument("--only", help="comma-separated variants (native is always run)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        exe = build("bench_target.c", Path(tmp), args.arch, opt="-O2")
        if args.baseline is not None:
            c = (args.baseline / "agent" / "hotpath.c").read_text()
            js = (args.baseline / "agent" / "agent.js").read_text()
            VARIANTS["baseline"] = {"source": f"const HOTPATH_C = {json.dumps(c)};\n{js}"}
        wanted = set(args.only.split(",")) | {"native", "full"} if args.only else set(VARIANTS)
        if args.only and args.baseline is not None:
            wanted.add("baseline")
        targets = {name: Target(exe, args.pairs, agent, args.ring_slots, args.mask)
                   for name, agent in VARIANTS.items() if name in wanted}
        times: dict[str, list[float]] = {name: [] for name in targets}
        try:
            for t in targets.values():  # warm-up round each (page faults, tcache)
                t.round()
            for _ in range(args.rounds):
                for name, t in targets.items():
                    times[name].append(t.round())
                    if t.handle is not None:
                        t.handle.flush()  # empty the ring before the next round
        finally:
            infos = {name: t.close() for name, t in targets.items()}

    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["native"]
    print(f"bench_hook_cost: {args.arch}, {args.rounds} rounds x {args.pairs} malloc+free pairs,"
          f" sizes 16 + (i & {args.mask}), ring {args.ring_slots} slots; ns per call "
          f"(median; min-max); {cpu_model()}")
    for name, v in times.items():
        extra = "" if name == "native" else \
            f"  +{med[name] - base:5.1f} ns  x{med[name] / base:4.2f}"
        info = infos[name]
        drop = f"  dropped {info['dropped']} waits {info['stalls']}" if info else ""
        print(f"  {name:12s} {med[name]:6.1f}  ({min(v):.1f}-{max(v):.1f}){extra}{drop}")
    for name in med:
        if name.startswith("sample-") or name in ("wrappers", "baseline"):
            print(f"  {name} - full: {med[name] - med['full']:+.1f} ns per call")
    if "no-tls" not in med:
        return
    full = infos["full"]
    print(f"agent memory in the target: {full['agent_bytes'] / 2**20:.1f} MiB "
          f"(ring {full['ring_bytes'] / 2**20:.1f} MiB)")
    print(f"added by the agent (full - native): {med['full'] - base:.1f} ns per call; "
          f"of which replaceFast floor {med['passthrough'] - base:.1f}, "
          f"TLS thread state {med['full'] - med['no-tls']:.1f} "
          f"(through gum calls {med['gum-tls'] - med['no-tls']:.1f}); "
          f"the 0.2.0 per-record rdtsc would add {med['rdtsc'] - med['full']:+.1f}; "
          f"message transport instead of the shared ring {med['messages'] - med['full']:+.1f}")


if __name__ == "__main__":
    main()
