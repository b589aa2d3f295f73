"""Every rule of the health machine (docs/engine.md, "Health machine")."""

from __future__ import annotations

from test_engine import A, F, X, batch, logs, meta, recs, run

from nvse_monitor.engine.engine import NOT_PRESENT, Engine, EngineConfig
from nvse_monitor.outputs.rows import Snapshot, Status
from nvse_monitor.stream.messages import AgentError, HookEvent, SessionEnd

S = 1_000_000  # µs per second


def statuses(out) -> list[str]:
    return [x.message.split(" (")[0] for x in logs(out, "INFO") if x.message.startswith("Status:")]


def test_start_initializing_then_active_on_first_batch() -> None:
    e = Engine(meta())
    assert e.health.status == Status.UNINITIALIZED
    out = e.start()
    assert e.health.status == Status.INITIALIZING
    out += e.feed(batch(recs((A, 0x10, 1, 5))))
    assert e.health.status == Status.ACTIVE
    assert statuses(out) == ["Status: UNINITIALIZED -> INITIALIZING",
                             "Status: INITIALIZING -> ACTIVE"]


def test_active_once_all_hooks_reported_ok() -> None:
    e = Engine(meta())
    e.start()
    for i, h in enumerate(meta().hooks):
        assert e.health.status == Status.INITIALIZING
        out = e.feed(HookEvent(i + 1, i, h.name, True))
    assert e.health.status == Status.ACTIVE
    assert any("Hooks installed: 3 of 3" in x.message for x in logs(out))


def test_a_failed_hook_degrades_for_good() -> None:
    e = Engine(meta())
    e.start()
    e.feed(HookEvent(1, 0, "malloc", True))
    out = e.feed(HookEvent(2, 1, "free", False, "export not found"))
    assert any(x.level == "WARN" and "free" in x.message for x in out)
    out = e.feed(HookEvent(3, 2, "GameHeap::Allocate", True))
    assert e.health.status == Status.DEGRADED
    e.feed(batch(recs((A, 0x10, 1, 100 * S))))
    assert e.health.status == Status.DEGRADED  # persistent: no recovery
    snap = e.snapshot()
    assert snap.monitor["hooks_failed"] == [{"name": "free", "detail": "export not found"}]
    assert snap.is_healthy  # a WARN does not make the monitor unhealthy


def test_optional_hook_not_present_is_info_not_degraded() -> None:
    """An optional entry point the module lacks (msvcrt.dll without _recalloc, seen on the
    Windows lane): one INFO line, ACTIVE, not in hooks_failed."""
    e = Engine(meta())
    e.start()
    e.feed(HookEvent(1, 0, "malloc", True))
    out = e.feed(HookEvent(2, 1, "free", False, NOT_PRESENT + "export free not found in a.dll"))
    out += e.feed(HookEvent(3, 2, "GameHeap::Allocate", True))
    assert e.health.status == Status.ACTIVE
    assert [x.message for x in logs(out) if "free" in x.message] == [
        "Hook not present: free (export free not found in a.dll)"]
    assert not logs(out, "WARN")
    assert any("Hooks installed: 2 of 3, 1 optional not present" in x.message for x in logs(out))
    assert e.snapshot().monitor["hooks_failed"] == []


def test_not_present_in_one_module_keeps_an_install_in_another() -> None:
    """A glob hook (msvcr*.dll) installed in msvcr120.dll stays installed when msvcrt.dll lacks
    the export; a real failure after it still degrades."""
    e = Engine(meta())
    e.start()
    e.feed(HookEvent(1, 1, "free", True))
    e.feed(HookEvent(2, 1, "free", False, NOT_PRESENT + "export free not found in msvcrt.dll"))
    e.feed(HookEvent(3, 0, "malloc", True))
    e.feed(HookEvent(4, 2, "GameHeap::Allocate", True))
    assert e.health.status == Status.ACTIVE
    e.feed(HookEvent(5, 0, "malloc", False, "address 0x1 is not executable code"))
    assert e.health.status == Status.DEGRADED


def test_all_hooks_failed_is_error() -> None:
    e = Engine(meta())
    e.start()
    for i, h in enumerate(meta().hooks):
        out = e.feed(HookEvent(i + 1, i, h.name, False, "nope"))
    assert e.health.status == Status.ERROR
    s = e.snapshot()
    assert not s.is_healthy and s.error_count == 1 and "All 3 hooks failed" in s.last_error
    assert any(isinstance(o, Snapshot) and o.status == Status.ERROR for o in out)


def test_allocation_failure_degrades_then_recovers_after_30s_quiet() -> None:
    e, out = run(batch(recs((A, 0x10, 1, S), (X, 0, 64, 2 * S))),
                 batch(recs((A, 0x20, 1, 20 * S))),  # 18 s later: still degraded
                 batch(recs((A, 0x30, 1, 40 * S))),  # past 2 s + 30 s: recovered at 32 s
                 batch(recs((X, 0, 8, 50 * S))), finish=False)
    assert statuses(out)[-3:] == ["Status: ACTIVE -> DEGRADED", "Status: DEGRADED -> ACTIVE",
                                  "Status: ACTIVE -> DEGRADED"]
    rec = [x for x in logs(out, "INFO") if x.message.startswith("Recovered")]
    assert len(rec) == 1 and rec[0].ts_us == 32 * S
    assert e.health.status == Status.DEGRADED


def test_recovery_timer_restarts_with_each_failure_even_without_a_line() -> None:
    # Failures every 0.5 s: one WARN line per second, but each one restarts the 30 s timer.
    rows = [(X, 0, 8, int(i * 0.5 * S)) for i in range(1, 9)]
    e, out = run(batch(recs(*rows)), batch(recs((A, 0x10, 1, int(4 * S + 30 * S) - 1))),
                 finish=False)
    assert e.health.status == Status.DEGRADED
    warns = [x for x in logs(out, "WARN") if "Allocation failure" in x.message]
    assert [w.ts_us for w in warns] == [S // 2, int(1.5 * S), int(2.5 * S), int(3.5 * S)]
    assert "8 failures" not in warns[-1].message and "7 failures so far" in warns[-1].message
    out = e.feed(batch(recs((A, 0x20, 1, 34 * S))))
    assert e.health.status == Status.ACTIVE
    assert [x.ts_us for x in logs(out) if x.message.startswith("Recovered")] == [34 * S]


def test_dropped_events_warn_rate_limited_and_degrade() -> None:
    e = Engine(meta())
    e.start()
    out = e.feed(batch(recs(), now=S, dropped=5))
    out += e.feed(batch(recs(), now=S + 10, dropped=9))  # within 1 s: no new line yet
    out += e.feed(batch(recs(), now=S + 20, dropped=9))
    out += e.feed(batch(recs(), now=2 * S + 5, dropped=9))  # pending 4 reported now
    drops = [x for x in logs(out, "WARN") if x.message.startswith("Dropped")]
    assert [(x.ts_us, x.message.split(" events")[0]) for x in drops] == [
        (S, "Dropped 5"), (2 * S + 5, "Dropped 4")]
    assert e.health.status == Status.DEGRADED
    assert e.snapshot().monitor["dropped_events"] == 9
    e.feed(batch(recs(), now=S + 10 + 30 * S))
    assert e.health.status == Status.ACTIVE  # 30 s after the last new drop


def test_tracking_overflow_degrades_for_good() -> None:
    e, out = run(batch(recs((A, 0x10, 1, 1), (A, 0x20, 1, 2))),
                 batch(recs((A, 0x30, 1, 100 * S))),
                 config=EngineConfig(max_tracked=1), finish=False)
    assert e.health.status == Status.DEGRADED
    assert e.health.causes == ["tracking limit reached"]


def test_write_failure_degrades_and_recovers() -> None:
    e = Engine(meta())
    e.start()
    e.feed(batch(recs((A, 0x10, 1, S))))
    out = e.note_write_failure(2 * S, "/x/MemoryPoolNVSE_stats.json", "No space left on device")
    assert e.health.status == Status.DEGRADED
    assert any(x.level == "WARN" and "No space left" in x.message for x in out)
    e.feed(batch(recs(), now=33 * S))
    assert e.health.status == Status.ACTIVE


def test_agent_error_is_error_for_good() -> None:
    e = Engine(meta())
    e.start()
    e.feed(batch(recs((A, 0x10, 1, S))))
    out = e.feed(AgentError(2 * S, "TypeError: boom"))
    s = e.snapshot()
    assert s.status == Status.ERROR and not s.is_healthy
    assert s.last_error == "Agent error: TypeError: boom" and s.error_count == 1
    assert [x.level for x in logs(out) if "boom" in x.message] == ["ERROR"]
    e.feed(batch(recs(), now=100 * S))
    assert e.health.status == Status.ERROR


def test_last_error_is_none_initially_and_keeps_the_latest() -> None:
    e = Engine(meta())
    e.start()
    assert e.snapshot().last_error == "none"
    e.feed(AgentError(1, "first"))
    e.feed(AgentError(2, "second"))
    assert e.snapshot().last_error == "Agent error: second"


def test_expected_session_end_is_info_and_finish_uses_its_time() -> None:
    e = Engine(meta())
    e.start()
    e.feed(batch(recs((A, 0x10, 1, S))))
    out = e.feed(SessionEnd(5 * S, "target-exited", True))
    assert any(x.level == "INFO" and "target-exited" in x.message for x in out)
    out = e.finish(99 * S)
    final = out[-1]
    assert final.final and final.status == Status.SHUTDOWN and final.ts_us == 5 * S
    assert final.is_healthy
    assert statuses(out)[-1] == "Status: ACTIVE -> SHUTDOWN"


def test_unexpected_session_end_is_critical_error_then_shutdown() -> None:
    e = Engine(meta())
    e.start()
    e.feed(batch(recs((A, 0x10, 1, S))))
    out = e.feed(SessionEnd(3 * S, "process-terminated", False, crash="access violation"))
    crit = logs(out, "CRITICAL")
    assert len(crit) == 1 and "process-terminated" in crit[0].message
    assert "access violation" in crit[0].message
    assert e.health.status == Status.ERROR
    final = e.finish()[-1]
    assert final.status == Status.SHUTDOWN and not final.is_healthy
    assert final.critical_count == 1 and final.last_error == crit[0].message


def test_finish_without_batches_still_gives_final_outputs() -> None:
    e = Engine(meta())
    out = e.finish(7)
    kinds = [type(o).__name__ for o in out]
    assert kinds[-2:] == ["CsvRow", "Snapshot"] and out[-1].status == Status.SHUTDOWN


def test_free_of_unknown_pointer_does_not_degrade() -> None:
    e, _ = run(batch(recs((F, 0x10, 0, 1))), finish=False)
    assert e.health.status == Status.ACTIVE


def test_pending_hooks_are_neither_installed_nor_failed():
    # A hook whose module is not loaded yet (a plugin's CRT) must not count as failed.
    from nvse_monitor.engine import Engine
    from nvse_monitor.outputs.rows import Status
    from nvse_monitor.stream.messages import HookEvent, HookInfo, SessionMeta

    meta = SessionMeta(target="t", pid=1, arch="x64", platform="linux", profile="p",
                       hooks=[HookInfo("malloc", "libc", "alloc"),
                              HookInfo("plugin_malloc", "plugin", "alloc")])
    e = Engine(meta)
    e.start()
    e.feed(HookEvent(ts_us=1, hook=1, name="plugin_malloc", ok=False, pending=True,
                     detail="waiting for libplugin.so"))
    out = e.feed(HookEvent(ts_us=2, hook=0, name="malloc", ok=True))
    assert e.health.status == Status.ACTIVE
    assert not [o for o in out if getattr(o, "level", "") in ("WARN", "ERROR")]
    snap = e.snapshot()
    assert snap.monitor["hooks_failed"] == [] and snap.is_healthy


def test_only_pending_hooks_is_not_all_failed():
    from nvse_monitor.engine import Engine
    from nvse_monitor.outputs.rows import Status
    from nvse_monitor.stream.messages import HookEvent, HookInfo, SessionMeta

    meta = SessionMeta(target="t", pid=1, arch="x64", platform="linux", profile="p",
                       hooks=[HookInfo("plugin_malloc", "plugin", "alloc")])
    e = Engine(meta)
    e.start()
    e.feed(HookEvent(ts_us=1, hook=0, name="plugin_malloc", ok=False, pending=True))
    assert e.health.status == Status.ACTIVE
    e.feed(HookEvent(ts_us=2, hook=0, name="plugin_malloc", ok=True))
    assert e.health.status == Status.ACTIVE and e.snapshot().monitor["hooks_installed"] == [
        "plugin_malloc"]
