#!/usr/bin/env bash
# No-Docker cross build of edgecache with Debian's cross compilers.
#   targets/build.sh aarch64-unknown-linux-gnu       # 64-bit Pi OS / ARM gateways
#   targets/build.sh armv7-unknown-linux-gnueabihf   # 32-bit Pi OS
#   targets/build.sh aarch64-unknown-linux-musl      # fully static (cargo-zigbuild + zig)
# Output: target/<TARGET>/release/edgecache. Installs what it needs (apt,
# rustup target, cargo-zigbuild/ziglang for musl) and skips what is present.
# Users with Docker can use `cross` instead (see Cross.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T=${1:?usage: targets/build.sh TARGET}
# The musl toolchain: cargo-zigbuild (crates.io) and zig (PyPI's ziglang).
CARGO_ZIGBUILD_VERSION=0.24.1
ZIG_VERSION=0.17.1

# Debian packages for a target: C/C++ cross compilers (rdkafka-sys builds
# librdkafka with cmake, which also builds the C++ wrapper librdkafka++.a even
# though edgecache never links it), cmake, and perl for OpenSSL's Configure.
apt_need() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    [[ -n $(find /var/lib/apt/lists -name '*Packages*' -print -quit) ]] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

case $T in
  aarch64-unknown-linux-gnu)     gnu=aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf) gnu=arm-linux-gnueabihf ;;
  aarch64-unknown-linux-musl)    gnu= ;;
  *) echo "unsupported target: $T" >&2; exit 2 ;;
esac

rustup target list --installed | grep -qx "$T" || rustup target add "$T"
tvar=${T//-/_}                              # cc-rs/cmake-rs per-target names
TVAR=$(tr '[:lower:]' '[:upper:]' <<<"$tvar") # cargo's CARGO_TARGET_<T>_LINKER

if [[ -n $gnu ]]; then
  apt_need "gcc-$gnu" "g++-$gnu" cmake make perl file
  # Per-target variables only, so host build scripts keep using the host cc.
  export "CC_$tvar=${gnu}-gcc" "CXX_$tvar=${gnu}-g++" "AR_$tvar=${gnu}-ar"
  # Rust links with the cross gcc so the target's glibc/crt files are used.
  export "CARGO_TARGET_${TVAR}_LINKER=${gnu}-gcc"
  time cargo build --locked --release --target "$T" --bin edgecache
else
  # musl: zig ships musl libc + a clang for every target, so no Debian musl
  # cross gcc is needed (bookworm has none for aarch64). Result is static.
  # Both pinned, so a new release cannot change a build that worked; an
  # installed other version is replaced.
  apt_need cmake make perl python3-pip file
  # (`cargo zigbuild --version` is not an option; the binary itself answers.)
  [[ "$(cargo-zigbuild --version 2>/dev/null)" == "cargo-zigbuild $CARGO_ZIGBUILD_VERSION" ]] ||
    cargo install --locked cargo-zigbuild --version "$CARGO_ZIGBUILD_VERSION"
  [[ "$(python3 -m ziglang version 2>/dev/null)" == "$ZIG_VERSION" ]] ||
    pip3 install --break-system-packages "ziglang==$ZIG_VERSION"
  time cargo zigbuild --locked --release --target "$T" --bin edgecache
fi
ls -l "target/$T/release/edgecache"
file "target/$T/release/edgecache"
