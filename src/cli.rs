//! The commands behind the binary: `run`, `check-config`, `get`, `status`.

use crate::codec::{self, StoreFormat};
use crate::config::{mask_url_password, Settings};
use crate::sink::{Sink, SinkError};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code for a configuration error (sysexits' EX_CONFIG); the systemd
/// unit does not restart on it, since restarting cannot fix the file.
pub const EXIT_CONFIG: u8 = 78;
/// `get`: the key is under no configured `key_prefix` (clap uses 2 for a
/// bad command line too).
pub const EXIT_NOT_MIRRORED: u8 = 2;
/// `get`, `status`: Redis cannot be reached.
pub const EXIT_REDIS_UNREACHABLE: u8 = 3;
/// `get`: the stored bytes are not valid for the topic's store format.
pub const EXIT_BAD_STORED: u8 = 4;
/// The runtime could not start (sysexits' EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;

/// `--version`: says whether this build can speak TLS to Kafka (the `tls`
/// cargo feature), which an operator cannot otherwise tell from outside.
#[cfg(feature = "tls")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (tls)");
#[cfg(not(feature = "tls"))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (no tls)");

#[derive(Debug, Parser)]
#[command(
    name = "edgecache",
    version = VERSION,
    about = "Mirror Kafka compacted topics into a local Redis"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        #[arg(long, short, default_value = "/etc/edgecache/edgecache.toml")]
        config: PathBuf,
    },
    /// Validate the configuration and print the effective settings.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/edgecache/edgecache.toml")]
        config: PathBuf,
    },
    /// Print the value stored at a Redis key (prefix included) as JSON.
    /// Exits 1 when the key does not exist.
    Get {
        #[arg(long, short, default_value = "/etc/edgecache/edgecache.toml")]
        config: PathBuf,
        /// Print {"key", "format", "ts_ms", "value"} instead of the bare value.
        #[arg(long)]
        meta: bool,
        /// The full Redis key, e.g. device:sensor-1
        key: String,
    },
    /// Print the agent's status hash from Redis.
    Status {
        #[arg(long, short, default_value = "/etc/edgecache/edgecache.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Logs go to stderr. Under systemd (JOURNAL_STREAM set) journald adds its
/// own timestamps, so ours are left out. `EDGECACHE_LOG` (or `RUST_LOG`)
/// takes a list of `[target=]level` directives such as
/// `info,librdkafka=debug`; an invalid one is reported and `info` is used.
///
/// `Targets` rather than tracing-subscriber's `EnvFilter`: the agent's
/// logs only need levels per target, and `EnvFilter`'s span and field
/// matching links regex-automata's DFA builder into the static binary.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("EDGECACHE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let (filter, invalid) = log_filter(&spec);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if journald {
        registry.with(layer.without_time()).init();
    } else {
        registry.with(layer).init();
    }
    if let Some(e) = invalid {
        tracing::warn!(
            "EDGECACHE_LOG/RUST_LOG {spec:?} is not a list of [target=]level: {e}; logging at info"
        );
    }
}

/// The filter `spec` asks for, or `info` everywhere and why not.
fn log_filter(
    spec: &str,
) -> (
    tracing_subscriber::filter::Targets,
    Option<tracing_subscriber::filter::ParseError>,
) {
    use tracing_subscriber::filter::Targets;
    match spec.parse::<Targets>() {
        Ok(filter) => (filter, None),
        Err(e) => (Targets::new().with_default(tracing::Level::INFO), Some(e)),
    }
}

fn load(config: &Path) -> Result<Settings, ExitCode> {
    Settings::load(config)
        .and_then(|settings| {
            crate::source::check_properties(&crate::source::consumer_properties(&settings))
                .map_err(|e| crate::config::ConfigError {
                    path: config.display().to_string(),
                    field: "kafka.properties".into(),
                    message: e.to_string(),
                })?;
            Ok(settings)
        })
        .map_err(|e| {
            eprintln!("edgecache: invalid configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

pub async fn execute(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                redis = %mask_url_password(&settings.redis.url),
                n_topics = settings.topics.len(),
                memory_budget_mib = settings.agent.memory_budget_mib,
                "starting"
            );
            match crate::pipeline::run(&settings, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                // Restarting cannot fix how Redis is set up (systemd's
                // RestartPreventExitStatus=78).
                Err(e @ crate::pipeline::RunError::RedisUnfit(_)) => {
                    tracing::error!("{e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match load(&config) {
            Ok(settings) => {
                let properties = crate::source::consumer_properties(&settings);
                print!("{}", settings.effective_toml(&properties));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Get { config, meta, key } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            get(&settings, key.as_bytes(), meta).await
        }
        Command::Status { config, json } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            status(&settings, json).await
        }
    }
}

fn sink_for(settings: &Settings) -> Result<Sink, ExitCode> {
    let password = settings.redis.password.as_ref().map(|p| p.0.as_str());
    Sink::new(
        &settings.redis.url,
        password,
        &settings.redis.namespace,
        Vec::new(),
        None,
    )
    .map_err(|e| {
        eprintln!("edgecache: {e}");
        ExitCode::FAILURE
    })
}

async fn get(settings: &Settings, key: &[u8], meta: bool) -> ExitCode {
    let Some(topic) = settings.topic_for_key(key) else {
        eprintln!("edgecache: no configured key_prefix matches this key");
        return ExitCode::from(EXIT_NOT_MIRRORED);
    };
    let mut sink = match sink_for(settings) {
        Ok(sink) => sink,
        Err(code) => return code,
    };
    let read = match topic.store {
        StoreFormat::Hash => sink.get_hash(key).await,
        _ => sink.get_raw(key).await,
    };
    let bytes = match read {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            eprintln!("edgecache: key not found");
            return ExitCode::FAILURE;
        }
        Err(SinkError::Refused { code, .. }) if code == "WRONGTYPE" => {
            eprintln!(
                "edgecache: the value is not valid {} data: the key holds another Redis type",
                topic.store
            );
            return ExitCode::from(EXIT_BAD_STORED);
        }
        Err(e) => {
            eprintln!("edgecache: {e}");
            return ExitCode::from(EXIT_REDIS_UNREACHABLE);
        }
    };
    // The table is read after the value: names are written no later than
    // the values that use them.
    let fields = match topic.store {
        StoreFormat::Postcard => match sink.fields().await {
            Ok(fields) => fields,
            Err(e) => {
                eprintln!("edgecache: {e}");
                return ExitCode::from(EXIT_REDIS_UNREACHABLE);
            }
        },
        _ => codec::Fields::new(),
    };
    match codec::stored_to_json(topic.store, &bytes, &fields) {
        Ok((value, ts_ms)) => {
            let shown = if meta {
                serde_json::json!({
                    "key": String::from_utf8_lossy(key),
                    "format": topic.store.to_string(),
                    "ts_ms": ts_ms,
                    "value": value,
                })
            } else {
                value
            };
            println!("{shown}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "edgecache: the value is not valid {} data: {e}",
                topic.store
            );
            ExitCode::from(EXIT_BAD_STORED)
        }
    }
}

/// How old the status hash's heartbeat (`updated_ms`, written every
/// second by a running agent) may be before `status` stops trusting it.
const STALE_AFTER_MS: i64 = 5_000;

/// The agent's runtime file (`$RUNTIME_DIRECTORY/status.json`, by default
/// the unit's `/run/edgecache`), if it is there and of this namespace.
fn runtime_status(namespace: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/run/edgecache"));
    let text = std::fs::read_to_string(dir.join(crate::sink::RUNTIME_STATUS_FILE)).ok()?;
    let serde_json::Value::Object(map) = serde_json::from_str(&text).ok()? else {
        return None;
    };
    (map.get("namespace").and_then(|v| v.as_str()) == Some(namespace)).then_some(map)
}

async fn status(settings: &Settings, json: bool) -> ExitCode {
    let mut sink = match sink_for(settings) {
        Ok(sink) => sink,
        Err(code) => return code,
    };
    let now = crate::sink::now_ms();
    let runtime = runtime_status(&settings.redis.namespace).filter(|r| {
        r.get("updated_ms")
            .and_then(|v| v.as_i64())
            .is_some_and(|ms| now - ms < STALE_AFTER_MS)
    });
    let (mut fields, code) = match sink.status().await {
        // No hash, and Redis refuses writes (a replica that synced from an
        // empty primary, say): that refusal is the news, reported below.
        Ok(fields)
            if fields.is_empty() && runtime.is_none() && sink.write_refusal().await.is_none() =>
        {
            eprintln!("edgecache: no status in Redis (agent never ran against this Redis?)");
            return ExitCode::FAILURE;
        }
        Ok(fields) => (
            fields
                .into_iter()
                .collect::<std::collections::BTreeMap<String, String>>(),
            ExitCode::SUCCESS,
        ),
        Err(e) if runtime.is_some() => {
            eprintln!("edgecache: {e}");
            (Default::default(), ExitCode::from(EXIT_REDIS_UNREACHABLE))
        }
        Err(e) => {
            eprintln!("edgecache: {e}");
            return ExitCode::from(EXIT_REDIS_UNREACHABLE);
        }
    };
    // The hash says what the agent last managed to write. A running agent
    // writes it every second; when it has not, the hash is not the truth:
    // the agent stopped, or Redis refuses its writes.
    let updated = fields.get("updated_ms").and_then(|v| v.parse::<i64>().ok());
    let stale = fields.get("state").map(String::as_str) != Some("stopped")
        && updated.is_none_or(|ms| now - ms >= STALE_AFTER_MS);
    if let Some(runtime) = &runtime {
        for key in [
            "state",
            "redis_error",
            "redis_error_message",
            "redis_error_since_ms",
        ] {
            match runtime.get(key) {
                Some(serde_json::Value::String(v)) if v.is_empty() => {
                    fields.remove(key);
                }
                Some(serde_json::Value::String(v)) => {
                    fields.insert(key.to_owned(), v.clone());
                }
                Some(serde_json::Value::Number(n)) if n.as_i64() != Some(0) => {
                    fields.insert(key.to_owned(), n.to_string());
                }
                _ => {}
            }
        }
    } else if stale {
        let age_s = updated.map(|ms| (now - ms) / 1000);
        match sink.write_refusal().await {
            Some(reason) => {
                fields.insert("state".into(), "redis-unreachable".into());
                let code = reason.split(' ').next().unwrap_or("ERR").to_owned();
                fields.insert("redis_error".into(), code);
                fields.insert("redis_error_message".into(), reason);
            }
            None => {
                fields.insert("state".into(), "unknown".into());
                fields.insert(
                    "redis_error_message".into(),
                    "the agent has not updated its status: stopped, or not running".into(),
                );
            }
        }
        if let Some(age_s) = age_s {
            fields.insert("stale_s".into(), age_s.to_string());
        }
    }
    if json {
        // Numbers as numbers, so scripts need no parsing.
        let map: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .map(|(k, v)| {
                let value = v
                    .parse::<i64>()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::String(v));
                (k, value)
            })
            .collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        print!("{}", human_status(&fields, now));
    }
    code
}

/// The status hash as a short summary with ages instead of timestamps.
fn human_status(fields: &std::collections::BTreeMap<String, String>, now_ms: i64) -> String {
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("0");
    let age = |k: &str| match fields.get(k).and_then(|v| v.parse::<i64>().ok()) {
        Some(ms) => format!("{:.0} s ago", ((now_ms - ms).max(0) as f64) / 1000.0),
        None => "never".to_owned(),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "state         {} (since {})\n",
        fields.get("state").map(String::as_str).unwrap_or("unknown"),
        age("state_since_ms")
    ));
    if let Some(reason) = fields.get("redis_error") {
        out.push_str(&format!(
            "redis error   {reason} (since {}): {}\n",
            age("redis_error_since_ms"),
            fields
                .get("redis_error_message")
                .map(String::as_str)
                .unwrap_or("")
        ));
    } else if let Some(message) = fields.get("redis_error_message") {
        out.push_str(&format!("note          {message}\n"));
    }
    if let Some(stale) = fields.get("stale_s") {
        out.push_str(&format!(
            "status hash   not updated for {stale} s (the fields below are as last written)\n"
        ));
    }
    if let Some(topics) = fields.get("waiting_for_topics").filter(|t| !t.is_empty()) {
        out.push_str(&format!("waiting for   topics {topics} (not in Kafka)\n"));
    }
    out.push_str(&format!("lag           {} records\n", get("lag")));
    // Per-partition fields are `lag.<topic>/<partition>`; show the behind ones.
    let behind: Vec<String> = fields
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("lag.")?, v)))
        .filter(|(_, v)| v.as_str() != "0")
        .map(|(partition, v)| format!("{partition}: {v}"))
        .collect();
    if !behind.is_empty() {
        const SHOWN: usize = 8;
        let more = behind.len().saturating_sub(SHOWN);
        let mut line = behind[..behind.len().min(SHOWN)].join(", ");
        if more > 0 {
            line.push_str(&format!(", {more} more"));
        }
        out.push_str(&format!("  behind      {line}\n"));
    }
    for (field, offset) in fields.iter().filter(|(k, _)| k.starts_with("stuck.")) {
        out.push_str(&format!(
            "  stuck       {} at offset {offset}: its record batch is larger than the agent may receive (raise agent.memory_budget_mib)\n",
            &field["stuck.".len()..]
        ));
    }
    out.push_str(&format!("last applied  {}\n", age("last_applied_ms")));
    out.push_str(&format!("kafka contact {}\n", age("last_kafka_contact_ms")));
    out.push_str(&format!(
        "caught up     {} (every partition read to its end); resyncs removed {} stale keys\n",
        age("caught_up_ms"),
        get("swept")
    ));
    out.push_str(&format!(
        "records       {} applied, {} filtered; skipped: {} undecodable, {} without key, {} oversize\n",
        get("records"),
        get("filtered"),
        get("skipped_undecodable"),
        get("skipped_no_key"),
        get("skipped_oversize")
    ));
    out.push_str(&format!(
        "version       {}\n",
        fields
            .get("version")
            .map(String::as_str)
            .unwrap_or("unknown")
    ));
    out
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels per target as README documents them; anything else falls
    /// back to `info` everywhere, with the reason.
    #[test]
    fn log_filters_are_levels_per_target() {
        use tracing::Level;
        let (filter, invalid) = log_filter("info,librdkafka=debug");
        assert!(invalid.is_none());
        assert!(filter.would_enable("librdkafka", &Level::DEBUG));
        assert!(!filter.would_enable("edgecache::pipeline", &Level::DEBUG));
        assert!(filter.would_enable("edgecache::pipeline", &Level::INFO));
        let (filter, invalid) = log_filter("warn");
        assert!(invalid.is_none());
        assert!(!filter.would_enable("edgecache", &Level::INFO));
        let (filter, invalid) = log_filter("a=b=c");
        assert!(invalid.is_some());
        assert!(filter.would_enable("edgecache", &Level::INFO));
        assert!(!filter.would_enable("edgecache", &Level::DEBUG));
    }

    #[test]
    fn human_status_shows_ages_and_counters() {
        let fields = [
            ("state", "live"),
            ("state_since_ms", "1000"),
            ("last_applied_ms", "9000"),
            ("records", "42"),
            ("skipped_no_key", "1"),
            ("lag", "5"),
            ("lag.t/0", "0"),
            ("lag.t/1", "5"),
            ("last_kafka_contact_ms", "10500"),
            ("caught_up_ms", "10000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let text = human_status(&fields, 11_000);
        assert!(text.contains("live (since 10 s ago)"), "{text}");
        assert!(text.contains("last applied  2 s ago"), "{text}");
        assert!(text.contains("kafka contact 0 s ago"), "{text}");
        assert!(text.contains("behind      t/1: 5\n"), "{text}");
        assert!(text.contains("caught up     1 s ago"), "{text}");
        assert!(text.contains("removed 0 stale keys"), "{text}");
        assert!(text.contains("42 applied, 0 filtered"), "{text}");
        assert!(text.contains("1 without key"), "{text}");
        assert!(text.contains("version       unknown"), "{text}");
    }
}
