#!/usr/bin/env bash
# Builds the single-file nvse-monitor.exe with PyInstaller inside the lane's Windows Python under
# Wine (about 2-3 minutes), cached while the Windows Python and this script are unchanged.
# Prints the exe's path. On Windows the same build is, in a checkout: pip install . pyinstaller,
# then
#   pyinstaller --onefile --name nvse-monitor --collect-data nvse_monitor
#     --collect-submodules nvse_monitor packaging/nvse_monitor_exe.py
# The compiled kernels go in with these options (docs/native.md; checked with PyInstaller 6.11):
# --collect-data takes the cross-built _kernels.dll (not a Python suffix; PyInstaller then
# reclassifies it as a binary), --collect-submodules the _kernels.cp312-win_amd64.pyd that pip
# builds with MSVC (an extension module, which no data option takes). nvse_monitor/native loads
# either from beside itself in the unpacked exe.
set -euo pipefail
cd "$(dirname "$0")/../.."
source "$(bash tests/windows/setup.sh)"
out="$NVSE_WIN_CACHE/exe"
stamp=$(cat "$(dirname "$NVSE_WIN_PYTHON")/.stamp" tests/windows/build_exe.sh | sha256sum | cut -c1-16)
if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$out/nvse-monitor.exe" ]; then
  rm -rf "$out" && mkdir -p "$out"
  cp packaging/nvse_monitor_exe.py "$out/"
  (cd "$out" && wine "$NVSE_WIN_PYTHON" -m PyInstaller --noconfirm --onefile --name nvse-monitor \
      --collect-data nvse_monitor --collect-submodules nvse_monitor \
      --exclude-module tkinter --exclude-module frida_tools --exclude-module PyInstaller \
      --distpath . --workpath build --specpath build nvse_monitor_exe.py \
      </dev/null 2>&1 | cat >"$out/build.log") || { tail -20 "$out/build.log" >&2; exit 1; }
  [ -f "$out/nvse-monitor.exe" ] || { tail -20 "$out/build.log" >&2; exit 1; }
  rm -rf "$out/build"
  echo "$stamp" >"$out/.stamp"
fi
echo "$out/nvse-monitor.exe"
