//! Kafka or Redis changing under the agent, against the real broker and real
//! redis-servers: a topic deleted and recreated (while the agent is stopped
//! and while it runs), Redis restored from an older RDB snapshot, Redis
//! refusing writes (OOM), an evicting `maxmemory-policy`, a topic that does
//! not exist yet. Each ends with the whole keyspace compared with the oracle
//! of the topic as it is now, and checks what the status said meanwhile.

mod util;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use util::*;

const CONVERGE: Duration = Duration::from_secs(90);

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

/// Deletes the topic with the broker's DeleteTopics, then creates it again
/// with CreateTopics (retried while the broker still finishes the delete).
fn recreate_topic(topic: &str, partitions: i32) {
    let results = block_on(admin().delete_topics(&[topic], &AdminOptions::new()))
        .expect("delete_topics request");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("deleting topic {t}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let created = std::panic::catch_unwind(|| create_topic(topic, partitions));
        if created.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "could not create {topic} again within 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `edgecache status --json` for a config, as a JSON object.
fn status_json(config: &std::path::Path) -> serde_json::Value {
    let (code, out, err) = run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert!(code == 0 || code == 3, "status exited {code}: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status output {out:?}: {e}"))
}

/// Waits until `edgecache status --json` reports `redis-unreachable` with
/// this Redis error code; returns what it said.
fn wait_for_redis_error(
    config: &std::path::Path,
    code: &str,
    within: Duration,
) -> serde_json::Value {
    let mut seen = serde_json::Value::Null;
    wait_until(
        within,
        &format!("edgecache status to report {code}"),
        || {
            seen = status_json(config);
            seen["state"] == "redis-unreachable" && seen["redis_error"] == code
        },
    );
    seen
}

/// Old-lineage records on keys k0..k99, mirrored; then the topic is deleted
/// and recreated with fewer records (so the stored offsets lie past the new
/// log end) on keys k50..k79 only.
fn old_and_new_lineage(topic: &str, producer: &mut TestProducer, rng: &mut Rng) {
    for i in 0..400u64 {
        let key = format!("k{}", rng.below(100));
        producer.put(&key, Some(&format!("{{\"old\":{i}}}")));
    }
    producer.flush();
    let _ = topic;
}

fn new_lineage_records(topic: &str, rng: &mut Rng) -> TestProducer {
    let mut producer = TestProducer::new(topic);
    for i in 0..60u64 {
        let key = format!("k{}", 50 + rng.below(30));
        producer.put(&key, Some(&format!("{{\"new\":{i}}}")));
    }
    producer.flush();
    producer
}

#[test]
fn topic_recreated_while_the_agent_is_stopped() {
    let mut s = Setup::new("lineage-stopped", 2, false, 11);
    old_and_new_lineage(&s.topic, &mut s.producer, &mut s.rng);
    let config = AgentConfig::new(s.redis.url(), &s.topic, "device:").write(s.dir.path());
    let mut agent = Agent::start(&config);
    converges(&s.redis, &s.producer);
    agent.sigterm();
    let old_keys = s.redis.dump("device:").len();

    recreate_topic(&s.topic, 2);
    let producer = new_lineage_records(&s.topic, &mut s.rng);
    let mut agent = Agent::start(&config);
    converges(&s.redis, &producer);
    assert!(
        old_keys > producer.last.len(),
        "the old lineage must have keys the new one lacks"
    );
    wait_until(CONVERGE, "state live after the lineage resync", || {
        s.redis.state().as_deref() == Some("live")
    });
    assert!(s.redis.status_counter("lineage_resyncs") >= 1);
    // The stored offsets are the new log's.
    for (p, next) in stored_offsets(&s.redis, &s.topic) {
        let end = log_records(&s.topic)
            .iter()
            .filter(|r| r.0 == p)
            .map(|r| r.1 + 1)
            .max()
            .unwrap_or(0);
        assert_eq!(next, end, "partition {p}");
    }
    // Told by the topic ID, or by the log ending below the stored offsets,
    // whichever the agent saw first.
    let log = agent.log_text();
    assert!(
        log.contains("the topic's ID changed") || log.contains("recreated or truncated"),
        "{log}"
    );
    agent.sigterm();
}

#[test]
fn topic_recreated_while_the_agent_runs() {
    let mut s = Setup::new("lineage-running", 2, false, 12);
    old_and_new_lineage(&s.topic, &mut s.producer, &mut s.rng);
    let config = AgentConfig::new(s.redis.url(), &s.topic, "device:").write(s.dir.path());
    let agent = Agent::start(&config);
    converges(&s.redis, &s.producer);

    recreate_topic(&s.topic, 2);
    let producer = new_lineage_records(&s.topic, &mut s.rng);
    converges(&s.redis, &producer);
    wait_until(CONVERGE, "state live after the lineage resync", || {
        s.redis.state().as_deref() == Some("live")
    });
    assert!(s.redis.status_counter("lineage_resyncs") >= 1);
    // Live updates keep flowing on the new lineage.
    let mut producer = producer;
    producer.put("k60", Some("{\"after\":1}"));
    producer.flush();
    converges(&s.redis, &producer);
    drop(agent);
}

/// Redis with RDB snapshots only crashes and comes back as of its last
/// snapshot, marker intact: the agent notices (apply sequence), resumes
/// from the snapshot's offsets, and the keys written after the snapshot
/// come back.
#[test]
fn redis_restored_from_an_older_snapshot() {
    let topic = unique("lineage-rdb");
    create_topic(&topic, 3);
    let redis = Redis::start_with(false, &["--save", ""]);
    let dir = tempfile::tempdir().unwrap();
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(13);
    producer.random_states(&mut rng, 1_000, 200);
    producer.flush();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = "memory_budget_mib = 4".into();
    let config = config.write(dir.path());
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    let _: () = redis::cmd("SAVE").query(&mut redis.conn()).unwrap();
    let seq_at_snapshot = redis.hgetall("edgecache:offsets")["seq"].clone();
    // Keys changed and added after the snapshot.
    producer.random_states(&mut rng, 1_000, 400);
    producer.flush();
    converges(&redis, &producer);

    let mut redis = redis;
    redis.restart();
    assert_eq!(
        redis.hgetall("edgecache:offsets")["seq"],
        seq_at_snapshot,
        "Redis must come back as of the snapshot"
    );
    converges(&redis, &producer);
    wait_until(CONVERGE, "the divergence to be counted", || {
        redis.status_counter("redis_divergences") >= 1
    });
    let log = agent.log_text();
    assert!(log.contains("Redis changed under the agent"), "{log}");
    drop(agent);
}

/// Redis at maxmemory without eviction refuses the agent's writes: the
/// status says so (state and reason) within seconds although the status
/// hash cannot be written, and once memory is raised everything converges.
#[test]
fn redis_refusing_writes_shows_in_status_and_heals() {
    let mut s = Setup::new("lineage-oom", 2, false, 14);
    let redis = Redis::start_with(false, &["--maxmemory-policy", "noeviction"]);
    let config = AgentConfig::new(redis.url(), &s.topic, "device:").write(s.dir.path());
    let agent = Agent::start(&config);
    s.producer.put("k0", Some("{\"v\":0}"));
    s.producer.flush();
    converges(&redis, &s.producer);
    wait_until(CONVERGE, "live", || {
        redis.state().as_deref() == Some("live")
    });
    // Just above what Redis uses now: the next writes are refused.
    let used: u64 = {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut redis.conn())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 2_000)
        .query(&mut redis.conn())
        .unwrap();
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(50_000));
    for i in 0..20 {
        s.producer.put(&format!("big{i}"), Some(&big));
    }
    s.producer.flush();
    let started = Instant::now();
    let seen = wait_for_redis_error(&config, "OOM", Duration::from_secs(30));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}: {seen}",
        started.elapsed()
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query(&mut redis.conn())
        .unwrap();
    converges(&redis, &s.producer);
    wait_until(CONVERGE, "live without an error", || {
        let status = redis.hgetall("edgecache:status");
        status.get("state").map(String::as_str) == Some("live")
            && !status.contains_key("redis_error")
    });
    let status = status_json(&config);
    assert_eq!(status["state"], "live", "{status}");
    // Each record counted once, however often the batch was retried.
    assert_eq!(redis.status_counter("records"), s.producer.n_sent);
    drop(agent);
}

/// An evicting maxmemory-policy: the agent refuses to start (exit 78,
/// naming the setting) unless the configuration accepts it.
#[test]
fn an_evicting_redis_is_refused_unless_accepted() {
    let s = Setup::new("lineage-evict", 1, false, 15);
    let redis = Redis::start_with(false, &["--maxmemory-policy", "allkeys-lru"]);
    let config = AgentConfig::new(redis.url(), &s.topic, "device:").write(s.dir.path());
    let mut agent = Agent::start(&config);
    wait_until(Duration::from_secs(20), "the agent to exit", || {
        !agent.is_running()
    });
    let (status, _) = agent.sigterm();
    assert_eq!(status.code(), Some(78), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("maxmemory-policy is allkeys-lru") && log.contains("allow_eviction"),
        "{log}"
    );
    let n_keys: u64 = redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap();
    assert_eq!(
        n_keys, 0,
        "nothing is written when refusing (not even the marker)"
    );

    let mut accepting = AgentConfig::new(redis.url(), &s.topic, "device:");
    accepting.extra_redis = "allow_eviction = true\n".into();
    let config = accepting.write(s.dir.path());
    let mut producer = s.producer;
    producer.put("k1", Some("{\"v\":1}"));
    producer.flush();
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    drop(agent);
}

/// A configured topic that does not exist yet: state `waiting-for-topic`
/// (not `rehydrating` for ever), then mirrored once it is created.
#[test]
fn a_missing_topic_is_waited_for() {
    let topic = unique("lineage-missing");
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = "memory_budget_mib = 4".into();
    let config = config.write(dir.path());
    let agent = Agent::start(&config);
    wait_until(Duration::from_secs(15), "state waiting-for-topic", || {
        redis.state().as_deref() == Some("waiting-for-topic")
    });
    let status = status_json(&config);
    assert_eq!(status["state"], "waiting-for-topic", "{status}");
    create_topic(&topic, 2);
    let mut producer = TestProducer::new(&topic);
    producer.put("k1", Some("{\"v\":1}"));
    producer.flush();
    converges(&redis, &producer);
    wait_until(CONVERGE, "live once the topic exists", || {
        redis.state().as_deref() == Some("live")
    });
    drop(agent);
}

/// A record batch larger than the agent may receive (`receive.message.max.bytes`,
/// derived from the memory budget) stops only its own partition: another
/// partition of the same topic and another topic on the same broker keep
/// flowing, and the status shows the stuck partition, its offset and its
/// true lag.
#[test]
fn an_oversized_record_stops_only_its_partition() {
    let big_topic = unique("lineage-big");
    let other_topic = unique("lineage-other");
    create_topic_configs(
        &big_topic,
        2,
        &[
            ("cleanup.policy", "compact"),
            ("max.message.bytes", "6000000"),
        ],
    );
    create_topic(&other_topic, 1);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &big_topic, "a:");
    // The smallest budget: a response may be at most 4 MiB (the floor for
    // zstd batches; the value cap, 1 MiB, plus 64 KiB is less).
    config.extra_agent = "memory_budget_mib = 4".into();
    config
        .topics
        .push((other_topic.clone(), "b:".into(), "json", "postcard"));
    let config = config.write(dir.path());
    let mut big = TestProducer::with(&brokers(), &big_topic, &[("message.max.bytes", "6000000")]);
    let mut other = TestProducer::new(&other_topic);
    big.send_to(Some(b"k0"), Some(b"{\"v\":0}"), Some(0));
    big.flush();
    let giant = format!("{{\"blob\":\"{}\"}}", "x".repeat(4_500_000));
    big.send_to(Some(b"k1"), Some(giant.as_bytes()), Some(0));
    big.flush();
    big.send_to(Some(b"k2"), Some(b"{\"v\":2}"), Some(0));
    for i in 0..50 {
        big.send_to(
            Some(format!("p1-{i}").as_bytes()),
            Some(b"{\"v\":1}"),
            Some(1),
        );
    }
    big.flush();
    let agent = Agent::start_with_env(&config, &[]);
    for i in 0..50 {
        other.put(&format!("o{i}"), Some("{\"v\":1}"));
    }
    other.flush();
    wait_until(
        Duration::from_secs(90),
        "the other topic and partition to be mirrored",
        || redis.dump("b:").len() == 50 && redis.dump("a:p1-").len() == 50,
    );
    // k0 came before the giant record; k2 after it, so it cannot be there.
    assert!(redis.dump("a:k0").len() == 1);
    assert!(redis.dump("a:k2").is_empty());
    let field = format!("stuck.{big_topic}/0");
    wait_until(
        Duration::from_secs(30),
        "the stuck partition in the status",
        || {
            let status = redis.hgetall("edgecache:status");
            status.get(&field).map(String::as_str) == Some("1")
                && status
                    .get(&format!("lag.{big_topic}/0"))
                    .map(String::as_str)
                    == Some("2")
                && status.get("state").map(String::as_str) == Some("partition-stuck")
        },
    );
    // Live updates of the other topic still flow with the partition stuck.
    other.put("o-live", Some("{\"v\":2}"));
    other.flush();
    wait_until(
        Duration::from_secs(30),
        "a live update of the other topic",
        || redis.dump("b:o-live").len() == 1,
    );
    // Each refused response also drops librdkafka's connection, so for a
    // second or two at a time the state reads `kafka-unreachable` (true
    // then); the CLI must show the stuck partition once it is connected.
    let mut last = String::new();
    wait_until(
        Duration::from_secs(30),
        "`edgecache status` showing the stuck partition",
        || {
            let (code, out, err) = run_cli(&["status", "--config", config.to_str().unwrap()]);
            assert_eq!(code, 0, "{err}");
            last = out;
            last.contains("partition-stuck") && last.contains("at offset 1")
        },
    );
    assert!(last.contains("at offset 1"), "{last}");
    drop(agent);
}

/// zstd batches as a default librdkafka producer writes them (up to 1 MB
/// before compression, no content size in the frame) load. librdkafka
/// guesses a frame's decompressed size as 2x, 6x, 18x... the compressed one
/// and gives up past `receive.message.max.bytes`; when that was only the
/// fetch share or the value cap (1.06 MiB at this budget, 1.75 MiB at the
/// default), a batch whose guesses skipped the window failed with
/// BadCompression and was fetched again forever, the agent stuck in
/// `rehydrating` (found by the fleet benchmark's link mode, FLEET.md). The
/// smallest budget makes that window 6% wide: without the 4 MiB floor this
/// fails.
#[test]
fn zstd_batches_of_a_default_producer_load() {
    let topic = unique("lineage-zstd");
    create_topic_configs(&topic, 1, &[("cleanup.policy", "compact")]);
    let mut producer = TestProducer::with(
        &brokers(),
        &topic,
        &[
            ("compression.type", "zstd"),
            ("linger.ms", "200"),
            ("batch.size", "1000000"),
            ("batch.num.messages", "100000"),
        ],
    );
    // Device-state-like JSON: repetitive, so it compresses about 6-10x.
    for i in 0..12_000u32 {
        let value = format!(
            "{{\"device\":\"sensor-{i:05}\",\"site\":\"plant-{}\",\"status\":\"online\",\
             \"temperature\":{}.{},\"firmware\":\"2.4.{}\",\"seen\":{}}}",
            i % 7,
            18 + i % 9,
            i % 10,
            i % 4,
            1_700_000_000_000u64 + u64::from(i) * 997
        );
        producer.put(&format!("z{i}"), Some(&value));
    }
    // 12,000 records of ~150 bytes queued within the linger: about two
    // batches of 1 MB uncompressed.
    producer.flush();
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = "memory_budget_mib = 4".into();
    let config = config.write(dir.path());
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    assert!(
        !agent.log_text().contains("BadCompression"),
        "{}",
        agent.log_text()
    );
    drop(agent);
}

/// A real replica promotion: the replica stops following (REPLICAOF NO
/// ONE) while the primary takes more writes, then the primary dies and the
/// agent's Redis address (a unix socket path, as a failover would move it)
/// leads to the promoted, older replica. The agent notices, resumes from
/// the replica's offsets and converges there.
#[test]
fn a_stale_replica_promoted() {
    let topic = unique("lineage-replica");
    create_topic(&topic, 2);
    let mut primary = Redis::start(false);
    let replica = Redis::start_with(
        false,
        &["--replicaof", "127.0.0.1", &primary.port.to_string()],
    );
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("redis.sock");
    std::os::unix::fs::symlink(primary.dir.path().join("redis.sock"), &link).unwrap();
    let config = AgentConfig::new(format!("unix://{}", link.display()), &topic, "device:")
        .write(link_dir.path());
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(21);
    producer.random_states(&mut rng, 600, 150);
    producer.flush();
    let agent = Agent::start(&config);
    converges(&primary, &producer);
    // The replica has everything so far, then is promoted and stops following.
    // Polled rather than `WAIT 1 5000`: on a busy CI machine the replica's
    // first full sync can take longer than WAIT's timeout (seen in CI).
    let primary_offsets = primary.hgetall("edgecache:offsets");
    wait_until(CONVERGE, "the replica to sync", || {
        // LOADING while the replica takes in the primary's snapshot.
        redis::cmd("HGETALL")
            .arg("edgecache:offsets")
            .query::<BTreeMap<String, String>>(&mut replica.conn())
            .is_ok_and(|offsets| offsets == primary_offsets)
    });
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut replica.conn())
        .unwrap();
    let seq_on_replica = replica.hgetall("edgecache:offsets")["seq"].clone();
    producer.random_states(&mut rng, 600, 300);
    producer.flush();
    converges(&primary, &producer);
    assert_ne!(primary.hgetall("edgecache:offsets")["seq"], seq_on_replica);

    // Failover: the primary dies, its address now leads to the replica.
    primary.kill();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(replica.dir.path().join("redis.sock"), &link).unwrap();
    converges(&replica, &producer);
    wait_until(CONVERGE, "the divergence to be counted", || {
        replica.status_counter("redis_divergences") >= 1
    });
    wait_until(CONVERGE, "live on the promoted replica", || {
        replica.state().as_deref() == Some("live")
    });
    drop(agent);
}

/// A connection without the harness's PING, which Redis answers with
/// MISCONF too while it refuses writes.
fn raw(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Redis refusing writes with MISCONF (a failed RDB snapshot while
/// `stop-writes-on-bgsave-error` is on): `edgecache status` says so within
/// seconds although nothing can be written to the status hash, and the
/// agent converges once snapshots work again.
#[test]
fn misconf_shows_in_status_and_heals() {
    let s = Setup::new("lineage-misconf", 1, false, 22);
    let doomed = tempfile::tempdir().unwrap();
    let redis = Redis::start_with(
        false,
        &["--save", "3600 1", "--enable-protected-configs", "yes"],
    );
    let config = AgentConfig::new(redis.url(), &s.topic, "device:").write(s.dir.path());
    let mut producer = s.producer;
    producer.put("k0", Some("{\"v\":0}"));
    producer.flush();
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    // Snapshots go to a directory that then disappears: BGSAVE fails.
    let doomed_path = doomed.path().to_str().unwrap().to_owned();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("dir")
        .arg(&doomed_path)
        .query(&mut redis.conn())
        .unwrap();
    drop(doomed);
    let _: () = redis::cmd("BGSAVE").query(&mut raw(&redis)).unwrap();
    wait_until(Duration::from_secs(10), "the snapshot to fail", || {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query(&mut raw(&redis))
            .unwrap();
        info.contains("rdb_last_bgsave_status:err") && info.contains("rdb_bgsave_in_progress:0")
    });
    for i in 0..20 {
        producer.put(&format!("k{i}"), Some("{\"v\":1}"));
    }
    producer.flush();
    wait_for_redis_error(&config, "MISCONF", Duration::from_secs(15));
    // Snapshots work again: writes are taken, the batch goes in.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("dir")
        .arg(s.dir.path().to_str().unwrap())
        .query(&mut raw(&redis))
        .unwrap();
    let _: () = redis::cmd("BGSAVE").query(&mut raw(&redis)).unwrap();
    wait_until(Duration::from_secs(10), "a snapshot to succeed", || {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query(&mut raw(&redis))
            .unwrap();
        info.contains("rdb_last_bgsave_status:ok")
    });
    converges(&redis, &producer);
    wait_until(CONVERGE, "live without an error", || {
        let status = redis.hgetall("edgecache:status");
        status.get("state").map(String::as_str) == Some("live")
            && !status.contains_key("redis_error")
    });
    assert_eq!(redis.status_counter("records"), producer.n_sent);
    drop(agent);
}

/// A topic recreated with more records than before: its log end is not
/// below the stored offsets, so only Kafka's topic ID tells it is another
/// topic. Stopped agent, then restarted.
#[test]
fn topic_recreated_with_more_records_is_told_by_its_id() {
    let mut s = Setup::new("lineage-more", 1, false, 23);
    for i in 0..50u64 {
        s.producer.put(
            &format!("old{}", s.rng.below(40)),
            Some(&format!("{{\"old\":{i}}}")),
        );
    }
    s.producer.flush();
    let config = AgentConfig::new(s.redis.url(), &s.topic, "device:").write(s.dir.path());
    let mut agent = Agent::start(&config);
    converges(&s.redis, &s.producer);
    assert!(s
        .redis
        .hgetall("edgecache:status")
        .contains_key(&format!("topic_id.{}", s.topic)));
    agent.sigterm();

    recreate_topic(&s.topic, 1);
    let mut producer = TestProducer::new(&s.topic);
    for i in 0..200u64 {
        producer.put(
            &format!("new{}", s.rng.below(80)),
            Some(&format!("{{\"new\":{i}}}")),
        );
    }
    producer.flush();
    let agent = Agent::start(&config);
    converges(&s.redis, &producer);
    wait_until(CONVERGE, "live after the lineage resync", || {
        s.redis.state().as_deref() == Some("live")
    });
    assert!(s.redis.status_counter("lineage_resyncs") >= 1);
    let log = agent.log_text();
    assert!(log.contains("the topic's ID changed"), "{log}");
    drop(agent);
}

/// Redis demoted to a replica (REPLICAOF another, empty server): writes are
/// refused with READONLY and the agent's state is gone after the sync.
/// `edgecache status` says `redis-unreachable`, `READONLY`; once Redis is a
/// primary again the agent rebuilds everything.
#[test]
fn readonly_after_a_demotion_shows_in_status_and_heals() {
    let mut s = Setup::new("lineage-readonly", 2, false, 24);
    let other = Redis::start(false);
    let config = AgentConfig::new(s.redis.url(), &s.topic, "device:").write(s.dir.path());
    s.producer.random_states(&mut s.rng, 300, 60);
    s.producer.flush();
    let agent = Agent::start(&config);
    converges(&s.redis, &s.producer);
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(other.port)
        .query(&mut s.redis.conn())
        .unwrap();
    s.producer.random_states(&mut s.rng, 50, 60);
    s.producer.flush();
    wait_for_redis_error(&config, "READONLY", Duration::from_secs(20));
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut s.redis.conn())
        .unwrap();
    converges(&s.redis, &s.producer);
    wait_until(CONVERGE, "live without an error", || {
        let status = s.redis.hgetall("edgecache:status");
        status.get("state").map(String::as_str) == Some("live")
            && !status.contains_key("redis_error")
    });
    drop(agent);
}

/// A topic recreated with fewer partitions while the agent runs: the
/// partitions that no longer exist are dropped (they would never report a
/// watermark), the topic is rewritten and swept, and the agent goes live.
#[test]
fn topic_recreated_with_fewer_partitions() {
    let mut s = Setup::new("lineage-fewer", 3, false, 25);
    old_and_new_lineage(&s.topic, &mut s.producer, &mut s.rng);
    let mut config = AgentConfig::new(s.redis.url(), &s.topic, "device:");
    // Topic IDs are read this often; the default is 5 minutes.
    config.extra_agent = "partition_discovery_secs = 2".into();
    let config = config.write(s.dir.path());
    let agent = Agent::start(&config);
    converges(&s.redis, &s.producer);

    recreate_topic(&s.topic, 1);
    let producer = new_lineage_records(&s.topic, &mut s.rng);
    converges(&s.redis, &producer);
    wait_until(CONVERGE, "live on the recreated topic", || {
        s.redis.state().as_deref() == Some("live")
    });
    let status = s.redis.hgetall("edgecache:status");
    assert!(
        !status.contains_key(&format!("lag.{}/2", s.topic)),
        "the vanished partition's lag is still reported: {status:?}"
    );
    let log = agent.log_text();
    assert!(log.contains("partition no longer exists"), "{log}");
    drop(agent);
}
