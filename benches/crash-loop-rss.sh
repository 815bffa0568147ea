#!/usr/bin/env bash
# Peak RSS in a crash loop (issue 17): the agent is SIGKILLed 0.3-0.9 s
# after each of 8 starts mid-rehydrate (Redis with the append-only file on,
# everysec), then left to reach `live`. Prints VmHWM of every start, and
# RSS at `live` and 5 s later (idle).
#
#   bash benches/crash-loop-rss.sh target/release/edgecache TOPIC
#
# TOPIC: a topic on the test broker (EDGECACHE_TEST_BROKERS, 127.0.0.1:39092)
# with a backlog, e.g. the 1M-record topic `cargo bench --bench edgecache`
# leaves behind (`kcat -L` lists them as bench-rehydrate-*). Needs
# redis-server and redis-cli.
set -euo pipefail
BIN=$(realpath "$1")
TOPIC=$2
BROKERS=${EDGECACHE_TEST_BROKERS:-127.0.0.1:39092}
DIR=$(mktemp -d)
# A free port, as benches/callgrind.sh picks one (a random one could be taken).
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
trap 'redis-cli -p $PORT shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
redis-server --port "$PORT" --dir "$DIR" --appendonly yes --appendfsync everysec \
  --save "" --daemonize yes --logfile "$DIR/redis.log"
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done
cat > "$DIR/agent.toml" <<EOT
[kafka]
brokers = "$BROKERS"
[redis]
url = "redis://127.0.0.1:$PORT/0"
[[topics]]
name = "$TOPIC"
key_prefix = "device:"
EOT
status() { awk -v f="$1:" '$1 == f {print $2}' "/proc/$2/status"; }
killed=""
for i in 1 2 3 4 5 6 7 8; do
  "$BIN" run --config "$DIR/agent.toml" >"$DIR/agent-$i.log" 2>&1 &
  pid=$!
  sleep "0.$((3 + RANDOM % 7))"
  killed="$killed $(status VmHWM $pid)"
  kill -9 "$pid"
  wait "$pid" 2>/dev/null || true
done
"$BIN" run --config "$DIR/agent.toml" >"$DIR/agent-final.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  [[ $(redis-cli -p "$PORT" HGET edgecache:status state) == live ]] && break
  sleep 0.1
done
hwm=$(status VmHWM $pid)
at_live=$(status VmRSS $pid)
sleep 5
idle=$(status VmRSS $pid)
kill "$pid"
wait "$pid" 2>/dev/null || true
echo "killed starts, VmHWM KiB:$killed"
echo "final start to live: VmHWM $hwm KiB; VmRSS at live $at_live KiB, 5 s later $idle KiB; $(redis-cli -p "$PORT" DBSIZE) keys"
