"""Reliability of the output files (issue 5): size caps with rotation, a reader process that
never sees a partial file, default permissions, and no path outside the output directory.
Offline: no Frida needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from nvse_monitor.cli import main
from nvse_monitor.outputs.csv import HEADER
from nvse_monitor.outputs.fileio import AppendFile
from nvse_monitor.outputs.files import FileLimits, FilePaths, OutputDirError
from nvse_monitor.outputs.pipeline import replay
from nvse_monitor.stream.recording import open_recording, write_recording
from nvse_monitor.stream.synthetic import generate

MIXED = REPO / "fixtures" / "synthetic-mixed.nvmrec"


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rotated_chain(path: Path) -> list[Path]:
    """path.N ... path.1, path: oldest first."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return [path.with_name(f"{path.name}.{k}") for k in range(n - 1, 0, -1)] + [path]


# ---- rotation ---------------------------------------------------------------------------------


def test_append_file_rotation_is_independent_of_flush_boundaries(tmp_path):
    """The same lines flushed in different groupings give the same files: rotation points
    depend only on the bytes, so a live session and its replay rotate alike."""
    lines = [f"line {i} " + "x" * (i * 7 % 50) + "\n" for i in range(400)]
    results = []
    for name, group in (("one", 400), ("few", 37), ("each", 1)):
        d = tmp_path / name
        d.mkdir()
        f = AppendFile(d / "a.log", max_bytes=1000, backups=100, header="H\n")
        f.truncate("H\n")
        for i in range(0, len(lines), group):
            f.lines.extend(lines[i:i + group])
            f.flush()
        files = rotated_chain(d / "a.log")
        results.append([p.read_bytes() for p in files])
        assert f.rotations == len(files) - 1 > 5
        for p in files:
            data = p.read_bytes()
            assert len(data) <= 1000 and data.startswith(b"H\n") and data.endswith(b"\n")
        # nothing lost, nothing twice, in order
        assert b"".join(x[2:] for x in results[-1]) == "".join(lines).encode()
    assert results[0] == results[1] == results[2]


def test_rotation_keeps_only_n_backups_and_long_lines_whole(tmp_path):
    f = AppendFile(tmp_path / "a.log", max_bytes=100, backups=2)
    f.truncate()
    f.lines.extend(["a" * 60 + "\n", "b" * 250 + "\n", "c" * 60 + "\n", "d" * 60 + "\n"])
    f.flush()
    chain = rotated_chain(tmp_path / "a.log")
    assert [p.name for p in chain] == ["a.log.2", "a.log.1", "a.log"]
    # the oldest file ("a"*60) was dropped; a line longer than the cap goes whole, alone
    assert [p.read_text() for p in chain] == ["b" * 250 + "\n", "c" * 60 + "\n", "d" * 60 + "\n"]
    f.truncate()  # a new session starts afresh: rotated files of the old one go too
    assert rotated_chain(tmp_path / "a.log") == [tmp_path / "a.log"]


def test_replay_with_log_cap_equals_uncapped_log(tmp_path):
    full = replay(MIXED, tmp_path / "full", limits=FileLimits(log_max_bytes=0))
    whole = full.paths.log.read_bytes()
    cap = 1024
    assert len(whole) > 4 * cap  # several rotations
    r = run("replay", MIXED, "-o", tmp_path / "capped", "--log-max-mb", cap / 2**20,
            "--csv-max-mb", cap / 2**20, "--keep-rotated", 100)
    assert r.exit_code == 0, r.output
    paths = FilePaths.of(tmp_path / "capped")
    logs = rotated_chain(paths.log)
    assert len(logs) > 4 and all(p.stat().st_size <= cap for p in logs)
    assert b"".join(p.read_bytes() for p in logs) == whole
    csvs = rotated_chain(paths.csv)
    assert len(csvs) > 1 and all(p.read_text().startswith(HEADER) for p in csvs)
    rows = [x for p in csvs for x in p.read_text().splitlines()[1:]]
    assert rows == full.paths.csv.read_text().splitlines()[1:]
    # JSON and status are not affected by the caps
    assert paths.json.read_bytes() == full.paths.json.read_bytes()


def test_default_log_cap_and_rotation_options_exist():
    limits = FileLimits()
    assert limits.log_max_bytes == 64 << 20 and limits.backups == 3 and limits.csv_max_bytes == 0
    for cmd in ("replay", "attach", "spawn"):
        r = run(cmd, "--help")
        assert "--log-max-mb" in r.output and "--keep-rotated" in r.output, cmd


# ---- a reader process never sees a partial file -------------------------------------------------

READER = r"""
import json, sys, time
from pathlib import Path
js, st, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
title = sys.argv[4] + " RPmalloc Status"
keys = ["Status", "Health", "Uptime", "Memory Usage", "Peak Memory", "Allocations", "Errors",
        "Last Update"]
reads = missing = bad = 0
stamps = set()
while not stop.exists():
    for p in (js, st):
        try:
            text = p.read_text()
        except FileNotFoundError:
            missing += 1
            continue
        reads += 1
        try:
            if p is js:
                doc = json.loads(text)
                assert set(doc) >= {"plugin", "memory_stats", "health", "timestamp", "monitor"}
                stamps.add(doc["timestamp"])
            else:
                lines = text.split("\n")
                assert lines[0] == title and lines[1] == "=" * len(title) and lines[-1] == ""
                assert [x.split(": ", 1)[0] for x in lines[2:-1]] == keys
                int(lines[-2].split(": ", 1)[1])
        except Exception as e:
            bad += 1
            print("BAD", p.name, repr(e), repr(text[:200]), file=sys.stderr)
print(json.dumps({"reads": reads, "missing": missing, "bad": bad, "stamps": len(stamps)}))
"""


WRITER = r"""
import sys
from nvse_monitor.outputs.pipeline import Pipeline
from nvse_monitor.stream.recording import open_recording
n = 0
with open_recording(sys.argv[1]) as rec:
    pipe = Pipeline(rec.meta, sys.argv[2])
    pipe.on_snapshot = lambda _s: None
    pipe.start()
    for msg in rec:
        pipe.feed(msg)
        n += 1
    pipe.finish()
print(n)
"""


@pytest.fixture(scope="module")
def big_recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.nvmrec"
    meta, msgs = generate(1_500_000, seed=5)
    write_recording(path, meta, msgs)
    return path


def test_reader_process_never_sees_partial_files(big_recording, tmp_path):
    out, stop = tmp_path / "out", tmp_path / "stop"
    paths = FilePaths.of(out)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, paths.json, paths.status, stop, "MemoryPoolNVSE"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        writes = 0
        t0 = time.monotonic()
        # Another process replays the recording message by message (as a live session feeds
        # it: a snapshot every 10,000 allocations, ~150 rewrites of both files per run) while
        # the reader polls. (The CLI's replay feeds runs of batches at once and writes only the
        # last of their snapshots: too few rewrites to race with.)
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", WRITER, big_recording, out],
                               capture_output=True, text=True, cwd=REPO)
            assert r.returncode == 0, r.stderr
            writes += int(r.stdout)
        elapsed = time.monotonic() - t0
    finally:
        stop.touch()
        stdout, stderr = reader.communicate(timeout=30)
    res = json.loads(stdout)
    print(f"\nreader: {res} in {elapsed:.1f} s, {writes} messages fed")
    assert res["bad"] == 0, stderr
    assert res["reads"] >= 2000  # thousands of reads...
    assert res["stamps"] >= 40  # ...while the files were being rewritten
    assert not list(out.glob(".*.tmp"))  # no temp file left behind


# ---- permissions and paths ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_users_default_permissions(tmp_path, umask):
    out = tmp_path / "out"
    code = (f"import os, sys; os.umask({umask:#o}); from nvse_monitor.cli import main; "
            f"sys.argv = ['nvse-monitor', 'replay', {str(MIXED)!r}, '-o', {str(out)!r}, "
            "'--log-max-mb', '0.002']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    files = [p for p in out.iterdir()]
    assert len(files) >= 5  # the four + rotated logs
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("prefix", ["../escape", "a/b", "/abs", "..", "", "a\\b"])
def test_prefix_with_a_path_is_refused(tmp_path, prefix):
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["replay", str(MIXED), "-o", str(out), "--prefix", prefix])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit | None)
    assert "bad file prefix" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere
    with pytest.raises(OutputDirError):
        replay(MIXED, out, prefix)


def test_live_prefix_refused_before_touching_anything(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "attach", "1", "--out", tmp_path,
                        "--prefix", "../x"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "nvse-monitor: error: bad file prefix '../x': must be a plain name (no '/', '\\' or NUL)"]


def test_paths_in_a_recording_are_never_written_to(tmp_path):
    """meta.target / profile / module paths are data: the files are named by the prefix only."""
    with open_recording(MIXED) as r:
        meta, msgs = r.meta, list(r)
    meta.target = "../../../evil/target"
    meta.profile = "/etc/evil.toml"
    rec = tmp_path / "evil.nvmrec"
    write_recording(rec, meta, msgs)
    work = tmp_path / "work"
    out = work / "out"
    before = set(tmp_path.rglob("*"))
    res = replay(rec, out)
    assert res.error is None
    created = set(tmp_path.rglob("*")) - before
    assert created >= {work, out, *FilePaths.of(out).all()}
    assert all(p == work or p.is_relative_to(out) for p in created), created
    doc = json.loads(FilePaths.of(out).json.read_text())
    assert doc["monitor"]["target"] == "../../../evil/target"  # reported as text, nothing more


def test_out_dir_is_created_when_missing(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert run("replay", MIXED, "-o", out).exit_code == 0
    assert all(p.exists() for p in FilePaths.of(out).all())
    assert os.access(out, os.W_OK)
