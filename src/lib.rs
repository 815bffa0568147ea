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
//! - [`batch`]: the bounded coalescing batch (latest per key wins).
//! - [`checkpoint`]: where each partition resumes.
//! - [`pipeline`]: the loop tying them together.
//! - [`backoff`]: retry delays.
//! - [`notify`]: systemd readiness, watchdog and status (sd_notify).
//! - [`cli`]: the commands behind the binary.
//!
//! `source`, `sink`, `pipeline` and `cli` need the `agent` feature (on by
//! default); without it only the pure modules are built (fuzz/ uses that).

#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod backoff;
pub mod batch;
pub mod checkpoint;
#[cfg(feature = "agent")]
pub mod cli;
pub mod codec;
pub mod config;
pub mod notify;
#[cfg(feature = "agent")]
pub mod pipeline;
#[cfg(feature = "agent")]
pub mod sink;
#[cfg(feature = "agent")]
pub mod source;
