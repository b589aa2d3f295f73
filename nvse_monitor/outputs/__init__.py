"""Outputs: what the engine emits (`rows`) and where it goes (`pipeline` feeds the engine and
hands its output to the writers of the files, one module per file, plus file primitives).

- rows               Output, Snapshot, LogLine, CsvRow...: the engine's output, the writers' input
- pipeline.Pipeline  stream messages -> engine -> files; `replay` for a recording
- log.LogWriter      `<prefix>_rpmalloc.log`      buffered lines
- json.JsonWriter    `<prefix>_stats.json`        atomic rewrite per snapshot
- csv.CsvWriter      `<prefix>_performance.csv`   buffered rows
- status.StatusWriter `<prefix>_status.txt`       atomic rewrite per snapshot
- addrspace.AddrSpaceWriter `<prefix>_addrspace.csv` buffered rows (32-bit targets only)
- files.OutputFiles  all of them together, with write-failure bookkeeping
- fileio             atomic rewrites and size-capped appends
"""
