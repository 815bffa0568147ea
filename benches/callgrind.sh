#!/usr/bin/env bash
# Agent instructions per record under callgrind (the machine has no hardware
# counters): a rehydrate of N JSON records (N/10 keys, ~10% tombstones, device
# states like the benchmark's) into a fresh redis-server, for each store
# format and each agent binary given, all threads from start to SIGTERM
# divided by N (start-up included). Usage:
#   benches/callgrind.sh [N] BIN...        e.g. 50000 target/release/edgecache /tmp/main-edgecache
# Needs valgrind, kcat, redis-server and the broker (tests/services.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:?records}; shift
BROKERS=${EDGECACHE_TEST_BROKERS:-127.0.0.1:39092}
TOPIC=bench-callgrind-$$-$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

bash "$ROOT/tests/services.sh" kafka-tool org.apache.kafka.tools.TopicCommand \
  --create --topic "$TOPIC" --partitions 6 --bootstrap-server "$BROKERS" >/dev/null
# Tab-separated key and value; an empty value is a tombstone (kcat -Z).
python3 - "$N" >"$WORK/records" <<'EOF'
import random, sys
n = int(sys.argv[1]); rng = random.Random(14)
for i in range(n):
    d = rng.randrange(max(n // 10, 1))
    if rng.randrange(10) == 0:
        print(f"sensor-{d}\t"); continue
    print(f'sensor-{d}\t{{"device":"sensor-{d}","site":"plant-{d % 17}","ts":{1767225600000 + i},'
          f'"temp_c":{15 + rng.randrange(20)}.{rng.randrange(10)},"humidity":{30 + rng.randrange(50)}.{rng.randrange(10)},'
          f'"battery_v":3.{rng.randrange(100):02},"rssi":-{40 + rng.randrange(60)},"online":{"true" if rng.randrange(20) else "false"},'
          f'"fw":"2.{rng.randrange(5)}.{rng.randrange(12)}","mode":"{rng.choice(["auto", "eco", "manual"])}","alarms":[]}}')
EOF
kcat -P -b "$BROKERS" -t "$TOPIC" -K $'\t' -Z -l "$WORK/records"

for bin in "$@"; do
  for store in postcard json; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null &
    redis=$!
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
    cat >"$WORK/agent.toml" <<EOF
[kafka]
brokers = "$BROKERS"
[redis]
url = "redis://127.0.0.1:$port/0"
[[topics]]
name = "$TOPIC"
key_prefix = "device:"
input = "json"
store = "$store"
EOF
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
      "$bin" run --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
    agent=$!
    until [[ $(redis-cli -p "$port" hget edgecache:status state) == live ]]; do sleep 0.2; done
    kill -TERM "$agent"; wait "$agent" || true
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$WORK/cg.out")
    echo "$bin store=$store: $((total / N)) instructions/record ($total for $N records)"
    kill "$redis"; wait "$redis" || true
  done
done
bash "$ROOT/tests/services.sh" kafka-tool org.apache.kafka.tools.TopicCommand \
  --delete --topic "$TOPIC" --bootstrap-server "$BROKERS" >/dev/null
