#!/usr/bin/env bash
# Installs the system packages the tests use (Debian), when missing and when we are root:
#   gcc-multilib        gcc -m32, for the 32-bit (ia32) targets
#   g++-multilib        g++ (-m32): the C++ target of the operator new wrapper test
#   gcc-mingw-w64-i686  i686-w64-mingw32-gcc/-windres, for a real linker's PE file
#   chromium            headless rendering of the HTML report (~330 MB)
#   tmux                a real terminal for the `top` dashboard
# Never fatal: `apt-get update` fails on some days (a mirror sync in progress, the security
# mirror's i386 index...); then this warns and installs from the package lists already here, one
# package at a time, and the tests needing a tool that is still missing skip with the reason.
set -uo pipefail

warn() { echo "tests/install-tools.sh: warning: $*" >&2; }

missing() {
  local out=()
  echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /tmp/nvse-m32-probe.$$ 2>/dev/null \
    || out+=(gcc-multilib)
  echo 'int main(){return 0;}' | g++ -m32 -x c++ - -o /tmp/nvse-m32-probe.$$ 2>/dev/null \
    || out+=(g++-multilib)
  rm -f /tmp/nvse-m32-probe.$$
  command -v i686-w64-mingw32-gcc >/dev/null || out+=(gcc-mingw-w64-i686)
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || out+=(chromium)
  command -v tmux >/dev/null || out+=(tmux)
  echo "${out[@]}"
}

read -r -a need <<<"$(missing)"
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  warn "missing ${need[*]} and cannot install them (not root, or no apt-get): the tests needing them skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || warn "apt-get update failed (exit $?): installing from the package lists already here"
if ! apt-get install -y -qq "${need[@]}" >/dev/null; then
  warn "apt-get install ${need[*]} failed: trying one package at a time"
  for pkg in "${need[@]}"; do
    apt-get install -y -qq "$pkg" >/dev/null || warn "apt-get install $pkg failed (exit $?)"
  done
fi
read -r -a still <<<"$(missing)"
if [ ${#still[@]} -gt 0 ]; then
  warn "still missing ${still[*]}: the tests needing them skip (pytest -rs shows why)"
fi
exit 0
