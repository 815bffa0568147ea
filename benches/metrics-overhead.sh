#!/usr/bin/env bash
# Overhead of the metrics endpoint on the data path (README, Metrics): the
# same rehydrate (N records, 3 partitions, 20,000 keys) with [metrics] off,
# and on while scraped every 100 ms, alternating; prints wall time to apply
# everything, the agent's CPU seconds and peak RSS per run. Needs the test
# broker (tests/services.sh kafka-start), redis-server, redis-cli, bc.
#   N=200000 BIN=target/release/edgecache bash benches/metrics-overhead.sh
set -euo pipefail
W=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$W/target/debug/edgecache}
TOPIC=mbench-$$-$(date +%s)
N=${N:-200000}
bash $W/tests/services.sh kafka-tool org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:39092 --create --topic $TOPIC --partitions 3 --config cleanup.policy=compact >/dev/null 2>&1
awk -v n=$N 'BEGIN{for(i=0;i<n;i++) printf "k%d\t{\"v\":%d,\"s\":\"abcdefghij\"}\n", i%20000, i}' | \
  bash $W/tests/services.sh kafka-tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server 127.0.0.1:39092 --topic $TOPIC --property parse.key=true --property key.separator=$'\t' --producer-property linger.ms=20 --producer-property batch.size=262144 >/dev/null
run() { # mode
  local port mport
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local d; d=$(mktemp -d)
  redis-server --port $port --bind 127.0.0.1 --save "" --appendonly no --daemonize no --dir $d >/dev/null &
  local rpid=$!; sleep 0.3
  {
    printf '[kafka]\nbrokers = "127.0.0.1:39092"\n[redis]\nurl = "redis://127.0.0.1:%s/0"\n[[topics]]\nname = "%s"\nkey_prefix = "d:"\n' $port $TOPIC
    [[ $1 == on ]] && printf '[metrics]\nlisten = "127.0.0.1:%s"\n' $mport
  } > $d/c.toml
  $BIN run --config $d/c.toml 2> $d/log &
  local apid=$!
  local spid=
  if [[ $1 == on ]]; then
    ( while sleep 0.1; do exec 3<>/dev/tcp/127.0.0.1/$mport 2>/dev/null || continue; printf 'GET /metrics HTTP/1.1\r\n\r\n' >&3; cat <&3 >/dev/null; exec 3>&-; done ) &
    spid=$!
  fi
  local t0; t0=$(date +%s.%N)
  while [[ "$(redis-cli -p $port HGET edgecache:status records)" != "$N" ]]; do
    kill -0 $apid || { echo "agent died:"; cat $d/log; exit 1; }
    sleep 0.05
  done
  local t1; t1=$(date +%s.%N)
  local cpu; cpu=$(awk '{print ($14+$15)/100}' /proc/$apid/stat)
  local secs; secs=$(echo "$t1 - $t0" | bc)
  local rss; rss=$(awk '/VmHWM/{print $2}' /proc/$apid/status)
  local scrapes=0
  [[ -n $spid ]] && { kill $spid; wait $spid 2>/dev/null || true; }
  kill -TERM $apid; wait $apid || true
  kill $rpid; wait $rpid 2>/dev/null || true
  echo "$1 wall=${secs}s agent_cpu=${cpu}s peak_rss_kib=$rss"
  rm -rf $d
}
for i in 1 2 3 4 5; do run off; run on; done
