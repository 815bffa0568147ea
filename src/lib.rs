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

// Three exceptions, allowed where they are: `source::Source::fetched_watermarks`,
// a read-only librdkafka call that rust-rdkafka does not wrap; `source`'s
// `topic_ids` module, librdkafka's DescribeTopics (topic IDs), which it does
// not wrap either; and `priority`'s getpriority/setpriority calls.
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

/// ARCHITECTURE.md's invariants and code map, and GUARANTEES.md's test
/// files, checked against the tree so they cannot drift.
#[cfg(test)]
mod architecture {
    use std::path::Path;

    const ROOT: &str = env!("CARGO_MANIFEST_DIR");

    /// The `.rs` files under `dir`, module folders (`src/codec/`) included.
    fn rust_files(dir: &str) -> Vec<(String, String)> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(Path::new(ROOT).join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = format!("{dir}/{}", path.file_name().unwrap().to_str().unwrap());
            if dir == "src" && path.is_dir() {
                files.extend(rust_files(&name));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
        files.sort();
        files
    }

    fn doc(name: &str) -> String {
        std::fs::read_to_string(Path::new(ROOT).join(name)).unwrap()
    }

    #[test]
    fn only_source_imports_rdkafka_and_only_sink_imports_redis() {
        for (name, text) in rust_files("src") {
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            // Built here so this file does not match itself.
            let (kafka, redis) = (format!("{}::", "rdkafka"), format!("{}::", "redis"));
            if name != "src/source.rs" {
                assert!(!code.contains(&kafka), "{name} uses rdkafka");
            }
            if name != "src/sink.rs" {
                assert!(!code.contains(&redis), "{name} uses redis");
            }
        }
    }

    #[test]
    fn the_code_map_names_every_source_and_test_file() {
        let map = doc("ARCHITECTURE.md");
        for (name, _) in rust_files("src").into_iter().chain(rust_files("tests")) {
            assert!(
                map.contains(&format!("`{name}`")),
                "ARCHITECTURE.md's code map lacks `{name}`"
            );
        }
    }

    #[test]
    fn every_file_guarantees_md_names_exists() {
        let guarantees = doc("GUARANTEES.md");
        let (mut tests, mut modules) = (0, 0);
        for word in guarantees.split('`') {
            let test = word.starts_with("tests/");
            if (test || word.starts_with("src/")) && word.ends_with(".rs") {
                if test {
                    tests += 1;
                } else {
                    modules += 1;
                }
                assert!(Path::new(ROOT).join(word).exists(), "{word} does not exist");
            }
        }
        assert!(tests > 5, "GUARANTEES.md names its tests");
        assert!(
            modules > 5,
            "GUARANTEES.md names the modules that keep them"
        );
    }
}
