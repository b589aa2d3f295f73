"""nvse-monitor: a Frida-based allocation monitor for Fallout New Vegas and NVSE plugins."""

import os
import sys

__version__ = "0.2.0"
# Fixed per release so that replaying a recording gives byte-identical files.
BUILD_DATE = "Nov 25 2026 00:00:00"
NAME = "nvse-monitor"


def _numpy_without_blas_threads() -> None:
    """Import numpy with one OpenBLAS thread. We make no BLAS calls, and OpenBLAS's worker
    threads busy-wait for a while after they start: ~0.1 s of CPU at each start-up, taken from
    the target and the reader on a 2-core machine. The variable is removed again at once, so
    the programs we spawn get the user's environment unchanged."""
    if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


_numpy_without_blas_threads()
