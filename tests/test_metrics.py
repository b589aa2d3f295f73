"""/metrics (OpenMetrics via prometheus_client): the collector on real snapshots, scraped during
a --realtime replay and during a live session, parsed with the client's own parsers."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import prometheus_client
import pytest
from conftest import REPO, Monitor
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from nvse_monitor.outputs.pipeline import Pipeline
from nvse_monitor.stream.recording import read_recording
from nvse_monitor.views.metrics import MetricsServer

FIXTURE = REPO / "fixtures" / "synthetic-mixed.nvmrec"


def samples(text: str, openmetrics: bool = False) -> dict[tuple[str, tuple], float]:
    parse = parse_openmetrics if openmetrics else parse_prometheus
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parse(text) for s in fam.samples}


def scrape(url: str, openmetrics: bool = False) -> str:
    req = urllib.request.Request(url)
    if openmetrics:
        req.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def test_collector_on_a_replayed_session(tmp_path):
    meta, msgs = read_recording(FIXTURE)
    pipe = Pipeline(meta, tmp_path)
    server = MetricsServer(port=0).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")  # local only by default
        assert samples(scrape(server.url)) == {}  # nothing attached yet: empty, not an error
        server.attach(pipe)
        pipe.start()
        pipe.feed_all(msgs)
        pipe.finish()
        doc = json.loads((tmp_path / "MemoryPoolNVSE_stats.json").read_text())
        for om in (False, True):
            s = samples(scrape(server.url, om), om)
            ms, mon = doc["memory_stats"], doc["monitor"]
            assert s[("nvse_monitor_allocations_total", ())] == ms["total_allocations"]
            assert s[("nvse_monitor_frees_total", ())] == ms["total_frees"]
            assert s[("nvse_monitor_allocated_bytes_total", ())] == ms["total_bytes_allocated"]
            assert s[("nvse_monitor_live_bytes", ())] == ms["current_bytes_allocated"]
            assert s[("nvse_monitor_live_allocations", ())] == ms["current_allocations"]
            assert s[("nvse_monitor_allocation_failures_total", ())] == ms["allocation_failures"]
            assert s[("nvse_monitor_dropped_events_total", ())] == mon["dropped_events"] > 0
            assert s[("nvse_monitor_untracked_frees_total", ())] == mon["untracked_frees"]
            for mod, v in mon["modules_live_bytes"].items():
                assert s[("nvse_monitor_module_live_bytes", (("module", mod),))] == v
            for heap, h in mon["heaps"].items():
                assert s[("nvse_monitor_heap_live_bytes", (("heap", heap),))] == \
                    h["current_bytes"]
            states = {dict(k[1])["nvse_monitor_status"]: v for k, v in s.items()
                      if k[0] == "nvse_monitor_status"}
            assert states["SHUTDOWN"] == 1 and sum(states.values()) == 1 and len(states) == 6
            assert s[("nvse_monitor_healthy", ())] == 1
            # the allocation size classes as a histogram: cumulative power-of-two buckets
            hist = {float(dict(k[1])["le"]): v for k, v in s.items()
                    if k[0] == "nvse_monitor_allocation_size_bytes_bucket"}
            below = 0
            for c in mon["allocation_sizes"]:
                below += c["allocations"]
                assert hist[float(c["max_bytes"])] == below
            assert hist[float("inf")] == below == ms["total_allocations"]
            assert list(hist) == sorted(hist) and len(hist) >= 34
            assert s[("nvse_monitor_allocation_size_bytes_count", ())] == ms["total_allocations"]
            assert s[("nvse_monitor_allocation_size_bytes_sum", ())] == \
                ms["total_bytes_allocated"]
            info = next(k for k in s if k[0] == "nvse_monitor_session_info")
            assert dict(info[1])["target"] == meta.target
    finally:
        server.stop()
    # a private registry: the process-wide default one is untouched
    assert b"nvse_monitor" not in prometheus_client.generate_latest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_while(proc_alive, url: str, period: float = 0.1) -> list[dict]:
    seen = []
    while proc_alive():
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            seen.append(samples(scrape(url)))
        time.sleep(period)
    return seen


def test_scraped_during_a_realtime_replay(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvse_monitor", "replay", FIXTURE, "-o", tmp_path / "out",
         "--realtime", "--metrics-port", "0"],
        cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
        assert m, line
        seen = scrape_while(lambda: proc.poll() is None, m.group(1), 0.05)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    allocs = [s[("nvse_monitor_allocations_total", ())] for s in seen
              if ("nvse_monitor_allocations_total", ()) in s]
    assert len(set(allocs)) >= 3, allocs  # it moved while we watched
    assert allocs == sorted(allocs)  # a counter never goes back
    doc = json.loads((tmp_path / "out" / "MemoryPoolNVSE_stats.json").read_text())
    assert allocs[-1] <= doc["memory_stats"]["total_allocations"]


def test_busy_port_is_a_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "nvse_monitor", "replay", FIXTURE, "-o",
                            tmp_path / "o", "--metrics-port", str(port)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.frida
def test_scraped_during_a_live_session(targets, tmp_path, live_procs):
    exe = targets.build("hammer", "x64")
    target = live_procs.start([exe, "--seconds", "6", "--rate", "20000"])
    target.go()
    port = free_port()
    mon = live_procs.attach(target, "--out", tmp_path / "out", "--metrics-port", port)
    url = f"http://127.0.0.1:{port}/metrics"
    assert url in mon.wait_for("metrics on ")
    mon.wait_monitoring()
    # "monitoring" is printed once hooks are in; the first batch may land a drain tick later
    first_deadline = time.monotonic() + 10
    while (samples(scrape(url)).get(("nvse_monitor_allocations_total", ()), 0) == 0
           and time.monotonic() < first_deadline):
        time.sleep(0.05)
    seen: list[dict] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        om = len(seen) % 2 == 1  # both formats, each through the client's own parser
        seen.append(samples(scrape(url, om), om))
        time.sleep(0.1)
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    allocs = [s.get(("nvse_monitor_allocations_total", ()), 0) for s in seen]
    assert allocs == sorted(allocs) and allocs[-1] > allocs[0] > 0
    last = seen[-1]
    status = {dict(k[1])["nvse_monitor_status"] for k, v in last.items()
              if k[0] == "nvse_monitor_status" and v == 1}
    assert status == {"ACTIVE"}
    assert ("nvse_monitor_heap_live_bytes", (("heap", "libc"),)) in last
    info = next(k for k in last if k[0] == "nvse_monitor_session_info")
    assert dict(info[1])["pid"] == str(target.pid)
    # the endpoint goes away with the session
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(url)


@pytest.mark.frida
def test_scraped_during_a_spawned_session(targets, tmp_path, live_procs):
    """spawn --metrics-port: served from the start of the program to its end, both formats."""
    exe = targets.build("workload", "x64")
    port = free_port()
    mon = Monitor(["spawn", "--out", tmp_path / "out", "--metrics-port", port, "--", exe,
                   "--iters", "2000", "--rounds", "3000"])
    live_procs.append(mon)
    url = f"http://127.0.0.1:{port}/metrics"
    assert url in mon.wait_for("metrics on ")
    seen: list[dict] = []
    while mon.proc.poll() is None:
        om = len(seen) % 2 == 1
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            seen.append(samples(scrape(url, om), om))
        time.sleep(0.05)
    assert mon.wait() == 0, mon.stderr
    allocs = [s[("nvse_monitor_allocations_total", ())] for s in seen
              if ("nvse_monitor_allocations_total", ()) in s]
    assert len(allocs) >= 2 and allocs == sorted(allocs) and allocs[-1] > 0
    info = next(k for s in seen for k in s if k[0] == "nvse_monitor_session_info")
    assert dict(info[1])["mode"] == "spawn"
    doc = json.loads((tmp_path / "out" / "MemoryPoolNVSE_stats.json").read_text())
    assert allocs[-1] <= doc["memory_stats"]["total_allocations"]


def test_ring_figures_are_served(tmp_path):
    import ring_session

    rec = ring_session.write(tmp_path / "ring.nvmrec")
    meta, msgs = read_recording(rec)
    pipe = Pipeline(meta, tmp_path)
    server = MetricsServer(port=0).start()
    try:
        server.attach(pipe)
        pipe.start()
        pipe.feed_all(msgs)
        pipe.finish()
        for om in (False, True):
            s = samples(scrape(server.url, om), om)
            assert s[("nvse_monitor_stalls_total", ())] == ring_session.STALLS
            assert s[("nvse_monitor_stall_seconds_total", ())] == ring_session.STALL_US / 1e6
            assert s[("nvse_monitor_stall_max_seconds", ())] == ring_session.STALL_MAX_US / 1e6
            assert s[("nvse_monitor_dropped_frees_total", ())] == 1
            assert s[("nvse_monitor_unknown_records_total", ())] == 0
            # no per-anything labels on them
            assert not [k for k in s if "stall" in k[0] and k[1]]
    finally:
        server.stop()
