#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs them.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use (gcc-multilib, gcc-mingw-w64-i686, chromium, tmux; README lists
# them): installed when missing and root. Never fatal: a failed apt-get is a warning and the tests
# needing a tool still missing skip with the reason.
bash tests/install-tools.sh || echo "warning: tests/install-tools.sh failed ($?); going on" >&2

VENV=${NVSE_MONITOR_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
export PATH="$VENV/bin:$PATH"  # the installed `nvse-monitor` entry point is tested too
ruff check nvse_monitor tests bench agent
exec python -m pytest "$@"
