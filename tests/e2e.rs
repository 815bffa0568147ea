//! End-to-end tests against a real Kafka broker and real redis-servers.
//! Each test has its own topic and its own Redis; the oracle is the last
//! record per key that the test produced, and the check is the whole
//! keyspace under the prefix (no missing, stale or extra key).

mod util;

use edgecache::codec::StoreFormat;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use util::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// Offsets the agent stored, summed over partitions: with one record per
/// offset (no compaction yet), this is the number of records it has read.
fn stored_offsets_sum(redis: &Redis, topic: &str) -> u64 {
    redis
        .hgetall("edgecache:offsets")
        .iter()
        .filter(|(field, _)| field.starts_with(&format!("{topic}/")))
        .map(|(_, v)| v.parse::<u64>().unwrap())
        .sum()
}

/// (a) Updates and tombstones on a 3-partition compacted topic converge,
/// first from a backlog, then live. A key set then deleted within one batch
/// ends deleted.
#[test]
fn a_updates_and_tombstones_converge() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("a-updates", 3, false, 0xa11ce);
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    producer.random_states(&mut rng, 3000, 200);
    // Same key set then deleted back to back: lands in one batch.
    producer.put("flip", Some(r#"{"x":1}"#));
    producer.put("flip", None);
    producer.flush();

    let _agent = Agent::start(&config);
    converges(&redis, &producer);
    assert!(!redis
        .dump("device:")
        .contains_key(b"device:flip".as_slice()));

    // Live: more records while the agent runs.
    producer.random_states(&mut rng, 500, 200);
    converges(&redis, &producer);
    wait_until(CONVERGE, "records counter to reach the total", || {
        redis.status_counter("records") == producer.n_sent
    });
    assert_eq!(stored_offsets_sum(&redis, &topic), producer.n_sent);
    wait_until(CONVERGE, "state live with lag 0", || {
        let status = redis.hgetall("edgecache:status");
        status.get("state").map(String::as_str) == Some("live")
            && status.get("lag").map(String::as_str) == Some("0")
    });
    // The same, as `edgecache status` prints it for people and scripts.
    let (code, stdout, stderr) =
        run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["records"], serde_json::json!(producer.n_sent));
    assert_eq!(status["state"], "live");
    let (code, stdout, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("state         live"), "{stdout}");
}

/// (b) Stop and restart: the agent resumes from the offsets stored in Redis.
/// The records counter is written atomically with the offsets, so had the
/// agent read from the start again it would exceed the number produced.
#[test]
fn b_restart_resumes_from_stored_offsets() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("b-resume", 3, false, 0xb0b);
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    producer.random_states(&mut rng, 2000, 300);

    let mut agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_until(CONVERGE, "first run counted everything", || {
        redis.status_counter("records") == producer.n_sent
    });
    let (status, took) = agent.sigterm();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let offsets_before = redis.hgetall("edgecache:offsets");

    producer.random_states(&mut rng, 700, 300);
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_until(CONVERGE, "second run counted only new records", || {
        redis.status_counter("records") >= producer.n_sent
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        redis.status_counter("records"),
        producer.n_sent,
        "records were applied more than once: the agent re-read from the start"
    );
    let log = agent.log_text();
    assert!(
        log.contains("resuming from the offsets stored in Redis"),
        "{log}"
    );
    let offsets_after = redis.hgetall("edgecache:offsets");
    for (field, before) in &offsets_before {
        let after: u64 = offsets_after[field].parse().unwrap();
        assert!(after >= before.parse().unwrap(), "{field} went back");
    }
}

/// (c) SIGKILL mid-stream, several times, then restart: converges, and no
/// record is counted twice (offsets and data are one atomic step).
#[test]
fn c_sigkill_mid_stream_converges() {
    let topic = unique("c-kill");
    create_topic(&topic, 3);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    // Small batches: many transactions, so kills land between them.
    config.extra_agent = "max_batch_records = 64".into();
    let config = config.write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(0xc0ffee);
    producer.random_states(&mut rng, 30_000, 2000);

    let mut killed_mid_stream = 0;
    for round in 0..4 {
        let mut agent = Agent::start(&config);
        let target = producer.n_sent * (round + 1) / 5;
        wait_until(CONVERGE, "some progress before the kill", || {
            redis.status_counter("records") >= target
        });
        if redis.status_counter("records") < producer.n_sent {
            killed_mid_stream += 1;
        }
        eprintln!(
            "round {round}: killing at {} of {} records",
            redis.status_counter("records"),
            producer.n_sent
        );
        agent.sigkill();
        // More records arrive while the agent is down.
        producer.random_states(&mut rng, 500, 2000);
    }
    assert!(
        killed_mid_stream >= 1,
        "every kill came after the end: test proves nothing"
    );
    let _agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_until(CONVERGE, "all records counted", || {
        redis.status_counter("records") >= producer.n_sent
    });
    assert_eq!(redis.status_counter("records"), producer.n_sent);
    assert_eq!(stored_offsets_sum(&redis, &topic), producer.n_sent);
}

/// The largest batches: the apply script writes plain SETs and DELs many
/// keys per call, in chunks (Lua's unpack() is bounded), so a 4096-key
/// batch takes several MSETs; the result is the same mirror.
#[test]
fn largest_batches_apply_in_chunks() {
    let topic = unique("big-batch");
    create_topic(&topic, 1);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = "max_batch_records = 4096".into();
    let config = config.write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(4096);
    // Many keys, so batches hold thousands of distinct ones.
    producer.random_states(&mut rng, 40_000, 20_000);
    producer.flush();
    let _agent = Agent::start(&config);
    converges(&redis, &producer);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .unwrap();
    let calls = |command: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        calls("mset") > calls("evalsha") + calls("eval"),
        "no batch was split into several MSETs:\n{stats}"
    );
}

/// (d) FLUSHALL while running: the agent notices by itself (no new records
/// arrive), rehydrates from the earliest offsets, without a restart.
#[test]
fn d_flushall_rehydrates_without_restart() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("d-flush", 3, false, 0xd00d);
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    producer.random_states(&mut rng, 2000, 150);

    let mut agent = Agent::start(&config);
    converges(&redis, &producer);
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    assert!(redis.dump("device:").is_empty());
    converges(&redis, &producer);
    assert!(
        agent.is_running(),
        "the agent must rehydrate without a restart"
    );
    assert!(agent.log_text().contains("rehydrating"));

    // Redis restarted without persistence: same, and live records still flow.
    let mut redis = redis;
    redis.restart();
    assert!(redis.dump("device:").is_empty());
    converges(&redis, &producer);
    producer.random_states(&mut rng, 300, 150);
    converges(&redis, &producer);
    assert!(agent.is_running());
}

/// (e) Undecodable, keyless and oversize records are skipped and counted;
/// everything around them is applied and offsets advance past them.
#[test]
fn e_bad_records_are_skipped_and_counted() {
    let topic = unique("e-bad");
    // Not compacted: a compacted topic's broker refuses keyless records, but
    // the agent must survive them on any topic.
    // A topic that takes records over the agent's value cap.
    create_topic_configs(
        &topic,
        1,
        &[
            ("cleanup.policy", "delete"),
            ("max.message.bytes", "2000000"),
        ],
    );
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    // 4 MiB budget: the value cap is its floor, 1 MiB, and a fetch response
    // (512 KiB) is smaller than the oversize record, which must still be
    // received and skipped, not stall the partition.
    config.extra_agent = "memory_budget_mib = 4".into();
    let config = config.write(dir.path());
    let mut producer = TestProducer::new(&topic);

    producer.put("good-1", Some(r#"{"v":1}"#));
    producer.send(Some(b"broken"), Some(b"{not json"));
    producer.put("good-2", Some(r#"{"v":2}"#));
    producer.send(None, Some(br#"{"keyless":true}"#));
    producer.put("good-3", Some(r#"{"v":3}"#));
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(1024 * 1024 + 16 * 1024));
    producer.send(Some(b"huge"), Some(big.as_bytes()));
    producer.send(Some(b"latin1"), Some(b"\xff\xfe"));
    producer.put("good-4", Some(r#"{"v":4}"#));
    producer.flush();

    let agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_until(CONVERGE, "offsets past the last record", || {
        stored_offsets_sum(&redis, &topic) == producer.n_sent
    });
    assert_eq!(redis.status_counter("records"), 4);
    assert_eq!(redis.status_counter("skipped_undecodable"), 2);
    assert_eq!(redis.status_counter("skipped_no_key"), 1);
    assert_eq!(redis.status_counter("skipped_oversize"), 1);
    let log = agent.log_text();
    assert!(
        log.contains("skipping record") && log.contains(&format!("topic={topic}")),
        "{log}"
    );
    assert!(log.contains("offset=1"), "log names the offset: {log}");
}

/// (f) Every store format, read back with `edgecache get`, over the unix
/// socket; a missing key exits 1.
#[test]
fn f_store_formats_read_back_with_get() {
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.unix_url(), "unused", "unused:");
    config.topics.clear();
    let value = r#"{"temp":21.5,"on":true,"tags":["a","b"],"n":-3}"#;
    let mut producers = Vec::new();
    for store in ["postcard", "json", "raw", "hash"] {
        let topic = unique(&format!("f-{store}"));
        create_topic(&topic, 2);
        let mut producer = TestProducer::new(&topic);
        producer.put("s1", Some(value));
        producer.put("gone", Some(r#"{"v":0}"#));
        producer.put("gone", None);
        producer.flush();
        config
            .topics
            .push((topic, format!("{store}:"), "json", store));
        producers.push(producer);
    }
    let config = config.write(dir.path());
    let _agent = Agent::start(&config);
    let stores = [
        StoreFormat::Postcard,
        StoreFormat::Json,
        StoreFormat::Raw,
        StoreFormat::Hash,
    ];
    for (store, producer) in stores.into_iter().zip(&producers) {
        let prefix = format!("{store}:");
        assert_converges(&redis, &prefix, store, producer, CONVERGE);
        let key = format!("{store}:s1");
        let (code, stdout, stderr) = run_cli(&["get", "--config", config.to_str().unwrap(), &key]);
        assert_eq!(code, 0, "{stderr}");
        let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            got,
            serde_json::from_str::<serde_json::Value>(value).unwrap()
        );
        let (code, _, stderr) = run_cli(&[
            "get",
            "--config",
            config.to_str().unwrap(),
            &format!("{store}:gone"),
        ]);
        assert_eq!(code, 1, "a deleted key must exit 1: {stderr}");
    }
    // The raw format stores the producer's bytes exactly.
    let raw = redis.dump("raw:");
    assert_eq!(raw[b"raw:s1".as_slice()], value.as_bytes());
    // Postcard keeps the record timestamp, shown by --meta.
    let (code, stdout, _) = run_cli(&[
        "get",
        "--config",
        config.to_str().unwrap(),
        "--meta",
        "postcard:s1",
    ]);
    assert_eq!(code, 0);
    let meta: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        meta["ts_ms"].as_i64().unwrap() > 1_600_000_000_000,
        "{meta}"
    );
    // The hash store: one field per top-level field, read with a plain HGET.
    let field = |name: &str| -> Option<String> {
        redis::cmd("HGET")
            .arg("hash:s1")
            .arg(name)
            .query(&mut redis.conn())
            .unwrap()
    };
    assert_eq!(field("temp").as_deref(), Some("21.5"));
    assert_eq!(field("on").as_deref(), Some("true"));
    assert_eq!(field("tags").as_deref(), Some(r#"["a","b"]"#));
    // Postcard is the compact one.
    assert!(redis.dump("postcard:")[b"postcard:s1".as_slice()].len() < value.len());
}

/// A bad configuration is rejected before anything connects, naming the field.
#[test]
fn bad_config_is_rejected_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
         [[topics]]\nname = \"t\"\nkey_prefix = \"edgecache:x\"\n",
    )
    .unwrap();
    for command in ["check-config", "run"] {
        let start = std::time::Instant::now();
        let (code, _, stderr) = run_cli(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{command}: {stderr}");
        assert!(stderr.contains("topics[0].key_prefix"), "{stderr}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    // An unknown librdkafka property is caught by check-config too.
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.properties]\n\"no.such.property\" = \"1\"\n\
         [redis]\nurl = \"redis://127.0.0.1:1\"\n[[topics]]\nname = \"t\"\nkey_prefix = \"d:\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("no.such.property"), "{stderr}");
}

/// SIGTERM while Redis is unreachable and a batch is pending: the agent
/// still exits within a few seconds, and nothing it had not applied is
/// marked as applied (it converges after Redis returns).
#[test]
fn sigterm_while_redis_is_down_exits_promptly() {
    let Setup {
        topic,
        mut redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("g-term", 1, true, 7);
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    producer.random_states(&mut rng, 100, 20);
    let mut agent = Agent::start(&config);
    converges(&redis, &producer);

    redis.kill();
    producer.random_states(&mut rng, 100, 20);
    std::thread::sleep(Duration::from_secs(2));
    let (status, took) = agent.sigterm();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    redis.restart();
    let _agent = Agent::start(&config);
    converges(&redis, &producer);
}

/// SIGTERM while a pipelined apply that failed is being retried: the agent
/// drops that batch and the one in hand (their offsets never reached
/// Redis), exits promptly, and the next start reads them again.
#[test]
fn sigterm_while_a_failed_pipelined_apply_is_retried() {
    let Setup {
        topic,
        mut redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("g-term-pipe", 1, true, 11);
    // One record per batch: during the backlog every batch is full, so
    // every apply goes through the pipelined send (one in flight).
    let defaults = AgentConfig::new(redis.url(), &topic, "device:");
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = "max_batch_records = 1".into();
    let config = config.write(dir.path());
    producer.random_states(&mut rng, 20_000, 2_000);
    producer.flush();
    let mut agent = Agent::start(&config);
    wait_until(
        Duration::from_secs(30),
        "a few hundred keys applied",
        || redis.dump("device:").len() > 300,
    );
    // Still reading the backlog, so an apply is in flight when Redis dies.
    assert_eq!(redis.state().as_deref(), Some("rehydrating"));
    redis.kill();
    wait_until(Duration::from_secs(10), "the failed apply retried", || {
        agent.log_text().contains("keeping the batch and retrying")
    });
    let (status, took) = agent.sigterm();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let log = agent.log_text();
    assert!(log.contains("stopped"), "{log}");

    redis.restart();
    let _agent = Agent::start(&defaults.write(dir.path()));
    converges(&redis, &producer);
}

/// Under systemd (Type=notify): READY=1 once caught up, WATCHDOG=1 pings
/// from the loop, STATUS lines, STOPPING=1 on SIGTERM.
#[test]
fn sd_notify_ready_watchdog_and_status() {
    let topic = unique("n-notify");
    create_topic(&topic, 2);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    let mut producer = TestProducer::new(&topic);
    producer.random_states(&mut Rng::new(3), 200, 50);
    let mut notify = NotifyListener::bind(dir.path());
    let mut agent = Agent::start_with_env(&config, &notify.env("2000000"));
    notify.collect(Duration::from_secs(30), |messages| {
        let n_watchdog = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        messages.iter().any(|m| m.contains("READY=1")) && n_watchdog >= 3
    });
    let messages = notify.messages.clone();
    let ready = messages.iter().find(|m| m.contains("READY=1"));
    assert!(ready.is_some(), "no READY=1 in {messages:?}");
    assert!(ready.unwrap().contains("STATUS=live"), "{messages:?}");
    // Caught up means the data is there when READY arrives.
    assert_converges(
        &redis,
        "device:",
        StoreFormat::Postcard,
        &producer,
        Duration::from_secs(1),
    );
    assert!(
        messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("STATUS=")),
        "{messages:?}"
    );
    let (status, _) = agent.sigterm();
    assert!(status.success());
    notify.collect(Duration::from_secs(2), |m| {
        m.iter().any(|m| m.contains("STOPPING=1"))
    });
    assert_eq!(notify.count("STOPPING=1"), 1, "no STOPPING=1 after SIGTERM");
}

/// A topic that gains partitions while the agent runs: the new partitions
/// are noticed and mirrored without a restart.
#[test]
fn new_partitions_are_picked_up() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let topic = unique("p-grow");
    create_topic(&topic, 1);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = "partition_discovery_secs = 1".into();
    let config = config.write(dir.path());
    let mut producer = TestProducer::new(&topic);
    producer.random_states(&mut Rng::new(11), 100, 30);
    let _agent = Agent::start(&config);
    converges(&redis, &producer);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for result in runtime
        .block_on(admin.create_partitions(&[NewPartitions::new(&topic, 3)], &AdminOptions::new()))
        .unwrap()
    {
        result.unwrap();
    }
    producer.wait_partitions(3);
    for i in 0..40 {
        let key = format!("late-{i}");
        let value = format!(r#"{{"i":{i}}}"#);
        producer.send_to(
            Some(key.as_bytes()),
            Some(value.as_bytes()),
            Some(1 + i % 2),
        );
        producer
            .last
            .insert(key.into_bytes(), Some(value.into_bytes()));
    }
    producer.flush();
    converges(&redis, &producer);
    let offsets = redis.hgetall("edgecache:offsets");
    assert!(offsets.contains_key(&format!("{topic}/2")), "{offsets:?}");
}

/// G8: keys of other apps are never touched, through a first run, live
/// updates and a rehydrate (marker removed), and the agent writes nothing
/// outside its prefix and its namespace.
#[test]
fn foreign_keys_are_never_touched() {
    let topic = unique("g8-confine");
    create_topic(&topic, 2);
    let redis = Redis::start(false);
    let mut conn = redis.conn();
    let mut foreign: Vec<(String, String)> = Vec::new();
    for i in 0..300 {
        // Neighbours whose names look like ours but are not under our prefix.
        let key = match i % 3 {
            0 => format!("app:{i}"),
            1 => format!("devic:{i}"),
            _ => format!("edgecache-other:{i}"),
        };
        let value = format!("v{i}");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query(&mut conn)
            .unwrap();
        foreign.push((key, value));
    }
    let _: () = redis::cmd("HSET")
        .arg("app:hash")
        .arg("f")
        .arg("1")
        .query(&mut conn)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(8);
    producer.random_states(&mut rng, 500, 60);
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    // Lost state without a flush: the agent rebuilds next to other apps' keys.
    let _: () = redis::cmd("DEL")
        .arg("edgecache:marker")
        .query(&mut conn)
        .unwrap();
    producer.random_states(&mut rng, 200, 60);
    wait_until(CONVERGE, "a rehydrate after the marker vanished", || {
        agent.log_text().contains("Redis lost the agent's state")
            && redis.status_counter("records") == producer.n_sent
    });
    converges(&redis, &producer);

    for (key, value) in &foreign {
        let got: Option<String> = redis::cmd("GET").arg(key).query(&mut conn).unwrap();
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "foreign key {key} changed"
        );
    }
    let hash: BTreeMap<String, String> = redis.hgetall("app:hash");
    assert_eq!(hash.get("f").map(String::as_str), Some("1"));
    let all: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    let ours = [
        "edgecache:offsets",
        "edgecache:marker",
        "edgecache:status",
        "edgecache:fields",
    ];
    for key in all {
        let is_foreign = foreign.iter().any(|(k, _)| *k == key) || key == "app:hash";
        assert!(
            is_foreign || key.starts_with("device:") || ours.contains(&key.as_str()),
            "the agent wrote a key outside its prefix and namespace: {key}"
        );
    }
}

/// Stored format 2's field table (`edgecache:fields`): entries Redis lost
/// come back, under the same numbers, with the next values that use them;
/// an entry someone else changed makes the agent rewrite everything under
/// the table Redis holds, never store values that would read wrong.
#[test]
fn field_table_heals_and_a_foreign_entry_forces_a_rehydrate() {
    let topic = unique("fields");
    create_topic(&topic, 2);
    let redis = Redis::start(false);
    let mut conn = redis.conn();
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(11);
    producer.random_states(&mut rng, 300, 40);
    producer.flush();
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    let table = redis.hgetall("edgecache:fields");
    let names: BTreeSet<&str> = table.values().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["fw", "on", "seq", "temp"]));

    // Entries lost (a Redis restored from an older snapshot, say): stored
    // values cannot be read until a batch using the names writes them again.
    let _: () = redis::cmd("DEL")
        .arg("edgecache:fields")
        .query(&mut conn)
        .unwrap();
    producer.random_states(&mut rng, 100, 40);
    producer.flush();
    wait_until(CONVERGE, "the field table written again", || {
        redis.hgetall("edgecache:fields") == table
    });
    converges(&redis, &producer);
    assert!(!agent.log_text().contains("Redis lost"));

    // Number 0 renamed by someone else: the agent must not write values
    // under it; it gives up its state and rewrites every key.
    let renamed = table["0"].clone();
    let _: () = redis::cmd("HSET")
        .arg("edgecache:fields")
        .arg("0")
        .arg("bogus")
        .query(&mut conn)
        .unwrap();
    producer.random_states(&mut rng, 100, 40);
    producer.flush();
    wait_until(CONVERGE, "a rehydrate after the foreign entry", || {
        agent.log_text().contains("field table changed")
            && redis.status_counter("records") == producer.n_sent
    });
    converges(&redis, &producer);
    let after = redis.hgetall("edgecache:fields");
    assert_eq!(after["0"], "bogus", "Redis's table wins");
    let moved: Vec<&String> = after
        .iter()
        .filter(|(_, v)| **v == renamed)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(moved.len(), 1, "{renamed} numbered again: {after:?}");
    assert!(
        moved[0].parse::<usize>().unwrap() >= table.len(),
        "{after:?}"
    );
}

/// Scope and extras: key prefix and regex filters, a partition subset, a
/// TTL from the record timestamp, and change notifications. Filtered
/// records are not written but still advance offsets.
#[test]
fn filters_partitions_ttl_and_publish() {
    let site = unique("s-site");
    let devices = unique("s-dev");
    create_topic(&site, 3);
    create_topic(&devices, 1);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scope.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[redis]\nurl = \"{}\"\npublish_channel = \"changes\"\n\
             [[topics]]\nname = \"{site}\"\nkey_prefix = \"site7:\"\n\
             only_keys_with_prefix = \"site-7/\"\npartitions = [0, 1]\n\
             [[topics]]\nname = \"{devices}\"\nkey_prefix = \"dev:\"\n\
             only_keys_matching = \"^dev-[0-9]+$\"\nttl_secs = 30\n",
            brokers(),
            redis.url()
        ),
    )
    .unwrap();
    // Subscribe before anything is applied.
    let client = redis::Client::open(redis.url()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut sub_conn = client.get_connection().unwrap();
    let subscriber = std::thread::spawn(move || {
        let mut pubsub = sub_conn.as_pubsub();
        pubsub.subscribe("changes").unwrap();
        pubsub
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        while let Ok(message) = pubsub.get_message() {
            if tx.send(message.get_payload::<String>().unwrap()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    let mut site_producer = TestProducer::new(&site);
    for partition in 0..3 {
        for prefix in ["site-7/", "site-8/"] {
            let key = format!("{prefix}k{partition}");
            site_producer.send_to(
                Some(key.as_bytes()),
                Some(br#"{"ok":true}"#),
                Some(partition),
            );
        }
    }
    site_producer.flush();
    let mut dev_producer = TestProducer::new(&devices);
    let now = edgecache::sink::now_ms();
    for key in ["dev-1", "dev-x", "dev-22"] {
        dev_producer.send_full(Some(key.as_bytes()), Some(b"{\"t\":1}"), None, Some(now));
    }
    // Older than its TTL already: must not appear.
    dev_producer.send_full(
        Some(b"dev-3"),
        Some(b"{\"t\":1}"),
        None,
        Some(now - 120_000),
    );
    dev_producer.flush();

    let config = path.clone();
    let _agent = Agent::start(&config);
    wait_until(CONVERGE, "filtered records counted", || {
        redis.status_counter("filtered") == 3 && redis.status_counter("records") == 5
    });
    let site_keys: Vec<Vec<u8>> = redis.dump("site7:").into_keys().collect();
    assert_eq!(
        site_keys,
        vec![b"site7:site-7/k0".to_vec(), b"site7:site-7/k1".to_vec()]
    );
    let dev_keys: Vec<Vec<u8>> = redis.dump("dev:").into_keys().collect();
    assert_eq!(
        dev_keys,
        vec![b"dev:dev-1".to_vec(), b"dev:dev-22".to_vec()]
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("dev:dev-1")
        .query(&mut redis.conn())
        .unwrap();
    assert!(pttl > 0 && pttl <= 30_000, "PTTL {pttl}");
    let offsets = redis.hgetall("edgecache:offsets");
    assert_eq!(
        offsets.get(&format!("{site}/0")).map(String::as_str),
        Some("2")
    );
    assert_eq!(
        offsets.get(&format!("{site}/1")).map(String::as_str),
        Some("2")
    );
    assert!(!offsets.contains_key(&format!("{site}/2")), "{offsets:?}");
    assert_eq!(
        offsets.get(&format!("{devices}/0")).map(String::as_str),
        Some("4")
    );

    let mut published = std::collections::BTreeSet::new();
    while let Ok(message) = rx.recv_timeout(Duration::from_secs(2)) {
        published.insert(message);
    }
    for expected in [
        "set site7:site-7/k0",
        "set site7:site-7/k1",
        "set dev:dev-1",
        "del dev:dev-3",
    ] {
        assert!(
            published.contains(expected),
            "{expected} not in {published:?}"
        );
    }
    assert!(
        !published.iter().any(|m| m.contains("site-8")),
        "{published:?}"
    );
    drop(rx);
    // The TTL runs out: silent devices disappear.
    wait_until(Duration::from_secs(45), "TTL expiry", || {
        redis.dump("dev:").is_empty()
    });
    drop(subscriber);
}

/// Redis with a password read from a file; a wrong password gets a clear
/// message (and retries) rather than a crash.
#[test]
fn redis_password_from_file() {
    let topic = unique("r-auth");
    create_topic(&topic, 1);
    let redis = Redis::start(false);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret-pw")
        .query(&mut redis.conn())
        .unwrap();
    let authed =
        redis::Client::open(format!("redis://:s3cret-pw@127.0.0.1:{}/0", redis.port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("redis-password"), "wrong\n").unwrap();
    let write_config = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[redis]\nurl = \"{}\"\npassword_file = \"redis-password\"\n\
                 [[topics]]\nname = \"{topic}\"\nkey_prefix = \"device:\"\n",
                brokers(),
                redis.url()
            ),
        )
        .unwrap();
        path
    };
    let config = write_config("auth.toml");
    let mut producer = TestProducer::new(&topic);
    producer.put("k", Some(r#"{"v":1}"#));
    producer.flush();

    let mut agent = Agent::start(&config);
    wait_until(CONVERGE, "a clear authentication error", || {
        agent.log_text().contains("authentication failed")
    });
    assert!(agent.is_running());
    assert!(
        !agent.log_text().contains("wrong"),
        "the password leaked into the log"
    );
    agent.sigterm();

    std::fs::write(dir.path().join("redis-password"), "s3cret-pw\n").unwrap();
    let _agent = Agent::start(&config);
    wait_until(CONVERGE, "the record mirrored", || {
        let mut conn = authed.get_connection().unwrap();
        redis::cmd("EXISTS")
            .arg("device:k")
            .query::<bool>(&mut conn)
            .unwrap()
    });
    let (code, stdout, _) = run_cli(&["get", "--config", config.to_str().unwrap(), "device:k"]);
    assert_eq!((code, stdout.trim()), (0, r#"{"v":1}"#));
}

/// Kafka unreachable at boot: READY=1 still arrives after the ready timeout
/// (STATUS says why) and the watchdog keeps being pinged while the agent
/// retries, so systemd neither times out the start nor kills the unit.
#[test]
fn sd_notify_ready_when_kafka_is_unreachable() {
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nokafka.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nready_timeout_secs = 3\n[kafka]\nbrokers = \"127.0.0.1:{}\"\n\
             [redis]\nurl = \"{}\"\n[[topics]]\nname = \"t\"\nkey_prefix = \"device:\"\n",
            free_port(),
            redis.url()
        ),
    )
    .unwrap();
    let mut notify = NotifyListener::bind(dir.path());
    let mut agent = Agent::start_with_env(&path, &notify.env("2000000"));
    notify.collect(Duration::from_secs(12), |_| false);
    let messages = notify.messages.clone();
    let ready = messages
        .iter()
        .find(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {messages:?}"));
    assert!(ready.contains("not caught up"), "{ready}");
    let n_watchdog = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        n_watchdog >= 8,
        "{n_watchdog} watchdog pings in 12 s: {messages:?}"
    );
    assert!(agent.is_running());
    let (status, took) = agent.sigterm();
    assert!(
        status.success() && took < Duration::from_secs(5),
        "{status} {took:?}"
    );
    notify.collect(Duration::from_secs(2), |m| {
        m.iter().any(|m| m.contains("STOPPING=1"))
    });
    assert_eq!(notify.count("STOPPING=1"), 1, "no STOPPING=1 after SIGTERM");
}

/// The niceness of every thread of `pid` (field 19 of each task's stat).
fn thread_niceness(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .map(|stat| {
            // After the command name, which may hold spaces: field 3 onwards.
            let rest = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
            rest.split(' ').nth(19 - 3).unwrap().parse().unwrap()
        })
        .collect()
}

/// This test process's niceness, low enough that +10 shows.
fn own_niceness() -> i32 {
    let own = thread_niceness(std::process::id())[0];
    assert!(
        own <= 9,
        "the test runs at niceness {own}: +10 must be visible"
    );
    own
}

#[test]
fn catching_up_runs_at_a_lower_cpu_priority_and_live_at_the_start_one() {
    let own = own_niceness();
    let topic = unique("nice");
    create_topic(&topic, 2);
    let mut producer = TestProducer::new(&topic);
    producer.put("a", Some(r#"{"v":1}"#));
    producer.flush();
    // Redis down: the agent cannot catch up, so it stays in its bulk phase.
    let mut redis = Redis::start(false);
    redis.kill();
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(redis.url(), &topic, "nice:").write(dir.path());
    let agent = Agent::start(&config);
    let mut seen = Vec::new();
    wait_until(
        Duration::from_secs(20),
        "every thread at +10 while catching up",
        || {
            seen = thread_niceness(agent.pid());
            seen.len() > 1 && seen.iter().all(|&n| n == own + 10)
        },
    );
    redis.restart();
    wait_until(Duration::from_secs(30), "live", || {
        redis.state().as_deref() == Some("live")
    });
    wait_until(
        Duration::from_secs(10),
        "every thread back at the start niceness",
        || {
            seen = thread_niceness(agent.pid());
            !seen.is_empty() && seen.iter().all(|&n| n == own)
        },
    );
    assert_eq!(redis.dump("nice:").len(), 1, "the record is mirrored");
    let log = agent.log_text();
    assert!(log.contains("CPU priority for catching up"), "{log}");
    assert!(log.contains("CPU priority for live updates"), "{log}");
}

#[test]
fn without_rlimit_nice_the_agent_warns_and_keeps_the_catch_up_niceness() {
    // As under a unit without LimitNICE=+0: no CAP_SYS_NICE and RLIMIT_NICE
    // 0 (the default), so raising the niceness works and lowering it fails.
    let own = own_niceness();
    let topic = unique("nicelimit");
    create_topic(&topic, 1);
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(redis.url(), &topic, "nl:").write(dir.path());
    let agent = Agent::start_wrapped(
        &["prlimit", "--nice=0", "setpriv", "--bounding-set=-sys_nice"],
        &config,
        &[],
    );
    wait_until(Duration::from_secs(30), "live", || {
        redis.state().as_deref() == Some("live")
    });
    wait_until(Duration::from_secs(10), "the warning", || {
        agent.log_text().contains("returning needs RLIMIT_NICE")
    });
    let seen = thread_niceness(agent.pid());
    assert!(
        seen.len() > 1 && seen.iter().all(|&n| n == own + 10),
        "threads at {seen:?}; log:\n{}",
        agent.log_text()
    );
    // It still mirrors.
    let mut producer = TestProducer::new(&topic);
    producer.put("k", Some(r#"{"v":1}"#));
    producer.flush();
    wait_until(Duration::from_secs(10), "the record mirrored", || {
        redis.dump("nl:").len() == 1
    });
}
