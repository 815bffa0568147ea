//! What a local app pays to read one device state, by way of reading it:
//! a plain GET of the json store, FCALL_RO edgecache_get on the postcard
//! and json stores, a GET of the postcard bytes (decoded by the client),
//! and the hash store (`store = "hash"`): HGETALL of the whole state, HGET
//! of one field, and FCALL_RO edgecache_get on it.
//!
//! `cargo bench --bench read_cost` starts its own redis-server (no
//! persistence, TCP on 127.0.0.1, like a local app), fills it with typical
//! device states, and prints per read: client round-trip p50/p99 (one
//! synchronous connection, one request at a time) and Redis CPU (the
//! server process's user+system time over the run, network handling
//! included, and commandstats' usec_per_call, the command alone).
//! `READ_COST_OPS=N` sets the reads per row (default 50000).

use edgecache::codec::{self, Fields, InputFormat, StoreFormat};
use edgecache::config::TopicSettings;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEYS: usize = 1000;
/// Enough distinct states that most reads miss the functions' memo of
/// recent values (2048 entries): the cost of decoding.
const COLD_KEYS: usize = 20_000;

fn state(i: usize) -> String {
    format!(
        r#"{{"device":"sensor-{i}","temp_c":{}.{},"humidity":{}.{},"battery_v":3.{:02},"rssi":-{},"online":{},"fw":"1.4.2","alarms":[],"location":{{"site":"plant-{}","rack":{}}},"updated_ms":{}}}"#,
        15 + i % 15,
        i % 10,
        30 + i % 40,
        (i * 7) % 10,
        50 + i % 50,
        40 + i % 50,
        i % 7 != 0,
        i % 4,
        i % 32,
        1_767_225_600_000u64 + i as u64 * 997
    )
}

fn topic(prefix: &str, store: StoreFormat) -> TopicSettings {
    TopicSettings {
        name: prefix.into(),
        key_prefix: prefix.as_bytes().to_vec(),
        input: InputFormat::Json,
        store,
        only_prefix: None,
        only_matching: None,
        partitions: None,
        ttl_ms: None,
    }
}

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let server = Server {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&server).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn connect(server: &Server) -> redis::RedisResult<redis::Connection> {
    let mut conn =
        redis::Client::open(format!("redis://127.0.0.1:{}/0", server.port))?.get_connection()?;
    redis::cmd("PING").query::<String>(&mut conn)?;
    Ok(conn)
}

/// The server process's CPU time so far (utime + stime from /proc).
fn server_cpu(server: &Server) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.child.id())).unwrap();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // CLK_TCK is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn usec_per_call(conn: &mut redis::Connection, command: &str) -> f64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("usec_per_call="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A table row: its label, the commandstats name, and the command for a
/// random number.
type Row = (&'static str, &'static str, fn(usize) -> redis::Cmd);

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1e6
}

fn main() {
    // `cargo bench` passes --bench; nothing else is understood.
    let ops: usize = std::env::var("READ_COST_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let server = start_redis();
    let mut conn = connect(&server).unwrap();
    let topics = [
        topic("p:", StoreFormat::Postcard),
        topic("j:", StoreFormat::Json),
        topic("c:", StoreFormat::Postcard),
        topic("d:", StoreFormat::Json),
        topic("h:", StoreFormat::Hash),
    ];
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(edgecache::functions::library("edgecache", &topics))
        .query(&mut conn)
        .unwrap();
    let mut fields = Fields::new();
    let mut out = Vec::new();
    let (mut postcard_bytes, mut json_bytes, mut hash_bytes) = (0, 0, 0);
    for i in 0..KEYS {
        let text = state(i);
        codec::transcode(
            InputFormat::Json,
            StoreFormat::Postcard,
            text.as_bytes(),
            Some(1_767_225_600_000),
            &mut fields,
            &mut out,
        )
        .unwrap();
        postcard_bytes += out.len();
        let _: () = redis::cmd("SET")
            .arg(format!("p:{}", i % KEYS))
            .arg(&out)
            .query(&mut conn)
            .unwrap();
        codec::transcode(
            InputFormat::Json,
            StoreFormat::Json,
            text.as_bytes(),
            None,
            &mut fields,
            &mut out,
        )
        .unwrap();
        json_bytes += out.len();
        let _: () = redis::cmd("SET")
            .arg(format!("j:{}", i % KEYS))
            .arg(&out)
            .query(&mut conn)
            .unwrap();
        // `store = "hash"`: top-level fields, nested values as compact JSON.
        codec::transcode(
            InputFormat::Json,
            StoreFormat::Hash,
            text.as_bytes(),
            None,
            &mut fields,
            &mut out,
        )
        .unwrap();
        let mut hset = redis::cmd("HSET");
        hset.arg(format!("h:{}", i % KEYS));
        for (name, text) in codec::hash_pairs(&out) {
            hash_bytes += name.len() + text.len();
            hset.arg(name).arg(text);
        }
        let _: () = hset.query(&mut conn).unwrap();
    }
    for i in 0..COLD_KEYS {
        let text = state(i + KEYS);
        for (prefix, store) in [("c", StoreFormat::Postcard), ("d", StoreFormat::Json)] {
            codec::transcode(
                InputFormat::Json,
                store,
                text.as_bytes(),
                Some(1_767_225_600_000),
                &mut fields,
                &mut out,
            )
            .unwrap();
            let _: () = redis::cmd("SET")
                .arg(format!("{prefix}:{i}"))
                .arg(&out)
                .query(&mut conn)
                .unwrap();
        }
    }
    let mut table = redis::cmd("HSET");
    table.arg("edgecache:fields");
    for id in 0..fields.len() as u32 {
        table.arg(id).arg(fields.name(id).unwrap());
    }
    let _: () = table.query(&mut conn).unwrap();
    let _: () = redis::cmd("SET")
        .arg("edgecache:marker")
        .arg("bench")
        .query(&mut conn)
        .unwrap();
    println!(
        "{KEYS} device states; value bytes per key: postcard {}, json {}, hash fields+values {}; {ops} reads per row",
        postcard_bytes / KEYS,
        json_bytes / KEYS,
        hash_bytes / KEYS
    );
    let rows: [Row; 9] = [
        ("GET, json store", "get", |i| {
            let mut c = redis::cmd("GET");
            c.arg(format!("j:{}", i % KEYS));
            c
        }),
        ("FCALL_RO edgecache_get, postcard store", "fcall_ro", |i| {
            let mut c = redis::cmd("FCALL_RO");
            c.arg("edgecache_get").arg(1).arg(format!("p:{}", i % KEYS));
            c
        }),
        ("FCALL_RO edgecache_get, json store", "fcall_ro", |i| {
            let mut c = redis::cmd("FCALL_RO");
            c.arg("edgecache_get").arg(1).arg(format!("j:{}", i % KEYS));
            c
        }),
        (
            "FCALL_RO edgecache_get, postcard store, 20000 keys (memo misses)",
            "fcall_ro",
            |i| {
                let mut c = redis::cmd("FCALL_RO");
                c.arg("edgecache_get")
                    .arg(1)
                    .arg(format!("c:{}", i % COLD_KEYS));
                c
            },
        ),
        (
            "FCALL_RO edgecache_get, json store, 20000 keys (memo misses)",
            "fcall_ro",
            |i| {
                let mut c = redis::cmd("FCALL_RO");
                c.arg("edgecache_get")
                    .arg(1)
                    .arg(format!("d:{}", i % COLD_KEYS));
                c
            },
        ),
        ("GET, postcard store (client decodes)", "get", |i| {
            let mut c = redis::cmd("GET");
            c.arg(format!("p:{}", i % KEYS));
            c
        }),
        ("HGETALL, hash store", "hgetall", |i| {
            let mut c = redis::cmd("HGETALL");
            c.arg(format!("h:{}", i % KEYS));
            c
        }),
        ("HGET one field, hash store", "hget", |i| {
            let mut c = redis::cmd("HGET");
            c.arg(format!("h:{}", i % KEYS)).arg("temp_c");
            c
        }),
        ("FCALL_RO edgecache_get, hash store", "fcall_ro", |i| {
            let mut c = redis::cmd("FCALL_RO");
            c.arg("edgecache_get").arg(1).arg(format!("h:{}", i % KEYS));
            c
        }),
    ];
    println!("| read | p50 µs | p99 µs | Redis CPU µs/read (process) | usec_per_call (command) |");
    println!("|------|--------|--------|-----------------------------|-------------------------|");
    for (name, stat, command) in rows {
        // Warm up: the first FCALL builds the library's tables.
        for i in 0..1000 {
            let _: redis::Value = command(i).query(&mut conn).unwrap();
        }
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut conn)
            .unwrap();
        let mut latencies = Vec::with_capacity(ops);
        let cpu_before = server_cpu(&server);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..ops {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let command = command(seed as usize);
            let start = Instant::now();
            let reply: redis::Value = command.query(&mut conn).unwrap();
            latencies.push(start.elapsed());
            assert!(!matches!(
                reply,
                redis::Value::Nil | redis::Value::ServerError(_)
            ));
        }
        let cpu = server_cpu(&server) - cpu_before;
        latencies.sort();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.2} |",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            cpu.as_secs_f64() * 1e6 / ops as f64,
            usec_per_call(&mut conn, stat)
        );
    }
}
