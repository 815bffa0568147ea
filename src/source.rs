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
use futures_util::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kafka client configuration rejected: {0}")]
    Config(String),
    #[error("Kafka request failed: {0}")]
    Request(String),
}

/// Receives librdkafka's global errors; remembers whether brokers are down
/// so the pipeline can report `kafka-unreachable`.
#[derive(Debug, Default)]
pub struct SourceContext {
    brokers_down: AtomicBool,
}

impl ClientContext for SourceContext {
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

type Inner = StreamConsumer<SourceContext>;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub low: i64,
    pub high: i64,
}

pub struct Source {
    consumer: Arc<Inner>,
    topic_names: Arc<Vec<String>>,
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
        let consumer: Inner = config
            .create_with_context(SourceContext::default())
            .map_err(|e| SourceError::Config(e.to_string()))?;
        Ok(Source {
            consumer: Arc::new(consumer),
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
        let consumer = self.consumer.clone();
        let names = self.topic_names.clone();
        let found = tokio::task::spawn_blocking(move || {
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
        .await
        .map_err(|e| SourceError::Request(e.to_string()))??;
        self.mark_reachable();
        Ok(found)
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

    /// Low and high watermarks of the given partitions (blocking pool).
    pub async fn watermarks(
        &self,
        partitions: Vec<PartitionId>,
    ) -> Result<Vec<(PartitionId, Watermarks)>, SourceError> {
        let consumer = self.consumer.clone();
        let names = self.topic_names.clone();
        tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|(topic_idx, partition)| {
                    let (low, high) = consumer
                        .fetch_watermarks(&names[topic_idx], partition, REQUEST_TIMEOUT)
                        .map_err(|e| SourceError::Request(e.to_string()))?;
                    Ok(((topic_idx, partition), Watermarks { low, high }))
                })
                .collect()
        })
        .await
        .map_err(|e| SourceError::Request(e.to_string()))?
    }

    /// Waits for the next event.
    pub async fn recv(&self) -> Event<'_> {
        self.event(self.consumer.recv().await)
    }

    /// The next event if librdkafka already has one buffered; never waits.
    /// This is what makes batching adaptive: take what is there, then flush.
    pub fn try_recv(&self) -> Option<Event<'_>> {
        self.consumer.recv().now_or_never().map(|r| self.event(r))
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
