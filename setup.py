"""The compiled per-record loops (nvse_monitor/native/kernels.c), built as an optional extension:
without a C compiler the install still succeeds and the numpy paths run. The library is loaded
with ctypes, not imported, so it has no Python API. NVSE_MONITOR_NO_NATIVE=1 builds a pure wheel
(the Windows lane cross-builds the DLL apart: packaging/build_native.sh)."""

import os

from setuptools import Extension, setup

native = os.environ.get("NVSE_MONITOR_NO_NATIVE", "0") != "1"
args = [] if os.name == "nt" else ["-O2", "-fvisibility=hidden", "-ffp-contract=off"]
setup(ext_modules=[Extension("nvse_monitor.native._kernels", ["nvse_monitor/native/kernels.c"],
                             extra_compile_args=args, optional=True)] if native else [])
