#!/usr/bin/env bash
# Quick start, end to end: a local Kafka (KRaft, from Maven Central jars) and
# a local redis-server, sample device-state events, the agent, and the
# mirrored state read back from Redis. Safe to run again.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUN=${EDGECACHE_RUN:-/tmp/edgecache-run}
PORT=${EDGECACHE_KAFKA_PORT:-39092}
REDIS_PORT=${EDGECACHE_DEMO_REDIS_PORT:-6390}
TOPIC=demo-device-state
say() { printf '\n== %s\n' "$*"; }

say "Installing what is missing (redis-server, Java, Maven, Kafka jars)"
bash tests/services.sh deps

say "Building edgecache (release)"
cargo build --release --quiet --bin edgecache --example demo-produce
BIN=target/release/edgecache

started_kafka=no
if ! bash tests/services.sh kafka-status; then
  say "Starting Kafka on 127.0.0.1:$PORT"
  bash tests/services.sh kafka-start
  started_kafka=yes
fi

say "Starting redis-server on 127.0.0.1:$REDIS_PORT (append-only file on)"
mkdir -p "$RUN/demo-redis"
redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
rm -f "$RUN/demo-redis/"*.aof "$RUN/demo-redis/appendonlydir" -r
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN/demo-redis" \
  --appendonly yes --appendfsync everysec --save "" --daemonize yes \
  --logfile "$RUN/demo-redis/redis.log"
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

agent=
cleanup() {
  [[ -n $agent ]] && kill -TERM "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  [[ $started_kafka == yes ]] && bash tests/services.sh kafka-stop
  true
}
trap cleanup EXIT

say "Producing sample device-state events to the compacted topic $TOPIC"
target/release/examples/demo-produce "127.0.0.1:$PORT" "$TOPIC"

CONFIG=$RUN/demo.toml
cat >"$CONFIG" <<TOML
[kafka]
brokers = "127.0.0.1:$PORT"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"
namespace = "edgecache"
[[topics]]
name = "$TOPIC"
key_prefix = "device:"
input = "json"
store = "postcard"
TOML
"$BIN" check-config --config "$CONFIG" >/dev/null

say "Running the agent (log: $RUN/demo-agent.log)"
"$BIN" run --config "$CONFIG" 2>"$RUN/demo-agent.log" &
agent=$!
for _ in $(seq 300); do
  [[ $(redis-cli -p "$REDIS_PORT" hget edgecache:status state) == live ]] && break
  kill -0 "$agent" 2>/dev/null || { cat "$RUN/demo-agent.log"; exit 1; }
  sleep 0.1
done
[[ $(redis-cli -p "$REDIS_PORT" hget edgecache:status state) == live ]] || {
  cat "$RUN/demo-agent.log"; echo "agent did not catch up" >&2; exit 1; }

say "Mirrored state in Redis (edgecache get KEY prints any stored value as JSON)"
mapfile -t keys < <(redis-cli -p "$REDIS_PORT" --scan --pattern 'device:*' | sort)
for key in "${keys[@]}"; do
  printf '%-18s %s\n' "$key" "$("$BIN" get --config "$CONFIG" "$key")"
done
if "$BIN" get --config "$CONFIG" device:sensor-07 >/dev/null 2>&1; then
  echo "device:sensor-07 should have been deleted by its tombstone" >&2; exit 1
fi
echo "device:sensor-07   (deleted by its tombstone)"

say "Agent status (hash edgecache:status, readable by any Redis client)"
"$BIN" status --config "$CONFIG"
say "Offsets stored in Redis with the data (hash edgecache:offsets)"
redis-cli -p "$REDIS_PORT" hgetall edgecache:offsets | paste - -
[[ ${#keys[@]} -eq 7 ]] || { echo "expected 7 devices, found ${#keys[@]}" >&2; exit 1; }
say "Demo done: 7 devices mirrored, 1 deleted"
