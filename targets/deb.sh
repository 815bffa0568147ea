#!/usr/bin/env bash
# Debian package of edgecache for a cross target, built with cargo-deb from the
# binary targets/build.sh makes (built first if missing), then inspected.
#   targets/deb.sh                                 # aarch64-unknown-linux-musl -> arm64 (static)
#   targets/deb.sh armv7-unknown-linux-gnueabihf   # armhf, glibc >= 2.34
#   targets/deb.sh aarch64-unknown-linux-gnu       # arm64, glibc >= 2.34
#   targets/deb.sh host                            # this machine's arch, glibc, from
#                                                  # target/release (targets/systemd-test.sh)
# Output: target/debian/<TARGET>/edgecache_<version>-1_<arch>.deb (path printed
# last). Packaging metadata: [package.metadata.deb] in Cargo.toml; maintainer
# scripts: systemd/debian/. Checks: Architecture, expected files and modes,
# /etc files are conffiles, maintainer scripts neither enable nor start the
# unit, lintian reports no errors (installed if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T=${1:-aarch64-unknown-linux-musl}
CARGO_DEB_VERSION=3.6.2   # pinned: the systemd-units/variants behaviour below is this version's

# variant: the static musl binary needs no libc (base metadata, Depends:
# redis-server only); glibc builds use [package.metadata.deb.variants.glibc],
# which declares libc6 (>= $GLIBC_MAX) by hand instead of running
# dpkg-shlibdeps on a cross binary.
GLIBC_MAX=2.34
case $T in
  aarch64-unknown-linux-musl)    arch=arm64 variant= ;;
  aarch64-unknown-linux-gnu)     arch=arm64 variant=glibc ;;
  armv7-unknown-linux-gnueabihf) arch=armhf variant=glibc ;;
  # The same package for the build machine: the release binary the demo and
  # the benchmarks build, linked against the host's glibc.
  host)                          arch=$(dpkg --print-architecture) variant=glibc ;;
  *) echo "unsupported target: $T" >&2; exit 2 ;;
esac

[[ "$(cargo deb --version 2>/dev/null)" == *" $CARGO_DEB_VERSION" ]] ||
  cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"

if [[ $T == host ]]; then
  bin=target/release/edgecache target_args=()
  cargo build --locked --release --bin edgecache
else
  bin=target/$T/release/edgecache target_args=(--target "$T")
  [[ -x $bin ]] || targets/build.sh "$T"
fi

# A .deb that failed a check is deleted, so it cannot be shipped by mistake.
deb=
fail() { echo "deb.sh: FAIL: $*" >&2; [[ $deb != *.deb ]] || rm -f "$deb"; exit 1; }

if [[ -n $variant ]]; then
  # The hand-written libc6 dependency must cover every versioned glibc symbol.
  need=$(readelf -V -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
  [[ $(printf '%s\n' "$need" "$GLIBC_MAX" | sort -V | tail -1) == "$GLIBC_MAX" ]] ||
    fail "$bin needs GLIBC_$need; raise libc6 (>= ...) in Cargo.toml's variants.glibc and GLIBC_MAX here"
else
  file -b "$bin" | grep -q 'statically linked' || fail "$bin is not statically linked"
fi

# --no-build: the binary comes from targets/build.sh (zigbuild / cross gcc).
# --no-strip: it is already stripped ([profile.release] strip = true), and the
# host's strip cannot handle ARM binaries anyway.
out=target/debian/$T
mkdir -p "$out"
SECONDS=0
deb=$(cargo deb --locked --no-build --no-strip "${target_args[@]}" ${variant:+--variant "$variant"} \
        --output "$out/" | tail -1)
echo "cargo deb: ${SECONDS}s"
[[ -f $deb ]] || fail "cargo deb did not report a .deb (got: $deb)"

echo "== dpkg-deb --info $deb"
dpkg-deb --info "$deb"
echo "== dpkg-deb --contents $deb"
contents=$(dpkg-deb --contents "$deb")
echo "$contents"

[[ $(dpkg-deb --field "$deb" Architecture) == "$arch" ]] ||
  fail "Architecture is $(dpkg-deb --field "$deb" Architecture), expected $arch"
dpkg-deb --field "$deb" Depends | grep -qw redis-server || fail "Depends lacks redis-server"

# mode path: each expected file present with its mode.
for want in \
  '-rwxr-xr-x ./usr/bin/edgecache' \
  '-rw-r--r-- ./usr/lib/systemd/system/edgecache.service' \
  '-rw-r--r-- ./etc/edgecache/edgecache.toml' \
  '-rw-r--r-- ./etc/redis/redis-edgecache.conf' \
  '-rw-r--r-- ./usr/share/doc/edgecache/README.md' \
  '-rw-r--r-- ./usr/share/doc/edgecache/FORMAT.md' \
  '-rw-r--r-- ./usr/share/doc/edgecache/copyright' \
  '-rw-r--r-- ./usr/share/doc/edgecache/changelog.Debian.gz' \
  '-rw-r--r-- ./usr/share/lintian/overrides/edgecache'
do
  mode=${want%% *} path=${want#* }
  awk -v m="$mode" -v p="$path" '$1 == m && $NF == p { found = 1 } END { exit !found }' \
    <<<"$contents" || fail "missing or wrong mode: $want"
done

ctl=$(mktemp -d); trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl"
echo "== conffiles"
cat "$ctl/conffiles"
for f in /etc/edgecache/edgecache.toml /etc/redis/redis-edgecache.conf; do
  grep -qx "$f" "$ctl/conffiles" || fail "$f is not a conffile"
done

# Maintainer scripts: valid sh; the unit is not enabled (unless an admin had
# enabled it before an upgrade) and only ever try-restarted (on upgrade),
# never started by the package.
for s in postinst postrm prerm; do
  [[ -f $ctl/$s ]] || fail "no $s"
  sh -n "$ctl/$s" || fail "$s: sh syntax"
  ! grep -q '#DEBHELPER#' "$ctl/$s" || fail "$s: #DEBHELPER# not replaced"
  # cargo-deb replaces every occurrence of the token, comments included.
  [[ $(grep -c 'Automatically added by cargo-deb' "$ctl/$s") == \
     $(grep -c '^# Automatically added by cargo-deb$' "$ctl/$s") ]] ||
    fail "$s: generated snippet spliced into a comment"
done
! grep -Eq 'deb-systemd-invoke (start|restart) ' "$ctl/postinst" || fail "postinst starts the unit"
# shellcheck disable=SC2016 # the literal line of the script
grep -q 'include $DROPIN' "$ctl/postinst" || fail "postinst lacks the redis include step"

# Run the packaged postinst/postrm with sh (dash), their /etc/redis and
# /run/systemd paths moved into a scratch root and stub deb-systemd-helper,
# deb-systemd-invoke and systemctl that only log: the redis.conf edit is
# added once on its own line, kept on remove, undone on purge; the unit is
# daemon-reloaded, neither enabled nor started on a first install, enabled
# again on upgrade only if it was enabled; nothing fails without redis.conf.
# The stub deb-systemd-helper answers `debian-installed` and `was-enabled`
# with $WAS_ENABLED (1: no, a first install).
echo "== maintainer scripts in a scratch root"
sb=$ctl/sandbox; mkdir -p "$sb/bin" "$sb/etc/redis" "$sb/run/systemd/system"
for c in deb-systemd-helper deb-systemd-invoke systemctl; do
  printf '#!/bin/sh\necho "%s $*" >>"%s/calls"\n' "$c" "$sb" >"$sb/bin/$c"; chmod +x "$sb/bin/$c"
done
# shellcheck disable=SC2016 # expanded when the stub runs
printf 'case $1 in debian-installed|was-enabled) exit ${WAS_ENABLED:-1} ;; esac\n' >>"$sb/bin/deb-systemd-helper"
for s in postinst postrm; do
  sed -e "s|/etc/redis/|$sb/etc/redis/|g" -e "s|/run/systemd/system|$sb/run/systemd/system|g" \
    "$ctl/$s" >"$sb/$s"
done
run() { PATH=$sb/bin:$PATH sh -e "$sb/$1" "${@:2}" 2>/dev/null || fail "$* exited $?"; }
conf=$sb/etc/redis/redis.conf
printf 'bind 127.0.0.1\nport 6379' >"$conf"          # no final newline
orig=$(cat "$conf"); echo "dropin" >"$sb/etc/redis/redis-edgecache.conf"
inc="include $sb/etc/redis/redis-edgecache.conf"
run postinst configure
run postinst configure 0.1.0-1                       # upgrade: no second line
[[ $(grep -cx "$inc" "$conf") == 1 && $(tail -1 "$conf") == "$inc" ]] || fail "include not appended once: $(cat "$conf")"
grep -qx 'port 6379' "$conf" || fail "missing newline before the include"
! grep -q 'deb-systemd-helper enable' "$sb/calls" || fail "unit enabled on install: $(cat "$sb/calls")"
grep -q 'systemctl --system daemon-reload' "$sb/calls" || fail "no daemon-reload"
! grep -Eq 'deb-systemd-invoke (start|restart) ' "$sb/calls" || fail "unit started: $(cat "$sb/calls")"
grep -q 'deb-systemd-invoke try-restart edgecache.service' "$sb/calls" || fail "no try-restart on upgrade"
run postrm remove
grep -qx "$inc" "$conf" || fail "include removed on plain remove"
run postrm purge
run postrm purge                                     # idempotent
[[ $(cat "$conf") == "$orig" ]] || fail "purge left: $(cat "$conf")"
rm "$conf"; run postinst configure; [[ ! -e $conf ]] || fail "redis.conf created"
# An admin enabled the unit: an upgrade keeps it enabled.
: >"$sb/calls"; WAS_ENABLED=0 run postinst configure 0.1.0-1
grep -q 'deb-systemd-helper enable edgecache.service' "$sb/calls" || fail "upgrade dropped the admin's enable"
echo "ok: include added once, kept on remove, removed on purge; not enabled on install, never started"

# The packaged binary is the one built for this target.
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/edgecache | cmp -s - "$bin" ||
  fail "packaged /usr/bin/edgecache differs from $bin"

# lintian: errors fail the package (warnings and infos are printed only).
command -v lintian >/dev/null || {
  [[ -n $(find /var/lib/apt/lists -name '*Packages*' -print -quit) ]] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null; }
echo "== lintian"
findings=$(lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v "running with root privileges" || true)
[[ -z $findings ]] || echo "$findings"
! grep -q '^E: ' <<<"$findings" || fail "lintian reports errors (E: above)"

echo "OK $deb ($(stat -c %s "$deb") bytes)"
echo "$deb"
