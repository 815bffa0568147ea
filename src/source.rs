//! The Kafka side. The only module that imports `rdkafka`.
//!
//! Every partition of every configured topic is assigned manually, like a
//! Kafka Streams GlobalKTable: each gateway needs the whole state, so there
//! is no consumer group membership and no rebalance. Positions come from the
//! offsets stored in Redis (see `checkpoint`); the optional commits to
//! `kafka.commit_group` are for operators' lag tools and never read back.
//! librdkafka's prefetch and fetch sizes come from the memory budget (see
//! `config`; [`consumer_properties`] turns them into librdkafka properties),
//! never from its defaults, which allow 64 MiB of queued data.

use crate::batch::PartitionId;
use crate::checkpoint::Start;
use crate::config::Settings;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait without looking at librdkafka's queue. The queue's
/// "became non-empty" callback is edge-triggered and can be missed (see
/// rust-rdkafka#665); this bounds the cost of a missed edge.
const POLL_FALLBACK: Duration = Duration::from_millis(100);
/// How long broker connections must have been up before watermarks count
/// as current (two statistics intervals after the first one seen up).
const SETTLE: Duration = Duration::from_secs(3);
/// `delete.retention.ms` assumed when the broker will not describe a topic's
/// configuration (no DescribeConfigs permission): Kafka's default, 24 h.
pub const DEFAULT_DELETE_RETENTION_MS: i64 = 86_400_000;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kafka client configuration rejected: {0}")]
    Config(String),
    #[error("Kafka request failed: {0}")]
    Request(String),
}

/// Receives librdkafka's global errors and statistics: remembers whether
/// brokers are down (for `kafka-unreachable`) and the latest per-partition
/// watermarks librdkafka learnt from its own fetch responses, so lag and
/// "caught up" cost no extra broker request. (A ListOffsets request would
/// queue behind a fetch the broker holds for `fetch.wait.max.ms` and stall
/// the loop.)
#[derive(Debug, Default)]
pub struct SourceContext {
    brokers_down: AtomicBool,
    marks: std::sync::Mutex<BTreeMap<(String, i32), Watermarks>>,
    /// Unix ms of the last bytes received from a broker (0: never).
    last_contact_ms: AtomicI64,
    /// Records and bytes prefetched in librdkafka's queues, all partitions.
    fetch_queue_records: AtomicU64,
    fetch_queue_bytes: AtomicU64,
    /// Whether the last `commit_group` commit failed (warn once per run of
    /// failures, not once per second).
    commit_failing: AtomicBool,
    /// Errors librdkafka reported (connections refused, all brokers down...).
    client_errors: AtomicU64,
    /// Since when the statistics have shown a broker connection up; `None`
    /// while none is. Watermarks are only trusted once this has lasted a
    /// few seconds: right after a reconnect they may still be the ones from
    /// before the outage.
    up_since: std::sync::Mutex<Option<Instant>>,
    /// Fetch responses refused for being over `receive.message.max.bytes`
    /// (one record batch too large for the budget): librdkafka drops the
    /// connection, which stalls every partition fetched over it.
    oversize_responses: AtomicU64,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        // Contact = bytes received from a connected broker: `rxidle` is the
        // microseconds since its connection last received anything, and an
        // idle consumer still gets a fetch response every fetch.wait.max.ms.
        // A connection merely open (state UP) says nothing about a broker
        // that hangs. Internal pseudo-brokers never receive.
        let freshest_rx_us = statistics
            .brokers
            .values()
            .filter(|b| b.state == "UP" && b.source != "internal" && b.rxidle >= 0)
            .map(|b| b.rxidle)
            .min();
        if let Some(idle_us) = freshest_rx_us {
            let contact = statistics.time * 1000 - idle_us / 1000;
            self.last_contact_ms.fetch_max(contact, Ordering::Relaxed);
        }
        let (mut queued_records, mut queued_bytes) = (0u64, 0u64);
        {
            let any_up = statistics.brokers.values().any(|b| b.state == "UP");
            let mut up_since = self.up_since.lock().unwrap_or_else(|e| e.into_inner());
            match (any_up, *up_since) {
                (true, None) => *up_since = Some(Instant::now()),
                (false, Some(_)) => *up_since = None,
                _ => {}
            }
        }
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        for (name, topic) in statistics.topics {
            for (id, p) in topic.partitions {
                if id >= 0 {
                    queued_records += p.fetchq_cnt.max(0) as u64;
                    queued_bytes += p.fetchq_size;
                }
                // -1 is librdkafka's internal "unassigned" partition; offsets
                // below 0 mean "not known yet" (-1001).
                if id < 0 || p.hi_offset < 0 {
                    continue;
                }
                let high = if p.ls_offset >= 0 {
                    p.ls_offset
                } else {
                    p.hi_offset
                };
                marks.insert(
                    (name.clone(), id),
                    Watermarks {
                        low: p.lo_offset.max(0),
                        high,
                        app_offset: p.app_offset,
                        queued: p.fetchq_cnt.max(0) as u64,
                    },
                );
            }
        }
        self.fetch_queue_records
            .store(queued_records, Ordering::Relaxed);
        self.fetch_queue_bytes
            .store(queued_bytes, Ordering::Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        match error {
            // End of partition is news, not an error (the pipeline asks for
            // watermarks to know it caught up).
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => return,
            // librdkafka reports this case with a generic code; only its
            // text says which (rdkafka_transport.c, "Invalid response size").
            KafkaError::Global(RDKafkaErrorCode::BadMessage)
                if reason.contains("Invalid response size") =>
            {
                self.oversize_responses.fetch_add(1, Ordering::Relaxed);
            }
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown) => {
                self.brokers_down.store(true, Ordering::Relaxed);
                *self.up_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            _ => {}
        }
        self.client_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "librdkafka", "{error}: {reason}");
    }
}

impl ConsumerContext for SourceContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                if self.commit_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("commits to kafka.commit_group work again");
                }
            }
            Err(e) => {
                if !self.commit_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "committing to kafka.commit_group failed (lag dashboards only; \
                         resume is unaffected): {e}"
                    );
                }
            }
        }
    }
}

/// Context of the short-lived admin client: its librdkafka instance gets the
/// consumer's properties, and warnings that consumer-only ones are ignored
/// (CONFWARN) would only be noise.
struct AdminContext;

impl ClientContext for AdminContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if fac == "CONFWARN" {
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            _ => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", "admin client: {error}: {reason}");
    }
}

type Inner = BaseConsumer<SourceContext>;

/// One record as read from Kafka, borrowed from librdkafka's buffer.
#[derive(Debug)]
pub struct Incoming<'a> {
    message: BorrowedMessage<'a>,
    pub topic_idx: usize,
}

impl Incoming<'_> {
    pub fn partition(&self) -> PartitionId {
        (self.topic_idx, self.message.partition())
    }
    pub fn offset(&self) -> i64 {
        self.message.offset()
    }
    pub fn key(&self) -> Option<&[u8]> {
        self.message.key()
    }
    /// `None` is a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.message.payload()
    }
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.message.timestamp().to_millis()
    }
}

#[derive(Debug)]
pub enum Event<'a> {
    Record(Incoming<'a>),
    /// librdkafka reached the end of a partition (it does not say which topic).
    EndOfPartition,
    /// A record of a topic not configured (cannot happen with our assignment).
    Foreign,
    Error(String),
}

/// What librdkafka last knew of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Oldest offset still in the log.
    pub low: i64,
    /// Offset after the last readable record (last stable offset when known).
    pub high: i64,
    /// librdkafka's position: next offset it will hand to us (past control
    /// records too, which never reach us).
    pub app_offset: i64,
    /// Records prefetched and waiting in librdkafka's queue.
    pub queued: u64,
}

pub struct Source {
    consumer: Arc<Inner>,
    /// The client properties, for the short-lived admin client that reads
    /// topic configurations.
    properties: Arc<BTreeMap<String, String>>,
    /// Signalled by librdkafka when its queue becomes non-empty. A `Notify`
    /// keeps the signal as a permit when nobody waits yet, so an edge that
    /// fires while the pipeline is busy writing to Redis is not lost.
    wake: Arc<Notify>,
    topic_names: Arc<Vec<String>>,
    /// The same names for librdkafka's C API (`None`: not a C string, which
    /// no valid topic name is).
    topic_c_names: Vec<Option<CString>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("topics", &self.topic_names)
            .finish()
    }
}

impl Source {
    /// Creates the consumer. Nothing connects until the first request.
    pub fn new(
        properties: &BTreeMap<String, String>,
        topic_names: Vec<String>,
    ) -> Result<Source, SourceError> {
        let mut config = ClientConfig::new();
        for (key, value) in properties {
            config.set(key, value);
        }
        let mut consumer: Inner = config
            .create_with_context(SourceContext::default())
            .map_err(|e| SourceError::Config(e.to_string()))?;
        let wake = Arc::new(Notify::new());
        let waker = wake.clone();
        consumer.set_nonempty_callback(move || waker.notify_one());
        Ok(Source {
            consumer: Arc::new(consumer),
            properties: Arc::new(properties.clone()),
            wake,
            topic_c_names: topic_names
                .iter()
                .map(|name| CString::new(name.as_str()).ok())
                .collect(),
            topic_names: Arc::new(topic_names),
        })
    }

    /// True once librdkafka reported all brokers down; cleared by
    /// [`Source::mark_reachable`] when records or metadata arrive again.
    pub fn brokers_down(&self) -> bool {
        self.consumer.context().brokers_down.load(Ordering::Relaxed)
    }

    pub fn mark_reachable(&self) {
        self.consumer
            .context()
            .brokers_down
            .store(false, Ordering::Relaxed);
    }

    /// Unix ms when a broker was last heard from: bytes on a connected
    /// broker's socket (librdkafka's per-broker receive idle time, to the
    /// second) or a metadata response. Not records reaching the pipeline:
    /// those may have been prefetched before the broker went away.
    /// `None` if never.
    pub fn last_contact_ms(&self) -> Option<i64> {
        let ms = self
            .consumer
            .context()
            .last_contact_ms
            .load(Ordering::Relaxed);
        (ms > 0).then_some(ms)
    }

    /// Errors librdkafka reported through its error callback so far.
    pub fn client_errors(&self) -> u64 {
        self.consumer
            .context()
            .client_errors
            .load(Ordering::Relaxed)
    }

    /// Records and bytes librdkafka holds prefetched (statistics, every
    /// second), bounded by `queued.max.messages.kbytes`.
    pub fn fetch_queue(&self) -> (u64, u64) {
        let context = self.consumer.context();
        (
            context.fetch_queue_records.load(Ordering::Relaxed),
            context.fetch_queue_bytes.load(Ordering::Relaxed),
        )
    }

    /// True when broker connections have been up for a few seconds, so the
    /// watermarks librdkafka reports come from current fetch responses.
    pub fn settled(&self) -> bool {
        self.consumer
            .context()
            .up_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|since| since.elapsed() >= SETTLE)
    }

    /// Starts reading each configured topic's tombstone retention in the
    /// background (a DescribeConfigs request through a short-lived admin
    /// client). Per topic: `Some(delete.retention.ms)` for a compacted
    /// topic, `None` for one that is not compacted (its deletes are not
    /// tombstones). A topic the broker will not describe (no permission)
    /// gets Kafka's default with a warning; a failed request is an error,
    /// to be retried.
    pub fn retention_task(&self) -> tokio::task::JoinHandle<Result<Vec<Option<i64>>, SourceError>> {
        let properties = self.properties.clone();
        let names = self.topic_names.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
            let mut config = ClientConfig::new();
            for (key, value) in properties.iter() {
                config.set(key, value);
            }
            let admin: AdminClient<AdminContext> = config
                .create_with_context(AdminContext)
                .map_err(|e| SourceError::Config(e.to_string()))?;
            let specifiers: Vec<ResourceSpecifier<'_>> = names
                .iter()
                .map(|name| ResourceSpecifier::Topic(name))
                .collect();
            let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
            let results = runtime
                .block_on(admin.describe_configs(&specifiers, &options))
                .map_err(|e| SourceError::Request(e.to_string()))?;
            let mut retention = Vec::with_capacity(names.len());
            for (name, result) in names.iter().zip(results) {
                match result {
                    Ok(resource) => {
                        let value = |key: &str| {
                            resource
                                .get(key)
                                .and_then(|entry| entry.value.clone())
                                .unwrap_or_default()
                        };
                        if !value("cleanup.policy").contains("compact") {
                            retention.push(None);
                        } else {
                            let ms = value("delete.retention.ms")
                                .parse()
                                .unwrap_or(DEFAULT_DELETE_RETENTION_MS);
                            retention.push(Some(ms));
                        }
                    }
                    Err(code) => {
                        tracing::warn!(
                            topic = %name,
                            "cannot read the topic's configuration ({code}); assuming \
                             delete.retention.ms = {DEFAULT_DELETE_RETENTION_MS} (Kafka's default)"
                        );
                        retention.push(Some(DEFAULT_DELETE_RETENTION_MS));
                    }
                }
            }
            Ok(retention)
        })
    }

    /// Starts reading each configured topic's topic ID (KIP-516) in the
    /// background: a DescribeTopics request (a Metadata request to the
    /// controller) on the consumer's own librdkafka instance, answered on a
    /// queue of its own, so the pipeline's polling never sees it. Per
    /// configured topic, in order: `Some(id)`, Kafka's own form of the UUID
    /// (22 characters of URL-safe base64 without padding, as
    /// `kafka-topics.sh --describe` prints it), or `None` when the topic
    /// does not exist, the broker reports no ID (the zero UUID) or refuses
    /// to describe it (DescribeTopics needs Describe on the topic, which
    /// Read implies; logged as a warning). A topic deleted and recreated
    /// under the same name gets a new ID. A failed or timed-out request (at
    /// most [`REQUEST_TIMEOUT`]) is an error, to be retried.
    ///
    /// Not a short-lived admin client like [`Source::retention_task`]'s:
    /// rust-rdkafka 0.38 leaks about 200 bytes per client it creates (it
    /// never releases the queue from `rd_kafka_queue_get_main` it passes to
    /// `rd_kafka_set_log_queue`), which a periodic check would accumulate,
    /// and each one opens its own broker connections.
    pub fn topic_ids_task(
        &self,
    ) -> tokio::task::JoinHandle<Result<Vec<Option<String>>, SourceError>> {
        let consumer = self.consumer.clone();
        let c_names = self.topic_c_names.clone();
        tokio::task::spawn_blocking(move || {
            // librdkafka rejects the whole request if a name repeats.
            let mut asked: Vec<&std::ffi::CStr> = Vec::with_capacity(c_names.len());
            for name in c_names.iter().flatten() {
                if !asked.contains(&name.as_c_str()) {
                    asked.push(name);
                }
            }
            let described = topic_ids::describe(consumer.client(), &asked, REQUEST_TIMEOUT)?;
            Ok(c_names
                .iter()
                .map(|name| {
                    let name = name.as_ref()?.to_str().ok()?;
                    described
                        .iter()
                        .find(|(described, _)| described == name)
                        .and_then(|(_, id)| id.clone())
                })
                .collect())
        })
    }

    /// Partitions of every configured topic, from broker metadata. A topic
    /// that does not exist (yet) has none; the caller asks again later.
    /// Runs on tokio's blocking pool: librdkafka's call blocks.
    pub async fn discover(&self) -> Result<Vec<PartitionId>, SourceError> {
        let found = self
            .discover_task()
            .await
            .map_err(|e| SourceError::Request(e.to_string()))
            .and_then(|result| result);
        match found {
            Ok(found) => {
                self.mark_reachable();
                Ok(found)
            }
            Err(e) => {
                self.log_pending_events();
                Err(e)
            }
        }
    }

    /// Hands librdkafka's queued log lines and errors to the log. librdkafka
    /// delivers them through the consumer's queue, which nothing polls before
    /// the first assignment: without this, a failed TLS handshake or SASL
    /// authentication at start would only show as a metadata timeout.
    /// Does nothing while partitions are assigned, since polling here would
    /// take (and lose) a record; the pipeline's own polling serves them then.
    fn log_pending_events(&self) {
        let assigned = self.consumer.assignment().map(|list| list.count());
        if assigned != Ok(0) {
            return;
        }
        // poll() returns after each log event with a zero timeout, and an
        // empty queue looks the same: a bounded number of rounds drains it.
        for _ in 0..256 {
            if let Some(Err(e)) = self.consumer.poll(Duration::ZERO) {
                // Already logged by SourceContext::error; kept at debug.
                tracing::debug!(target: "librdkafka", "{e}");
            }
        }
    }

    /// Starts reading metadata in the background; the pipeline checks the
    /// handle on later ticks instead of waiting (a metadata request can
    /// queue behind a long-polling fetch).
    pub fn discover_task(&self) -> tokio::task::JoinHandle<Result<Vec<PartitionId>, SourceError>> {
        let consumer = self.consumer.clone();
        let names = self.topic_names.clone();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for (topic_idx, name) in names.iter().enumerate() {
                let metadata = consumer
                    .fetch_metadata(Some(name), REQUEST_TIMEOUT)
                    .map_err(|e| SourceError::Request(e.to_string()))?;
                consumer
                    .context()
                    .last_contact_ms
                    .fetch_max(crate::sink::now_ms(), Ordering::Relaxed);
                for topic in metadata.topics() {
                    if topic.error().is_some() {
                        continue;
                    }
                    found.extend(topic.partitions().iter().map(|p| (topic_idx, p.id())));
                }
            }
            Ok(found)
        })
    }

    fn list(&self, starts: &[(PartitionId, Start)]) -> Result<TopicPartitionList, SourceError> {
        let mut list = TopicPartitionList::new();
        for &((topic_idx, partition), start) in starts {
            let offset = match start {
                Start::Earliest => Offset::Beginning,
                Start::At(next) => Offset::Offset(next),
            };
            list.add_partition_offset(&self.topic_names[topic_idx], partition, offset)
                .map_err(|e| SourceError::Request(e.to_string()))?;
        }
        Ok(list)
    }

    /// Replaces the whole assignment. librdkafka discards what it prefetched
    /// for the old assignment, so after a rehydrate nothing stale arrives.
    pub fn assign(&self, starts: &[(PartitionId, Start)]) -> Result<(), SourceError> {
        let list = self.list(starts)?;
        self.consumer
            .assign(&list)
            .map_err(|e| SourceError::Request(e.to_string()))
    }

    /// Commits next offsets to the consumer group `group.id` without joining
    /// it (manual assignment stays), for operators' lag tools only: nothing
    /// reads them back. Asynchronous; the result reaches `commit_callback`
    /// on a later poll.
    pub fn commit(&self, next_offsets: &[(PartitionId, i64)]) -> Result<(), SourceError> {
        let starts: Vec<(PartitionId, Start)> = next_offsets
            .iter()
            .map(|&(partition, next)| (partition, Start::At(next)))
            .collect();
        let list = self.list(&starts)?;
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(|e| SourceError::Request(e.to_string()))
    }

    /// How many fetch responses librdkafka refused as larger than
    /// `receive.message.max.bytes` so far.
    pub fn oversize_responses(&self) -> u64 {
        self.consumer
            .context()
            .oversize_responses
            .load(Ordering::Relaxed)
    }

    /// Stops (`pause`) or restarts fetching these partitions, keeping their
    /// positions.
    pub fn pause(&self, partitions: &[PartitionId], pause: bool) -> Result<(), SourceError> {
        let mut list = TopicPartitionList::new();
        for &(topic_idx, partition) in partitions {
            list.add_partition(&self.topic_names[topic_idx], partition);
        }
        let result = if pause {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        result.map_err(|e| SourceError::Request(e.to_string()))
    }

    /// Asks the broker for the log end of these partitions in the
    /// background (ListOffsets): for partitions that are paused, whose
    /// watermarks librdkafka no longer learns from fetches.
    pub fn log_end_task(
        &self,
        partitions: Vec<PartitionId>,
    ) -> tokio::task::JoinHandle<Result<Vec<(PartitionId, i64)>, SourceError>> {
        let consumer = self.consumer.clone();
        let names = self.topic_names.clone();
        tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|(topic_idx, partition)| {
                    let (_, high) = consumer
                        .fetch_watermarks(&names[topic_idx], partition, REQUEST_TIMEOUT)
                        .map_err(|e| SourceError::Request(e.to_string()))?;
                    Ok(((topic_idx, partition), high))
                })
                .collect()
        })
    }

    /// Adds partitions (a topic grew, or appeared) to the assignment.
    pub fn add(&self, starts: &[(PartitionId, Start)]) -> Result<(), SourceError> {
        let list = self.list(starts)?;
        self.consumer
            .incremental_assign(&list)
            .map_err(|e| SourceError::Request(e.to_string()))
    }

    /// The latest watermarks librdkafka reported for the given partitions
    /// (statistics every second); partitions with none yet are left out.
    pub fn watermarks(&self, partitions: &[PartitionId]) -> Vec<(PartitionId, Watermarks)> {
        let marks = self
            .consumer
            .context()
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        partitions
            .iter()
            .filter_map(|&(topic_idx, partition)| {
                let mark = marks.get(&(self.topic_names[topic_idx].clone(), partition))?;
                Some(((topic_idx, partition), *mark))
            })
            .collect()
    }

    /// (low, high) watermarks from the last fetch response librdkafka got
    /// for this partition: fresher than the once-a-second statistics and,
    /// like them, no broker request (librdkafka's cached values, read under
    /// its partition lock). `None` before the first response. The high mark
    /// is the log end, not the last stable offset.
    pub fn fetched_watermarks(&self, (topic_idx, partition): PartitionId) -> Option<(i64, i64)> {
        let topic = self.topic_c_names.get(topic_idx)?.as_ref()?;
        let (mut low, mut high) = (-1_i64, -1_i64);
        // rust-rdkafka only wraps the variant of this call that asks the
        // broker (fetch_watermarks), which is what must be avoided here.
        // SAFETY: the client pointer is valid while `self.consumer` lives,
        // `topic` is a NUL-terminated string that outlives the call, and
        // librdkafka only writes the two i64 out-parameters; the function is
        // thread safe (it takes the partition's lock).
        #[allow(unsafe_code)]
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        let ok = err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
        (ok && low >= 0 && high >= 0).then_some((low, high))
    }

    /// Forgets watermarks, e.g. after a reassignment, so stale statistics
    /// cannot declare a rehydrate caught up.
    pub fn forget_watermarks(&self) {
        self.consumer
            .context()
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Waits for the next event. Cancellation safe: nothing is taken from
    /// librdkafka until it is returned.
    pub async fn recv(&self) -> Event<'_> {
        loop {
            if let Some(event) = self.try_recv() {
                return event;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL_FALLBACK) => {}
            }
        }
    }

    /// The next event if librdkafka already has one buffered; never waits.
    /// This is what makes batching adaptive: take what is there, then flush.
    pub fn try_recv(&self) -> Option<Event<'_>> {
        self.consumer
            .poll(Duration::ZERO)
            .map(|result| self.event(result))
    }

    fn event<'a>(&self, result: Result<BorrowedMessage<'a>, KafkaError>) -> Event<'a> {
        match result {
            Ok(message) => match self.topic_names.iter().position(|t| t == message.topic()) {
                Some(topic_idx) => Event::Record(Incoming { message, topic_idx }),
                None => Event::Foreign,
            },
            Err(KafkaError::PartitionEOF(_)) => Event::EndOfPartition,
            Err(e) => Event::Error(e.to_string()),
        }
    }
}

/// DescribeTopics through librdkafka's C API: rust-rdkafka does not wrap it,
/// and it is the only client call that returns topic IDs. Each librdkafka
/// object is held by an owner that destroys it when dropped, so every
/// return path (error, timeout, panic) frees what was created; all of them
/// are local to [`topic_ids::describe`], which borrows the client, so they
/// are destroyed before the client can be.
#[allow(unsafe_code)]
mod topic_ids {
    use super::SourceError;
    use rdkafka::bindings as rd;
    use rdkafka::client::Client;
    use rdkafka::ClientContext;
    use std::ffi::{c_char, CStr};
    use std::time::{Duration, Instant};

    /// (name, ID) for each described topic, in librdkafka's order.
    type Described = Vec<(String, Option<String>)>;

    /// A queue of our own for the one result event.
    struct Queue(*mut rd::rd_kafka_queue_t);
    impl Drop for Queue {
        fn drop(&mut self) {
            // SAFETY: the pointer came non-null from rd_kafka_queue_new and
            // is destroyed once, here, while the client (borrowed by
            // `describe`, which owns this value) is still alive. A request
            // still outstanding keeps its own reference; librdkafka then
            // discards its result.
            unsafe { rd::rd_kafka_queue_destroy(self.0) }
        }
    }

    struct Options(*mut rd::rd_kafka_AdminOptions_t);
    impl Drop for Options {
        fn drop(&mut self) {
            // SAFETY: non-null from rd_kafka_AdminOptions_new, destroyed
            // once; rd_kafka_DescribeTopics copies the options, so nothing
            // refers to them afterwards.
            unsafe { rd::rd_kafka_AdminOptions_destroy(self.0) }
        }
    }

    struct Collection(*mut rd::rd_kafka_TopicCollection_t);
    impl Drop for Collection {
        fn drop(&mut self) {
            // SAFETY: non-null from rd_kafka_TopicCollection_of_topic_names,
            // destroyed once; rd_kafka_DescribeTopics copies the names.
            unsafe { rd::rd_kafka_TopicCollection_destroy(self.0) }
        }
    }

    /// An event taken from the queue; owns everything the result points to.
    struct Event(*mut rd::rd_kafka_event_t);
    impl Drop for Event {
        fn drop(&mut self) {
            // SAFETY: non-null from rd_kafka_queue_poll, destroyed once; no
            // pointer into it outlives `describe` (strings are copied).
            unsafe { rd::rd_kafka_event_destroy(self.0) }
        }
    }

    /// Describes the named topics (unique names).
    pub(super) fn describe<C: ClientContext>(
        client: &Client<C>,
        names: &[&CStr],
        timeout: Duration,
    ) -> Result<Described, SourceError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let failed = |what: &str| SourceError::Request(format!("DescribeTopics: {what}"));
        let rk = client.native_ptr();
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);

        // SAFETY: `rk` is valid while `client` is borrowed, i.e. for this
        // whole function, and the queue is destroyed (Queue::drop) before
        // the function returns.
        let queue = Queue(unsafe { rd::rd_kafka_queue_new(rk) });
        if queue.0.is_null() {
            return Err(failed("cannot create a queue"));
        }
        {
            // SAFETY: `rk` is valid (as above); the op type is one of the
            // enum's values (librdkafka returns NULL for an unknown one).
            let options = Options(unsafe {
                rd::rd_kafka_AdminOptions_new(
                    rk,
                    rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
                )
            });
            if options.0.is_null() {
                return Err(failed("cannot create admin options"));
            }
            let mut errstr = [0 as c_char; 256];
            // SAFETY: `options` is a live AdminOptions; `errstr` is a
            // writable buffer of the length passed, which librdkafka
            // NUL-terminates.
            let err = unsafe {
                rd::rd_kafka_AdminOptions_set_request_timeout(
                    options.0,
                    timeout_ms,
                    errstr.as_mut_ptr(),
                    errstr.len(),
                )
            };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                // SAFETY: librdkafka wrote a NUL-terminated message into
                // `errstr` (zero-initialised, so terminated in any case).
                let message = unsafe { CStr::from_ptr(errstr.as_ptr()) };
                return Err(failed(&message.to_string_lossy()));
            }
            let mut pointers: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
            // SAFETY: `pointers` holds `names.len()` NUL-terminated strings
            // that outlive the call; librdkafka copies them (it does not
            // write through the pointer array despite its `*mut` type).
            let collection = Collection(unsafe {
                rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len())
            });
            if collection.0.is_null() {
                return Err(failed("cannot create the topic collection"));
            }
            // SAFETY: client, collection, options and queue are all live;
            // librdkafka copies the collection and options before returning
            // (they are destroyed at the end of this block) and keeps its
            // own reference to the queue until it delivers the result.
            unsafe { rd::rd_kafka_DescribeTopics(rk, collection.0, options.0, queue.0) };
        }

        // librdkafka times the request out itself (request timeout above) and
        // then delivers an error event; this deadline only guards against
        // that never coming.
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(failed(&format!("no answer within {timeout:?}")));
            }
            let left_ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: `queue` is live; the returned event (if any) is owned
            // by us and destroyed by Event::drop.
            let event = Event(unsafe { rd::rd_kafka_queue_poll(queue.0, left_ms) });
            if event.0.is_null() {
                continue;
            }
            if let Some(described) = read_result(&event)? {
                return Ok(described);
            }
        }
    }

    /// The topics a DescribeTopics result event describes; `None` for any
    /// other event (none is expected on our own queue).
    fn read_result(event: &Event) -> Result<Option<Described>, SourceError> {
        // SAFETY: `event` is a live event for the duration of the borrow.
        // Every pointer read below (result, descriptions, names, errors,
        // UUIDs, the base64 string cached in the UUID) is owned by the event
        // and only used within this block; what is kept is copied into Rust
        // strings. Array lengths come from librdkafka with the array.
        unsafe {
            if rd::rd_kafka_event_type(event.0) != rd::RD_KAFKA_EVENT_DESCRIBETOPICS_RESULT {
                return Ok(None);
            }
            let err = rd::rd_kafka_event_error(event.0);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let message = rd::rd_kafka_event_error_string(event.0);
                let message = if message.is_null() {
                    format!("{err:?}")
                } else {
                    CStr::from_ptr(message).to_string_lossy().into_owned()
                };
                return Err(SourceError::Request(format!("DescribeTopics: {message}")));
            }
            let result = rd::rd_kafka_event_DescribeTopics_result(event.0);
            if result.is_null() {
                return Err(SourceError::Request(
                    "DescribeTopics: result event without a result".into(),
                ));
            }
            let mut count = 0usize;
            let topics = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
            if topics.is_null() || count == 0 {
                return Ok(Some(Vec::new()));
            }
            let mut described = Vec::with_capacity(count);
            for &topic in std::slice::from_raw_parts(topics, count) {
                if topic.is_null() {
                    continue;
                }
                let name = rd::rd_kafka_TopicDescription_name(topic);
                if name.is_null() {
                    continue;
                }
                let name = CStr::from_ptr(name).to_string_lossy().into_owned();
                let error = rd::rd_kafka_TopicDescription_error(topic);
                if !error.is_null() {
                    let code = rd::rd_kafka_error_code(error);
                    if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART {
                        let message = rd::rd_kafka_error_string(error);
                        let message = if message.is_null() {
                            format!("{code:?}")
                        } else {
                            CStr::from_ptr(message).to_string_lossy().into_owned()
                        };
                        tracing::warn!(topic = %name, "cannot read the topic's ID: {message}");
                    }
                    described.push((name, None));
                    continue;
                }
                let uuid = rd::rd_kafka_TopicDescription_topic_id(topic);
                // The zero UUID is Kafka's "no ID".
                let id = if uuid.is_null()
                    || (rd::rd_kafka_Uuid_most_significant_bits(uuid) == 0
                        && rd::rd_kafka_Uuid_least_significant_bits(uuid) == 0)
                {
                    None
                } else {
                    let text = rd::rd_kafka_Uuid_base64str(uuid);
                    (!text.is_null()).then(|| kafka_form(CStr::from_ptr(text)))
                };
                described.push((name, id));
            }
            Ok(Some(described))
        }
    }

    /// librdkafka encodes with the standard base64 alphabet; Kafka (its
    /// `Uuid.toString`, the CLI tools, the broker's logs) with the URL-safe
    /// one. Same 22 characters otherwise: '+' is '-', '/' is '_'.
    fn kafka_form(base64: &CStr) -> String {
        base64
            .to_string_lossy()
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .filter(|&c| c != '=')
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn kafka_form_is_url_safe_without_padding() {
            assert_eq!(
                super::kafka_form(c"+/AbCdEfGhIjKlMnOpQr9=="),
                "-_AbCdEfGhIjKlMnOpQr9"
            );
        }
    }
}

/// Lets librdkafka validate every property without creating a client (so
/// `check-config` and start-up reject a bad property before connecting).
pub fn check_properties(properties: &BTreeMap<String, String>) -> Result<(), SourceError> {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(key, value);
    }
    config.create_native_config().map(|_| ()).map_err(|e| {
        let mut message = e.to_string();
        // librdkafka says "OpenSSL not available at build time" (or SCRAM,
        // OAUTHBEARER); name the build option that gives them.
        if !cfg!(feature = "tls") && message.contains("not available at build time") {
            message.push_str(
                " (this edgecache is built without the `tls` feature: use a build with TLS, \
                 e.g. the default one)",
            );
        }
        SourceError::Config(message)
    })
}

/// The least `receive.message.max.bytes`: librdkafka's bound on a zstd
/// batch's decompressed size (see where it is set).
const ZSTD_GUESS_FLOOR: usize = 4 << 20;

/// Default `fetch.wait.max.ms`: the longest an idle fetch is held by the
/// broker (see where it is set).
pub const FETCH_WAIT_MAX_MS: u32 = 5000;

/// The consumer's librdkafka properties: the user's pass-through ones, the
/// secrets read from files, and the ones the agent sets itself
/// (`config::DERIVED_KAFKA_PROPERTIES`, which validation keeps users from
/// setting). May hold secrets: never print it unmasked.
pub fn consumer_properties(settings: &Settings) -> BTreeMap<String, String> {
    let (kafka, limits) = (&settings.kafka, &settings.limits);
    let mut properties = kafka.properties.clone();
    for (key, secret) in &kafka.secrets {
        properties.insert(key.clone(), secret.0.clone());
    }
    let derived = [
        ("bootstrap.servers", kafka.brokers.clone()),
        // Offsets live in Redis (G2); the group id only names the client
        // in broker logs, unless `commit_group` asks for commits (for
        // lag dashboards only). There is no subscribe, so no group is
        // joined and no rebalance happens either way.
        (
            "group.id",
            kafka
                .commit_group
                .clone()
                .unwrap_or_else(|| format!("edgecache-{}", settings.redis.namespace)),
        ),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        // Catching up is judged from watermarks, which also cover
        // partitions that never produce an event; EOF events are noise.
        ("enable.partition.eof", "false".into()),
        // A stored offset below the log start (retention) or no offset at
        // all both mean: start from the oldest record still there.
        ("auto.offset.reset", "earliest".into()),
        (
            "queued.max.messages.kbytes",
            limits.queued_max_messages_kbytes.to_string(),
        ),
        (
            "queued.min.messages",
            limits.queued_min_messages.to_string(),
        ),
        // librdkafka (>= 2.2) waits this long before fetching again once
        // the queue above is full; its 1 s default made a rehydrate idle
        // most of the time (18k -> 142k records/s, BENCHMARKS.md).
        ("fetch.queue.backoff.ms", "10".into()),
        // Statistics carry each partition's watermarks from librdkafka's
        // own fetches: lag and "caught up" without extra requests.
        ("statistics.interval.ms", "1000".into()),
        ("fetch.max.bytes", limits.fetch_max_bytes.to_string()),
        (
            "max.partition.fetch.bytes",
            limits.max_partition_fetch_bytes.to_string(),
        ),
        // librdkafka requires fetch.max.bytes >= message.max.bytes and
        // receive.message.max.bytes >= fetch.max.bytes + 512. A broker
        // sends a record batch larger than fetch.max.bytes whole (it
        // must, to make progress), so responses must also fit one record
        // of the value cap, or a partition holding one would stall
        // instead of skipping it; 64 KiB covers the protocol framing.
        // librdkafka also caps a zstd batch's decompressed size with it:
        // without the size in the frame it tries 2x, 6x, 18x the
        // compressed size and gives up past this limit, fetching the same
        // batch again forever. Some guess lands below 3x the true size, so
        // 4 MiB lets through every batch of up to 1.33 MiB uncompressed,
        // which covers producers at their defaults (librdkafka's batch.size
        // is 1 MB, Java's batches are bounded by max.request.size, 1 MiB);
        // a third of the budget, when larger, also larger batches. The
        // buffer is sized by the guess but only the pages written count in
        // RSS (tests/lineage.rs).
        ("message.max.bytes", limits.fetch_max_bytes.to_string()),
        (
            "receive.message.max.bytes",
            (limits
                .fetch_max_bytes
                .max(limits.max_value_bytes + 64 * 1024)
                .max(limits.memory_budget_bytes / 3)
                .max(ZSTD_GUESS_FLOOR)
                + 512)
                .to_string(),
        ),
    ];
    for (key, value) in derived {
        properties.insert(key.to_owned(), value);
    }
    properties
        .entry("client.id".into())
        .or_insert_with(|| "edgecache".into());
    // An idle consumer's cost to the broker is its empty fetches: one per
    // fetch.wait.max.ms (librdkafka's 500 ms: two a second per gateway).
    // New records still end the wait at once, so live latency does not
    // change (FLEET.md: 10x fewer requests and bytes, 4x less broker CPU
    // per idle gateway). It also bounds how stale last_kafka_contact_ms
    // gets while idle, and how long a metadata request may queue behind
    // a fetch (well under the 10 s request timeout). Overridable in
    // kafka.properties.
    properties
        .entry("fetch.wait.max.ms".into())
        .or_insert_with(|| FETCH_WAIT_MAX_MS.to_string());
    properties
}

#[cfg(test)]
mod properties_tests {
    use super::consumer_properties;
    use crate::config::tests::MINIMAL;
    use crate::config::{Settings, DERIVED_KAFKA_PROPERTIES};

    fn properties(text: &str) -> std::collections::BTreeMap<String, String> {
        consumer_properties(&Settings::parse("test.toml", text).unwrap())
    }

    #[test]
    fn derived_from_the_budget() {
        let properties = properties(MINIMAL);
        // 24 MiB less the fixed 10 MiB: 14 MiB of buffers.
        assert_eq!(properties["queued.max.messages.kbytes"], "3584");
        assert_eq!(properties["queued.min.messages"], "3584");
        // A third of the budget, above the fetch share (1.75 MiB).
        assert_eq!(
            properties["receive.message.max.bytes"],
            ((8 << 20) + 512).to_string()
        );
    }

    #[test]
    fn users_cannot_set_what_the_agent_derives() {
        // Validation rejects exactly the keys derived here, so a user's
        // property is never silently overwritten.
        let properties = properties(MINIMAL);
        let overridable = ["client.id", "fetch.wait.max.ms"];
        let derived: Vec<&str> = properties
            .keys()
            .map(String::as_str)
            .filter(|k| !overridable.contains(k))
            .collect();
        let mut listed = DERIVED_KAFKA_PROPERTIES.to_vec();
        listed.sort_unstable();
        assert_eq!(derived, listed);
    }

    #[test]
    fn fetch_wait_defaults_long_and_is_overridable() {
        assert_eq!(properties(MINIMAL)["fetch.wait.max.ms"], "5000");
        let text = MINIMAL.replace(
            "[redis]",
            "[kafka.properties]\n\"fetch.wait.max.ms\" = \"500\"\n[redis]",
        );
        assert_eq!(properties(&text)["fetch.wait.max.ms"], "500");
    }

    #[test]
    fn commit_group_names_the_group() {
        let text = MINIMAL.replace("[redis]", "commit_group = \"edgecache-site42\"\n[redis]");
        let properties_with = properties(&text);
        assert_eq!(properties_with["group.id"], "edgecache-site42");
        assert_eq!(properties_with["enable.auto.commit"], "false");
        assert_eq!(properties(MINIMAL)["group.id"], "edgecache-edgecache");
    }

    #[test]
    fn check_config_masks_secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("edgecache-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "hunter2\n").unwrap();
        let text = MINIMAL.replace(
            "[redis]",
            &format!(
                "[kafka.secret_files]\n\"sasl.password\" = {:?}\n[redis]",
                dir.join("pw")
            ),
        );
        let settings = Settings::parse("test.toml", &text).unwrap();
        let properties = consumer_properties(&settings);
        assert_eq!(properties["sasl.password"], "hunter2");
        let shown = settings.effective_toml(&properties);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("queued.max.messages.kbytes"));
    }
}
