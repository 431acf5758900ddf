//! The log writers: where committed records go.
//!
//! What it is: the [`LogWriter`] trait the ingest API writes through, the
//! mapping of protocol records to log records ([`LogRecord::from_envelope`]),
//! and two implementations — [`kafka::KafkaWriter`] (rdkafka, idempotent,
//! `acks=all`) and [`local::LocalLogWriter`] (an embedded append-only log on
//! disk, used when no Kafka brokers are configured).
//!
//! Record layout, the same for both writers:
//! - topic: per kind (windows, alerts, dead letters; names configurable);
//! - key: the series as `device/sensor` (dead letters: their origin), so each
//!   series stays ordered within its partition;
//! - value: the inner `Window` / `Alert` / `DeadLetter` as serde JSON;
//! - headers: `agent`, `seq` (decimal), `wire-version` (decimal), `kind`.
//!
//! What it is not: no dedup happens here (see [`crate::dedup`]) and a writer
//! never retries on its own beyond its transport's delivery timeout; a failed
//! write fails the whole batch and the agent resends it.

pub mod kafka;
pub mod local;

use crate::config::Topics;
use futures::future::BoxFuture;
use millrace_protocol::{Envelope, Record};
use std::collections::BTreeMap;
use std::fmt;

/// One record as written to a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub topic: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// In order: `agent`, `seq`, `wire-version`, `kind`.
    pub headers: Vec<(String, Vec<u8>)>,
}

pub const HEADER_AGENT: &str = "agent";
pub const HEADER_SEQ: &str = "seq";
pub const HEADER_WIRE_VERSION: &str = "wire-version";
pub const HEADER_KIND: &str = "kind";

impl LogRecord {
    /// The log record for one envelope of `agent`'s batch.
    pub fn from_envelope(
        topics: &Topics,
        agent: &str,
        wire_version: u8,
        envelope: &Envelope,
    ) -> Result<Self, serde_json::Error> {
        let (topic, key, value) = match &envelope.record {
            Record::Window(w) => (
                &topics.windows,
                w.series.to_string(),
                serde_json::to_vec(w)?,
            ),
            Record::Alert(a) => (&topics.alerts, a.series.to_string(), serde_json::to_vec(a)?),
            Record::DeadLetter(d) => (
                &topics.dead_letters,
                d.origin.clone(),
                serde_json::to_vec(d)?,
            ),
        };
        Ok(Self {
            topic: topic.clone(),
            key: key.into_bytes(),
            value,
            headers: vec![
                (HEADER_AGENT.into(), agent.as_bytes().to_vec()),
                (HEADER_SEQ.into(), envelope.seq.to_string().into_bytes()),
                (
                    HEADER_WIRE_VERSION.into(),
                    wire_version.to_string().into_bytes(),
                ),
                (
                    HEADER_KIND.into(),
                    envelope.record.kind().as_str().as_bytes().to_vec(),
                ),
            ],
        })
    }

    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }
}

pub(crate) fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// What a write leaves for the dedup state to remember: per log position key
/// (see [`MarkScope`]), an offset to resume reconciliation from.
///
/// A receipt may also hold the writer's promise that reconciliation will
/// start no later than this write ([`ReceiptHold`]) until it is dropped:
/// keep it until the dedup state that lists the write is saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteReceipt {
    pub next_offsets: BTreeMap<String, u64>,
    pub hold: ReceiptHold,
}

/// Released when the last clone of its [`WriteReceipt`] is dropped.
#[derive(Clone, Default)]
pub struct ReceiptHold(Option<std::sync::Arc<dyn Send + Sync>>);

impl ReceiptHold {
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(std::sync::Arc::new(guard)))
    }
}

impl fmt::Debug for ReceiptHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "held" } else { "none" })
    }
}

/// Holds compare equal: they carry no data, only a lifetime.
impl PartialEq for ReceiptHold {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for ReceiptHold {}

/// What the offsets of a [`WriteReceipt`] promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkScope {
    /// Per topic: every record *of the writing agent* below the offset is
    /// listed in that agent's dedup state (embedded log). Reconciliation
    /// starts at the lowest mark of all agents.
    PerAgent,
    /// Per partition (`topic/partition`): every record *of any agent* below
    /// the offset is listed in a saved dedup state (Kafka). Reconciliation
    /// starts at the highest mark any agent saved.
    Global,
}

/// A record found in the log when reconciling the dedup state at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedRecord {
    pub topic: String,
    pub offset: u64,
    pub agent: String,
    pub seq: u64,
}

/// A window or alert read back from the log to rebuild the dashboard's
/// history after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentRecord {
    /// The agent the aggregator stamped on it (the `agent` header).
    pub agent: String,
    pub seq: u64,
    /// When the log appended it (wall clock, ms).
    pub appended_ms: i64,
    pub record: Record,
}

impl RecentRecord {
    /// Decodes a stored window or alert; `None` for other topics, records
    /// without `agent`/`seq` headers or values that do not decode (a record
    /// of a future version: the dashboard skips it).
    pub fn decode(
        topics: &Topics,
        topic: &str,
        headers: &[(String, Vec<u8>)],
        appended_ms: i64,
        value: &[u8],
    ) -> Option<Self> {
        let agent = std::str::from_utf8(header(headers, HEADER_AGENT)?).ok()?;
        let seq = std::str::from_utf8(header(headers, HEADER_SEQ)?)
            .ok()?
            .parse()
            .ok()?;
        let record = if topic == topics.windows {
            Record::Window(serde_json::from_slice(value).ok()?)
        } else if topic == topics.alerts {
            Record::Alert(serde_json::from_slice(value).ok()?)
        } else {
            return None;
        };
        Some(Self {
            agent: agent.to_owned(),
            seq,
            appended_ms,
            record,
        })
    }
}

/// Whether the writer can currently accept writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy(String),
}

/// Why a write failed. Every variant means "not written, try again later":
/// the ingest API answers `503` with `Retry-After`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("kafka delivery failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka producer is being rebuilt after a fatal error: {0}")]
    KafkaFatal(String),
    #[error("embedded log: {0}")]
    Local(#[from] local::LocalLogError),
    #[error("log writer task failed: {0}")]
    Task(String),
}

/// A destination for committed records.
///
/// `write` returns only when every record is durably acknowledged (Kafka:
/// `acks=all` delivery reports; embedded log: fsync). On error, none, some
/// or all records may have been written; the caller must not record them
/// as committed and the sender retries, so a failed write may produce
/// duplicates downstream (Kafka) — the embedded log rolls back instead.
pub trait LogWriter: Send + Sync + fmt::Debug {
    /// A short name for logs and `/healthz`: `kafka` or `embedded`.
    fn kind(&self) -> &'static str;

    /// What the offsets in this writer's receipts mean.
    fn mark_scope(&self) -> MarkScope {
        MarkScope::PerAgent
    }

    fn write(&self, records: Vec<LogRecord>) -> BoxFuture<'_, Result<WriteReceipt, LogError>>;

    fn health(&self) -> BoxFuture<'_, Health>;

    /// What retention deleted, for a log that deletes old records itself
    /// (the embedded log); `None` where the broker does it (Kafka).
    fn retention(&self) -> Option<&local::RetentionStats> {
        None
    }

    /// Visits every record at or after `from` (per mark key; keys not named
    /// start at the beginning) that carries `agent` and `seq` headers. Used
    /// once at start-up, before serving, to find records written after the
    /// dedup state was last saved; it blocks on disk or network I/O.
    /// [`CommittedRecord::topic`] is the mark key (embedded log: the topic;
    /// Kafka: `topic/partition`).
    fn committed_since(
        &self,
        from: &BTreeMap<String, u64>,
        visit: &mut dyn FnMut(CommittedRecord),
    ) -> Result<(), LogError> {
        let _ = (from, visit);
        Ok(())
    }

    /// Visits the windows, then the alerts, appended at or after `since_ms`
    /// (wall clock), each topic in log order. Used once at start-up to
    /// rebuild the dashboard's history; it blocks on disk or network I/O.
    /// Returns how many records it visited.
    fn recent(&self, since_ms: i64, visit: &mut dyn FnMut(RecentRecord)) -> Result<u64, LogError> {
        let _ = (since_ms, visit);
        Ok(0)
    }

    /// Flushes and releases resources at shutdown.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
