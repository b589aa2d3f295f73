#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs them.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# 32-bit C targets need gcc-multilib (Debian). Install it when missing and we can.
if ! echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /tmp/nvse-m32-probe 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq gcc-multilib >/dev/null
  else
    echo "warning: gcc -m32 unavailable and cannot install gcc-multilib; 32-bit tests will skip" >&2
  fi
fi

VENV=${NVSE_MONITOR_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/ruff" check nvse_monitor tests bench agent
exec "$VENV/bin/python" -m pytest "$@"
