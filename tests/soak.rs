//! Crash soak with an oracle, against the real broker and real Redis.
//!
//! Rounds: produce a chunk of random device states (bounded keyspace, ~10%
//! tombstones) while the agent runs, SIGKILL the agent at a random moment,
//! and in some rounds SIGKILL redis-server too (append-only file on,
//! `appendfsync always` or `everysec`), then restart what was killed. After
//! every round:
//! - no key holds a value newer than its partition's stored offset
//!   (each value carries its record's number; the producer's delivery
//!   reports give that record's offset);
//! - stored offsets never went backwards while Redis kept its data.
//!
//! At the end the agent must converge to the oracle exactly.
//!
//! `EDGECACHE_SOAK_ROUNDS` (default 20, CI) and `EDGECACHE_SOAK_SEED`
//! (default: from the clock, printed) make a run reproducible.

mod util;

use edgecache::codec::StoreFormat;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};
use util::*;

const RECORDS_PER_ROUND: usize = 5_000;
const KEYS: u64 = 5_000;
const PARTITIONS: i32 = 4;

fn offsets(redis: &Redis, topic: &str) -> BTreeMap<i32, i64> {
    redis
        .hgetall("edgecache:offsets")
        .into_iter()
        .filter_map(|(field, value)| {
            let partition = field.strip_prefix(&format!("{topic}/"))?.parse().ok()?;
            Some((partition, value.parse().unwrap()))
        })
        .collect()
}

/// Every stored value's record must lie below its partition's stored offset.
fn check_no_value_ahead_of_offsets(
    redis: &Redis,
    topic: &str,
    placed: &BTreeMap<u64, (i32, i64)>,
    seed: u64,
) {
    let stored = offsets(redis, topic);
    for (key, json) in actual_json(redis, "device:", StoreFormat::Postcard) {
        let n = json["n"].as_u64().expect("soak values carry n");
        let (partition, offset) = placed[&n];
        let next = stored.get(&partition).copied().unwrap_or(0);
        assert!(
            offset < next,
            "seed {seed}: key {} holds record {n} at {partition}/{offset}, but the stored offset is {next}",
            String::from_utf8_lossy(&key)
        );
    }
}

#[test]
fn crash_soak() {
    let (rounds, seed) = rounds_and_seed("EDGECACHE_SOAK", 20);
    eprintln!("crash soak: seed {seed}, {rounds} rounds of {RECORDS_PER_ROUND} records");
    let mut rng = Rng::new(seed);
    let topic = unique("soak");
    create_topic(&topic, PARTITIONS);
    let mut redis = Redis::start(true);
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    // Small transactions so kills land between and inside many of them.
    config.extra_agent = "max_batch_records = 128".into();
    let config = config.write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let started = Instant::now();
    let (mut n_agent_kills, mut n_redis_kills, mut n_mid_stream) = (0, 0, 0);

    let mut agent = Agent::start(&config);
    let mut last_offsets = BTreeMap::new();
    for round in 0..rounds {
        let kill_redis = rng.below(3) == 0;
        let fsync_always = rng.below(2) == 0;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(if fsync_always { "always" } else { "everysec" })
            .query(&mut redis.conn())
            .unwrap();
        // Half the round's records while the agent runs, killed at a random
        // moment while they are produced; the other half while it is down.
        // The agent applies records within milliseconds of their arrival,
        // so a kill after the producer's flush would find it caught up.
        let pid = agent.pid();
        let delay = Duration::from_millis(rng.below(40));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
        });
        producer.numbered_states(&mut rng, RECORDS_PER_ROUND / 2, KEYS);
        killer.join().unwrap();
        agent.sigkill();
        n_agent_kills += 1;
        // Killed before it had applied all of this half-round: mid-stream.
        let applied = redis.status_counter("records") + redis.status_counter("skipped_undecodable");
        if applied < producer.n_sent {
            n_mid_stream += 1;
        }
        producer.numbered_states(&mut rng, RECORDS_PER_ROUND / 2, KEYS);
        if kill_redis {
            redis.restart();
            n_redis_kills += 1;
        }
        // A SIGKILLed redis-server keeps everything it wrote to its AOF
        // (the page cache survives the process; only a power cut would
        // lose the last second under everysec), so offsets may never go back.
        let now = offsets(&redis, &topic);
        for (partition, before) in &last_offsets {
            let after = now.get(partition).copied().unwrap_or(0);
            assert!(
                after >= *before,
                "seed {seed} round {round}: offset of partition {partition} went back from {before} to {after}"
            );
        }
        check_no_value_ahead_of_offsets(&redis, &topic, &producer.placed(), seed);
        last_offsets = now;
        agent = Agent::start(&config);
    }
    assert_converges(
        &redis,
        "device:",
        StoreFormat::Postcard,
        &producer,
        Duration::from_secs(120),
    );
    check_no_value_ahead_of_offsets(&redis, &topic, &producer.placed(), seed);
    drop(agent);
    assert!(
        n_mid_stream * 2 >= n_agent_kills,
        "seed {seed}: only {n_mid_stream} of {n_agent_kills} kills came before the agent caught up"
    );
    eprintln!(
        "crash soak passed: seed {seed}, {rounds} rounds, {} records, {n_agent_kills} agent kills \
         ({n_mid_stream} mid-stream), {n_redis_kills} redis kills, {:.0} s",
        producer.n_sent,
        started.elapsed().as_secs_f64()
    );
}
