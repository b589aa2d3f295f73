"""Address-space samples as stream messages (docs/engine.md "Address space", docs/files.md):
the engine's WARN/DEGRADED/recovery rule and JSON section, the `<prefix>_addrspace.csv` writer,
recordings storing the samples, and a replay reproducing the files."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from test_engine import A, F, batch, meta, recs

from nvse_monitor.capture import addrspace
from nvse_monitor.engine import Engine, EngineConfig
from nvse_monitor.outputs.addrspace import HEADER
from nvse_monitor.outputs.files import FilePaths, OutputFiles
from nvse_monitor.outputs.pipeline import replay
from nvse_monitor.outputs.rows import AddressSpaceRow, LogLine, Snapshot, Status
from nvse_monitor.stream.messages import (
    AddressSpace,
    SessionEnd,
    control_from_json,
    control_to_json,
)
from nvse_monitor.stream.recording import RecordingError, info, read_recording, write_recording

MIB = 1 << 20
GIB = 1 << 30


def sample(ts: int, largest_mib: int | None) -> AddressSpace:
    """A 32-bit sample (4 GiB limit), or a 64-bit one (nothing counted) for None."""
    if largest_mib is None:
        return AddressSpace(ts, 3 * GIB, GIB, 2 * GIB, None, None, None, 40)
    lf = largest_mib * MIB
    return AddressSpace(ts, 4 * GIB - 2 * lf, GIB, 3 * GIB - 2 * lf, 2 * lf, lf, 4 * GIB, 50)


def engine(warn_mib: int = 100, **meta_kw) -> tuple[Engine, list]:
    e = Engine(meta(**meta_kw), EngineConfig(addrspace_warn_bytes=warn_mib * MIB))
    out = e.start()
    out += e.feed(batch(recs((A, 0x10, 100, 10))))  # ACTIVE
    return e, out


def lines(out: list, level: str | None = None) -> list[str]:
    return [o.message for o in out if isinstance(o, LogLine) and level in (None, o.level)]


def test_crossing_down_warns_degrades_and_crossing_up_recovers() -> None:
    e, _ = engine(warn_mib=100)
    per_sample = []
    for i, mib in enumerate([500, 99, 50, 99, 100, 300, 20]):
        per_sample.append(e.feed(sample(1_000_000 * (i + 1), mib)))
    warns = [lines(o, "WARN") for o in per_sample]
    infos = [[m for m in lines(o, "INFO") if m.startswith("Address space")] for o in per_sample]
    assert [len(w) for w in warns] == [0, 1, 0, 0, 0, 0, 1]
    assert [len(i) for i in infos] == [0, 0, 0, 0, 1, 0, 0]  # 100 MiB is not under 100 MiB
    assert warns[1] == ["Address space low: largest free block 99.0 MiB (< 100.0 MiB), "
                        "free 198.0 MiB of 4096.0 MiB"]
    assert infos[4] == ["Address space recovered: largest free block 100.0 MiB (>= 100.0 MiB), "
                        "free 200.0 MiB of 4096.0 MiB"]
    status = [[m for m in lines(o, "INFO") if m.startswith("Status:")] for o in per_sample]
    assert status[1] == ["Status: ACTIVE -> DEGRADED (address space low)"]
    assert status[4] == ["Status: DEGRADED -> ACTIVE (address space recovered)"]
    assert status[6] == ["Status: ACTIVE -> DEGRADED (address space low)"]
    # the WARN comes before the status change, both at the sample's time
    o = per_sample[1]
    w = next(i for i, x in enumerate(o) if isinstance(x, LogLine) and x.level == "WARN")
    s = next(i for i, x in enumerate(o) if isinstance(x, LogLine) and x.message.startswith("St"))
    assert w < s and o[w].ts_us == o[s].ts_us == 2_000_000
    snaps = [[x for x in o if isinstance(x, Snapshot)] for o in per_sample]
    assert snaps[1][-1].status is Status.DEGRADED
    assert snaps[1][-1].monitor["degradation_causes"] == ["address space low"]
    assert snaps[4][-1].status is Status.ACTIVE
    assert e.snapshot().status is Status.DEGRADED and e.snapshot().warning_count == 2


def test_each_sample_is_a_row_at_stream_time() -> None:
    e, _ = engine()
    e.feed(batch(recs((A, 0x20, 1, 5_000_000))))
    out = e.feed(sample(4_000_000, 300))  # taken before the last drain: clamped, never back
    out += e.feed(sample(6_000_000, None))
    rows = [o for o in out if isinstance(o, AddressSpaceRow)]
    s1, s2 = sample(0, 300), sample(0, None)
    assert rows == [AddressSpaceRow(5_000_000, s1.mapped, s1.committed, s1.reserved, s1.free,
                                    s1.largest_free, s1.limit, s1.regions),
                    AddressSpaceRow(6_000_000, s2.mapped, s2.committed, s2.reserved, None,
                                    None, None, 40)]


def test_json_section_latest_minimum_and_count() -> None:
    e, out = engine()
    assert "address_space" not in e.snapshot().monitor  # no sample, no section
    for i, mib in enumerate([400, 60, 250]):
        e.feed(sample(1_000_000 * (i + 1), mib))
    final = e.finish()[-1]
    assert isinstance(final, Snapshot) and final.final
    last = sample(0, 250)
    assert final.monitor["address_space"] == {
        "mapped_bytes": last.mapped, "committed_bytes": last.committed,
        "reserved_bytes": last.reserved, "free_bytes": last.free,
        "largest_free_bytes": 250 * MIB, "limit_bytes": 4 * GIB, "regions": 50,
        "min_largest_free_bytes": 60 * MIB, "samples": 3, "warn_below_bytes": 100 * MIB,
        "low": False,
    }


def test_uncounted_samples_never_warn() -> None:
    e, _ = engine(warn_mib=1 << 20)
    out = e.feed(sample(1_000_000, None))
    assert lines(out, "WARN") == [] and e.health.status is Status.ACTIVE
    sec = e.snapshot().monitor["address_space"]
    assert sec["samples"] == 1 and sec["largest_free_bytes"] is None
    assert sec["min_largest_free_bytes"] is None


def test_low_address_space_outlasts_transient_recovery() -> None:
    """A condition cause is not cleared by the 30 s quiet period of transient causes."""
    e, _ = engine(warn_mib=100)
    e.feed(batch(recs((4, 0, 64, 1_000_000))))  # an allocation failure: transient
    e.feed(sample(2_000_000, 10))
    out = e.feed(batch(recs((A, 0x30, 8, 40_000_000))))
    assert any(m.startswith("Recovered: no new allocation failures") for m in lines(out))
    assert e.health.status is Status.DEGRADED
    assert e.health.causes == ["address space low"]
    out = e.feed(sample(41_000_000, 500))
    assert "Status: DEGRADED -> ACTIVE (address space recovered)" in lines(out)


def test_persistent_cause_keeps_degraded_after_address_space_recovers() -> None:
    e, _ = engine(warn_mib=100)
    e.feed(sample(1_000_000, 10))
    e.feed(batch(recs(*[(A, 0x1000 + i, 1, 1_000_001 + i) for i in range(3)])))
    e.health.degrade_persistent(1_500_000, "hook x failed")
    out = e.feed(sample(2_000_000, 500))
    assert lines(out, "INFO")[0].startswith("Address space recovered")
    assert not [m for m in lines(out) if m.startswith("Status:")]
    assert e.health.status is Status.DEGRADED and e.health.causes == ["hook x failed"]


def test_recorded_threshold_wins_over_the_default() -> None:
    e = Engine(meta(extra={"addrspace_warn_bytes": 50 * MIB}))
    e.start()
    assert lines(e.feed(sample(1, 60)), "WARN") == []
    assert len(lines(e.feed(sample(2, 40)), "WARN")) == 1
    assert e.snapshot().monitor["address_space"]["warn_below_bytes"] == 50 * MIB


def test_feed_many_with_samples_between_batches_matches_feed() -> None:
    msgs = [batch(recs((A, 0x10, 100, 10))), sample(20, 10), batch(recs((F, 0x10, 0, 30))),
            batch(recs((A, 0x20, 5, 40))), sample(50, 300), sample(60, 1),
            SessionEnd(70, "target-exited", True)]
    one = Engine(meta(), EngineConfig(addrspace_warn_bytes=100 * MIB))
    a = one.start() + [o for m in msgs for o in one.feed(m)] + one.finish()
    many = Engine(meta(), EngineConfig(addrspace_warn_bytes=100 * MIB))
    b = many.start() + many.feed_many(msgs) + many.finish()
    keep = (LogLine, AddressSpaceRow)
    assert [o for o in a if isinstance(o, keep)] == [o for o in b if isinstance(o, keep)]
    assert a[-1] == b[-1]


# ---------------------------------------------------------------- stream and recording


def test_control_json_round_trip() -> None:
    for s in (sample(7, 123), sample(8, None)):
        d = control_to_json(s)
        assert d["type"] == "addrspace"
        assert control_from_json(json.loads(json.dumps(d))) == s


def session_msgs() -> list:
    return [batch(recs((A, 0x10, 100, 10))), sample(1_000_000, 300),
            batch(recs((A, 0x20, 200, 1_500_000))), sample(2_000_000, 50),
            sample(3_000_000, None), batch(recs((F, 0x10, 0, 3_100_000))),
            sample(4_000_000, 400), SessionEnd(4_200_000, "target-exited", True)]


def test_recording_round_trip_keeps_samples_in_order(tmp_path: Path) -> None:
    p = tmp_path / "a.nvmrec"
    msgs = session_msgs()
    write_recording(p, meta(), msgs)
    _, got = read_recording(p)
    assert [type(m) for m in got] == [type(m) for m in msgs]
    assert [m for m in got if isinstance(m, AddressSpace)] == [
        m for m in msgs if isinstance(m, AddressSpace)]
    assert info(p).messages["addrspace"] == 4


def test_recording_rejects_a_bad_sample(tmp_path: Path) -> None:
    p = tmp_path / "bad.nvmrec"
    write_recording(p, meta(), [AddressSpace(5, -1, 0, 0, None, None, None, 1),
                                SessionEnd(6, "x", True)])
    with pytest.raises(RecordingError, match=r"bad control message \(mapped is not an integer"):
        read_recording(p)


# ---------------------------------------------------------------- writer


ZERO = 1_764_028_800_000_000


def test_writer_makes_the_file_at_the_first_row_only(tmp_path: Path) -> None:
    paths = FilePaths.of(tmp_path, "p")
    paths.addrspace.write_text("stale\n")  # from an earlier session in the same directory
    files = OutputFiles(meta(wall_clock_zero_us=ZERO), tmp_path, "p")
    files.open()
    assert not paths.addrspace.exists()
    assert files.flush() == [] and not paths.addrspace.exists()
    s, n = sample(1_500_000, 100), sample(2_000_000, None)
    for x in (s, n):
        files.write(AddressSpaceRow(x.ts_us, x.mapped, x.committed, x.reserved, x.free,
                                    x.largest_free, x.limit, x.regions))
    assert not paths.addrspace.exists()  # buffered until the next update
    assert files.flush() == []
    assert paths.addrspace.read_text().splitlines() == [
        HEADER.strip(),
        f"{ZERO + 1_500_000},{s.mapped},{s.committed},{s.reserved},{s.free},{100 * MIB},"
        f"{4 * GIB},50",
        f"{ZERO + 2_000_000},{n.mapped},{n.committed},{n.reserved},,,,40",
    ]


def test_writer_failure_is_reported_once_and_rows_are_retried(tmp_path: Path) -> None:
    err = io.StringIO()
    files = OutputFiles(meta(wall_clock_zero_us=ZERO), tmp_path, "p", err=err)
    files.open()
    path = files.paths.addrspace
    path.mkdir()  # the file cannot be created
    rows = [AddressSpaceRow(t, 1, 1, 0, 2, 2, 4, 3) for t in (1, 2)]
    files.write(rows[0])
    f1 = files.flush()
    assert [f.path for f in f1] == [path] and "cannot write" in err.getvalue()
    files.write(rows[1])
    assert files.flush() == []  # still failing: reported once
    shutil.rmtree(path)
    assert files.flush() == []
    assert "works again" in err.getvalue()
    assert [r.split(",")[0] for r in path.read_text().splitlines()[1:]] == [
        str(ZERO + 1), str(ZERO + 2)]


# ---------------------------------------------------------------- replay


def test_replay_writes_samples_to_log_json_and_csv_identically(tmp_path: Path) -> None:
    rec = tmp_path / "s.nvmrec"
    write_recording(rec, meta(wall_clock_zero_us=ZERO, extra={"addrspace_warn_bytes": 100 * MIB}),
                    session_msgs())
    outs = []
    for name in ("a", "b"):
        res = replay(rec, tmp_path / name, "p")
        assert res.error is None
        outs.append(res.paths)
    a, b = outs
    assert a.addrspace.read_bytes() == b.addrspace.read_bytes()
    assert a.log.read_bytes() == b.log.read_bytes()
    assert len(a.addrspace.read_text().splitlines()) == 1 + 4
    log = a.log.read_text()
    assert "[WARN] [TID:1234] Address space low: largest free block 50.0 MiB" in log
    assert "Address space recovered: largest free block 400.0 MiB" in log
    doc = json.loads(a.json.read_text())
    assert doc["monitor"]["address_space"]["min_largest_free_bytes"] == 50 * MIB
    assert doc["monitor"]["address_space"]["samples"] == 4


# ---------------------------------------------------------------- sampler payloads


def test_sample_from_payload_makes_agent_time() -> None:
    p = {"type": "addrspace", "ts_us": ZERO + 2_500_000, "mapped": 10, "committed": 6,
         "reserved": 4, "free": 90, "largest_free": 50, "limit": 100, "regions": 3}
    assert addrspace.sample_from_payload(p, ZERO) == AddressSpace(2_500_000, 10, 6, 4, 90, 50,
                                                                  100, 3)
    p.update(ts_us=ZERO - 5, free=None, largest_free=None, limit=None)  # clock stepped back
    assert addrspace.sample_from_payload(p, ZERO) == AddressSpace(0, 10, 6, 4, None, None,
                                                                  None, 3)
    with pytest.raises(KeyError):
        addrspace.sample_from_payload({"ts_us": 1}, ZERO)
