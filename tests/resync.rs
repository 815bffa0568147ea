//! Missed tombstones (design.md §5, issue #3 item 4): a gateway that was
//! away longer than a topic's `delete.retention.ms` may never see some
//! deletes, because the broker's cleaner removed the tombstones (and the
//! records they deleted) meanwhile. The agent must notice and resync: read
//! the topic again from the earliest offset without writing old values back,
//! then remove the keys that were not seen again.
//!
//! These tests run the real broker's log cleaner on topics with tiny
//! segment and retention settings, so the gap really happens.

mod util;

use edgecache::codec::StoreFormat;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use util::*;

const CONVERGE: Duration = Duration::from_secs(90);

/// Topic settings that let the cleaner drop tombstones within seconds:
/// segments roll every 200 ms (when a record arrives), any dirty segment is
/// cleanable at once, and tombstones are kept for 1 s only.
const FAST_CLEANING: [(&str, &str); 5] = [
    ("cleanup.policy", "compact"),
    ("segment.ms", "200"),
    ("delete.retention.ms", "1000"),
    ("min.cleanable.dirty.ratio", "0.01"),
    ("min.compaction.lag.ms", "0"),
];

/// Produces filler records (which roll segments and keep the log dirty)
/// until the log holds no record of any of `gone`, so the broker's cleaner
/// has removed both their values and their tombstones.
fn wait_until_cleaned(producer: &mut TestProducer, topic: &str, gone: &[String]) -> Duration {
    let started = Instant::now();
    let mut n = 0;
    loop {
        let records = log_records(topic);
        let left = gone
            .iter()
            .filter(|k| records.iter().any(|(_, _, key)| key == k.as_bytes()))
            .count();
        if left == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the broker's cleaner kept {left} of {} deleted keys for 120 s",
            gone.len()
        );
        for _ in 0..4 {
            producer.put(
                &format!("filler-{}", n % 8),
                Some(&format!("{{\"n\":{n}}}")),
            );
            n += 1;
        }
        producer.flush();
        std::thread::sleep(Duration::from_millis(400));
    }
}

fn foreign_keys(redis: &Redis) -> Vec<(String, String)> {
    let mut conn = redis.conn();
    let mut foreign = Vec::new();
    for i in 0..50 {
        let key = if i % 2 == 0 {
            format!("app:{i}")
        } else {
            format!("devic:{i}")
        };
        let value = format!("v{i}");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query(&mut conn)
            .unwrap();
        foreign.push((key, value));
    }
    foreign
}

fn assert_confined(redis: &Redis, foreign: &[(String, String)]) {
    let mut conn = redis.conn();
    for (key, value) in foreign {
        let got: Option<String> = redis::cmd("GET").arg(key).query(&mut conn).unwrap();
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "foreign key {key} changed"
        );
    }
    let all: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    for key in all {
        assert!(
            foreign.iter().any(|(k, _)| *k == key)
                || key.starts_with("device:")
                || [
                    "edgecache:offsets",
                    "edgecache:marker",
                    "edgecache:status",
                    "edgecache:fields",
                ]
                .contains(&key.as_str()),
            "the agent left or wrote a key outside its prefix and namespace: {key}"
        );
    }
}

#[test]
fn missed_tombstones_are_resynced() {
    missed_tombstones(StoreFormat::Postcard);
}

/// The same with `store = "hash"`: the sweep deletes hashes like strings.
#[test]
fn missed_tombstones_are_resynced_in_the_hash_store() {
    missed_tombstones(StoreFormat::Hash);
}

fn missed_tombstones(store: StoreFormat) {
    let topic = unique("missed-tombstones");
    create_topic_configs(&topic, 2, &FAST_CLEANING);
    let redis = Redis::start(true);
    let foreign = foreign_keys(&redis);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.topics[0].3 = match store {
        StoreFormat::Hash => "hash",
        _ => "postcard",
    };
    let config = config.write(dir.path());
    let mut producer = TestProducer::new(&topic);
    for i in 0..40 {
        producer.put(&format!("sensor-{i}"), Some(&format!("{{\"v\":{i}}}")));
    }
    producer.flush();

    let mut agent = Agent::start(&config);
    assert_converges(&redis, "device:", store, &producer, CONVERGE);
    agent.sigterm();
    let stopped = Instant::now();
    let records_before = redis.status_counter("records");

    // While the agent is away: delete ten keys, update ten, and wait until
    // the cleaner has removed every trace of the deleted ones.
    let gone: Vec<String> = (0..10).map(|i| format!("sensor-{i}")).collect();
    for key in &gone {
        producer.put(key, None);
    }
    for i in 10..20 {
        producer.put(
            &format!("sensor-{i}"),
            Some(&format!("{{\"v\":{}}}", i * 100)),
        );
    }
    producer.flush();
    let took = wait_until_cleaned(&mut producer, &topic, &gone);
    eprintln!("the cleaner removed the tombstones after {took:?}");
    // The gap is real: the stale keys are still in Redis, and nothing left
    // in Kafka says they were deleted.
    let mut conn = redis.conn();
    for key in &gone {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("device:{key}"))
            .query(&mut conn)
            .unwrap();
        assert!(exists, "{key} should still be in Redis before the restart");
    }

    // Away long enough to count as a gap (the agent ignores gaps under 10 s).
    std::thread::sleep(Duration::from_secs(11).saturating_sub(stopped.elapsed()));
    let stored = stored_offsets(&redis, &topic);
    let unread = log_records(&topic)
        .iter()
        .filter(|(p, offset, _)| *offset >= stored[p])
        .count() as u64;

    let agent = Agent::start(&config);
    assert_converges(&redis, "device:", store, &producer, CONVERGE);
    wait_until(CONVERGE, "the resync to finish", || {
        redis.state().as_deref() == Some("live")
    });
    let log = agent.log_text();
    assert!(
        log.contains("resync done"),
        "no resync in the agent's log:\n{log}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("resync") || l.contains("missed"))
    {
        eprintln!("agent: {line}");
    }
    assert!(
        redis.status_counter("swept") >= gone.len() as u64,
        "swept counter {} < {}",
        redis.status_counter("swept"),
        gone.len()
    );
    // The resync re-read old records without applying them again: only
    // records at or past the stored offsets count as applied.
    let applied_after = redis.status_counter("records") - records_before;
    assert!(
        applied_after <= unread,
        "{applied_after} records applied after the restart; only {unread} were unread"
    );
    // One resync, then live: a resync does not trigger another.
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log_text();
    assert_eq!(log.matches("resync done").count(), 1, "agent log:\n{log}");
    assert_eq!(redis.state().as_deref(), Some("live"));
    assert_confined(&redis, &foreign);
    let status: BTreeMap<String, String> = redis.hgetall("edgecache:status");
    assert!(status.contains_key("caught_up_ms"), "status: {status:?}");
}

/// Records deleted unread (DeleteRecords, or retention on a
/// `compact,delete` topic) move the log start past the stored offset. The
/// agent resyncs, so Redis ends up holding exactly what Kafka still has.
#[test]
fn stored_offset_below_log_start_resyncs() {
    let topic = unique("below-log-start");
    // DeleteRecords needs the delete policy. Kafka's default
    // delete.retention.ms (24 h): only the log start can trigger this resync.
    create_topic_with(&topic, 1, "compact,delete");
    let redis = Redis::start(false);
    let foreign = foreign_keys(&redis);
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    let mut producer = TestProducer::new(&topic);
    for i in 0..20 {
        producer.put(&format!("old-{i}"), Some(&format!("{{\"v\":{i}}}")));
    }
    producer.flush();
    let mut agent = Agent::start(&config);
    converges(&redis, &producer);
    agent.sigterm();

    // While the agent is away: a delete and updates, then every record so
    // far is deleted from the log, then new keys arrive.
    producer.put("old-0", None);
    for i in 1..5 {
        producer.put(&format!("old-{i}"), Some("{\"v\":-1}"));
    }
    producer.flush();
    let end = log_records(&topic).last().unwrap().1 + 1;
    delete_records(&topic, &[(0, end)]);
    let mut kept = producer.n_sent;
    for i in 0..3 {
        producer.put(&format!("new-{i}"), Some(&format!("{{\"v\":{i}}}")));
    }
    producer.flush();
    kept = producer.n_sent - kept;

    let agent = Agent::start(&config);
    wait_until(CONVERGE, "the resync after the log start moved", || {
        agent.log_text().contains("resync done")
    });
    let keys: Vec<Vec<u8>> = redis.dump("device:").into_keys().collect();
    let expected: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("device:new-{i}").into_bytes())
        .collect();
    assert_eq!(
        keys,
        expected,
        "Redis must hold exactly the keys Kafka still has; agent log:\n{}",
        agent.log_text()
    );
    assert_eq!(redis.status_counter("swept"), 20);
    assert_eq!(stored_offsets(&redis, &topic)[&0], end + kept as i64);
    assert_confined(&redis, &foreign);
    let log = agent.log_text();
    assert!(log.contains("below the log start"), "agent log:\n{log}");
}
