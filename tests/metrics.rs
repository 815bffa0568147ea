//! The metrics endpoint and the status fields of issue #5, against the real
//! broker and real redis-servers: values scraped over plain TCP must match
//! what was produced and applied; the endpoint must bound its clients; no
//! socket listens unless `[metrics] listen` is set (G8); a non-loopback
//! address needs `allow_remote`.

mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use util::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// One HTTP request over a plain TcpStream: (status line, body).
fn http(port: u16, request: &[u8]) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("the endpoint answers and closes");
    let text = String::from_utf8(response).expect("a text response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// `name{labels}` -> value, for every sample line of a scrape.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("sample line");
            (name.to_owned(), value.parse().expect("numeric sample"))
        })
        .collect()
}

/// TCP ports the process listens on, from its socket fds and the kernel's
/// tables (what `ss -ltnp` shows, without needing ss).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .trim_end_matches(']')
                    .to_owned(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // st 0A = LISTEN; field 9 is the socket's inode.
            if fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// With `[metrics]` on: the scraped counters equal what was produced, lag
/// is 0 per partition after convergence, RSS and the contact age are sane;
/// the status hash carries `last_kafka_contact_ms` and `lag.<topic>/<p>`;
/// slow, oversized and surplus clients are cut off without blocking scrapes.
#[test]
fn metrics_match_what_was_applied() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("metrics", 3, false, 0x3e7c5);
    let port = free_port();
    let mut config = AgentConfig::new(redis.url(), &topic, "device:");
    config.extra_agent = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let config = config.write(dir.path());
    producer.random_states(&mut rng, 3000, 300);
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    wait_until(CONVERGE, "state live", || {
        redis.state().as_deref() == Some("live")
    });
    producer.random_states(&mut rng, 500, 300);
    converges(&redis, &producer);

    let mut metrics = BTreeMap::new();
    wait_until(CONVERGE, "metrics to show every record and lag 0", || {
        metrics = scrape(port);
        metrics.get("edgecache_records_applied_total") == Some(&(producer.n_sent as f64))
            && metrics.get("edgecache_lag_records") == Some(&0.0)
            && metrics.get("edgecache_state{state=\"live\"}") == Some(&1.0)
    });
    for partition in 0..3 {
        let name = format!(
            "edgecache_partition_lag_records{{topic=\"{topic}\",partition=\"{partition}\"}}"
        );
        assert_eq!(metrics.get(&name), Some(&0.0), "{name} in {metrics:#?}");
    }
    assert_eq!(metrics["edgecache_state{state=\"rehydrating\"}"], 0.0);
    // random_states sends ~10% tombstones; deletes count after coalescing.
    assert!(metrics["edgecache_deletes_applied_total"] > 0.0);
    assert!(metrics["edgecache_deletes_applied_total"] < producer.n_sent as f64 / 5.0);
    assert_eq!(metrics["edgecache_records_filtered_total"], 0.0);
    assert_eq!(
        metrics["edgecache_records_skipped_total{reason=\"undecodable\"}"],
        0.0
    );
    let batches = metrics["edgecache_batch_keys_count"];
    assert!(batches >= 1.0);
    let keys_written = metrics["edgecache_batch_keys_sum"];
    assert!(
        keys_written >= 300.0 && keys_written <= producer.n_sent as f64,
        "{keys_written}"
    );
    // The default max_batch_records is 96: no batch writes more keys.
    // The backlog of 3,000 records over 300 keys fills batches to the cap.
    assert!(metrics["edgecache_batch_keys_bucket{le=\"64\"}"] < batches);
    assert_eq!(metrics["edgecache_batch_keys_bucket{le=\"128\"}"], batches);
    assert_eq!(metrics["edgecache_redis_apply_seconds_count"], batches);
    assert!(metrics["edgecache_redis_apply_seconds_sum"] > 0.0);
    // Record age counts live records only: the 500 sent after the backlog,
    // applied within seconds of their (this machine's) timestamps.
    assert_eq!(metrics["edgecache_live_record_age_seconds_count"], 500.0);
    assert_eq!(
        metrics["edgecache_live_record_age_seconds_bucket{le=\"30\"}"], 500.0,
        "{metrics:#?}"
    );
    assert_eq!(metrics["edgecache_rehydrates_total"], 0.0);
    assert_eq!(metrics["edgecache_redis_errors_total"], 0.0);
    assert_eq!(metrics["edgecache_kafka_errors_total"], 0.0);
    assert!(metrics.contains_key("edgecache_kafka_client_errors_total"));
    let rss = metrics["process_resident_memory_bytes"];
    assert!(rss > 1e6 && rss < 256e6, "RSS {rss}");
    assert!(metrics.contains_key("edgecache_kafka_fetch_queue_records"));
    assert!(metrics.contains_key("edgecache_kafka_fetch_queue_bytes"));
    let age = metrics["edgecache_kafka_last_contact_age_seconds"];
    assert!((0.0..5.0).contains(&age), "last contact {age} s ago");

    // The same facts in the status hash, for apps that only read Redis.
    wait_until(
        CONVERGE,
        "per-partition lag fields in the status hash",
        || {
            let status = redis.hgetall("edgecache:status");
            (0..3).all(|p| status.get(&format!("lag.{topic}/{p}")).map(String::as_str) == Some("0"))
        },
    );
    let status = redis.hgetall("edgecache:status");
    let contact: i64 = status["last_kafka_contact_ms"].parse().unwrap();
    let now = edgecache::sink::now_ms();
    assert!(
        (now - 5_000..=now).contains(&contact),
        "last_kafka_contact_ms {contact}, now {now}"
    );
    let (code, stdout, stderr) =
        run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(json["last_kafka_contact_ms"].is_i64(), "{json}");
    assert_eq!(json[format!("lag.{topic}/2")], 0, "{json}");
    let (_, stdout, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(stdout.contains("kafka contact "), "{stdout}");
    assert!(!stdout.contains("kafka contact never"), "{stdout}");

    // Exactly one listening socket: the endpoint (the G8 check below has
    // something to find).
    assert_eq!(listening_ports(agent.pid()), vec![port]);

    // Other paths and methods, and a request over the size cap.
    assert_eq!(
        http(port, b"GET / HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http(port, b"POST /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.resize(edgecache::metrics::MAX_REQUEST_BYTES, b'a');
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(&huge);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "oversized request: {answer:?}"
    );

    // Clients that connect and send nothing: up to 4 are served at once,
    // the 5th is closed at once, and each is cut off after 2 s, after
    // which scrapes work again.
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut surplus = TcpStream::connect(("127.0.0.1", port)).unwrap();
    surplus
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    assert!(matches!(surplus.read(&mut buf), Ok(0) | Err(_)));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "surplus client kept"
    );
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)));
    }
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "idle clients held {:?}",
        start.elapsed()
    );
    assert_eq!(
        scrape(port)["edgecache_records_applied_total"],
        producer.n_sent as f64
    );
}

/// G8: without `[metrics]` the agent listens on nothing.
#[test]
fn no_listener_unless_configured() {
    let Setup {
        topic,
        redis,
        dir,
        mut producer,
        mut rng,
    } = Setup::new("metrics-off", 1, false, 0x0ff);
    let config = AgentConfig::new(redis.url(), &topic, "device:").write(dir.path());
    producer.random_states(&mut rng, 100, 20);
    let agent = Agent::start(&config);
    converges(&redis, &producer);
    assert_eq!(listening_ports(agent.pid()), Vec::<u16>::new());
}

/// With no broker to talk to, nothing claims a Kafka contact: no contact
/// metric, no `last_kafka_contact_ms`, `kafka contact never`; the state and
/// librdkafka's errors show why.
#[test]
fn no_kafka_contact_without_a_broker() {
    let redis = Redis::start(false);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("nokafka.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:{}\"\n[redis]\nurl = \"{}\"\n\
             [[topics]]\nname = \"t\"\nkey_prefix = \"device:\"\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            free_port(),
            redis.url()
        ),
    )
    .unwrap();
    let _agent = Agent::start(&path);
    let mut metrics = BTreeMap::new();
    wait_until(
        CONVERGE,
        "state kafka-unreachable with errors counted",
        || {
            // The agent may not be listening yet.
            if TcpStream::connect(("127.0.0.1", port)).is_err() {
                return false;
            }
            metrics = scrape(port);
            metrics.get("edgecache_state{state=\"kafka-unreachable\"}") == Some(&1.0)
                && metrics["edgecache_kafka_client_errors_total"] > 0.0
        },
    );
    assert!(
        !metrics.contains_key("edgecache_kafka_last_contact_age_seconds"),
        "{metrics:#?}"
    );
    let status = redis.hgetall("edgecache:status");
    assert!(!status.contains_key("last_kafka_contact_ms"), "{status:?}");
    let (_, stdout, _) = run_cli(&["status", "--config", path.to_str().unwrap()]);
    assert!(stdout.contains("kafka contact never"), "{stdout}");
}

/// A non-loopback `metrics.listen` without `allow_remote` is a configuration
/// error (exit 78, naming the field) for check-config and run alike.
#[test]
fn remote_metrics_listen_needs_allow_remote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("remote.toml");
    let base = "[kafka]\nbrokers = \"127.0.0.1:1\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
                [[topics]]\nname = \"t\"\nkey_prefix = \"d:\"\n[metrics]\nlisten = \"0.0.0.0:9187\"\n";
    std::fs::write(&path, base).unwrap();
    for command in ["check-config", "run"] {
        let start = Instant::now();
        let (code, _, stderr) = run_cli(&[command, "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{command}: {stderr}");
        assert!(stderr.contains("metrics.listen"), "{stderr}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    std::fs::write(&path, format!("{base}allow_remote = true\n")).unwrap();
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("allow_remote = true"), "{stdout}");
}
