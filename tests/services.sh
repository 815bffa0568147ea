#!/usr/bin/env bash
# Services for the real-Kafka tests, CI and the demo. No Docker here: Kafka runs
# straight from Maven Central jars on the machine's JVM.
#   deps          install missing tools + fetch the Kafka jars (idempotent)
#   kafka-start   single-node KRaft broker+controller on loopback (idempotent),
#                 with fast-start JVM flags (EDGECACHE_KAFKA_JVM_OPTS overrides)
#   kafka-start-bench  the same broker (restarted if running) with the JVM
#                 options of Kafka's own kafka-server-start.sh, for benchmarks
#   kafka-stop    stop it
#   kafka-resume  start a stopped broker again, keeping its data
#   kafka-status  exit 0 if the broker answers
#   kafka-tool CLASS ARGS...   run a Kafka CLI class, e.g.
#                 kafka-tool org.apache.kafka.tools.TopicCommand --list --bootstrap-server 127.0.0.1:39092
#   kafka-secure-start|-stop|-status   a second broker for tests/secure.rs, with
#                 its own run dir (EDGECACHE_SECURE_RUN, default /tmp/edgecache-secure)
#                 and ports (EDGECACHE_SECURE_KAFKA_PORT, default 39192):
#                   PORT    PLAINTEXT (test producer, admin, inter-broker)
#                   PORT+1  CONTROLLER
#                   PORT+2  SSL, client certificate required (mTLS)
#                   PORT+3  SASL_SSL: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
#                 The CA, certificates, the client key's password and the SASL
#                 user's password are generated at start under $RUN/kafka/clients/.
# The plain broker's start also reads (for benches/fleet.rs; unset, one node as above):
#   EDGECACHE_KAFKA_NODE_ID      this node's id (1)
#   EDGECACHE_KAFKA_VOTERS       controller.quorum.voters (1@127.0.0.1:PORT+1); the nodes of a
#                                cluster each start with the same voters and cluster id
#   EDGECACHE_KAFKA_CLUSTER_ID   the id `format` writes (random)
#   EDGECACHE_KAFKA_EXTRA_LISTENER  NAME://HOST:PORT, a second PLAINTEXT listener bound
#                                and advertised there (clients behind an emulated link)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KAFKA_VERSION=${EDGECACHE_KAFKA_VERSION:-4.1.1}
CACHE=${EDGECACHE_CACHE:-$HOME/.cache/edgecache}
LIBS=$CACHE/kafka-$KAFKA_VERSION/libs
RUN=${EDGECACHE_RUN:-/tmp/edgecache-run}
KDIR=$RUN/kafka
PORT=${EDGECACHE_KAFKA_PORT:-39092}
CPORT=$((PORT + 1))
PIDFILE=$KDIR/kafka.pid
LOG=$KDIR/server.log
# JVM output that escapes log4j (crash messages, GC errors) lands here.
OUT=$KDIR/stdout.log
SECURE=no

# Points every variable above at the secure broker, so the same functions
# start, check and stop it without touching the shared plain broker.
use_secure() {
  SECURE=yes
  RUN=${EDGECACHE_SECURE_RUN:-/tmp/edgecache-secure}
  KDIR=$RUN/kafka
  PORT=${EDGECACHE_SECURE_KAFKA_PORT:-39192}
  CPORT=$((PORT + 1))
  SSL_PORT=$((PORT + 2))
  SASL_SSL_PORT=$((PORT + 3))
  PIDFILE=$KDIR/kafka.pid
  LOG=$KDIR/server.log
  OUT=$KDIR/stdout.log
  CLIENTS=$KDIR/clients
  # A test fixture: a smaller heap leaves the shared machine's memory to the
  # plain broker and the builds.
  EDGECACHE_KAFKA_JVM_OPTS=${EDGECACHE_SECURE_KAFKA_JVM_OPTS:--Xmx256m -Xms128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1}
}

log() { echo "services.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

deps() {
  # command -> Debian package; apt-get update only when something is missing,
  # so a warm machine (CI reruns) pays nothing.
  local missing=() cmd pkg
  for pair in redis-server:redis-server mvn:maven java:openjdk-17-jre-headless \
              cmake:cmake g++:g++ perl:perl make:make openssl:openssl \
              kcat:kcat python3:python3 /usr/bin/time:time; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  # Python for the readers' tests (readers/python, tests/read.rs).
  command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-pip)
  # The font the benchmark's PNG plots are labelled with (benches/edgecache/plots.rs).
  [[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || missing+=(fonts-dejavu-core)
  # The benchmark's Python peer makes a venv (benches/edgecache/peers.rs).
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # redis-py (the Python reader's one dependency) and pytest: from PyPI, or
  # from Debian where the system Python refuses pip (PEP 668).
  if ! python3 -c 'import redis, pytest' 2>/dev/null; then
    log "installing redis-py and pytest"
    python3 -m pip install -q redis pytest 2>/dev/null ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-redis python3-pytest >/dev/null
  fi
  # Marker written last: a fetch interrupted halfway is redone, not trusted.
  if [[ ! -f $LIBS/.complete ]]; then
    log "fetching Kafka $KAFKA_VERSION jars into $LIBS"
    rm -rf "$LIBS"; mkdir -p "$CACHE"
    # Output kept aside: Debian's mvn 3.8 prints stray ANSI resets even with -q.
    mvn -q -B -f "$ROOT/tests/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS" \
      >"$CACHE/mvn.log" 2>&1 || { grep -m3 ERROR "$CACHE/mvn.log" >&2; die "fetching Kafka jars failed"; }
    touch "$LIBS/.complete"
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Pid from the pid file, only if that process is still our broker (pids recycle).
broker_pid() {
  local pid
  [[ -f $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  grep -qa 'kafka\.Kafka' "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

# On failure show the broker's first errors (the tail is usually a stack trace).
show_failure() {
  { grep -m5 -E '\] (ERROR|FATAL) ' "$LOG" | cut -c1-400; tail -n 10 "$OUT"; } >&2 2>/dev/null || true
  log "full log: $LOG"
}

java_cp() { java -cp "$LIBS/*" "$@"; }

kafka_tool() {
  [[ -f $LIBS/.complete ]] || die "Kafka jars missing: run '$0 deps'"
  # CLI tools: log4j warnings to stderr only, so their stdout stays parseable.
  java_cp -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dlog4j2.configurationFile="$ROOT/tests/kafka/log4j2-tools.properties" "$@"
}

kafka_start() {
  if port_open "$PORT"; then log "Kafka already answering on 127.0.0.1:$PORT"; return 0; fi
  [[ -f $LIBS/.complete ]] || die "Kafka jars missing: run '$0 deps'"
  kafka_stop # a leftover broker that stopped answering would hold the data dir
  rm -rf "$KDIR"
  mkdir -p "$KDIR/data"
  [[ $SECURE == yes ]] && make_credentials
  write_config
  format_storage
  launch
}

# Takes the broker's ports out of the kernel's ephemeral port range, so a
# client connection is never given one of them as its local port. Needs
# root; without it the retry in `launch` is what is left.
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports want
  [[ -w $file ]] || return 0
  want="$PORT-$((PORT + 3))"
  local held
  held=$(<"$file")
  [[ ",$held," == *",$want,"* ]] && return 0
  echo "${held:+$held,}$want" >"$file" 2>/dev/null || true
}

# Start again after kafka-stop, keeping topics and data (outage tests).
kafka_resume() {
  if port_open "$PORT"; then return 0; fi
  [[ -f $KDIR/server.properties ]] || die "no stopped broker to resume: use kafka-start"
  launch
}

write_config() {

  # Static controller.quorum.voters (not controller.quorum.bootstrap.servers):
  # then `format` needs no --standalone/--initial-controllers flags.
  cat >"$KDIR/server.properties" <<EOF
process.roles=broker,controller
node.id=${EDGECACHE_KAFKA_NODE_ID:-1}
controller.quorum.voters=${EDGECACHE_KAFKA_VOTERS:-1@127.0.0.1:$CPORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KDIR/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# Let compaction tests see the cleaner run within seconds.
log.cleaner.backoff.ms=1000
EOF
  if [[ $SECURE == yes ]]; then
    write_secure_listeners
  else
    # Clients connect to the address a listener advertises: one for clients
    # behind an emulated link advertises the link's far end.
    local extra=${EDGECACHE_KAFKA_EXTRA_LISTENER:-} name=""
    [[ -n $extra ]] && name=${extra%%://*}
    cat >>"$KDIR/server.properties" <<EOF
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT${extra:+,$extra}
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT${extra:+,$extra}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT${name:+,$name:PLAINTEXT}
EOF
  fi
  # Kafka 4 logs through log4j2 only: a log4j 1.x log4j.properties is ignored
  # and the broker would log to the console. log4j2's properties format keeps
  # this a plain heredoc.
  cat >"$KDIR/log4j2.properties" <<EOF
appender.f.type=File
appender.f.name=F
appender.f.fileName=$LOG
appender.f.layout.type=PatternLayout
appender.f.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.f.ref=F
EOF

  # Cluster id = 16 random bytes, url-safe base64 without padding: what
  # `StorageTool random-uuid` prints, minus a JVM start. A leading '-' would be
  # parsed as an option (Kafka's own generator skips those too).
}

format_storage() {
  local id=${EDGECACHE_KAFKA_CLUSTER_ID:--} scram=()
  while [[ $id == -* ]]; do id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='); done
  if [[ $SECURE == yes ]]; then
    # KRaft keeps SCRAM credentials in the metadata log: adding them at
    # format time makes them exist before the first client connects.
    local pw; pw=$(<"$CLIENTS/sasl.password")
    scram=(--add-scram "SCRAM-SHA-256=[name=edge,password=$pw]"
           --add-scram "SCRAM-SHA-512=[name=edge,password=$pw]")
  fi
  kafka_tool kafka.tools.StorageTool format -t "$id" -c "$KDIR/server.properties" "${scram[@]}" >/dev/null
}

# Test credentials, new for every start: a CA, the broker's certificate (SAN
# IP:127.0.0.1 and DNS:localhost, so clients verify the hostname), a client
# certificate whose key is encrypted with a password, and the password of the
# SASL user `edge` (PLAIN and both SCRAM mechanisms). EC P-256 keys: generated
# in milliseconds. Kafka reads PEM directly (ssl.keystore.type=PEM): no keytool.
make_credentials() {
  local c=$CLIENTS
  mkdir -p "$c"
  # Passwords from /dev/urandom, alphanumeric: they go into the broker's
  # properties and the SCRAM format argument without quoting trouble.
  head -c 300 /dev/urandom | tr -dc 'A-Za-z0-9' | head -c 24 >"$c/sasl.password"
  head -c 300 /dev/urandom | tr -dc 'A-Za-z0-9' | head -c 24 >"$c/client-key.password"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
  openssl req -x509 "${ec[@]}" -nodes -keyout "$c/ca.key" -out "$c/ca.pem" -days 7 \
    -subj "/CN=edgecache test CA" 2>/dev/null
  openssl req -new "${ec[@]}" -nodes -keyout "$c/server.key" -out "$c/server.csr" \
    -subj "/CN=localhost" 2>/dev/null
  openssl x509 -req -in "$c/server.csr" -CA "$c/ca.pem" -CAkey "$c/ca.key" -set_serial 2 -days 7 \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n') \
    -out "$c/server.crt" 2>/dev/null
  # Kafka's PEM keystore: the PKCS#8 key, then the certificate chain.
  cat "$c/server.key" "$c/server.crt" "$c/ca.pem" >"$c/server-keystore.pem"
  openssl req -new "${ec[@]}" -nodes -keyout "$c/client.plain.key" -out "$c/client.csr" \
    -subj "/CN=edgecache-gateway" 2>/dev/null
  openssl x509 -req -in "$c/client.csr" -CA "$c/ca.pem" -CAkey "$c/ca.key" -set_serial 3 -days 7 \
    -extfile <(printf 'extendedKeyUsage=clientAuth\n') -out "$c/client.pem" 2>/dev/null
  openssl pkcs8 -topk8 -v2 aes-256-cbc -in "$c/client.plain.key" -out "$c/client.key" \
    -passout "file:$c/client-key.password"
  rm -f "$c/client.plain.key" "$c"/*.csr
  [[ -s $c/client.key && -s $c/server-keystore.pem ]] || die "generating test certificates failed"
}

write_secure_listeners() {
  local pw; pw=$(<"$CLIENTS/sasl.password")
  cat >>"$KDIR/server.properties" <<EOF
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT,SSL://127.0.0.1:$SSL_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,SSL://127.0.0.1:$SSL_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
ssl.keystore.type=PEM
ssl.keystore.location=$CLIENTS/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$CLIENTS/ca.pem
# mTLS on the SSL listener only; SASL_SSL clients authenticate with SASL.
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_edge="$pw";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

# Starts the broker (a fresh one or a resumed one). A client connection of
# another program may hold one of the broker's ports as its ephemeral local
# port (the ports are inside Linux's ephemeral range; seen in CI after the
# fleet smoke): the ports are reserved, and a start that fails to bind is
# tried again while that connection goes.
launch() {
  reserve_ports
  local attempt
  for attempt in 1 2 3 4 5 6 7; do
    BIND_RETRY=$((attempt < 7)) launch_once && return 0
    log "a port of the broker is held by another socket; trying again in 10 s"
    sleep 10
  done
}

launch_once() {
  # A resumed broker's old log already says "started": keep it aside so the
  # readiness check below reads only this run's log.
  [[ -f $LOG ]] && mv "$LOG" "$LOG.prev"

  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$PORT (controller :$CPORT), $(java -version 2>&1 | head -1)"
  log "classpath $LIBS/*, log $LOG"
  local t0=$SECONDS
  # setsid: the broker must outlive this script (and not get the caller's ^C).
  # C1-only + serial GC: ~1 s faster start and no C2 threads fighting the
  # tests for the 2 cores; a test broker needs no peak throughput.
  # shellcheck disable=SC2086 # word-split the flags on purpose
  nohup setsid java -cp "$LIBS/*" \
    ${EDGECACHE_KAFKA_JVM_OPTS:--Xmx512m -Xms256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1} \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KDIR/log4j2.properties" \
    kafka.Kafka "$KDIR/server.properties" >"$OUT" 2>&1 </dev/null &
  echo $! >"$PIDFILE"

  # Port open is not enough: the socket server binds before the broker has
  # caught up with the metadata log. "Kafka Server started" comes after that.
  while ! { port_open "$PORT" && grep -q 'Kafka Server started' "$LOG" 2>/dev/null; }; do
    # Sleep first: until the child has exec'd java its cmdline is still
    # bash's, and broker_pid would call a starting broker dead.
    sleep 0.5
    if ! broker_pid >/dev/null; then
      if [[ ${BIND_RETRY:-0} == 1 ]] && grep -q 'Address already in use' "$LOG" 2>/dev/null; then
        rm -f "$PIDFILE"
        return 1
      fi
      show_failure
      die "Kafka exited during startup"
    fi
    if ((SECONDS - t0 >= 90)); then
      show_failure
      kafka_stop
      die "Kafka not ready after 90 s"
    fi
  done
  log "Kafka ready in $((SECONDS - t0)) s (pid $(<"$PIDFILE"))"
}

kafka_stop() {
  local pid i
  pid=$(broker_pid) || { rm -f "$PIDFILE"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  # Controlled shutdown of a combined node normally takes a few seconds.
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then log "Kafka ignored SIGTERM, killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$PIDFILE"
  log "Kafka stopped"
}

case ${1:-} in
  deps) deps ;;
  kafka-start) kafka_start ;;
  kafka-start-bench)
    # Kafka's server defaults (bin/kafka-server-start.sh, kafka-run-class.sh):
    # full JIT and G1 with 20 ms pause goals. The tests' C1-only, serial-GC
    # broker starts faster but adds GC pauses to every produce latency.
    kafka_stop
    EDGECACHE_KAFKA_JVM_OPTS="-Xmx1G -Xms1G -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15"
    kafka_start ;;
  kafka-stop) kafka_stop ;;
  kafka-resume) kafka_resume ;;
  kafka-status) port_open "$PORT" ;;
  kafka-tool) shift; kafka_tool "$@" ;;
  kafka-secure-start) use_secure; kafka_start ;;
  kafka-secure-stop) use_secure; kafka_stop ;;
  kafka-secure-status) use_secure; port_open "$PORT" ;;
  *) echo "usage: $0 deps|kafka-start|kafka-stop|kafka-resume|kafka-status|kafka-tool CLASS ARGS...|kafka-secure-start|kafka-secure-stop|kafka-secure-status" >&2; exit 2 ;;
esac
