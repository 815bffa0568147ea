#!/usr/bin/env bash
# No-Docker cross build of edgecache with Debian's cross compilers.
#   targets/build.sh aarch64-unknown-linux-gnu       # 64-bit Pi OS / ARM gateways
#   targets/build.sh armv7-unknown-linux-gnueabihf   # 32-bit Pi OS
#   targets/build.sh aarch64-unknown-linux-musl      # fully static (cargo-zigbuild + zig)
# Output: target/<TARGET>/release/edgecache. Installs what it needs (apt,
# rustup target, cargo-zigbuild/ziglang for musl) and skips what is present.
# Users with Docker can use `cross` instead (see Cross.toml); that build is
# the plain release one, about 3.5 MB larger (BENCHMARKS.md, "Binary size").
#
# A gateway build is built for size (BENCHMARKS.md, "Binary size", has what
# each step bought):
# - OpenSSL built here from the source the openssl-src crate ships, without
#   what a Kafka client never uses (TLS 1.0/1.1, DTLS, QUIC, SRP, PSK, legacy
#   and national ciphers, OCSP, CMS, CT, engines...), at -Os; TLS 1.2 and 1.3
#   with the usual suites, and PKCS#12 and encrypted PEM keys, remain;
# - Rust at opt-level "z" and the C libraries at -Os (cargo passes the
#   profile's opt-level to cc and cmake);
# - no unwind tables (panic = "abort": nothing unwinds);
# - zstd without its compression strategies beyond "fast": the agent only
#   decompresses (librdkafka still links a compressor, the fast one).
# EDGECACHE_SIZE_REPORT=1 also prints where the bytes come from
# (targets/size.py, from an unstripped copy: edgecache.syms).
# EDGECACHE_TLS=no builds without TLS (the `tls` cargo feature off: PLAINTEXT
# and SASL PLAIN only) into target/<TARGET>/release/edgecache-notls.
# EDGECACHE_BUILD=speed keeps the release profile's opt-level 3 and the
# vendored OpenSSL instead (the x86_64 benchmarks' configuration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T=${1:?usage: targets/build.sh TARGET}
MODE=${EDGECACHE_BUILD:-size}
[[ $MODE == size || $MODE == speed ]] || { echo "EDGECACHE_BUILD must be size or speed" >&2; exit 2; }
TLS=${EDGECACHE_TLS:-yes}
[[ $TLS == yes || $TLS == no ]] || { echo "EDGECACHE_TLS must be yes or no" >&2; exit 2; }
FEATURE_ARGS=()
[[ $TLS == no ]] && FEATURE_ARGS=(--no-default-features --features agent)
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

# What OpenSSL leaves out. Kafka brokers speak TLS 1.2/1.3 (Java 17 turned
# 1.0/1.1 off); librdkafka uses libssl, X.509, PEM, PKCS#12, HMAC/SHA-2
# (SCRAM) and base64 (OAUTHBEARER), and nothing below. DES stays: PKCS#12
# files and encrypted PEM keys written by older tools use 3DES.
OPENSSL_OPTS=(no-shared no-module no-tests no-docs no-apps no-legacy no-engine no-dso
  no-async no-comp no-zlib no-autoload-config no-ssl3 no-tls1 no-tls1_1 no-dtls
  no-srp no-psk no-ssl-trace no-srtp no-quic no-ct no-ocsp no-cms no-ts
  no-rfc3779 no-cmp no-http no-sm2 no-sm3 no-sm4 no-aria no-bf no-cast
  no-camellia no-idea no-seed no-rc2 no-rc4 no-rc5 no-md2 no-md4 no-mdc2
  no-whirlpool no-rmd160 no-dsa no-ec2m no-gost no-scrypt no-siphash no-siv
  no-ocb no-blake2 no-argon2 no-ml-kem no-ml-dsa no-slh-dsa no-lms
  no-ui-console no-filenames no-weak-ssl-ciphers no-nextprotoneg no-thread-pool
  no-default-thread-pool no-sslkeylog no-tfo no-uplink no-padlockeng
  no-afalgeng no-integrity-only-ciphers)
# C flags for every C dependency of the gateway build (zstd's macros are
# ignored by the others).
SIZE_CFLAGS="-ffunction-sections -fdata-sections -fno-asynchronous-unwind-tables -fno-unwind-tables"
ZSTD_CFLAGS=""
for s in DFAST GREEDY LAZY LAZY2 BTLAZY2 BTOPT BTULTRA; do
  ZSTD_CFLAGS+=" -DZSTD_EXCLUDE_${s}_BLOCK_COMPRESSOR"
done

# openssl_min CONFIGURE_TARGET CC AR RANLIB: builds the trimmed OpenSSL into
# target/$T/openssl-min-<version>-<hash of the options> (kept between
# builds; about 2 min on 2 cores) and prints that directory.
openssl_min() {
  local os_target=$1 cc=$2 ar=$3 ranlib=$4
  local version src key dir
  version=$(awk '/^name = "openssl-src"/{getline; print $3}' Cargo.lock | tr -d '"')
  [[ -n $version ]] || { echo "openssl-src is not in Cargo.lock" >&2; return 1; }
  cargo fetch --locked >/dev/null 2>&1 || cargo fetch --locked
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"openssl-src-$version"/openssl | head -1)
  [[ -d $src ]] || { echo "no openssl-src $version source in the cargo registry" >&2; return 1; }
  key=$(printf '%s\n' "$os_target" "$cc" "$SIZE_CFLAGS" "${OPENSSL_OPTS[@]}" | sha256sum | cut -c1-12)
  dir=$PWD/target/$T/openssl-min-$version-$key
  if [[ ! -f $dir/lib/libssl.a ]]; then
    local work=$PWD/target/$T/openssl-min-build
    rm -rf "$work" "$dir"; mkdir -p "$(dirname "$work")"; cp -a "$src" "$work"
    echo "== OpenSSL $version for $T (trimmed, -Os) into $dir" >&2
    (cd "$work" &&
      CC="$cc" AR="$ar" RANLIB="$ranlib" ./Configure "$os_target" --prefix="$dir" --libdir=lib \
        "${OPENSSL_OPTS[@]}" -Os $SIZE_CFLAGS >configure.log 2>&1 &&
      make -j"$(nproc)" build_libs >make.log 2>&1 && make install_dev >install.log 2>&1) ||
      { echo "OpenSSL build failed; logs in $work" >&2; return 1; }
    rm -rf "$work"
  fi
  echo "$dir"
}

# size_env DIR: the environment of a gateway build, per target so host build
# scripts keep their defaults.
size_env() {
  # openssl-sys takes the trimmed build instead of its vendored one, and
  # librdkafka's cmake finds the same one.
  if [[ -n $1 ]]; then
    export "${TVAR}_OPENSSL_DIR=$1" "${TVAR}_OPENSSL_STATIC=1" "${TVAR}_OPENSSL_NO_VENDOR=1" "OPENSSL_ROOT_DIR=$1"
    # cmake keeps the OpenSSL it found in its cache: a librdkafka configured
    # earlier against another OpenSSL (vendored, or another option set)
    # would be compiled against those headers. Such a cache is dropped.
    local cache
    for cache in target/"$T"/release/build/rdkafka-sys-*/out/build/CMakeCache.txt; do
      [[ -f $cache ]] || continue
      grep -qxF "OPENSSL_INCLUDE_DIR:PATH=$1/include" "$cache" || rm -f "$cache"
    done
  fi
  export "CFLAGS_$tvar=$SIZE_CFLAGS$ZSTD_CFLAGS"
  export "CARGO_TARGET_${TVAR}_RUSTFLAGS=-C force-unwind-tables=no"
  PROFILE_ARGS=(--config 'profile.release.opt-level="z"')
}
PROFILE_ARGS=()

if [[ -n $gnu ]]; then
  apt_need "gcc-$gnu" "g++-$gnu" cmake make perl file
  # Per-target variables only, so host build scripts keep using the host cc.
  export "CC_$tvar=${gnu}-gcc" "CXX_$tvar=${gnu}-g++" "AR_$tvar=${gnu}-ar"
  # Rust links with the cross gcc so the target's glibc/crt files are used.
  export "CARGO_TARGET_${TVAR}_LINKER=${gnu}-gcc"
  if [[ $MODE == size && $TLS == yes ]]; then
    case $T in
      aarch64-*) os_target=linux-aarch64 ;;
      armv7-*)   os_target=linux-armv4 ;;
    esac
    # (An assignment, so set -e stops here when the OpenSSL build fails;
    # as an argument the failure would go unnoticed.)
    ossl=$(openssl_min "$os_target" "${gnu}-gcc" "${gnu}-ar" "${gnu}-ranlib")
    size_env "$ossl"
  elif [[ $MODE == size ]]; then
    size_env ""
  fi
  CARGO=(cargo)
  time cargo build --locked --release --target "$T" --bin edgecache "${PROFILE_ARGS[@]}" "${FEATURE_ARGS[@]}"
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
  if [[ $MODE == size ]]; then
    zig="$(command -v python3) -m ziglang"
    if [[ $TLS == yes ]]; then
      ossl=$(openssl_min linux-aarch64 "$zig cc -target aarch64-linux-musl -fno-sanitize=all" "$zig ar" "$zig ranlib")
      size_env "$ossl"
    else
      size_env ""
    fi
  fi
  CARGO=(cargo-zigbuild)
  time cargo zigbuild --locked --release --target "$T" --bin edgecache "${PROFILE_ARGS[@]}" "${FEATURE_ARGS[@]}"
fi
if [[ -n ${EDGECACHE_SIZE_REPORT:-} ]]; then
  out=target/$T/release
  # The same build linked once more with symbols, then the stripped one again.
  "${CARGO[@]}" rustc --locked --release --target "$T" --bin edgecache "${PROFILE_ARGS[@]}" "${FEATURE_ARGS[@]}" -- -C strip=none
  cp "$out/edgecache" "$out/edgecache.syms"
  "${CARGO[@]}" rustc --locked --release --target "$T" --bin edgecache "${PROFILE_ARGS[@]}" "${FEATURE_ARGS[@]}"
  archives=()
  for lib in librdkafka.a libssl.a libcrypto.a libzstd.a libz.a; do
    a=$(find "$out/build" ${OPENSSL_ROOT_DIR:+"$OPENSSL_ROOT_DIR"} -name "$lib" -printf '%T@ %p\n' 2>/dev/null |
      sort -rn | head -1 | cut -d' ' -f2)
    [[ -n $a ]] && archives+=("$a")
  done
  python3 targets/size.py "$out/edgecache.syms" "${archives[@]}"
fi
out=target/$T/release/edgecache
if [[ $TLS == no ]]; then
  # Its own name, so a later TLS build, the .deb and the tests never pick
  # up this one by mistake (cargo relinks the missing edgecache next time).
  # (cargo hard-links its output: a rebuild can leave both names on one
  # file, which mv refuses; remove the old one first.)
  rm -f "$out-notls"
  mv "$out" "$out-notls"
  out=$out-notls
fi
ls -l "$out"
file "$out"
