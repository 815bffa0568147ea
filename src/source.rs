//! The Kafka side. The only module that imports `rdkafka`.
//!
//! Every partition of every configured topic is assigned manually, like a
//! Kafka Streams GlobalKTable: each gateway needs the whole state, so there
//! is no consumer group, no rebalance and no commit. Positions come from the
//! offsets stored in Redis (see `checkpoint`). librdkafka's prefetch and
//! fetch sizes come from the memory budget (see `config`), never from its
//! defaults, which allow 64 MiB of queued data.

use crate::batch::PartitionId;
use crate::checkpoint::Start;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait without looking at librdkafka's queue. The queue's
/// "became non-empty" callback is edge-triggered and can be missed (see
/// rust-rdkafka#665); this bounds the cost of a missed edge.
const POLL_FALLBACK: Duration = Duration::from_millis(100);

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
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        for (name, topic) in statistics.topics {
            for (id, p) in topic.partitions {
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
    }

    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        match error {
            // End of partition is news, not an error (the pipeline asks for
            // watermarks to know it caught up).
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => return,
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown) => {
                self.brokers_down.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
        tracing::warn!(target: "librdkafka", "{error}: {reason}");
    }
}

impl ConsumerContext for SourceContext {}

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

    /// Partitions of every configured topic, from broker metadata. A topic
    /// that does not exist (yet) has none; the caller asks again later.
    /// Runs on tokio's blocking pool: librdkafka's call blocks.
    pub async fn discover(&self) -> Result<Vec<PartitionId>, SourceError> {
        let found = self
            .discover_task()
            .await
            .map_err(|e| SourceError::Request(e.to_string()))??;
        self.mark_reachable();
        Ok(found)
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

/// Lets librdkafka validate every property without creating a client (so
/// `check-config` and start-up reject a bad property before connecting).
pub fn check_properties(properties: &BTreeMap<String, String>) -> Result<(), SourceError> {
    let mut config = ClientConfig::new();
    for (key, value) in properties {
        config.set(key, value);
    }
    config
        .create_native_config()
        .map(|_| ())
        .map_err(|e| SourceError::Config(e.to_string()))
}
