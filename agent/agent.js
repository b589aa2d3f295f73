/*
 * nvse-monitor agent (Frida 17). The host prepends `const HOTPATH_C = "...";` (agent/hotpath.c)
 * and calls rpc init(config). See docs/agent.md and docs/protocol.md.
 *
 * C hot path: one CModule replacement per profile hook, installed with Interceptor.replaceFast,
 * writing 56-byte records into a bounded ring. JS only drains the ring on a timer and send()s
 * binary batches; it never runs on a hooked call.
 */
'use strict';

const RECORD_SIZE = 56;
const SLOT_SIZE = 64;
const STATE_BYTES = 4096;
const EMPTY_BATCH_MS = 250;
const IN_FLIGHT_GRACE_S = 0.05;  // after reverting hooks, before the code may go away

let cm = null;            // the CModule
let st = null;            // NvState (Memory.alloc'd)
let origTable = null;     // nv_orig[]: original-function pointers, filled after replaceFast
let ring = null;
let ringRaw = null;       // keeps the ring allocation alive (a derived pointer does not)
let outBuf = null;
let maxRecs = 0;
let ringSlots = 0;
let fnDrain = null;
let countersPtr = null;
let drainTimer = null;
let lastSendMs = 0;
let stopped = false;
let hooks = [];           // [{index, spec, installed, address, module, pending}]
let modules = new Map();  // base string -> module json
let moduleObserver = null;
let config = null;

function nowUs() {
  return countersPtr === null ? 0 : Number(countersPtr.add(7 * 8).readU64());
}

function clockNowUs() {
  // time since time zero, for control messages sent outside a drain
  return fnNowUs === null ? 0 : Number(fnNowUs());
}
let fnNowUs = null;

function moduleJson(m) {
  return { name: m.name, base: Number(m.base), size: m.size, path: m.path };
}

function globToRegExp(pattern) {
  const esc = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp('^' + esc + '$', 'i');
}

/* ------------------------------------------------------------------ C generation */

function cArgList(n) {
  const a = [];
  for (let i = 0; i < n; i++) a.push('gsize a' + i);
  return a;
}

function genHook(index, h, arch, slow) {
  const nargs = h.nargs;
  const abi = h.abi;
  let attr = '';
  let params = cArgList(nargs);
  let callArgs = [];
  for (let i = 0; i < nargs; i++) callArgs.push('a' + i);
  if (arch === 'ia32') {
    if (abi === 'stdcall') attr = '__attribute__ ((stdcall)) ';
    else if (abi === 'fastcall') attr = '__attribute__ ((fastcall)) ';
    else if (abi === 'thiscall') {
      // TinyCC has no thiscall: fastcall(self, edx, args...) puts self in ECX and the rest on
      // the stack with callee pop, exactly like thiscall (EDX is caller-saved scratch).
      attr = '__attribute__ ((fastcall)) ';
      params = ['gsize self', 'gsize edx'].concat(params);
      callArgs = ['self', '0'].concat(callArgs);
    } else if (abi === 'cdecl' || abi === 'default') attr = '__attribute__ ((cdecl)) ';
  } else if (abi === 'thiscall') {
    params = ['gsize self'].concat(params);
    callArgs = ['self'].concat(callArgs);
  }
  if (params.length === 0) params = ['void'];
  const fnType = `gsize (${attr}*)(${params.map(p => p.split(' ')[0]).join(', ')})`;
  const call = `((${fnType}) nv_orig[${index}]) (${callArgs.join(', ')})`;
  const a = h.args;
  const arg = (name) => 'a' + a[name];
  const head = `${attr}gsize\n${slow ? 'nvs_' : 'nvh_'}${index} (${params.join(', ')})\n{\n` +
    `  gsize th = nv_enter ();\n  gsize r;\n  if (th == 0)\n    return ${call};\n`;
  const tail = `  nv_leave (th);\n  return r;\n}\n`;
  // Under Interceptor.replace the return address on the stack is Gum's; ask the invocation.
  const ra = slow ? 'nv_slow_ra ()' : '__builtin_return_address (0)';
  let body;
  switch (h.role) {
    case 'alloc':
    case 'aligned_alloc':
      body = `  {\n    guint64 size = ${arg('size')};\n` +
        `    guint64 t0 = size > nv_state.large_bytes ? nv_clock () : 0;\n` +
        `    r = ${call};\n    nv_alloc_done (${index}, r, size, ${ra}, th, t0);\n  }\n`;
      break;
    case 'calloc':
      body = `  {\n    guint64 n = ${arg('count')}, m = ${arg('size')};\n` +
        `    guint64 size = n * m;\n` +
        // only 64-bit sizes can overflow (and ia32 has no 64-bit division in CModule)
        `#if NV_PTR64\n    if (m != 0 && size / m != n)\n      size = ~(guint64) 0;\n#endif\n` +
        `    guint64 t0 = size > nv_state.large_bytes ? nv_clock () : 0;\n` +
        `    r = ${call};\n    nv_alloc_done (${index}, r, size, ${ra}, th, t0);\n  }\n`;
      break;
    case 'posix_memalign':
      body = `  {\n    guint64 size = ${arg('size')};\n    gsize out = ${arg('out')};\n` +
        `    guint64 t0 = size > nv_state.large_bytes ? nv_clock () : 0;\n` +
        `    r = ${call};\n` +
        `    if ((guint32) r == 0 && out != 0)\n` +
        `      nv_alloc_done (${index}, *(gsize *) out, size, ${ra}, th, t0);\n` +
        `    else\n` +
        `      nv_emit (KIND_FAILED, ${index}, 0, 0, size, ${ra}, th,\n` +
        `          t0 != 0 ? (nv_clock () - t0) >> NV_DUR_SHIFT : 0);\n  }\n`;
      break;
    case 'free':
    case 'aligned_free':
      body = `  {\n    gsize p = ${arg('ptr')};\n` +
        `    if (p != 0)\n      nv_emit (KIND_FREE, ${index}, p, 0, 0, ${ra}, th, 0);\n` +
        `    r = ${call};\n  }\n`;
      break;
    case 'realloc':
      body = `  {\n    gsize p = ${arg('ptr')};\n    guint64 size = ${arg('size')};\n` +
        `    gsize pos;\n    guint64 ts;\n    NvSlot * s = nv_realloc_begin (&pos, &ts);\n` +
        `    r = ${call};\n` +
        `    nv_realloc_end (s, pos, ts, ${index}, r, p, size, ${ra}, th);\n  }\n`;
      break;
    default:
      throw new Error(`hook ${h.name}: role ${h.role} has no replacement`);
  }
  return head + body + tail;
}

function buildSource(profile, arch, platform, clock, extraDefines) {
  const defs = [];
  for (const d of extraDefines) {
    if (!/^NV_BENCH_[A-Z_]+$/.test(d)) throw new Error(`unknown define ${d}`);
    defs.push(`#define ${d} 1`);
  }
  if (platform === 'windows') defs.push('#define NV_WINDOWS 1');
  if (clock === 'tsc') defs.push('#define NV_CLOCK_TSC 1');
  let src = defs.join('\n') + '\n' + HOTPATH_C + '\n';
  profile.hooks.forEach((h, i) => {
    if (h.role !== 'size') src += genHook(i, h, arch, false) + '\n' + genHook(i, h, arch, true) + '\n';
  });
  return src;
}

/* ------------------------------------------------------------------ hooks */

// pending: the hook's module is not loaded (yet): neither installed nor failed
function sendHook(entry, ok, detail, pending = false) {
  entry.pending = pending;
  send({ type: 'hook', ts_us: clockNowUs(), hook: entry.index, name: entry.spec.name, ok, detail, pending });
}

function checkCode(address, mod) {
  const range = Process.findRangeByAddress(address);
  if (range === null || range.protection.indexOf('x') < 0)
    return `address ${address} is not executable code`;
  if (mod !== null && (address.compare(mod.base) < 0 || address.compare(mod.base.add(mod.size)) >= 0))
    return `address ${address} is outside ${mod.name}`;
  return null;
}

function install(entry, address, mod) {
  const spec = entry.spec;
  const bad = checkCode(address, mod);
  if (bad !== null) return fail(entry, bad);
  const where = mod !== null
    ? `${mod.name}!${spec.export !== undefined ? spec.export : '+0x' + address.sub(mod.base).toString(16)}`
    : '';
  let detail = `${address}${where ? ' ' + where : ''}`;
  for (const other of hooks) {
    if (other !== entry && other.installed && other.address.equals(address)) {
      // e.g. glibc's aligned_alloc and memalign are one function: its calls are recorded once,
      // under the hook installed first
      entry.ok = true;
      entry.detail = `${detail}: same code as hook ${other.spec.name}, recorded under it`;
      sendHook(entry, true, entry.detail);
      return true;
    }
  }
  const slot = origTable.add(entry.index * Process.pointerSize);
  try {
    const orig = Interceptor.replaceFast(address, cm['nvh_' + entry.index]);
    // replaceFast takes effect when the interceptor transaction ends (the flush below), so the
    // original pointer is in place before any call can reach the replacement.
    slot.writePointer(orig);
    Interceptor.flush();
  } catch (e) {
    // replaceFast needs a prologue long enough for a direct jump to the replacement (glibc's
    // memalign is a 14-byte tail-call stub). Interceptor.replace works there, at ~0.8 µs a call:
    // the replacement calls the hooked address itself, which Gum routes to the original.
    try {
      slot.writePointer(address);
      Interceptor.replace(address, cm['nvs_' + entry.index]);
      Interceptor.flush();
      entry.slow = true;
      detail += ` (slow path: Interceptor.replace, replaceFast said: ${e.message})`;
    } catch (e2) {
      slot.writePointer(ptr(0));
      return fail(entry, `cannot hook ${address}: ${e.message}; ${e2.message}`);
    }
  }
  entry.installed = true;
  entry.address = address;
  entry.module = mod !== null ? mod.name : '';
  entry.detail = detail;
  entry.ok = true;
  sendHook(entry, true, detail);
  return true;
}

function fail(entry, reason) {
  entry.ok = false;
  entry.detail = reason;
  sendHook(entry, false, reason);
  return false;
}

// On Linux, Module#findExportByName dlopen()s the module for dlsym and the handle lives as long
// as the JS Module object: a dlclose() would then not unload the library. Reading the export
// table from the mapped image takes no reference.
function findExport(mod, name) {
  if (Process.platform !== 'linux') return mod.findExportByName(name);
  for (const e of mod.enumerateExports()) {
    if (e.name === name && e.type === 'function') return e.address;
  }
  return null;
}

function tryModule(entry, mod) {
  const spec = entry.spec;
  if (spec.export !== undefined) {
    const addr = findExport(mod, spec.export);
    if (addr === null) return fail(entry, `export ${spec.export} not found in ${mod.name}`);
    return install(entry, addr, mod);
  }
  if (spec.offset !== undefined) {
    if (spec.offset >= mod.size) return fail(entry, `offset 0x${spec.offset.toString(16)} is outside ${mod.name}`);
    return install(entry, mod.base.add(spec.offset), mod);
  }
  return fail(entry, 'no export or offset');
}

function onModuleAdded(mod, initial) {
  const j = moduleJson(mod);
  modules.set(mod.base.toString(), j);
  if (!initial) send({ type: 'module', ts_us: clockNowUs(), action: 'add', module: j });
  for (const e of hooks) {
    if (e.installed || e.re === null || e.spec.role === 'size') continue;
    if (e.re.test(mod.name)) tryModule(e, mod);
  }
}

function revertHook(e) {
  try {
    Interceptor.revert(e.address);
    Interceptor.flush();
  } catch (err) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: `revert ${e.spec.name}: ${err.message}` });
  }
  e.installed = false;
}

function onModuleRemoved(mod) {
  const key = mod.base.toString();
  const j = modules.get(key) || moduleJson(mod);
  modules.delete(key);
  for (const e of hooks) {
    // Tell Gum the hook is gone, or it would write the old prologue back at unload time into
    // whatever is mapped there by then; a later load of the module gets hooked again.
    if (e.installed && e.address.compare(mod.base) >= 0 && e.address.compare(mod.base.add(mod.size)) < 0) {
      e.installed = false;
      sendHook(e, false, `pending: ${mod.name} unloaded`, true);
    }
  }
  send({ type: 'module', ts_us: clockNowUs(), action: 'remove', module: j });
}

/* ------------------------------------------------------------------ drain */

function countersJson() {
  const c = [];
  for (let i = 0; i < 8; i++) c.push(Number(countersPtr.add(i * 8).readU64()));
  return {
    now_us: c[7],
    counters: {
      allocs: c[0], frees: c[1], reallocs: c[2], failures: c[3], bytes_allocated: c[4],
      dropped: c[5], published: c[6],
    },
  };
}

function drainAll(forceEmpty) {
  if (cm === null) return;
  let sent = false;
  // At most one ring's worth per call: producers refilling as fast as we drain must not keep
  // the JS thread (and with it stop() and every RPC) busy forever.
  for (let budget = ringSlots; budget > 0; budget -= maxRecs) {
    const n = fnDrain(outBuf, Math.min(maxRecs, budget));
    if (n === 0) break;
    const h = countersJson();
    send({ type: 'batch', now_us: h.now_us, counters: h.counters }, outBuf.readByteArray(n * RECORD_SIZE));
    sent = true;
    if (n < Math.min(maxRecs, budget)) break;
  }
  const t = Date.now();
  if (sent) {
    lastSendMs = t;
  } else if (forceEmpty || t - lastSendMs >= EMPTY_BATCH_MS) {
    const h = countersJson();
    send({ type: 'batch', now_us: h.now_us, counters: h.counters });
    lastSendMs = t;
  }
}

function tick() {
  try {
    drainAll(false);
  } catch (e) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: 'drain: ' + e.stack });
  }
}

/* ------------------------------------------------------------------ Frida's own threads */

// Frida's threads (JS loop, GLib main loop, D-Bus...) are cloaked: Process.enumerateThreads()
// leaves them out. On Linux every thread is in /proc/self/task, so the difference is Frida's.
// Their allocations must not be recorded (they are the monitor's, not the target's).
function fridaThreadIds() {
  if (Process.platform !== 'linux') return [];
  const opendir = new NativeFunction(Module.getGlobalExportByName('opendir'), 'pointer', ['pointer']);
  const readdir = new NativeFunction(Module.getGlobalExportByName('readdir'), 'pointer', ['pointer']);
  const closedir = new NativeFunction(Module.getGlobalExportByName('closedir'), 'int', ['pointer']);
  // struct dirent: d_ino, d_off (long each), d_reclen (u16), d_type (u8), d_name
  const nameOffset = 2 * Process.pointerSize + 3;
  const dir = opendir(Memory.allocUtf8String('/proc/self/task'));
  if (dir.isNull()) return [];
  const all = [];
  try {
    for (let e = readdir(dir); !e.isNull(); e = readdir(dir)) {
      const name = e.add(nameOffset).readUtf8String();
      if (/^[0-9]+$/.test(name)) all.push(parseInt(name, 10));
    }
  } finally {
    closedir(dir);
  }
  const visible = new Set(Process.enumerateThreads().map(t => t.id));
  visible.add(Process.id);  // a spawned, still suspended main thread is not listed either
  return all.filter(tid => !visible.has(tid));
}

/* ------------------------------------------------------------------ rpc */

function init(cfg) {
  if (cm !== null) throw new Error('init called twice');
  config = cfg;
  const profile = cfg.profile;
  const slots = cfg.ring_slots;
  if (!(slots >= 2) || (slots & (slots - 1)) !== 0) throw new Error(`ring_slots ${slots} is not a power of two`);
  const arch = Process.arch;
  const platform = Process.platform;
  const clock = cfg.clock || 'tsc';

  st = Memory.alloc(STATE_BYTES);
  origTable = Memory.alloc(Math.max(1, profile.hooks.length) * Process.pointerSize);
  const ringBytes = slots * SLOT_SIZE;
  ringRaw = Memory.alloc(ringBytes + 64);
  ring = ringRaw.add((64 - ringRaw.and(63).toInt32()) & 63);
  maxRecs = Math.max(1, Math.floor(cfg.max_batch_bytes / RECORD_SIZE));
  ringSlots = slots;
  outBuf = Memory.alloc(maxRecs * RECORD_SIZE);

  const symbols = { nv_state: st, nv_orig: origTable };
  if (platform === 'windows') {
    symbols.GetCurrentThreadId = Process.getModuleByName('kernel32.dll').getExportByName('GetCurrentThreadId');
  } else {
    symbols.syscall = Module.getGlobalExportByName('syscall');
  }
  const source = buildSource(profile, arch, platform, clock, cfg.defines || []);
  cm = new CModule(source, symbols);

  const stateSize = new NativeFunction(cm.nv_state_size, 'size_t', [])();
  if (Number(stateSize) > STATE_BYTES) throw new Error(`NvState is ${stateSize} bytes`);
  new NativeFunction(cm.nv_configure, 'void', ['size_t', 'pointer', 'uint64'])(
      slots, ring, uint64(cfg.large_alloc_bytes));
  new NativeFunction(cm.nv_start, 'void', [])();
  fnDrain = new NativeFunction(cm.nv_drain, 'uint', ['pointer', 'uint']);
  fnNowUs = new NativeFunction(cm.nv_now_us, 'uint64', []);
  countersPtr = new NativeFunction(cm.nv_counters, 'pointer', [])();
  const ignoreTid = new NativeFunction(cm.nv_ignore_tid, 'void', ['size_t']);
  const fridaTids = fridaThreadIds();
  for (const tid of fridaTids.concat(cfg.ignore_tids || [])) ignoreTid(tid);
  new NativeFunction(cm.nv_ignore_current_thread, 'void', [])();
  const wall0 = Number(new NativeFunction(cm.nv_wall0, 'int64', [])());

  hooks = profile.hooks.map((spec, index) => ({
    index, spec, installed: false, ok: false, detail: '', address: null, module: '',
    re: spec.module !== undefined && spec.module !== '' ? globToRegExp(spec.module) : null,
  }));

  // size-query roles are not recorded: nothing to hook
  for (const e of hooks) {
    if (e.spec.role === 'size') {
      e.ok = true;
      e.detail = 'size query: not hooked';
      sendHook(e, true, e.detail);
    }
  }
  // absolute addresses: must be code inside a loaded module
  for (const e of hooks) {
    if (e.re !== null || e.spec.role === 'size') continue;
    const addr = ptr(e.spec.address);
    const mod = Process.findModuleByAddress(addr);
    if (mod === null) fail(e, `address ${addr} is not inside any loaded module`);
    else install(e, addr, mod);
  }
  moduleObserver = Process.attachModuleObserver({
    onAdded(m) { onModuleAdded(m, initialLoad); },
    onRemoved(m) { onModuleRemoved(m); },
  });
  initialLoad = false;
  for (const e of hooks) {
    if (!e.ok && e.re !== null && e.detail === '') {
      e.detail = `pending: no loaded module matches ${e.spec.module}`;
      sendHook(e, false, e.detail, true);
    }
  }

  lastSendMs = Date.now();
  drainTimer = setInterval(tick, cfg.drain_interval_ms || 10);

  const main = Process.mainModule;
  return {
    pid: Process.id,
    js_tid: Process.getCurrentThreadId(),
    ignored_tids: fridaTids,
    arch,
    platform,
    main_module: main !== null ? main.name : '',
    main_path: main !== null ? main.path : '',
    wall_clock_zero_us: wall0,
    modules: Array.from(modules.values()),
    hooks: hooks.map(e => ({
      index: e.index, name: e.spec.name, ok: e.ok, detail: e.detail, module: e.module,
      pending: e.pending === true,
    })),
    ring_bytes: ringBytes,
    agent_bytes: STATE_BYTES + ringBytes + 64 + maxRecs * RECORD_SIZE,
    clock,
  };
}
let initialLoad = true;

function flush() {
  drainAll(true);
  return countersJson();
}

function stop() {
  if (stopped) return countersJson();
  stopped = true;
  if (drainTimer !== null) clearInterval(drainTimer);
  drainTimer = null;
  if (moduleObserver !== null) moduleObserver.detach();
  moduleObserver = null;
  for (const e of hooks) {
    if (e.installed) revertHook(e);
  }
  // Threads that were inside a replacement finish their call and publish (a realloc holds its
  // slot across the original call): give them a moment before the final drain.
  Thread.sleep(IN_FLIGHT_GRACE_S);
  drainAll(true);
  return countersJson();
}

function snapshot() {
  return countersJson();
}

// Frida calls this right before the script is unloaded: when the target exits, and also when
// the host went away without stop(). The CModule (our replacements' code) is freed after it: revert every hook first, then
// give threads that are inside a replacement (mostly inside the original call) time to return
// through it, or they would return into freed memory.
function dispose() {
  if (drainTimer !== null) clearInterval(drainTimer);
  drainTimer = null;
  let any = false;
  for (const e of hooks) {
    if (e.installed) {
      revertHook(e);
      any = true;
    }
  }
  if (any) Thread.sleep(IN_FLIGHT_GRACE_S);
  if (!stopped && cm !== null) {
    // the target is exiting (or the host unloads us without stop()): send what the ring holds
    stopped = true;
    try {
      drainAll(true);
    } catch (e) {
      // the connection may be gone already
    }
  }
}

rpc.exports = { init, flush, stop, snapshot, dispose };
