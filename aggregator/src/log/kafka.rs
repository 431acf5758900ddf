//! The Kafka log writer (rdkafka / librdkafka).
//!
//! What it is: an idempotent producer (`enable.idempotence=true`,
//! `acks=all`, `compression.type=lz4`) whose `write` hands every record of a
//! batch to librdkafka and awaits every delivery report. At most
//! `max-in-flight` records are handed over and not yet acknowledged at any
//! time, across all requests; a request waits for room. A delivery that does
//! not succeed within `message-timeout` fails the batch (`503`, the agent
//! retries). After any failed write (including a fatal error of the
//! idempotent producer) the producer is replaced by a fresh one, so the
//! retry starts a new idempotent session instead of one whose sequence
//! state is in doubt.
//!
//! # Exactly once across a crash
//!
//! The ingest API writes a batch to Kafka first and saves the dedup state
//! second; a crash between the two leaves records in Kafka that the saved
//! state does not list. So the writer keeps a *frontier* per partition:
//! every record below it, of any agent, is listed in a saved dedup state.
//! A write pins the frontier where it stood when the write began until its
//! receipt is dropped (after the dedup save), so the frontier never passes
//! a record whose dedup entry is not saved yet. Each receipt carries the
//! frontier, each dedup save stores it ([`MarkScope::Global`]), and at
//! start-up [`LogWriter::committed_since`] reads every partition from the
//! newest saved frontier to its end and lists what it finds: the resent
//! batch is then recognised and not written again. That read covers the
//! last moments before the crash, not the topic's history (a partition with
//! no saved frontier, e.g. on the very first start, is read from its
//! beginning). If the brokers cannot be reached at start-up the read is
//! skipped with an error in the log, and that one crash window is
//! at-least-once.
//!
//! What it is not: it does not create topics (create them with the
//! partitions and replication your cluster needs). A batch whose delivery
//! failed part-way (a broker outage mid-batch) can still leave some of its
//! records in Kafka twice when the agent resends it; consumers that must
//! never double count use the `agent` and `seq` headers.

use super::{
    CommittedRecord, Health, LogError, LogRecord, LogWriter, MarkScope, ReceiptHold, WriteReceipt,
    HEADER_AGENT, HEADER_SEQ,
};
use crate::config::{KafkaConfig, Topics};
use futures::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Routes librdkafka's log lines and errors into `tracing`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Reaching a partition's end is what a read back waits for.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

/// The read-back consumer only assigns partitions: nothing to rebalance.
impl rdkafka::consumer::ConsumerContext for TracingContext {}

type Inner = FutureProducer<TracingContext>;

/// How long the read back at start-up waits for the cluster's metadata, a
/// partition's offsets, or the next record, before it gives up.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What one read back found.
#[derive(Debug, Default)]
struct ReadBack {
    partitions: usize,
    scanned: u64,
}

/// Time a `/healthz` metadata request may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before handing a record over again when librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

pub struct KafkaWriter {
    /// The producer and its generation (bumped on each replacement).
    producer: RwLock<(u64, Inner)>,
    config: KafkaConfig,
    topics: Topics,
    in_flight: Arc<Semaphore>,
    frontier: Arc<Mutex<Frontier>>,
}

/// The mark key of a partition: `topic/partition` (`/` is not allowed in
/// Kafka topic names, so keys never collide).
/// The text of header `name` of a consumed message.
fn message_header(message: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// A consumed window or alert as the dashboard takes it (`None` for other
/// records); `default_ms` when the message has no timestamp.
pub(crate) fn recent_record(
    topics: &Topics,
    message: &rdkafka::message::BorrowedMessage<'_>,
    default_ms: i64,
) -> Option<super::RecentRecord> {
    let headers: Vec<(String, Vec<u8>)> = message
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| Some((h.key.to_owned(), h.value?.to_vec())))
                .collect()
        })
        .unwrap_or_default();
    super::RecentRecord::decode(
        topics,
        message.topic(),
        &headers,
        message.timestamp().to_millis().unwrap_or(default_ms),
        message.payload().unwrap_or_default(),
    )
}

fn partition_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// Per partition, how far the log is covered by saved dedup state. Plain
/// data; see the [module docs](self).
#[derive(Debug, Default)]
pub struct Frontier {
    /// One past the highest offset delivered by this writer or found at
    /// start-up, per partition key.
    known_end: HashMap<String, u64>,
    /// `known_end` as it stood when each unfinished write began.
    pins: BTreeMap<u64, HashMap<String, u64>>,
    next_pin: u64,
}

impl Frontier {
    /// Pins the frontier for a write that is about to begin.
    pub fn pin(&mut self) -> u64 {
        let id = self.next_pin;
        self.next_pin += 1;
        self.pins.insert(id, self.known_end.clone());
        id
    }

    /// The write of pin `id` is saved in a dedup state (or failed).
    pub fn unpin(&mut self, id: u64) {
        self.pins.remove(&id);
    }

    /// A record was delivered at `offset` of partition `key`.
    pub fn delivered(&mut self, key: &str, offset: u64) {
        self.reached(key, offset.saturating_add(1));
    }

    /// Partition `key` is known to hold records up to `end` (exclusive).
    pub fn reached(&mut self, key: &str, end: u64) {
        match self.known_end.get_mut(key) {
            Some(known) => *known = (*known).max(end),
            None => {
                self.known_end.insert(key.to_owned(), end);
            }
        }
    }

    /// Per partition: every record below the mark is listed in a saved dedup
    /// state, or belongs to write `own` (whose receipt these marks go into,
    /// saved with the state that lists it). A pin taken before a partition
    /// was known holds that partition at 0.
    pub fn marks(&self, own: u64) -> BTreeMap<String, u64> {
        self.known_end
            .iter()
            .map(|(key, &end)| {
                let pinned = self
                    .pins
                    .iter()
                    .filter(|(&id, _)| id != own)
                    .map(|(_, snapshot)| snapshot.get(key).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(end);
                (key.clone(), pinned.min(end))
            })
            .collect()
    }
}

/// Unpins its write when the receipt carrying it is dropped.
struct PinGuard {
    frontier: Arc<Mutex<Frontier>>,
    id: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        lock(&self.frontier).unpin(self.id);
    }
}

fn lock(frontier: &Mutex<Frontier>) -> MutexGuard<'_, Frontier> {
    frontier
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for KafkaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaWriter")
            .field("config", &self.config)
            .field("in_flight_available", &self.in_flight.available_permits())
            .finish()
    }
}

fn build_producer(config: &KafkaConfig) -> Result<Inner, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", &config.client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            config.message_timeout.as_millis().max(1).to_string(),
        )
        .set("linger.ms", "5")
        // Room for the in-flight cap, so QueueFull is rare.
        .set(
            "queue.buffering.max.messages",
            config.max_in_flight.max(1000).to_string(),
        );
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client.create_with_context(TracingContext)
}

impl KafkaWriter {
    /// Creates the producer. This does not contact the brokers yet; use
    /// [`LogWriter::health`] to check that they are reachable.
    pub fn new(config: KafkaConfig, topics: Topics) -> Result<Self, LogError> {
        let producer = build_producer(&config)?;
        Ok(Self {
            producer: RwLock::new((0, producer)),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            topics,
            frontier: Arc::default(),
        })
    }

    /// A consumer that only reads assigned partitions (no group membership).
    fn reader(&self, purpose: &str) -> Result<BaseConsumer<TracingContext>, KafkaError> {
        let mut client = ClientConfig::new();
        for (key, value) in &self.config.properties {
            client.set(key, value);
        }
        client
            .set("bootstrap.servers", &self.config.brokers)
            .set("client.id", format!("{}-{purpose}", self.config.client_id))
            .set("group.id", format!("{}-{purpose}", self.config.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(TracingContext)
    }

    /// The partitions of `topics` with their low and high watermarks. A
    /// topic that does not exist (yet) or cannot be read is logged and left out.
    fn partitions(
        consumer: &BaseConsumer<TracingContext>,
        topics: &[&String],
    ) -> Result<Vec<(String, i32, u64, u64)>, KafkaError> {
        let timeout = READ_BACK_TIMEOUT;
        // One metadata request: an unreachable cluster costs one timeout.
        let metadata = consumer.fetch_metadata(None, timeout)?;
        let mut out = Vec::new();
        for topic in topics {
            let Some(t) = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic.as_str())
            else {
                tracing::warn!(topic = %topic, "topic does not exist yet; nothing to read back");
                continue;
            };
            if let Some(error) = t.error() {
                tracing::warn!(
                    topic = t.name(),
                    ?error,
                    "topic not readable; not read back"
                );
                continue;
            }
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                out.push((
                    topic.to_string(),
                    p.id(),
                    low.max(0) as u64,
                    high.max(0) as u64,
                ));
            }
        }
        Ok(out)
    }

    /// Reads each `(topic, partition, start, end)` from `start` up to `end`
    /// (exclusive) and hands every message to `visit`. Returns the count read.
    fn read_ranges(
        consumer: &BaseConsumer<TracingContext>,
        ranges: &[(String, i32, u64, u64)],
        visit: &mut dyn FnMut(&rdkafka::message::BorrowedMessage<'_>),
    ) -> Result<u64, KafkaError> {
        let mut assignment = TopicPartitionList::new();
        // Partitions still to read, by mark key: the end to read them to.
        let mut pending: HashMap<String, u64> = HashMap::new();
        for (topic, partition, start, end) in ranges {
            if start < end {
                assignment.add_partition_offset(
                    topic,
                    *partition,
                    Offset::Offset(*start as i64),
                )?;
                pending.insert(partition_key(topic, *partition), *end);
            }
        }
        if pending.is_empty() {
            return Ok(0);
        }
        consumer.assign(&assignment)?;
        let mut scanned = 0;
        // However much there is to read, it must keep coming.
        let mut last_progress = Instant::now();
        while !pending.is_empty() {
            if last_progress.elapsed() > READ_BACK_TIMEOUT {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            let Some(polled) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            last_progress = Instant::now();
            let message = match polled {
                Ok(message) => message,
                Err(KafkaError::PartitionEOF(_)) => {
                    // Reached some end; the offsets below tell which.
                    continue;
                }
                Err(error) => return Err(error),
            };
            let key = partition_key(message.topic(), message.partition());
            let offset = message.offset().max(0) as u64;
            scanned += 1;
            visit(&message);
            if pending.get(&key).is_some_and(|&end| offset + 1 >= end) {
                pending.remove(&key);
            }
        }
        Ok(scanned)
    }

    /// Reads `topics` back from `from` to their current end (see the
    /// [module docs](self)), seeding the frontier with each partition's end.
    fn read_back(
        &self,
        from: &BTreeMap<String, u64>,
        visit: &mut dyn FnMut(CommittedRecord),
    ) -> Result<ReadBack, KafkaError> {
        let consumer = self.reader("reconcile")?;
        let wanted = [
            &self.topics.windows,
            &self.topics.alerts,
            &self.topics.dead_letters,
        ];
        let mut ranges = Vec::new();
        let mut ends = Vec::new();
        for (topic, partition, low, high) in Self::partitions(&consumer, &wanted)? {
            let key = partition_key(&topic, partition);
            let start = from.get(&key).copied().unwrap_or(0).max(low);
            ends.push((key, high));
            ranges.push((topic, partition, start, high));
        }
        let scanned = Self::read_ranges(&consumer, &ranges, &mut |message| {
            if let (Some(agent), Some(seq)) = (
                message_header(message, HEADER_AGENT),
                message_header(message, HEADER_SEQ).and_then(|s| s.parse::<u64>().ok()),
            ) {
                visit(CommittedRecord {
                    topic: partition_key(message.topic(), message.partition()),
                    offset: message.offset().max(0) as u64,
                    agent,
                    seq,
                });
            }
        })?;
        let mut report = ReadBack {
            scanned,
            ..ReadBack::default()
        };
        let mut frontier = lock(&self.frontier);
        for (key, end) in ends {
            frontier.reached(&key, end);
            report.partitions += 1;
        }
        Ok(report)
    }

    /// Reads the data topics from `from` to their end, like the start-up
    /// read back, for a cluster takeover ([`crate::cluster`]): a failure is
    /// returned (the takeover is retried), not only logged.
    pub fn read_back_from(
        &self,
        from: &BTreeMap<String, u64>,
        visit: &mut dyn FnMut(CommittedRecord),
    ) -> Result<u64, KafkaError> {
        self.read_back(from, visit).map(|r| r.scanned)
    }

    /// Windows, then alerts, appended at or after `since_ms`: each partition
    /// from the first offset at that time (Kafka's time index) to its end.
    fn read_recent(
        &self,
        since_ms: i64,
        visit: &mut dyn FnMut(super::RecentRecord),
    ) -> Result<u64, KafkaError> {
        let consumer = self.reader("history")?;
        let mut visited = 0;
        for topic in [&self.topics.windows, &self.topics.alerts] {
            let partitions = Self::partitions(&consumer, &[topic])?;
            let mut by_time = TopicPartitionList::new();
            for (topic, partition, _, _) in &partitions {
                by_time.add_partition_offset(topic, *partition, Offset::Offset(since_ms))?;
            }
            let starts = consumer.offsets_for_times(by_time, READ_BACK_TIMEOUT)?;
            let ranges: Vec<_> = partitions
                .into_iter()
                .map(|(topic, partition, low, high)| {
                    let start = match starts.find_partition(&topic, partition).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => (o.max(0) as u64).max(low),
                        // No record at or after the time: nothing to read.
                        _ => high,
                    };
                    (topic, partition, start, high)
                })
                .collect();
            Self::read_ranges(&consumer, &ranges, &mut |message| {
                if let Some(record) = recent_record(&self.topics, message, since_ms) {
                    visit(record);
                    visited += 1;
                }
            })?;
        }
        Ok(visited)
    }

    fn current(&self) -> (u64, Inner) {
        match self.producer.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces `failed` with a fresh producer (a new idempotent producer
    /// session) unless another request already did. The old one is dropped
    /// on the blocking pool: librdkafka's teardown may wait for the network.
    fn replace_producer(&self, failed_generation: u64, reason: &str) {
        let fresh = match build_producer(&self.config) {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::error!(%error, "could not create a new kafka producer");
                return;
            }
        };
        let old = {
            let mut slot = match self.producer.write() {
                Ok(slot) => slot,
                Err(poisoned) => poisoned.into_inner(),
            };
            if slot.0 != failed_generation {
                return;
            }
            std::mem::replace(&mut *slot, (failed_generation + 1, fresh))
        };
        tracing::warn!(reason, "replaced the kafka producer");
        tokio::task::spawn_blocking(move || drop(old));
    }
    async fn write_chunk(&self, producer: &Inner, records: &[LogRecord]) -> Result<(), LogError> {
        let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
        let _permits = self
            .in_flight
            .acquire_many(count)
            .await
            .map_err(|e| LogError::Task(e.to_string()))?;
        let deadline = Instant::now() + self.config.message_timeout;
        let mut deliveries = Vec::with_capacity(records.len());
        let mut handover_error = None;
        'records: for record in records {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (name, value) in &record.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            let mut future_record = FutureRecord::to(&record.topic)
                .key(&record.key)
                .payload(&record.value)
                .headers(headers);
            loop {
                match producer.send_result(future_record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < deadline =>
                    {
                        future_record = back;
                        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                    }
                    Err((error, _)) => {
                        handover_error = Some(error);
                        break 'records;
                    }
                }
            }
        }
        // Await what was handed over even after a failure, so the in-flight
        // count stays true to what librdkafka holds.
        let mut first_error = handover_error.map(LogError::from);
        for (delivery, topic) in futures::future::join_all(deliveries)
            .await
            .into_iter()
            .zip(records)
        {
            let error = match delivery {
                Ok(Ok(d)) => {
                    lock(&self.frontier).delivered(
                        &partition_key(&topic.topic, d.partition),
                        d.offset.max(0) as u64,
                    );
                    continue;
                }
                Ok(Err((error, _message))) => LogError::Kafka(error),
                Err(_canceled) => LogError::Task("kafka producer dropped a delivery".into()),
            };
            first_error.get_or_insert(error);
        }
        match first_error {
            None => Ok(()),
            Some(error) => Err(error),
        }
    }
}

impl LogWriter for KafkaWriter {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn mark_scope(&self) -> MarkScope {
        MarkScope::Global
    }

    fn committed_since(
        &self,
        from: &BTreeMap<String, u64>,
        visit: &mut dyn FnMut(CommittedRecord),
    ) -> Result<(), LogError> {
        let started = Instant::now();
        match self.read_back(from, visit) {
            Ok(report) => {
                tracing::info!(
                    partitions = report.partitions,
                    records_scanned = report.scanned,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "kafka read back from the saved frontier"
                );
            }
            Err(error) => {
                // Not fatal: the aggregator must come up (and answer 503)
                // while Kafka is down. Only this one crash window is at risk.
                metrics::counter!("millrace_aggregator_kafka_reconcile_failures_total")
                    .increment(1);
                tracing::error!(
                    %error,
                    "cannot read kafka back from the saved frontier: a batch written just \
                     before a crash of the previous run may be written a second time"
                );
            }
        }
        Ok(())
    }

    fn recent(
        &self,
        since_ms: i64,
        visit: &mut dyn FnMut(super::RecentRecord),
    ) -> Result<u64, LogError> {
        self.read_recent(since_ms, visit).map_err(LogError::from)
    }

    fn write(&self, records: Vec<LogRecord>) -> BoxFuture<'_, Result<WriteReceipt, LogError>> {
        Box::pin(async move {
            let (generation, producer) = self.current();
            let started = Instant::now();
            let pin = PinGuard {
                frontier: Arc::clone(&self.frontier),
                id: lock(&self.frontier).pin(),
            };
            for chunk in records.chunks(self.config.max_in_flight) {
                if let Err(error) = self.write_chunk(&producer, chunk).await {
                    if let Some((code, reason)) = producer.client().fatal_error() {
                        let fatal = format!("{code:?}: {reason}");
                        self.replace_producer(generation, &fatal);
                        return Err(LogError::KafkaFatal(fatal));
                    }
                    // After a failed delivery the idempotent session's
                    // sequence state is in doubt (timed-out batches may or
                    // may not have landed; a restarted broker may have lost
                    // the session), and librdkafka can stall or be rejected
                    // on it. The batch is retried by the agent anyway, so
                    // start that retry on a fresh session.
                    self.replace_producer(generation, &error.to_string());
                    return Err(error);
                }
            }
            tracing::debug!(
                records = records.len(),
                latency_ms = started.elapsed().as_millis() as u64,
                "kafka batch acknowledged"
            );
            Ok(WriteReceipt {
                next_offsets: lock(&self.frontier).marks(pin.id),
                hold: ReceiptHold::new(pin),
            })
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let (_, producer) = self.current();
            if let Some((code, reason)) = producer.client().fatal_error() {
                return Health::Unhealthy(format!("fatal producer error {code:?}: {reason}"));
            }
            let probe = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(None, HEALTH_TIMEOUT)
            })
            .await;
            match probe {
                Ok(Ok(metadata)) if !metadata.brokers().is_empty() => Health::Healthy,
                Ok(Ok(_)) => Health::Unhealthy("metadata lists no brokers".into()),
                Ok(Err(error)) => {
                    Health::Unhealthy(format!("kafka metadata request failed: {error}"))
                }
                Err(error) => Health::Unhealthy(format!("health probe failed: {error}")),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (_, producer) = self.current();
            let timeout = self.config.message_timeout;
            let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "kafka producer flush at shutdown failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Frontier;
    use std::collections::BTreeMap;

    fn marks(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn the_frontier_stops_where_an_unsaved_write_began() {
        let mut f = Frontier::default();
        f.delivered("w/0", 9); // found at start-up: offsets 0..=9
        let a = f.pin();
        f.delivered("w/0", 10); // a's records
        f.delivered("w/0", 11);
        let b = f.pin();
        f.delivered("w/0", 12); // b's
                                // b's receipt may claim everything but a's write (still unsaved).
        assert_eq!(f.marks(b), marks(&[("w/0", 10)]));
        // a's receipt: all below b's start, where b's write may have landed.
        assert_eq!(f.marks(a), marks(&[("w/0", 12)]));
        f.unpin(a);
        assert_eq!(f.marks(b), marks(&[("w/0", 13)]));
        f.unpin(b);
        assert_eq!(f.marks(u64::MAX), marks(&[("w/0", 13)]));
    }

    #[test]
    fn a_partition_unknown_when_a_write_began_is_held_at_zero() {
        let mut f = Frontier::default();
        let a = f.pin();
        f.delivered("w/1", 4);
        let b = f.pin();
        assert_eq!(f.marks(b), marks(&[("w/1", 0)]));
        f.unpin(a);
        assert_eq!(f.marks(b), marks(&[("w/1", 5)]));
    }

    #[test]
    fn marks_never_move_back() {
        let mut f = Frontier::default();
        f.delivered("w/0", 20);
        f.delivered("w/0", 3);
        assert_eq!(f.marks(u64::MAX), marks(&[("w/0", 21)]));
    }
}
