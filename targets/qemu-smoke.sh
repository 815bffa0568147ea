#!/usr/bin/env bash
# Run the cross-built aarch64 binary under qemu user-mode emulation.
#   targets/qemu-smoke.sh [TARGET]            (default aarch64-unknown-linux-gnu)
#   targets/qemu-smoke.sh --wrapper [TARGET]  prints the qemu command prefix
#   targets/qemu-smoke.sh --make-wrapper FILE [TARGET]
# --make-wrapper writes FILE, an executable that runs the ARM binary under
# qemu with its arguments, and prints its absolute path; the e2e tests take it:
#   EDGECACHE_TEST_BIN=$(targets/qemu-smoke.sh --make-wrapper target/qemu/edgecache) cargo test
# binfmt_misc is not assumed (containers rarely have it), hence the wrapper.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=smoke wrapper_file=
case ${1:-} in
  --wrapper) mode=prefix; shift ;;
  --make-wrapper) mode="file"; wrapper_file="${2:?--make-wrapper FILE [TARGET]}"; shift 2 ;;
esac
T=${1:-aarch64-unknown-linux-gnu}
BIN=${EDGECACHE_BIN:-target/$T/release/edgecache}

case $T in
  # glibc builds are dynamically linked: -L points qemu's loader at the
  # cross sysroot (libc6-arm64-cross, pulled in by gcc-aarch64-linux-gnu).
  aarch64-unknown-linux-gnu)     qemu="qemu-aarch64-static"; sysroot=/usr/aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf) qemu="qemu-arm-static";     sysroot=/usr/arm-linux-gnueabihf ;;
  # musl builds are static: no sysroot needed.
  aarch64-unknown-linux-musl)    qemu="qemu-aarch64-static"; sysroot= ;;
  *) echo "unsupported target: $T" >&2; exit 2 ;;
esac
WRAPPER="$qemu${sysroot:+ -L $sysroot}"
if [[ $mode == prefix ]]; then echo "$WRAPPER"; exit 0; fi

command -v "$qemu" >/dev/null || {
  [[ -n $(find /var/lib/apt/lists -name '*Packages*' -print -quit) ]] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static; }
[[ -x $BIN ]] || { echo "no binary at $BIN; run targets/build.sh $T first" >&2; exit 1; }
if [[ $mode == file ]]; then
  mkdir -p "$(dirname "$wrapper_file")"
  # exec: qemu replaces the shell, so the tests' signals reach the agent.
  printf '#!/bin/sh\nexec %s %q "$@"\n' "$WRAPPER" "$(realpath "$BIN")" >"$wrapper_file"
  chmod +x "$wrapper_file"; realpath "$wrapper_file"; exit 0
fi

echo "== file: $(file -b "$BIN")"
echo "== $WRAPPER $BIN --version"
$WRAPPER "$BIN" --version
echo "== $WRAPPER $BIN check-config --config systemd/edgecache.toml"
$WRAPPER "$BIN" check-config --config systemd/edgecache.toml >/dev/null
# A broken config must still exit 78 (EX_CONFIG) under emulation.
bad=$(mktemp); trap 'rm -f "$bad"' EXIT
printf '[agent]\nno_such_key = 1\n' >"$bad"
rc=0; $WRAPPER "$BIN" check-config --config "$bad" >/dev/null 2>&1 || rc=$?
[[ $rc == 78 ]] || { echo "FAIL: bad config exited $rc, want 78" >&2; exit 1; }
echo "== OK: $T binary runs under $qemu (bad config -> 78)"
echo "e2e through qemu: EDGECACHE_TEST_BIN=\$(targets/qemu-smoke.sh --make-wrapper target/qemu/edgecache $T) cargo test"
