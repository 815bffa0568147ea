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
//!   EDGECACHE_FLEET_AFTER        overrides for the "after" variant (none: the binary's defaults)
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
use std::sync::atomic::{AtomicBool, Ordering};
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
    let mut facts = vec![
        ("gateways (N)".to_owned(), p.n.to_string()),
        ("agent".into(), bin.display().to_string()),
        ("load average at start".into(), loadavg()),
        ("busiest processes at start".into(), busiest()),
    ];

    let broker = Broker::start(&p);
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

    let redises: Vec<Redis> = (0..p.n).map(|_| Redis::start(work.path())).collect();
    let arrivals = Arrivals::start(&redises);

    // A fresh JVM compiles its hot paths for the first minutes, which would
    // be billed to whichever variant runs first: warm it up with one
    // unmeasured pass of each variant.
    for (i, settings) in [&p.before, &p.after].into_iter().enumerate() {
        progress("warm-up: a fleet the tables do not count");
        let fleet = Fleet::start(&bin, &broker.addr, &topic, &redises, settings, work.path());
        fleet.wait_live(&redises);
        fan_out(
            &broker,
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
            .push(measure_window(&broker, &[], p.idle_secs));
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
            let fleet = Fleet::start(&bin, &broker.addr, &topic, &redises, settings, work.path());
            fleet.wait_live(&redises);
            // Let the catch-up's last fetches and the first statistics pass.
            std::thread::sleep(Duration::from_secs(5));
            let window = measure_window(&broker, &fleet.pids(), p.idle_secs);
            progress(&format!(
                "  idle: broker {:.1} ticks/s, {:.2} requests/s per gateway",
                window.ticks as f64 / window.secs,
                window.requests as f64 / window.secs / p.n as f64
            ));
            idle.entry(name).or_default().push(window);
            memory.entry(name).or_default().extend(fleet.memory());
            let f = fan_out(
                &broker,
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
                &broker,
                &topic,
                &redises[..n],
                &arrivals,
                &p,
                work.path(),
            ));
        }
    }

    facts.push(("load average at end".into(), loadavg()));
    facts.push(("busiest processes at end".into(), busiest()));
    arrivals.stop();
    drop(redises);
    broker.stop();
    print_tables(&p, &facts, &idle, &fanout, &memory, &storms);
}

// ---------------------------------------------------------------- params

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

struct Params {
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
        Params {
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

impl Broker {
    fn services(port: u16, run: &str, command: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/services.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(command)
            .env("EDGECACHE_KAFKA_PORT", port.to_string())
            .env("EDGECACHE_RUN", run)
            .env("EDGECACHE_KAFKA_JVM_OPTS", BROKER_JVM)
            .status()
            .expect("run tests/services.sh");
        assert!(status.success(), "tests/services.sh {command} failed");
    }

    fn start(p: &Params) -> Broker {
        Broker::services(p.port, &p.run, "deps");
        // A broker left on these ports by an interrupted run holds stale
        // topics and JIT state: start fresh.
        Broker::services(p.port, &p.run, "kafka-stop");
        Broker::services(p.port, &p.run, "kafka-start");
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
    let topic = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
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
    loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(&value)) {
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
        let port = free_port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
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
    ) -> Fleet {
        let mut agent_table = String::new();
        let mut kafka_table = String::new();
        for s in settings {
            match s {
                Setting::Agent(k, v) => writeln!(agent_table, "{k} = {v}").unwrap(),
                Setting::Kafka(k, v) => writeln!(kafka_table, "{k:?} = {v:?}").unwrap(),
            }
        }
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
                         [[topics]]\nname = \"{topic}\"\nkey_prefix = \"{PREFIX}\"\n",
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
    let fleet = Fleet::start(bin, &broker.addr, topic, redises, &p.after, dir);
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
