//! Helpers for the end-to-end tests: a real redis-server per test, a real
//! Kafka broker (started by `tests/services.sh kafka-start`, which the test
//! command runs), a producer, the agent binary as a child process, and the
//! oracle that compares Redis's whole keyspace under a prefix with what the
//! records say it must be. A missing service fails the test; nothing skips.

#![allow(dead_code)]

use edgecache::codec::{self, StoreFormat};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The test broker: `127.0.0.1:$EDGECACHE_KAFKA_PORT` (default 39092), the
/// variable `tests/services.sh` starts it with, so one setting moves the
/// broker for the scripts and the tests; `EDGECACHE_TEST_BROKERS` overrides
/// the whole list (a broker the scripts did not start).
pub fn brokers() -> String {
    let brokers = std::env::var("EDGECACHE_TEST_BROKERS").unwrap_or_else(|_| {
        let port = std::env::var("EDGECACHE_KAFKA_PORT").unwrap_or_else(|_| "39092".into());
        format!("127.0.0.1:{port}")
    });
    let first = brokers.split(',').next().unwrap().to_owned();
    if TcpStream::connect_timeout(&first.parse().unwrap(), Duration::from_secs(2)).is_err() {
        panic!(
            "Kafka broker not reachable at {brokers}. The end-to-end tests need a real broker: \
             run `bash tests/services.sh deps && bash tests/services.sh kafka-start` \
             (the README's test command does this)."
        );
    }
    brokers
}

/// A name no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Creates a compacted topic with `partitions` partitions.
pub fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, "compact");
}

/// Creates a topic with the given cleanup.policy (a compacted topic's broker
/// rejects keyless records, so tests of those use "delete").
pub fn create_topic_with(name: &str, partitions: i32, cleanup_policy: &str) {
    create_topic_at(
        &brokers(),
        name,
        partitions,
        &[("cleanup.policy", cleanup_policy)],
    );
}

/// Creates a topic with the given topic configs.
pub fn create_topic_configs(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    create_topic_at(&brokers(), name, partitions, configs);
}

/// Creates a topic with the given configs on the given brokers (the secure
/// test broker's PLAINTEXT listener, say).
pub fn create_topic_at(brokers: &str, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let results = block_on(admin.create_topics(&[topic], &AdminOptions::new()))
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Records delivery failures: a record the broker never took must fail the
/// test, or the oracle would expect it.
/// Also remembers where each record landed (record number -> partition,
/// offset), for checks that relate values to stored offsets.
#[derive(Default)]
pub struct DeliveryCheck {
    failures: Mutex<Vec<String>>,
    placed: Mutex<BTreeMap<u64, (i32, i64)>>,
}

impl ClientContext for DeliveryCheck {}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = Box<u64>;
    fn delivery(&self, result: &DeliveryResult<'_>, n: Box<u64>) {
        use rdkafka::message::Message;
        match result {
            Ok(message) => {
                self.placed
                    .lock()
                    .unwrap()
                    .insert(*n, (message.partition(), message.offset()));
            }
            Err((e, _)) => self.failures.lock().unwrap().push(e.to_string()),
        }
    }
}

/// A real producer; remembers what it sent so tests can build the oracle.
pub struct TestProducer {
    producer: BaseProducer<DeliveryCheck>,
    topic: String,
    /// key -> last value (None = tombstone), in send order per key.
    pub last: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub n_sent: u64,
}

impl TestProducer {
    pub fn new(topic: &str) -> TestProducer {
        TestProducer::at(&brokers(), topic)
    }

    /// A producer to the given brokers instead of the shared test broker.
    pub fn at(brokers: &str, topic: &str) -> TestProducer {
        TestProducer::with(brokers, topic, &[])
    }

    /// The same, with librdkafka producer properties added or overridden
    /// (compression, batch size).
    pub fn with(brokers: &str, topic: &str, properties: &[(&str, &str)]) -> TestProducer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("message.max.bytes", "2000000")
            // Per-key order must hold for the oracle, retries or not.
            .set("enable.idempotence", "true");
        for (key, value) in properties {
            config.set(*key, *value);
        }
        let producer: BaseProducer<DeliveryCheck> = config
            .create_with_context(DeliveryCheck::default())
            .expect("producer");
        TestProducer {
            producer,
            topic: topic.to_owned(),
            last: BTreeMap::new(),
            n_sent: 0,
        }
    }

    /// Sends one record; `key` None sends a keyless record (not in the oracle).
    pub fn send(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.send_to(key, value, None);
    }

    pub fn send_to(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, partition: Option<i32>) {
        self.send_full(key, value, partition, None);
    }

    /// Sends with every option: explicit partition and record timestamp.
    pub fn send_full(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        partition: Option<i32>,
        timestamp_ms: Option<i64>,
    ) {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], Box<u64>> =
                BaseRecord::with_opaque_to(&self.topic, Box::new(self.n_sent));
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(value) = value {
                record = record.payload(value);
            }
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            if let Some(timestamp_ms) = timestamp_ms {
                record = record.timestamp(timestamp_ms);
            }
            match self.producer.send(record) {
                Ok(()) => break,
                Err((e, _)) => {
                    // Queue full: let librdkafka deliver, then retry.
                    assert!(
                        e.to_string().contains("Queue full"),
                        "producing to {}: {e}",
                        self.topic
                    );
                    self.producer.poll(Duration::from_millis(50));
                }
            }
        }
        self.n_sent += 1;
        self.producer.poll(Duration::ZERO);
    }

    /// Sends a record that must end up in Redis (or delete its key).
    pub fn put(&mut self, key: &str, value: Option<&str>) {
        self.send(Some(key.as_bytes()), value.map(str::as_bytes));
        self.last.insert(
            key.as_bytes().to_vec(),
            value.map(|v| v.as_bytes().to_vec()),
        );
    }

    /// Waits until the producer's metadata shows `n` partitions (after the
    /// topic grew), so sends to the new ones are accepted.
    pub fn wait_partitions(&self, n: usize) {
        wait_until(
            Duration::from_secs(30),
            "producer to see new partitions",
            || {
                self.producer
                    .client()
                    .fetch_metadata(Some(&self.topic), Duration::from_secs(5))
                    .map(|m| m.topics()[0].partitions().len() == n)
                    .unwrap_or(false)
            },
        );
    }

    pub fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(30))
            .expect("producer flush");
        let failures = self.producer.context().failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} records were not delivered to {}: {:?}",
            failures.len(),
            self.topic,
            &failures[..failures.len().min(3)]
        );
    }

    /// Where each record landed: record number (0-based send order) ->
    /// (partition, offset). Complete after `flush`.
    pub fn placed(&self) -> BTreeMap<u64, (i32, i64)> {
        self.producer.context().placed.lock().unwrap().clone()
    }

    /// Like `random_states`, but each value carries its record number `n`.
    pub fn numbered_states(&mut self, rng: &mut Rng, n_records: usize, n_keys: u64) {
        self.states(rng, n_records, n_keys, true);
    }

    /// Random JSON device states over `n_keys` keys, ~10% tombstones.
    pub fn random_states(&mut self, rng: &mut Rng, n_records: usize, n_keys: u64) {
        self.states(rng, n_records, n_keys, false);
    }

    fn states(&mut self, rng: &mut Rng, n_records: usize, n_keys: u64, numbered: bool) {
        for _ in 0..n_records {
            let key = format!("sensor-{}", rng.below(n_keys));
            if rng.below(10) == 0 {
                self.put(&key, None);
                continue;
            }
            let number = if numbered {
                format!(r#""n":{},"#, self.n_sent)
            } else {
                String::new()
            };
            let value = format!(
                r#"{{{number}"temp":{}.{},"on":{},"fw":"1.{}","seq":{}}}"#,
                rng.below(40),
                rng.below(10),
                rng.below(2) == 1,
                rng.below(5),
                rng.below(1_000_000)
            );
            self.put(&key, Some(&value));
        }
        self.flush();
    }
}

/// The usual start of a test: a fresh compacted topic, a redis-server of its
/// own (with an append-only file if `aof`), a temp dir, a producer and a
/// seeded generator.
pub struct Setup {
    pub topic: String,
    pub redis: Redis,
    pub dir: tempfile::TempDir,
    pub producer: TestProducer,
    pub rng: Rng,
}

impl Setup {
    pub fn new(name: &str, partitions: i32, aof: bool, seed: u64) -> Setup {
        let topic = unique(name);
        create_topic(&topic, partitions);
        Setup {
            redis: Redis::start(aof),
            dir: tempfile::tempdir().unwrap(),
            producer: TestProducer::new(&topic),
            rng: Rng::new(seed),
            topic,
        }
    }
}

/// Waits until the `device:` keyspace (postcard) equals the oracle.
pub fn converges(redis: &Redis, producer: &TestProducer) {
    assert_converges(
        redis,
        "device:",
        StoreFormat::Postcard,
        producer,
        Duration::from_secs(60),
    );
}

/// A seeded test's rounds and seed from the environment (`<prefix>_ROUNDS`,
/// default `rounds`; `<prefix>_SEED`, default the clock), so a failure can
/// be replayed and a longer run asked for.
pub fn rounds_and_seed(prefix: &str, rounds: usize) -> (usize, u64) {
    let number = |name: String| {
        std::env::var(&name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
    };
    let rounds = number(format!("{prefix}_ROUNDS")).map_or(rounds, |r| r as usize);
    let seed = number(format!("{prefix}_SEED")).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    (rounds, seed)
}

/// Small seeded generator so failures can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A redis-server of our own on a free port and a unix socket, in a temp dir.
pub struct Redis {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    aof: bool,
    /// Further redis-server arguments, kept for restarts.
    extra: Vec<String>,
}

impl Redis {
    pub fn start(aof: bool) -> Redis {
        Redis::start_with(aof, &[])
    }

    /// A redis-server with further arguments (`--maxmemory 1mb`, `--save
    /// "1 1"`, ...), given after the defaults so they win.
    pub fn start_with(aof: bool, extra: &[&str]) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = spawn_redis(dir.path(), port, aof, &extra);
        let redis = Redis {
            child,
            port,
            dir,
            aof,
            extra,
        };
        redis.wait_ready();
        redis
    }

    fn wait_ready(&self) {
        wait_until(Duration::from_secs(10), "redis-server to answer", || {
            self.try_conn().is_some()
        });
    }

    /// SIGKILLs the server and starts it again on the same port and
    /// directory: an AOF survives, a non-persistent Redis comes back empty.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_redis(self.dir.path(), self.port, self.aof, &self.extra);
        self.wait_ready();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn unix_url(&self) -> String {
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

    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to the test redis-server")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every key and its raw value under `prefix`, as one atomic snapshot
    /// (a script), so a key deleted mid-scan cannot show up half-read.
    /// Every key under `prefix` and its value; a hash (the hash store) as
    /// its fields packed as `codec::pack_hash_pairs` packs them.
    pub fn dump(&self, prefix: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let script = redis::Script::new(
            "local out = {} \
             for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
               local v \
               if redis.call('TYPE', k)['ok'] == 'hash' then \
                 local parts = {} \
                 for _, f in ipairs(redis.call('HGETALL', k)) do \
                   parts[#parts + 1] = struct.pack('<I4', #f) .. f \
                 end \
                 v = table.concat(parts) \
               else \
                 v = redis.call('GET', k) \
               end \
               out[#out + 1] = k; out[#out + 1] = v \
             end return out",
        );
        let flat: Vec<Vec<u8>> = script
            .arg(format!("{prefix}*"))
            .invoke(&mut self.conn())
            .unwrap();
        flat.chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect()
    }

    /// The field table of namespace `ns` (stored format 2).
    pub fn fields(&self, ns: &str) -> codec::Fields {
        codec::Fields::from_pairs(self.hgetall(&format!("{ns}:fields")))
    }

    pub fn hgetall(&self, key: &str) -> BTreeMap<String, String> {
        redis::cmd("HGETALL")
            .arg(key)
            .query(&mut self.conn())
            .unwrap()
    }

    /// The agent's `state` in its status hash, if written yet.
    pub fn state(&self) -> Option<String> {
        self.hgetall("edgecache:status").remove("state")
    }

    pub fn status_counter(&self, field: &str) -> u64 {
        self.hgetall("edgecache:status")
            .get(field)
            .map(|v| v.parse().unwrap())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_redis(dir: &Path, port: u16, aof: bool, extra: &[String]) -> Child {
    let socket = dir.join("redis.sock");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--unixsocket", socket.to_str().unwrap(), "--unixsocketperm", "700"])
        .args(["--dir", dir.to_str().unwrap(), "--save", ""])
        .args(["--appendonly", if aof { "yes" } else { "no" }])
        .args(["--appendfsync", "always", "--daemonize", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install it (apt-get install redis-server); the tests need a real Redis")
        })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What Redis must hold under `prefix` according to the records sent, with
/// values in the topic's store format rendered as JSON for comparison.
pub fn expected_json(
    prefix: &str,
    last: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> BTreeMap<Vec<u8>, serde_json::Value> {
    last.iter()
        .filter_map(|(k, v)| {
            let v = v.as_ref()?;
            let mut key = prefix.as_bytes().to_vec();
            key.extend_from_slice(k);
            Some((
                key,
                serde_json::from_slice(v).expect("test values are JSON"),
            ))
        })
        .collect()
}

pub fn actual_json(
    redis: &Redis,
    prefix: &str,
    store: StoreFormat,
) -> BTreeMap<Vec<u8>, serde_json::Value> {
    let dump = redis.dump(prefix);
    // After the values: names are written no later than the values using them.
    let fields = redis.fields("edgecache");
    dump.into_iter()
        .map(|(k, v)| {
            let (json, _) = codec::stored_to_json(store, &v, &fields).unwrap_or_else(|e| {
                panic!(
                    "key {} holds bad {store} data: {e}",
                    String::from_utf8_lossy(&k)
                )
            });
            (k, json)
        })
        .collect()
}

/// Waits until the keyspace under `prefix` equals the oracle exactly (no
/// missing, stale or extra key); on timeout, prints the first differences.
pub fn assert_converges(
    redis: &Redis,
    prefix: &str,
    store: StoreFormat,
    producer: &TestProducer,
    timeout: Duration,
) {
    let expected = expected_json(prefix, &producer.last);
    let start = Instant::now();
    loop {
        let actual = actual_json(redis, prefix, store);
        if actual == expected {
            return;
        }
        if start.elapsed() > timeout {
            let mut diffs = Vec::new();
            for (k, v) in &expected {
                match actual.get(k) {
                    None => diffs.push(format!("missing {}", String::from_utf8_lossy(k))),
                    Some(a) if a != v => diffs.push(format!(
                        "stale {}: expected {v}, got {a}",
                        String::from_utf8_lossy(k)
                    )),
                    _ => {}
                }
            }
            for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
                diffs.push(format!("extra {}", String::from_utf8_lossy(k)));
            }
            panic!(
                "Redis did not converge to the oracle within {timeout:?}: {} expected keys, {} actual, {} differences; first: {:#?}\nstatus: {:?}\noffsets: {:?}\nrecords sent: {}",
                expected.len(),
                actual.len(),
                diffs.len(),
                &diffs[..diffs.len().min(10)],
                redis.hgetall("edgecache:status"),
                redis.hgetall("edgecache:offsets"),
                producer.n_sent,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A config file for the agent.
pub struct AgentConfig {
    pub redis_url: String,
    pub topics: Vec<(String, String, &'static str, &'static str)>,
    pub extra_agent: String,
    /// More lines for the `[redis]` section.
    pub extra_redis: String,
}

impl AgentConfig {
    pub fn new(redis_url: String, topic: &str, prefix: &str) -> AgentConfig {
        AgentConfig {
            redis_url,
            topics: vec![(topic.to_owned(), prefix.to_owned(), "json", "postcard")],
            extra_agent: String::new(),
            extra_redis: String::new(),
        }
    }

    pub fn write(&self, dir: &Path) -> PathBuf {
        let mut text = format!(
            "[agent]\n{}\n[kafka]\nbrokers = \"{}\"\n[redis]\nurl = \"{}\"\n{}\n",
            self.extra_agent,
            brokers(),
            self.redis_url,
            self.extra_redis
        );
        for (name, prefix, input, store) in &self.topics {
            text.push_str(&format!(
                "[[topics]]\nname = \"{name}\"\nkey_prefix = \"{prefix}\"\ninput = \"{input}\"\nstore = \"{store}\"\n"
            ));
        }
        let path = dir.join(format!("{}.toml", unique("agent")));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path
    }
}

/// The agent binary as a child process, its log in a file.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

/// The agent binary under test. `EDGECACHE_TEST_BIN` points the tests at
/// another build, e.g. a wrapper that runs the aarch64 binary under qemu
/// (targets/qemu-smoke.sh).
pub fn bin() -> String {
    std::env::var("EDGECACHE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgecache").to_owned())
}

impl Agent {
    pub fn start(config: &Path) -> Agent {
        Agent::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_wrapped(&[], config, env)
    }

    /// Starts the agent under `wrapper` (a command and its arguments that
    /// exec the rest, e.g. `setpriv ...`).
    pub fn start_wrapped(wrapper: &[&str], config: &Path, env: &[(&str, &str)]) -> Agent {
        let log = config.with_extension(format!("{}.log", unique("run")));
        let bin = bin();
        let mut argv = wrapper.to_vec();
        argv.push(&bin);
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .args(["run", "--config", config.to_str().unwrap()])
            .env(
                "EDGECACHE_LOG",
                std::env::var("EDGECACHE_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            // After EDGECACHE_LOG, so a test can raise the log level.
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the edgecache binary");
        Agent {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    pub fn sigkill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then the time the agent took to exit.
    pub fn sigterm(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(30) {
                child.kill().unwrap();
                panic!("agent ignored SIGTERM for 30 s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            if let Ok(dir) = std::env::var("EDGECACHE_TEST_KEEP_LOGS") {
                let _ = std::fs::copy(
                    &self.log,
                    Path::new(&dir).join(self.log.file_name().unwrap()),
                );
            }
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- agent log tail ({}) ----", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A stand-in for systemd's notify socket: the agent is started with
/// `NOTIFY_SOCKET` pointing here and every datagram is collected.
pub struct NotifyListener {
    socket: std::os::unix::net::UnixDatagram,
    pub path: PathBuf,
    pub messages: Vec<String>,
}

impl NotifyListener {
    pub fn bind(dir: &Path) -> NotifyListener {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        NotifyListener {
            socket,
            path,
            messages: Vec::new(),
        }
    }

    /// `NOTIFY_SOCKET` and a watchdog of `watchdog_usec`, for `Agent::start_with_env`.
    pub fn env(&self, watchdog_usec: &'static str) -> [(&str, &str); 2] {
        [
            ("NOTIFY_SOCKET", self.path.to_str().unwrap()),
            ("WATCHDOG_USEC", watchdog_usec),
        ]
    }

    /// Collects datagrams for up to `timeout`, or until `done` holds.
    pub fn collect(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < timeout && !done(&self.messages) {
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.messages
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.messages.iter().filter(|m| m.contains(needle)).count()
    }
}

/// Runs `edgecache ARGS...` to completion.
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every record the topic's log still holds (tombstones included) as
/// (partition, offset, key), read from the beginning to the end of each
/// partition.
pub fn log_records(topic: &str) -> Vec<(i32, i64, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("log-records"))
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut list = rdkafka::TopicPartitionList::new();
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    for &p in &partitions {
        list.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).expect("assign");
    let mut records = Vec::new();
    let mut at_end = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_end.len() < partitions.len() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} to its end took over 30 s"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => records.push((
                message.partition(),
                message.offset(),
                message.key().unwrap_or_default().to_vec(),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    records
}

/// Deletes every record before `offset` in each given partition
/// (the DeleteRecords admin request): the log start moves there.
pub fn delete_records(topic: &str, before: &[(i32, i64)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let mut list = rdkafka::TopicPartitionList::new();
    for &(partition, offset) in before {
        list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))
            .unwrap();
    }
    let result = block_on(admin.delete_records(&list, &AdminOptions::new()))
        .expect("delete_records request");
    for element in result.elements() {
        if let Err(e) = element.error() {
            panic!("deleting records of {topic}/{}: {e}", element.partition());
        }
    }
}

/// The next offset per partition in the agent's offsets hash for `topic`.
pub fn stored_offsets(redis: &Redis, topic: &str) -> BTreeMap<i32, i64> {
    redis
        .hgetall("edgecache:offsets")
        .into_iter()
        .filter_map(|(field, value)| {
            let (t, p) = field.rsplit_once('/')?;
            (t == topic).then(|| (p.parse().unwrap(), value.parse().unwrap()))
        })
        .collect()
}
