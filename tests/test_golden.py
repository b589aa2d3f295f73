"""Golden tests: replaying each fixtures/*.nvmrec gives byte-identical files to
fixtures/expected/<stem>/, and those files follow the spec's structure.

Regenerate after an intended change of output (then review the diff before committing):
    python tests/test_golden.py
or  NVSE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
A damaged case (CUT_FIXTURES: a fixture cut short at test time) also has `error.txt`: the
replay's one-line error (without the directory part of the path).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from nvse_monitor.outputs.files import FilePaths
from nvse_monitor.outputs.pipeline import replay

pytestmark = pytest.mark.usefixtures("kernels")  # compiled and numpy paths

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = ROOT / "fixtures"
EXPECTED_DIR = FIXTURES_DIR / "expected"
FIXTURES = sorted(FIXTURES_DIR.glob("*.nvmrec"))
# Damaged variants made from a fixture at test time: name -> (fixture stem, bytes kept / size).
CUT_FIXTURES = {"synthetic-mixed-cut": ("synthetic-mixed", 0.6)}
UPDATE = os.environ.get("NVSE_UPDATE_GOLDEN") == "1"
ERROR_FILE = "error.txt"

# Every key of the spec's JSON, in the spec's order, with its JSON type.
SPEC_JSON_KEYS: dict[str, object] = {
    "plugin": {"name": str, "version": str, "build_date": str, "status": str,
               "uptime_seconds": float, "is_healthy": bool},
    "memory_stats": {"total_allocations": int, "total_frees": int, "current_allocations": int,
                     "peak_allocations": int, "total_bytes_allocated": int,
                     "total_bytes_freed": int, "current_bytes_allocated": int,
                     "peak_bytes_allocated": int, "allocation_failures": int,
                     "average_allocation_size": float},
    "performance": {"allocations_per_second": float, "frees_per_second": float,
                    "memory_usage_mb": float, "peak_memory_usage_mb": float},
    "health": {"error_count": int, "warning_count": int, "critical_count": int,
               "last_error": str, "tracked_allocations": int, "max_tracked_allocations": int},
    "logging": {"debug_logs": int, "info_logs": int, "warning_logs": int, "error_logs": int,
                "critical_logs": int, "performance_logs": int},
    "timestamp": int,
}
STATUS_KEYS = ["Status", "Health", "Uptime", "Memory Usage", "Peak Memory", "Allocations",
               "Errors", "Last Update"]
STATES = {"UNINITIALIZED", "INITIALIZING", "ACTIVE", "DEGRADED", "ERROR", "SHUTDOWN"}


def replay_into(recording: Path, out: Path) -> dict[str, bytes]:
    """The replay's files by name (plus error.txt when the recording is damaged)."""
    result = replay(recording, out, err=io.StringIO())
    paths = [*result.paths.all(), result.leaks]  # the four files and the leak report
    files = {p.name: p.read_bytes() for p in paths}
    if result.error:
        files[ERROR_FILE] = (result.error.replace(str(recording), recording.name) + "\n").encode()
    return files


def cases() -> list[str]:
    return [p.stem for p in FIXTURES] + [n for n, (src, _) in CUT_FIXTURES.items()
                                         if (FIXTURES_DIR / f"{src}.nvmrec").exists()]


def recording_for(case: str, tmp: Path) -> Path:
    if case not in CUT_FIXTURES:
        return FIXTURES_DIR / f"{case}.nvmrec"
    src, keep = CUT_FIXTURES[case]
    data = (FIXTURES_DIR / f"{src}.nvmrec").read_bytes()
    path = tmp / f"{case}.nvmrec"
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def check_type(where: str, value: object, want: object) -> None:
    if want is float:
        assert isinstance(value, float), f"{where}: {value!r} is not a float"
    elif want is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: not an int"
    else:
        assert isinstance(value, want), f"{where}: {value!r} is not {want}"  # type: ignore[arg-type]


def check_spec_structure(files: dict[str, bytes]) -> None:
    paths = FilePaths.of(".")
    doc = json.loads(files[paths.json.name])
    assert list(doc)[: len(SPEC_JSON_KEYS)] == list(SPEC_JSON_KEYS)
    assert list(doc)[len(SPEC_JSON_KEYS):] == ["monitor"]
    for section, keys in SPEC_JSON_KEYS.items():
        if isinstance(keys, dict):
            assert list(doc[section]) == list(keys), section
            for k, t in keys.items():
                check_type(f"{section}.{k}", doc[section][k], t)
        else:
            check_type(section, doc[section], keys)
    assert doc["plugin"]["name"] == "nvse-monitor"
    assert doc["plugin"]["status"].upper() in STATES
    assert isinstance(doc["monitor"], dict)

    status = files[paths.status.name].decode().splitlines()
    assert status[0] == "MemoryPoolNVSE RPmalloc Status" and set(status[1]) == {"="}
    assert [ln.split(": ")[0] for ln in status[2:]] == STATUS_KEYS
    fields = dict(ln.split(": ", 1) for ln in status[2:])
    assert fields["Status"] == doc["plugin"]["status"].upper()
    assert fields["Health"] == ("HEALTHY" if doc["plugin"]["is_healthy"] else "UNHEALTHY")
    assert int(fields["Last Update"]) == doc["timestamp"]
    assert int(fields["Allocations"]) == doc["memory_stats"]["total_allocations"]

    rows = list(csv.reader(io.StringIO(files[paths.csv.name].decode())))
    assert rows[0] == ["timestamp", "allocs_per_sec", "frees_per_sec", "memory_usage",
                       "peak_memory"]
    assert len(rows) >= 2  # at least the final row
    ts = [int(r[0]) for r in rows[1:]]
    assert ts == sorted(ts) and ts[-1] == doc["timestamp"]
    for r in rows[1:]:
        float(r[1]), float(r[2])
        assert 0 <= int(r[3]) <= int(r[4])

    log = files[paths.log.name].decode().splitlines()
    assert log and all(ln.startswith("[") and "] [TID:" in ln for ln in log)
    counts = doc["logging"]
    assert len(log) == sum(counts.values())  # every line counted once in its level


def test_there_are_fixtures_and_expected_outputs():
    assert FIXTURES, "no fixtures/*.nvmrec"
    stems = set(cases())
    have = {d.name for d in EXPECTED_DIR.iterdir()} if EXPECTED_DIR.exists() else set()
    assert have == stems or UPDATE, f"expected missing for {stems - have}, orphans {have - stems}"


@pytest.mark.parametrize("case", cases())
def test_replay_is_byte_identical_to_golden(case, tmp_path):
    recording = recording_for(case, tmp_path)
    files = replay_into(recording, tmp_path / "out")
    expected_dir = EXPECTED_DIR / case
    assert (ERROR_FILE in files) == (case in CUT_FIXTURES)
    if UPDATE:
        write_expected(expected_dir, files)
    check_spec_structure(files)
    expected = {p.name: p.read_bytes() for p in sorted(expected_dir.iterdir())}
    assert sorted(files) == sorted(expected)
    for name, want in expected.items():
        got = files[name]
        if got != want:
            g, w = got.decode().splitlines(), want.decode().splitlines()
            i = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                     min(len(g), len(w)))
            pytest.fail(f"{case}/{name} differs at line {i + 1}:\n"
                        f"  got:      {g[i] if i < len(g) else '<end>'}\n"
                        f"  expected: {w[i] if i < len(w) else '<end>'}\n"
                        "(if intended: python tests/test_golden.py, then review the diff)")


@pytest.mark.parametrize("truth", sorted(FIXTURES_DIR.glob("*.truth.json")),
                         ids=lambda p: p.name.split(".")[0])
def test_real_recordings_golden_json_matches_the_targets_own_count(truth):
    """A real recording's target counted its own calls: the golden JSON agrees."""
    want = json.loads(truth.read_text())
    doc = json.loads((EXPECTED_DIR / truth.name.split(".")[0] / "MemoryPoolNVSE_stats.json")
                     .read_text())
    stats = doc["memory_stats"]
    keys = [k for k in want if k in stats]
    assert len(keys) >= 9
    assert {k: stats[k] for k in keys} == {k: want[k] for k in keys}
    if "untracked_frees" in want:
        assert doc["monitor"]["untracked_frees"] == want["untracked_frees"]


def test_replay_is_deterministic_across_runs_and_time_zones(tmp_path, monkeypatch):
    recording = min(FIXTURES, key=lambda p: p.stat().st_size)
    first = replay_into(recording, tmp_path / "a")
    monkeypatch.setenv("TZ", "Pacific/Chatham")  # +12:45/+13:45: any host TZ leak would show
    time.tzset()
    try:
        second = replay_into(recording, tmp_path / "b")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert first == second


def write_expected(expected_dir: Path, files: dict[str, bytes]) -> None:
    if expected_dir.exists():
        shutil.rmtree(expected_dir)
    expected_dir.mkdir(parents=True)
    for name, data in files.items():
        (expected_dir / name).write_bytes(data)


def main() -> None:
    """Regenerate fixtures/expected/ from fixtures/*.nvmrec."""
    import tempfile

    EXPECTED_DIR.mkdir(exist_ok=True)
    names = cases()
    for d in EXPECTED_DIR.iterdir():
        if d.is_dir() and d.name not in names:
            shutil.rmtree(d)
            print(f"removed {d.relative_to(ROOT)} (no such fixture)")
    for case in names:
        with tempfile.TemporaryDirectory() as tmp:
            files = replay_into(recording_for(case, Path(tmp)), Path(tmp) / "out")
        write_expected(EXPECTED_DIR / case, files)
        print(f"wrote {(EXPECTED_DIR / case).relative_to(ROOT)}/ ({len(files)} files)")


if __name__ == "__main__":
    sys.exit(main())
