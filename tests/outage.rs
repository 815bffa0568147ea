//! Outages of Redis and of the Kafka broker, mid-stream, against the real
//! services. The agent must stay up, keep its RSS within the memory budget
//! the whole time, never store an offset past what Redis has, and converge
//! afterwards. One test function, so the broker outage never overlaps
//! another test of this binary (other test binaries run before or after).
//!
//! `EDGECACHE_OUTAGE_SECS` sets each outage's length (default 30).

mod util;

use edgecache::codec::StoreFormat;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use util::*;

const BUDGET_MIB: u64 = 32;

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
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                    break;
                };
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak2.fetch_max(kib, Ordering::Relaxed);
                }
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
        peak_kib <= BUDGET_MIB * 1024,
        "RSS peaked at {peak_kib} KiB, over the {BUDGET_MIB} MiB budget"
    );
    let (status, _) = agent.sigterm();
    assert!(status.success());
}
