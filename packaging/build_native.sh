#!/usr/bin/env bash
# Cross-builds the host's compiled kernels (nvse_monitor/native/kernels.c) for a Windows CPython
# on Linux with mingw-w64: OUT_DIR/_kernels.dll, which nvse_monitor/native loads with ctypes
# (docs/native.md). Used by the Windows lane (tests/windows/setup.sh) and by a release builder.
# Usage: bash packaging/build_native.sh OUT_DIR [x64|x86]
#   x64 (default): x86_64-w64-mingw32-gcc (Debian: gcc-mingw-w64-x86-64), 64-bit Windows Pythons;
#   x86: i686-w64-mingw32-gcc (gcc-mingw-w64-i686), a 32-bit Windows Python.
# CC overrides the compiler. The DLL must need nothing but Windows' own DLLs (no libgcc_s or
# libwinpthread beside it): -static-libgcc, and the imports are checked after the link.
# Prints the DLL's path. Exit status: 0 built; 2 bad usage; 3 the compiler is missing;
# 1 the build or the check failed (a bug to fix, not an environment to skip).
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUT_DIR [x64|x86]" >&2; exit 2; }
out=$(realpath -m "$1")
cd "$(dirname "$0")/.."
case "${2:-x64}" in
  x64) triple=x86_64-w64-mingw32 deb=gcc-mingw-w64-x86-64 ;;
  x86) triple=i686-w64-mingw32 deb=gcc-mingw-w64-i686 ;;
  *) echo "build_native: unknown architecture '$2' (x64 or x86)" >&2; exit 2 ;;
esac
cc=${CC:-$triple-gcc}
objdump=$triple-objdump
for tool in "$cc" "$objdump"; do
  command -v "$tool" >/dev/null || { echo "build_native: $tool not found (Debian: $deb)" >&2; exit 3; }
done
mkdir -p "$out"
tmp=$(mktemp "$out/.kernels.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# -s: no symbols (80 KB -> 20 KB); the exports are what ctypes needs.
"$cc" -std=c99 -O2 -ffp-contract=off -Wall -Wextra -Werror -shared -static-libgcc -s \
  -o "$tmp" nvse_monitor/native/kernels.c
# Only Windows' own DLLs: KERNEL32 and the system msvcrt (memcpy; no CRT state crosses the
# boundary, so it does not matter that CPython uses the UCRT), or UCRT api-ms-win-* sets.
pe=$("$objdump" -p "$tmp")
imports=$(sed -n 's/^\s*DLL Name: //p' <<<"$pe")
bad=$(grep -viE '^(kernel32|msvcrt|api-ms-win-[a-z0-9-]+)\.dll$' <<<"$imports" || true)
[ -z "$bad" ] || { echo "build_native: _kernels.dll needs DLLs Windows does not have: $bad" >&2; exit 1; }
grep -qE '^\s*\[ *[0-9]+\] nvsm_abi$' <<<"$pe" || { echo "build_native: nvsm_abi is not exported" >&2; exit 1; }
chmod 644 "$tmp"
mv -f "$tmp" "$out/_kernels.dll"
trap - EXIT
echo "$out/_kernels.dll"
