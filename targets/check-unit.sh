#!/usr/bin/env bash
# Check systemd/edgecache.service: `systemd-analyze verify` (syntax, unknown
# keys, ExecStart executable) and `systemd-analyze security` (exposure <= 2.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UNIT=systemd/edgecache.service

command -v systemd-analyze >/dev/null || {
  [[ -n $(find /var/lib/apt/lists -name '*Packages*' -print -quit) ]] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; }

# verify needs the unit's binaries and systemd's own targets; a throwaway root
# holds both, so nothing is installed on this host (works without systemd
# as PID 1, e.g. in containers). Any message counts as a failure: verify
# exits 0 on "Unknown key ... ignoring".
root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
install -m755 /bin/true "$root/usr/bin/edgecache"   # only executability is checked
cp "$UNIT" "$root/etc/systemd/system/"
echo "== systemd-analyze verify $UNIT"
out=$(systemd-analyze verify --root="$root" edgecache.service 2>&1) || { echo "$out"; exit 1; }
[[ -z $out ]] || { echo "$out"; exit 1; }

# --threshold=20 makes the command fail above exposure 2.0.
echo "== systemd-analyze security --offline=true --threshold=20 $UNIT"
systemd-analyze security --offline=true --threshold=20 "$UNIT" | grep -E '✗|Overall'
