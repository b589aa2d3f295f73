#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs them.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use (Debian): gcc-multilib for the -m32 targets, mingw for a real PE
# file, chromium for the HTML report, tmux for the dashboard. Installed when missing and root.
need=()
echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /tmp/nvse-m32-probe 2>/dev/null || need+=(gcc-multilib)
command -v i686-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-i686)
command -v chromium >/dev/null || need+=(chromium)
command -v tmux >/dev/null || need+=(tmux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]} and cannot install them; the tests needing them skip" >&2
  fi
fi

VENV=${NVSE_MONITOR_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
export PATH="$VENV/bin:$PATH"  # the installed `nvse-monitor` entry point is tested too
ruff check nvse_monitor tests bench agent
exec python -m pytest "$@"
