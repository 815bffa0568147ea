//! `kafka.commit_group` against the real broker: the offsets applied to
//! Redis show up as the group's committed offsets (for fleet lag tools),
//! and they are never used for resume: a new, empty Redis is rebuilt from
//! the earliest offsets although the group sits at the log end.

mod util;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// A config for `redis` with `kafka.commit_group = group`.
fn config_with_group(dir: &Path, redis: &Redis, topic: &str, group: &str) -> PathBuf {
    let path = AgentConfig::new(redis.url(), topic, "device:").write(dir);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[redis]\n",
        &format!("commit_group = \"{group}\"\n[redis]\n"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// (partition, committed next offset, log end) for each partition, read
/// the way any Kafka tool reads a group's offsets.
fn group_offsets(group: &str, topic: &str, partitions: i32) -> Vec<(i32, Option<i64>, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer for reading the group's offsets");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| {
            let offset = match committed.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, offset, high)
        })
        .collect()
}

#[test]
fn commit_group_shows_applied_offsets_but_never_drives_resume() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("commit-group", 3, false, 0xc0ffee);
    let group = unique("edgecache-site");
    producer.random_states(&mut rng, 2000, 300);
    let config = config_with_group(dir.path(), &redis, &topic, &group);
    let mut agent = Agent::start(&config);
    converges(&redis, &producer);
    producer.random_states(&mut rng, 300, 300);
    converges(&redis, &producer);

    let mut offsets = Vec::new();
    wait_until(CONVERGE, "the group's offsets to reach the log end", || {
        offsets = group_offsets(&group, &topic, 3);
        offsets
            .iter()
            .all(|&(_, committed, end)| committed == Some(end))
    });
    let total: i64 = offsets.iter().map(|&(_, _, end)| end).sum();
    assert_eq!(total as u64, producer.n_sent, "{offsets:?}");
    // The committed offsets are the ones Redis holds.
    let stored = redis.hgetall("edgecache:offsets");
    for (p, committed, _) in &offsets {
        assert_eq!(
            stored[&format!("{topic}/{p}")],
            committed.unwrap().to_string()
        );
    }
    // Kafka's own tool shows the group's lag as 0 for every partition.
    let out = std::process::Command::new("bash")
        .args([
            "tests/services.sh",
            "kafka-tool",
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            &brokers(),
            "--describe",
            "--group",
            &group,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kafka-tool");
    let text = String::from_utf8_lossy(&out.stdout);
    let lag_rows: Vec<&str> = text.lines().filter(|l| l.contains(&topic)).collect();
    assert_eq!(
        lag_rows.len(),
        3,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in lag_rows {
        let columns: Vec<&str> = row.split_whitespace().collect();
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
        assert_eq!(columns[5], "0", "{row}");
    }
    agent.sigterm();

    // A new, empty Redis: the group sits at the log end, yet everything is
    // read again from the earliest offset.
    let fresh = Redis::start(false);
    let config = config_with_group(dir.path(), &fresh, &topic, &group);
    let _agent = Agent::start(&config);
    converges(&fresh, &producer);
    wait_until(CONVERGE, "every record applied again", || {
        fresh.status_counter("records") == producer.n_sent
    });
}
