//! Configuration in two stages: [`Config`] is what the TOML file says (every
//! field documented, unknown fields rejected), [`Settings`] is the validated,
//! derived form the rest of the agent uses. Validation happens before anything
//! connects, and every error names the file and the field.
//!
//! Validation runs one function per section of the file, each returning
//! its part of [`Settings`]; nothing reads the file's form afterwards.
//! librdkafka's property strings are built from [`KafkaSettings`] and
//! [`Limits`] by `source`, which uses them.
//!
//! The one memory budget (`agent.memory_budget_mib`) derives librdkafka's
//! fetch and queue limits, the batch byte cap and the value-size cap (G5).

use crate::codec::{InputFormat, StoreFormat};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Most records one batch (one Redis transaction) can hold. The coalescing
/// map is a fixed-capacity heapless map of this size, so it is a compile-time
/// bound; `agent.max_batch_records` may only lower it.
pub const BATCH_CAPACITY: usize = 4096;
/// Longest Kafka key accepted; longer keys are skipped as oversize.
pub const MAX_KEY_BYTES: usize = 4096;

/// Top level of `edgecache.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Limits of the agent itself.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Where to read from.
    pub kafka: KafkaConfig,
    /// Where to write to.
    pub redis: RedisConfig,
    /// The compacted topics to mirror; at least one.
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    /// The optional Prometheus endpoint; off unless `listen` is set.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: a Prometheus text endpoint. Off by default, so the agent
/// opens no listening socket unless asked to (G8).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:port` to serve `GET /metrics` on, e.g. `127.0.0.1:9187`. An IP,
    /// not a host name, so what is exposed is clear without DNS.
    pub listen: Option<String>,
    /// Allow a `listen` address other than loopback (the endpoint has no
    /// authentication; only open it on a network you trust).
    pub allow_remote: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Memory the agent may use for buffering, in MiB (4..=4096). librdkafka's
    /// prefetch queue gets 1/4, one fetch response 1/8, a batch 1/8, and the
    /// value-size cap is 1/32 (at least 1 MiB, Kafka's default largest
    /// record, and at most 16 MiB).
    pub memory_budget_mib: u32,
    /// Most records per Redis transaction (1..=4096). Smaller batches keep
    /// Redis responsive to readers while a large backlog is applied.
    pub max_batch_records: usize,
    /// How often topic metadata is read again to notice partitions added to
    /// a topic (or a topic created after start), in seconds (1..=3600).
    pub partition_discovery_secs: u64,
    /// Under systemd, READY=1 is sent once caught up, or after this many
    /// seconds even if not (Kafka unreachable at boot must not fail the
    /// unit); keep it below the unit's TimeoutStartSec (1..=3600).
    pub ready_timeout_secs: u64,
    /// Niceness added while rehydrating or catching up (0..=19; 0: one
    /// priority throughout). Local readers of Redis then preempt the bulk
    /// load; once live the agent returns to the niceness it started with.
    pub catch_up_nice: u8,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            memory_budget_mib: 24,
            max_batch_records: 96,
            // A metadata request per topic each time: every 5 min, like
            // librdkafka's own refresh, keeps an idle fleet's broker cost low.
            partition_discovery_secs: 300,
            ready_timeout_secs: 60,
            catch_up_nice: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated `host:port`.
    pub brokers: String,
    /// Any librdkafka consumer property, passed through as given, except the
    /// ones the agent derives or relies on (listed in README).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are read from files (trailing
    /// newline removed), e.g. `"sasl.password" = "kafka-password"`. Relative
    /// paths are looked up in `$CREDENTIALS_DIRECTORY` (systemd
    /// `LoadCredential=`), else next to the configuration file.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
    /// If set, the offsets applied to Redis are also committed to this
    /// consumer group (at most once a second), so Kafka's usual lag tools
    /// show how far this gateway is. Never read back: resume positions
    /// always come from Redis (G2). One group per gateway.
    #[serde(default)]
    pub commit_group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `unix:///path/to/redis.sock`.
    pub url: String,
    /// Prefix of the agent's own keys: `<namespace>:offsets`, `:marker`, `:status`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// File holding the Redis password (resolved like `kafka.secret_files`);
    /// overrides a password in the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// If set, every applied change is published on this channel as
    /// `set <key>` or `del <key>`, in the same atomic step as the write.
    #[serde(default)]
    pub publish_channel: Option<String>,
    /// Run against a Redis whose `maxmemory-policy` may evict the agent's
    /// keys (`allkeys-*`, or `volatile-*` with a topic's `ttl_secs`).
    /// Evicted keys are missing from the mirror until their next record, and
    /// nothing tells readers; off by default, so the agent refuses to start.
    #[serde(default)]
    pub allow_eviction: bool,
}

fn default_namespace() -> String {
    "edgecache".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Kafka topic name; should be a compacted topic.
    pub name: String,
    /// Redis key = key_prefix + Kafka record key.
    pub key_prefix: String,
    /// How record values are encoded on the topic.
    #[serde(default = "default_input")]
    pub input: InputFormat,
    /// How values are written to Redis.
    #[serde(default = "default_store")]
    pub store: StoreFormat,
    /// Mirror only records whose Kafka key starts with this.
    #[serde(default)]
    pub only_keys_with_prefix: Option<String>,
    /// Mirror only records whose Kafka key matches this regular expression
    /// (Rust `regex` syntax, matched against the key bytes).
    #[serde(default)]
    pub only_keys_matching: Option<String>,
    /// Mirror only these partitions (default: all, including new ones).
    #[serde(default)]
    pub partitions: Option<Vec<i32>>,
    /// Keys expire this many seconds after their record's timestamp; a
    /// record already older than that deletes its key.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

fn default_input() -> InputFormat {
    InputFormat::Json
}

fn default_store() -> StoreFormat {
    StoreFormat::Postcard
}

/// librdkafka properties the agent sets itself (`source::consumer_properties`
/// derives them); users may not override them.
pub const DERIVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "auto.offset.reset",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "receive.message.max.bytes",
    "message.max.bytes",
    "statistics.interval.ms",
    "fetch.queue.backoff.ms",
];

/// A configuration problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {field}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub field: String,
    pub message: String,
}

/// The validated configuration: typed and derived, nothing of the file left
/// to read again, so each value is checked (and each limit clamped) once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agent: AgentSettings,
    pub kafka: KafkaSettings,
    pub redis: RedisSettings,
    pub topics: Vec<TopicSettings>,
    pub limits: Limits,
    /// Where to serve metrics; `None` binds nothing.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The file as parsed, secrets masked, as TOML: rendered during
    /// validation for `check-config`, the only reader of the file as written.
    file_toml: String,
}

/// `[agent]`, validated. `max_batch_records` is in [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentSettings {
    pub memory_budget_mib: u32,
    pub partition_discovery: std::time::Duration,
    pub ready_timeout: std::time::Duration,
    pub catch_up_nice: u8,
}

/// `[kafka]`, validated. The consumer's librdkafka properties are built
/// from it by `source::consumer_properties`.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Bootstrap brokers, trimmed.
    pub brokers: String,
    pub commit_group: Option<String>,
    /// The user's pass-through properties: none of
    /// [`DERIVED_KAFKA_PROPERTIES`], every `*.location` file readable. May
    /// hold secrets: never print this with `Debug`.
    pub properties: BTreeMap<String, String>,
    /// Properties whose values were read from `kafka.secret_files`.
    pub secrets: BTreeMap<String, Secret>,
}

/// `[redis]`, validated.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Trimmed; may hold a password: mask it ([`mask_url_password`]) to show it.
    pub url: String,
    /// From `password_file`.
    pub password: Option<Secret>,
    pub namespace: String,
    pub publish_channel: Option<String>,
    pub allow_eviction: bool,
}

#[derive(Debug, Clone)]
pub struct TopicSettings {
    pub name: String,
    pub key_prefix: Vec<u8>,
    pub input: InputFormat,
    pub store: StoreFormat,
    pub only_prefix: Option<Vec<u8>>,
    pub only_matching: Option<regex::bytes::Regex>,
    pub partitions: Option<Vec<i32>>,
    pub ttl_ms: Option<i64>,
}

impl TopicSettings {
    /// Whether a record with this Kafka key is in the agent's scope.
    pub fn wants_key(&self, key: &[u8]) -> bool {
        self.only_prefix.as_ref().is_none_or(|p| key.starts_with(p))
            && self.only_matching.as_ref().is_none_or(|r| r.is_match(key))
    }

    pub fn wants_partition(&self, partition: i32) -> bool {
        self.partitions
            .as_ref()
            .is_none_or(|list| list.contains(&partition))
    }
}

/// A secret value: never shown by `Debug`, so logging settings cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Everything the memory budget derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub memory_budget_bytes: usize,
    pub max_batch_records: usize,
    pub max_batch_bytes: usize,
    pub max_value_bytes: usize,
    pub queued_max_messages_kbytes: usize,
    pub queued_min_messages: usize,
    pub fetch_max_bytes: usize,
    pub max_partition_fetch_bytes: usize,
}

/// What the agent's process holds whatever its buffers: the pages of the
/// binary it runs, librdkafka's threads and their stacks, the allocator's
/// per-thread arenas, the Redis client's buffers (BENCHMARKS.md, "Peak RSS":
/// 9 MiB idle, 7 MiB of it the binary). The buffers share what is left, so
/// the budget bounds the whole process, not the buffers alone.
pub const FIXED_COST_MIB: usize = 10;

/// What one prefetched record costs librdkafka beyond its key and value
/// (its op and message headers), which `queued.max.messages.kbytes` does
/// not count; the record count cap keeps that overhead inside the queue's
/// share too.
const QUEUED_RECORD_OVERHEAD: usize = 512;

impl Limits {
    pub fn from_budget(budget_mib: u32, max_batch_records: usize) -> Limits {
        let budget = budget_mib as usize * 1024 * 1024;
        // Small budgets keep at least half for the buffers (the fixed cost
        // then exceeds the budget: it cannot be promised below ~16 MiB).
        let buffers = budget - (FIXED_COST_MIB << 20).min(budget / 2);
        let queue_bytes = buffers / 4;
        let fetch_max_bytes = buffers / 8;
        Limits {
            memory_budget_bytes: budget,
            // The one place this limit is clamped: the batch's map holds
            // BATCH_CAPACITY keys, and an empty batch always takes a record.
            max_batch_records: max_batch_records.clamp(1, BATCH_CAPACITY),
            // Two batches exist at once: one in flight to Redis, one filling.
            max_batch_bytes: buffers / 16,
            // At least 1 MiB: every record a topic with Kafka's default
            // max.message.bytes accepts is mirrored, even on a small budget
            // (one such value fits an empty batch whatever its byte cap).
            max_value_bytes: (budget / 32).clamp(1024 * 1024, 16 * 1024 * 1024),
            queued_max_messages_kbytes: queue_bytes / 1024,
            // Half the queue's share for the records' overhead: small
            // records stop at this count before the byte cap.
            queued_min_messages: (queue_bytes / 2 / QUEUED_RECORD_OVERHEAD).clamp(1000, 10_000),
            fetch_max_bytes,
            max_partition_fetch_bytes: (fetch_max_bytes / 4).min(1024 * 1024),
        }
    }
}

impl Settings {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: shown.clone(),
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Settings::parse(&shown, &text)
    }

    /// Parses and validates configuration text; `path` is only for messages.
    pub fn parse(path: &str, text: &str) -> Result<Settings, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            path: path.into(),
            field: "(syntax)".into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        Settings::validate(path, config)
    }

    fn validate(path: &str, config: Config) -> Result<Settings, ConfigError> {
        let (agent, limits) = validate_agent(path, &config.agent)?;
        let kafka = validate_kafka(path, &config.kafka)?;
        let redis = validate_redis(path, &config.redis)?;
        let topics = validate_topics(path, &config.topics, &redis.namespace)?;
        let metrics_listen = validate_metrics(path, &config.metrics)?;
        Ok(Settings {
            agent,
            kafka,
            redis,
            topics,
            limits,
            metrics_listen,
            file_toml: masked_toml(config),
        })
    }

    /// The effective configuration as TOML, secrets masked, for `check-config`:
    /// the file, the limits derived from it, and the final librdkafka
    /// properties (`source::consumer_properties`, built where they are used).
    pub fn effective_toml(&self, kafka_properties: &BTreeMap<String, String>) -> String {
        let mut out = self.file_toml.clone();
        out.push_str("\n# Derived from agent.memory_budget_mib:\n[derived]\n");
        out.push_str(&toml::to_string_pretty(&self.limits).expect("limits serialise as TOML"));
        out.push_str("\n# Final librdkafka consumer properties:\n[derived.librdkafka]\n");
        for (key, value) in kafka_properties {
            let value = if is_secret_property(key) {
                "***"
            } else {
                value
            };
            out.push_str(&format!("{:?} = {:?}\n", key, value));
        }
        out
    }

    /// The topic whose prefix a Redis key falls under (prefixes never overlap).
    pub fn topic_for_key(&self, key: &[u8]) -> Option<&TopicSettings> {
        self.topics.iter().find(|t| key.starts_with(&t.key_prefix))
    }
}

fn error(path: &str, field: &str, message: String) -> ConfigError {
    ConfigError {
        path: path.into(),
        field: field.into(),
        message,
    }
}

/// `[agent]`: its settings and the limits its memory budget derives.
fn validate_agent(path: &str, agent: &AgentConfig) -> Result<(AgentSettings, Limits), ConfigError> {
    let err = |field: &str, message: String| error(path, field, message);
    // Every [agent] number has a range; the message names it as written.
    let within = |field: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
        if range.contains(&value) {
            Ok(())
        } else {
            Err(err(
                field,
                format!("{value} is outside {}..={}", range.start(), range.end()),
            ))
        }
    };
    let budget = agent.memory_budget_mib;
    within("agent.memory_budget_mib", budget.into(), 4..=4096)?;
    let max_batch = agent.max_batch_records;
    within(
        "agent.max_batch_records",
        max_batch as u64,
        1..=BATCH_CAPACITY as u64,
    )?;
    let limits = Limits::from_budget(budget, max_batch);
    let ready = agent.ready_timeout_secs;
    within("agent.ready_timeout_secs", ready, 1..=3600)?;
    let nice = agent.catch_up_nice;
    within("agent.catch_up_nice", nice.into(), 0..=19)?;
    let discovery = agent.partition_discovery_secs;
    within("agent.partition_discovery_secs", discovery, 1..=3600)?;
    let settings = AgentSettings {
        memory_budget_mib: budget,
        partition_discovery: std::time::Duration::from_secs(discovery),
        ready_timeout: std::time::Duration::from_secs(ready),
        catch_up_nice: nice,
    };
    Ok((settings, limits))
}

/// `[kafka]`: the user's properties are checked here, and secret files
/// read, so a bad one stops `check-config` before anything connects.
fn validate_kafka(path: &str, kafka: &KafkaConfig) -> Result<KafkaSettings, ConfigError> {
    let err = |field: &str, message: String| error(path, field, message);
    if let Some(group) = &kafka.commit_group {
        if group.is_empty()
            || group.len() > 255
            || group.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(err(
                "kafka.commit_group",
                format!("{group:?} must be 1..=255 characters without spaces"),
            ));
        }
    }
    if kafka.brokers.trim().is_empty() {
        return Err(err("kafka.brokers", "must name at least one broker".into()));
    }
    for key in kafka.properties.keys() {
        if DERIVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
            return Err(err(
                &format!("kafka.properties.{key}"),
                "is set by edgecache itself (memory budget, offsets in Redis); remove it".into(),
            ));
        }
    }

    // A build without TLS has librdkafka without SCRAM and OAUTHBEARER,
    // which it would only notice when the client is created: refuse here
    // (exit 78) instead of at every start. TLS itself librdkafka refuses
    // while checking the properties.
    if !cfg!(feature = "tls") {
        for key in ["sasl.mechanisms", "sasl.mechanism"] {
            if let Some(mechanism) = kafka.properties.get(key) {
                if !mechanism.trim().eq_ignore_ascii_case("PLAIN") {
                    return Err(err(
                        &format!("kafka.properties.{key}"),
                        format!(
                            "{mechanism:?} needs a build with the `tls` feature (this one is \
                             without: PLAIN only)"
                        ),
                    ));
                }
            }
        }
    }

    // librdkafka opens these files only when the client is created, and
    // then says "ssl.ca.location failed: ..." without naming our file; a
    // missing CA or key must instead stop check-config (exit 78).
    for (key, value) in &kafka.properties {
        if key.ends_with(".location") && value != "probe" {
            std::fs::metadata(value).map_err(|e| {
                err(
                    &format!("kafka.properties.{key}"),
                    format!("cannot read {value}: {e}"),
                )
            })?;
        }
    }

    let mut secrets = BTreeMap::new();
    for (key, file) in &kafka.secret_files {
        let field = format!("kafka.secret_files.{key}");
        if DERIVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
            return Err(err(&field, "is set by edgecache itself; remove it".into()));
        }
        if kafka.properties.contains_key(key) {
            return Err(err(
                &field,
                "is also set in kafka.properties; keep one".into(),
            ));
        }
        let value = read_secret(path, file).map_err(|m| err(&field, m))?;
        secrets.insert(key.clone(), Secret(value));
    }
    Ok(KafkaSettings {
        brokers: kafka.brokers.trim().to_owned(),
        commit_group: kafka.commit_group.clone(),
        properties: kafka.properties.clone(),
        secrets,
    })
}

/// `[redis]`.
fn validate_redis(path: &str, redis: &RedisConfig) -> Result<RedisSettings, ConfigError> {
    let err = |field: &str, message: String| error(path, field, message);
    let url = redis.url.trim().to_owned();
    let scheme_ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme_ok {
        return Err(err(
            "redis.url",
            "must start with redis://, rediss://, unix:// or redis+unix://".into(),
        ));
    }
    let namespace = redis.namespace.clone();
    if namespace.is_empty() || namespace.contains(char::is_whitespace) {
        return Err(err(
            "redis.namespace",
            "must be non-empty and without spaces".into(),
        ));
    }
    if let Some(channel) = &redis.publish_channel {
        if channel.is_empty() {
            return Err(err("redis.publish_channel", "must not be empty".into()));
        }
    }
    let password = match &redis.password_file {
        None => None,
        Some(file) => Some(Secret(
            read_secret(path, file).map_err(|m| err("redis.password_file", m))?,
        )),
    };
    Ok(RedisSettings {
        url,
        password,
        namespace,
        publish_channel: redis.publish_channel.clone(),
        allow_eviction: redis.allow_eviction,
    })
}

/// `[[topics]]`; `namespace` is the agent's own key prefix, which no
/// topic's may overlap.
fn validate_topics(
    path: &str,
    config: &[TopicConfig],
    namespace: &str,
) -> Result<Vec<TopicSettings>, ConfigError> {
    let err = |field: &str, message: String| error(path, field, message);
    if config.is_empty() {
        return Err(err(
            "topics",
            "at least one [[topics]] entry is needed".into(),
        ));
    }
    let mut topics = Vec::with_capacity(config.len());
    for (i, topic) in config.iter().enumerate() {
        let field = |name: &str| format!("topics[{i}].{name}");
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if topic.name.is_empty() || topic.name.len() > 249 || !topic.name.chars().all(legal) {
            return Err(err(
                &field("name"),
                format!("{:?} is not a legal Kafka topic name", topic.name),
            ));
        }
        if config[..i].iter().any(|t| t.name == topic.name) {
            return Err(err(
                &field("name"),
                format!("topic {:?} is listed twice", topic.name),
            ));
        }
        if topic.key_prefix.is_empty() {
            return Err(err(
                &field("key_prefix"),
                "must not be empty: the agent only writes under its prefixes".into(),
            ));
        }
        let meta = format!("{namespace}:");
        if topic.key_prefix.starts_with(&meta) || meta.starts_with(&topic.key_prefix) {
            return Err(err(
                &field("key_prefix"),
                format!(
                    "{:?} overlaps the agent's own keys {meta:?}*",
                    topic.key_prefix
                ),
            ));
        }
        if let Some(other) = config[..i].iter().find(|t| {
            t.key_prefix.starts_with(&topic.key_prefix)
                || topic.key_prefix.starts_with(&t.key_prefix)
        }) {
            return Err(err(
                &field("key_prefix"),
                format!(
                    "{:?} overlaps the prefix {:?} of topic {:?}: two topics could write one key",
                    topic.key_prefix, other.key_prefix, other.name
                ),
            ));
        }
        if topic.input == InputFormat::Raw && topic.store == StoreFormat::Json {
            return Err(err(
                &field("store"),
                "raw input has no JSON form; use store = \"raw\" or \"postcard\"".into(),
            ));
        }
        if topic.input == InputFormat::Raw && topic.store == StoreFormat::Hash {
            return Err(err(
                &field("store"),
                "raw input has no fields to put in a hash; use store = \"raw\" or \"postcard\""
                    .into(),
            ));
        }
        let only_matching = match &topic.only_keys_matching {
            None => None,
            Some(pattern) => Some(regex::bytes::Regex::new(pattern).map_err(|e| {
                err(
                    &field("only_keys_matching"),
                    e.to_string().replace('\n', " "),
                )
            })?),
        };
        if let Some(list) = &topic.partitions {
            if list.is_empty() || list.iter().any(|p| *p < 0) {
                return Err(err(
                    &field("partitions"),
                    "must list partition numbers >= 0 (leave it out for all)".into(),
                ));
            }
        }
        let ttl_ms = match topic.ttl_secs {
            None => None,
            Some(secs) if (1..=10 * 365 * 86_400).contains(&secs) => Some(secs as i64 * 1000),
            Some(secs) => {
                return Err(err(
                    &field("ttl_secs"),
                    format!("{secs} is outside 1..=315360000 (ten years)"),
                ))
            }
        };
        topics.push(TopicSettings {
            name: topic.name.clone(),
            key_prefix: topic.key_prefix.as_bytes().to_vec(),
            input: topic.input,
            store: topic.store,
            only_prefix: topic
                .only_keys_with_prefix
                .as_ref()
                .map(|p| p.as_bytes().to_vec()),
            only_matching,
            partitions: topic.partitions.clone(),
            ttl_ms,
        });
    }
    Ok(topics)
}

/// `[metrics]`: where to listen, if anywhere.
fn validate_metrics(
    path: &str,
    metrics: &MetricsConfig,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(listen) = &metrics.listen else {
        return Ok(None);
    };
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        error(
            path,
            "metrics.listen",
            format!("{listen:?} is not IP:port (e.g. \"127.0.0.1:9187\")"),
        )
    })?;
    if !addr.ip().is_loopback() && !metrics.allow_remote {
        return Err(error(
            path,
            "metrics.listen",
            format!(
                "{addr} is not a loopback address; the endpoint has no \
                 authentication, so set metrics.allow_remote = true to expose it"
            ),
        ));
    }
    Ok(Some(addr))
}

/// The file as parsed, as TOML, with the Redis URL's password and secret
/// librdkafka properties masked.
fn masked_toml(mut shown: Config) -> String {
    shown.redis.url = mask_url_password(&shown.redis.url);
    for (key, value) in shown.kafka.properties.iter_mut() {
        if is_secret_property(key) {
            *value = "***".into();
        }
    }
    toml::to_string_pretty(&shown).expect("config serialises as TOML")
}

/// Reads a secret file. Relative paths are looked up in systemd's
/// `$CREDENTIALS_DIRECTORY` when set, else next to the configuration file.
fn read_secret(config_path: &str, file: &Path) -> Result<String, String> {
    let resolved = if file.is_absolute() {
        file.to_path_buf()
    } else if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        Path::new(&dir).join(file)
    } else {
        Path::new(config_path)
            .parent()
            .unwrap_or(Path::new("."))
            .join(file)
    };
    let text = std::fs::read_to_string(&resolved)
        .map_err(|e| format!("cannot read {}: {e}", resolved.display()))?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(format!("{} is empty", resolved.display()));
    }
    Ok(value)
}

/// Property names that hold secrets; their values are never printed or logged.
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.ends_with(".key.pem")
}

/// `redis://user:pw@host` -> `redis://user:***@host`, for messages and logs.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_owned(),
    };
    format!("{}{}{}", &url[..scheme_end], masked, &rest[at..])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest valid file; other modules' tests start from it too.
    pub(crate) const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
[redis]
url = "redis://127.0.0.1:6379/0"
[[topics]]
name = "device-state"
key_prefix = "device:"
"#;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse("test.toml", text)
    }

    #[test]
    fn minimal_config_gets_defaults_and_derived_limits() {
        let settings = parse(MINIMAL).unwrap();
        assert_eq!(settings.redis.namespace, "edgecache");
        assert_eq!(settings.topics[0].input, InputFormat::Json);
        assert_eq!(settings.topics[0].store, StoreFormat::Postcard);
        let limits = settings.limits;
        assert_eq!(limits.memory_budget_bytes, 24 << 20);
        // 24 MiB less the fixed 10 MiB: 14 MiB of buffers.
        assert_eq!(limits.queued_max_messages_kbytes, 3584);
        assert_eq!(limits.queued_min_messages, 3584);
        assert_eq!(limits.fetch_max_bytes, 1792 << 10);
        assert_eq!(limits.max_batch_bytes, 896 << 10);
        assert_eq!(limits.max_value_bytes, 1 << 20);
        assert_eq!(limits.max_batch_records, 96);
        assert_eq!(
            settings.agent.partition_discovery,
            std::time::Duration::from_secs(300)
        );
        // Small budgets keep half for the buffers; large ones all but 10 MiB.
        assert_eq!(Limits::from_budget(8, 128).queued_max_messages_kbytes, 1024);
        assert_eq!(Limits::from_budget(8, 128).queued_min_messages, 1024);
        assert_eq!(
            Limits::from_budget(256, 128).queued_max_messages_kbytes,
            246 << 8
        );
        assert_eq!(Limits::from_budget(256, 128).queued_min_messages, 10_000);
        assert_eq!(Limits::from_budget(4, 128).max_value_bytes, 1 << 20);
        assert_eq!(Limits::from_budget(256, 128).max_value_bytes, 8 << 20);
        assert_eq!(Limits::from_budget(4096, 128).max_value_bytes, 16 << 20);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../systemd/edgecache.toml");
        parse(text).unwrap();
    }

    fn error_field(text: &str) -> String {
        let e = parse(text).unwrap_err();
        assert!(e.to_string().starts_with("test.toml: "), "{e}");
        e.field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            error_field(&MINIMAL.replace("[kafka]", "[agent]\nmemory_budget_mib = 1\n[kafka]")),
            "agent.memory_budget_mib"
        );
        assert_eq!(
            error_field(&MINIMAL.replace("[kafka]", "[agent]\ncatch_up_nice = 20\n[kafka]")),
            "agent.catch_up_nice"
        );
        assert_eq!(
            error_field(&MINIMAL.replace("redis://127", "http://127")),
            "redis.url"
        );
        assert_eq!(
            error_field(&MINIMAL.replace("device-state", "bad topic")),
            "topics[0].name"
        );
        assert_eq!(
            error_field(&MINIMAL.replace("\"device:\"", "\"edgecache:x\"")),
            "topics[0].key_prefix"
        );
        assert_eq!(
            error_field(&format!(
                "{MINIMAL}[[topics]]\nname = \"other\"\nkey_prefix = \"device:x\"\n"
            )),
            "topics[1].key_prefix"
        );
        assert_eq!(
            error_field(&MINIMAL.replace(
                "[redis]",
                "[kafka.properties]\n\"fetch.max.bytes\" = \"1\"\n[redis]"
            )),
            "kafka.properties.fetch.max.bytes"
        );
        assert_eq!(
            error_field(&MINIMAL.replace(
                "key_prefix = \"device:\"",
                "key_prefix = \"d:\"\ninput = \"raw\"\nstore = \"json\""
            )),
            "topics[0].store"
        );
        // Unknown fields (typos) are errors, not silently ignored.
        let e = parse(&MINIMAL.replace("[redis]", "[redis]\nnamepsace = \"x\"")).unwrap_err();
        assert!(e.message.contains("namepsace"), "{e}");
        let e = parse(&MINIMAL.replace("key_prefix", "inptu = \"json\"\nkey_prefix")).unwrap_err();
        assert_eq!(e.field, "(syntax)");
    }

    #[test]
    fn metrics_listen_is_loopback_unless_allowed() {
        let with = |metrics: &str| format!("{MINIMAL}[metrics]\n{metrics}\n");
        assert_eq!(parse(MINIMAL).unwrap().metrics_listen, None);
        let local = parse(&with("listen = \"127.0.0.1:9187\"")).unwrap();
        assert_eq!(
            local.metrics_listen,
            Some("127.0.0.1:9187".parse().unwrap())
        );
        parse(&with("listen = \"[::1]:9187\"")).unwrap();
        assert_eq!(
            error_field(&with("listen = \"0.0.0.0:9187\"")),
            "metrics.listen"
        );
        assert_eq!(
            error_field(&with("listen = \"localhost:9187\"")),
            "metrics.listen"
        );
        let remote = parse(&with("listen = \"0.0.0.0:9187\"\nallow_remote = true")).unwrap();
        assert_eq!(remote.metrics_listen, Some("0.0.0.0:9187".parse().unwrap()));
    }

    #[test]
    fn commit_group_names_the_group() {
        let with = |line: &str| MINIMAL.replace("[redis]", &format!("{line}\n[redis]"));
        let settings = parse(&with("commit_group = \"edgecache-site42\"")).unwrap();
        assert_eq!(
            settings.kafka.commit_group.as_deref(),
            Some("edgecache-site42")
        );
        assert_eq!(
            error_field(&with("commit_group = \"a b\"")),
            "kafka.commit_group"
        );
    }

    #[test]
    fn missing_tls_files_are_named() {
        let with = |key: &str, value: &str| {
            MINIMAL.replace(
                "[redis]",
                &format!("[kafka.properties]\n\"{key}\" = \"{value}\"\n[redis]"),
            )
        };
        let e = parse(&with("ssl.ca.location", "/nonexistent/ca.pem")).unwrap_err();
        assert_eq!(e.field, "kafka.properties.ssl.ca.location");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
        assert_eq!(
            error_field(&with("ssl.key.location", "/nonexistent/client.key")),
            "kafka.properties.ssl.key.location"
        );
        // "probe" asks librdkafka to look for the system's CA store.
        parse(&with("ssl.ca.location", "probe")).unwrap();
        let dir = std::env::temp_dir();
        parse(&with("ssl.ca.location", dir.to_str().unwrap())).unwrap();
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            mask_url_password("redis://app:s3cret@127.0.0.1:6379/0"),
            "redis://app:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            mask_url_password("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
        let text = MINIMAL
            .replace("127.0.0.1:6379", "u:hunter2@127.0.0.1:6379")
            .replace(
                "[redis]",
                "[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n[redis]",
            );
        let settings = parse(&text).unwrap();
        let shown = settings.effective_toml(&settings.kafka.properties);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("\"sasl.password\" = \"***\""), "{shown}");
    }
}
