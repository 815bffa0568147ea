//! Counters for the optional Prometheus endpoint (`[metrics] listen`), and
//! the tiny HTTP/1.1 responder that serves them.
//!
//! The pipeline updates [`Metrics`] with relaxed atomic adds, a few per
//! batch and a few per one-second tick; it never waits on the endpoint.
//! The responder runs as its own tasks on the same current-thread runtime
//! and only reads. Each connection may send at most [`MAX_REQUEST_BYTES`]
//! and has [`REQUEST_TIMEOUT`] to be answered, and at most
//! [`MAX_CONNECTIONS`] are served at once (more are closed at accept), so a
//! slow or hostile client holds a few KiB for a few seconds at worst.
//! Nothing binds unless `metrics.listen` is set (G8).

use crate::batch::{Batch, Op, PartitionId, SkipReason};
use crate::pipeline::State;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Longest request (line and headers) read; a scrape sends ~200 bytes.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Time one connection has from accept to the end of the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 4;

/// Upper bounds of the batch size histogram, in keys written.
const BATCH_BUCKETS: [u64; 13] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Upper bounds of the apply round-trip histogram, in microseconds.
const APPLY_BUCKETS_US: [u64; 13] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000,
];

/// Upper bounds of the live record age histogram, in milliseconds.
const AGE_BUCKETS_MS: [u64; 13] = [
    1, 2, 5, 10, 20, 50, 100, 250, 1_000, 5_000, 30_000, 300_000, 3_600_000,
];

const STATES: [State; 9] = [
    State::Starting,
    State::WaitingForTopic,
    State::PartitionStuck,
    State::Rehydrating,
    State::CatchingUp,
    State::Live,
    State::Resyncing,
    State::KafkaUnreachable,
    State::RedisUnreachable,
];

/// A cumulative histogram over fixed bounds (Prometheus `le` buckets).
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    /// Observations <= bounds[i] (not cumulative; summed when rendered).
    counts: [AtomicU64; N],
    count: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [u64; N]) -> Self {
        Histogram {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: u64) {
        self.observe_n(value, 1);
    }

    /// `n` observations of the same value.
    fn observe_n(&self, value: u64, n: u64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i].fetch_add(n, Relaxed);
        }
        self.count.fetch_add(n, Relaxed);
        self.sum.fetch_add(value.saturating_mul(n), Relaxed);
    }

    /// Renders `name_bucket`, `_sum`, `_count`; values divided by `scale`
    /// (1e6 turns microseconds into the seconds Prometheus expects).
    fn render(&self, out: &mut String, name: &str, help: &str, scale: f64) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Relaxed);
            let le = *bound as f64 / scale;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum.load(Relaxed) as f64 / scale;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// What the endpoint shows. Counters count since the process started (the
/// status hash's counters are the persistent ones).
#[derive(Debug)]
pub struct Metrics {
    topic_names: Vec<String>,
    state: AtomicU8,
    /// Total lag in records; -1 until known.
    lag: AtomicI64,
    /// Per-partition lag, replaced once per tick; bounded by the assignment.
    partition_lag: Mutex<Vec<(PartitionId, u64)>>,
    records_applied: AtomicU64,
    deletes_applied: AtomicU64,
    records_filtered: AtomicU64,
    records_skipped: [AtomicU64; 3],
    batches: Histogram<13>,
    apply_us: Histogram<13>,
    live_age_ms: Histogram<13>,
    redis_errors: AtomicU64,
    kafka_errors: AtomicU64,
    kafka_client_errors: AtomicU64,
    rehydrates: AtomicU64,
    divergences: AtomicU64,
    lineage_resyncs: AtomicU64,
    fetch_queue_records: AtomicU64,
    fetch_queue_bytes: AtomicU64,
    last_contact_ms: AtomicI64,
}

impl Metrics {
    pub fn new(topic_names: Vec<String>) -> Metrics {
        Metrics {
            topic_names,
            state: AtomicU8::new(0),
            lag: AtomicI64::new(-1),
            partition_lag: Mutex::new(Vec::new()),
            records_applied: AtomicU64::new(0),
            deletes_applied: AtomicU64::new(0),
            records_filtered: AtomicU64::new(0),
            records_skipped: std::array::from_fn(|_| AtomicU64::new(0)),
            batches: Histogram::new(&BATCH_BUCKETS),
            apply_us: Histogram::new(&APPLY_BUCKETS_US),
            live_age_ms: Histogram::new(&AGE_BUCKETS_MS),
            redis_errors: AtomicU64::new(0),
            kafka_errors: AtomicU64::new(0),
            kafka_client_errors: AtomicU64::new(0),
            rehydrates: AtomicU64::new(0),
            divergences: AtomicU64::new(0),
            lineage_resyncs: AtomicU64::new(0),
            fetch_queue_records: AtomicU64::new(0),
            fetch_queue_bytes: AtomicU64::new(0),
            last_contact_ms: AtomicI64::new(0),
        }
    }

    /// A batch Redis took, and how long the round trip was.
    pub fn applied(&self, batch: &Batch, round_trip: Duration) {
        let counts = batch.counts();
        self.records_applied.fetch_add(counts.records, Relaxed);
        self.records_filtered.fetch_add(counts.filtered, Relaxed);
        for (counter, n) in self.records_skipped.iter().zip(counts.skipped) {
            counter.fetch_add(n, Relaxed);
        }
        let deletes = batch
            .ops()
            .filter(|(_, op)| matches!(op, Op::Delete))
            .count();
        self.deletes_applied.fetch_add(deletes as u64, Relaxed);
        // Keys written, not records read: the Redis cost of one apply,
        // capped by `agent.max_batch_records` (records coalesce into keys).
        self.batches.observe(batch.n_ops() as u64);
        self.apply_us.observe(round_trip.as_micros() as u64);
    }

    /// While live: the records of a batch just applied, each counted at the
    /// age of the batch's oldest record (now minus its Kafka timestamp, so
    /// the producer's clock; an upper bound for each). How fresh the mirror
    /// is, from Kafka's point of view; before the agent is live, ages are
    /// those of the backlog and are not counted.
    pub fn live_records_aged(&self, oldest_ts_ms: Option<i64>, n_records: u64) {
        if let Some(ts_ms) = oldest_ts_ms {
            let age_ms = (crate::sink::now_ms() - ts_ms).max(0) as u64;
            self.live_age_ms.observe_n(age_ms, n_records);
        }
    }

    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Relaxed);
    }

    pub fn kafka_error(&self) {
        self.kafka_errors.fetch_add(1, Relaxed);
    }

    /// librdkafka's own error count (the source keeps it).
    pub fn set_kafka_client_errors(&self, n: u64) {
        self.kafka_client_errors.store(n, Relaxed);
    }

    pub fn rehydrated(&self) {
        self.rehydrates.fetch_add(1, Relaxed);
    }

    pub fn diverged(&self) {
        self.divergences.fetch_add(1, Relaxed);
    }

    pub fn lineage_resynced(&self) {
        self.lineage_resyncs.fetch_add(1, Relaxed);
    }

    pub fn set_state(&self, state: State) {
        let idx = STATES.iter().position(|&s| s == state).unwrap_or(0);
        self.state.store(idx as u8, Relaxed);
    }

    /// Once per tick: lag, librdkafka's queue and the last broker contact.
    pub fn tick(
        &self,
        lag: Option<u64>,
        partition_lag: Option<Vec<(PartitionId, u64)>>,
        fetch_queue: (u64, u64),
        last_contact_ms: Option<i64>,
    ) {
        if let Some(lag) = lag {
            self.lag.store(lag as i64, Relaxed);
        }
        if let Some(partition_lag) = partition_lag {
            *self.partition_lag.lock().unwrap_or_else(|e| e.into_inner()) = partition_lag;
        }
        self.fetch_queue_records.store(fetch_queue.0, Relaxed);
        self.fetch_queue_bytes.store(fetch_queue.1, Relaxed);
        if let Some(ms) = last_contact_ms {
            self.last_contact_ms.store(ms, Relaxed);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, now_ms: i64) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let lag = self.lag.load(Relaxed);
        if lag >= 0 {
            metric(
                "edgecache_lag_records",
                "gauge",
                "Records in Kafka not yet in Redis, all partitions.",
                lag.to_string(),
            );
        }
        let counter = |c: &AtomicU64| c.load(Relaxed).to_string();
        metric(
            "edgecache_records_applied_total",
            "counter",
            "Records applied to Redis (before coalescing).",
            counter(&self.records_applied),
        );
        metric(
            "edgecache_deletes_applied_total",
            "counter",
            "Keys deleted by tombstones or expired TTLs (after coalescing).",
            counter(&self.deletes_applied),
        );
        metric(
            "edgecache_records_filtered_total",
            "counter",
            "Records outside a topic's key filters (offset advanced, not written).",
            counter(&self.records_filtered),
        );
        metric(
            "edgecache_redis_errors_total",
            "counter",
            "Failed Redis applies or checks (each one is retried).",
            counter(&self.redis_errors),
        );
        metric(
            "edgecache_kafka_errors_total",
            "counter",
            "Errors reported by the Kafka client while polling.",
            counter(&self.kafka_errors),
        );
        metric(
            "edgecache_kafka_client_errors_total",
            "counter",
            "Errors librdkafka reported (connection failures, all brokers down...).",
            counter(&self.kafka_client_errors),
        );
        metric(
            "edgecache_rehydrates_total",
            "counter",
            "Times Redis lost the agent's state and everything was read again.",
            counter(&self.rehydrates),
        );
        metric(
            "edgecache_redis_divergences_total",
            "counter",
            "Times Redis held another apply than the agent last wrote (restored, promoted replica, torn AOF) and positions were re-read from it.",
            counter(&self.divergences),
        );
        metric(
            "edgecache_lineage_resyncs_total",
            "counter",
            "Times a topic turned out to be another than the stored offsets were taken from (deleted and recreated) and was resynced.",
            counter(&self.lineage_resyncs),
        );
        metric(
            "edgecache_kafka_fetch_queue_records",
            "gauge",
            "Records prefetched in librdkafka's queue.",
            counter(&self.fetch_queue_records),
        );
        metric(
            "edgecache_kafka_fetch_queue_bytes",
            "gauge",
            "Bytes prefetched in librdkafka's queue.",
            counter(&self.fetch_queue_bytes),
        );
        let contact = self.last_contact_ms.load(Relaxed);
        if contact > 0 {
            metric(
                "edgecache_kafka_last_contact_timestamp_seconds",
                "gauge",
                "Unix time a broker was last heard from.",
                format!("{:.3}", contact as f64 / 1000.0),
            );
            metric(
                "edgecache_kafka_last_contact_age_seconds",
                "gauge",
                "Seconds since a broker was last heard from.",
                format!("{:.3}", (now_ms - contact).max(0) as f64 / 1000.0),
            );
        }
        if let Some(rss) = resident_bytes() {
            metric(
                "process_resident_memory_bytes",
                "gauge",
                "Resident set size of the agent.",
                rss.to_string(),
            );
        }

        let _ = writeln!(
            out,
            "# HELP edgecache_records_skipped_total Bad records skipped, by reason.\n\
             # TYPE edgecache_records_skipped_total counter"
        );
        for (reason, n) in SkipReason::ALL.iter().zip(&self.records_skipped) {
            let reason = reason.counter().trim_start_matches("skipped_");
            let _ = writeln!(
                out,
                "edgecache_records_skipped_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgecache_state The agent's state (1 for the current one).\n\
             # TYPE edgecache_state gauge"
        );
        let current = self.state.load(Relaxed) as usize;
        for (i, state) in STATES.iter().enumerate() {
            let _ = writeln!(
                out,
                "edgecache_state{{state=\"{}\"}} {}",
                state.as_str(),
                u8::from(i == current)
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgecache_partition_lag_records Records in Kafka not yet in Redis, per partition.\n\
             # TYPE edgecache_partition_lag_records gauge"
        );
        // Topic names are [A-Za-z0-9._-] (validated), so no label escaping.
        for &((topic_idx, partition), lag) in self
            .partition_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "edgecache_partition_lag_records{{topic=\"{}\",partition=\"{partition}\"}} {lag}",
                self.topic_names[topic_idx]
            );
        }
        self.batches.render(
            &mut out,
            "edgecache_batch_keys",
            "Keys written (SET or DEL, after coalescing) per applied batch.",
            1.0,
        );
        self.apply_us.render(
            &mut out,
            "edgecache_redis_apply_seconds",
            "Round trip of one atomic apply to Redis.",
            1e6,
        );
        self.live_age_ms.render(
            &mut out,
            "edgecache_live_record_age_seconds",
            "While live: age of applied records when Redis took them (apply time minus the Kafka record timestamp; each record counted at its batch's oldest).",
            1e3,
        );
        out
    }
}

/// Resident set size from /proc/self/status (`VmRSS`, in kB), which does
/// not depend on the page size (4, 16 or 64 KiB on ARM kernels).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Binds the endpoint; called before anything connects, so a taken port
/// stops the agent at start with a clear message.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` forever. Each connection is its own task under
/// [`REQUEST_TIMEOUT`]; connections over [`MAX_CONNECTIONS`] are closed.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: do not spin on it.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &metrics)).await;
            drop(permit);
        });
    }
}

/// Reads one request (bounded) and writes one response, then closes.
async fn respond(stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = [0u8; MAX_REQUEST_BYTES];
    let mut n = 0;
    loop {
        if n == request.len() {
            return write_all(
                &stream,
                &response("431 Request Header Fields Too Large", ""),
            )
            .await;
        }
        stream.readable().await?;
        match stream.try_read(&mut request[n..]) {
            Ok(0) => return Ok(()),
            Ok(read) => n += read,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let head = &request[..n];
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    let line = request[..n].split(|&b| b == b'\n').next().unwrap_or(b"");
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or(b""), parts.next().unwrap_or(b""));
    let answer = match (method, path) {
        (b"GET", b"/metrics") => response("200 OK", &metrics.render(crate::sink::now_ms())),
        (b"GET", _) => response("404 Not Found", "try /metrics\n"),
        _ => response("405 Method Not Allowed", ""),
    };
    write_all(&stream, &answer).await
}

fn response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::new(&BATCH_BUCKETS);
        for value in [1, 3, 128, 5000] {
            histogram.observe(value);
        }
        let mut out = String::new();
        histogram.render(&mut out, "h", "help", 1.0);
        assert!(out.contains("h_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"4\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"128\"} 3\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"4096\"} 3\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("h_sum 5132\nh_count 4\n"), "{out}");
    }

    #[test]
    fn render_shows_state_lag_and_memory() {
        let metrics = Metrics::new(vec!["t".into()]);
        metrics.set_state(State::Live);
        metrics.tick(Some(7), Some(vec![((0, 2), 7)]), (3, 300), Some(1_000));
        let out = metrics.render(3_500);
        assert!(out.contains("edgecache_state{state=\"live\"} 1\n"), "{out}");
        assert!(
            out.contains("edgecache_state{state=\"starting\"} 0\n"),
            "{out}"
        );
        assert!(out.contains("edgecache_lag_records 7\n"), "{out}");
        assert!(
            out.contains("edgecache_partition_lag_records{topic=\"t\",partition=\"2\"} 7\n"),
            "{out}"
        );
        assert!(
            out.contains("edgecache_kafka_fetch_queue_bytes 300\n"),
            "{out}"
        );
        assert!(
            out.contains("edgecache_kafka_last_contact_age_seconds 2.500\n"),
            "{out}"
        );
        assert!(resident_bytes().unwrap() > 0);
        assert!(out.contains("process_resident_memory_bytes "), "{out}");
    }
}
