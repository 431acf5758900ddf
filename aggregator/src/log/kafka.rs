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
//! What it is not: it does not create topics (create them with the
//! partitions and replication your cluster needs), and it is at-least-once
//! end to end: a batch whose delivery failed part-way, or an aggregator
//! crash between the Kafka acknowledgement and the dedup state fsync, can
//! leave a record in Kafka twice. Consumers that must not double count use
//! the `agent` and `seq` headers.

use super::{Health, LogError, LogRecord, LogWriter, WriteReceipt};
use crate::config::KafkaConfig;
use futures::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::{Arc, RwLock};
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
        tracing::warn!(%error, reason, "kafka client error");
    }
}

type Inner = FutureProducer<TracingContext>;

/// Time a `/healthz` metadata request may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before handing a record over again when librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

pub struct KafkaWriter {
    /// The producer and its generation (bumped on each replacement).
    producer: RwLock<(u64, Inner)>,
    config: KafkaConfig,
    in_flight: Arc<Semaphore>,
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
    client.create_with_context(TracingContext)
}

impl KafkaWriter {
    /// Creates the producer. This does not contact the brokers yet; use
    /// [`LogWriter::health`] to check that they are reachable.
    pub fn new(config: KafkaConfig) -> Result<Self, LogError> {
        let producer = build_producer(&config)?;
        Ok(Self {
            producer: RwLock::new((0, producer)),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
        })
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
        for delivery in futures::future::join_all(deliveries).await {
            let error = match delivery {
                Ok(Ok(_)) => continue,
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

    fn write(&self, records: Vec<LogRecord>) -> BoxFuture<'_, Result<WriteReceipt, LogError>> {
        Box::pin(async move {
            let (generation, producer) = self.current();
            let started = Instant::now();
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
            Ok(WriteReceipt::default())
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
