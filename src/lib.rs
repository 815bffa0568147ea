//! edgecache mirrors Kafka compacted topics into a local Redis.
//!
//! Modules, each owning one outside thing or one rule:
//! - [`config`]: the TOML file, validated into [`config::Settings`]; the
//!   memory budget and everything derived from it.
//! - [`source`]: Kafka (the only module importing `rdkafka`): manual
//!   assignment, positions, watermarks.
//! - [`sink`]: Redis (the only module importing `redis`): the atomic apply
//!   script, the marker, offsets and status keys.
//! - [`codec`]: input decoding and the stored formats (FORMAT.md).
//! - [`functions`]: the Redis Functions library that reads any key as JSON.
//! - [`batch`]: the bounded coalescing batch (latest per key wins).
//! - [`checkpoint`]: where each partition resumes.
//! - [`resync`]: missed deletes, and the resync that removes their keys.
//! - [`pipeline`]: the loop tying them together.
//! - [`metrics`]: counters and the optional Prometheus endpoint.
//! - [`backoff`]: retry delays.
//! - [`notify`]: systemd readiness, watchdog and status (sd_notify).
//! - [`priority`]: the agent's CPU niceness, lower while catching up.
//! - [`cli`]: the commands behind the binary.
//!
//! `source`, `sink`, `pipeline`, `priority`, `metrics` and `cli` need the `agent` feature (on by
//! default); without it only the pure modules are built (fuzz/ uses that).

// Two exceptions, allowed where they are: `source::Source::fetched_watermarks`,
// a read-only librdkafka call that rust-rdkafka does not wrap, and
// `priority`'s getpriority/setpriority calls.
#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod backoff;
pub mod batch;
pub mod checkpoint;
#[cfg(feature = "agent")]
pub mod cli;
pub mod codec;
pub mod config;
pub mod functions;
#[cfg(feature = "agent")]
pub mod metrics;
pub mod notify;
#[cfg(feature = "agent")]
pub mod pipeline;
#[cfg(feature = "agent")]
pub mod priority;
pub mod resync;
#[cfg(feature = "agent")]
pub mod sink;
#[cfg(feature = "agent")]
pub mod source;
