#!/usr/bin/env bash
# The Windows lane in one command: sets up Wine, mingw and the Windows CPython with nvse-monitor
# (tests/windows/setup.sh, cached), then runs tests/windows with the Linux venv's pytest driving
# the Windows nvse-monitor under Wine against the PE fakes.
# Usage: bash tests/windows/run.sh [pytest args...]
# Exit status: pytest's; 77 when Wine cannot be installed ("SKIPPED" printed, never a pass).
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
if ! envfile=$(bash tests/windows/setup.sh); then
  echo "=== WINDOWS LANE SKIPPED: Wine / mingw / the Windows Python could not be set up (see ${NVSE_WIN_CACHE:-$HOME/.cache/nvse-monitor-windows}/setup.log) ===" >&2
  exit 77
fi
echo "windows lane: set up in $(( $(date +%s) - start )) s" >&2
# shellcheck disable=SC1090
source "$envfile"
# the single-file nvse-monitor.exe (PyInstaller), cached like the Windows Python
if [ "${NVSE_WIN_SKIP_EXE:-0}" != 1 ]; then
  if exe=$(bash tests/windows/build_exe.sh); then
    export NVSE_WIN_EXE="$exe"
  else
    echo "windows lane: building nvse-monitor.exe FAILED (its tests will fail)" >&2
    export NVSE_WIN_EXE=/nonexistent/nvse-monitor.exe
  fi
fi
VENV=${NVSE_MONITOR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import nvse_monitor, pytest' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -e '.[test]'
fi
wineserver -k 2>/dev/null || true   # a previous run's leftovers
# Frida under Wine leaves its agent's temp folder (~50 MB) behind after each session: about 1 GB
# a run, gone here while no Wine process of this prefix is alive.
rm -rf "$WINEPREFIX"/drive_c/users/*/Temp/frida-* 2>/dev/null || true
where=(tests/windows)
for a in "$@"; do case "$a" in tests/*) where=() ;; esac; done
"$VENV/bin/python" -m pytest "${where[@]}" -p no:cacheprovider "$@"
rc=$?
wineserver -k 2>/dev/null || true   # Wine's background processes go with the lane
rm -rf "$WINEPREFIX"/drive_c/users/*/Temp/frida-* 2>/dev/null || true
if [ "${NVSE_WIN_NATIVE:-}" != built ]; then
  echo "=== WINDOWS LANE RAN WITHOUT COMPILED KERNELS (numpy paths only; native tests skipped or failed): ${NVSE_WIN_NATIVE:-unknown} ===" >&2
fi
exit $rc
