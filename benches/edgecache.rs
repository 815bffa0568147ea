//! The edgecache benchmark (issue 6): the release agent binary against the
//! real local Kafka broker and redis-servers this program starts itself.
//!
//!     bash tests/services.sh kafka-start            # once; the broker on 127.0.0.1:39092
//!     cargo bench --bench edgecache                 # 1,000,000 records, 5-10 min
//!     EDGECACHE_BENCH_RECORDS=20000 cargo bench --bench edgecache   # small run, ~1 min
//!
//! Environment:
//!   EDGECACHE_BENCH_RECORDS      records preloaded for the rehydrate (1_000_000); keys = records/10
//!   EDGECACHE_BENCH_RUNS         rehydrate runs, median reported (3)
//!   EDGECACHE_BENCH_NAIVE_RUNS   naive-reference runs (same as RUNS)
//!   EDGECACHE_BENCH_PEER_RUNS    side-by-side rounds (same as RUNS; 0 skips them): edgecache
//!                                (postcard, json), kcat | awk | redis-cli, Python;
//!                                AOF everysec and off. kcat and python3 must be there.
//!   EDGECACHE_BENCH_BASELINE_BIN another agent binary (e.g. main's) run side by side too
//!   EDGECACHE_BENCH_LIVE_SECS    seconds per live-latency rate (5)
//!   EDGECACHE_BENCH_COMPACT_KEYS keys for the compactness comparison (100_000)
//!   EDGECACHE_BENCH_BIN          use this agent binary instead of building target/release/edgecache
//!   EDGECACHE_BENCH_AGENT        experiment: `k=v,k=v` for the agent's [agent] table,
//!                                e.g. max_batch_records=256,memory_budget_mib=16
//!   EDGECACHE_BENCH_KAFKA_PROPERTIES  experiment: `k=v,k=v` added to the agent's [kafka.properties]
//!   EDGECACHE_BENCH_HOG          CPU hogs (busy shell loops) running during every agent
//!                                rehydrate, to measure peak RSS with the agent starved (0)
//!   EDGECACHE_BENCH_HOG_NICE     their niceness (10: the agent's own while it catches up)
//!   EDGECACHE_TEST_BROKERS       broker list (127.0.0.1:39092), as for the tests
//!
//! Progress goes to stderr; the result is a Markdown table on stdout, so
//! `cargo bench --bench edgecache > table.md` keeps just the table. Raw
//! samples (RSS over time, latency lists) land in target/edgecache-bench/ as
//! CSV, for plots.
//!
//! Nothing here asserts a goal: the numbers are printed, BENCHMARKS.md
//! compares them with issue 6. The machine is shared and noisy, so the
//! rehydrate and the naive reference run interleaved in the same process and
//! the speed-up is a ratio of medians measured side by side.
//!
//! This file is self-contained on purpose (it does not include tests/util):
//! the helpers below are small, and the test helpers change with the tests.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// In a subdirectory: a file directly under benches/ would be taken for a
// bench target of its own.
#[path = "edgecache/peers.rs"]
mod peers;
#[path = "edgecache/plots.rs"]
mod plots;

const PARTITIONS: i32 = 6;
/// The agent's own keys in Redis with the default namespace.
const STATUS_KEY: &str = "edgecache:status";
const OFFSETS_KEY: &str = "edgecache:offsets";
/// All of the agent's own keys; the field table exists only once a
/// postcard value used it.
const META_KEYS: [&str; 4] = [
    "edgecache:marker",
    OFFSETS_KEY,
    STATUS_KEY,
    "edgecache:fields",
];
/// A local app's read rate per reader thread, not a load generator: on a
/// 2-core box, readers spinning flat out would steal the CPU the agent and
/// Redis need and measure the scheduler instead of Redis.
const READ_PAUSE: Duration = Duration::from_millis(1);
/// How often the rehydrate watcher looks at Redis and /proc: fine enough for
/// a ~5 s measurement, cheap enough (one HGET) not to load Redis.
const WATCH_EVERY: Duration = Duration::from_millis(10);

fn main() {
    let p = Params::from_env();
    // Before anything is built or preloaded: a missing peer fails the bench.
    let python = peers::check_tools();
    let bin = agent_binary();
    let brokers = brokers();
    let out_dir = target_dir().join("edgecache-bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let work = tempfile::tempdir().unwrap();
    let table = Table {
        facts: machine_facts(&bin),
    };

    // ---- 1 + 2: rehydrate and the naive reference, interleaved ----
    let topic = unique("bench-rehydrate");
    create_topic(&brokers, &topic);
    progress(&format!(
        "preloading {} records over {} keys into {topic} ({PARTITIONS} partitions)",
        p.records, p.keys
    ));
    let preload = preload(&brokers, &topic, p.records, p.keys);
    progress(&format!(
        "preloaded in {:.1} s ({:.0} records/s); {} live keys, mean value {:.0} bytes",
        preload.seconds,
        p.records as f64 / preload.seconds,
        preload.live_keys.len(),
        preload.mean_value_bytes
    ));
    let highs = high_watermarks(&brokers, &topic);
    let total: i64 = highs.values().sum();
    assert_eq!(total as u64, p.records, "one offset per record expected");

    let mut agent_runs = Vec::new();
    let mut naive_runs = Vec::new();
    for run in 0..p.runs.max(p.naive_runs) {
        if run < p.runs {
            let r = rehydrate_run(&bin, &brokers, &topic, &highs, work.path());
            check_keys(r.redis_keys, &preload, "edgecache");
            progress(&format!(
                "edgecache run {}: live after {:.2} s (data complete {:.2} s), {:.0} records/s, VmHWM {} KiB, {} batches",
                run + 1,
                r.live.as_secs_f64(),
                r.data.as_secs_f64(),
                p.records as f64 / r.live.as_secs_f64(),
                r.hwm_kib,
                r.script.calls
            ));
            write_csv(
                &out_dir.join(format!("rss-run{}.csv", run + 1)),
                "ms,rss_kib",
                r.rss.iter().map(|(ms, kib)| format!("{ms},{kib}")),
            );
            agent_runs.push(r);
        }
        if run < p.naive_runs {
            let r = naive_run(&brokers, &topic, &highs);
            check_keys(r.redis_keys, &preload, "naive");
            progress(&format!(
                "naive run {}: {:.2} s, {:.0} records/s",
                run + 1,
                r.seconds,
                p.records as f64 / r.seconds
            ));
            naive_runs.push(r);
        }
    }

    // ---- 2b: side by side with the peers users would run instead ----
    let bins = peers::Bins {
        agent: bin.clone(),
        baseline: std::env::var_os("EDGECACHE_BENCH_BASELINE_BIN").map(PathBuf::from),
        python,
    };
    let side = peers::side_by_side(
        p.peer_runs,
        &bins,
        &brokers,
        &topic,
        &highs,
        work.path(),
        &preload,
    );

    // ---- 3: reads while the agent rehydrates ----
    progress("reads during a rehydrate (unix socket and TCP readers)");
    let reads = reads_during_rehydrate(&bin, &brokers, &topic, &highs, work.path(), &preload);
    for (name, lat) in [("unix", &reads.unix), ("tcp", &reads.tcp)] {
        write_csv(
            &out_dir.join(format!("get-latency-{name}.csv")),
            "us",
            lat.iter().map(|us| us.to_string()),
        );
    }

    // ---- 4: live latency ----
    progress("live latency at 1k/s and 20k/s");
    // Kafka alone first (no agent or Redis running), then the agent: the
    // floor and the agent's figure from the same broker in the same run.
    let floor_topic = unique("bench-floor");
    let floor = kafka_floor(&brokers, &floor_topic, p.live_secs);
    let live_topic = unique("bench-live");
    let live = live_latency(&bin, &brokers, &live_topic, work.path(), p.live_secs);
    for (name, rates) in [("live-latency", &live), ("kafka-floor", &floor)] {
        for l in rates {
            write_csv(
                &out_dir.join(format!("{name}-{}.csv", l.rate)),
                "us",
                l.produce_to_readable.iter().map(|us| us.to_string()),
            );
        }
    }

    // ---- 5: compactness ----
    progress(&format!(
        "compactness: {} keys stored as postcard, json, raw, hash",
        p.compact_keys
    ));
    let compact_topic = unique("bench-compact");
    let compact = compactness(&bin, &brokers, &compact_topic, work.path(), p.compact_keys);

    // ---- 6: binary sizes ----
    let sizes = binary_sizes(&bin);

    table.print(
        &p,
        &preload,
        &agent_runs,
        &naive_runs,
        &reads,
        &live,
        &floor,
        &compact,
        &sizes,
    );
    if !side.is_empty() {
        println!("{}", peers::print(&side, p.records));
    }
    progress(&format!("raw samples in {}", out_dir.display()));
    // A full run writes ~200 MB to the broker; do not let reruns pile up.
    delete_topics(
        &brokers,
        &[&topic, &floor_topic, &live_topic, &compact_topic],
    );
    // Last, so a missing font cannot cost the table or leave topics behind.
    draw_plots(
        &out_dir,
        &p,
        &agent_runs,
        &naive_runs,
        &reads,
        &live,
        &floor,
    );
    progress(&format!("plots in {}/*.png", out_dir.display()));
}

/// The PNG plots (benches/edgecache/plots.rs) from the samples above.
fn draw_plots(
    out_dir: &Path,
    p: &Params,
    agent: &[RehydrateRun],
    naive: &[NaiveRun],
    reads: &Reads,
    live: &[LiveRate],
    floor: &[LiveRate],
) {
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        plots::register_font()?;
        let records = p.records as f64;
        let runs: Vec<plots::Line> = agent
            .iter()
            .enumerate()
            .map(|(i, r)| plots::Line {
                label: format!("run {} (VmHWM {:.1} MiB)", i + 1, r.hwm_kib as f64 / 1024.0),
                points: r
                    .rss
                    .iter()
                    .map(|&(ms, kib)| (ms as f64 / 1000.0, kib as f64 / 1024.0))
                    .collect(),
            })
            .collect();
        plots::rss(
            &out_dir.join("rss.png"),
            &runs,
            memory_budget_mib_value(),
            24.0,
            &format!("Agent RSS while rehydrating {} records", p.records),
        )?;
        let us = |v: &[u64]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
        plots::latency(
            &out_dir.join("get-latency.png"),
            &[
                ("GET during rehydrate, unix socket".into(), us(&reads.unix)),
                ("GET during rehydrate, TCP".into(), us(&reads.tcp)),
                ("GET, idle Redis, unix socket".into(), us(&reads.idle_unix)),
                ("GET, idle Redis, TCP".into(), us(&reads.idle_tcp)),
            ],
            &[(1.0, "goal: p99 ≤ 1 ms".into())],
            "Redis GET latency while the agent rehydrates (curves cross the grey line at p99)",
        )?;
        let mut series = Vec::new();
        let mut marks = Vec::new();
        for l in live {
            series.push((
                format!("produce → readable, {}/s", l.rate),
                us(&l.produce_to_readable),
            ));
            series.push((
                format!("broker ack → readable, {}/s", l.rate),
                l.ack_to_readable.clone(),
            ));
            if let Some(f) = floor.iter().find(|f| f.rate == l.rate) {
                series.push((
                    format!("Kafka alone: produce → polled, {}/s", l.rate),
                    us(&f.produce_to_readable),
                ));
            }
            let goal_ms = if l.rate <= 1000 { 5.0 } else { 20.0 };
            marks.push((
                goal_ms,
                format!("goal at {}/s: p99 ≤ {goal_ms:.0} ms", l.rate),
            ));
        }
        plots::latency(
            &out_dir.join("live-latency.png"),
            &series,
            &marks,
            "Live latency, produce → key readable in Redis (curves cross the grey line at p99)",
        )?;
        let agent_rates: Vec<f64> = agent
            .iter()
            .map(|r| records / r.data.as_secs_f64())
            .collect();
        let naive_rates: Vec<f64> = naive.iter().map(|r| records / r.seconds).collect();
        plots::throughput(
            &out_dir.join("rehydrate.png"),
            &agent_rates,
            &naive_rates,
            200_000.0,
            median(&naive_rates),
            &format!(
                "Rehydrate of {} records: edgecache vs one SET per record",
                p.records
            ),
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        panic!("drawing the plots failed: {e}");
    }
}

// ===================================================================
// Parameters, binary, machine
// ===================================================================

struct Params {
    records: u64,
    keys: u64,
    runs: usize,
    naive_runs: usize,
    peer_runs: usize,
    live_secs: u64,
    compact_keys: u64,
}

impl Params {
    fn from_env() -> Params {
        fn var(name: &str, default: u64) -> u64 {
            match std::env::var(name) {
                Ok(v) => v
                    .replace('_', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
                Err(_) => default,
            }
        }
        let records = var("EDGECACHE_BENCH_RECORDS", 1_000_000).max(10);
        let runs = var("EDGECACHE_BENCH_RUNS", 3).max(1) as usize;
        Params {
            records,
            keys: records / 10,
            runs,
            naive_runs: var("EDGECACHE_BENCH_NAIVE_RUNS", runs as u64) as usize,
            peer_runs: var("EDGECACHE_BENCH_PEER_RUNS", runs as u64) as usize,
            live_secs: var("EDGECACHE_BENCH_LIVE_SECS", 5).max(1),
            compact_keys: var("EDGECACHE_BENCH_COMPACT_KEYS", 100_000).max(100),
        }
    }
}

fn progress(msg: &str) {
    eprintln!("[bench {:>7.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// The release binary, built here. `cargo bench` itself builds the binary
/// with the bench profile (panic=unwind) into the same path, which is not
/// what ships, so the release build is asked for explicitly; when nothing
/// changed this takes a second.
fn agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("EDGECACHE_BENCH_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "EDGECACHE_BENCH_BIN={} does not exist",
            bin.display()
        );
        return bin;
    }
    progress("cargo build --release --bin edgecache");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "edgecache"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build --release --bin edgecache failed"
    );
    target_dir().join("release/edgecache")
}

fn brokers() -> String {
    let brokers =
        std::env::var("EDGECACHE_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:39092".into());
    let first = brokers.split(',').next().unwrap().to_owned();
    if TcpStream::connect_timeout(&first.parse().unwrap(), Duration::from_secs(2)).is_err() {
        panic!(
            "Kafka broker not reachable at {brokers}: run `bash tests/services.sh deps && \
             bash tests/services.sh kafka-start` first"
        );
    }
    brokers
}

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), now_us())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn machine_facts(bin: &Path) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = proc_field(&meminfo, "MemTotal:").unwrap_or(0);
    let cmd = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let git = cmd(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !cmd(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
        ],
    )
    .is_empty();
    vec![
        ("cores (nproc)".into(), cmd("nproc", &[])),
        ("CPU".into(), model),
        ("memory".into(), format!("{} MiB", mem_kib / 1024)),
        ("kernel".into(), cmd("uname", &["-r"])),
        (
            "redis-server".into(),
            cmd("redis-server", &["--version"])
                .split_whitespace()
                .find(|w| w.starts_with("v="))
                .unwrap_or("?")
                .trim_start_matches("v=")
                .to_owned(),
        ),
        ("Kafka broker JVM".into(), broker_jvm()),
        (
            "load average at start".into(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("agent config".into(), {
            let mut changed = Vec::new();
            if let Ok(a) = std::env::var("EDGECACHE_BENCH_AGENT") {
                changed.push(format!("agent {a}"));
            }
            if let Ok(p) = std::env::var("EDGECACHE_BENCH_KAFKA_PROPERTIES") {
                changed.push(format!("kafka.properties {p}"));
            }
            let nice = format!(
                "started at nice {} (the systemd unit's Nice=, 0 if unset; the agent adds agent.catch_up_nice while catching up; the readers and the naive reference at 0)",
                agent_nice()
            );
            if changed.is_empty() {
                format!("defaults (see systemd/edgecache.toml), Redis over TCP, {nice}")
            } else {
                format!(
                    "defaults but {}; Redis over TCP, {nice}",
                    changed.join(", ")
                )
            }
        }),
        (
            "agent".into(),
            format!(
                "{} (git {git}{})",
                bin.display(),
                if dirty { ", src modified" } else { "" }
            ),
        ),
    ]
}

/// The JVM options of the broker `tests/services.sh kafka-start` runs (its
/// pid file), which weigh on produce latency: the tests' fast-start flags
/// (C1 only, serial GC) or Kafka's own server defaults (BENCHMARKS.md).
fn broker_jvm() -> String {
    let run = std::env::var("EDGECACHE_RUN").unwrap_or_else(|_| "/tmp/edgecache-run".into());
    let cmdline = std::fs::read_to_string(format!("{run}/kafka/kafka.pid"))
        .ok()
        .and_then(|pid| std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok());
    match cmdline {
        Some(bytes) => bytes
            .split(|&b| b == 0)
            .map(String::from_utf8_lossy)
            .filter(|arg| arg.starts_with("-X") || arg == "-server")
            .collect::<Vec<_>>()
            .join(" "),
        None => "unknown (not started by tests/services.sh)".into(),
    }
}

/// `Field:   1234 kB` from a /proc file.
fn proc_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn binary_sizes(bin: &Path) -> Vec<(String, u64)> {
    let mut sizes = vec![(bin.display().to_string(), file_len(bin))];
    // Cross builds land in target/<triple>/release/.
    if let Ok(entries) = std::fs::read_dir(target_dir()) {
        let mut cross: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("release/edgecache"))
            .filter(|p| p.is_file())
            .collect();
        cross.sort();
        for path in cross {
            sizes.push((path.display().to_string(), file_len(&path)));
        }
    }
    sizes
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

// ===================================================================
// Kafka: topics, the preload, watermarks
// ===================================================================

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn create_topic(brokers: &str, name: &str) {
    // Compacted like the real topics; with default segment sizes nothing is
    // compacted during the bench, so every record is read back.
    let topic = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    let results = block_on(admin(brokers).create_topics(&[topic], &AdminOptions::new()))
        .expect("create_topics");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Best effort: a topic left behind costs disk, not correctness.
fn delete_topics(brokers: &str, names: &[&str]) {
    if let Err(e) = block_on(admin(brokers).delete_topics(names, &AdminOptions::new())) {
        progress(&format!("could not delete the bench topics: {e}"));
    }
}

/// Fails the bench when the broker did not take a record: the key checks
/// below would otherwise blame the agent.
#[derive(Default)]
struct DeliveryCheck {
    failures: AtomicU64,
}

impl ClientContext for DeliveryCheck {}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A producer like the tests' (linger 5 ms, idempotence so per-key order
/// holds through retries).
fn bulk_producer(brokers: &str) -> BaseProducer<DeliveryCheck> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create_with_context(DeliveryCheck::default())
        .expect("producer")
}

fn send_blocking(
    producer: &BaseProducer<DeliveryCheck>,
    topic: &str,
    key: &str,
    value: Option<&str>,
) {
    loop {
        let mut record: BaseRecord<'_, str, str, ()> = BaseRecord::to(topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        match producer.send(record) {
            Ok(()) => break,
            // Queue full: let librdkafka deliver, then retry.
            Err((e, _)) => {
                assert!(e.to_string().contains("Queue full"), "producing: {e}");
                producer.poll(Duration::from_millis(10));
            }
        }
    }
    producer.poll(Duration::ZERO);
}

fn flush(producer: &BaseProducer<DeliveryCheck>) {
    producer.flush(Duration::from_secs(60)).expect("flush");
    let failures = producer.context().failures.load(Ordering::Relaxed);
    assert_eq!(failures, 0, "{failures} records were not delivered");
}

/// xorshift: seeded, so every run produces the same data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A device-state document like a gateway's sensors publish: short strings,
/// decimals with one or two digits, a millisecond timestamp, a small list.
/// 170–205 bytes.
fn device_state(rng: &mut Rng, device: u64, ts_ms: u64) -> String {
    const MODES: [&str; 3] = ["auto", "eco", "manual"];
    let alarms = match rng.below(20) {
        0 => r#""low_battery""#,
        1 => r#""door_open","tamper""#,
        _ => "",
    };
    format!(
        r#"{{"device":"sensor-{device}","site":"plant-{}","ts":{ts_ms},"temp_c":{}.{},"humidity":{}.{},"battery_v":3.{:02},"rssi":-{},"online":{},"fw":"2.{}.{}","mode":"{}","alarms":[{alarms}]}}"#,
        device % 17,
        15 + rng.below(20),
        rng.below(10),
        30 + rng.below(50),
        rng.below(10),
        40 + rng.below(60),
        40 + rng.below(50),
        rng.below(20) != 0,
        rng.below(5),
        rng.below(12),
        MODES[rng.below(3) as usize],
    )
}

struct Preload {
    seconds: f64,
    /// Redis keys (prefix included) whose last record is not a tombstone.
    live_keys: Vec<String>,
    /// Their last values: the oracle the side-by-side runs are checked against.
    last_values: HashMap<String, String>,
    mean_value_bytes: f64,
}

/// `records` records over `keys` keys, ~10% tombstones, in one go.
fn preload(brokers: &str, topic: &str, records: u64, keys: u64) -> Preload {
    let producer = bulk_producer(brokers);
    let mut rng = Rng::new(0xed9e_cace);
    let mut last: HashMap<u64, Option<String>> = HashMap::new();
    let mut value_bytes = 0u64;
    let mut values = 0u64;
    let base_ts = now_us() / 1000;
    let start = Instant::now();
    for n in 0..records {
        let device = rng.below(keys.max(1));
        let key = format!("sensor-{device}");
        if rng.below(10) == 0 {
            send_blocking(&producer, topic, &key, None);
            last.insert(device, None);
        } else {
            let value = device_state(&mut rng, device, base_ts + n);
            value_bytes += value.len() as u64;
            values += 1;
            send_blocking(&producer, topic, &key, Some(&value));
            last.insert(device, Some(value));
        }
    }
    flush(&producer);
    let last_values: HashMap<String, String> = last
        .into_iter()
        .filter_map(|(device, value)| Some((format!("device:sensor-{device}"), value?)))
        .collect();
    let mut live_keys: Vec<String> = last_values.keys().cloned().collect();
    live_keys.sort();
    Preload {
        seconds: start.elapsed().as_secs_f64(),
        live_keys,
        last_values,
        mean_value_bytes: value_bytes as f64 / values.max(1) as f64,
    }
}

/// High watermark per partition: where "caught up" is.
fn high_watermarks(brokers: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("fetch_watermarks");
            (p, high)
        })
        .collect()
}

// ===================================================================
// Redis and the agent as child processes
// ===================================================================

/// A redis-server of our own: free port, unix socket, no persistence, in a
/// temp dir. Killed on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(false)
    }

    /// `aof`: the append-only file on with `appendfsync everysec` (what a
    /// gateway that keeps its mirror across reboots would run), else off.
    fn start_with(aof: bool) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = dir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--unixsocket",
                socket.to_str().unwrap(),
                "--unixsocketperm",
                "700",
            ])
            .args([
                "--dir",
                dir.path().to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                if aof { "yes" } else { "no" },
                "--appendfsync",
                "everysec",
            ])
            // Slow log: every command over 1 ms, so the report can say how
            // many apply scripts blocked readers that long.
            .args([
                "--slowlog-log-slower-than",
                "1000",
                "--slowlog-max-len",
                "100000",
            ])
            // Server-side latency percentiles per command, with the maximum.
            .args(["--latency-tracking-info-percentiles", "50 99 100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let redis = Redis { child, port, dir };
        let start = Instant::now();
        while redis.try_conn().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn unix_url(&self) -> String {
        format!("unix://{}", self.dir.path().join("redis.sock").display())
    }

    fn try_conn(&self) -> Option<redis::Connection> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        redis::cmd("PING").query::<String>(&mut conn).ok()?;
        Some(conn)
    }

    fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to the bench redis-server")
    }

    fn info_field(
        &self,
        conn: &mut redis::Connection,
        section: &str,
        field: &str,
    ) -> Option<String> {
        let info: String = redis::cmd("INFO").arg(section).query(conn).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(str::to_owned)
    }

    fn used_memory(&self, conn: &mut redis::Connection) -> u64 {
        self.info_field(conn, "memory", "used_memory")
            .and_then(|v| v.parse().ok())
            .expect("INFO memory used_memory")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `a=1,b=2` from INFO commandstats / latencystats.
fn info_kv(line: &str, key: &str) -> Option<f64> {
    line.split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// What Redis says about the apply script (EVALSHA, or EVAL on the first
/// call): how many ran, mean and tail execution time, how many over 1 ms.
#[derive(Default, Clone, Copy)]
struct ScriptStats {
    calls: u64,
    usec_per_call: f64,
    p99_us: f64,
    max_us: f64,
    over_1ms: u64,
}

fn script_stats(redis: &Redis) -> ScriptStats {
    let mut conn = redis.conn();
    let mut stats = ScriptStats::default();
    let commandstats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    // The redis crate sends EVALSHA and falls back to EVAL once (NOSCRIPT).
    let mut usec = 0.0;
    for line in commandstats.lines() {
        if let Some(rest) = line
            .strip_prefix("cmdstat_evalsha:")
            .or_else(|| line.strip_prefix("cmdstat_eval:"))
        {
            stats.calls += info_kv(rest, "calls").unwrap_or(0.0) as u64;
            usec += info_kv(rest, "usec").unwrap_or(0.0);
        }
    }
    stats.usec_per_call = usec / stats.calls.max(1) as f64;
    let latency: String = redis::cmd("INFO")
        .arg("latencystats")
        .query(&mut conn)
        .unwrap();
    for line in latency.lines() {
        if let Some(rest) = line.strip_prefix("latency_percentiles_usec_evalsha:") {
            stats.p99_us = info_kv(rest, "p99").unwrap_or(0.0);
            stats.max_us = info_kv(rest, "p100").unwrap_or(0.0);
        }
    }
    // Slow-log entries: [id, time, duration_us, [args...], client, name].
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    stats.over_1ms = entries
        .iter()
        .filter(|e| match e {
            redis::Value::Array(fields) => matches!(
                fields.get(3),
                Some(redis::Value::Array(args)) if matches!(
                    args.first(),
                    Some(redis::Value::BulkString(cmd)) if cmd.eq_ignore_ascii_case(b"evalsha")
                )
            ),
            _ => false,
        })
        .count() as u64;
    stats
}

/// Writes the agent's config with defaults everywhere except what the bench
/// must say: brokers, Redis, topics (name, key prefix, store format).
/// For experiments without editing the agent, EDGECACHE_BENCH_AGENT and
/// EDGECACHE_BENCH_KAFKA_PROPERTIES (`k=v,k=v`) add settings to `[agent]`
/// (e.g. what the batch cap trades between throughput and read latency) and
/// to `[kafka.properties]`.
fn write_config(
    dir: &Path,
    brokers: &str,
    redis_url: &str,
    topic: &str,
    prefix: &str,
    store: &str,
) -> PathBuf {
    // Numbers stay bare TOML integers ([agent]); librdkafka wants strings.
    let table = |var: &str, quote: &str| {
        std::env::var(var)
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| format!("\"{}\" = {quote}{}{quote}\n", k.trim(), v.trim()))
            .collect::<String>()
    };
    let agent = table("EDGECACHE_BENCH_AGENT", "");
    let properties = table("EDGECACHE_BENCH_KAFKA_PROPERTIES", "\"");
    let text = format!(
        "[agent]\n{agent}[kafka]\nbrokers = \"{brokers}\"\n[kafka.properties]\n{properties}[redis]\nurl = \"{redis_url}\"\n\
         [[topics]]\nname = \"{topic}\"\nkey_prefix = \"{prefix}\"\ninput = \"json\"\nstore = \"{store}\"\n"
    );
    let path = dir.join(format!("{}.toml", unique("agent")));
    std::fs::write(&path, text).unwrap();
    path
}

/// The niceness the agent starts at: `Nice=` of systemd/edgecache.service
/// (0 when the unit has none), or `EDGECACHE_BENCH_NICE`.
fn agent_nice() -> i32 {
    if let Ok(n) = std::env::var("EDGECACHE_BENCH_NICE") {
        return n.parse().expect("EDGECACHE_BENCH_NICE is a number");
    }
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/edgecache.service");
    std::fs::read_to_string(unit)
        .expect("read systemd/edgecache.service")
        .lines()
        .find_map(|line| line.strip_prefix("Nice="))
        .map_or(0, |n| n.trim().parse().expect("Nice= is a number"))
}

/// The agent binary as a child process, its log in a file. SIGKILLed on
/// drop if still running (a failed bench must not leave it behind).
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(bin: &Path, config: &Path) -> Agent {
        let log = config.with_extension("log");
        // Run as the unit runs it: `nice` execs the agent, so the child's
        // pid is the agent's.
        let child = Command::new("nice")
            .args(["-n", &agent_nice().to_string()])
            .arg(bin)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("EDGECACHE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the edgecache binary");
        Agent {
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn proc_status(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        proc_field(&text, field)
    }

    /// utime + stime from /proc/<pid>/stat (fields 14 and 15, after the
    /// parenthesised command name, which may hold spaces).
    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("agent exited early ({status}); log:\n{}", self.log_tail());
        }
    }

    /// SIGTERM and wait, as systemd would stop it.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent ignored SIGTERM for 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn hget_state(conn: &mut redis::Connection) -> Option<String> {
    redis::cmd("HGET")
        .arg(STATUS_KEY)
        .arg("state")
        .query(conn)
        .ok()
        .flatten()
}

/// Mirrored keys in Redis: everything but the agent's own keys (`meta`).
fn data_keys(conn: &mut redis::Connection, meta: &[&str]) -> u64 {
    let n: u64 = redis::cmd("DBSIZE").query(conn).unwrap();
    let ours: u64 = if meta.is_empty() {
        0
    } else {
        redis::cmd("EXISTS").arg(meta).query(conn).unwrap()
    };
    n - ours
}

fn check_keys(found: u64, preload: &Preload, who: &str) {
    assert_eq!(
        found,
        preload.live_keys.len() as u64,
        "{who}: Redis holds {found} keys, the records say {}",
        preload.live_keys.len()
    );
}

// ===================================================================
// 1. Rehydrate
// ===================================================================

struct RehydrateRun {
    /// Spawn until `<ns>:status` state == live (what a user or systemd sees).
    live: Duration,
    /// Spawn until the stored offsets reached the high watermarks, i.e. all
    /// data is in Redis; `live` minus this is caught-up detection.
    data: Duration,
    /// Spawn until the first batch landed (connect, metadata, first fetch).
    first: Duration,
    hwm_kib: u64,
    /// The agent's CPU (user + system) from spawn to `live`.
    cpu_s: f64,
    /// (ms since spawn, VmRSS KiB) every ~50 ms.
    rss: Vec<(u64, u64)>,
    script: ScriptStats,
    redis_keys: u64,
}

/// `EDGECACHE_BENCH_HOG` busy loops at `EDGECACHE_BENCH_HOG_NICE`, killed
/// when dropped: a machine whose CPU the agent must share, so that
/// librdkafka's fetcher threads run ahead of the pipeline and every buffer
/// the budget bounds fills up.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start() -> Hogs {
        let n: usize = std::env::var("EDGECACHE_BENCH_HOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let nice = std::env::var("EDGECACHE_BENCH_HOG_NICE").unwrap_or_else(|_| "10".into());
        Hogs(
            (0..n)
                .map(|_| {
                    Command::new("nice")
                        .args(["-n", &nice, "sh", "-c", "while :; do :; done"])
                        .spawn()
                        .expect("nice and sh")
                })
                .collect(),
        )
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One timed rehydrate: the default config, an empty Redis of its own.
fn rehydrate_run(
    bin: &Path,
    brokers: &str,
    topic: &str,
    highs: &BTreeMap<i32, i64>,
    dir: &Path,
) -> RehydrateRun {
    let redis = Redis::start();
    let config = write_config(dir, brokers, &redis.url(), topic, "device:", "postcard");
    watch_rehydrate(bin, &config, &redis, topic, highs)
}

/// Starts the agent and watches Redis and /proc until the agent says `live`,
/// then reads its peak RSS and stops it.
fn watch_rehydrate(
    bin: &Path,
    config: &Path,
    redis: &Redis,
    topic: &str,
    highs: &BTreeMap<i32, i64>,
) -> RehydrateRun {
    let total: i64 = highs.values().sum();
    let mut conn = redis.conn();
    let _hogs = Hogs::start();
    let start = Instant::now();
    let mut agent = Agent::start(bin, config);
    let mut first = None;
    let mut data = None;
    let mut rss = Vec::new();
    let mut tick = 0u64;
    let live = loop {
        if tick % 5 == 0 {
            if let Some(kib) = agent.proc_status("VmRSS:") {
                rss.push((start.elapsed().as_millis() as u64, kib));
            }
        }
        tick += 1;
        if hget_state(&mut conn).as_deref() == Some("live") {
            break start.elapsed();
        }
        if data.is_none() {
            let offsets: HashMap<String, i64> = redis::cmd("HGETALL")
                .arg(OFFSETS_KEY)
                .query(&mut conn)
                .unwrap_or_default();
            if !offsets.is_empty() && first.is_none() {
                first = Some(start.elapsed());
            }
            let done: i64 = highs
                .iter()
                .map(|(p, high)| {
                    offsets
                        .get(&format!("{topic}/{p}"))
                        .copied()
                        .unwrap_or(0)
                        .min(*high)
                })
                .sum();
            if done >= total {
                data = Some(start.elapsed());
            }
        }
        agent.assert_running();
        if start.elapsed() > Duration::from_secs(900) {
            panic!("agent not live after 900 s; log:\n{}", agent.log_tail());
        }
        std::thread::sleep(WATCH_EVERY);
    };
    let hwm_kib = agent.proc_status("VmHWM:").unwrap_or(0);
    let cpu_s = agent.cpu_s();
    agent.stop();
    let data = data.unwrap_or(live);
    RehydrateRun {
        live,
        data,
        first: first.unwrap_or(data),
        hwm_kib,
        cpu_s,
        rss,
        script: script_stats(redis),
        redis_keys: data_keys(&mut conn, &META_KEYS),
    }
}

// ===================================================================
// 2. The naive reference
// ===================================================================

struct NaiveRun {
    seconds: f64,
    redis_keys: u64,
}

/// A consumer with librdkafka's defaults, assigned every partition of
/// `topic` from the beginning: how a user would write the plain pattern.
fn bare_consumer(brokers: &str, topic: &str, group: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).expect("assign");
    consumer
}

/// The plain "consume and SET" loop a user would write first: librdkafka
/// defaults, one blocking round trip per record, values stored as they
/// arrived (no decoding), no batching, no transaction, no offsets kept.
fn naive_run(brokers: &str, topic: &str, highs: &BTreeMap<i32, i64>) -> NaiveRun {
    let redis = Redis::start();
    let start = Instant::now();
    let consumer = bare_consumer(brokers, topic, "edgecache-bench-naive");
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut pending: BTreeMap<i32, i64> = highs
        .iter()
        .filter(|(_, h)| **h > 0)
        .map(|(p, h)| (*p, *h))
        .collect();
    while !pending.is_empty() {
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            assert!(
                start.elapsed() < Duration::from_secs(1800),
                "naive reader stuck"
            );
            continue;
        };
        let message = result.expect("consume");
        let key = [b"device:", message.key().expect("keyed records")].concat();
        match message.payload() {
            Some(value) => redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .query::<()>(&mut conn),
            None => redis::cmd("DEL").arg(&key).query::<()>(&mut conn),
        }
        .expect("redis write");
        if pending.get(&message.partition()) == Some(&(message.offset() + 1)) {
            pending.remove(&message.partition());
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    NaiveRun {
        seconds,
        redis_keys: data_keys(&mut conn, &[]),
    }
}

// ===================================================================
// 3. Reads during a rehydrate
// ===================================================================

struct Reads {
    /// Latencies in µs while the agent rehydrated.
    unix: Vec<u64>,
    tcp: Vec<u64>,
    /// The same readers against the idle Redis just before: the floor this
    /// machine gives, to tell the agent's effect from the scheduler's.
    idle_unix: Vec<u64>,
    idle_tcp: Vec<u64>,
    hits: u64,
    rehydrate: RehydrateRun,
}

fn reads_during_rehydrate(
    bin: &Path,
    brokers: &str,
    topic: &str,
    highs: &BTreeMap<i32, i64>,
    dir: &Path,
    preload: &Preload,
) -> Reads {
    let redis = Redis::start();
    let config = write_config(dir, brokers, &redis.url(), topic, "device:", "postcard");
    let keys = Arc::new(preload.live_keys.clone());
    let hits = Arc::new(AtomicU64::new(0));

    let spawn_readers = |stop: &Arc<AtomicBool>| {
        [redis.unix_url(), redis.url()]
            .into_iter()
            .enumerate()
            .map(|(i, url)| {
                let (stop, keys, hits) = (stop.clone(), keys.clone(), hits.clone());
                std::thread::spawn(move || reader(&url, &keys, &stop, &hits, 0x5eed + i as u64))
            })
            .collect::<Vec<_>>()
    };
    let join = |handles: Vec<std::thread::JoinHandle<Vec<u64>>>| {
        let mut it = handles.into_iter().map(|h| h.join().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };

    let stop = Arc::new(AtomicBool::new(false));
    let idle = spawn_readers(&stop);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (idle_unix, idle_tcp) = join(idle);
    hits.store(0, Ordering::Relaxed);

    let stop = Arc::new(AtomicBool::new(false));
    let busy = spawn_readers(&stop);
    let rehydrate = watch_rehydrate(bin, &config, &redis, topic, highs);
    stop.store(true, Ordering::Relaxed);
    let (unix, tcp) = join(busy);
    Reads {
        unix,
        tcp,
        idle_unix,
        idle_tcp,
        hits: hits.load(Ordering::Relaxed),
        rehydrate,
    }
}

/// GETs random mirrored keys until stopped; returns each GET's latency (µs).
fn reader(url: &str, keys: &[String], stop: &AtomicBool, hits: &AtomicU64, seed: u64) -> Vec<u64> {
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let mut rng = Rng::new(seed);
    let mut latencies = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        let key = &keys[rng.below(keys.len() as u64) as usize];
        let t = Instant::now();
        let value: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(&mut conn).unwrap();
        latencies.push(t.elapsed().as_micros() as u64);
        if value.is_some() {
            hits.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(READ_PAUSE);
    }
    latencies
}

// ===================================================================
// 4. Live latency
// ===================================================================

/// Send time (unix µs) of every latency record by sequence number, and when
/// the broker acknowledged it: the ack splits produce→readable into the
/// producer/broker part and the agent's part.
struct Stamps {
    sent: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
}

struct StampContext(Arc<Stamps>);

impl ClientContext for StampContext {}

impl ProducerContext for StampContext {
    type DeliveryOpaque = Box<usize>;
    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<usize>) {
        if result.is_ok() {
            self.0.acked[*seq].store(now_us(), Ordering::Relaxed);
        }
    }
}

struct LiveRate {
    rate: u64,
    sent: usize,
    /// produce → key readable in Redis, µs.
    produce_to_readable: Vec<u64>,
    /// produce → broker ack, µs (the part the agent does not control).
    produce_to_ack: Vec<u64>,
    /// broker ack → readable, µs: roughly the agent's share (fetch, decode,
    /// apply). Negative when the agent was faster than the ack's way back.
    ack_to_readable: Vec<i64>,
    /// The agent's histogram of record age at apply over this phase:
    /// (upper bound in seconds, cumulative count), `+Inf` last.
    agent_ages: Vec<(f64, u64)>,
}

/// `edgecache_live_record_age_seconds` buckets scraped from the agent.
fn live_ages(port: u16) -> Vec<(f64, u64)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("edgecache_live_record_age_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which a share `q` of the observations fall:
/// an upper bound of that quantile, in ms.
fn bucket_quantile_ms(buckets: &[(f64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |b| b.1);
    buckets
        .iter()
        .find(|(_, n)| *n as f64 >= q * total as f64 && total > 0)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

/// The live phases: a warm-up at 200 records/s (not reported), then each
/// rate for `secs` seconds. Sequence numbers are the keys `lat:<seq>`.
const LIVE_RATES: [u64; 2] = [1_000, 20_000];
const LIVE_WARMUP: usize = 200;

fn live_ranges(secs: u64) -> Vec<(usize, usize)> {
    let mut ranges = vec![(0usize, LIVE_WARMUP)];
    for rate in LIVE_RATES {
        let from = ranges.last().unwrap().1;
        ranges.push((from, from + (rate * secs) as usize));
    }
    ranges
}

fn live_records(secs: u64) -> Arc<Vec<AtomicU64>> {
    let n = live_ranges(secs).last().unwrap().1;
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

/// Sequence number of a `lat:<seq>` key (or of a bare `<seq>` record key).
fn live_seq(key: &str) -> usize {
    key.rsplit(':')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("lat:<seq> key")
}

/// Produces the live phases into `topic`, paced against a schedule, and
/// reads the results from `seen` (µs when each record was observed, filled
/// by whoever observes: the Redis subscriber, or the bare consumer).
/// `ages` is scraped around each reported phase (the agent's metric).
fn paced_phases(
    brokers: &str,
    topic: &str,
    secs: u64,
    seen: &[AtomicU64],
    mut ages: impl FnMut() -> Vec<(f64, u64)>,
) -> Vec<LiveRate> {
    let ranges = live_ranges(secs);
    let n_total = seen.len();
    let stamps = Arc::new(Stamps {
        sent: (0..n_total).map(|_| AtomicU64::new(0)).collect(),
        acked: (0..n_total).map(|_| AtomicU64::new(0)).collect(),
    });
    // No linger: each record leaves at once, so the figure is the agent's
    // and the broker's, not the producer's batching.
    let producer: ThreadedProducer<StampContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("enable.idempotence", "true")
        .create_with_context(StampContext(stamps.clone()))
        .expect("producer");
    let send = |seq: usize| {
        let key = seq.to_string();
        loop {
            let sent = now_us();
            stamps.sent[seq].store(sent, Ordering::Relaxed);
            let value = format!(
                r#"{{"sent_us":{sent},"device":"sensor-{seq}","temp_c":21.{},"online":true}}"#,
                seq % 10
            );
            let record = BaseRecord::with_opaque_to(topic, Box::new(seq))
                .key(&key)
                .payload(&value);
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _)) if e.to_string().contains("Queue full") => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err((e, _)) => panic!("producing: {e}"),
            }
        }
    };

    let mut results = Vec::new();
    for (phase, &(from, to)) in ranges.iter().enumerate() {
        let rate = if phase == 0 {
            200
        } else {
            LIVE_RATES[phase - 1]
        };
        let ages_before = ages();
        // Paced against a schedule (not sleep-per-record): sleeps overshoot by
        // tens of µs, so a late record is sent at once and the mean rate holds.
        let t0 = Instant::now();
        for seq in from..to {
            let due = t0 + Duration::from_secs_f64((seq - from) as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            send(seq);
        }
        producer.flush(Duration::from_secs(30)).expect("flush");
        // Stragglers: wait until every record was seen, or 10 s.
        let wait = Instant::now();
        while (from..to).any(|s| seen[s].load(Ordering::Relaxed) == 0)
            && wait.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if phase == 0 {
            continue;
        }
        let mut readable = Vec::new();
        let mut acked = Vec::new();
        let mut ack_to_readable = Vec::new();
        for (s, seen_at) in seen.iter().enumerate().take(to).skip(from) {
            let sent = stamps.sent[s].load(Ordering::Relaxed);
            let seen_at = seen_at.load(Ordering::Relaxed);
            if seen_at > 0 {
                readable.push(seen_at.saturating_sub(sent));
            }
            let ack = stamps.acked[s].load(Ordering::Relaxed);
            if ack > 0 {
                acked.push(ack.saturating_sub(sent));
            }
            if ack > 0 && seen_at > 0 {
                ack_to_readable.push(seen_at as i64 - ack as i64);
            }
        }
        progress(&format!(
            "{topic} {rate}/s: {} of {} seen, p99 {:.1} ms",
            readable.len(),
            to - from,
            pct(&mut readable.clone(), 0.99) as f64 / 1000.0
        ));
        let ages_after = ages();
        let agent_ages: Vec<(f64, u64)> = ages_after
            .iter()
            .zip(&ages_before)
            .map(|(&(le, after), &(_, before))| (le, after.saturating_sub(before)))
            .collect();
        results.push(LiveRate {
            rate,
            sent: to - from,
            produce_to_readable: readable,
            produce_to_ack: acked,
            ack_to_readable,
            agent_ages,
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    results
}

/// The floor under any Kafka → Redis mirror on this machine: the same paced
/// producer, read by a bare rdkafka consumer (librdkafka's defaults, a poll
/// loop, nothing else) with no agent or Redis running. Produce → polled is
/// what the broker and librdkafka take before any agent could act.
fn kafka_floor(brokers: &str, topic: &str, secs: u64) -> Vec<LiveRate> {
    create_topic(brokers, topic);
    let seen = live_records(secs);
    let consumer = bare_consumer(brokers, topic, &unique("bench-floor"));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let now = now_us();
                        let key = std::str::from_utf8(m.key().expect("keyed")).unwrap();
                        let _ = seen[live_seq(key)].compare_exchange(
                            0,
                            now,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    Some(Err(e)) => panic!("bare consumer: {e}"),
                    None => {}
                }
            }
        })
    };
    let results = paced_phases(brokers, topic, secs, &seen, Vec::new);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    results
}

fn live_latency(bin: &Path, brokers: &str, topic: &str, dir: &Path, secs: u64) -> Vec<LiveRate> {
    create_topic(brokers, topic);
    let redis = Redis::start();
    let config = write_config(dir, brokers, &redis.url(), topic, "lat:", "postcard");
    // The agent's own view of freshness (edgecache_live_record_age_seconds),
    // next to the subscriber's: it leaves out the notification's way to
    // this process.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    let seen = live_records(secs);

    let mut agent = Agent::start(bin, &config);
    let mut conn = redis.conn();
    let start = Instant::now();
    while hget_state(&mut conn).as_deref() != Some("live") {
        agent.assert_running();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agent not live on an empty topic"
        );
        std::thread::sleep(WATCH_EVERY);
    }

    // Keyspace notifications: Redis publishes "set" on __keyspace@0__:<key>
    // after the write, so the receive time is when a reader could see it.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query::<()>(&mut conn)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let subscriber = {
        let (url, stop, seen) = (redis.unix_url(), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut pubsub = conn.as_pubsub();
            pubsub.psubscribe("__keyspace@0__:lat:*").unwrap();
            pubsub
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match pubsub.get_message() {
                    Ok(msg) => {
                        let now = now_us();
                        let seq = live_seq(msg.get_channel_name());
                        // First notification only (a key is written once).
                        let _ = seen[seq].compare_exchange(
                            0,
                            now,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => panic!("subscriber: {e}"),
                }
            }
        })
    };
    ready_rx.recv().unwrap();

    let results = paced_phases(brokers, topic, secs, &seen, || live_ages(metrics_port));
    stop.store(true, Ordering::Relaxed);
    subscriber.join().unwrap();
    agent.stop();
    results
}

// ===================================================================
// 5. Compactness
// ===================================================================

struct Compact {
    store: &'static str,
    keys: u64,
    /// INFO memory used_memory delta / keys: everything Redis spends per key.
    used_memory_per_key: f64,
    /// Mean MEMORY USAGE of sampled keys.
    memory_usage_mean: f64,
    /// Mean stored value length (STRLEN; for a hash, its names and values).
    value_len_mean: f64,
}

fn compactness(bin: &Path, brokers: &str, topic: &str, dir: &Path, n_keys: u64) -> Vec<Compact> {
    // One record per key, no tombstones: every key ends up in Redis.
    create_topic(brokers, topic);
    let producer = bulk_producer(brokers);
    let mut rng = Rng::new(0xc0_4fac);
    let base_ts = now_us() / 1000;
    for device in 0..n_keys {
        let value = device_state(&mut rng, device, base_ts + device);
        send_blocking(&producer, topic, &format!("sensor-{device}"), Some(&value));
    }
    flush(&producer);
    let highs = high_watermarks(brokers, topic);

    ["postcard", "json", "raw", "hash"]
        .into_iter()
        .map(|store| {
            let redis = Redis::start();
            let mut conn = redis.conn();
            let before = redis.used_memory(&mut conn);
            let config = write_config(dir, brokers, &redis.url(), topic, "device:", store);
            // The agent is stopped before measuring, so its connection's
            // buffers are gone; what remains is the data plus 3 small keys.
            watch_rehydrate(bin, &config, &redis, topic, &highs);
            let keys = data_keys(&mut conn, &META_KEYS);
            assert_eq!(keys, n_keys, "{store}: not every key mirrored");
            let after = redis.used_memory(&mut conn);
            let mut sample_rng = Rng::new(0x5a_3b1e);
            let samples = 1000.min(n_keys);
            let (mut usage, mut len) = (0u64, 0u64);
            for _ in 0..samples {
                let key = format!("device:sensor-{}", sample_rng.below(n_keys));
                usage += redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&key)
                    .query::<u64>(&mut conn)
                    .unwrap();
                len += if store == "hash" {
                    // Field names and values: what the hash holds.
                    let fields: Vec<Vec<u8>> =
                        redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
                    fields.iter().map(|f| f.len() as u64).sum::<u64>()
                } else {
                    redis::cmd("STRLEN")
                        .arg(&key)
                        .query::<u64>(&mut conn)
                        .unwrap()
                };
            }
            let c = Compact {
                store,
                keys,
                used_memory_per_key: (after - before) as f64 / keys as f64,
                memory_usage_mean: usage as f64 / samples as f64,
                value_len_mean: len as f64 / samples as f64,
            };
            progress(&format!(
                "{store}: {:.1} B/key (used_memory), {:.1} B MEMORY USAGE, value {:.1} B",
                c.used_memory_per_key, c.memory_usage_mean, c.value_len_mean
            ));
            c
        })
        .collect()
}

// ===================================================================
// Statistics and the table
// ===================================================================

/// The agent's memory budget in this run: the default unless
/// EDGECACHE_BENCH_AGENT sets it.
fn memory_budget_mib() -> String {
    std::env::var("EDGECACHE_BENCH_AGENT")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == "memory_budget_mib")
        .map(|(_, v)| format!("{} MiB", v.trim()))
        .unwrap_or_else(|| "24 MiB (default)".into())
}

/// The same budget in MiB, for the RSS plot.
fn memory_budget_mib_value() -> f64 {
    memory_budget_mib()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32.0)
}

/// The q-quantile (nearest rank) of `v`, sorting it; 0 for an empty list.
fn pct<T: Copy + Ord + Default>(v: &mut [T], q: f64) -> T {
    if v.is_empty() {
        return T::default();
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// "p50 / p99 / max" of latencies in µs, shown in ms.
fn ms_summary(v: &[u64]) -> String {
    let mut v = v.to_vec();
    format!(
        "p50 {:.2} / p99 {:.2} / max {:.2} ms",
        pct(&mut v, 0.5) as f64 / 1000.0,
        pct(&mut v, 0.99) as f64 / 1000.0,
        pct(&mut v, 1.0) as f64 / 1000.0
    )
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

fn write_csv(path: &Path, header: &str, rows: impl Iterator<Item = String>) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(file, "{header}").unwrap();
    for row in rows {
        writeln!(file, "{row}").unwrap();
    }
}

struct Table {
    facts: Vec<(String, String)>,
}

impl Table {
    #[allow(clippy::too_many_arguments)]
    fn print(
        &self,
        p: &Params,
        preload: &Preload,
        agent: &[RehydrateRun],
        naive: &[NaiveRun],
        reads: &Reads,
        live: &[LiveRate],
        floor: &[LiveRate],
        compact: &[Compact],
        sizes: &[(String, u64)],
    ) {
        let mut out = String::new();
        let mut row = |metric: &str, value: String, note: String| {
            writeln!(out, "| {metric} | {value} | {note} |").unwrap();
        };
        let records = p.records as f64;

        // 1. Rehydrate
        let live_rates: Vec<f64> = agent
            .iter()
            .map(|r| records / r.live.as_secs_f64())
            .collect();
        let data_rates: Vec<f64> = agent
            .iter()
            .map(|r| records / r.data.as_secs_f64())
            .collect();
        let steady: Vec<f64> = agent
            .iter()
            .map(|r| records / (r.data - r.first.min(r.data)).as_secs_f64().max(1e-3))
            .collect();
        let detect: Vec<f64> = agent
            .iter()
            .map(|r| (r.live - r.data).as_secs_f64())
            .collect();
        let hwm: Vec<f64> = agent.iter().map(|r| r.hwm_kib as f64 / 1024.0).collect();
        let calls: Vec<f64> = agent.iter().map(|r| r.script.calls as f64).collect();
        let script_us: Vec<f64> = agent.iter().map(|r| r.script.usec_per_call).collect();
        let live_secs: Vec<f64> = agent.iter().map(|r| r.live.as_secs_f64()).collect();
        let rehydrate_rate = median(&live_rates);
        row(
            "rehydrate, start → `live`",
            format!("**{rehydrate_rate:.0} records/s**"),
            format!(
                "median of {} runs ({} records/s); {:.2} s for {} records over {} keys, {} live at the end",
                agent.len(),
                spread(&live_rates),
                median(&live_secs),
                p.records,
                p.keys,
                preload.live_keys.len()
            ),
        );
        row(
            "rehydrate, start → all data in Redis",
            format!("{:.0} records/s", median(&data_rates)),
            format!(
                "offsets reached the high watermarks; `live` came {:.2} s later (caught-up check); first batch after {:.2} s; steady state {:.0} records/s",
                median(&detect),
                median(&agent.iter().map(|r| r.first.as_secs_f64()).collect::<Vec<_>>()),
                median(&steady)
            ),
        );
        row(
            "rehydrate, apply scripts",
            format!("{:.0} batches", median(&calls)),
            format!(
                "{:.0} records/batch, {:.0} µs per script (Redis commandstats)",
                records / median(&calls).max(1.0),
                median(&script_us)
            ),
        );
        row(
            "agent peak RSS (VmHWM)",
            format!("**{:.1} MiB**", median(&hwm)),
            format!(
                "median; runs {}; memory budget {}",
                hwm.iter()
                    .map(|m| format!("{m:.1}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                memory_budget_mib()
            ),
        );

        // 2. Naive
        if !naive.is_empty() {
            let naive_rates: Vec<f64> = naive.iter().map(|r| records / r.seconds).collect();
            let naive_rate = median(&naive_rates);
            row(
                "naive reference (SET/DEL per record)",
                format!("{naive_rate:.0} records/s"),
                format!(
                    "median of {} runs ({}); BaseConsumer + sync redis, TCP, values stored as received",
                    naive.len(),
                    spread(&naive_rates)
                ),
            );
            row(
                "speed-up vs naive",
                format!("**{:.1}×**", rehydrate_rate / naive_rate),
                format!(
                    "ratio of medians; {:.1}× on the all-data-in-Redis time",
                    median(&data_rates) / naive_rate
                ),
            );
        }

        // 3. Reads
        let r = &reads;
        let reads_row = |lat: &[u64]| {
            let mut v = lat.to_vec();
            format!(
                "p50 {} / p99 {} / max {} µs",
                pct(&mut v, 0.50),
                pct(&mut v, 0.99),
                pct(&mut v, 1.0)
            )
        };
        row(
            "GET during rehydrate, unix socket",
            format!("**{}**", reads_row(&r.unix)),
            format!(
                "{} GETs; idle Redis before: {}",
                r.unix.len(),
                reads_row(&r.idle_unix)
            ),
        );
        row(
            "GET during rehydrate, TCP",
            format!("**{}**", reads_row(&r.tcp)),
            format!(
                "{} GETs; idle Redis before: {}",
                r.tcp.len(),
                reads_row(&r.idle_tcp)
            ),
        );
        row(
            "apply script duration (Redis side)",
            format!(
                "p99 {:.0} / max {:.0} µs",
                r.rehydrate.script.p99_us, r.rehydrate.script.max_us
            ),
            format!(
                "{} scripts, {} over 1 ms (slowlog); rehydrate with readers took {:.2} s; {} hits",
                r.rehydrate.script.calls,
                r.rehydrate.script.over_1ms,
                r.rehydrate.live.as_secs_f64(),
                r.hits
            ),
        );

        // 4. Live
        for l in live {
            let mut a = l.produce_to_ack.clone();
            let mut d = l.ack_to_readable.clone();
            row(
                &format!("live latency at {}/s, produce → readable", l.rate),
                format!("**{}**", ms_summary(&l.produce_to_readable)),
                format!(
                    "{} of {} records seen; produce → broker ack p50 {:.2} / p99 {:.2} ms; ack → readable p50 {:.2} / p99 {:.2} ms; the agent's own record age at apply (its metric, {} records): p50 ≤ {} / p99 ≤ {} ms",
                    l.produce_to_readable.len(),
                    l.sent,
                    pct(&mut a, 0.5) as f64 / 1000.0,
                    pct(&mut a, 0.99) as f64 / 1000.0,
                    pct(&mut d, 0.5) as f64 / 1000.0,
                    pct(&mut d, 0.99) as f64 / 1000.0,
                    l.agent_ages.last().map_or(0, |b| b.1),
                    bucket_quantile_ms(&l.agent_ages, 0.5),
                    bucket_quantile_ms(&l.agent_ages, 0.99)
                ),
            );
        }

        for f in floor {
            let mut a = f.produce_to_ack.clone();
            row(
                &format!(
                    "Kafka alone at {}/s, produce → polled by a bare consumer",
                    f.rate
                ),
                ms_summary(&f.produce_to_readable),
                format!(
                    "the floor under any mirror on this box: same producer, librdkafka consumer defaults, no agent or Redis running; {} of {} records polled; produce → broker ack p50 {:.2} / p99 {:.2} ms",
                    f.produce_to_readable.len(),
                    f.sent,
                    pct(&mut a, 0.5) as f64 / 1000.0,
                    pct(&mut a, 0.99) as f64 / 1000.0,
                ),
            );
        }

        // 5. Compactness
        let by = |s: &str| compact.iter().find(|c| c.store == s);
        for c in compact {
            row(
                &format!("Redis bytes per key, store = {}", c.store),
                format!("{:.1} B", c.used_memory_per_key),
                format!(
                    "INFO used_memory delta over {} keys; MEMORY USAGE mean {:.1} B; value {:.1} B",
                    c.keys, c.memory_usage_mean, c.value_len_mean
                ),
            );
        }
        if let (Some(pc), Some(js)) = (by("postcard"), by("json")) {
            row(
                "postcard saving vs json",
                format!(
                    "**{:.1}%**",
                    100.0 * (1.0 - pc.used_memory_per_key / js.used_memory_per_key)
                ),
                format!(
                    "per key incl. Redis overhead; {:.1}% by MEMORY USAGE, {:.1}% on the value bytes alone",
                    100.0 * (1.0 - pc.memory_usage_mean / js.memory_usage_mean),
                    100.0 * (1.0 - pc.value_len_mean / js.value_len_mean)
                ),
            );
        }

        // 6. Binary sizes
        for (path, len) in sizes {
            row(
                "binary size",
                format!("{:.2} MiB", *len as f64 / (1024.0 * 1024.0)),
                format!("`{path}` ({len} bytes)"),
            );
        }

        let mut stdout = std::io::stdout().lock();
        writeln!(stdout).unwrap();
        writeln!(stdout, "### Machine").unwrap();
        writeln!(stdout).unwrap();
        for (k, v) in &self.facts {
            writeln!(stdout, "- {k}: {v}").unwrap();
        }
        writeln!(
            stdout,
            "- load average at end: {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        )
        .unwrap();
        writeln!(
            stdout,
            "- data: {} records, {} keys, {PARTITIONS} partitions, ~10% tombstones, mean JSON value {:.0} bytes; preload took {:.1} s",
            p.records, p.keys, preload.mean_value_bytes, preload.seconds
        )
        .unwrap();
        writeln!(stdout).unwrap();
        writeln!(stdout, "### Results").unwrap();
        writeln!(stdout).unwrap();
        writeln!(stdout, "| metric | value | how / detail |").unwrap();
        writeln!(stdout, "|---|---|---|").unwrap();
        write!(stdout, "{out}").unwrap();
        stdout.flush().unwrap();
    }
}
