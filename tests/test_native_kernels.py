"""The compiled per-record loops (nvse_monitor/native) against their numpy twins, piece by piece,
on random input: the same arrays, dtypes included. (The engine's and the reader's tests also run
whole on both paths: the `kernels` fixture in conftest.py, test_ring_reader.py.)"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from nvse_monitor import native
from nvse_monitor.engine import classify
from nvse_monitor.engine.modmap import ModuleMap
from nvse_monitor.stream.events import FLAG_SAMPLED, RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import Module

compiled = pytest.mark.skipif(native.KERNELS is None, reason=native.STATUS)

FIELDS = ("ptr", "etype", "ts", "size", "hook", "caller", "rec", "failed", "rec_ts", "kind",
          "flags")


def records(rng: np.random.Generator, n: int, kinds: list[int]) -> np.ndarray:
    r = np.zeros(n, RECORD_DTYPE)
    r["kind"] = rng.choice(kinds, n)
    r["ptr"] = rng.choice(np.array([0, 16, 32, 48, 2**63], np.uint64), n)
    r["old_ptr"] = rng.choice([0, 16, 32], n)
    r["size"] = rng.choice(np.array([0, 1, 100, 2**64 - 1], np.uint64), n)
    r["ts_us"] = rng.integers(0, 1000, n)
    r["caller"] = rng.integers(0, 2**64, n, dtype=np.uint64)
    r["hook"] = rng.integers(0, 4, n)
    r["flags"] = rng.integers(0, 8, n)
    return r


@compiled
@pytest.mark.parametrize("kinds", [
    [1, 2], [1, 2, 4], [1, 2, 3, 4, 6], [1, 2, 3, 4, 5, 6, 0, 7, 9]])
def test_records_to_events_compiled_equals_numpy(kinds, monkeypatch):
    rng = np.random.default_rng(len(kinds))
    for trial in range(400):
        r = records(rng, int(rng.integers(1, 60)), kinds)
        floor = rng.integers(0, 1000, len(r)).astype(np.uint64) if trial % 2 else None
        now = int(rng.integers(0, 1000))
        a = classify._expand_native(r, now, floor)
        with monkeypatch.context() as m:
            m.setattr(native, "KERNELS", None)
            b = classify.expand_records(r, now, floor)
        for f in FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f
            if x is not None:
                assert np.array_equal(x, y), f
                assert x.dtype == y.dtype or f == "rec", f  # rec: int64 on every Python
        assert (a.unknown, a.last_ts) == (b.unknown, b.last_ts)
        # the STACK records and the other SAMPLED ones, as samples.py finds them
        st, sm = a.picks
        assert np.array_equal(st, np.flatnonzero(r["kind"] == Kind.STACK))
        assert np.array_equal(sm, np.flatnonzero((r["flags"] & FLAG_SAMPLED)
                                                 & (r["kind"] != Kind.STACK)))


@compiled
def test_module_lookup_compiled_equals_numpy(monkeypatch):
    mods = [Module(f"m{i}.so", 0x10000 * (i + 1), 0x8000, f"/m{i}.so") for i in range(5)]
    rng = np.random.default_rng(7)
    maps = [ModuleMap(mods), ModuleMap(mods)]
    for _ in range(50):
        callers = np.concatenate((
            rng.integers(0x10000, 0x60000, 500, dtype=np.uint64),  # inside and between modules
            rng.choice(np.array([0, 0x10000, 0x17FFF, 0x18000, 2**64 - 1], np.uint64), 100)))
        rng.shuffle(callers)
        got = maps[0].lookup(callers)
        with monkeypatch.context() as m:
            m.setattr(native, "KERNELS", None)
            want = maps[1].lookup(callers)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.array_equal(got, maps[1]._slow(callers))  # and both are exact


@pytest.mark.parametrize("source, status", [
    ("int nvsm_abi(void) { return 99; }", "numpy (_kernels.so has ABI 99, this version needs"),
    ("int nvsm_abi(void) { return %d; }", "numpy (_kernels.so does not load: "),  # no kernels
    (None, "numpy (_kernels.so does not load: "),  # not a library at all
])
def test_a_library_that_does_not_fit_leaves_the_numpy_paths(source, status, tmp_path,
                                                            monkeypatch):
    """A stale or broken library (another ABI, missing functions, garbage) is not used, and the
    status line (nvse-monitor --version) says why."""
    lib = tmp_path / "_kernels.so"
    if source is None:
        lib.write_bytes(b"not an ELF file")
    else:
        if shutil.which("gcc") is None:
            pytest.skip("no gcc")
        c = tmp_path / "k.c"
        c.write_text(source.replace("%d", str(native.ABI)))
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(c)], check=True)
    monkeypatch.setattr(native, "_HERE", tmp_path)
    monkeypatch.setattr(native, "_NAMES", ["_kernels.so"])
    kernels, got = native._library()
    assert kernels is None and got.startswith(status), got
