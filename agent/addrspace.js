// Address-space headroom sampler (docs/fnv.md): a 32-bit game dies when its address space runs
// out or fragments, long before its heap counters look alarming. Loaded next to the agent as its
// own script; runs on Frida's JS thread about once a second, never on the allocation path.
// The host prepends `const ADDRSPACE = {interval_ms, limit}` (limit: bytes of user address
// space to count free blocks in, or null to take it from the system / not count them).
'use strict';

const MEM_COMMIT = 0x1000, MEM_RESERVE = 0x2000, MEM_FREE = 0x10000;
let timer = null;

function num(p) {
  return Number(p.toString()); // NativePointer -> "0x..." -> number (exact below 2^53)
}

// Windows: walk the whole user range with VirtualQuery: committed / reserved / free exactly (a
// reserved region is not free even though nothing is committed in it).
function windowsSampler() {
  const k32 = Process.getModuleByName('kernel32.dll');
  const vq = new NativeFunction(k32.getExportByName('VirtualQuery'), 'size_t',
                                ['pointer', 'pointer', 'size_t']);
  const gsi = new NativeFunction(k32.getExportByName('GetSystemInfo'), 'void', ['pointer']);
  const ps = Process.pointerSize;
  const si = Memory.alloc(64);
  gsi(si);
  const lo = si.add(8).readPointer();            // lpMinimumApplicationAddress
  const hi = si.add(8 + ps).readPointer();       // lpMaximumApplicationAddress (LAA-aware)
  const limit = ADDRSPACE.limit !== null ? ADDRSPACE.limit : num(hi) + 1;
  const mbi = Memory.alloc(64);
  // MEMORY_BASIC_INFORMATION: RegionSize, State
  const offSize = ps === 4 ? 12 : 24, offState = ps === 4 ? 16 : 32;
  return function () {
    let committed = 0, reserved = 0, free = 0, largest = 0, regions = 0;
    let addr = lo;
    while (num(addr) < limit) {
      if (vq(addr, mbi, 64) == 0) break;
      const size = ps === 4 ? mbi.add(offSize).readU32() : num(mbi.add(offSize).readPointer());
      const state = mbi.add(offState).readU32();
      if (size <= 0) break;
      const end = Math.min(num(addr) + size, limit);
      const n = end - num(addr);
      if (state === MEM_FREE) { free += n; if (n > largest) largest = n; }
      else if (state === MEM_RESERVE) reserved += n;
      else if (state === MEM_COMMIT) committed += n;
      regions++;
      addr = addr.add(size);
    }
    return {mapped: committed + reserved, committed, reserved, free, largest_free: largest,
            limit, regions};
  };
}

// Elsewhere (Linux tests): the gaps between mapped ranges below the limit are free; ranges with
// no access are reservations (PROT_NONE guard/reserve mappings).
function rangesSampler() {
  const limit = ADDRSPACE.limit;
  const low = 0x10000; // below mmap_min_addr / the first 64 KiB: never available
  return function () {
    const ranges = Process.enumerateRanges('---')
      .map(r => ({base: num(r.base), size: r.size, none: r.protection === '---'}))
      .sort((a, b) => a.base - b.base);
    let mapped = 0, reserved = 0, free = null, largest = null, cur = low;
    for (const r of ranges) {
      mapped += r.size;
      if (r.none) reserved += r.size;
    }
    if (limit !== null) {
      free = 0; largest = 0;
      for (const r of ranges) {
        if (r.base >= limit) break;
        if (r.base > cur) { const g = r.base - cur; free += g; if (g > largest) largest = g; }
        cur = Math.max(cur, r.base + r.size);
      }
      if (limit > cur) { const g = limit - cur; free += g; if (g > largest) largest = g; }
    }
    return {mapped, committed: mapped - reserved, reserved, free, largest_free: largest, limit,
            regions: ranges.length};
  };
}

const sample = Process.platform === 'windows' ? windowsSampler() : rangesSampler();

function tick() {
  try {
    const s = sample();
    s.type = 'addrspace';
    s.ts_us = Date.now() * 1000; // wall clock: the host makes it agent time (wall_clock_zero_us)
    send(s);
  } catch (e) {
    send({type: 'addrspace-error', message: String(e && e.stack || e)});
    if (timer !== null) { clearInterval(timer); timer = null; }
  }
}

tick();
timer = setInterval(tick, ADDRSPACE.interval_ms);
