"""The README's Linux demo (issue 12): with PYTHONMALLOC=malloc the monitor sees Python's
allocations; without it, CPython's own pools hide them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.frida


def readme_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("PYTHONMALLOC=malloc nvse-monitor"))
    return shlex.split(line)


def run_demo(argv: list[str], tmp_path, env_extra: dict[str, str]) -> dict:
    assert argv[:3] == ["nvse-monitor", "spawn", "--"], argv
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "spawn", "--out", str(out), "--",
                        *argv[3:]], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert re.search(r"the program exited with status 0", r.stderr), r.stderr
    return json.loads((out / "MemoryPoolNVSE_stats.json").read_text())


def test_readme_demo_sees_pythons_allocations(tmp_path):
    argv = readme_command()
    assert argv[0] == "PYTHONMALLOC=malloc"
    with_ = run_demo(argv[1:], tmp_path / "a", {"PYTHONMALLOC": "malloc"})
    without = run_demo(argv[1:], tmp_path / "b", {})
    a, b = (d["memory_stats"]["total_allocations"] for d in (with_, without))
    assert a > 200_000 and b < 20_000, (a, b)
