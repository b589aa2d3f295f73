"""Caller address -> module index, vectorised, for per-module live bytes.

Modules get a stable index the first time they are seen (meta.modules, then ModuleEvents); an
unloaded module keeps its index (blocks it allocated stay attributed to it). Lookups go through a
direct-mapped cache keyed by the caller address, because a stream has few distinct call sites and
a binary search per event over the map would cost more than the rest of the engine.
"""

from __future__ import annotations

import numpy as np

from .. import native
from ..stream.messages import Module

UNKNOWN = 0xFFFF  # u16 module index for callers outside every known module
_CACHE_BITS = 14
_C = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - _CACHE_BITS)


class ModuleMap:
    def __init__(self, modules: list[Module]) -> None:
        self.modules: list[Module] = []  # by index, every module ever seen
        self._current: dict[int, int] = {}  # base -> index of the modules loaded now
        for m in modules:
            self.add(m)

    def add(self, m: Module) -> int:
        idx = len(self.modules)
        if idx >= UNKNOWN:  # absurd module counts: attribute the rest to "unknown"
            return UNKNOWN
        self.modules.append(m)
        self._current[m.base] = idx
        self._rebuild()
        return idx

    def remove(self, m: Module) -> None:
        if self._current.pop(m.base, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        cur = sorted((self.modules[i].base, i) for i in self._current.values())
        self._bases = np.array([b for b, _ in cur], dtype=np.uint64)
        self._ends = np.array([b + self.modules[i].size for b, i in cur], dtype=np.uint64)
        self._ids = np.array([i for _, i in cur], dtype=np.uint16)
        self._ckeys = np.zeros(1 << _CACHE_BITS, dtype=np.uint64)  # 0 = empty
        self._cvals = np.full(1 << _CACHE_BITS, UNKNOWN, dtype=np.uint16)

    def _slow(self, callers: np.ndarray) -> np.ndarray:
        if not len(self._bases):
            return np.full(len(callers), UNKNOWN, dtype=np.uint16)
        i = np.searchsorted(self._bases, callers, side="right") - 1
        ic = np.maximum(i, 0)
        ok = (i >= 0) & (callers < self._ends[ic])
        return np.where(ok, self._ids[ic], np.uint16(UNKNOWN)).astype(np.uint16)

    def lookup(self, callers: np.ndarray) -> np.ndarray:
        """Module index (u16) of each caller address, UNKNOWN outside every loaded module."""
        if len(callers) < 64:
            return self._slow(callers)
        if native.KERNELS is not None:  # the cache probe compiled (kernels.c nvsm_modmap)
            callers = np.ascontiguousarray(callers, np.uint64)
            out, miss = np.empty(len(callers), np.uint16), np.empty(len(callers), np.int64)
            nm = native.KERNELS.nvsm_modmap(callers.ctypes.data, len(callers),
                                            self._ckeys.ctypes.data, self._cvals.ctypes.data,
                                            int(_SHIFT), out.ctypes.data, miss.ctypes.data)
            miss = miss[:nm]
        else:
            h = ((callers * _C) >> _SHIFT).astype(np.intp)
            out = self._cvals.take(h)  # take: faster than fancy indexing
            miss = np.flatnonzero(self._ckeys.take(h) != callers)
        if len(miss):
            cm = callers[miss]
            vals = self._slow(cm)
            out[miss] = vals
            hm = ((cm * _C) >> _SHIFT).astype(np.intp)
            self._ckeys[hm] = cm  # empty entries (key 0) say UNKNOWN: right for caller 0
            self._cvals[hm] = vals
        return out

    def name(self, idx: int) -> str:
        return "unknown" if idx >= len(self.modules) else self.modules[idx].name
