"""The host's compiled per-record loops (kernels.c), loaded with ctypes.

Built with the package where a C compiler is at hand (setup.py: an optional extension, so an
install without one still works) or cross-built for Windows (packaging/build_native.sh). Every
kernel has a numpy twin that gives the same results: `KERNELS` is None when the library is
missing, does not load, has another ABI, or NVSE_MONITOR_NATIVE=0 is set; callers then take
their numpy path. `STATUS` says which, for the log's banner and `nvse-monitor --version`.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

ABI = 3  # kernels.c NVSM_ABI: a library of another ABI is not used
_HERE = Path(__file__).resolve().parent
_NAMES = ["_kernels" + s for s in importlib.machinery.EXTENSION_SUFFIXES] + [
    "_kernels.dll", "_kernels.so", "_kernels.dylib"]

_P = ctypes.c_void_p
_U64 = ctypes.c_uint64
_U32 = ctypes.c_uint32


def _declare(lib: ctypes.CDLL) -> None:
    """The kernels' C signatures (kernels.c): ctypes converts and checks the arguments by them."""
    lib.nvsm_take_checked.argtypes = [_P, _U64, _U32, _U64, _U64, _U64, _U64, _P, _P, _P,
                                      _U64, _P, _P, _P, _U32, _U32, _P, _U32, _U32, _P, _P, _P]
    lib.nvsm_take_checked.restype = _U64
    lib.nvsm_expand.argtypes = [_P, _U64, _U64] + [_P] * 18
    lib.nvsm_expand.restype = None
    lib.nvsm_track.argtypes = [_U64, _U64] + [_P] * 10 + [_U64, _P, _U64, _U64] + [_P] * 6 \
        + [_U64, _P, _P, _P]
    lib.nvsm_track.restype = _U64
    lib.nvsm_sums.argtypes = [_U64] + [_P] * 13
    lib.nvsm_sums.restype = None
    lib.nvsm_span.argtypes = [_U64, _U64] + [_P] * 10 + [_U64] + [_P] * 6 + [_U64]
    lib.nvsm_span.restype = None
    lib.nvsm_modmap.argtypes = [_P, _U64, _P, _P, _U32, _P, _P]
    lib.nvsm_modmap.restype = _U64


def _library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("NVSE_MONITOR_NATIVE", "1") == "0":
        return None, "numpy (NVSE_MONITOR_NATIVE=0)"
    path = next((_HERE / n for n in _NAMES if (_HERE / n).is_file()), None)
    if path is None:
        return None, "numpy (no compiled kernels in this install)"
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.nvsm_abi()
        if abi == ABI:
            _declare(lib)
    except (OSError, AttributeError) as e:  # not loadable, or a function missing
        return None, f"numpy ({path.name} does not load: {e})"
    if abi != ABI:
        return None, f"numpy ({path.name} has ABI {abi}, this version needs {ABI})"
    return lib, f"native ({path.name})"


KERNELS, STATUS = _library()
