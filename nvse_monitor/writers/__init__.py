"""Writers of the four monitoring files and the address-space CSV: one module per file, plus
file primitives.

- log.LogWriter      `<prefix>_rpmalloc.log`      buffered lines
- json.JsonWriter    `<prefix>_stats.json`        atomic rewrite per snapshot
- csv.CsvWriter      `<prefix>_performance.csv`   buffered rows
- status.StatusWriter `<prefix>_status.txt`       atomic rewrite per snapshot
- addrspace.AddrSpaceWriter `<prefix>_addrspace.csv` buffered rows (32-bit targets only)
- files.OutputFiles  all of them together, with write-failure bookkeeping
"""

from .files import (
    DEFAULT_PREFIX,
    FileLimits,
    FilePaths,
    OutputDirError,
    OutputFiles,
    WriteFailure,
    check_prefix,
)

__all__ = ["DEFAULT_PREFIX", "FileLimits", "FilePaths", "OutputDirError", "OutputFiles",
           "WriteFailure", "check_prefix"]
