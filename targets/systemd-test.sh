#!/usr/bin/env bash
# The packaged unit under a real systemd: a minimal Debian 12 root filesystem
# (debootstrap) booted with systemd as PID 1 (systemd-nspawn, no Docker),
# the .deb installed into it with a real redis-server, the agent pointed at
# the test broker on the host (the container shares the host's network).
#   targets/systemd-test.sh            build the host-arch .deb if needed, run all checks
#   targets/systemd-test.sh --rootfs   only make (or find) the cached root filesystem
# Needs root, the test broker (bash tests/services.sh kafka-start) on
# 127.0.0.1:${EDGECACHE_KAFKA_PORT:-39092}; installs debootstrap and
# systemd-container if missing. Any missing piece fails the run; nothing skips.
# Checks, in order (RELIABILITY.md "The unit under systemd"):
#  1. the package neither enables nor starts the unit;
#  2. a configuration with an unknown key: the start fails once, exit 78,
#     no restart loop (NRestarts=0 after several RestartSec periods);
#  3. a 100k-record rehydrate: `systemctl start` returns once READY, the unit
#     is active (running) with STATUS "live...", Redis holds the oracle's
#     keys; the Redis password comes from LoadCredential=; then live updates
#     and tombstones; the agent raised its niceness to 10 for the rehydrate
#     and all its threads are back at 0 (LimitNICE=+0). On a host whose hard
#     RLIMIT_NICE is below 20 without CAP_SYS_RESOURCE (this CI machine) no
#     unit can get RLIMIT_NICE 20: the run then checks the documented
#     fallback and prints "NOT VERIFIED ON THIS HOST" for the return;
#     the journal has no SIGSYS, EPERM, warning or restart;
#  4. the watchdog restarts an agent frozen with SIGSTOP (WatchdogSec
#     shortened to 5 s by a test drop-in; the shipped unit says 30);
#  5. `systemctl stop` exits 0 well within TimeoutStopSec, no SIGKILL.
# The root filesystem is cached under $HOME/.cache/edgecache/ (73 s to make
# here, then seconds to copy); each run boots a fresh copy. About 1.5 min.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT=${EDGECACHE_KAFKA_PORT:-39092}
BROKERS=127.0.0.1:$PORT
CACHE=${EDGECACHE_CACHE:-$HOME/.cache/edgecache}
SUITE=bookworm
MIRROR=${EDGECACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the container needs besides minbase: systemd as init, dbus for
# systemctl's peers, the Redis the package depends on.
PKGS=systemd,systemd-sysv,dbus,redis-server
RECORDS=100000
KEYS=20000

say() { printf '\n== %s\n' "$*"; }
die() { echo "systemd-test.sh: FAIL: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root (debootstrap, systemd-nspawn)"

need() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
need debootstrap systemd-container

# The cached tree is keyed by what made it; a tree is only used once its
# marker exists, so an interrupted debootstrap is redone, not trusted.
rootfs_cached() {
  local key; key=$(printf '%s\n' "$SUITE" "$PKGS" minbase | sha256sum | cut -c1-12)
  local dir=$CACHE/rootfs-$SUITE-$key
  if [[ ! -f $dir/.complete ]]; then
    mkdir -p "$CACHE"; rm -rf "$dir" "$dir.tmp"
    echo "making the $SUITE root filesystem in $dir (debootstrap, a few minutes)" >&2
    local t0=$SECONDS
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$dir.tmp" "$MIRROR" \
      >"$CACHE/debootstrap.log" 2>&1 ||
      { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    # No package caches or lists in the copy each run makes.
    rm -rf "$dir.tmp"/var/cache/apt/archives/*.deb "$dir.tmp"/var/lib/apt/lists/*
    touch "$dir.tmp/.complete"; mv "$dir.tmp" "$dir"
    echo "root filesystem made in $((SECONDS - t0)) s" >&2
  fi
  echo "$dir"
}

if [[ ${1:-} == --rootfs ]]; then rootfs_cached; exit 0; fi

T0=$SECONDS
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_open "$PORT" ||
  die "no Kafka broker at $BROKERS: run 'bash tests/services.sh deps && bash tests/services.sh kafka-start'"
kafka_tool() { bash tests/services.sh kafka-tool "$@"; }

say "The package for this machine (targets/deb.sh host)"
deb=$(bash targets/deb.sh host | tail -1)
[[ -f $deb ]] || die "targets/deb.sh host made no .deb"

say "Root filesystem"
cached=$(rootfs_cached)
WORK=$(mktemp -d /var/tmp/edgecache-systemd-test.XXXXXX)
M=$WORK/root
TOPIC=edgecache-systemd-test-$(date +%s)-$$
NSPAWN='' LEADER=''
cleanup() {
  local rc=$?
  if [[ -n $NSPAWN ]] && kill -0 "$NSPAWN" 2>/dev/null; then
    # SIGTERM: systemd-nspawn asks the container's systemd to power off.
    kill -TERM "$NSPAWN" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$NSPAWN" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  # The broker is shared: leave no test topic behind (best effort).
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKERS" \
    --delete --topic "$TOPIC" >/dev/null 2>&1 || true
  exit $rc
}
trap cleanup EXIT
cp -a "$cached" "$M"
rm -f "$M/.complete"
echo "copied $cached to $M"

# The container shares the host's network (no --private-network), so it
# reaches the broker on 127.0.0.1; its Redis must then listen on no TCP port
# (a host Redis may hold 6379): the socket from the package's drop-in only.
# requirepass: the agent can only get in with the password handed over by
# LoadCredential= (the file is root-only, the agent runs as a dynamic user).
PW=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '\n# systemd-test.sh: socket only, password required\nport 0\nrequirepass %s\n' "$PW" \
  >>"$M/etc/redis/redis.conf"
# With no port and no socket yet Redis would fail at boot; the test starts it
# once the package has added the socket (as README's steps do).
rm -f "$M/etc/systemd/system/multi-user.target.wants/redis-server.service"
cp "$deb" "$M/root/edgecache.deb"

say "Booting it: systemd-nspawn -b --register=no --keep-unit"
tboot=$SECONDS
systemd-nspawn -q -b --register=no --keep-unit -D "$M" --console=read-only \
  >"$WORK/console.log" 2>&1 &
NSPAWN=$!
for _ in $(seq 100); do
  LEADER=$(pgrep -P "$NSPAWN" -x systemd || true)
  [[ -n $LEADER ]] && break
  kill -0 "$NSPAWN" 2>/dev/null || { cat "$WORK/console.log" >&2; die "systemd-nspawn exited"; }
  sleep 0.2
done
[[ -n $LEADER ]] || die "no systemd in the container after 20 s"
# A command inside the container (all its namespaces), with a clean
# environment so nothing of this shell leaks in.
ct() { nsenter -t "$LEADER" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"; }
# systemctl fails until systemd has opened its private bus socket.
for _ in $(seq 100); do ct systemctl is-system-running >/dev/null 2>&1 && break
  [[ $(ct systemctl is-system-running 2>/dev/null) == "" ]] || break; sleep 0.2; done
state=$(ct timeout 90 systemctl is-system-running --wait || true)
[[ $state == running ]] || { ct systemctl --failed --no-pager >&2 || true; die "container boot: $state"; }
echo "systemd $(ct systemctl --version | head -1 | cut -d' ' -f2) is PID 1 in the container, $state $((SECONDS - tboot)) s after boot"

# From here a failure also shows the agent's journal.
die() {
  echo "systemd-test.sh: FAIL: $*" >&2
  if [[ -n $LEADER ]]; then ct journalctl -u edgecache -o short-monotonic --no-pager -n 60 >&2 || true; fi
  exit 1
}
show() { ct systemctl show edgecache -p "$1" --value; }
expect() { local got; got=$(show "$1"); [[ $got == "$2" ]] || die "$1=$got, want $2 ($3)"; }
rcli() { ct redis-cli --no-auth-warning -s /run/redis/redis-server.sock -a "$PW" "$@"; }
cursor() { ct journalctl --show-cursor -n 0 -q | sed -n 's/^-- cursor: //p'; }

say "1. Install: neither enabled nor started"
ct dpkg -i /root/edgecache.deb 2>&1 | sed 's/^/  dpkg: /'
[[ $(ct systemctl is-enabled edgecache || true) == disabled ]] || die "unit enabled by the package"
[[ $(ct systemctl is-active edgecache || true) == inactive ]] || die "unit started by the package"
grep -qx 'include /etc/redis/redis-edgecache.conf' "$M/etc/redis/redis.conf" || die "no include in redis.conf"
ct systemctl restart redis-server
[[ $(rcli ping) == PONG ]] || die "Redis not answering on /run/redis/redis-server.sock"
[[ $(rcli config get appendonly | tail -1) == yes ]] || die "the drop-in's appendonly is not on"
echo "ok: disabled and inactive; Redis on the drop-in's socket with appendonly"

# The user's steps: the password as a root-only file handed over by
# LoadCredential= in a drop-in (README "Connecting to cloud Kafka").
install -m 600 /dev/null "$M/etc/edgecache/redis-password"
printf '%s' "$PW" >"$M/etc/edgecache/redis-password"
mkdir -p "$M/etc/systemd/system/edgecache.service.d"
printf '[Service]\nLoadCredential=redis-password:/etc/edgecache/redis-password\n' \
  >"$M/etc/systemd/system/edgecache.service.d/credentials.conf"
ct systemctl daemon-reload
config() {
  cat <<CONF
$1
[kafka]
brokers = "$BROKERS"
[redis]
url = "unix:///run/redis/redis-server.sock"
password_file = "redis-password"
[[topics]]
name = "$TOPIC"
key_prefix = "st:"
input = "json"
store = "json"
CONF
}

say "2. A configuration with an unknown key: fails once with 78, no restart loop"
config $'[agent]\nno_such_key = 1' >"$M/etc/edgecache/edgecache.toml"
c=$(cursor)
! ct systemctl start edgecache 2>/dev/null || die "systemctl start succeeded with a bad configuration"
# Several RestartSec=2 periods: a restart loop would show here.
sleep 8
expect ActiveState failed "bad configuration"
expect Result exit-code "bad configuration"
expect ExecMainStatus 78 "bad configuration"
expect NRestarts 0 "bad configuration: no restart"
n=$(ct journalctl -u edgecache --after-cursor="$c" -o cat | grep -c 'invalid configuration' || true)
[[ $n == 1 ]] || die "$n 'invalid configuration' lines in 8 s, want 1"
ct journalctl -u edgecache --after-cursor="$c" -o cat | grep 'invalid configuration' | sed 's/^/  journal: /'
# (systemctl status exits 3 for a failed unit.)
st=$(ct systemctl status edgecache --no-pager 2>&1 || true)
grep -E 'Active:|Main PID:' <<<"$st" | sed 's/^/  status: /'
grep -q 'Main PID: .*(code=exited, status=78' <<<"$st" || die "status does not show status=78"
echo "ok: failed, status=78, NRestarts=0, one attempt in 8 s"

say "3. $RECORDS records over $KEYS keys, then systemctl start (rehydrate)"
kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKERS" --create \
  --topic "$TOPIC" --partitions 3 --config cleanup.policy=compact >/dev/null
t=$SECONDS
# Record i: key k(i mod KEYS), value {"i":i}; the last value of key kj is
# {"i":RECORDS-KEYS+j}.
produce() {
  kafka_tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$BROKERS" --topic "$TOPIC" \
    --property parse.key=true --property key.separator=$'\t' --property null.marker=NULL \
    --producer-property linger.ms=20 --producer-property batch.size=262144 >/dev/null
}
awk -v n="$RECORDS" -v k="$KEYS" 'BEGIN { for (i = 0; i < n; i++) printf "k%d\t{\"i\":%d}\n", i % k, i }' | produce
echo "produced $RECORDS records in $((SECONDS - t)) s"
config "" >"$M/etc/edgecache/edgecache.toml"
ct edgecache check-config --config /etc/edgecache/edgecache.toml >/dev/null || die "check-config rejects the test config"
ct systemctl reset-failed edgecache
c=$(cursor)
t=$SECONDS
# Type=notify: returns once the agent sent READY=1 (caught up).
ct systemctl start edgecache || die "systemctl start failed"
echo "systemctl start returned after $((SECONDS - t)) s"
expect ActiveState active "after start"
expect SubState running "after start"
status=$(show StatusText)
[[ $status == live* ]] || die "STATUS=$status, want live..."
{ ct systemctl status edgecache --no-pager 2>&1 || true; } | grep -E 'Active:|Status:' | sed 's/^/  status: /'
[[ $(rcli hget edgecache:status records) == "$RECORDS" ]] ||
  die "status records=$(rcli hget edgecache:status records), want $RECORDS"
[[ $(rcli hget edgecache:status state) == live ]] || die "state $(rcli hget edgecache:status state)"
keys=$(rcli --scan --pattern 'st:*' | wc -l)
[[ $keys == "$KEYS" ]] || die "$keys keys in Redis, want $KEYS"
for j in 0 1 7777 $((KEYS - 1)); do
  got=$(rcli get "st:k$j"); want="{\"i\":$((RECORDS - KEYS + j))}"
  [[ $got == "$want" ]] || die "st:k$j = $got, want $want"
done
echo "ok: READY, active (running), Status: \"$status\"; $KEYS keys with their last values; the credential was read"

say "3b. Live updates and tombstones"
live=1000
{ for ((j = 0; j < live / 2; j++)); do printf 'k%d\t{"i":%d}\n' "$j" $((RECORDS + j)); done
  for ((j = live / 2; j < live; j++)); do printf 'k%d\tNULL\n' "$j"; done; } | produce
want=$((RECORDS + live))
for _ in $(seq 60); do [[ $(rcli hget edgecache:status records) == "$want" ]] && break; sleep 0.5; done
[[ $(rcli hget edgecache:status records) == "$want" ]] ||
  die "records=$(rcli hget edgecache:status records) 30 s after the live batch, want $want"
[[ $(rcli get st:k3) == "{\"i\":$((RECORDS + 3))}" ]] || die "live update of st:k3: $(rcli get st:k3)"
[[ $(rcli exists st:k600) == 0 ]] || die "tombstoned st:k600 still exists"
keys=$(rcli --scan --pattern 'st:*' | wc -l)
[[ $keys == $((KEYS - live / 2)) ]] || die "$keys keys after the tombstones, want $((KEYS - live / 2))"
echo "ok: $((live / 2)) updates and $((live / 2)) deletes applied live"

# Niceness: raised for the rehydrate (setpriority passes the syscall
# filter), back to 0 once live, which needs RLIMIT_NICE 20 (LimitNICE=+0).
log=$(ct journalctl -u edgecache --after-cursor="$c" -o cat)
grep -q 'CPU priority for catching up niceness=10' <<<"$log" ||
  die "no 'CPU priority for catching up niceness=10' in the journal"
[[ $(show LimitNICE) == 20 ]] || die "systemd parsed LimitNICE=+0 as $(show LimitNICE), want 20"
pid=$(show MainPID)
nices() { ct sh -c "for s in /proc/$pid/task/*/stat; do sed 's/.*) //' \$s | cut -d' ' -f17; done" | sort -u | tr '\n' ' '; }
nice_limit() { ct sh -c "grep 'Max nice priority' /proc/$1/limits" | awk '{print $(NF-1)}'; }
nthreads=$(ct sh -c "ls /proc/$pid/task | wc -l")
capped=no
if [[ $(nice_limit "$pid") == 20 ]]; then
  grep -q 'CPU priority for live updates niceness=0' <<<"$log" || die "no return to niceness 0 in the journal"
  [[ $(nices) == "0 " ]] || die "agent threads' niceness now: $(nices), want 0"
  echo "ok: niceness 10 while rehydrating, all $nthreads threads back at 0 (RLIMIT_NICE 20)"
elif (($(nice_limit 1) < 20)); then
  # The container's PID 1 itself has a lower hard RLIMIT_NICE (inherited
  # from the host, and raising it needs CAP_SYS_RESOURCE, which some CI
  # sandboxes drop), so no unit can get 20 here. What is left to check is
  # the documented fallback; the return itself is NOT proven on this host.
  capped=yes
  grep -q 'cannot set niceness 0 for live updates.*RLIMIT_NICE' <<<"$log" ||
    die "RLIMIT_NICE capped, but no warning naming it"
  [[ $(nices) == "10 " ]] || die "agent threads' niceness now: $(nices), want 10 (capped)"
  echo "NOT VERIFIED ON THIS HOST: the return to niceness 0. The container's PID 1 has a hard"
  bnd=0x$(awk '/^CapBnd/ {print $2}' /proc/self/status)
  echo "  RLIMIT_NICE of $(nice_limit 1) (host: $(ulimit -He); CAP_SYS_RESOURCE (bit 24) in the host's bounding set:"
  echo "  $(( (bnd >> 24) & 1 ))), so LimitNICE=+0 (=20) cannot be granted."
  echo "  Checked instead: systemd parsed LimitNICE=20, the agent raised to 10, warned once"
  echo "  naming RLIMIT_NICE and kept all $nthreads threads at 10 while mirroring."
else
  die "the agent's RLIMIT_NICE is $(nice_limit "$pid") though PID 1 could grant 20"
fi

# The journal of this run: no seccomp kill, no EPERM from the filter, no
# restart, no warning or error from the agent.
# (With RLIMIT_NICE capped, the expected niceness warning is the exception.)
[[ $capped == no ]] || log=$(grep -v 'cannot set niceness 0 for live updates.*RLIMIT_NICE' <<<"$log")
bad=$(grep -Ei 'SIGSYS|bad system call|operation not permitted|EPERM|permission denied|core-dump|restart| WARN | ERROR |watchdog' <<<"$log" || true)
[[ -z $bad ]] || die "journal not clean: $bad"
expect NRestarts 0 "after rehydrate and live updates"
echo "ok: journal clean ($(wc -l <<<"$log") lines), NRestarts=0"

say "4. The watchdog restarts a frozen agent (WatchdogSec=5 by a test drop-in)"
# The shipped 30 s would make this step take a minute; the mechanism is the same.
printf '[Service]\nWatchdogSec=5\n' >"$M/etc/systemd/system/edgecache.service.d/watchdog-test.conf"
ct systemctl daemon-reload
ct systemctl restart edgecache || die "restart with WatchdogSec=5 failed"
[[ $(show WatchdogUSec) == 5s ]] || die "WatchdogUSec=$(show WatchdogUSec)"
old=$(show MainPID) n0=$(show NRestarts)
c=$(cursor)
t=$SECONDS
ct sh -c "kill -STOP $old"   # (minbase has no kill binary)
until [[ $(show NRestarts) -gt $n0 && $(show ActiveState) == active && $(show MainPID) != "$old" ]]; do
  ((SECONDS - t < 60)) || die "no watchdog restart 60 s after SIGSTOP"
  sleep 0.5
done
echo "restarted and READY again $((SECONDS - t)) s after SIGSTOP (main pid $old -> $(show MainPID))"
ct journalctl -u edgecache --after-cursor="$c" -o cat | grep -qi 'watchdog timeout' ||
  die "restart not caused by the watchdog"
ct journalctl -u edgecache --after-cursor="$c" -o cat | grep -iE 'watchdog|restart' | sed 's/^/  journal: /'
[[ $(show StatusText) == live* ]] || die "after the watchdog restart STATUS=$(show StatusText)"
echo "ok: watchdog timeout, restarted, live again"

say "5. systemctl stop"
c=$(cursor)
t=$SECONDS
ct systemctl stop edgecache
took=$((SECONDS - t))
expect ActiveState inactive "after stop"
expect Result success "after stop"
expect ExecMainStatus 0 "after stop"
log=$(ct journalctl -u edgecache --after-cursor="$c" -o cat)
! grep -Eqi 'SIGKILL|timed out|killing' <<<"$log" || die "stop was not clean: $log"
((took < 10)) || die "stop took $took s (TimeoutStopSec=10)"
[[ $(rcli hget edgecache:status state) == stopped ]] || die "status hash: $(rcli hget edgecache:status state)"
echo "ok: stopped in $took s, exit 0, state 'stopped'"

say "PASS: the unit under systemd in $((SECONDS - T0)) s"
