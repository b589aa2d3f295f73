"""tests/run.sh on a bad day: a failed apt-get is a warning, and the tests needing a tool that is
still missing skip with a reason naming it (checked on a PATH without those tools)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MISSING = ("tmux", "chromium", "chromium-browser", "apt-get")
GCC_NO_M32 = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = -m32 ]; then echo "gcc: fatal error: stub without -m32 support" >&2; exit 1; fi
done
exec {gcc} "$@"
"""


def bare_path(tmp: Path, apt_get_exit: int | None = None) -> str:
    """A PATH of one directory linking every program of ours but tmux, chromium, mingw and
    apt-get; gcc refuses -m32; with `apt_get_exit`, an apt-get that fails like a mirror sync."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep) + [str(Path(sys.executable).parent)]:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            dest = bin_dir / name
            if name in MISSING or name.startswith("i686-w64-mingw32-") or dest.exists():
                continue
            src = Path(d) / name
            if src.is_file() and os.access(src, os.X_OK):
                dest.symlink_to(src)
    gcc = shutil.which("gcc")
    assert gcc is not None
    (bin_dir / "gcc").unlink(missing_ok=True)
    (bin_dir / "gcc").write_text(GCC_NO_M32.format(gcc=os.path.realpath(gcc)))
    (bin_dir / "gcc").chmod(0o755)
    if apt_get_exit is not None:
        (bin_dir / "apt-get").write_text(
            "#!/bin/sh\necho \"apt-get $*\" >> \"$(dirname \"$0\")/apt-get.calls\"\n"
            "echo 'E: Failed to fetch .../i386/Packages.xz  File has unexpected size "
            "(1234 != 5678). Mirror sync in progress?' >&2\n"
            f"exit {apt_get_exit}\n")
        (bin_dir / "apt-get").chmod(0o755)
    return str(bin_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt-get branch runs as root only")
def test_failed_apt_get_is_a_warning(tmp_path):
    path = bare_path(tmp_path, apt_get_exit=100)
    r = subprocess.run(["bash", "tests/install-tools.sh"], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, PATH=path), timeout=120)
    assert r.returncode == 0, r.stderr
    calls = (Path(path) / "apt-get.calls").read_text().splitlines()
    assert calls[0] == "apt-get update -qq"
    assert calls[1] == "apt-get install -y -qq gcc-multilib gcc-mingw-w64-i686 chromium tmux"
    assert len(calls) == 2 + 4  # then one package at a time
    assert "apt-get update failed (exit 100)" in r.stderr
    assert "still missing gcc-multilib gcc-mingw-w64-i686 chromium tmux" in r.stderr


def test_run_sh_does_not_stop_on_install_errors():
    """run.sh runs under `set -e`: the install step must be unable to end it."""
    text = (REPO / "tests" / "run.sh").read_text()
    assert "apt-get" not in text.replace("a failed apt-get", "")
    assert re.search(r"^bash tests/install-tools.sh \|\| ", text, re.M)


@pytest.mark.parametrize("select,tool", [
    (["-m", "m32", "tests"], "gcc -m32"),
    (["-k", "tmux", "tests/test_top.py"], "tmux"),
    (["-k", "chromium", "tests/test_report.py"], "chromium"),
    (["-k", "mingw", "tests/test_fnv_pe.py"], "gcc-mingw-w64-i686"),
])
def test_tests_needing_a_missing_tool_skip_with_the_reason(tmp_path, select, tool):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        *select], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PATH=bare_path(tmp_path)), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]  # nothing failed
    reasons = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", r.stdout, re.M)
    assert sum(int(n) for n, _ in reasons) >= 3, r.stdout[-3000:]
    for _, why in reasons:
        assert tool in why, why
