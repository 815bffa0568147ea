//! All or nothing (issue 13), end to end against the real broker and real
//! redis-servers: the shipped ACL file (agent and reader users), missing
//! permissions at start and at run time, a foreign app changing the type of
//! one of the agent's hashes, a power cut that tears the append-only file
//! inside transactions, and far-future record timestamps with a TTL.
//!
//! The invariant the mirroring tests check on one atomic snapshot of Redis
//! ([`check`]): no value newer than its partition's stored offset, no offset
//! ahead of its data (every record below a stored offset is reflected), and
//! counters that count each record below the stored offsets exactly once.
//! Values carry their record number (as in tests/soak.rs); the producer's
//! delivery reports map it to a partition and offset.
//!
//! `EDGECACHE_TORN_ROUNDS` (default 30) and `EDGECACHE_TORN_SEED` (default:
//! from the clock, printed) size and replay the torn-AOF test.

mod util;

use edgecache::codec::{self, StoreFormat};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

const ACL_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/redis-edgecache.acl");
const CHANNEL: &str = "edgecache:changes";
const AGENT_PASSWORD: &str = "agent-test-password";
const READER_PASSWORD: &str = "reader-test-password";
const CONVERGE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- helpers

/// The rules of `user` in the shipped ACL file (everything after the name).
fn shipped_rules(user: &str) -> Vec<String> {
    let text = std::fs::read_to_string(ACL_FILE).expect("systemd/redis-edgecache.acl");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("user {user} ")))
        .unwrap_or_else(|| panic!("no user {user} in {ACL_FILE}"));
    line.split_whitespace().skip(2).map(str::to_owned).collect()
}

fn acl_setuser(redis: &Redis, user: &str, rules: &[String]) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER").arg(user);
    for rule in rules {
        cmd.arg(rule);
    }
    let () = cmd
        .query(&mut redis.conn())
        .unwrap_or_else(|e| panic!("ACL SETUSER {user} {rules:?}: {e}"));
}

/// Gives a test Redis the shipped `edgecache` and `reader` users, rules
/// replaced or added by `agent_changes` (the rules are the file's, parsed by
/// the same ACL SETUSER code that reads an aclfile). The default user stays
/// as it is: the harness reads through it.
fn install_users(redis: &Redis, agent_changes: &[&str]) {
    let mut agent = shipped_rules("edgecache");
    agent.extend(agent_changes.iter().map(|r| r.to_string()));
    agent.push(format!(">{AGENT_PASSWORD}"));
    acl_setuser(redis, "edgecache", &agent);
    let mut reader = shipped_rules("reader");
    reader.push(format!(">{READER_PASSWORD}"));
    acl_setuser(redis, "reader", &reader);
}

fn user_url(redis: &Redis, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}/0", redis.port)
}

fn user_conn(redis: &Redis, user: &str, password: &str) -> redis::Connection {
    redis::Client::open(user_url(redis, user, password))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

/// The agent's configuration: one topic under `device:`, postcard.
struct Cfg<'a> {
    url: String,
    topic: &'a str,
    publish: bool,
    agent: &'a str,
    topic_extra: &'a str,
}

impl Cfg<'_> {
    fn write(&self, dir: &Path) -> PathBuf {
        let publish = if self.publish {
            format!("publish_channel = \"{CHANNEL}\"\n")
        } else {
            String::new()
        };
        let text = format!(
            "[agent]\n{}\n[kafka]\nbrokers = \"{}\"\n[redis]\nurl = \"{}\"\n{publish}\
             [[topics]]\nname = \"{}\"\nkey_prefix = \"device:\"\n{}\n",
            self.agent,
            brokers(),
            self.url,
            self.topic,
            self.topic_extra,
        );
        let path = dir.join(format!("{}.toml", unique("atomic")));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path
    }
}

/// Every record produced, by record number: its key and whether it has a
/// value (false: a tombstone).
#[derive(Default)]
struct Log(Vec<(String, bool)>);

/// `n` records over `keys` keys, ~10% tombstones; each value carries its
/// record number `n`. Not flushed: callers decide when.
fn produce(producer: &mut TestProducer, rng: &mut Rng, log: &mut Log, n: usize, keys: u64) {
    for _ in 0..n {
        let key = format!("k{}", rng.below(keys));
        assert_eq!(log.0.len() as u64, producer.n_sent, "record numbering");
        if rng.below(10) == 0 {
            producer.put(&key, None);
            log.0.push((key, false));
        } else {
            let value = format!(
                r#"{{"n":{},"temp":{}.{},"on":{}}}"#,
                producer.n_sent,
                rng.below(40),
                rng.below(10),
                rng.below(2) == 1
            );
            producer.put(&key, Some(&value));
            log.0.push((key, true));
        }
    }
}

/// One atomic view of everything the invariant relates: each `device:`
/// key's raw value and the agent's three hashes (empty if not a hash).
struct Snapshot {
    data: BTreeMap<String, Vec<u8>>,
    offsets: BTreeMap<String, String>,
    status: BTreeMap<String, String>,
    fields: codec::Fields,
}

fn snapshot(redis: &Redis) -> Snapshot {
    let script = redis::Script::new(
        "local function hash(k) \
           if redis.call('TYPE', k).ok ~= 'hash' then return {} end \
           return redis.call('HGETALL', k) \
         end \
         local data = {} \
         for _, k in ipairs(redis.call('KEYS', 'device:*')) do \
           data[#data + 1] = k; data[#data + 1] = redis.call('GET', k) \
         end \
         return {data, hash(KEYS[1]), hash(KEYS[2]), hash(KEYS[3])}",
    );
    let (data, offsets, status, fields): (Vec<Vec<u8>>, Vec<String>, Vec<String>, Vec<String>) =
        script
            .key("edgecache:offsets")
            .key("edgecache:status")
            .key("edgecache:fields")
            .invoke(&mut redis.conn())
            .expect("snapshot script");
    let pairs = |flat: Vec<String>| -> BTreeMap<String, String> {
        flat.chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect()
    };
    Snapshot {
        data: data
            .chunks(2)
            .map(|kv| (String::from_utf8_lossy(&kv[0]).into_owned(), kv[1].clone()))
            .collect(),
        offsets: pairs(offsets),
        status: pairs(status),
        fields: codec::Fields::from_pairs(pairs(fields)),
    }
}

impl Snapshot {
    /// Next offset per partition of `topic` (`topic/p` fields only).
    fn stored(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.offsets
            .iter()
            .filter_map(|(field, value)| {
                let p = field.strip_prefix(&format!("{topic}/"))?.parse().ok()?;
                Some((p, value.parse().unwrap()))
            })
            .collect()
    }

    /// Per-partition `records` counter (`records@topic/p`), if any.
    fn partition_records(&self, topic: &str) -> BTreeMap<i32, u64> {
        self.offsets
            .iter()
            .filter_map(|(field, value)| {
                let p = field.strip_prefix(&format!("records@{topic}/"))?;
                Some((p.parse().ok()?, value.parse().unwrap()))
            })
            .collect()
    }

    fn status_records(&self) -> u64 {
        self.status.get("records").map_or(0, |v| v.parse().unwrap())
    }

    /// The record number each data key holds.
    fn numbers(&self) -> BTreeMap<String, u64> {
        self.data
            .iter()
            .map(|(key, bytes)| {
                let (json, _) = codec::stored_to_json(StoreFormat::Postcard, bytes, &self.fields)
                    .unwrap_or_else(|e| panic!("{key} holds bad postcard: {e}"));
                let n = json["n"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{key} holds {json} without n"));
                (key.clone(), n)
            })
            .collect()
    }
}

/// What to check besides data against offsets.
#[derive(Clone, Copy, PartialEq)]
enum Counters {
    /// The `records` total equals the sum of the stored offsets (every
    /// record produced is valid, so each offset below them is one record).
    Total,
    /// Also the per-partition counters (`records@topic/p`) equal the offsets.
    PerPartition,
    /// Per-partition only: the total may be off until the agent reconnects
    /// (a torn AOF can replay half a transaction).
    PerPartitionOnly,
}

/// The invariant, on one snapshot; returns the violations found.
fn check(
    snap: &Snapshot,
    topic: &str,
    log: &Log,
    placed: &BTreeMap<u64, (i32, i64)>,
    counters: Counters,
    data_ahead_allowed: bool,
) -> Vec<String> {
    let stored = snap.stored(topic);
    let next = |p: i32| stored.get(&p).copied().unwrap_or(0);
    let numbers = snap.numbers();
    let mut out = Vec::new();
    // No value newer than its partition's stored offset.
    for (key, &n) in &numbers {
        let (p, offset) = placed[&n];
        if key != &format!("device:{}", log.0[n as usize].0) {
            out.push(format!("{key} holds record {n} of another key"));
        }
        if offset >= next(p) && !data_ahead_allowed {
            out.push(format!(
                "{key} holds record {n} at {p}/{offset}, stored offset {}",
                next(p)
            ));
        }
    }
    // No offset ahead of its data: the last record of each key below its
    // partition's stored offset is what the key holds (or a later record).
    let mut last_below: BTreeMap<&str, u64> = BTreeMap::new();
    for (n, (key, _)) in log.0.iter().enumerate() {
        let Some(&(p, offset)) = placed.get(&(n as u64)) else {
            continue;
        };
        if offset < next(p) {
            last_below.insert(key, n as u64);
        }
    }
    // A key's last tombstone: with data ahead allowed, a later tombstone
    // may already have deleted the key.
    let mut last_tombstone: BTreeMap<&str, u64> = BTreeMap::new();
    for (n, (key, has_value)) in log.0.iter().enumerate() {
        if !has_value {
            last_tombstone.insert(key, n as u64);
        }
    }
    for (key, &n0) in &last_below {
        let has_value = log.0[n0 as usize].1;
        let held = numbers.get(&format!("device:{key}")).copied();
        let deleted_later = last_tombstone.get(key).is_some_and(|&t| t > n0);
        match held {
            Some(n) if n >= n0 => {}
            None if !has_value => {}
            None if data_ahead_allowed && deleted_later => {}
            other => out.push(format!(
                "offset ahead of data: device:{key} should reflect record {n0} ({}), holds {other:?}",
                if has_value { "value" } else { "tombstone" }
            )),
        }
    }
    let sum: i64 = stored.values().sum();
    if counters != Counters::PerPartitionOnly && snap.status_records() != sum as u64 {
        out.push(format!(
            "status records {} but the stored offsets cover {sum} records",
            snap.status_records()
        ));
    }
    if counters != Counters::Total {
        let per = snap.partition_records(topic);
        for (&p, &offset) in &stored {
            if per.get(&p).copied() != Some(offset as u64) {
                out.push(format!(
                    "partition {p}: records counter {:?}, stored offset {offset}",
                    per.get(&p)
                ));
            }
        }
    }
    out
}

fn assert_consistent(
    redis: &Redis,
    topic: &str,
    log: &Log,
    placed: &BTreeMap<u64, (i32, i64)>,
    counters: Counters,
    what: &str,
) {
    assert_consistent_with(redis, topic, log, placed, counters, false, what);
}

fn assert_consistent_with(
    redis: &Redis,
    topic: &str,
    log: &Log,
    placed: &BTreeMap<u64, (i32, i64)>,
    counters: Counters,
    data_ahead_allowed: bool,
    what: &str,
) {
    let snap = snapshot(redis);
    let violations = check(&snap, topic, log, placed, counters, data_ahead_allowed);
    assert!(
        violations.is_empty(),
        "{what}: {} violations, first: {:#?}\noffsets: {:?}\nstatus: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)],
        snap.offsets,
        snap.status
    );
}

/// Waits until the `records` total equals `n`; on timeout shows the
/// agent's hashes, which say where a count went wrong.
fn wait_records(redis: &Redis, n: u64) {
    let start = Instant::now();
    loop {
        let snap = snapshot(redis);
        if snap.status_records() == n {
            return;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "records counter {} after {CONVERGE:?}, {n} records produced\noffsets: {:?}\nstatus: {:?}",
            snap.status_records(),
            snap.offsets,
            snap.status
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `edgecache run` expecting it to exit by itself within `timeout`;
/// returns the exit code and its log.
fn run_until_exit(config: &Path, timeout: Duration) -> (Option<i32>, String) {
    let log = config.with_extension("exit.log");
    let mut child: Child = Command::new(bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("EDGECACHE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the edgecache binary");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), std::fs::read_to_string(&log).unwrap());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent was still running after {timeout:?} (a missing permission must stop it at start); log:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_json(config: &Path) -> serde_json::Value {
    let (code, stdout, stderr) =
        run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "edgecache status: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// The agent's state in its status hash and whether any status field
/// carries `reason` (the field's name is the agent's business).
fn state_with_reason(redis: &Redis, reason: &str) -> (Option<String>, bool) {
    let status = snapshot(redis).status;
    let has = status.values().any(|v| v.contains(reason));
    (status.get("state").cloned(), has)
}

fn denied(result: redis::RedisResult<redis::Value>, what: &str) {
    match result {
        Err(e) if e.to_string().contains("NOPERM") => {}
        other => panic!("{what} must be refused with NOPERM, got {other:?}"),
    }
}

// ------------------------------------------------------------------ ACLs

/// The shipped file loads as an aclfile in this redis-server (7.0 takes no
/// comments and no 7.2-only commands there) and grants what it should:
/// checked with ACL DRYRUN, command by command.
#[test]
fn acl_file_loads_and_grants_least_privilege() {
    let dir = tempfile::tempdir().unwrap();
    // An admin to look with; the shipped default user is off.
    let mut text = std::fs::read_to_string(ACL_FILE).unwrap();
    text.push_str("user admin on >admin-test-password ~* &* +@all\n");
    let acl = dir.path().join("users.acl");
    std::fs::write(&acl, text).unwrap();
    let port = free_port();
    let log = dir.path().join("redis.log");
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--aclfile", acl.to_str().unwrap()])
        .args(["--logfile", log.to_str().unwrap()])
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let url = |user: &str| format!("redis://{user}127.0.0.1:{port}/0");
    let connect = |user: &str| {
        let client = redis::Client::open(url(user)).unwrap();
        let start = Instant::now();
        loop {
            match client.get_connection_with_timeout(Duration::from_secs(1)) {
                Ok(c) => return c,
                Err(e) if start.elapsed() > Duration::from_secs(10) => panic!(
                    "redis-server with the shipped aclfile: {e}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let mut admin = connect("admin:admin-test-password@");
    // No anonymous access.
    let mut anonymous = connect("");
    let ping: redis::RedisResult<String> = redis::cmd("PING").query(&mut anonymous);
    assert!(
        ping.as_ref()
            .is_err_and(|e| e.to_string().contains("NOAUTH")),
        "{ping:?}"
    );
    let dry = |admin: &mut redis::Connection, user: &str, args: &[&str]| -> bool {
        let reply: String = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg(user)
            .arg(args)
            .query(admin)
            .unwrap();
        reply == "OK"
    };
    let agent_may: &[&[&str]] = &[
        &["GET", "edgecache:marker"],
        &["SET", "edgecache:marker", "t"],
        &["DEL", "edgecache:marker"],
        &["HGETALL", "edgecache:offsets"],
        &["HSET", "edgecache:offsets", "t/0", "1"],
        &["HMGET", "edgecache:status", "records"],
        &["HDEL", "edgecache:status", "x"],
        &["SADD", "edgecache:seen", "device:a"],
        &["SREM", "edgecache:seen", "device:a"],
        &["MSET", "device:a", "1", "device:b", "2"],
        &["SET", "device:a", "1", "PXAT", "99999999999999"],
        &["DEL", "device:a"],
        &["SCAN", "0"],
        &["EVALSHA", "0000000000000000000000000000000000000000", "0"],
        &["EVAL", "return 1", "0"],
        &["SCRIPT", "LOAD", "return 1"],
        &["PUBLISH", CHANNEL, "set device:a"],
        &["CONFIG", "GET", "appendonly"],
        &["INFO", "persistence"],
        // The read functions for local apps (FCALL_RO edgecache_get),
        // replaced in one transaction at every init.
        &["FUNCTION", "LIST", "LIBRARYNAME", "edgecache_*"],
        &["FUNCTION", "LOAD", "REPLACE", "#!lua name=x\nreturn 1"],
        &["FUNCTION", "DELETE", "edgecache_v0"],
        &["MULTI"],
        &["EXEC"],
    ];
    for args in agent_may {
        assert!(dry(&mut admin, "edgecache", args), "agent needs {args:?}");
    }
    let agent_may_not: &[&[&str]] = &[
        &["SET", "other:a", "1"],
        &["GET", "other:a"],
        &["PUBLISH", "other-channel", "x"],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["KEYS", "*"],
        &["CONFIG", "SET", "appendonly", "no"],
        &["ACL", "SETUSER", "edgecache", "+@all"],
        &["SHUTDOWN"],
        &["FUNCTION", "FLUSH"],
        &["FCALL", "f", "0"],
    ];
    for args in agent_may_not {
        assert!(
            !dry(&mut admin, "edgecache", args),
            "agent must not {args:?}"
        );
    }
    let reader_may: &[&[&str]] = &[
        &["GET", "device:a"],
        &["MGET", "device:a", "device:b"],
        &["HGETALL", "edgecache:status"],
        &["HGET", "edgecache:fields", "0"],
        &["SCAN", "0", "MATCH", "device:*"],
        &["PTTL", "device:a"],
        &["SUBSCRIBE", CHANNEL],
        &["EVAL_RO", "return 1", "1", "device:a"],
        &["FCALL_RO", "f", "1", "device:a"],
    ];
    for args in reader_may {
        assert!(dry(&mut admin, "reader", args), "reader needs {args:?}");
    }
    let reader_may_not: &[&[&str]] = &[
        &["SET", "device:a", "1"],
        &["DEL", "device:a"],
        &["HSET", "edgecache:status", "state", "x"],
        &["GET", "other:a"],
        &["PUBLISH", CHANNEL, "x"],
        &["EVAL", "return 1", "0"],
        &["FLUSHALL"],
        &["KEYS", "*"],
    ];
    for args in reader_may_not {
        assert!(!dry(&mut admin, "reader", args), "reader must not {args:?}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// (a) The agent mirrors under the shipped `edgecache` user, with
/// PUBLISH on the shipped channel, and a reader under the shipped `reader`
/// user reads keys and status and gets the notifications, but cannot write.
#[test]
fn agent_and_reader_under_the_shipped_acl() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("acl-mirror", 3, false, 0xac1);
    install_users(&redis, &[]);
    let config = Cfg {
        url: user_url(&redis, "edgecache", AGENT_PASSWORD),
        topic: &topic,
        publish: true,
        agent: "",
        topic_extra: "",
    }
    .write(dir.path());
    let mut subscriber = user_conn(&redis, "reader", READER_PASSWORD);
    let mut pubsub = subscriber.as_pubsub();
    pubsub.subscribe(CHANNEL).expect("reader subscribes");
    pubsub
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut log = Log::default();
    produce(&mut producer, &mut rng, &mut log, 2000, 300);
    producer.flush();
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    produce(&mut producer, &mut rng, &mut log, 300, 300);
    producer.flush();
    converges(&redis, &producer);
    wait_records(&redis, producer.n_sent);
    assert_consistent(
        &redis,
        &topic,
        &log,
        &producer.placed(),
        Counters::Total,
        "under the shipped ACL",
    );
    let mut notifications = 0;
    while let Ok(message) = pubsub.get_message() {
        let payload: String = message.get_payload().unwrap();
        assert!(
            payload.starts_with("set device:") || payload.starts_with("del device:"),
            "{payload}"
        );
        notifications += 1;
    }
    assert!(notifications > 0, "the reader got no notification");
    drop(pubsub);
    assert!(
        !agent.log_text().contains("NOPERM"),
        "the shipped ACL lacks something the agent uses:\n{}",
        agent.log_text()
    );
    // `edgecache status` works with the agent's own user.
    assert_eq!(status_json(&config)["records"], producer.n_sent);

    let mut reader = user_conn(&redis, "reader", READER_PASSWORD);
    let (key, _) = producer
        .last
        .iter()
        .find(|(_, v)| v.is_some())
        .expect("a live key");
    let key = format!("device:{}", String::from_utf8_lossy(key));
    let value: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut reader).unwrap();
    assert!(value.is_some(), "reader cannot GET {key}");
    // The agent installed the read functions under its user, and the reader
    // may call them.
    let json: String = redis::cmd("FCALL_RO")
        .arg("edgecache_get")
        .arg(1)
        .arg(&key)
        .query(&mut reader)
        .unwrap_or_else(|e| panic!("reader FCALL_RO edgecache_get {key}: {e}"));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(json["n"].is_u64(), "{key}: {json}");
    let status: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("edgecache:status")
        .query(&mut reader)
        .unwrap();
    assert_eq!(status["records"], producer.n_sent.to_string());
    let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("device:*")
        .arg("COUNT")
        .arg(1000)
        .query(&mut reader)
        .unwrap();
    assert!(!keys.is_empty(), "reader's SCAN found nothing");
    denied(
        redis::cmd("SET").arg(&key).arg("x").query(&mut reader),
        "reader SET",
    );
    denied(redis::cmd("DEL").arg(&key).query(&mut reader), "reader DEL");
    denied(
        redis::cmd("HSET")
            .arg("edgecache:offsets")
            .arg(format!("{topic}/0"))
            .arg("0")
            .query(&mut reader),
        "reader HSET of the offsets",
    );
    denied(
        redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg("x")
            .query(&mut reader),
        "reader PUBLISH",
    );
    let mut as_agent = user_conn(&redis, "edgecache", AGENT_PASSWORD);
    denied(
        redis::cmd("SET")
            .arg("other:x")
            .arg("1")
            .query(&mut as_agent),
        "agent SET outside its prefixes",
    );
    denied(
        redis::cmd("FLUSHALL").query(&mut as_agent),
        "agent FLUSHALL",
    );
    // Nothing the reader tried changed anything.
    converges(&redis, &producer);
}

/// (b) A permission the agent needs is missing at start: `edgecache run`
/// exits 78 with an error naming the command and the key pattern or channel,
/// and writes nothing (no data key, no offsets). Each case: (what, ACL
/// rules changed from the shipped ones, words the error must name).
fn missing_permission(cases: &[(&str, &[&str], &[&str])]) {
    let topic = unique("acl-missing");
    create_topic(&topic, 2);
    let mut producer = TestProducer::new(&topic);
    let mut rng = Rng::new(0x78);
    let mut log = Log::default();
    produce(&mut producer, &mut rng, &mut log, 200, 50);
    producer.flush();
    for (case, changes, named) in cases {
        let redis = Redis::start(false);
        install_users(&redis, changes);
        let dir = tempfile::tempdir().unwrap();
        let config = Cfg {
            url: user_url(&redis, "edgecache", AGENT_PASSWORD),
            topic: &topic,
            publish: true,
            agent: "",
            topic_extra: "",
        }
        .write(dir.path());
        let (code, text) = run_until_exit(&config, Duration::from_secs(20));
        assert_eq!(code, Some(78), "{case}: exit code; log:\n{text}");
        let lower = text.to_lowercase();
        for name in *named {
            assert!(
                lower.contains(&name.to_lowercase()),
                "{case}: the error must name {name:?}; log:\n{text}"
            );
        }
        assert!(
            redis.dump("device:").is_empty(),
            "{case}: data written before the permission check"
        );
        assert!(
            redis.hgetall("edgecache:offsets").is_empty(),
            "{case}: offsets written before the permission check"
        );
    }
}

#[test]
fn missing_permission_stops_the_agent_at_start() {
    missing_permission(&[
        ("no channel", &["resetchannels"], &["publish", CHANNEL]),
        ("no MSET", &["-mset"], &["mset"]),
        ("no EVALSHA", &["-evalsha"], &["evalsha"]),
        ("no data keys", &["resetkeys", "~edgecache:*"], &["device:"]),
    ]);
}

/// The commands only some paths use: HDEL (clearing status fields) and
/// HINCRBY (the resync sweep's `swept` counter, after its DELs, so a denied
/// one would leave a page's deletes uncounted).
#[test]
fn missing_hdel_or_hincrby_stops_the_agent_at_start() {
    missing_permission(&[
        ("no HDEL", &["-hdel"], &["hdel"]),
        ("no HINCRBY", &["-hincrby"], &["hincrby"]),
    ]);
}

/// (c) Issue 13's case: PUBLISH on the notification channel denied at run
/// time (`ACL SETUSER ... resetchannels`, Redis 7's default for new users)
/// with `publish_channel` set. No batch is half written, no retry counts
/// records again, status says `redis-unreachable` with NOPERM, and once the
/// permission is back everything converges exactly.
#[test]
fn publish_denied_at_run_time_writes_nothing_and_recovers() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("acl-runtime", 3, false, 0x13);
    install_users(&redis, &[]);
    let config = Cfg {
        url: user_url(&redis, "edgecache", AGENT_PASSWORD),
        topic: &topic,
        publish: true,
        agent: "max_batch_records = 64",
        topic_extra: "",
    }
    .write(dir.path());
    let mut log = Log::default();
    produce(&mut producer, &mut rng, &mut log, 1000, 400);
    producer.flush();
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_records(&redis, producer.n_sent);
    let before = snapshot(&redis);
    let records_before = before.status_records();

    acl_setuser(&redis, "edgecache", &["resetchannels".to_owned()]);
    produce(&mut producer, &mut rng, &mut log, 1000, 400);
    producer.flush();
    let placed = producer.placed();
    // Sample while denied: every sample equals the state before the denial
    // (each apply fails before its first write), and is consistent.
    let start = Instant::now();
    let mut saw_reason = false;
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(8) || !saw_reason {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no redis-unreachable state with NOPERM within 30 s; status: {:?}",
            snapshot(&redis).status
        );
        let snap = snapshot(&redis);
        let violations = check(&snap, &topic, &log, &placed, Counters::Total, false);
        assert!(violations.is_empty(), "while denied: {violations:#?}");
        assert_eq!(
            snap.data, before.data,
            "a data key changed while PUBLISH was denied: a half-written batch"
        );
        assert_eq!(
            snap.stored(&topic),
            before.stored(&topic),
            "offsets moved while PUBLISH was denied"
        );
        assert_eq!(
            snap.status_records(),
            records_before,
            "records counted again by a failed apply"
        );
        let (state, reason) = state_with_reason(&redis, "NOPERM");
        saw_reason |= state.as_deref() == Some("redis-unreachable") && reason;
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status_json(&config);
    assert_eq!(status["state"], "redis-unreachable", "{status}");
    assert!(status.to_string().contains("NOPERM"), "{status}");
    eprintln!("{samples} samples while denied, all unchanged");

    acl_setuser(&redis, "edgecache", &[format!("&{CHANNEL}")]);
    converges(&redis, &producer);
    wait_records(&redis, producer.n_sent);
    wait_until(CONVERGE, "state live again, the error cleared", || {
        let status = redis.hgetall("edgecache:status");
        status.get("state").map(String::as_str) == Some("live")
            && !status.values().any(|v| v.contains("NOPERM"))
    });
    assert_consistent(
        &redis,
        &topic,
        &log,
        &placed,
        Counters::PerPartition,
        "after the permission came back",
    );
    drop(agent);
}

/// (d) A foreign app turns one of the agent's own hashes into a string
/// mid-run: nothing is half written (every apply checks the types before its
/// first write), the log names the key, and once the key is removed the
/// agent converges with exact counters (after a restart, which recomputes
/// the totals).
fn foreign_type_change(own_key: &str, seed: u64) {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("foreign-type", 3, false, seed);
    let config = Cfg {
        url: redis.url(),
        topic: &topic,
        publish: false,
        agent: "max_batch_records = 64",
        topic_extra: "",
    }
    .write(dir.path());
    let mut log = Log::default();
    produce(&mut producer, &mut rng, &mut log, 1000, 400);
    producer.flush();
    let mut agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_records(&redis, producer.n_sent);
    let before = snapshot(&redis);
    let () = redis::pipe()
        .atomic()
        .del(own_key)
        .set(own_key, "a foreign app's string")
        .query(&mut redis.conn())
        .unwrap();
    produce(&mut producer, &mut rng, &mut log, 500, 400);
    producer.flush();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) || !agent.log_text().contains(own_key) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the log does not name {own_key} within 30 s"
        );
        assert_eq!(
            snapshot(&redis).data,
            before.data,
            "a data key changed while {own_key} was not a hash"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kind: String = redis::cmd("TYPE")
        .arg(own_key)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(kind, "string", "the agent overwrote the foreign key");
    eprintln!(
        "log lines naming {own_key}: {:#?}",
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains(own_key))
            .take(3)
            .collect::<Vec<_>>()
    );
    // The operator removes the foreign key.
    let () = redis::cmd("DEL")
        .arg(own_key)
        .query(&mut redis.conn())
        .unwrap();
    let (status, _) = agent.sigterm();
    assert!(status.success(), "exit status {status}");
    agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_until(CONVERGE, "every partition stored at its end", || {
        snapshot(&redis).stored(&topic).values().sum::<i64>() == producer.n_sent as i64
    });
    wait_records(&redis, producer.n_sent);
    assert_consistent(
        &redis,
        &topic,
        &log,
        &producer.placed(),
        Counters::PerPartition,
        "after the foreign key was removed",
    );
    // No error left over from the first run once Redis takes writes.
    wait_until(CONVERGE, "state live, no Redis error in the status", || {
        let status = redis.hgetall("edgecache:status");
        status.get("state").map(String::as_str) == Some("live")
            && !status.values().any(|v| v.contains("WRONGTYPE"))
    });
    drop(agent);
}

#[test]
fn foreign_type_of_status_hash() {
    foreign_type_change("edgecache:status", 0xd1);
}

#[test]
fn foreign_type_of_offsets_hash() {
    foreign_type_change("edgecache:offsets", 0xd2);
}

// ------------------------------------------------------------------- TTL

/// (f) A far-future record timestamp (up to i64::MAX; Kafka takes it with
/// `message.timestamp.after.max.ms` at its maximum) on a topic with
/// `ttl_secs` gives the longest expiry Redis accepts: the key exists with a
/// PTTL beyond any real lifetime, never a delete and never a crash.
#[test]
fn far_future_timestamp_with_ttl_keeps_the_key() {
    let topic = unique("ttl-far");
    create_topic_configs(
        &topic,
        1,
        &[
            ("cleanup.policy", "compact"),
            ("message.timestamp.type", "CreateTime"),
            ("message.timestamp.after.max.ms", &i64::MAX.to_string()),
        ],
    );
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let config = Cfg {
        url: redis.url(),
        topic: &topic,
        publish: false,
        agent: "",
        topic_extra: "ttl_secs = 3600",
    }
    .write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let ttl_ms = 3_600_000;
    let now = edgecache::sink::now_ms();
    let cases = [
        ("max", i64::MAX),
        ("max-1", i64::MAX - 1),
        ("just-overflows", i64::MAX - ttl_ms + 1),
        ("year-292M", i64::MAX / 1000),
        ("now", now),
    ];
    for (key, ts) in cases {
        let value = format!(r#"{{"ts":"{ts}"}}"#);
        producer.send_full(Some(key.as_bytes()), Some(value.as_bytes()), None, Some(ts));
        producer
            .last
            .insert(key.as_bytes().to_vec(), Some(value.into_bytes()));
    }
    producer.flush();
    let mut agent = Agent::start(&config);
    converges(&redis, &producer);
    for (key, ts) in cases {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("device:{key}"))
            .query(&mut redis.conn())
            .unwrap();
        if key == "now" {
            assert!(
                pttl > 0 && pttl <= ttl_ms,
                "{key}: PTTL {pttl}, expected the topic's TTL"
            );
        } else {
            // Beyond a hundred years: no overflow to the past, no short
            // expiry.
            assert!(
                pttl > 100 * 365 * 86_400 * 1000,
                "{key} (timestamp {ts}): PTTL {pttl}"
            );
        }
    }
    assert!(agent.is_running(), "agent died:\n{}", agent.log_text());
    assert_eq!(redis.status_counter("records"), producer.n_sent);
}

// -------------------------------------------------------------- torn AOF

/// One command of an append-only file: its byte range and its name.
struct AofCommand {
    start: usize,
    end: usize,
    name: String,
}

/// Splits an AOF (RESP arrays of bulk strings) into its commands; a torn
/// tail (an incomplete last command) is left out.
fn parse_aof(bytes: &[u8]) -> Vec<AofCommand> {
    fn line(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = at + bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&bytes[at..end], end + 2))
    }
    let number = |text: &[u8]| -> usize { std::str::from_utf8(text).unwrap().parse().unwrap() };
    let mut out = Vec::new();
    let mut at = 0;
    'commands: while at < bytes.len() {
        let start = at;
        let Some((head, mut next)) = line(bytes, at) else {
            break;
        };
        assert_eq!(head[0], b'*', "AOF command at {start} is not an array");
        let mut name = String::new();
        for i in 0..number(&head[1..]) {
            let Some((len, body)) = line(bytes, next) else {
                break 'commands;
            };
            let end = body + number(&len[1..]);
            if end + 2 > bytes.len() {
                break 'commands;
            }
            if i == 0 {
                name = String::from_utf8_lossy(&bytes[body..end]).to_uppercase();
            }
            next = end + 2;
        }
        out.push(AofCommand {
            start,
            end: next,
            name,
        });
        at = next;
    }
    out
}

/// The last incremental file named by the multi-part AOF's manifest
/// (Redis 7: `appenddirname`, `appendonlydir` by default).
fn incr_file(redis: &Redis) -> PathBuf {
    let dir = redis.dir.path().join("appendonlydir");
    let manifest = std::fs::read_to_string(dir.join("appendonly.aof.manifest"))
        .expect("the AOF manifest (Redis 7 multi-part AOF)");
    let name = manifest
        .lines()
        .rev()
        .filter(|l| l.ends_with("type i"))
        .find_map(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no incr file in the manifest:\n{manifest}"));
    dir.join(name)
}

/// Where a cut lands, relative to the transaction it tears.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CutKind {
    InsideCommand,
    BetweenCommands,
    AfterMulti,
    BeforeExec,
    /// Between two commands of a MULTI, and an EXEC appended: the kept
    /// prefix loads as if it had been committed. Redis 7.0 never applies a
    /// torn MULTI on its own, only merged into the next transaction, whose
    /// writes mostly cover the same partitions again; this kind checks the
    /// order of the apply's writes directly ("any prefix is safe").
    PrefixCommitted,
}

/// Picks a cut inside one of the last three transactions of `commands`.
fn choose_cut(commands: &[AofCommand], rng: &mut Rng) -> (CutKind, usize) {
    let mut transactions = Vec::new();
    let mut open = None;
    for (i, c) in commands.iter().enumerate() {
        match c.name.as_str() {
            "MULTI" => open = Some(i),
            "EXEC" => {
                if let Some(m) = open.take() {
                    transactions.push((m, i));
                }
            }
            _ => {}
        }
    }
    assert!(
        !transactions.is_empty(),
        "no MULTI/EXEC in the AOF: the agent applied nothing this round"
    );
    let last = &transactions[transactions.len().saturating_sub(3)..];
    let (multi, exec) = last[rng.below(last.len() as u64) as usize];
    let kind = match rng.below(5) {
        0 => CutKind::InsideCommand,
        1 if exec - multi >= 3 => CutKind::BetweenCommands,
        1 => CutKind::InsideCommand,
        2 => CutKind::AfterMulti,
        3 => CutKind::BeforeExec,
        _ => CutKind::PrefixCommitted,
    };
    let at = match kind {
        CutKind::InsideCommand => {
            // Any command of the transaction, its EXEC included.
            let c = &commands[multi + 1 + rng.below((exec - multi) as u64) as usize];
            c.start + 1 + rng.below((c.end - c.start - 1) as u64) as usize
        }
        CutKind::BetweenCommands => {
            // After the first, before the last command inside.
            commands[multi + 1 + rng.below((exec - multi - 2) as u64) as usize].end
        }
        CutKind::AfterMulti => commands[multi].end,
        CutKind::BeforeExec => commands[exec].start,
        // After MULTI or after any command inside (the whole transaction
        // included).
        CutKind::PrefixCommitted => {
            commands[multi + 1 + rng.below((exec - multi - 1) as u64) as usize].end
        }
    };
    (kind, at)
}

/// How many MULTIs the AOF holds inside another MULTI: torn transactions
/// that a load merged into the following one (Redis logs "MULTI calls can
/// not be nested" for each).
fn nested_multis(commands: &[AofCommand]) -> usize {
    let mut open = false;
    let mut n = 0;
    for c in commands {
        match c.name.as_str() {
            "MULTI" if open => n += 1,
            "MULTI" => open = true,
            "EXEC" => open = false,
            _ => {}
        }
    }
    n
}

fn redis_pid(redis: &Redis) -> u32 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("process_id in INFO server")
        .trim()
        .parse()
        .unwrap()
}

/// (e) Power cut that tears the append-only file inside transactions.
/// Each round: the agent runs while records are produced; agent and
/// redis-server are SIGKILLed at the same instant; the AOF's incr file is
/// cut inside one of its last three transactions (inside a command, between
/// two commands of a MULTI, right after a MULTI, right before its EXEC, or a
/// prefix of it completed by an EXEC; seeded); redis-server restarts (`aof-load-truncated yes`, Redis 7.0's
/// default, keeps what it can), and the next round's agent writes after
/// whatever the cut left, so a dangling MULTI is followed by new writes and
/// the next load merges it. After every round: no value newer than its
/// partition's stored offset, no offset ahead of its data, per-partition
/// counters equal to the offsets; while the agent runs, the total too. At
/// the end: the oracle.
#[test]
fn torn_aof_power_cut() {
    let (rounds, seed) = rounds_and_seed("EDGECACHE_TORN", 30);
    const CHUNK: usize = 1000;
    const KEYS: u64 = 400;
    eprintln!("torn AOF: seed {seed}, {rounds} rounds of {CHUNK} records");
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let topic = unique("torn");
    create_topic(&topic, 4);
    let mut redis = Redis::start(true);
    let dir = tempfile::tempdir().unwrap();
    let config = Cfg {
        url: redis.url(),
        topic: &topic,
        publish: false,
        // Small transactions: many of them, several per partition.
        agent: "max_batch_records = 32",
        topic_extra: "",
    }
    .write(dir.path());
    let mut producer = TestProducer::new(&topic);
    let mut log = Log::default();
    let mut cuts: BTreeMap<CutKind, usize> = BTreeMap::new();
    let (mut bytes_cut, mut merged) = (0, 0);
    for round in 0..rounds {
        let fsync = if rng.below(2) == 0 {
            "always"
        } else {
            "everysec"
        };
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(fsync)
            .query(&mut redis.conn())
            .unwrap();
        let mut agent = Agent::start(&config);
        produce(&mut producer, &mut rng, &mut log, CHUNK / 2, KEYS);
        producer.flush();
        // All of it: values a committed prefix left ahead of the offsets are
        // then behind them again, and the strict check holds.
        let want = producer.n_sent as i64;
        wait_until(CONVERGE, "the agent to apply the first half", || {
            snapshot(&redis).stored(&topic).values().sum::<i64>() >= want
        });
        // The agent has reconnected and applied: the total is exact again.
        assert_consistent(
            &redis,
            &topic,
            &log,
            &producer.placed(),
            Counters::PerPartition,
            &format!("seed {seed} round {round}, agent running"),
        );
        produce(&mut producer, &mut rng, &mut log, CHUNK / 2, KEYS);
        std::thread::sleep(Duration::from_millis(rng.below(15)));
        // The same instant for both: one kill(1) with both pids.
        let status = Command::new("kill")
            .args(["-KILL", &agent.pid().to_string()])
            .arg(redis_pid(&redis).to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL");
        agent.sigkill();
        redis.kill();
        producer.flush();

        let incr = incr_file(&redis);
        let bytes = std::fs::read(&incr).unwrap();
        let commands = parse_aof(&bytes);
        // The file only grows but for the cuts, which never reach back to
        // an earlier round: the last count is the run's.
        merged = nested_multis(&commands);
        let (kind, at) = choose_cut(&commands, &mut rng);
        *cuts.entry(kind).or_default() += 1;
        bytes_cut += bytes.len() - at;
        let mut file = std::fs::OpenOptions::new().write(true).open(&incr).unwrap();
        file.set_len(at as u64).unwrap();
        if kind == CutKind::PrefixCommitted {
            use std::io::{Seek, SeekFrom};
            file.seek(SeekFrom::End(0)).unwrap();
            file.write_all(b"*1\r\n$4\r\nEXEC\r\n").unwrap();
        }
        drop(file);
        redis.restart();
        let what = format!(
            "seed {seed} round {round}: cut {kind:?} at {at} of {} bytes, fsync {fsync}",
            bytes.len()
        );
        // Before the agent reconnects only the total may be off (a merged
        // half transaction can replay a status write). A committed prefix
        // may leave data ahead of the offsets (read again, harmlessly),
        // never offsets ahead of the data.
        assert_consistent_with(
            &redis,
            &topic,
            &log,
            &producer.placed(),
            Counters::PerPartitionOnly,
            kind == CutKind::PrefixCommitted,
            &what,
        );
        eprintln!("{what}: consistent");
    }
    let agent = Agent::start(&config);
    assert_converges(
        &redis,
        "device:",
        StoreFormat::Postcard,
        &producer,
        Duration::from_secs(120),
    );
    wait_records(&redis, producer.n_sent);
    assert_consistent(
        &redis,
        &topic,
        &log,
        &producer.placed(),
        Counters::PerPartition,
        &format!("seed {seed} at the end"),
    );
    drop(agent);
    eprintln!(
        "torn AOF passed: seed {seed}, {rounds} rounds, {} records, cuts {cuts:?}, {bytes_cut} bytes cut, \
         {merged} torn MULTIs merged into the next transaction, 0 violations, {:.0} s",
        producer.n_sent,
        started.elapsed().as_secs_f64()
    );
}
