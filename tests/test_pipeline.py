"""Pipeline routing with a scripted engine (the writers' side of the contract): outputs reach
their files, write failures go back to the engine once per failing spell, finish() is final."""

from __future__ import annotations

import io
import json
import shutil
import threading

import pytest
from test_writers import make_meta, make_snapshot

from nvse_monitor.outputs.files import OutputDirError
from nvse_monitor.outputs.pipeline import Pipeline
from nvse_monitor.outputs.rows import CsvRow, LogLine, Status
from nvse_monitor.stream.messages import AgentError

pytestmark = pytest.mark.usefixtures("kernels")  # compiled and numpy paths


class ScriptedEngine:
    """Emits a fixed, simple reaction to each call and records what it was told."""

    def __init__(self) -> None:
        self.failures: list[tuple[int, str, str]] = []
        self.finished = 0
        self.n = 0
        self.status = Status.ACTIVE

    def _snap(self, ts: int, **kw):
        return make_snapshot(ts_us=ts, total_allocations=self.n, status=self.status, **kw)

    def start(self):
        return [LogLine(0, "INFO", 1, "=== started ==="), self._snap(0)]

    def feed(self, msg):
        self.n += 1
        ts = msg.ts_us
        out = [LogLine(ts, "INFO", 1, f"message {self.n}"), CsvRow(ts, 1.0, 2.0, self.n, self.n)]
        if self.n % 3 == 0:
            out.append(self._snap(ts))
        return out

    def note_write_failure(self, ts_us, path, error):
        self.failures.append((ts_us, path, error))
        self.status = Status.DEGRADED
        return [LogLine(ts_us, "ERROR", 0, f"cannot write {path}: {error}"), self._snap(ts_us)]

    def finish(self, ts_us=None):
        assert self.finished == 0, "finish routed twice"
        self.finished += 1
        self.status = Status.SHUTDOWN
        ts = ts_us if ts_us is not None else 10**6
        return [LogLine(ts, "INFO", 1, "=== shutdown ==="), CsvRow(ts, 0.0, 0.0, 0, 9),
                self._snap(ts, final=True)]


def msg(ts: int) -> AgentError:
    return AgentError(ts_us=ts, message="x")  # any message: the scripted engine ignores kinds


def test_outputs_reach_their_files_and_finish_is_idempotent(tmp_path):
    seen = []
    eng = ScriptedEngine()
    p = Pipeline(make_meta(), tmp_path / "o", "X", engine=eng, on_snapshot=seen.append,
                 err=io.StringIO())
    p.start()
    assert json.loads(p.paths.json.read_text())["plugin"]["status"] == "active"
    for i in range(1, 8):
        p.feed(msg(i * 1000))
    final = p.finish(5_000_000)
    assert final is not None and final.final and final.status is Status.SHUTDOWN
    assert [s.ts_us for s in seen] == [0, 3000, 6000, 5_000_000]
    log = p.paths.log.read_text().splitlines()
    assert len(log) == 9 and log[0].endswith("=== started ===") and "shutdown" in log[-1]
    csv_lines = p.paths.csv.read_text().splitlines()
    assert len(csv_lines) == 1 + 7 + 1
    assert "Status: SHUTDOWN\n" in p.paths.status.read_text()
    before = [f.read_bytes() for f in p.paths.all()]
    assert p.finish() is final and eng.finished == 1
    p.feed(msg(9_000_000))  # late message: ignored
    assert [f.read_bytes() for f in p.paths.all()] == before


def test_start_flushes_banner_at_its_snapshot(tmp_path):
    p = Pipeline(make_meta(), tmp_path, engine=ScriptedEngine(), err=io.StringIO())
    p.start()
    # start() emitted a snapshot, which flushes the log: the banner is on disk.
    assert p.paths.log.read_text().endswith("=== started ===\n")


def test_write_failures_reported_once_per_file_then_recovered(tmp_path):
    out = tmp_path / "o"
    err = io.StringIO()
    eng = ScriptedEngine()
    p = Pipeline(make_meta(), out, engine=eng, err=err)
    p.start()
    p.feed(msg(1000))
    shutil.rmtree(out)
    out.write_text("a file where the directory was")
    for i in range(2, 10):
        p.feed(msg(i * 1000))
    reported = sorted(path for _, path, _ in eng.failures)
    assert reported == sorted(str(f) for f in p.paths.all())
    assert {e for _, _, e in eng.failures} == {"Not a directory"}
    assert len(err.getvalue().splitlines()) == 4
    out.unlink()
    out.mkdir()
    p.feed(msg(10_000))
    p.feed(msg(11_000))
    p.feed(msg(12_000))  # a snapshot: every file retried
    p.finish()
    assert len(eng.failures) == 4
    msgs = [ln.split("] ", 3)[3] for ln in p.paths.log.read_text().splitlines()]
    assert msgs[:3] == ["message 1", "message 2", "message 3"]  # kept across the outage
    assert sum(m.startswith("cannot write") for m in msgs) == 4
    assert msgs[-1] == "=== shutdown ==="
    assert len(p.paths.csv.read_text().splitlines()) == 1 + 11 + 1  # rows 2..12 + final
    assert json.loads(p.paths.json.read_text())["plugin"]["status"] == "shutdown"


def test_unwritable_output_dir_raises_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    p = Pipeline(make_meta(), tmp_path / "file" / "sub", engine=ScriptedEngine())
    with pytest.raises(OutputDirError, match="file/sub"):
        p.start()


def test_feed_from_a_thread_while_finishing(tmp_path):
    eng = ScriptedEngine()
    p = Pipeline(make_meta(), tmp_path, engine=eng, err=io.StringIO())
    p.start()
    go = threading.Event()

    def consumer() -> None:
        go.set()
        for i in range(1, 5000):
            p.feed(msg(i))

    t = threading.Thread(target=consumer)
    t.start()
    go.wait()
    final = p.finish(10**7)
    t.join()
    assert eng.finished == 1 and final.final
    # Nothing was written after the final snapshot.
    assert p.paths.log.read_text().splitlines()[-1].endswith("=== shutdown ===")
    assert "Status: SHUTDOWN" in p.paths.status.read_text()


# ---- with the real engine -------------------------------------------------------------------

def test_direct_feed_equals_replay_of_its_recording(tmp_path):
    """What a live session writes (messages fed as they come) is what replaying its recording
    writes, byte for byte."""
    from nvse_monitor.outputs.pipeline import replay
    from nvse_monitor.stream.recording import write_recording
    from nvse_monitor.stream.synthetic import generate

    meta, msgs = generate(40_000, seed=11, rate_eps=20_000)
    msgs = list(msgs)
    live = Pipeline(meta, tmp_path / "live", err=io.StringIO())
    live.start()
    live.feed_all(msgs)
    live.finish()
    write_recording(tmp_path / "r.nvmrec", meta, msgs)
    result = replay(tmp_path / "r.nvmrec", tmp_path / "replay", err=io.StringIO())
    assert result.error is None and result.messages == len(msgs)
    for a, b in zip(live.paths.all(), result.paths.all(), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_real_engine_hears_about_write_failures(tmp_path):
    from nvse_monitor.stream.synthetic import generate

    meta, msgs = generate(60_000, seed=5, rate_eps=20_000, failure_rate=0)
    msgs = list(msgs)
    out = tmp_path / "o"
    err = io.StringIO()
    p = Pipeline(meta, out, err=err)
    p.start()
    third = len(msgs) // 3
    p.feed_all(msgs[:third])
    shutil.rmtree(out)
    out.write_text("")
    p.feed_all(msgs[third : 2 * third])
    out.unlink()
    out.mkdir()
    p.feed_all(msgs[2 * third :])
    final = p.finish()
    assert final is not None and final.status is Status.SHUTDOWN
    doc = json.loads(p.paths.json.read_text())
    assert "output write failures" in doc["monitor"]["degradation_causes"]
    log = p.paths.log.read_text()
    for f in p.paths.all():
        assert f"[WARN] [TID:{meta.pid}] Failed to write {f}: Not a directory" in log
    assert "-> DEGRADED" in log
    assert len(err.getvalue().splitlines()) == 8  # 4 failing + 4 "works again"
