//! Outages of Redis and of the Kafka broker, mid-stream, against the real
//! services. The agent must stay up, keep its RSS within the memory budget
//! the whole time, never store an offset past what Redis has, and converge
//! afterwards. One test function, so the broker outage never overlaps
//! another test of this binary (other test binaries run before or after).
//!
//! `EDGECACHE_OUTAGE_SECS` sets each outage's length (default 30).

mod util;

use edgecache::codec::StoreFormat;
use edgecache::config::FIXED_COST_MIB;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use util::*;

const BUDGET_MIB: u64 = 32;

/// A `/proc/<pid>/status` figure in KiB (0 once the process is gone).
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the agent's resident set every 100 ms; returns the peak in KiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let (stop2, peak2) = (stop.clone(), peak_kib.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                peak2.fetch_max(proc_kib(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peak_kib,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak_kib.load(Ordering::Relaxed)
    }
}

fn services(command: &str) {
    let status = std::process::Command::new("bash")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/services.sh"),
            command,
        ])
        .status()
        .unwrap();
    assert!(status.success(), "tests/services.sh {command} failed");
}

fn state(redis: &Redis) -> String {
    redis
        .hgetall("edgecache:status")
        .get("state")
        .cloned()
        .unwrap_or_default()
}

fn last_kafka_contact_ms(redis: &Redis) -> i64 {
    redis.hgetall("edgecache:status")["last_kafka_contact_ms"]
        .parse()
        .unwrap()
}

#[test]
fn redis_and_kafka_outages() {
    let outage = Duration::from_secs(
        std::env::var("EDGECACHE_OUTAGE_SECS")
            .map(|s| s.parse().unwrap())
            .unwrap_or(30),
    );
    let Setup {
        topic,
        mut redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("outage", 3, true, 0x0a7a6e);
    // The budget sets aside a fixed cost for the process itself (release
    // binary: ~10 MiB) and bounds the buffers with the rest. The binary
    // under test may be a debug build, several times larger: measure its
    // fixed cost (an agent live on an empty topic) and check that the
    // buffers stay within their share on top of it.
    let idle_kib = {
        let empty = unique("outage-empty");
        create_topic(&empty, 1);
        let mut config = AgentConfig::new(redis.url(), &empty, "empty:");
        config.extra_agent = format!("memory_budget_mib = {BUDGET_MIB}");
        config.extra_redis = "namespace = \"idle\"".into();
        let mut idle = Agent::start(&config.write(dir.path()));
        wait_until(Duration::from_secs(60), "the idle agent live", || {
            redis
                .hgetall("idle:status")
                .get("state")
                .map(String::as_str)
                == Some("live")
        });
        std::thread::sleep(Duration::from_secs(2));
        let kib = proc_kib(idle.pid(), "VmRSS:");
        idle.sigterm();
        kib
    };
    let buffers_kib = (BUDGET_MIB - FIXED_COST_MIB as u64) * 1024;
    eprintln!("the binary's fixed cost: {idle_kib} KiB idle; buffers' share {buffers_kib} KiB");
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = format!("memory_budget_mib = {BUDGET_MIB}");
    let config = config.write(dir.path());
    producer.random_states(&mut rng, 20_000, 3000);
    let mut agent = Agent::start(&config);
    let rss = RssSampler::start(agent.pid());
    assert_converges(
        &redis,
        "device:",
        StoreFormat::Postcard,
        &producer,
        Duration::from_secs(60),
    );

    // Redis down (persistent: AOF): records keep arriving; the agent keeps
    // its batch, does not poll further, and resumes where Redis left off.
    redis.kill();
    let outage_start = std::time::Instant::now();
    while outage_start.elapsed() < outage {
        producer.random_states(&mut rng, 2_000, 3000);
        std::thread::sleep(Duration::from_secs(2));
        assert!(agent.is_running(), "agent died during the Redis outage");
    }
    redis.restart();
    assert_converges(
        &redis,
        "device:",
        StoreFormat::Postcard,
        &producer,
        Duration::from_secs(60),
    );
    wait_until(Duration::from_secs(30), "records counted once", || {
        redis.status_counter("records") == producer.n_sent
    });
    assert!(
        agent.log_text().contains("keeping the batch and retrying"),
        "the outage was not noticed"
    );

    // Kafka down: Redis keeps serving the last state; the agent reports it.
    let before = redis.dump("device:");
    services("kafka-stop");
    let outage_start = std::time::Instant::now();
    let outage_start_ms = edgecache::sink::now_ms();
    wait_until(
        outage + Duration::from_secs(30),
        "state kafka-unreachable",
        || state(&redis) == "kafka-unreachable",
    );
    while outage_start.elapsed() < outage {
        assert_eq!(
            redis.dump("device:"),
            before,
            "Redis must keep serving the last state"
        );
        assert!(agent.is_running(), "agent died during the Kafka outage");
        std::thread::sleep(Duration::from_secs(1));
    }
    // The last contact stays where the broker went away: nothing claims
    // contact during the outage (a second of slack for clocks).
    let contact = last_kafka_contact_ms(&redis);
    assert!(
        contact <= outage_start_ms + 1000,
        "last_kafka_contact_ms {contact} is after the broker stopped at {outage_start_ms}"
    );
    services("kafka-resume");
    let resumed_ms = edgecache::sink::now_ms();
    producer.random_states(&mut rng, 2_000, 3000);
    assert_converges(
        &redis,
        "device:",
        StoreFormat::Postcard,
        &producer,
        Duration::from_secs(120),
    );
    wait_until(Duration::from_secs(60), "state live again", || {
        state(&redis) == "live"
    });
    wait_until(Duration::from_secs(30), "a new Kafka contact", || {
        last_kafka_contact_ms(&redis) >= resumed_ms
    });
    assert_eq!(redis.status_counter("records"), producer.n_sent);

    let peak_kib = rss.finish();
    eprintln!("peak RSS through both outages: {} KiB", peak_kib);
    assert!(
        peak_kib <= idle_kib.max(FIXED_COST_MIB as u64 * 1024) + buffers_kib,
        "RSS peaked at {peak_kib} KiB: over the {BUDGET_MIB} MiB budget's buffer share \
         ({buffers_kib} KiB) on top of the binary's idle {idle_kib} KiB"
    );
    let (status, _) = agent.sigterm();
    assert!(status.success());
}
