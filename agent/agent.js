/*
 * nvse-monitor agent (Frida 17). The host prepends `const HOTPATH_C = "...";` (agent/hotpath.c)
 * and calls rpc init(config). See docs/agent.md and docs/protocol.md.
 *
 * C hot path: one CModule replacement per profile hook, installed with Interceptor.replaceFast,
 * writing 56-byte records into a bounded ring. The ring lives in a mapping the host created
 * (cfg.transport) and reads itself; where that mapping cannot be opened, JS drains the ring on a
 * timer and send()s binary batches instead (the message transport). JS never runs on a hooked
 * call; its messages are control traffic (modules, hooks, errors).
 */
'use strict';

const RECORD_SIZE = 56;
const SLOT_SIZE = 64;
const STATE_BYTES = 16384;
const EMPTY_BATCH_MS = 250;
const IN_FLIGHT_GRACE_S = 0.05;  // after reverting hooks, before the code may go away
const GLOB_INSTANCES = 8;        // modules one glob hook can be installed in at once
const CHECK_MS = 1000;           // how often installed entry points are checked for foreign patches
const SNAP_BYTES = 16;           // bytes of our jump compared by that check
const FOLLOW_SPARE = 1;          // instances kept for following a foreign patch (see checkHooks)
const WATCH_MAX = 128;           // NV_WATCH_MAX in hotpath.c
const HEADER_BYTES = 4096;       // NV_HEADER_BYTES: the ring's header (NvShared), then the slots
const MAGIC = 0x524d564e;        // 'NVMR'
const LAYOUT_VERSION = 1;
// NvShared offsets (docs/format.md "Shared ring")
const SH = { magic: 0, version: 4, ptrSize: 8, slotSize: 12, slots: 16, headerBytes: 24,
  onFull: 320, maxWaitUs: 324, closing: 328 };

let cm = null;            // the CModule
let st = null;            // NvState (Memory.alloc'd)
let origTable = null;     // nv_orig[]: original-function pointers, filled after replaceFast
let ring = null;
let shared = null;        // NvShared: the header of the ring's mapping
let ringRaw = null;       // keeps a Memory.alloc'd ring alive (a derived pointer does not)
let transport = null;     // {kind: 'shm' | 'messages', detail, unmap: function | null}
let fnMark = null;
let fnClassified = null;
let fnSetClosing = null;
let markSeq = 0;
let outBuf = null;
let maxRecs = 0;
let ringSlots = 0;
let fnDrain = null;
let fnFinish = null;
let fnNextNewTid = null;
let fnIgnoreLate = null;
let fnSuspend = null;
let fnResume = null;
let lastCheckMs = 0;
let lateTids = [];
let countersPtr = null;
let drainTimer = null;
let lastSendMs = 0;
let stopped = false;
let hooks = [];           // [{index, spec, re, ninst, inst: [...], ok, detail, pending}]
let modules = new Map();  // base string -> module json
let moduleObserver = null;
let config = null;
let planSlots = 0;        // nv_orig[] entries
let watch = null;         // patch watch: {listener, callback, set, publish, pause, table, paused}

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

// One replacement per (hook, instance): a glob hook may be installed in several modules at once,
// each instance with its own original pointer nv_orig[slot]; all record the hook's index.
function genHook(index, h, arch, slow, inst, slot, opt) {
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
  const call = `((${fnType}) nv_orig[${slot}]) (${callArgs.join(', ')})`;
  const a = h.args;
  const arg = (name) => 'a' + a[name];
  const head = `${attr}gsize\n${replName(slow, index, inst)} (${params.join(', ')})\n{\n` +
    `  volatile gsize * tl;\n  gsize th;\n  gsize r;\n  NV_ENTER (tl, th);\n` +
    `  if (th == 0)\n    return ${call};\n`;
  const tail = `  NV_LEAVE (tl, th);\n  return r;\n}\n`;
  if (h.role === 'wrapper') {
    // records nothing; under Interceptor.replace the return address is Gum's: plain call through
    if (slow) return `${attr}gsize\n${replName(slow, index, inst)} (${params.join(', ')})\n{\n` +
      `  return ${call};\n}\n`;
    return head + `  {\n    int mine;\n    NV_WRAP_ENTER (mine);\n    NV_LEAVE (tl, th);\n` +
      `    r = ${call};\n    if (mine)\n      NV_WRAP_LEAVE ();\n    return r;\n  }\n}\n`;
  }
  // Under Interceptor.replace the return address on the stack is Gum's; ask the invocation.
  const ownRa = slow ? 'nv_slow_ra ()' : '__builtin_return_address (0)';
  // With wrappers or sampling (NV_FLAGS) a record carries flags and its caller may be a
  // wrapper's; without either the code is the plain one, unchanged.
  const flagged = opt.wrappers || opt.sampling;
  const ra = flagged ? 'ra' : ownRa;
  const fl = flagged ? ', fl' : '';
  const pre = !flagged ? '' : `    gpointer ra = ${ownRa};\n    guint fl = 0;\n` +
    (opt.wrappers ? '    NV_WRAPPED (ra, fl);\n' : '');
  const sampling = opt.sampling && h.role !== 'free' && h.role !== 'aligned_free';
  const decide = sampling ? '    NV_SAMPLE (size, fl);\n' : '';
  // the stack goes out right before the call's own record (only when there is one)
  const capture = (cond) => !sampling ? '' :
    `    if ((fl & NV_FLAG_SAMPLED) != 0 && ${cond}\n` +
    `        && !nv_stack (${ownRa}, __builtin_frame_address (0), th, ${slow ? 0 : 1}))\n` +
    `      fl &= ~NV_FLAG_SAMPLED;\n`;
  // calloc, _recalloc: count * size, saturated on overflow (only 64-bit sizes can overflow, and
  // ia32 has no 64-bit division in CModule)
  const countTimesSize = h.args.count === undefined ? '' :
    `    guint64 n = ${arg('count')}, m = ${arg('size')};\n    guint64 size = n * m;\n` +
    `#if NV_PTR64\n    if (m != 0 && size / m != n)\n      size = ~(guint64) 0;\n#endif\n`;
  let body;
  switch (h.role) {
    case 'alloc':
    case 'aligned_alloc':
      body = `  {\n${pre}    guint64 size = ${arg('size')};\n${decide}` +
        `    guint64 t0 = size > nv_state.large_bytes ? nv_clock () : 0;\n` +
        `    r = ${call};\n${capture('(r != 0 || size != 0)')}` +
        `    nv_alloc_done (${index}, r, size, ${ra}, th, t0${fl});\n  }\n`;
      break;
    case 'calloc':
      body = `  {\n${pre}${countTimesSize}${decide}` +
        `    guint64 t0 = size > nv_state.large_bytes ? nv_clock () : 0;\n` +
        `    r = ${call};\n${capture('(r != 0 || size != 0)')}` +
        `    nv_alloc_done (${index}, r, size, ${ra}, th, t0${fl});\n  }\n`;
      break;
    case 'posix_memalign':
      body = `  {\n${pre}    guint64 size = ${arg('size')};\n    gsize out = ${arg('out')};\n${decide}` +
        `    guint64 t0 = size > nv_state.large_bytes ? nv_clock () : 0;\n` +
        `    r = ${call};\n${capture('1')}` +
        `    if ((guint32) r == 0 && out != 0)\n` +
        `      nv_alloc_done (${index}, *(gsize *) out, size, ${ra}, th, t0${fl});\n` +
        `    else\n` +
        `      nv_emit (KIND_FAILED, ${index}, 0, 0, size, ${ra}, th,\n` +
        `          t0 != 0 ? nv_clock () - t0 : 0${fl});\n  }\n`;
      break;
    case 'free':
    case 'aligned_free':
      body = `  {\n${pre}    gsize p = ${arg('ptr')};\n` +
        `    if (p != 0)\n      nv_emit (KIND_FREE, ${index}, p, 0, 0, ${ra}, th, 0${flagged ? ', 0' : ''});\n` +
        `    r = ${call};\n  }\n`;
      break;
    case 'realloc':
    case 'recalloc':
      body = `  {\n${pre}    gsize p = ${arg('ptr')};\n` +
        (h.role === 'realloc' ? `    guint64 size = ${arg('size')};\n` : countTimesSize) +
        `    gsize pos;\n    guint64 t0;\n    NvSlot * s;\n${decide}${capture('1')}` +
        `    s = nv_realloc_begin (&pos, &t0, size, th);\n` +
        `    r = ${call};\n` +
        `    nv_realloc_end (s, pos, t0, ${index}, r, p, size, ${ra}, th${fl});\n  }\n`;
      break;
    default:
      throw new Error(`hook ${h.name}: role ${h.role} has no replacement`);
  }
  return head + body + tail;
}

function replName(slow, index, inst) {
  return `${slow ? 'nvs_' : 'nvh_'}${index}_${inst}`;
}

// Instances per hook: one, or GLOB_INSTANCES for a module pattern with wildcards (msvcr*.dll
// can match several CRTs at once), plus FOLLOW_SPARE for the destination of a foreign patch.
// Returns the total number of nv_orig slots.
function planInstances(profile) {
  let slots = 0;
  for (const h of profile.hooks) {
    h.glob = h.module !== undefined && /[*?]/.test(h.module);
    h.ninst = h.role === 'size' ? 0 : (h.glob ? GLOB_INSTANCES : 1) + FOLLOW_SPARE;
    h.slot0 = slots;
    slots += h.ninst;
  }
  return slots;
}

// opt: {wrappers, sampling}: which optional parts of the hot path are compiled in
function buildSource(profile, arch, platform, extraDefines, opt) {
  const defs = [];
  if (opt.wrappers) defs.push('#define NV_WRAPPERS 1');
  if (opt.sampling) defs.push('#define NV_SAMPLING 1');
  for (const d of extraDefines) {
    if (!/^NV_BENCH_[A-Z_]+$/.test(d)) throw new Error(`unknown define ${d}`);
    defs.push(`#define ${d} 1`);
  }
  if (platform === 'windows') defs.push('#define NV_WINDOWS 1');
  let src = defs.join('\n') + '\n' + HOTPATH_C + '\n';
  profile.hooks.forEach((h, i) => {
    for (let k = 0; k < h.ninst; k++) {
      src += genHook(i, h, arch, false, k, h.slot0 + k, opt) + '\n' +
        genHook(i, h, arch, true, k, h.slot0 + k, opt) + '\n';
    }
  });
  return src;
}

/* ------------------------------------------------------------------ hooks
 * A hook (profile entry) has up to `ninst` installed instances, each {k, address (the entry
 * point), patchAt (where Gum wrote its jump: the entry, or the end of a JMP chain Gum followed),
 * ours (the bytes there right after we hooked), module, tampered, follow (installed at the
 * destination of a foreign patch written over another instance)}.
 */

// pending: the hook's module is not loaded (yet): neither installed nor failed
function sendHook(entry, ok, detail, pending = false) {
  entry.pending = pending;
  send({ type: 'hook', ts_us: clockNowUs(), hook: entry.index, name: entry.spec.name, ok, detail, pending });
}

// An optional hook whose entry point does not exist in this module (a CRT build without
// _recalloc): not a failure. The host logs it as INFO "Hook not present" (docs/engine.md); the
// hook stays pending for other modules its pattern may match.
const NOT_PRESENT = 'not present: ';
function notPresent(entry, reason) {
  if (entry.detail === '') entry.detail = NOT_PRESENT + reason;
  send({ type: 'hook', ts_us: clockNowUs(), hook: entry.index, name: entry.spec.name, ok: false,
         detail: NOT_PRESENT + reason, pending: false });
}

function fail(entry, reason) {
  entry.ok = entry.inst.length > 0;
  entry.detail = reason;
  sendHook(entry, false, reason);
  return false;
}

function checkCode(address, mod) {
  const range = Process.findRangeByAddress(address);
  if (range === null || range.protection.indexOf('x') < 0)
    return `address ${address} is not executable code`;
  if (mod !== null && (address.compare(mod.base) < 0 || address.compare(mod.base.add(mod.size)) >= 0))
    return `address ${address} is outside ${mod.name}`;
  return null;
}

// Destination of a jump instruction at `a` (jmp rel32, jmp rel8, jmp [mem]), or null.
function jmpTarget(a) {
  try {
    const b0 = a.readU8();
    if (b0 === 0xE9) return a.add(5).add(a.add(1).readS32());
    if (b0 === 0xEB) return a.add(2).add(a.add(1).readS8());
    if (b0 === 0xFF && a.add(1).readU8() === 0x25) {
      const cell = Process.pointerSize === 8 ? a.add(6).add(a.add(2).readS32()) : ptr(a.add(2).readU32());
      return cell.readPointer();
    }
  } catch (e) {
    // unreadable: not a jump we can follow
  }
  return null;
}

function installedAt(address) {
  for (const e of hooks) {
    for (const i of e.inst) {
      if (i.patchAt.equals(address)) return e;
    }
  }
  return null;
}

// Gum follows jumps at an entry point (a heap replacer's 5-byte JMP) and hooks their end.
function resolveJumps(address) {
  let cur = address;
  for (let hop = 0; hop < 4; hop++) {
    if (installedAt(cur) !== null) break;
    const t = jmpTarget(cur);
    if (t === null || t.equals(cur)) break;
    cur = t;
  }
  return cur;
}

function moduleNameAt(address) {
  const m = Process.findModuleByAddress(address);
  return m !== null ? m.name : `unmapped or anonymous code at ${address}`;
}

function snapLength(address) {
  const range = Process.findRangeByAddress(address);
  if (range === null) return 0;
  const left = range.base.add(range.size).sub(address).toInt32();
  return Math.max(0, Math.min(SNAP_BYTES, left));
}

function readBytes(address, n) {
  return n > 0 ? new Uint8Array(address.readByteArray(n)) : new Uint8Array(0);
}

function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function freeInstance(entry) {
  const used = new Set(entry.inst.map(i => i.k));
  for (let k = 0; k < entry.ninst; k++) if (!used.has(k)) return k;
  return -1;
}

// Step 1 of an installation (no flush): checks, then replaceFast (or the slow fallback).
// Returns a job for finishInstall, or null when the hook was reported (failed / same code).
// `why`: set when following a foreign patch (what was patched, by whom).
function beginInstall(entry, address, mod, why) {
  const spec = entry.spec;
  const bad = checkCode(address, mod);
  if (bad !== null) { fail(entry, why ? `${why}; not followed: ${bad}` : bad); return null; }
  const where = mod !== null
    ? `${mod.name}!${spec.export !== undefined ? spec.export : '+0x' + address.sub(mod.base).toString(16)}`
    : '';
  let detail = why ? `${why}; calls followed into ${moduleNameAt(address)} (${address})`
    : `${address}${where ? ' ' + where : ''}`;
  const target = resolveJumps(address);
  if (!target.equals(address)) {
    // e.g. NVHR patched the entry before we came: Gum hooks the JMP's destination, so the calls
    // are recorded in the replacer's function
    detail += `: follows JMP into ${moduleNameAt(target)} (${target})`;
    const bad2 = checkCode(target, null);
    if (bad2 !== null) { fail(entry, `${detail}: ${bad2}`); return null; }
  }
  const other = installedAt(target);
  if (other !== null) {
    // glibc's aligned_alloc and memalign are one function; a replacer may send both reallocate
    // entries to one function: recorded once, under the hook installed first
    entry.ok = true;
    entry.detail = `${detail}: same code as hook ${other.spec.name}, recorded under it`;
    sendHook(entry, true, entry.detail);
    return null;
  }
  const k = freeInstance(entry);
  if (k < 0) {
    fail(entry, `${detail}: not hooked, already installed in ${entry.ninst} modules (the limit)`);
    return null;
  }
  const slot = origTable.add((entry.spec.slot0 + k) * Process.pointerSize);
  const beforeEntry = readBytes(address, snapLength(address));
  const beforeTarget = readBytes(target, snapLength(target));
  let slow = false;
  try {
    // takes effect at the interceptor flush, after the original pointer is in its slot
    slot.writePointer(Interceptor.replaceFast(address, cm[replName(false, entry.index, k)]));
  } catch (e) {
    // replaceFast needs a prologue long enough for a direct jump to the replacement (glibc's
    // memalign is a 14-byte tail-call stub). Interceptor.replace works there, at ~0.8 µs a call:
    // the replacement calls the hooked address itself, which Gum routes to the original.
    if (entry.spec.role === 'wrapper') {
      // not for a wrapper: Gum's frames there have no unwind info (a C++ exception through
      // them ends the program on Linux), and a wrapper records nothing anyway. A tail-call
      // stub (libstdc++'s operator new[] jumps to operator new) leaves its caller's return
      // address in place: a hooked wrapper it jumps to still sees the right caller.
      slot.writePointer(ptr(0));
      const why = `wrapper not hooked (${address}): too short for the fast hook (${e.message})`;
      if (entry.spec.required === false) notPresent(entry, why);
      else fail(entry, why);
      return null;
    }
    try {
      slot.writePointer(address);
      Interceptor.replace(address, cm[replName(true, entry.index, k)]);
      slow = true;
      detail += ` (slow path: Interceptor.replace, replaceFast said: ${e.message})`;
    } catch (e2) {
      slot.writePointer(ptr(0));
      fail(entry, `cannot hook ${address}: ${e.message}; ${e2.message}`);
      return null;
    }
  }
  const inst = { k, address, target, patchAt: target, ours: null, slow, tampered: false,
    module: mod !== null ? mod.name : (why ? moduleNameAt(address) : ''),
    modBase: mod !== null ? mod.base : null, modSize: mod !== null ? mod.size : 0, detail,
    follow: Boolean(why) };
  entry.inst.push(inst);
  return { entry, inst, beforeEntry, beforeTarget };
}

function committed(job) {
  const a = readBytes(job.inst.address, job.beforeEntry.length);
  const t = readBytes(job.inst.target, job.beforeTarget.length);
  return !sameBytes(a, job.beforeEntry) || !sameBytes(t, job.beforeTarget);
}

// Step 2, after Interceptor.flush(): note where Gum's jump is and what it looks like, report.
function finishInstall(job) {
  const { entry, inst } = job;
  const nowTarget = readBytes(inst.target, job.beforeTarget.length);
  if (sameBytes(nowTarget, job.beforeTarget) && !inst.target.equals(inst.address)) {
    const nowEntry = readBytes(inst.address, job.beforeEntry.length);
    if (!sameBytes(nowEntry, job.beforeEntry)) inst.patchAt = inst.address;
  }
  const now = readBytes(inst.patchAt, snapLength(inst.patchAt));
  const before = inst.patchAt.equals(inst.target) ? job.beforeTarget : job.beforeEntry;
  if (sameBytes(now, before)) {
    // Inside a module observer callback the flush is deferred to the end of Gum's own
    // transaction (still before the loading call returns): learn our bytes at the next check.
    inst.ours = null;
    inst.before = before;
  } else {
    inst.ours = now;
  }
  inst.ready = true;  // checkHooks may look at it now
  entry.ok = true;
  entry.detail = inst.detail;
  sendHook(entry, true, inst.detail);
}

// Installs a list of [entry, address, module, why?] in one interceptor transaction (one flush:
// a module's hooks are all in before the call that loaded it returns).
function installAll(list) {
  const jobs = [];
  pauseWatch(true);  // our own code writes are not foreign patches
  try {
    for (const [entry, address, mod, why] of list) {
      const j = beginInstall(entry, address, mod, why);
      if (j !== null) jobs.push(j);
    }
    if (jobs.length === 0) return;
    Interceptor.flush();
    // Gum commits code changes when the last open interceptor transaction ends. If the JS thread
    // is in one without the JS lock (mid-drain), a module observer callback's flush is deferred
    // to then, which may be after the loading call returned and the module's first calls ran:
    // yield the lock until the commit has happened (bounded).
    for (let i = 0; i < 200 && !jobs.every(committed); i++) {
      Thread.sleep(0.0005);
      Interceptor.flush();
    }
    for (const j of jobs) finishInstall(j);
  } finally {
    pauseWatch(false);
    refreshWatch();
  }
}

// On Linux, Module#findExportByName dlopen()s the module for dlsym and the handle lives as long
// as the JS Module object: a dlclose() would then not unload the library. Reading the export
// table from the mapped image takes no reference.
function exportFinder(mod) {
  if (Process.platform !== 'linux') return name => mod.findExportByName(name);
  let table = null;
  return name => {
    if (table === null) {
      table = new Map();
      for (const e of mod.enumerateExports()) if (e.type === 'function') table.set(e.name, e.address);
    }
    const a = table.get(name);
    return a !== undefined ? a : null;
  };
}

function inModule(address, base, size) {
  return address.compare(base) >= 0 && address.compare(base.add(size)) < 0;
}

function onModuleAdded(mod, initial) {
  const j = moduleJson(mod);
  modules.set(mod.base.toString(), j);
  if (!initial) sendModule('add', j);
  const find = exportFinder(mod);
  const list = [];
  for (const e of hooks) {
    if (e.re === null || e.ninst === 0 || !e.re.test(mod.name)) continue;
    if (e.inst.some(i => i.modBase !== null && i.modBase.equals(mod.base))) continue;
    if (!e.spec.glob && e.inst.some(i => !i.follow)) continue;  // not a glob: its module is hooked
    const spec = e.spec;
    if (spec.export !== undefined) {
      const addr = find(spec.export);
      if (addr === null) {
        const why = `export ${spec.export} not found in ${mod.name}`;
        if (spec.required === false) notPresent(e, why);
        else fail(e, why);
      }
      else list.push([e, addr, mod]);
    } else if (spec.offset !== undefined) {
      if (spec.offset >= mod.size) fail(e, `offset 0x${spec.offset.toString(16)} is outside ${mod.name}`);
      else list.push([e, mod.base.add(spec.offset), mod]);
    } else {
      fail(e, 'no export or offset');
    }
  }
  installAll(list);
}

// Module observer callbacks run on the thread that loads the module, synchronously: that is
// what puts a plugin's hooks in before its first call. Our own allocations meanwhile are not
// the target's.
function onAddedHook(m) {
  const saved = fnSuspend !== null ? fnSuspend() : 0;
  try {
    onModuleAdded(m, initialLoad);
  } catch (e) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: `module ${m.name}: ${e.stack}` });
  } finally {
    if (fnResume !== null) fnResume(saved);
  }
}

function revertInstance(e, inst) {
  pauseWatch(true);
  try {
    Interceptor.revert(inst.address);
    Interceptor.flush();
  } catch (err) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: `revert ${e.spec.name}: ${err.message}` });
  } finally {
    pauseWatch(false);
  }
}

function onModuleRemoved(mod) {
  const key = mod.base.toString();
  const j = modules.get(key) || moduleJson(mod);
  modules.delete(key);
  for (const e of hooks) {
    const gone = e.inst.filter(i => inModule(i.patchAt, mod.base, mod.size) || inModule(i.address, mod.base, mod.size));
    if (gone.length === 0) continue;
    // the code is unmapped: nothing to revert; a later load of the module gets hooked again
    e.inst = e.inst.filter(i => gone.indexOf(i) < 0);
    if (e.inst.length === 0) {
      e.ok = false;
      sendHook(e, false, `pending: ${mod.name} unloaded`, true);
    } else {
      sendHook(e, true, `${mod.name} unloaded; still hooked in ${e.inst.map(i => i.module).join(', ')}`);
    }
  }
  refreshWatch();
  sendModule('remove', j);
}

// With the shared ring, records reach the host without us: a marker record numbered like the
// message puts the module event at its place among them (hotpath.c nv_mark).
function sendModule(action, j) {
  const msg = { type: 'module', ts_us: clockNowUs(), action, module: j };
  if (transport !== null && transport.kind === 'shm' && fnMark !== null) {
    markSeq += 1;
    if (Number(fnMark(markSeq)) !== 0) msg.mark = markSeq;
  }
  send(msg);
}

/* ------------------------------------------------------------------ foreign patches
 * Another party (a heap replacer such as NVHR) may write its own JMP over an entry point after we
 * hooked it. Reverting that hook would write the original prologue back over the replacer's jump
 * and send the replacer's blocks to the game's heap. So: compare our jump's bytes now and then
 * and leave a patched entry alone. Calls now go through the replacer's JMP to its function: hook
 * that function (the jump's destination, in a module) as another instance of the same hook.
 *
 * When: at once on the patching thread, from the patch watch (the replacer's call restoring the
 * page protection after writing its JMP: see nv_on_protect), so the calls it makes next are
 * recorded; and once a second from the drain timer, for writers that do not change protection.
 */
function checkHooks(follow = true) {
  const follows = [];
  let found = false;
  for (const e of hooks) {
    for (const inst of e.inst) {
      // not ready: being installed on a thread that yielded the JS lock (installAll's wait)
      if (inst.tampered || !inst.ready) continue;
      let now;
      try {
        now = readBytes(inst.patchAt, inst.ours !== null ? inst.ours.length : inst.before.length);
      } catch (err) {
        continue;  // unmapped: the module observer deals with it
      }
      if (inst.ours === null) {
        // first look after a deferred flush: ours if it changed into a jump out of every module
        // (into Gum's trampoline); something else got there first if it jumps into a module
        if (sameBytes(now, inst.before)) continue;
        const t = jmpTarget(inst.patchAt);
        if (t !== null && Process.findModuleByAddress(t) === null) {
          inst.ours = now;
          continue;
        }
        inst.ours = inst.before;  // report below
      }
      if (sameBytes(now, inst.ours)) continue;
      inst.tampered = true;
      found = true;
      const dest = jmpTarget(inst.patchAt);
      const destMod = dest !== null ? Process.findModuleByAddress(dest) : null;
      const by = dest !== null ? moduleNameAt(dest) : 'unknown code';
      inst.tamperedBy = by;
      const what = `${inst.address}${inst.module ? ' ' + inst.module : ''}: entry point ` +
        `${inst.patchAt} patched by ${by} after attach; left alone (not reverted)`;
      if (follow && destMod !== null) {
        follows.push([e, dest, null, what]);
      } else {
        // no jump, or a jump out of every module (another hooking engine's trampoline?):
        // hooking there could break it
        sendHook(e, false, `${what}; calls through it are no longer recorded` +
          (dest !== null && follow ? ' (its jump leads to no module: not followed)' : ''));
      }
    }
  }
  if (follows.length > 0) installAll(follows);
  else if (found) refreshWatch();
}

/* Patch watch: the protection call every code patcher makes (mprotect; VirtualProtect on Windows)
 * gets an Interceptor.attach whose onEnter is C (nv_on_protect): it compares the call's range with
 * our hooks' code ranges and calls back into JS (onWatched) only when they meet. Not a hot path:
 * these calls are rare (a page mapping change), and the common case costs a few compares. */
function protectFunction() {
  if (Process.platform === 'windows') {
    const mods = Process.enumerateModules();
    for (const name of ['kernelbase.dll', 'kernel32.dll']) {
      const m = mods.find(x => x.name.toLowerCase() === name);
      const f = m !== undefined ? m.findExportByName('VirtualProtect') : null;
      if (f !== null) return [f, `${m.name}!VirtualProtect`];
    }
    return [null, 'VirtualProtect'];
  }
  return [Module.findGlobalExportByName('mprotect'), 'mprotect'];
}

function setupWatch() {
  const [fn, name] = protectFunction();
  if (fn === null) {
    send({ type: 'agent-error', ts_us: clockNowUs(),
      message: `patch watch: ${name} not found; foreign patches are found by the 1 s check only` });
    return;
  }
  try {
    const callback = new NativeCallback(onWatched, 'void', []);
    const set = new NativeFunction(cm.nv_watch_set, 'void', ['size_t', 'size_t', 'pointer', 'pointer']);
    const publish = new NativeFunction(cm.nv_watch_publish, 'size_t', ['size_t', 'size_t', 'pointer']);
    const pause = new NativeFunction(cm.nv_watch_pause, 'void', ['size_t', 'size_t']);
    // paused: thread id -> depth of our own installs/reverts running on it
    watch = { listener: null, callback, set, publish, pause, table: 0, paused: new Map(), off: false };
    refreshWatch();
    watch.listener = Interceptor.attach(fn, { onEnter: cm.nv_on_protect });
    Interceptor.flush();
  } catch (e) {
    watch = null;
    send({ type: 'agent-error', ts_us: clockNowUs(),
      message: `patch watch on ${name}: ${e.message}; foreign patches are found by the 1 s check only` });
  }
}

// The code ranges of our live (not tampered) instances: where a foreign patch would land.
// Written into the table not in use, then published: a protection call on another thread
// meanwhile reads a complete table.
function refreshWatch() {
  if (watch === null || watch.off) return;
  const t = watch.table ^ 1;
  let n = 0;
  for (const e of hooks) {
    for (const i of e.inst) {
      if (i.tampered || n >= WATCH_MAX) continue;
      watch.set(t, n++, i.patchAt, i.patchAt.add(SNAP_BYTES));
    }
  }
  watch.publish(t, n, watch.callback);
  watch.table = t;
}

// Our own code writes (installs, reverts) on this thread are not foreign patches. Per thread:
// a replacer patching on another thread meanwhile is still seen (its callback waits for the
// JS lock). Nested: installAll inside a watched check.
function pauseWatch(on) {
  if (watch === null) return;
  const tid = Process.getCurrentThreadId();
  const depth = (watch.paused.get(tid) || 0) + (on ? 1 : -1);
  if (depth > 0) watch.paused.set(tid, depth);
  else watch.paused.delete(tid);
  if (on ? depth === 1 : depth === 0) watch.pause(tid, on ? 1 : 0);
}

function stopWatch() {
  if (watch === null) return;
  watch.off = true;
  watch.publish(watch.table, 0, ptr(0));
  if (watch.listener !== null) {
    watch.listener.detach();
    Interceptor.flush();
  }
  // `watch` stays: the NativeCallback must outlive a call that may still be on its way in
  watch.listener = null;
}

// On the thread that changed a protection over our code (mostly a replacer about to go on).
function onWatched() {
  if (stopped || watch === null || watch.paused.has(Process.getCurrentThreadId())) return;
  const saved = fnSuspend !== null ? fnSuspend() : 0;  // our allocations are not the target's
  try {
    checkHooks();
  } catch (e) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: `patch watch: ${e.stack}` });
  } finally {
    if (fnResume !== null) fnResume(saved);
  }
}

function tamperedNames() {
  const out = [];
  for (const e of hooks) for (const i of e.inst) if (i.tampered) out.push(`${e.spec.name} (${i.tamperedBy})`);
  return out;
}

/* ------------------------------------------------------------------ drain */

// Message transport only: the exact counters nv_drain/nv_finish keep (the host keeps its own
// from the shared ring), with the wait tallies from the ring's header.
function countersJson() {
  const c = [];
  for (let i = 0; i < 9; i++) c.push(Number(countersPtr.add(i * 8).readU64()));
  const w = [0, 1, 2].map(i => Number(fnSharedWord(i)));
  return {
    now_us: c[7],
    counters: {
      allocs: c[0], frees: c[1], reallocs: c[2], failures: c[3], bytes_allocated: c[4],
      dropped: c[5], published: c[6], dropped_frees: c[8],
      stalls: w[0], stall_us: w[1], stall_max_us: w[2],
    },
  };
}
let fnSharedWord = null;

// Threads that made their first hooked call since the last look: Frida's own (started after
// init: cloaked, e.g. a GLib worker doing iconv) get their records filtered out by nv_finish.
function classifyNewThreads() {
  for (let tid = Number(fnNextNewTid()); tid !== 0; tid = Number(fnNextNewTid())) {
    if (Cloak.hasThread(tid) && lateTids.indexOf(tid) < 0) {
      lateTids.push(tid);
      fnIgnoreLate(tid);
    }
  }
  fnClassified();  // the host may now take the records of every thread listed so far
}

function drainAll(forceEmpty) {
  if (cm === null) return;
  if (transport.kind === 'shm') {
    classifyNewThreads();
    periodicCheck();
    return;
  }
  let sent = false;
  // At most one ring's worth per call: producers refilling as fast as we drain must not keep
  // the JS thread (and with it stop() and every RPC) busy forever.
  for (let budget = ringSlots; budget > 0; budget -= maxRecs) {
    const got = fnDrain(outBuf, Math.min(maxRecs, budget));
    // every record copied was published after its thread's first-call entry was stored
    classifyNewThreads();
    const n = got === 0 ? 0 : fnFinish(outBuf, got);
    if (n > 0) {
      const h = countersJson();
      send({ type: 'batch', now_us: h.now_us, counters: h.counters }, outBuf.readByteArray(n * RECORD_SIZE));
      sent = true;
    }
    if (got < Math.min(maxRecs, budget)) break;
  }
  const t = Date.now();
  if (sent) {
    lastSendMs = t;
  } else if (forceEmpty || t - lastSendMs >= EMPTY_BATCH_MS) {
    const h = countersJson();
    send({ type: 'batch', now_us: h.now_us, counters: h.counters });
    lastSendMs = t;
  }
  periodicCheck();
}

function periodicCheck() {
  const t = Date.now();
  if (t - lastCheckMs >= CHECK_MS) {
    lastCheckMs = t;
    checkHooks();
  }
}

/* ------------------------------------------------------------------ the ring's memory */

// The host's mapping (cfg.transport: {path} on Linux, {name} on Windows; {bytes, slots}), opened
// and mapped here. Returns {base, unmap} or a string saying why not.
function openMapping(t, slots) {
  const need = HEADER_BYTES + slots * SLOT_SIZE;
  if (!(t.bytes >= need)) return `mapping of ${t.bytes} bytes is smaller than ${need}`;
  let base, unmap;
  if (Process.platform === 'windows') {
    const k32 = Process.getModuleByName('kernel32.dll');
    const abi = Process.arch === 'ia32' ? 'stdcall' : 'default';
    const open = new NativeFunction(k32.getExportByName('OpenFileMappingW'), 'pointer', ['uint32', 'int', 'pointer'], abi);
    const view = new NativeFunction(k32.getExportByName('MapViewOfFile'), 'pointer', ['pointer', 'uint32', 'uint32', 'uint32', 'size_t'], abi);
    const unview = new NativeFunction(k32.getExportByName('UnmapViewOfFile'), 'int', ['pointer'], abi);
    const close = new NativeFunction(k32.getExportByName('CloseHandle'), 'int', ['pointer'], abi);
    const FILE_MAP_ALL_ACCESS = 0xF001F;
    const h = open(FILE_MAP_ALL_ACCESS, 0, Memory.allocUtf16String(t.name));
    if (h.isNull()) return `OpenFileMappingW(${t.name}) failed`;
    base = view(h, FILE_MAP_ALL_ACCESS, 0, 0, need);
    close(h);  // the view keeps the mapping alive
    if (base.isNull()) return `MapViewOfFile(${t.name}) failed`;
    unmap = () => unview(base);
  } else {
    const libc = (n) => Module.getGlobalExportByName(n);
    const open = new NativeFunction(libc('open'), 'int', ['pointer', 'int', 'int']);
    const mmap = new NativeFunction(libc('mmap'), 'pointer', ['pointer', 'size_t', 'int', 'int', 'int', 'long']);
    const munmap = new NativeFunction(libc('munmap'), 'int', ['pointer', 'size_t']);
    const close = new NativeFunction(libc('close'), 'int', ['int']);
    const O_RDWR = 2, O_NOFOLLOW = 0x20000, O_CLOEXEC = 0x80000;
    const PROT_RW = 3, MAP_SHARED = 1;
    const fd = open(Memory.allocUtf8String(t.path), O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
    if (fd < 0) return `cannot open ${t.path}`;
    base = mmap(ptr(0), need, PROT_RW, MAP_SHARED, fd, 0);
    close(fd);
    if (base.equals(ptr(-1)) || base.isNull()) return `cannot map ${t.path}`;
    unmap = () => munmap(base, need);
  }
  const bad = checkHeader(base, slots);
  if (bad !== null) { unmap(); return bad; }
  return { base, unmap };
}

function checkHeader(base, slots) {
  if (base.add(SH.magic).readU32() !== MAGIC) return 'no ring header in the mapping';
  if (base.add(SH.version).readU32() !== LAYOUT_VERSION) return 'ring layout version differs';
  if (base.add(SH.ptrSize).readU32() !== Process.pointerSize) return 'ring layout is for another pointer width';
  if (base.add(SH.slotSize).readU32() !== SLOT_SIZE) return 'ring slot size differs';
  if (Number(base.add(SH.slots).readU64()) !== slots) return 'ring slot count differs';
  if (Number(base.add(SH.headerBytes).readU64()) !== HEADER_BYTES) return 'ring header size differs';
  return null;
}

// The message transport's ring: our own memory, the same layout.
function allocRing(slots) {
  ringRaw = Memory.alloc(HEADER_BYTES + slots * SLOT_SIZE + 64);
  const base = ringRaw.add((64 - ringRaw.and(63).toInt32()) & 63);
  base.add(SH.magic).writeU32(MAGIC);
  base.add(SH.version).writeU32(LAYOUT_VERSION);
  base.add(SH.ptrSize).writeU32(Process.pointerSize);
  base.add(SH.slotSize).writeU32(SLOT_SIZE);
  base.add(SH.slots).writeU64(slots);
  base.add(SH.headerBytes).writeU64(HEADER_BYTES);
  return base;
}

function tick() {
  try {
    drainAll(false);
  } catch (e) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: 'drain: ' + e.stack });
  }
}

/* ------------------------------------------------------------------ Frida's own threads */

// Frida's threads (JS loop, GLib main loop, D-Bus...) are cloaked. On Linux every thread is in
// /proc/self/task: the cloaked ones there are Frida's.
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
  // Cloak.hasThread, not Process.enumerateThreads(): on Linux that one reads every thread's
  // registers through a ptrace helper process, which deadlocked init now and then (the helper
  // stopped a thread holding a lock the JS thread then waited for).
  return all.filter(tid => tid !== Process.id && Cloak.hasThread(tid));
}

/* ------------------------------------------------------------------ thread state */

// Offset from the thread pointer to our gum TLS key's value (see NV_ENTER in hotpath.c), found
// on this thread by setting sentinels through gum and looking for them in the thread block, then
// checked both ways. Returns {off, seq} or null (the hot path then calls gum).
// k: 0 the thread word, 1 the wrapper slot, 2 the sampling countdown (hotpath.c nv_key).
const TLS_SCAN_BYTES = 0x2000;
function findTlsSlot(platform, k) {
  const tpFn = new NativeFunction(cm.nv_thread_pointer, 'pointer', []);
  const getK = new NativeFunction(cm.nv_tls_get, 'pointer', ['size_t']);
  const setK = new NativeFunction(cm.nv_tls_set, 'void', ['size_t', 'pointer']);
  const get = () => getK(k);
  const set = (v) => setK(k, v);
  const tp = tpFn();
  const psz = Process.pointerSize;
  const s1 = ptr(psz === 8 ? '0x6e764d6f6e543153' : '0x6e764d31');
  const s2 = ptr(psz === 8 ? '0x6e764d6f6e543253' : '0x6e764d32');
  const s3 = ptr(psz === 8 ? '0x6e764d6f6e543353' : '0x6e764d33');
  const saved = get();
  try {
    if (tp.isNull()) return null;
    set(s1);
    // Frida cloaks its own threads' memory (no range to ask about): read until the block ends
    let off = null;
    try {
      for (let o = psz; o < TLS_SCAN_BYTES; o += psz) {
        if (tp.add(o).readPointer().equals(s1)) {
          if (off !== null) return null;  // not unique: do not guess
          off = o;
        }
      }
    } catch (e) {
      // end of the mapping
    }
    if (off === null) return null;
    set(s2);
    if (!tp.add(off).readPointer().equals(s2)) return null;
    tp.add(off).writePointer(s3);
    if (!get().equals(s3)) return null;
    // glibc stores the key's sequence number just before the value (checked per call)
    const seq = platform === 'windows' ? ptr(0) : tp.add(off - psz).readPointer();
    return { off, seq };
  } catch (e) {
    return null;
  } finally {
    set(saved);
  }
}

/* ------------------------------------------------------------------ unwind info
 * A C++ exception thrown below one of our replacements (operator new's bad_alloc under a wrapper
 * hook) must unwind through the replacement's frame. On Windows x86 it does (SEH walks its
 * registration chain, not the frames). On Linux the DWARF unwinder needs unwind info for every
 * frame and TinyCC emits none: without it the program ends in std::terminate (seen with
 * libstdc++'s operator new hooked). So on Linux we register one FDE for the CModule's code with
 * libgcc's __register_frame: every TinyCC function keeps a frame pointer (CFA = fp + 2 words,
 * return address at CFA - 1 word, saved fp at CFA - 2 words) and uses no callee-saved register
 * besides it, so one rule fits every call site in our code. Returns a note for the init result.
 */
let unwind = null;  // {frame, deregister}
function registerUnwindInfo() {
  if (Process.platform !== 'linux') return 'not needed (SEH)';
  let reg = null, dereg = null;
  for (const m of Process.enumerateModules()) {
    if (!/^libgcc_s\.so/.test(m.name)) continue;
    reg = m.findExportByName('__register_frame');
    dereg = m.findExportByName('__deregister_frame');
  }
  if (reg === null) reg = Module.findGlobalExportByName('__register_frame');
  if (dereg === null) dereg = Module.findGlobalExportByName('__deregister_frame');
  if (reg === null || dereg === null) return 'no __register_frame (no C++ unwinder loaded)';
  const ps = Process.pointerSize;
  const x64 = ps === 8;
  // CIE: version 1, augmentation "", code align 1, data align -ps, return address register;
  // CFA = fp + 2 ps; ra at CFA - ps; fp at CFA - 2 ps
  const cie = [0, 0, 0, 0, 1, 0, 1, x64 ? 0x78 : 0x7c, x64 ? 16 : 8,
    0x0c, x64 ? 6 : 5, 2 * ps, 0x80 | (x64 ? 16 : 8), 1, 0x80 | (x64 ? 6 : 5), 2];
  while ((cie.length + 4) % ps !== 0) cie.push(0);  // DW_CFA_nop
  const fdeBody = 4 + 2 * ps;
  const total = 4 + cie.length + 4 + fdeBody + 4;
  const buf = Memory.alloc(total);
  const start = cm.__start_text, end = cm.__stop_text;
  buf.writeU32(cie.length);
  buf.add(4).writeByteArray(cie);
  const fde = buf.add(4 + cie.length);
  fde.writeU32(fdeBody);
  fde.add(4).writeU32(4 + cie.length + 4);  // back from this field to the CIE
  fde.add(8).writePointer(start);
  fde.add(8 + ps).writePointer(ptr(end.sub(start).toString()));
  fde.add(4 + fdeBody).writeU32(0);  // end of the list
  new NativeFunction(reg, 'void', ['pointer'])(buf);
  unwind = { frame: buf, deregister: new NativeFunction(dereg, 'pointer', ['pointer']) };
  return 'registered';
}

function deregisterUnwindInfo() {
  if (unwind === null) return;
  try {
    unwind.deregister(unwind.frame);
  } catch (e) {
    // nothing to do about it while unloading
  }
  unwind = null;
}

/* ------------------------------------------------------------------ sampling */

// NV_EXP_N quantiles of an exponential distribution of mean `mean` bytes (the countdown to the
// next sampled call), at the midpoints of equal-probability bins, scaled so that their mean is
// exactly `mean`; each at least 1. The C picks one with random bits (no floating point there).
const EXP_N = 4096;
let expTable = null;
function expQuantiles(mean) {
  const q = [];
  let sum = 0;
  for (let i = 0; i < EXP_N; i++) {
    const v = -Math.log((i + 0.5) / EXP_N);
    q.push(v);
    sum += v;
  }
  const scale = mean * EXP_N / sum;
  const t = Memory.alloc(EXP_N * Process.pointerSize);
  for (let i = 0; i < EXP_N; i++) {
    const v = Math.max(1, Math.round(q[i] * scale));
    t.add(i * Process.pointerSize).writePointer(ptr(v.toString()));
  }
  return t;
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

  st = Memory.alloc(STATE_BYTES);
  const nslots = planInstances(profile);
  planSlots = nslots;
  origTable = Memory.alloc(Math.max(1, nslots) * Process.pointerSize);
  const ringBytes = slots * SLOT_SIZE;
  let why = cfg.transport ? null : 'not asked for';
  if (cfg.transport) {
    let m;
    try {
      m = openMapping(cfg.transport, slots);
    } catch (e) {
      m = e.message;
    }
    if (typeof m === 'string') {
      why = m;
    } else {
      shared = m.base;
      transport = { kind: 'shm', detail: cfg.transport.path || cfg.transport.name, unmap: m.unmap };
    }
  }
  if (shared === null) {
    shared = allocRing(slots);
    transport = { kind: 'messages', detail: why, unmap: null };
  }
  ring = shared.add(HEADER_BYTES);
  shared.add(SH.onFull).writeU32(cfg.on_full === 'drop' ? 0 : 1);
  shared.add(SH.maxWaitUs).writeU32(Math.min(0xffffffff, Math.round((cfg.max_wait_ms ?? 1000) * 1000)));
  maxRecs = Math.max(1, Math.floor(cfg.max_batch_bytes / RECORD_SIZE));
  ringSlots = slots;
  if (transport.kind === 'messages') outBuf = Memory.alloc(maxRecs * RECORD_SIZE);

  const symbols = { nv_state: st, nv_shared: shared, nv_orig: origTable };
  if (platform === 'windows') {
    const k32 = Process.getModuleByName('kernel32.dll');
    for (const f of ['GetCurrentThreadId', 'SwitchToThread', 'Sleep']) symbols[f] = k32.getExportByName(f);
  } else {
    for (const f of ['syscall', 'sched_yield', 'usleep']) symbols[f] = Module.getGlobalExportByName(f);
  }
  const sampleBytes = cfg.sample_bytes || 0;
  const opt = { wrappers: profile.hooks.some(h => h.role === 'wrapper'), sampling: sampleBytes > 0 };
  const source = buildSource(profile, arch, platform, cfg.defines || [], opt);
  cm = new CModule(source, symbols);

  const stateSize = new NativeFunction(cm.nv_state_size, 'size_t', [])();
  if (Number(stateSize) > STATE_BYTES) throw new Error(`NvState is ${stateSize} bytes`);
  const sharedSize = new NativeFunction(cm.nv_shared_size, 'size_t', [])();
  if (Number(sharedSize) > HEADER_BYTES) throw new Error(`NvShared is ${sharedSize} bytes`);
  new NativeFunction(cm.nv_configure, 'void', ['size_t', 'pointer', 'uint64'])(
      slots, ring, uint64(cfg.large_alloc_bytes));
  new NativeFunction(cm.nv_start, 'void', [])();
  // exceptions through a wrapper's frame (Linux; before any hook goes in)
  const unwindNote = opt.wrappers ? registerUnwindInfo() : '';
  const setOff = new NativeFunction(cm.nv_set_tls_off, 'void', ['size_t', 'size_t', 'pointer']);
  const tls = findTlsSlot(platform, 0);
  if (tls !== null) setOff(0, tls.off, tls.seq);
  // the wrapper slot and the countdown: the same direct path when found, else gum calls
  const extra = [];
  if (opt.wrappers || opt.sampling) {
    for (const k of [1, 2]) {
      const t = findTlsSlot(platform, k);
      if (t !== null) setOff(k, t.off, t.seq);
      extra.push(t !== null ? 'direct' : 'gum calls');
    }
  }
  if (opt.sampling) {
    expTable = expQuantiles(sampleBytes);
    const seed = uint64((Math.floor(Math.random() * 0x100000000)).toString()).shl(32)
      .or(uint64(Math.floor(Math.random() * 0x100000000).toString()));
    new NativeFunction(cm.nv_configure_sampling, 'void', ['pointer', 'uint64', 'size_t'])(
        expTable, seed, Process.id);
  }
  fnDrain = new NativeFunction(cm.nv_drain, 'uint', ['pointer', 'uint']);
  fnFinish = new NativeFunction(cm.nv_finish, 'uint', ['pointer', 'uint']);
  fnNextNewTid = new NativeFunction(cm.nv_next_new_tid, 'size_t', []);
  fnIgnoreLate = new NativeFunction(cm.nv_ignore_late_tid, 'void', ['size_t']);
  fnSuspend = new NativeFunction(cm.nv_suspend_current_thread, 'size_t', []);
  fnResume = new NativeFunction(cm.nv_resume_current_thread, 'void', ['size_t']);
  fnNowUs = new NativeFunction(cm.nv_now_us, 'uint64', []);
  fnMark = new NativeFunction(cm.nv_mark, 'size_t', ['size_t']);
  fnClassified = new NativeFunction(cm.nv_classified, 'void', []);
  fnSetClosing = new NativeFunction(cm.nv_set_closing, 'void', []);
  fnSharedWord = new NativeFunction(cm.nv_shared_word, 'size_t', ['size_t']);
  countersPtr = new NativeFunction(cm.nv_counters, 'pointer', [])();
  const ignoreTid = new NativeFunction(cm.nv_ignore_tid, 'void', ['size_t']);
  const fridaTids = fridaThreadIds();
  for (const tid of fridaTids.concat(cfg.ignore_tids || [])) ignoreTid(tid);
  new NativeFunction(cm.nv_ignore_current_thread, 'void', [])();
  const wall0 = Number(new NativeFunction(cm.nv_wall0, 'int64', [])());
  const mono0 = Number(new NativeFunction(cm.nv_mono0, 'int64', [])());

  hooks = profile.hooks.map((spec, index) => ({
    index, spec, inst: [], ok: false, detail: '', pending: false, ninst: spec.ninst,
    re: spec.module !== undefined && spec.module !== '' ? globToRegExp(spec.module) : null,
  }));

  // size-query roles are not recorded: nothing to hook
  for (const e of hooks) {
    if (e.spec.role === 'size') {
      e.ok = true;
      e.detail = 'size query: nothing to record';
      sendHook(e, true, e.detail);
    }
  }
  // absolute addresses: must be code inside a loaded module
  const fixed = [];
  for (const e of hooks) {
    if (e.re !== null || e.spec.role === 'size') continue;
    const addr = ptr(e.spec.address);
    const mod = Process.findModuleByAddress(addr);
    if (mod === null) fail(e, `address ${addr} is not inside any loaded module`);
    else fixed.push([e, addr, mod]);
  }
  installAll(fixed);
  moduleObserver = Process.attachModuleObserver({
    onAdded(m) { onAddedHook(m); },
    onRemoved(m) { onModuleRemoved(m); },
  });
  initialLoad = false;
  setupWatch();
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
    monotonic_zero_us: mono0,
    now_us: clockNowUs(),
    transport: { kind: transport.kind, detail: transport.detail },
    modules: Array.from(modules.values()),
    hooks: hooks.map(e => ({
      index: e.index, name: e.spec.name, ok: e.ok, detail: e.detail,
      module: e.inst.map(i => i.module).join(','), pending: e.pending === true,
      instances: e.inst.map(i => ({ module: i.module, address: Number(i.address), detail: i.detail })),
    })),
    ring_bytes: ringBytes,
    agent_bytes: STATE_BYTES + HEADER_BYTES + ringBytes + (outBuf !== null ? maxRecs * RECORD_SIZE : 0),
    thread_state: (tls !== null ? `direct TLS slot (thread pointer + 0x${tls.off.toString(16)})`
      : 'gum TLS calls') + (extra.length ? `; wrapper slot and sample countdown: ${extra.join(', ')}` : ''),
    wrappers: opt.wrappers,
    unwind_info: unwindNote,
    sample_bytes: sampleBytes,
    footprint: ownFootprint(transport.kind === 'shm' ? shared : null,
                            HEADER_BYTES + ringSlots * SLOT_SIZE),
  };
}
let initialLoad = true;

/* ------------------------------------------------------------------ footprint
 * The monitor's own share of the target's address space, once at the end of init (docs/agent.md,
 * "Footprint"): every region Frida cloaks from the process (its agent library, its heaps, our
 * state and CModule code) and the view of the host's shared ring (`sharedBase`, not cloaked),
 * committed and reserved. Thread stacks of Frida's threads are not cloaked and not counted
 * (about 1 MiB each on Windows). null where it cannot be measured.
 */
function ownFootprint(sharedBase, sharedBytes) {
  try {
    if (typeof Cloak === 'undefined') return null;
    const regions = Process.platform === 'windows' ? windowsRegions()
      : Process.platform === 'linux' ? linuxRegions() : null;
    if (regions === null) return null;
    const inShared = (b) => sharedBase !== null && b.compare(sharedBase) >= 0 &&
      b.compare(sharedBase.add(sharedBytes)) < 0;
    let committed = 0, reserved = 0, n = 0;
    for (const r of regions) {
      if (!Cloak.hasRangeContaining(r.base) && !inShared(r.base)) continue;
      if (r.reserved) reserved += r.size; else committed += r.size;
      n++;
    }
    return { committed, reserved, regions: n };
  } catch (e) {
    return null;
  }
}

// {base, size, reserved} of every allocated region, by VirtualQuery (MEMORY_BASIC_INFORMATION).
function windowsRegions() {
  const k32 = Process.getModuleByName('kernel32.dll');
  const vq = new NativeFunction(k32.getExportByName('VirtualQuery'), 'size_t',
                                ['pointer', 'pointer', 'size_t']);
  const ps = Process.pointerSize;
  const mbi = Memory.alloc(64);
  const offSize = ps === 4 ? 12 : 24, offState = ps === 4 ? 16 : 32;
  const out = [];
  let addr = ptr(0x10000);
  for (let i = 0; i < 1000000; i++) {
    if (vq(addr, mbi, 64).toNumber() === 0) break;
    const base = mbi.readPointer();
    const size = ps === 4 ? mbi.add(offSize).readU32() : Number(mbi.add(offSize).readU64());
    const state = mbi.add(offState).readU32();
    if (size <= 0) break;
    if (state !== 0x10000) out.push({ base, size, reserved: state === 0x2000 });  // not MEM_FREE
    addr = base.add(size);
  }
  return out;
}

// The same from /proc/self/maps; a no-access mapping counts as reserved.
function linuxRegions() {
  const out = [];
  for (const line of File.readAllText('/proc/self/maps').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4})/.exec(line);
    if (m === null) continue;
    const base = ptr('0x' + m[1]);
    out.push({ base, size: Number(ptr('0x' + m[2]).sub(base)), reserved: m[3].startsWith('---') });
  }
  return out;
}

function flush() {
  drainAll(true);
  return countersJson();
}

function stop() {
  if (stopped) return stopResult();
  stopped = true;
  if (drainTimer !== null) clearInterval(drainTimer);
  drainTimer = null;
  if (moduleObserver !== null) moduleObserver.detach();
  moduleObserver = null;
  stopWatch();
  checkHooks(false);  // never revert over somebody else's patch
  for (const e of hooks) {
    for (const i of e.inst) if (!i.tampered) revertInstance(e, i);
    e.inst = e.inst.filter(i => i.tampered);
  }
  // Threads that were inside a replacement finish their call and publish (a realloc holds its
  // slot across the original call): give them a moment before the final drain. The host keeps
  // reading meanwhile, so a thread waiting for a slot gets one; then nobody may wait any more.
  Thread.sleep(IN_FLIGHT_GRACE_S);
  fnSetClosing();
  if (transport.kind === 'shm') {
    classifyNewThreads();  // the host's final read needs every thread classified
  } else {
    drainAll(true);
  }
  return stopResult();
}

// `left_hooked`: hooks whose entry point somebody patched after us. They stay registered with
// Gum, which would write the original prologue back when the script unloads: the host keeps
// the script loaded (eternalize) instead.
function stopResult() {
  const r = countersJson();
  r.left_hooked = tamperedNames();
  r.late_frida_tids = lateTids;
  return r;
}

function snapshot() {
  return countersJson();
}

// Frida calls this right before the script is unloaded: when the target exits, and also when
// the host went away without stop(). The CModule (our replacements' code) is freed after it:
// revert every hook first, then give threads that are inside a replacement (mostly inside the
// original call) time to return through it, or they would return into freed memory.
function dispose() {
  if (drainTimer !== null) clearInterval(drainTimer);
  drainTimer = null;
  // the host may be gone: a thread waiting for a slot gives up now (its record is counted
  // dropped), before our code goes away
  if (fnSetClosing !== null) fnSetClosing();
  let any = false;
  stopWatch();
  checkHooks(false);
  for (const e of hooks) {
    for (const i of e.inst) {
      if (i.tampered) {
        unhookUnder(e, i);
      } else {
        revertInstance(e, i);
      }
      any = true;
    }
    e.inst = [];
  }
  if (any) Thread.sleep(IN_FLIGHT_GRACE_S);
  deregisterUnwindInfo();  // our code goes away with us
  if (!stopped && cm !== null && transport.kind === 'messages') {
    // the target is exiting (or the host unloads us without stop()): send what the ring holds
    stopped = true;
    try {
      drainAll(true);
    } catch (e) {
      // the connection may be gone already
    }
  }
  // every hook is off and in-flight calls had their grace: the mapping goes with us (the
  // host's side goes with its process); an eternalized script is never disposed and keeps it
  if (transport !== null && transport.unmap !== null) {
    try {
      transport.unmap();
    } catch (e) {
      // nothing to do about it while unloading
    }
    transport.unmap = null;
  }
}

// Unloading without eternalize (the host died, the target exits): Gum would restore the original
// prologue over the foreign patch for good. Revert, then put the foreign bytes straight back:
// the original code is exposed for microseconds instead of forever.
function unhookUnder(e, inst) {
  try {
    const n = inst.ours.length;
    const foreign = inst.patchAt.readByteArray(n);
    Interceptor.revert(inst.address);
    Interceptor.flush();
    Memory.patchCode(inst.patchAt, n, code => code.writeByteArray(foreign));
  } catch (err) {
    send({ type: 'agent-error', ts_us: clockNowUs(), message: `unhook ${e.spec.name}: ${err.message}` });
  }
}

// Tests: make a target thread look like a thread Frida started after init (Frida cloaks its own).
function cloakThread(tid) {
  Cloak.addThread(tid);
}

// Memory the compiled hot path refers to outside the CModule's own mapping and our allocations
// (test support, Linux: /proc/self/maps). TinyCC can place constants where Frida does not map
// them (see hotpath.c); a reference there reads foreign memory and faults once it is unmapped.
function foreignCodeRefs() {
  const f = BigInt(cm.nv_drain.toString());
  let lo = null, hi = null;
  for (const line of File.readAllText('/proc/self/maps').split('\n')) {
    const r = /^([0-9a-f]+)-([0-9a-f]+)/.exec(line);
    if (r !== null && BigInt('0x' + r[1]) <= f && f < BigInt('0x' + r[2])) {
      lo = ptr('0x' + r[1]);
      hi = ptr('0x' + r[2]);
    }
  }
  if (lo === null) throw new Error('the CModule is not in /proc/self/maps');
  const ours = [[lo, hi], [st, st.add(STATE_BYTES)], [shared, shared.add(HEADER_BYTES)],
    [origTable, origTable.add(Math.max(1, planSlots) * Process.pointerSize)]];
  const inside = (t) => ours.some(([a, b]) => t.compare(a) >= 0 && t.compare(b) < 0);
  const bad = [];
  let n = 0;
  // TinyCC's layout symbols bound the code: [__start_text, __stop_text)
  const textEnd = cm.__stop_text;
  for (let a = cm.__start_text; a.compare(textEnd) < 0; n++) {
    const ins = Instruction.parse(a);
    for (const op of ins.operands) {
      if (op.type !== 'mem') continue;
      const m = op.value;
      if (m.segment !== undefined) continue;  // fs:/gs: thread block reads
      let t = null;
      if (m.base === 'rip') t = ins.next.add(m.disp);
      else if (m.base === undefined && m.index === undefined) t = ptr(m.disp >>> 0);
      if (t !== null && !inside(t)) bad.push(`+0x${a.sub(lo).toString(16)} ${ins} -> ${t}`);
    }
    a = ins.next;
  }
  return { instructions: n, code_bytes: Number(hi.sub(lo)), foreign: bad };
}

// Before init: what the host needs to lay out the shared ring for us.
function where() {
  return { pointer_size: Process.pointerSize, arch: Process.arch, platform: Process.platform };
}

rpc.exports = { where, init, flush, stop, snapshot, dispose, cloakThread, foreignCodeRefs };

// ---- Function names for call sites (issue 11; docs/symbols.md) -------------------------------
// symbolize(['0x...', ...]) -> [[module | null, function | null, offset | null], ...], one entry
// per address, in order. Called by the host in bulk, off the hot path, a bounded chunk at a time.
// Per module, a table of its function symbols sorted by address is built once:
// - Linux: Module.enumerateSymbols (ELF .symtab/.dynsym, with sizes);
// - Windows: the PE's exports (Module.enumerateExports: Frida reads the export directory in
//   memory, no dbghelp), and dbghelp's SymEnumSymbols (a PDB's functions, with sizes) only for
//   a module with a .pdb next to it: dbghelp maps symbol data into the target's address space
//   (~136 MiB of a 32-bit game's under Wine when every module's symbols were loaded), so it is
//   never touched otherwise, and is told to load symbols per module on demand
//   (SYMOPT_DEFERRED_LOADS) before Frida first initialises it.
// A symbol with a size names only the addresses inside it (exact); one without a size (a PE
// export) names the addresses up to the next symbol (dbghelp's own rule: the nearest preceding
// one). Where a Linux module has no table at all, DebugSymbol.fromAddress is asked; its `0x...`
// placeholders mean no name.
const SYM_MAX_PER_CALL = 20000;   // the host chunks larger requests
const SYM_MAX_MODULE_SYMBOLS = 2000000;
const symTables = new Map();      // module base + path -> {starts: [], sizes: [], names: []}
let symModules = null;            // ModuleMap of the target's modules, refreshed per call
let symDbghelpReady = false;      // Windows: dbghelp loaded and set to deferred loads

function fileExists(path) {
  try {
    const f = new File(path, 'rb');
    f.close();
    return true;
  } catch (e) {
    return false;
  }
}

// Windows: load dbghelp.dll ourselves (Frida uses the process's copy when there is one) and
// turn on deferred loads before Frida's SymInitialize(invade = TRUE) would load every module.
function prepareDbghelp() {
  if (symDbghelpReady) return;
  symDbghelpReady = true;
  try {
    const m = Module.load('dbghelp.dll');
    const abi = Process.pointerSize === 4 ? 'stdcall' : 'default';  // WINAPI
    const get = new NativeFunction(m.getExportByName('SymGetOptions'), 'uint32', [], abi);
    const set = new NativeFunction(m.getExportByName('SymSetOptions'), 'uint32', ['uint32'], abi);
    set(get() | 0x4 | 0x2);  // SYMOPT_DEFERRED_LOADS | SYMOPT_UNDNAME
  } catch (e) { /* Frida falls back to its own copy, with its defaults */ }
}

function symTable(mod) {
  const key = mod.base.toString() + '|' + mod.path;
  let t = symTables.get(key);
  if (t !== undefined) return t;
  const windows = Process.platform === 'windows';
  const lo = mod.base, hi = mod.base.add(mod.size);
  const rows = [];
  const add = (name, address, size) => {
    if (!name || rows.length >= SYM_MAX_MODULE_SYMBOLS) return;
    if (address.compare(lo) < 0 || address.compare(hi) >= 0) return;
    // size 0 or 1: no extent known (dbghelp gives PE exports size 0; Wine's dbghelp gives 1)
    rows.push([Number(address.sub(lo)), size > 1 ? size : 0, name]);
  };
  const pdb = windows && fileExists(mod.path.replace(/\.[^.\\/]*$/, '') + '.pdb');
  if (!windows || pdb) {
    if (pdb) {
      prepareDbghelp();
      try { DebugSymbol.load(mod.path); } catch (e) { /* dbghelp may know it already */ }
    }
    try {
      for (const s of mod.enumerateSymbols()) {
        if (s.type === 'function') add(s.name, s.address, s.size || 0);
      }
    } catch (e) { /* not supported for this module */ }
  }
  if (rows.length === 0) {
    try {
      for (const x of mod.enumerateExports()) if (x.type === 'function') add(x.name, x.address, 0);
    } catch (e) { /* none */ }
  }
  // sized symbols first at equal starts (aliases: the sized one names the code)
  rows.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
  t = { starts: rows.map(r => r[0]), sizes: rows.map(r => r[1]), names: rows.map(r => r[2]),
        debugSymbol: !windows };
  symTables.set(key, t);
  return t;
}

function symLookup(t, off) {
  const s = t.starts;
  let lo = 0, hi = s.length;  // the last start <= off
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (s[mid] <= off) lo = mid + 1; else hi = mid;
  }
  // a sized symbol containing off, among those starting at or before it (nested or aliased
  // symbols: the nearest start first; a few steps back at most)
  for (let i = lo - 1, steps = 0; i >= 0 && steps < 8; i--, steps++) {
    if (t.sizes[i] > 0 && off < s[i] + t.sizes[i]) return [t.names[i], off - s[i]];
    if (t.sizes[i] === 0 && steps === 0) return [t.names[i], off - s[i]];
  }
  return null;
}

function symbolize(addresses) {
  if (!Array.isArray(addresses)) throw new Error('symbolize: expected an array of addresses');
  if (addresses.length > SYM_MAX_PER_CALL) {
    throw new Error(`symbolize: at most ${SYM_MAX_PER_CALL} addresses per call`);
  }
  // One module list per call (a ModuleMap: a binary search per address; Process
  // .findModuleByAddress walks the modules each time, ~0.2 ms an address under Wine)
  if (symModules === null) symModules = new ModuleMap(); else symModules.update();
  const out = [];
  for (const a of addresses) {
    let p;
    try { p = ptr(a); } catch (e) { out.push([null, null, null]); continue; }
    const mod = symModules.find(p);
    if (mod === null) { out.push([null, null, null]); continue; }
    const t = symTable(mod);
    const off = Number(p.sub(mod.base));
    let hit = t.starts.length ? symLookup(t, off) : null;
    if (hit === null && t.starts.length === 0 && t.debugSymbol) {
      try {
        const d = DebugSymbol.fromAddress(p);
        if (d.name && !/^0x[0-9a-f]+$/i.test(d.name)) hit = [d.name, null];
      } catch (e) { /* no symbol */ }
    }
    out.push(hit === null ? [mod.name, null, null] : [mod.name, hit[0], hit[1]]);
  }
  return out;
}

rpc.exports.symbolize = symbolize;
