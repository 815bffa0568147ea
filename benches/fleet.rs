//! The fleet benchmark (issue 18): what N idle gateways cost one Kafka
//! broker, how fast an update reaches all of them, and how the fleet comes
//! back after the broker was down. N release agents, each with its own
//! redis-server, against a broker this program starts itself on its own
//! ports and run directory (never the shared test broker on 39092, which
//! other test runs use while this one stops and measures its broker).
//!
//!     cargo bench --bench fleet                      # N=50, ~15 min
//!     EDGECACHE_FLEET_N=5 EDGECACHE_FLEET_IDLE_SECS=10 EDGECACHE_FLEET_ROUNDS=1 \
//!       EDGECACHE_FLEET_UPDATES=5 EDGECACHE_FLEET_OUTAGE_SECS=10 cargo bench --bench fleet   # CI form, ~2 min
//!     EDGECACHE_FLEET_MODE=link cargo bench --bench fleet      # rehydrate over a cellular-like link
//!     EDGECACHE_FLEET_MODE=cluster cargo bench --bench fleet   # idle cost on a 3-broker cluster
//!
//! Modes (EDGECACHE_FLEET_MODE, comma-separated, run in that order; default `fleet`):
//!   fleet    the above: one broker, N gateways.
//!   link     one gateway rehydrates a 100k-key topic over an emulated link (1 Mbit/s, 300 ms
//!            RTT, 1% loss by default), once per producer compression; then idle and single
//!            updates over the same link. The gateway runs in a network namespace of its own
//!            and every IP packet between it and the broker passes through this program, which
//!            delays, paces and drops it (this kernel has no netem; see `Link`). Needs root and
//!            /dev/net/tun. The broker (the same one as `fleet`) gets a second listener on the
//!            link's address, port +2.
//!   cluster  three combined broker+controller nodes on loopback (ports 29300, 29302, 29304;
//!            +1 their controllers; run directories RUN-cluster-1..3), a 6-partition topic with
//!            leaders spread over them, and N gateways reading partitions led by 3, 2, then 1
//!            of the nodes: requests/s, connections and broker CPU per gateway per node.
//!
//! Environment:
//!   EDGECACHE_FLEET_N            gateways (50)
//!   EDGECACHE_FLEET_IDLE_SECS    length of each idle measuring window (60)
//!   EDGECACHE_FLEET_ROUNDS       rounds of {broker alone, before, after}, order alternating (2)
//!   EDGECACHE_FLEET_UPDATES      updates fanned out per variant and round (20), one per
//!   EDGECACHE_FLEET_UPDATE_MS    ... this many ms (1000)
//!   EDGECACHE_FLEET_OUTAGE_SECS  broker down for the reconnect storm (60; 0 skips the storm)
//!   EDGECACHE_FLEET_KEYS         keys preloaded into the topic (1000)
//!   EDGECACHE_FLEET_PORT         the benchmark broker's port (29292; +1 its controller). Keep
//!                                it below the ephemeral range (Linux: 32768-60999): while the
//!                                broker is down, N agents retrying it make many connects, and
//!                                one whose ephemeral source port is the broker's own port
//!                                connects to itself (TCP simultaneous open), holds the port,
//!                                and the restarted broker cannot bind it.
//!   EDGECACHE_FLEET_RUN          its run directory (/tmp/edgecache-fleet)
//!   EDGECACHE_FLEET_BEFORE       the "before" variant: `kafka:K=V` (a librdkafka property) and
//!                                `agent:K=V` ([agent] key) items, comma-separated; default:
//!                                the defaults before issue 18,
//!                                `kafka:fetch.wait.max.ms=500,agent:partition_discovery_secs=30`
//!   EDGECACHE_FLEET_AFTER        overrides for the "after" variant (none: the binary's defaults;
//!                                also the settings of the link and cluster modes' agents)
//!   EDGECACHE_FLEET_LINK_MBIT    link mode: rate each way (1)
//!   EDGECACHE_FLEET_LINK_RTT_MS  ... round-trip time (300), half of it each way
//!   EDGECACHE_FLEET_LINK_LOSS    ... probability a packet is lost, each way (0.01)
//!   EDGECACHE_FLEET_LINK_QUEUE_KB  ... drop-tail queue in front of each direction (64)
//!   EDGECACHE_FLEET_LINK_KEYS    ... keys in each topic (100000)
//!   EDGECACHE_FLEET_LINK_BATCH_BYTES  ... the producer's batch.size (librdkafka's default,
//!                                1000000): a batch is consumed whole, and one cut at the end
//!                                of a fetch response is fetched again, so its size against
//!                                the agent's max.partition.fetch.bytes matters (FLEET.md)
//!   EDGECACHE_FLEET_LINK_CC      ... TCP congestion control on the link's routes (cubic;
//!                                empty: the system's default)
//!   EDGECACHE_FLEET_LINK_CODECS  ... producer compression.type, one topic and rehydrate each
//!                                (none,lz4,zstd)
//!   EDGECACHE_FLEET_LINK_STALL_SECS  ... a rehydrate with no new key in Redis for this long is
//!                                reported as stalled and left (120)
//!   EDGECACHE_FLEET_LINK_IDLE_SECS  ... idle window over the link, after the first rehydrate (60)
//!   EDGECACHE_FLEET_LINK_UPDATES ... single updates after each rehydrate (10), one per
//!   EDGECACHE_FLEET_LINK_UPDATE_MS  ... this many ms (3000)
//!   EDGECACHE_FLEET_CLUSTER_N    cluster mode: gateways (50)
//!   EDGECACHE_FLEET_CLUSTER_PORT ... the first node's port (29300; nodes at +0, +2, +4)
//!   EDGECACHE_FLEET_CLUSTER_IDLE_SECS  ... length of each idle window (60)
//!
//! What is measured, and how:
//! - Broker CPU: utime+stime of the broker JVM (/proc/PID/stat) over a
//!   window, minus the same broker's CPU with no agent connected (measured
//!   in the same round), divided by N.
//! - Requests and bytes: Kafka's request metrics are JMX only, so the proxy
//!   is the kernel's TCP counters of the agents' sockets to the broker
//!   (`ss -ti`: `data_segs_out`, `bytes_acked`, `bytes_received`). An idle
//!   request (a fetch, a metadata request) is far smaller than one TCP
//!   segment, so data segments sent to the broker count requests; bytes
//!   count everything on the wire above TCP. Sockets opened and closed
//!   inside a window are missed (none are, while idle).
//! - Fan-out: each Redis publishes `set <key>` (`redis.publish_channel`); a
//!   subscriber per Redis stamps arrivals. Latency = arrival minus the
//!   produce call of a fresh key; "all N" = the latest of the N arrivals.
//! - Memory: VmRSS and VmHWM of every agent after the idle window.
//! - Storm: the broker is stopped (SIGTERM, controlled shutdown) while a
//!   producer keeps sending a key every 250 ms, started again after the
//!   outage; each gateway is caught up when the last record sent before the
//!   broker was ready again reaches its Redis. Broker CPU and the agents'
//!   requests are sampled every second from then on. The same storm with a
//!   single gateway is the reference for "within 2x".
//!
//! Progress goes to stderr, the tables (Markdown) to stdout. Nothing here
//! asserts a goal: FLEET.md reads the numbers.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 6;
const CHANNEL: &str = "fleet";
const PREFIX: &str = "fleet:";
/// The JVM options of Kafka's own bin/kafka-server-start.sh (full JIT, G1),
/// as `tests/services.sh kafka-start-bench` uses: a production broker's CPU
/// per request, not the C1-only test broker's. Given to every start and
/// resume, so the restarted broker runs the same JVM.
const BROKER_JVM: &str = "-Xmx1G -Xms1G -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15";

fn main() {
    let p = Params::from_env();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_edgecache"));
    let work = tempfile::tempdir().unwrap();
    // The link exists before the broker starts: the broker binds a listener
    // on the link's broker-side address.
    let link = p.modes.contains(&Mode::Link).then(|| Link::setup(&p.link));
    let broker = (p.modes.contains(&Mode::Fleet) || link.is_some())
        .then(|| Broker::start(&p, link.is_some()));
    for mode in &p.modes {
        match mode {
            Mode::Fleet => fleet_mode(&p, &bin, broker.as_ref().unwrap(), work.path()),
            Mode::Link => link_mode(
                &p,
                &bin,
                broker.as_ref().unwrap(),
                link.as_ref().unwrap(),
                work.path(),
            ),
            Mode::Cluster => cluster_mode(&p, &bin, work.path()),
        }
    }
    if let Some(broker) = broker {
        broker.stop();
    }
    if let Some(link) = link {
        link.teardown();
    }
}

/// The single-broker fleet: idle cost, fan-out, memory, reconnect storm.
fn fleet_mode(p: &Params, bin: &Path, broker: &Broker, work: &Path) {
    let p = p.clone();
    let bin = bin.to_path_buf();
    let mut facts = vec![
        ("gateways (N)".to_owned(), p.n.to_string()),
        ("agent".into(), bin.display().to_string()),
        ("load average at start".into(), loadavg()),
        ("busiest processes at start".into(), busiest()),
    ];

    let topic = format!("fleet-{}", std::process::id());
    create_topic(&broker.addr, &topic);
    progress(&format!(
        "broker on {} (pid {}); preloading {} keys into {topic}",
        broker.addr,
        broker.pid(),
        p.keys
    ));
    let producer = producer(&broker.addr);
    for i in 0..p.keys {
        send(&producer, &topic, &format!("dev-{i}"), i);
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let redises: Vec<Redis> = (0..p.n).map(|_| Redis::start(work)).collect();
    let arrivals = Arrivals::start(&redises);

    // A fresh JVM compiles its hot paths for the first minutes, which would
    // be billed to whichever variant runs first: warm it up with one
    // unmeasured pass of each variant.
    for (i, settings) in [&p.before, &p.after].into_iter().enumerate() {
        progress("warm-up: a fleet the tables do not count");
        let fleet = Fleet::start(&bin, &broker.addr, &topic, &redises, settings, work, "");
        fleet.wait_live(&redises);
        fan_out(
            broker,
            &producer,
            &topic,
            &arrivals,
            &p,
            &format!("warm-up-{i}"),
        );
        std::thread::sleep(Duration::from_secs(p.idle_secs.min(30)));
        fleet.stop();
    }

    // ---- idle cost and fan-out, before and after, alternating ----
    let mut idle: BTreeMap<&str, Vec<Window>> = BTreeMap::new();
    let mut fanout: BTreeMap<&str, Vec<Fanout>> = BTreeMap::new();
    let mut memory: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for round in 0..p.rounds {
        progress(&format!("round {}: broker alone", round + 1));
        std::thread::sleep(Duration::from_secs(3));
        idle.entry("broker alone")
            .or_default()
            .push(measure_window(broker, &[], p.idle_secs));
        let order: [(&str, &Vec<Setting>); 2] = if round % 2 == 0 {
            [("before", &p.before), ("after", &p.after)]
        } else {
            [("after", &p.after), ("before", &p.before)]
        };
        for (name, settings) in order {
            progress(&format!(
                "round {}: {name}, starting {} agents",
                round + 1,
                p.n
            ));
            let fleet = Fleet::start(&bin, &broker.addr, &topic, &redises, settings, work, "");
            fleet.wait_live(&redises);
            // Let the catch-up's last fetches and the first statistics pass.
            std::thread::sleep(Duration::from_secs(5));
            let window = measure_window(broker, &fleet.pids(), p.idle_secs);
            progress(&format!(
                "  idle: broker {:.1} ticks/s, {:.2} requests/s per gateway",
                window.ticks as f64 / window.secs,
                window.requests as f64 / window.secs / p.n as f64
            ));
            idle.entry(name).or_default().push(window);
            memory.entry(name).or_default().extend(fleet.memory());
            let f = fan_out(
                broker,
                &producer,
                &topic,
                &arrivals,
                &p,
                &format!("{name}-{round}"),
            );
            progress(&format!(
                "  fan-out: all {} within {:.1} ms (median update), {} missing",
                p.n,
                quantile(&f.all_ms, 0.5),
                f.missing
            ));
            fanout.entry(name).or_default().push(f);
            fleet.stop();
        }
    }

    // ---- reconnect storm: N gateways, then one ----
    let mut storms = Vec::new();
    if p.outage_secs > 0 {
        for n in [p.n, 1] {
            storms.push(storm(
                &bin,
                broker,
                &topic,
                &redises[..n],
                &arrivals,
                &p,
                work,
            ));
        }
    }

    facts.push(("load average at end".into(), loadavg()));
    facts.push(("busiest processes at end".into(), busiest()));
    arrivals.stop();
    drop(redises);
    print_tables(&p, &facts, &idle, &fanout, &memory, &storms);
}

// ---------------------------------------------------------------- params

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Fleet,
    Link,
    Cluster,
}

#[derive(Debug, Clone)]
enum Setting {
    Kafka(String, String),
    Agent(String, String),
}

fn parse_settings(text: &str) -> Vec<Setting> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (scope, kv) = item
                .split_once(':')
                .unwrap_or_else(|| panic!("{item:?}: expected kafka:K=V or agent:K=V"));
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("{item:?}: expected K=V"));
            match scope {
                "kafka" => Setting::Kafka(k.into(), v.into()),
                "agent" => Setting::Agent(k.into(), v.into()),
                _ => panic!("{item:?}: scope must be kafka or agent"),
            }
        })
        .collect()
}

fn describe(settings: &[Setting]) -> String {
    if settings.is_empty() {
        return "the binary's defaults".into();
    }
    settings
        .iter()
        .map(|s| match s {
            Setting::Kafka(k, v) => format!("`{k}={v}`"),
            Setting::Agent(k, v) => format!("`agent.{k}={v}`"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lines `settings` add to the agent's [agent] and [kafka.properties]
/// tables.
fn settings_toml(settings: &[Setting]) -> (String, String) {
    let mut agent_table = String::new();
    let mut kafka_table = String::new();
    for s in settings {
        match s {
            Setting::Agent(k, v) => writeln!(agent_table, "{k} = {v}").unwrap(),
            Setting::Kafka(k, v) => writeln!(kafka_table, "{k:?} = {v:?}").unwrap(),
        }
    }
    (agent_table, kafka_table)
}

#[derive(Clone)]
struct Params {
    modes: Vec<Mode>,
    link: LinkSpec,
    link_keys: u64,
    link_stall_secs: u64,
    link_batch_bytes: Option<u64>,
    link_codecs: Vec<String>,
    link_idle_secs: u64,
    link_updates: usize,
    link_update_ms: u64,
    cluster_n: usize,
    cluster_port: u16,
    cluster_idle_secs: u64,
    n: usize,
    idle_secs: u64,
    rounds: usize,
    updates: usize,
    update_every: Duration,
    outage_secs: u64,
    keys: u64,
    port: u16,
    run: String,
    before: Vec<Setting>,
    after: Vec<Setting>,
}

impl Params {
    fn from_env() -> Params {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name}={v} is not a valid value"))
                })
                .unwrap_or(default)
        }
        let modes = var("EDGECACHE_FLEET_MODE", "fleet".to_owned())
            .split(',')
            .map(|m| match m.trim() {
                "fleet" => Mode::Fleet,
                "link" => Mode::Link,
                "cluster" => Mode::Cluster,
                other => panic!("EDGECACHE_FLEET_MODE: {other:?} is not fleet, link or cluster"),
            })
            .collect();
        Params {
            modes,
            link: LinkSpec {
                mbit: var("EDGECACHE_FLEET_LINK_MBIT", 1.0),
                rtt_ms: var("EDGECACHE_FLEET_LINK_RTT_MS", 300.0),
                loss: var("EDGECACHE_FLEET_LINK_LOSS", 0.01),
                queue_bytes: var("EDGECACHE_FLEET_LINK_QUEUE_KB", 64) * 1024,
                cc: var("EDGECACHE_FLEET_LINK_CC", "cubic".to_owned()),
            },
            link_keys: var("EDGECACHE_FLEET_LINK_KEYS", 100_000),
            link_stall_secs: var("EDGECACHE_FLEET_LINK_STALL_SECS", 120),
            link_batch_bytes: std::env::var("EDGECACHE_FLEET_LINK_BATCH_BYTES")
                .ok()
                .map(|v| {
                    v.parse()
                        .expect("EDGECACHE_FLEET_LINK_BATCH_BYTES: a number")
                }),
            link_codecs: var("EDGECACHE_FLEET_LINK_CODECS", "none,lz4,zstd".to_owned())
                .split(',')
                .map(|c| c.trim().to_owned())
                .collect(),
            link_idle_secs: var("EDGECACHE_FLEET_LINK_IDLE_SECS", 60),
            link_updates: var("EDGECACHE_FLEET_LINK_UPDATES", 10),
            link_update_ms: var("EDGECACHE_FLEET_LINK_UPDATE_MS", 3000),
            cluster_n: var("EDGECACHE_FLEET_CLUSTER_N", 50),
            cluster_port: var("EDGECACHE_FLEET_CLUSTER_PORT", 29300),
            cluster_idle_secs: var("EDGECACHE_FLEET_CLUSTER_IDLE_SECS", 60),
            n: var("EDGECACHE_FLEET_N", 50),
            idle_secs: var("EDGECACHE_FLEET_IDLE_SECS", 60),
            rounds: var("EDGECACHE_FLEET_ROUNDS", 2),
            updates: var("EDGECACHE_FLEET_UPDATES", 20),
            update_every: Duration::from_millis(var("EDGECACHE_FLEET_UPDATE_MS", 1000)),
            outage_secs: var("EDGECACHE_FLEET_OUTAGE_SECS", 60),
            keys: var("EDGECACHE_FLEET_KEYS", 1000),
            port: var("EDGECACHE_FLEET_PORT", 29292),
            run: var("EDGECACHE_FLEET_RUN", "/tmp/edgecache-fleet".to_owned()),
            before: parse_settings(&var(
                "EDGECACHE_FLEET_BEFORE",
                "kafka:fetch.wait.max.ms=500,agent:partition_discovery_secs=30".to_owned(),
            )),
            after: parse_settings(&var("EDGECACHE_FLEET_AFTER", String::new())),
        }
    }
}

fn progress(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[fleet {t:7.1}s] {msg}");
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The processes using the most CPU (lifetime average, as `ps` reports it),
/// so the table says what else shared the machine.
fn busiest() -> String {
    let out = Command::new("ps")
        .args(["-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .take(5)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------- broker

struct Broker {
    addr: String,
    port: u16,
    run: String,
}

/// `tests/services.sh COMMAND` for the broker on `port` with run directory
/// `run`; `env` adds to (or overrides) the broker's settings.
fn services_command(port: u16, run: &str, command: &str, env: &[(&str, String)]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/services.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .arg(command)
        .env("EDGECACHE_KAFKA_PORT", port.to_string())
        .env("EDGECACHE_RUN", run)
        .env("EDGECACHE_KAFKA_JVM_OPTS", BROKER_JVM);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl Broker {
    fn services(port: u16, run: &str, command: &str) {
        let status = services_command(port, run, command, &[])
            .status()
            .expect("run tests/services.sh");
        assert!(status.success(), "tests/services.sh {command} failed");
    }

    /// With `link`, the broker also listens on the link's broker-side
    /// address, and advertises that address there: the agent behind the
    /// link then fetches through it (see `Link`).
    fn start(p: &Params, link: bool) -> Broker {
        Broker::services(p.port, &p.run, "deps");
        // A broker left on these ports by an interrupted run holds stale
        // topics and JIT state: start fresh.
        Broker::services(p.port, &p.run, "kafka-stop");
        let env = if link {
            vec![(
                "EDGECACHE_KAFKA_EXTRA_LISTENER",
                format!("LINK://{}", link_broker_addr(p)),
            )]
        } else {
            vec![]
        };
        let status = services_command(p.port, &p.run, "kafka-start", &env)
            .status()
            .expect("run tests/services.sh");
        assert!(status.success(), "tests/services.sh kafka-start failed");
        Broker {
            addr: format!("127.0.0.1:{}", p.port),
            port: p.port,
            run: p.run.clone(),
        }
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(format!("{}/kafka/kafka.pid", self.run))
            .expect("broker pid file")
            .trim()
            .parse()
            .unwrap()
    }

    /// CPU ticks (utime + stime) the broker JVM has used.
    fn ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }

    fn stop(&self) {
        Broker::services(self.port, &self.run, "kafka-stop");
    }

    fn resume(&self) {
        Broker::services(self.port, &self.run, "kafka-resume");
    }
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of
/// /proc/PID/stat; counted after the command name, which may hold spaces).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

fn create_topic(brokers: &str, name: &str) {
    create_topic_with(brokers, name, TopicReplication::Fixed(1));
}

fn create_topic_with(brokers: &str, name: &str, replication: TopicReplication) {
    let topic = NewTopic::new(name, PARTITIONS, replication).set("cleanup.policy", "compact");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime
        .block_on(admin(brokers).create_topics(&[topic], &AdminOptions::new()))
        .expect("create_topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Every update on its own, now: the fan-out time is the agents'.
        .set("linger.ms", "0")
        // Back within half a second after the storm, so the producer's
        // reconnect never hides the agents'.
        .set("reconnect.backoff.max.ms", "500")
        .set("message.timeout.ms", "600000")
        .create()
        .expect("producer")
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, seq: u64) {
    let value = format!(
        r#"{{"temp":{}.{},"on":{},"fw":"1.{}","seq":{seq}}}"#,
        seq % 40,
        seq % 10,
        seq % 2 == 0,
        seq % 5
    );
    send_value(producer, topic, key, &value);
}

fn send_value(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    value: &str,
) {
    loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(value)) {
            Ok(()) => return,
            Err((e, _)) => {
                assert!(e.to_string().contains("Queue full"), "produce: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------- redis

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        Redis::launch(dir, None)
    }

    /// Also listening on a unix socket: an agent in another network
    /// namespace reaches it there (a path, not an address).
    fn launch(dir: &Path, unix_socket: Option<&Path>) -> Redis {
        let port = free_port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("redis-server");
        if let Some(path) = unix_socket {
            cmd.args(["--unixsocket", path.to_str().unwrap()])
                .args(["--unixsocketperm", "700"]);
        }
        let child = cmd
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--dir",
                dir.to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while redis.conn().is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> Option<redis::Connection> {
        let mut conn = redis::Client::open(self.url())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut conn).ok()?;
        Some(conn)
    }

    fn state(&self) -> Option<String> {
        redis::cmd("HGET")
            .arg("edgecache:status")
            .arg("state")
            .query(&mut self.conn()?)
            .ok()?
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One subscriber thread per Redis stamps when each mirrored key arrives
/// (the agent publishes `set <key>` in the same step as the write).
/// Key -> (gateway, arrival) for every probe key seen.
type Seen = Arc<Mutex<HashMap<String, Vec<(usize, Instant)>>>>;

struct Arrivals {
    seen: Seen,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Arrivals {
    fn start(redises: &[Redis]) -> Arrivals {
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = redises
            .iter()
            .enumerate()
            .map(|(i, redis)| {
                let (seen, stop, url) = (seen.clone(), stop.clone(), redis.url());
                std::thread::spawn(move || {
                    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
                    let mut pubsub = conn.as_pubsub();
                    pubsub.subscribe(CHANNEL).unwrap();
                    pubsub
                        .set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(msg) = pubsub.get_message() else {
                            continue;
                        };
                        let at = Instant::now();
                        let payload: String = msg.get_payload().unwrap_or_default();
                        // Only the probes: the preloaded keys arrive in
                        // thousands on every rehydrate.
                        if let Some(key) = payload.strip_prefix("set fleet:") {
                            if !key.starts_with("dev-") {
                                seen.lock()
                                    .unwrap()
                                    .entry(key.to_owned())
                                    .or_default()
                                    .push((i, at));
                            }
                        }
                    }
                })
            })
            .collect();
        Arrivals {
            seen,
            stop,
            threads,
        }
    }

    /// First arrival per gateway of `key`.
    fn of(&self, key: &str) -> HashMap<usize, Instant> {
        let seen = self.seen.lock().unwrap();
        let mut first = HashMap::new();
        for &(i, at) in seen.get(key).into_iter().flatten() {
            first.entry(i).or_insert(at);
        }
        first
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- agents

struct Fleet {
    agents: Vec<Child>,
}

impl Fleet {
    /// Empties each Redis and starts one agent per Redis: every start is a
    /// rehydrate of the preloaded keys.
    fn start(
        bin: &Path,
        brokers: &str,
        topic: &str,
        redises: &[Redis],
        settings: &[Setting],
        dir: &Path,
        topic_extra: &str,
    ) -> Fleet {
        let (agent_table, kafka_table) = settings_toml(settings);
        let agents = redises
            .iter()
            .enumerate()
            .map(|(i, redis)| {
                let mut conn = redis.conn().expect("redis");
                redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
                let config = dir.join(format!("agent-{i}.toml"));
                std::fs::write(
                    &config,
                    format!(
                        "[agent]\n{agent_table}\n[kafka]\nbrokers = \"{brokers}\"\n\
                         [kafka.properties]\n\"client.id\" = \"gw-{i}\"\n{kafka_table}\n\
                         [redis]\nurl = \"{}\"\npublish_channel = \"{CHANNEL}\"\n\
                         [[topics]]\nname = \"{topic}\"\nkey_prefix = \"{PREFIX}\"\n{topic_extra}\n",
                        redis.url()
                    ),
                )
                .unwrap();
                Command::new(bin)
                    .args(["run", "--config", config.to_str().unwrap()])
                    .env("EDGECACHE_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join(format!("agent-{i}.log"))).unwrap())
                    .spawn()
                    .expect("start the agent")
            })
            .collect();
        Fleet { agents }
    }

    fn wait_live(&self, redises: &[Redis]) {
        let deadline = Instant::now() + Duration::from_secs(300);
        for redis in &redises[..self.agents.len()] {
            while redis.state().as_deref() != Some("live") {
                assert!(Instant::now() < deadline, "agents not live after 300 s");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.agents.iter().map(Child::id).collect()
    }

    /// (VmRSS, VmHWM) in KiB per agent.
    fn memory(&self) -> Vec<(u64, u64)> {
        self.pids()
            .into_iter()
            .map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                let field = |name: &str| {
                    status
                        .lines()
                        .find(|l| l.starts_with(name))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                (field("VmRSS:"), field("VmHWM:"))
            })
            .collect()
    }

    fn stop(self) {}
}

/// Also on a panic: no agent outlives the run.
impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

// ---------------------------------------------------------------- measuring

/// Kernel TCP counters of one client socket to the broker.
#[derive(Debug, Default, Clone, Copy)]
struct Sock {
    segs_out: u64,
    bytes_out: u64,
    bytes_in: u64,
}

/// The agents' sockets to the broker (`ss -tinp`), by local address.
fn sockets(port: u16, pids: &[u32]) -> HashMap<String, Sock> {
    let out = Command::new("ss")
        .args([
            "-tinpHn",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // "Recv-Q Send-Q Local Peer users:((\"edgecache\",pid=N,fd=M))"
            let words: Vec<&str> = line.split_whitespace().collect();
            let pid = line
                .split("pid=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse::<u32>().ok());
            current = match (pid, words.get(2)) {
                (Some(pid), Some(local)) if pids.contains(&pid) => Some(local.to_string()),
                _ => None,
            };
            continue;
        }
        let Some(local) = current.take() else {
            continue;
        };
        let mut sock = Sock::default();
        for word in line.split_whitespace() {
            let Some((k, v)) = word.split_once(':') else {
                continue;
            };
            let v = v.parse().unwrap_or(0);
            match k {
                "data_segs_out" => sock.segs_out = v,
                "bytes_acked" => sock.bytes_out = v,
                "bytes_received" => sock.bytes_in = v,
                _ => {}
            }
        }
        found.insert(local, sock);
    }
    found
}

/// What happened on the sockets between two snapshots (a socket new in
/// `after` counts whole).
fn socket_delta(before: &HashMap<String, Sock>, after: &HashMap<String, Sock>) -> Sock {
    let mut d = Sock::default();
    for (k, a) in after {
        let b = before.get(k).copied().unwrap_or_default();
        d.segs_out += a.segs_out.saturating_sub(b.segs_out);
        d.bytes_out += a.bytes_out.saturating_sub(b.bytes_out);
        d.bytes_in += a.bytes_in.saturating_sub(b.bytes_in);
    }
    d
}

#[derive(Debug, Clone)]
struct Window {
    secs: f64,
    ticks: u64,
    agent_ticks: u64,
    requests: u64,
    bytes_out: u64,
    bytes_in: u64,
}

fn measure_window(broker: &Broker, pids: &[u32], secs: u64) -> Window {
    let agent_ticks = || pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let (s0, t0, a0, start) = (
        sockets(broker.port, pids),
        broker.ticks(),
        agent_ticks(),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(secs));
    let (s1, t1, a1, secs) = (
        sockets(broker.port, pids),
        broker.ticks(),
        agent_ticks(),
        start.elapsed().as_secs_f64(),
    );
    let d = socket_delta(&s0, &s1);
    Window {
        secs,
        ticks: t1 - t0,
        agent_ticks: a1 - a0,
        requests: d.segs_out,
        bytes_out: d.bytes_out,
        bytes_in: d.bytes_in,
    }
}

struct Fanout {
    /// Per update: ms until the last of the N gateways had it.
    all_ms: Vec<f64>,
    /// Per update and gateway: ms until it had it.
    each_ms: Vec<f64>,
    missing: usize,
    ticks: u64,
    secs: f64,
    updates: usize,
}

fn fan_out(
    broker: &Broker,
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    arrivals: &Arrivals,
    p: &Params,
    tag: &str,
) -> Fanout {
    let t0 = broker.ticks();
    let start = Instant::now();
    let mut sent = Vec::new();
    for i in 0..p.updates {
        let key = format!("probe-{tag}-{i}");
        let at = Instant::now();
        send(producer, topic, &key, i as u64);
        sent.push((key, at));
        let next = start + p.update_every * (i as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    // The last update's arrivals (or 10 s), then the window closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrivals.of(&sent.last().unwrap().0).len() < p.n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ticks, secs) = (broker.ticks() - t0, start.elapsed().as_secs_f64());
    let mut f = Fanout {
        all_ms: Vec::new(),
        each_ms: Vec::new(),
        missing: 0,
        ticks,
        secs,
        updates: p.updates,
    };
    for (key, at) in &sent {
        let got = arrivals.of(key);
        f.missing += p.n - got.len();
        let ms: Vec<f64> = got
            .values()
            .map(|t| t.duration_since(*at).as_secs_f64() * 1000.0)
            .collect();
        if got.len() == p.n {
            f.all_ms.push(ms.iter().cloned().fold(0.0, f64::max));
        }
        f.each_ms.extend(ms);
    }
    f
}

struct Storm {
    n: usize,
    stop_secs: f64,
    down_secs: f64,
    start_secs: f64,
    /// Seconds from the broker being ready again until each gateway had the
    /// last record sent before that.
    caught_up: Vec<f64>,
    missing: usize,
    /// Per second after the restart: broker CPU (ticks) and agents' requests.
    samples: Vec<(u64, u64)>,
}

fn storm(
    bin: &Path,
    broker: &Broker,
    topic: &str,
    redises: &[Redis],
    arrivals: &Arrivals,
    p: &Params,
    dir: &Path,
) -> Storm {
    let n = redises.len();
    progress(&format!("storm with {n} gateway(s): starting"));
    let fleet = Fleet::start(bin, &broker.addr, topic, redises, &p.after, dir, "");
    fleet.wait_live(redises);
    std::thread::sleep(Duration::from_secs(5));
    let pids = fleet.pids();

    // A key every 250 ms, through the outage (librdkafka queues them).
    let sent: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (sent, stop, topic, addr) = (
            sent.clone(),
            stop.clone(),
            topic.to_owned(),
            broker.addr.clone(),
        );
        std::thread::spawn(move || {
            let producer = producer(&addr);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("storm-{n}-{i}");
                let at = Instant::now();
                send(&producer, &topic, &key, i);
                sent.lock().unwrap().push((key, at));
                i += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
            producer.flush(Duration::from_secs(60)).unwrap();
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    broker.stop();
    let stop_secs = t.elapsed().as_secs_f64();
    let remaining = Duration::from_secs(p.outage_secs).saturating_sub(t.elapsed());
    std::thread::sleep(remaining);
    let down_secs = t.elapsed().as_secs_f64();
    progress(&format!("storm: broker down {down_secs:.0} s, restarting"));
    let t = Instant::now();
    broker.resume();
    let start_secs = t.elapsed().as_secs_f64();
    let ready = Instant::now();
    let target = sent
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(_, at)| *at <= ready)
        .map(|(k, _)| k.clone())
        .expect("records sent before the restart");
    let pid = broker.pid();
    let mut samples = Vec::new();
    let (mut ticks, mut socks) = (cpu_ticks(pid), sockets(broker.port, &pids));
    let mut done_at: Option<Instant> = None;
    let deadline = ready + Duration::from_secs(180);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (t1, s1) = (cpu_ticks(pid), sockets(broker.port, &pids));
        samples.push((t1 - ticks, socket_delta(&socks, &s1).segs_out));
        (ticks, socks) = (t1, s1);
        if done_at.is_none() && arrivals.of(&target).len() == n {
            done_at = Some(Instant::now());
        }
        // Five more seconds after the last gateway, to see the tail of the peak.
        if done_at.is_some_and(|d| d.elapsed() >= Duration::from_secs(5))
            || Instant::now() > deadline
        {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let got = arrivals.of(&target);
    let mut caught_up: Vec<f64> = got
        .values()
        .map(|t| t.saturating_duration_since(ready).as_secs_f64())
        .collect();
    caught_up.sort_by(f64::total_cmp);
    progress(&format!(
        "storm with {n}: all caught up {:.1} s after the restart ({} missing)",
        caught_up.last().copied().unwrap_or(f64::NAN),
        n - got.len()
    ));
    fleet.stop();
    Storm {
        n,
        stop_secs,
        down_secs,
        start_secs,
        missing: n - got.len(),
        caught_up,
        samples,
    }
}

// ---------------------------------------------------------------- report

fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn median_u64(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn print_tables(
    p: &Params,
    facts: &[(String, String)],
    idle: &BTreeMap<&str, Vec<Window>>,
    fanout: &BTreeMap<&str, Vec<Fanout>>,
    memory: &BTreeMap<&str, Vec<(u64, u64)>>,
    storms: &[Storm],
) {
    let hz = ticks_per_sec();
    let mut out = String::new();
    writeln!(out, "\n## Fleet benchmark\n\n| fact | value |\n|---|---|").unwrap();
    for (k, v) in facts {
        writeln!(out, "| {k} | {v} |").unwrap();
    }
    writeln!(out, "| before | {} |", describe(&p.before)).unwrap();
    writeln!(out, "| after | {} |", describe(&p.after)).unwrap();
    writeln!(
        out,
        "| windows | {} round(s) of {} s idle each: broker alone, then before/after in alternating order; {} updates {} ms apart per variant and round |",
        p.rounds,
        p.idle_secs,
        p.updates,
        p.update_every.as_millis()
    )
    .unwrap();

    let rate = |w: &[Window], f: fn(&Window) -> u64| -> f64 {
        w.iter().map(f).sum::<u64>() as f64 / w.iter().map(|w| w.secs).sum::<f64>()
    };
    let alone: Vec<Window> = idle.get("broker alone").cloned().unwrap_or_default();
    let alone_tps = rate(&alone, |w| w.ticks);
    writeln!(out, "\n### Idle cost per gateway (N = {})\n", p.n).unwrap();
    writeln!(
        out,
        "| variant | broker CPU, % of a core, per gateway | broker requests/s per gateway | bytes/s to broker per gateway | bytes/s from broker per gateway | agent CPU, % of a core | broker CPU, whole fleet, % of a core |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|---|---|").unwrap();
    writeln!(
        out,
        "| broker alone | | | | | | {:.2} (itself) |",
        alone_tps / hz * 100.0
    )
    .unwrap();
    let mut per_gw = BTreeMap::new();
    for name in ["before", "after"] {
        let Some(w) = idle.get(name) else { continue };
        let n = p.n as f64;
        let fleet = (rate(w, |w| w.ticks) - alone_tps) / hz * 100.0;
        per_gw.insert(name, fleet / n);
        writeln!(
            out,
            "| {name} | {:.4} | {:.3} | {:.1} | {:.1} | {:.3} | {:.2} |",
            fleet / n,
            rate(w, |w| w.requests) / n,
            rate(w, |w| w.bytes_out) / n,
            rate(w, |w| w.bytes_in) / n,
            rate(w, |w| w.agent_ticks) / hz * 100.0 / n,
            fleet
        )
        .unwrap();
    }
    if let (Some(b), Some(a)) = (per_gw.get("before"), per_gw.get("after")) {
        writeln!(
            out,
            "\nbefore/after broker CPU per gateway: {:.1}x (a ratio of differences over the broker-alone floor; at the floor it is noise)",
            b / a
        )
        .unwrap();
    }
    writeln!(
        out,
        "\nEvery window (broker ticks of 1/{hz} s; requests = data segments the agents sent):\n\n| round | variant | seconds | broker ticks | agent ticks | requests | bytes to broker | bytes from broker |\n|---|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for (name, windows) in idle {
        for (round, w) in windows.iter().enumerate() {
            writeln!(
                out,
                "| {} | {name} | {:.1} | {} | {} | {} | {} | {} |",
                round + 1,
                w.secs,
                w.ticks,
                w.agent_ticks,
                w.requests,
                w.bytes_out,
                w.bytes_in
            )
            .unwrap();
        }
    }

    writeln!(
        out,
        "\n### One update fanned out to all N\n\n| variant | updates | until all N have it: p50 / p99 / max (ms) | each gateway: p50 / p99 (ms) | missing | broker CPU per update over idle (ms) |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for (name, runs) in fanout {
        let all: Vec<f64> = runs.iter().flat_map(|f| f.all_ms.clone()).collect();
        let each: Vec<f64> = runs.iter().flat_map(|f| f.each_ms.clone()).collect();
        let idle_tps = idle.get(name).map(|w| rate(w, |w| w.ticks)).unwrap_or(0.0);
        let extra_ticks: f64 = runs
            .iter()
            .map(|f| f.ticks as f64 - idle_tps * f.secs)
            .sum();
        let updates: usize = runs.iter().map(|f| f.updates).sum();
        writeln!(
            out,
            "| {name} | {updates} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {} | {:.2} |",
            quantile(&all, 0.5),
            quantile(&all, 0.99),
            quantile(&all, 1.0),
            quantile(&each, 0.5),
            quantile(&each, 0.99),
            runs.iter().map(|f| f.missing).sum::<usize>(),
            extra_ticks / hz * 1000.0 / updates as f64
        )
        .unwrap();
    }

    writeln!(
        out,
        "\n### Memory per agent (after the idle window)\n\n| variant | VmRSS median / max (KiB) | VmHWM median / max (KiB) |\n|---|---|---|"
    )
    .unwrap();
    for (name, m) in memory {
        let rss: Vec<u64> = m.iter().map(|x| x.0).collect();
        let hwm: Vec<u64> = m.iter().map(|x| x.1).collect();
        writeln!(
            out,
            "| {name} | {} / {} | {} / {} |",
            median_u64(&rss),
            rss.iter().max().unwrap_or(&0),
            median_u64(&hwm),
            hwm.iter().max().unwrap_or(&0)
        )
        .unwrap();
    }

    if !storms.is_empty() {
        writeln!(
            out,
            "\n### Reconnect storm (\"after\" settings)\n\n| gateways | broker stop (s) | down (s) | restart until ready (s) | caught up after ready: p50 / max (s) | caught up after the restart command: max (s) | missing | broker CPU peak, 1 s, % of a core | broker CPU from ready until 5 s after the last gateway, core-seconds | agents' requests peak (/s) | agents' requests in that time |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )
        .unwrap();
        for s in storms {
            let first = &s.samples;
            writeln!(
                out,
                "| {} | {:.1} | {:.0} | {:.1} | {:.1} / {:.1} | {:.1} | {} | {:.0} | {:.1} | {} | {} |",
                s.n,
                s.stop_secs,
                s.down_secs,
                s.start_secs,
                quantile(&s.caught_up, 0.5),
                quantile(&s.caught_up, 1.0),
                s.start_secs + quantile(&s.caught_up, 1.0),
                s.missing,
                s.samples.iter().map(|x| x.0).max().unwrap_or(0) as f64 / hz * 100.0,
                first.iter().map(|x| x.0).sum::<u64>() as f64 / hz,
                s.samples.iter().map(|x| x.1).max().unwrap_or(0),
                first.iter().map(|x| x.1).sum::<u64>()
            )
            .unwrap();
        }
        if let [many, one] = storms {
            writeln!(
                out,
                "\nall {} caught up vs one gateway: {:.2}x from ready, {:.2}x from the restart command \
                 (one gateway is one draw of its reconnect phase: see FLEET.md)",
                many.n,
                quantile(&many.caught_up, 1.0) / quantile(&one.caught_up, 1.0),
                (many.start_secs + quantile(&many.caught_up, 1.0))
                    / (one.start_secs + quantile(&one.caught_up, 1.0))
            )
            .unwrap();
        }
        writeln!(
            out,
            "\nPer second after the restart (broker ticks / agents' requests):\n"
        )
        .unwrap();
        for s in storms {
            let row: Vec<String> = s.samples.iter().map(|(t, r)| format!("{t}/{r}")).collect();
            writeln!(out, "- {} gateway(s): {}", s.n, row.join(" ")).unwrap();
        }
    }
    print!("{out}");
}

// ---------------------------------------------------------------- the link

/// The emulated link's two ends: the broker's side in this network
/// namespace, the gateway's in a namespace of its own, one TUN device each.
const LINK_NETNS: &str = "edgecache-fleet-gw";
const TUN_BROKER: &str = "ecfleet-br";
const TUN_GATEWAY: &str = "ecfleet-gw";
const BROKER_SIDE: &str = "10.254.77.1";
const GATEWAY_SIDE: &str = "10.254.77.2";

/// The broker's listener on the link (its port + 2, below the ephemeral range
/// like the broker's own).
fn link_broker_addr(p: &Params) -> String {
    format!("{BROKER_SIDE}:{}", p.port + 2)
}

#[derive(Debug, Clone)]
struct LinkSpec {
    mbit: f64,
    rtt_ms: f64,
    loss: f64,
    queue_bytes: usize,
    /// TCP congestion control on both ends' routes over the link (empty:
    /// the system's default).
    cc: String,
}

/// What crossed one direction of the link, counted at its sending end.
#[derive(Default)]
struct DirCounters {
    packets: AtomicU64,
    /// IP packets' whole length: what a cellular plan meters.
    ip_bytes: AtomicU64,
    /// TCP payload in them (retransmissions included).
    payload: AtomicU64,
    /// Sent, then lost on the way (random loss).
    lost: AtomicU64,
    /// Never sent: the queue in front of the link was full.
    dropped: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct DirSnap {
    packets: u64,
    ip_bytes: u64,
    payload: u64,
    lost: u64,
    dropped: u64,
}

impl DirCounters {
    fn snap(&self) -> DirSnap {
        DirSnap {
            packets: self.packets.load(Ordering::Relaxed),
            ip_bytes: self.ip_bytes.load(Ordering::Relaxed),
            payload: self.payload.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Sub for DirSnap {
    type Output = DirSnap;
    fn sub(self, o: DirSnap) -> DirSnap {
        DirSnap {
            packets: self.packets - o.packets,
            ip_bytes: self.ip_bytes - o.ip_bytes,
            payload: self.payload - o.payload,
            lost: self.lost - o.lost,
            dropped: self.dropped - o.dropped,
        }
    }
}

/// A cellular-like link between the broker and one gateway, emulated at the
/// IP packet level because this kernel has no netem: the gateway lives in
/// its own network namespace, each side has a TUN device, and this program
/// moves every IP packet from one device to the other, per direction:
/// serialised at the link's rate behind a drop-tail queue, lost at random
/// with the given probability, and delivered RTT/2 after its last bit left.
/// The kernels' own TCP runs end to end (CUBIC, SACK, RTO, window growth),
/// so what loss and delay do to a transfer is TCP's real reaction, not a
/// model of it. Counters at the sending end give the bytes on the wire.
struct Link {
    up: Arc<DirCounters>,
    down: Arc<DirCounters>,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

/// Opens a new TUN device (IFF_TUN: IP packets, IFF_NO_PI: no header). It
/// exists while this program holds the descriptor, so an interrupted run
/// leaves no device behind.
fn open_tun(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    // struct ifreq: the name, then a union whose first member here is the
    // flags (short); 40 bytes in all on Linux.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun (the link mode needs root and TUN)");
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is
    // laid out as and outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// TCP payload bytes of an IPv4 packet (0 for anything else).
fn tcp_payload(pkt: &[u8]) -> u64 {
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if pkt[9] != 6 || pkt.len() < ihl + 20 {
        return 0;
    }
    let doff = usize::from(pkt[ihl + 12] >> 4) * 4;
    total.saturating_sub(ihl + doff) as u64
}

impl Link {
    fn setup(spec: &LinkSpec) -> Link {
        progress(&format!(
            "link: {} Mbit/s, {} ms RTT, {}% loss, {} KiB queue, congestion control {:?}, namespace {LINK_NETNS}",
            spec.mbit,
            spec.rtt_ms,
            spec.loss * 100.0,
            spec.queue_bytes / 1024,
            spec.cc
        ));
        // A namespace left by an interrupted run would hold the name.
        let _ = Command::new("ip")
            .args(["netns", "del", LINK_NETNS])
            .stderr(Stdio::null())
            .status();
        let broker_tun = open_tun(TUN_BROKER);
        let gateway_tun = open_tun(TUN_GATEWAY);
        ip(&["netns", "add", LINK_NETNS]);
        ip(&["link", "set", TUN_GATEWAY, "netns", LINK_NETNS]);
        ip(&[
            "addr",
            "add",
            BROKER_SIDE,
            "peer",
            GATEWAY_SIDE,
            "dev",
            TUN_BROKER,
        ]);
        ip(&["link", "set", TUN_BROKER, "up"]);
        let n = ["-n", LINK_NETNS];
        ip(&[
            &n[..],
            &[
                "addr",
                "add",
                GATEWAY_SIDE,
                "peer",
                BROKER_SIDE,
                "dev",
                TUN_GATEWAY,
            ],
        ]
        .concat());
        ip(&[&n[..], &["link", "set", TUN_GATEWAY, "up"]].concat());
        ip(&[&n[..], &["link", "set", "lo", "up"]].concat());
        // Downloads are sent by the broker's TCP, so its congestion control
        // decides what random loss costs: CUBIC (Linux's default) backs off
        // on every loss, BBR hardly reacts to 1%. Set per route, for the
        // link's connections only, not the machine's default.
        if !spec.cc.is_empty() {
            let cc = spec.cc.as_str();
            #[rustfmt::skip]
            ip(&["route", "replace", GATEWAY_SIDE, "dev", TUN_BROKER, "scope", "link",
                 "src", BROKER_SIDE, "congctl", cc]);
            #[rustfmt::skip]
            ip(&["-n", LINK_NETNS, "route", "replace", BROKER_SIDE, "dev", TUN_GATEWAY,
                 "scope", "link", "src", GATEWAY_SIDE, "congctl", cc]);
        }
        let link = Link {
            up: Arc::default(),
            down: Arc::default(),
        };
        Link::direction(
            gateway_tun.try_clone().unwrap(),
            broker_tun.try_clone().unwrap(),
            spec.clone(),
            link.up.clone(),
        );
        Link::direction(broker_tun, gateway_tun, spec.clone(), link.down.clone());
        link
    }

    /// One direction: a thread reads packets and schedules them (queue,
    /// rate, loss), a second one is the delay line. Departures are in
    /// order and the delay is constant, so the delay line is a FIFO.
    fn direction(
        mut from: std::fs::File,
        mut to: std::fs::File,
        spec: LinkSpec,
        count: Arc<DirCounters>,
    ) {
        use rand::Rng;
        use std::io::{Read, Write};
        let bytes_per_sec = spec.mbit * 1e6 / 8.0;
        let half_rtt = Duration::from_secs_f64(spec.rtt_ms / 2000.0);
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            for (at, pkt) in rx {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                // The device is gone once the namespace is deleted.
                if to.write(&pkt).is_err() {
                    return;
                }
            }
        });
        std::thread::spawn(move || {
            let mut rng = rand::thread_rng();
            let mut buf = vec![0u8; 65536];
            // When the link finishes sending what is queued so far.
            let mut free = Instant::now();
            loop {
                let Ok(len) = from.read(&mut buf) else { return };
                let pkt = &buf[..len];
                // IPv4 only: the kernel's IPv6 chatter on a new device
                // (router solicitations, MLD) is not the gateway's traffic.
                if len < 20 || pkt[0] >> 4 != 4 {
                    continue;
                }
                let now = Instant::now();
                free = free.max(now);
                let queued = (free - now).as_secs_f64() * bytes_per_sec;
                if queued + len as f64 > spec.queue_bytes as f64 {
                    count.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                free += Duration::from_secs_f64(len as f64 / bytes_per_sec);
                count.packets.fetch_add(1, Ordering::Relaxed);
                count.ip_bytes.fetch_add(len as u64, Ordering::Relaxed);
                count.payload.fetch_add(tcp_payload(pkt), Ordering::Relaxed);
                // Lost after using its share of the link, as on the air.
                if rng.gen::<f64>() < spec.loss {
                    count.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if tx.send((free + half_rtt, pkt.to_vec())).is_err() {
                    return;
                }
            }
        });
    }

    /// (up, down): gateway to broker, broker to gateway.
    fn snap(&self) -> (DirSnap, DirSnap) {
        (self.up.snap(), self.down.snap())
    }

    fn teardown(self) {
        let _ = Command::new("ip")
            .args(["netns", "del", LINK_NETNS])
            .status();
    }
}

// ---------------------------------------------------------------- link mode

/// A device-state document like benches/edgecache.rs produces: short
/// strings, one- and two-digit decimals, a millisecond timestamp, a small
/// list; 170-205 bytes, and as repetitive as real telemetry (which is what
/// the codecs feed on).
fn device_state(rng: &mut u64, device: u64) -> String {
    let mut below = |n: u64| {
        // xorshift64: deterministic, so every run produces the same topic.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % n
    };
    const MODES: [&str; 3] = ["auto", "eco", "manual"];
    let alarms = match below(20) {
        0 => r#""low_battery""#,
        1 => r#""door_open","tamper""#,
        _ => "",
    };
    format!(
        r#"{{"device":"sensor-{device}","site":"plant-{}","ts":{},"temp_c":{}.{},"humidity":{}.{},"battery_v":3.{:02},"rssi":-{},"online":{},"fw":"2.{}.{}","mode":"{}","alarms":[{alarms}]}}"#,
        device % 17,
        1_764_000_000_000 + device * 37 + below(1000),
        15 + below(20),
        below(10),
        30 + below(50),
        below(10),
        40 + below(60),
        40 + below(50),
        below(20) != 0,
        below(5),
        below(12),
        MODES[below(3) as usize],
    )
}

/// A producer sending in bulk, as one loading a state topic would: batches
/// fill to librdkafka's default caps (1 MB, 10,000 records per partition)
/// and are compressed whole by `codec`.
fn codec_producer(
    brokers: &str,
    codec: &str,
    linger_ms: u32,
    batch_bytes: Option<u64>,
) -> ThreadedProducer<DefaultProducerContext> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("compression.type", codec)
        .set("linger.ms", linger_ms.to_string())
        .set("message.timeout.ms", "600000");
    if let Some(bytes) = batch_bytes {
        config.set("batch.size", bytes.to_string());
    }
    config.create().expect("producer")
}

/// Bytes of the topic's log segments on the broker's disk: the batches as
/// stored, and as sent to a consumer (the broker does not recompress).
fn topic_disk_bytes(run: &str, topic: &str) -> u64 {
    let mut total = 0;
    for p in 0..PARTITIONS {
        let dir = format!("{run}/kafka/data/{topic}-{p}");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

struct LinkRun {
    codec: String,
    disk_bytes: u64,
    value_bytes: f64,
    secs_to_live: f64,
    keys: u64,
    states: String,
    up: DirSnap,
    down: DirSnap,
    /// Congestion control of the broker's sockets to the gateway.
    cc: String,
    warnings: usize,
    /// Per update: ms until it was in Redis.
    update_ms: Vec<f64>,
    /// Over the updates' window, minus the idle rate: (up, down) bytes.
    update_bytes: (f64, f64),
    updates: usize,
    /// "live", or why the bench stopped waiting.
    outcome: String,
}

fn link_mode(p: &Params, bin: &Path, broker: &Broker, link: &Link, work: &Path) {
    let socket = work.join("link-redis.sock");
    let redis = Redis::launch(work, Some(&socket));
    let pid = std::process::id();
    let load_start = loadavg();

    // All topics first, over loopback: producing is not what is measured.
    let mut topics = Vec::new();
    for codec in &p.link_codecs {
        let topic = format!("link-{codec}-{pid}");
        create_topic(&broker.addr, &topic);
        let producer = codec_producer(&broker.addr, codec, 100, p.link_batch_bytes);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut value_bytes = 0u64;
        for i in 0..p.link_keys {
            let value = device_state(&mut rng, i);
            value_bytes += value.len() as u64;
            send_value(&producer, &topic, &format!("dev-{i}"), &value);
        }
        producer.flush(Duration::from_secs(120)).unwrap();
        // The active segment is written through the page cache: its size
        // is current once the flush returned.
        let disk = topic_disk_bytes(&broker.run, &topic);
        progress(&format!(
            "link: {} keys in {topic}, {:.2} MB on the broker",
            p.link_keys,
            disk as f64 / 1e6
        ));
        topics.push((
            codec.clone(),
            topic,
            disk,
            value_bytes as f64 / p.link_keys.max(1) as f64,
        ));
    }

    let mut runs = Vec::new();
    let mut idle: Option<(f64, DirSnap, DirSnap)> = None;
    for (codec, topic, disk_bytes, value_bytes) in topics {
        let mut conn = redis.conn().expect("redis");
        redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
        let config = work.join(format!("link-{codec}.toml"));
        let (agent_table, kafka_table) = settings_toml(&p.after);
        let mut cc_seen = std::collections::BTreeSet::new();
        std::fs::write(
            &config,
            format!(
                "[agent]\n{agent_table}\n[kafka]\nbrokers = \"{}\"\n[kafka.properties]\n\"client.id\" = \"gw-link\"\n{kafka_table}\n\
                 [redis]\nurl = \"unix://{}\"\n\
                 [[topics]]\nname = \"{topic}\"\nkey_prefix = \"link:\"\n",
                link_broker_addr(p),
                socket.display()
            ),
        )
        .unwrap();
        let log = work.join(format!("link-{codec}.log"));
        let (up0, down0) = link.snap();
        let start = Instant::now();
        let mut agent = Command::new("ip")
            .args(["netns", "exec", LINK_NETNS])
            .arg(bin)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("EDGECACHE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("ip netns exec ... edgecache");
        progress(&format!("link: rehydrating {topic} over the link"));
        // Every state the agent passes through, with when it entered it.
        let mut states: Vec<(String, f64)> = Vec::new();
        // No new key for this long while bytes keep crossing the link: the
        // agent is stuck (as on a batch it cannot decompress); record it
        // and go on instead of waiting forever.
        let stall = Duration::from_secs(p.link_stall_secs);
        let (mut last_keys, mut last_new_key) = (0u64, Instant::now());
        let mut stalled = false;
        for tick in 0u64.. {
            let state = redis.state().unwrap_or_else(|| "-".into());
            if states.last().map(|s| &s.0) != Some(&state) {
                progress(&format!(
                    "  {:.1} s: {state}",
                    start.elapsed().as_secs_f64()
                ));
                states.push((state.clone(), start.elapsed().as_secs_f64()));
            }
            if tick % 20 == 0 || state == "live" {
                // The congestion control the broker's sockets to the
                // gateway really use (the route's, or the system's default).
                cc_seen.extend(broker_side_cc());
            }
            if state == "live" {
                break;
            }
            let keys = dbsize(&redis);
            if keys != last_keys {
                (last_keys, last_new_key) = (keys, Instant::now());
            } else if last_new_key.elapsed() > stall {
                stalled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let secs_to_live = start.elapsed().as_secs_f64();
        let (up1, down1) = link.snap();
        let keys = count_keys(&redis, "link:*");
        let outcome = if stalled {
            format!("stalled: no new key in the last {} s", p.link_stall_secs)
        } else {
            "live".to_owned()
        };
        progress(&format!(
            "link: {codec} {outcome} after {secs_to_live:.1} s, {keys} keys, {:.2} MB down, {:.2} MB up",
            (down1 - down0).ip_bytes as f64 / 1e6,
            (up1 - up0).ip_bytes as f64 / 1e6
        ));

        // Idle over the link: once (it does not depend on the codec).
        if !stalled && idle.is_none() && p.link_idle_secs > 0 {
            std::thread::sleep(Duration::from_secs(5));
            let (u0, d0, t0) = (link.up.snap(), link.down.snap(), Instant::now());
            std::thread::sleep(Duration::from_secs(p.link_idle_secs));
            let (u1, d1) = link.snap();
            idle = Some((t0.elapsed().as_secs_f64(), u1 - u0, d1 - d0));
        }
        let (idle_up, idle_down) = idle
            .map(|(secs, u, d)| (u.ip_bytes as f64 / secs, d.ip_bytes as f64 / secs))
            .unwrap_or((0.0, 0.0));

        // Updates, one at a time, each waited for.
        let producer = codec_producer(&broker.addr, &codec, 0, p.link_batch_bytes);
        let (u0, d0, t0) = (link.up.snap(), link.down.snap(), Instant::now());
        let mut update_ms = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let updates = if stalled { 0 } else { p.link_updates };
        for i in 0..updates {
            let key = format!("probe-{i}");
            let at = Instant::now();
            send_value(&producer, &topic, &key, &device_state(&mut rng, i as u64));
            let wait_until = at + Duration::from_secs(60);
            while !exists(&redis, &format!("link:{key}")) && Instant::now() < wait_until {
                std::thread::sleep(Duration::from_millis(5));
            }
            update_ms.push(at.elapsed().as_secs_f64() * 1000.0);
            let next = t0 + Duration::from_millis(p.link_update_ms) * (i as u32 + 1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let (u1, d1, secs) = (link.up.snap(), link.down.snap(), t0.elapsed().as_secs_f64());
        let update_bytes = (
            ((u1 - u0).ip_bytes as f64 - idle_up * secs) / updates as f64,
            ((d1 - d0).ip_bytes as f64 - idle_down * secs) / updates as f64,
        );
        let _ = agent.kill();
        let _ = agent.wait();
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let warning_lines: Vec<&str> = log_text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        // What the agent complained about is part of the result (a timeout
        // over a slow link, say): the first few lines, on stderr.
        for line in warning_lines.iter().take(5) {
            progress(&format!(
                "  agent: {}",
                line.chars().take(300).collect::<String>()
            ));
        }
        let warnings = warning_lines.len();
        runs.push(LinkRun {
            codec,
            disk_bytes,
            value_bytes,
            secs_to_live,
            keys,
            states: states
                .iter()
                .map(|(s, t)| format!("{s} {t:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            up: up1 - up0,
            down: down1 - down0,
            cc: cc_seen.into_iter().collect::<Vec<_>>().join(", "),
            warnings,
            update_ms,
            update_bytes,
            updates,
            outcome,
        });
    }
    drop(redis);
    print_link(p, &load_start, &runs, idle);
}

/// Congestion control algorithms `ss` shows on the broker's sockets to the
/// gateway's address.
fn broker_side_cc() -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established", "dst", GATEWAY_SIDE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter(|w| ["cubic", "bbr", "reno"].contains(w))
        .map(str::to_owned)
        .collect()
}

fn dbsize(redis: &Redis) -> u64 {
    redis
        .conn()
        .and_then(|mut c| redis::cmd("DBSIZE").query::<u64>(&mut c).ok())
        .unwrap_or(0)
}

fn exists(redis: &Redis, key: &str) -> bool {
    redis
        .conn()
        .and_then(|mut c| redis::cmd("EXISTS").arg(key).query::<u64>(&mut c).ok())
        == Some(1)
}

fn count_keys(redis: &Redis, pattern: &str) -> u64 {
    let mut conn = redis.conn().expect("redis");
    let mut cursor = 0u64;
    let mut n = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(5000)
            .query(&mut conn)
            .unwrap();
        n += keys.len() as u64;
        if next == 0 {
            return n;
        }
        cursor = next;
    }
}

fn print_link(
    p: &Params,
    load_start: &str,
    runs: &[LinkRun],
    idle: Option<(f64, DirSnap, DirSnap)>,
) {
    let l = &p.link;
    let mut out = String::new();
    writeln!(
        out,
        "\n## Rehydrate over a constrained link\n\n\
         | fact | value |\n|---|---|\n\
         | link | {} Mbit/s each way, {} ms RTT, {}% random loss each way, {} KiB drop-tail queue (emulated per IP packet: see FLEET.md); TCP congestion control on the link's routes: {} |\n\
         | topic | {} keys, {PARTITIONS} partitions, compacted; produced in bulk (linger.ms 100, batch.size {}) |\n\
         | load average at start / end | {load_start} / {} |",
        l.mbit,
        l.rtt_ms,
        l.loss * 100.0,
        l.queue_bytes / 1024,
        if l.cc.is_empty() { "the system's default" } else { &l.cc },
        p.link_keys,
        p.link_batch_bytes
            .map_or("librdkafka's default, 1000000".to_owned(), |b| b.to_string()),
        loadavg()
    )
    .unwrap();
    writeln!(
        out,
        "\n| compression | value bytes (mean) | topic on the broker (MB) | until live (s), or outcome | keys in Redis | down: IP MB / TCP payload MB / packets / lost | up: IP MB / packets / lost | queue drops down / up | down goodput (Mbit/s) | broker's TCP congestion control | agent warnings | states (s from start) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for r in runs {
        writeln!(
            out,
            "| {} | {:.0} | {:.2} | {} | {} | {:.2} / {:.2} / {} / {} | {:.3} / {} / {} | {} / {} | {:.3} | {} | {} | {} |",
            r.codec,
            r.value_bytes,
            r.disk_bytes as f64 / 1e6,
            if r.outcome == "live" {
                format!("{:.1}", r.secs_to_live)
            } else {
                format!("{} ({:.0} s)", r.outcome, r.secs_to_live)
            },
            r.keys,
            r.down.ip_bytes as f64 / 1e6,
            r.down.payload as f64 / 1e6,
            r.down.packets,
            r.down.lost,
            r.up.ip_bytes as f64 / 1e6,
            r.up.packets,
            r.up.lost,
            r.down.dropped,
            r.up.dropped,
            r.down.payload as f64 * 8.0 / r.secs_to_live / 1e6,
            r.cc,
            r.warnings,
            r.states
        )
        .unwrap();
    }
    if let Some((secs, up, down)) = idle {
        let day = 86_400.0 / secs;
        writeln!(
            out,
            "\n### Idle over the link ({secs:.0} s, caught up, nothing new)\n\n\
             | direction | IP bytes/s | TCP payload bytes/s | packets/s | per day, IP (MB) |\n|---|---|---|---|---|\n\
             | down (broker to gateway) | {:.1} | {:.1} | {:.2} | {:.2} |\n\
             | up (gateway to broker) | {:.1} | {:.1} | {:.2} | {:.2} |\n\
             | both | {:.1} | | | {:.2} |",
            down.ip_bytes as f64 / secs,
            down.payload as f64 / secs,
            down.packets as f64 / secs,
            down.ip_bytes as f64 * day / 1e6,
            up.ip_bytes as f64 / secs,
            up.payload as f64 / secs,
            up.packets as f64 / secs,
            up.ip_bytes as f64 * day / 1e6,
            (up.ip_bytes + down.ip_bytes) as f64 / secs,
            (up.ip_bytes + down.ip_bytes) as f64 * day / 1e6
        )
        .unwrap();
    }
    writeln!(
        out,
        "\n### One update over the link (one record, produced alone, {} ms apart)\n\n\
         | compression | updates | until in Redis: p50 / max (ms) | IP bytes per update over idle: down / up |\n|---|---|---|---|",
        p.link_update_ms
    )
    .unwrap();
    for r in runs.iter().filter(|r| r.updates > 0) {
        writeln!(
            out,
            "| {} | {} | {:.0} / {:.0} | {:.0} / {:.0} |",
            r.codec,
            r.updates,
            quantile(&r.update_ms, 0.5),
            quantile(&r.update_ms, 1.0),
            r.update_bytes.1,
            r.update_bytes.0
        )
        .unwrap();
    }
    print!("{out}");
}

// ---------------------------------------------------------------- cluster mode

/// Three combined broker+controller nodes: a cluster id is fixed so the
/// three `format` runs agree ("edgecache-fleet!" in url-safe base64).
const CLUSTER_ID: &str = "ZWRnZWNhY2hlLWZsZWV0IQ";
const CLUSTER_NODES: usize = 3;
/// Kafka's server JVM options with a small heap, so three brokers fit next
/// to the agents and the other work on this machine.
const CLUSTER_JVM: &str = "-Xmx512m -Xms512m -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15";

struct ClusterWindow {
    secs: f64,
    /// Per node, in node order.
    ticks: Vec<u64>,
    socks: Vec<Sock>,
    conns: Vec<usize>,
}

fn measure_cluster(nodes: &[Broker], pids: &[u32], secs: u64) -> ClusterWindow {
    let snap = || -> Vec<(HashMap<String, Sock>, u64)> {
        nodes
            .iter()
            .map(|b| (sockets(b.port, pids), b.ticks()))
            .collect()
    };
    let (s0, start) = (snap(), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (s1, secs) = (snap(), start.elapsed().as_secs_f64());
    ClusterWindow {
        secs,
        ticks: s0.iter().zip(&s1).map(|(a, b)| b.1 - a.1).collect(),
        socks: s0
            .iter()
            .zip(&s1)
            .map(|(a, b)| socket_delta(&a.0, &b.0))
            .collect(),
        conns: s1.iter().map(|s| s.0.len()).collect(),
    }
}

/// Runs `command` on every node at once: a node of a three-voter quorum is
/// not ready (nor stopped cleanly) until the others are there too.
fn cluster_services(nodes: &[Broker], command: &str, voters: &str) {
    let children: Vec<Child> = nodes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let env = [
                ("EDGECACHE_KAFKA_NODE_ID", (i + 1).to_string()),
                ("EDGECACHE_KAFKA_VOTERS", voters.to_owned()),
                ("EDGECACHE_KAFKA_CLUSTER_ID", CLUSTER_ID.to_owned()),
                ("EDGECACHE_KAFKA_JVM_OPTS", CLUSTER_JVM.to_owned()),
            ];
            services_command(b.port, &b.run, command, &env)
                .spawn()
                .expect("run tests/services.sh")
        })
        .collect();
    for mut child in children {
        assert!(
            child.wait().unwrap().success(),
            "tests/services.sh {command} failed on a cluster node"
        );
    }
}

/// Partition -> leader's node id, once every partition has one.
fn leaders(brokers: &str, topic: &str) -> BTreeMap<i32, i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let found: BTreeMap<i32, i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .filter(|p| p.leader() >= 0)
            .map(|p| (p.id(), p.leader()))
            .collect();
        if found.len() == PARTITIONS as usize {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: partitions without a leader"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn cluster_mode(p: &Params, bin: &Path, work: &Path) {
    let nodes: Vec<Broker> = (0..CLUSTER_NODES)
        .map(|i| {
            let port = p.cluster_port + 2 * i as u16;
            Broker {
                addr: format!("127.0.0.1:{port}"),
                port,
                run: format!("{}-cluster-{}", p.run, i + 1),
            }
        })
        .collect();
    let voters = nodes
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{}@127.0.0.1:{}", i + 1, b.port + 1))
        .collect::<Vec<_>>()
        .join(",");
    let bootstrap = nodes
        .iter()
        .map(|b| b.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    Broker::services(nodes[0].port, &nodes[0].run, "deps");
    // Nodes left by an interrupted run hold stale topics: start fresh.
    cluster_services(&nodes, "kafka-stop", &voters);
    progress(&format!(
        "cluster: starting {CLUSTER_NODES} nodes ({bootstrap})"
    ));
    cluster_services(&nodes, "kafka-start", &voters);

    // Replication factor 3, preferred leaders spread in turn over the three
    // nodes: partitions 0 and 3 on node 1, 1 and 4 on node 2, 2 and 5 on 3.
    let assignment: Vec<Vec<i32>> = (0..PARTITIONS)
        .map(|p| (0..3).map(|r| (p + r) % 3 + 1).collect())
        .collect();
    let refs: Vec<&[i32]> = assignment.iter().map(Vec::as_slice).collect();
    let topic = format!("cluster-{}", std::process::id());
    create_topic_with(&bootstrap, &topic, TopicReplication::Variable(&refs));
    let leaders = leaders(&bootstrap, &topic);
    progress(&format!(
        "cluster: {topic} leaders (partition: node) {leaders:?}"
    ));
    let producer = producer(&bootstrap);
    for i in 0..p.keys {
        send(&producer, &topic, &format!("dev-{i}"), i);
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    // Reading partitions led by 1, 2 or 3 of the nodes.
    let led_by = |count: i32| -> Vec<i32> {
        leaders
            .iter()
            .filter(|(_, node)| **node <= count)
            .map(|(p, _)| *p)
            .collect()
    };
    let variants: Vec<(i32, Vec<i32>)> = (1..=3).rev().map(|c| (c, led_by(c))).collect();
    let redises: Vec<Redis> = (0..p.cluster_n).map(|_| Redis::start(work)).collect();
    let load_start = loadavg();

    // Fresh JVMs: an unmeasured pass first (see fleet_mode).
    {
        progress("cluster: warm-up");
        let fleet = Fleet::start(bin, &bootstrap, &topic, &redises, &p.after, work, "");
        fleet.wait_live(&redises);
        std::thread::sleep(Duration::from_secs(p.cluster_idle_secs.min(20)));
    }
    std::thread::sleep(Duration::from_secs(3));
    progress("cluster: brokers alone");
    let alone = measure_cluster(&nodes, &[], p.cluster_idle_secs);
    let mut windows = Vec::new();
    for (count, partitions) in &variants {
        progress(&format!(
            "cluster: {} agents reading partitions {partitions:?} (leaders on {count} node(s))",
            p.cluster_n
        ));
        let list = partitions
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let fleet = Fleet::start(
            bin,
            &bootstrap,
            &topic,
            &redises,
            &p.after,
            work,
            &format!("partitions = [{list}]"),
        );
        fleet.wait_live(&redises);
        std::thread::sleep(Duration::from_secs(5));
        let w = measure_cluster(&nodes, &fleet.pids(), p.cluster_idle_secs);
        progress(&format!(
            "  requests/s per gateway to nodes 1/2/3: {}",
            w.socks
                .iter()
                .map(|s| format!("{:.3}", s.segs_out as f64 / w.secs / p.cluster_n as f64))
                .collect::<Vec<_>>()
                .join(" / ")
        ));
        windows.push((*count, partitions.clone(), w));
    }
    drop(redises);
    cluster_services(&nodes, "kafka-stop", &voters);
    print_cluster(p, &load_start, &leaders, &alone, &windows);
}

fn print_cluster(
    p: &Params,
    load_start: &str,
    leaders: &BTreeMap<i32, i32>,
    alone: &ClusterWindow,
    windows: &[(i32, Vec<i32>, ClusterWindow)],
) {
    let hz = ticks_per_sec();
    let n = p.cluster_n as f64;
    let per_node = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let mut out = String::new();
    writeln!(
        out,
        "\n## Three-broker KRaft cluster on loopback\n\n\
         | fact | value |\n|---|---|\n\
         | nodes | {CLUSTER_NODES} combined broker+controller, Kafka's server JVM options with -Xmx512m, ports {} |\n\
         | topic | {PARTITIONS} partitions, replication factor 3, {} keys; leaders (partition: node) {leaders:?} |\n\
         | gateways | {}, the binary's defaults, each reading the partitions below |\n\
         | windows | {} s idle each, after a warm-up pass; brokers alone first |\n\
         | load average at start / end | {load_start} / {} |",
        (0..CLUSTER_NODES)
            .map(|i| (p.cluster_port + 2 * i as u16).to_string())
            .collect::<Vec<_>>()
            .join(", "),
        p.keys,
        p.cluster_n,
        p.cluster_idle_secs,
        loadavg()
    )
    .unwrap();
    writeln!(
        out,
        "\n| nodes leading what a gateway reads | partitions | requests/s per gateway to node 1 / 2 / 3 | all nodes | connections per gateway to node 1 / 2 / 3 | bytes/s per gateway to / from all nodes | broker CPU per gateway over alone, % of a core, node 1 / 2 / 3 |\n|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for (count, partitions, w) in windows {
        let req: Vec<f64> = w
            .socks
            .iter()
            .map(|s| s.segs_out as f64 / w.secs / n)
            .collect();
        let conns: Vec<f64> = w.conns.iter().map(|&c| c as f64 / n).collect();
        let cpu: Vec<f64> = w
            .ticks
            .iter()
            .zip(&alone.ticks)
            .map(|(&t, &a)| (t as f64 / w.secs - a as f64 / alone.secs) / hz * 100.0 / n)
            .collect();
        writeln!(
            out,
            "| {count} | {partitions:?} | {} | {:.3} | {} | {:.1} / {:.1} | {} |",
            per_node(&req, 3),
            req.iter().sum::<f64>(),
            per_node(&conns, 1),
            w.socks.iter().map(|s| s.bytes_out).sum::<u64>() as f64 / w.secs / n,
            w.socks.iter().map(|s| s.bytes_in).sum::<u64>() as f64 / w.secs / n,
            per_node(&cpu, 4)
        )
        .unwrap();
    }
    writeln!(
        out,
        "\nBroker CPU, brokers alone: {} % of a core (node 1 / 2 / 3; replication between them included)",
        per_node(
            &alone
                .ticks
                .iter()
                .map(|&t| t as f64 / alone.secs / hz * 100.0)
                .collect::<Vec<_>>(),
            2
        )
    )
    .unwrap();
    print!("{out}");
}
