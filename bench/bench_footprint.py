"""The agent's footprint in a 32-bit Windows target, by part: Frida's runtime alone, then the agent
with its default ring, a small ring, and only the fixed-address hooks. Run by the Windows Python
(the lane's, under Wine) on the PE fake game (bench/bench_windows.py builds one; or any game dir):

    source "$(bash tests/windows/setup.sh)"
    python tests/windows/fakes.py /tmp/pe          # the PE fake install
    wine "$NVSE_WIN_PYTHON" bench/bench_footprint.py 'Z:\\tmp\\pe' </dev/null | cat

Before: committed bytes of the regions Frida cloaks with only a probe script loaded (Frida's
runtime). After: the footprint the agent reports (cloaked regions and the shared ring's view).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import frida

from nvse_monitor.capture.agent_host import AgentConfig, default_ring_slots, load_agent
from nvse_monitor.capture.hookprofile import Profile, load_profile

WALK = """
const vq = new NativeFunction(Process.getModuleByName('kernel32.dll').getExportByName(
  'VirtualQuery'), 'size_t', ['pointer', 'pointer', 'size_t']);
rpc.exports = { cloaked() {
  const mbi = Memory.alloc(64); let a = ptr(0x10000); let c = 0;
  while (vq(a, mbi, 64).toNumber() !== 0) {
    const base = mbi.readPointer(), size = mbi.add(12).readU32(), state = mbi.add(16).readU32();
    if (state !== 0x10000 && Cloak.hasRangeContaining(base)) c += size;
    a = base.add(size);
  }
  return c;
} };
"""


def measure(game_dir: str, prof: Profile, slots: int) -> tuple[float, float]:
    dev = frida.get_local_device()
    pid = dev.spawn([game_dir + "\\FalloutNV.exe"], cwd=game_dir,
                    env={"FAKE_GAME_GO": game_dir + "\\never", "FAKE_GAME_PLUGINS": "",
                         "FAKE_GAME_LATE_PLUGINS": ""})
    try:
        s = dev.attach(pid)
        probe = s.create_script(WALK)
        probe.load()
        before = probe.exports_sync.cloaked()
        agent = load_agent(s, prof, AgentConfig(ring_slots=slots), lambda _m: None)
        time.sleep(1)
        fp = agent.init_result.get("footprint") or {}
        after = int(fp.get("committed", 0)) + int(fp.get("reserved", 0))
    finally:
        dev.kill(pid)
    return before / 2**20, after / 2**20


def main() -> None:
    game_dir = sys.argv[1]
    fnv = load_profile("fnv-1.4.0.525")
    fixed = dataclasses.replace(fnv, hooks=[h for h in fnv.hooks if not h.module])
    default = default_ring_slots("ia32")
    for what, prof, slots in (("fnv profile, default ring", fnv, default),
                              ("fnv profile, 4096-slot ring", fnv, 4096),
                              ("fixed-address hooks only, 4096-slot ring", fixed, 4096)):
        before, after = measure(game_dir, prof, slots)
        print(f"{what}: Frida runtime {before:.1f} MiB, with the agent {after:.1f} MiB "
              f"(+{after - before:.1f}; ring {slots * 64 / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
