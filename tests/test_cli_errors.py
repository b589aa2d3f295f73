"""One error style for bad input on every command (docs/cli.md): `nvse-monitor: error: ...`,
one line on stderr, exit code 2; click's usage errors included (no usage block, no `Error:`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

FIXTURE = REPO / "fixtures" / "synthetic-small.nvmrec"


def run(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvse_monitor", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("args,says", [
    (["replay"], "replay: Missing argument 'RECORDING'. (see `nvse-monitor replay --help`)"),
    (["replay", FIXTURE, "--bogus"], "replay: No such option '--bogus'"),
    (["replay", "/nonexistent.nvmrec"], "/nonexistent.nvmrec: cannot open recording"),
    (["info", "/nonexistent.nvmrec"], "/nonexistent.nvmrec: cannot open recording"),
    (["attach"], "attach: Missing argument 'TARGET'."),
    (["spawn", "--ring-size", "3", "--", "true"], "spawn: Invalid value for '--ring-size'"),
    (["top", "--interval", "99"], "top: Invalid value for '--interval'"),
    (["report", "/nonexistent"], "report: Invalid value for 'SOURCE': Path '/nonexistent' does "
     "not exist."),
    (["frobnicate"], "No such command 'frobnicate'. (see `nvse-monitor --help`)"),
    (["status", "--prefix"], "Option '--prefix' requires an argument."),
])
def test_bad_input_is_one_line_in_one_style(args, says):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nvse-monitor: error: ") and says in lines[0], lines[0]
    assert "Usage:" not in r.stderr and "Try '" not in r.stderr


@pytest.mark.parametrize("cmd", [["replay", FIXTURE], ["spawn", "--duration", "1", "--", "true"]])
def test_out_naming_a_file_gets_the_documented_message(tmp_path, cmd):
    (tmp_path / "afile").write_text("")
    r = run(*cmd[:1], "--out", "afile", *cmd[1:], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "nvse-monitor: error: cannot write to output directory afile: Not a directory"]
    assert (tmp_path / "afile").read_text() == ""  # left as it was


def test_help_and_version_still_exit_0():
    assert run("--version").returncode == 0
    r = run("replay", "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_replay_line_uses_one_separator():
    """`DIR\\PREFIX_*` on Windows, not `\\tmp\\x\\rw/MemoryPoolNVSE_*` (issue 12)."""
    from pathlib import PurePosixPath, PureWindowsPath

    from nvse_monitor.cli.offline import files_pattern

    assert files_pattern(PureWindowsPath(r"\tmp\x\rw"), "MemoryPoolNVSE") == \
        r"\tmp\x\rw\MemoryPoolNVSE_*"
    assert files_pattern(PurePosixPath("out/x"), "P") == "out/x/P_*"
