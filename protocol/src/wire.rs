//! The batch envelope an agent sends to the aggregator, and its encodings.
//!
//! Binary form (`application/x-millrace-batch`):
//!
//! ```text
//! +---------+---------+-----------+----------------------------+
//! | "MLRC"  | version | crc32 LE  | postcard body (below)      |
//! | 4 bytes | 1 byte  | 4 bytes   | rest                       |
//! +---------+---------+-----------+----------------------------+
//! ```
//!
//! The CRC covers the postcard body. JSON form (`application/json`) is the
//! serde form of [`Batch`]. Both decoders validate the same invariants: a
//! known wire version, a non-empty agent id, and `seq` strictly increasing
//! within the batch.
//!
//! # Versions
//!
//! | version | body |
//! |---|---|
//! | 1 | agent, outbox floor, records |
//! | 2 | version 1 + an optional [`AgentStatus`] (outbox depth, retries) |
//!
//! The version 1 body is postcard of `(agent, outbox_floor, records)`; a
//! version 2 body is that, followed by postcard of `Option<AgentStatus>`.
//! Postcard is not self-describing, so a body is read by the layout of the
//! version in its header. Decoders accept every version from
//! [`MIN_WIRE_VERSION`] to [`WIRE_VERSION`]: upgrade the aggregator before
//! the agents and nothing is refused.

use crate::records::{Alert, DeadLetter, Window};
use serde::{Deserialize, Serialize};

/// The wire version this build writes.
pub const WIRE_VERSION: u8 = 2;
/// The oldest wire version this build still reads.
pub const MIN_WIRE_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"MLRC";
const HEADER_LEN: usize = 4 + 1 + 4;

/// A record bound for the aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Record {
    Window(Window),
    Alert(Alert),
    DeadLetter(DeadLetter),
}

impl Record {
    /// The kind name, as used for topics, headers and metrics labels.
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Window(_) => RecordKind::Window,
            Record::Alert(_) => RecordKind::Alert,
            Record::DeadLetter(_) => RecordKind::DeadLetter,
        }
    }
}

/// The kind of a [`Record`], without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    Window,
    Alert,
    DeadLetter,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Window => "window",
            RecordKind::Alert => "alert",
            RecordKind::DeadLetter => "dead-letter",
        }
    }
}

/// One record with its per-agent sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Strictly increasing per agent, across restarts.
    pub seq: u64,
    pub record: Record,
}

/// A batch of records from one agent.
///
/// Batches need not arrive in `seq` order across batches (alerts overtake the
/// backlog), so the receiver deduplicates by the set of `seq` it has
/// committed, not by a single high-water mark. `outbox_floor` bounds that set:
/// the agent promises that every `seq` below it is either acknowledged or
/// abandoned (dropped by its overflow policy), so the receiver may forget them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub version: u8,
    pub agent: String,
    /// Every `seq` below this will never be sent (again).
    pub outbox_floor: u64,
    pub records: Vec<Envelope>,
    /// The sender's own health as it built the batch (wire version 2 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
}

/// How the sending agent is doing, as of the moment it built the batch: what
/// a fleet view shows besides the records themselves.
///
/// Figures are the agent's own and need no clock agreement with the
/// receiver: ages are durations, not timestamps.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's build, e.g. `0.1.0`.
    pub agent_version: String,
    /// Seconds since the agent process started.
    pub uptime_s: u64,
    /// Records waiting in the outbox, both lanes, this batch included.
    pub outbox_records: u64,
    /// Their stored bytes.
    pub outbox_bytes: u64,
    /// The outbox's configured byte cap.
    pub outbox_max_bytes: u64,
    /// Age of the oldest waiting record, in milliseconds (`None`: empty).
    pub outbox_oldest_age_ms: Option<u64>,
    /// Records the outbox gave up since the agent started: dropped when full
    /// (`drop-oldest`) or expired by `max-age`.
    pub outbox_dropped_total: u64,
    /// Failed sends since the agent started.
    pub uplink_retries_total: u64,
    /// Failed sends in a row before this batch (0 when the uplink is healthy).
    pub uplink_failures: u32,
}

/// Why bytes could not be decoded into a [`Batch`]. A sender that gets one of
/// these for a batch must not retry it unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("batch truncated: {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("not a Millrace batch (bad magic)")]
    BadMagic,
    #[error(
        "unsupported wire version {0} (this build reads {MIN_WIRE_VERSION} to {WIRE_VERSION})"
    )]
    UnsupportedVersion(u8),
    #[error("checksum mismatch: header says {expected:#010x}, body is {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("undecodable batch body: {0}")]
    Body(String),
    #[error("empty agent id")]
    EmptyAgent,
    #[error("seq not strictly increasing at record {index}: {prev} then {seq}")]
    SeqOrder { index: usize, prev: u64, seq: u64 },
}

impl Batch {
    /// A batch with `outbox_floor` at its first record: nothing older is pending.
    pub fn new(agent: impl Into<String>, records: Vec<Envelope>) -> Self {
        let outbox_floor = records.first().map_or(0, |e| e.seq);
        Self {
            version: WIRE_VERSION,
            agent: agent.into(),
            outbox_floor,
            records,
            status: None,
        }
    }

    /// The same batch with the sender's status attached.
    pub fn with_status(mut self, status: AgentStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// The highest `seq` in the batch, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|e| e.seq)
    }

    /// Checks the invariants every decoder enforces.
    pub fn validate(&self) -> Result<(), WireError> {
        if !(MIN_WIRE_VERSION..=WIRE_VERSION).contains(&self.version) {
            return Err(WireError::UnsupportedVersion(self.version));
        }
        if self.version < 2 && self.status.is_some() {
            return Err(WireError::Body(format!(
                "wire version {} has no agent status",
                self.version
            )));
        }
        if self.agent.is_empty() {
            return Err(WireError::EmptyAgent);
        }
        for (index, pair) in self.records.windows(2).enumerate() {
            if pair[1].seq <= pair[0].seq {
                return Err(WireError::SeqOrder {
                    index: index + 1,
                    prev: pair[0].seq,
                    seq: pair[1].seq,
                });
            }
        }
        Ok(())
    }

    /// Compact binary encoding (see the module docs), in the layout of
    /// `self.version`: a version 1 batch is written without its status.
    pub fn encode_binary(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        let mut payload = postcard::to_stdvec(&(&self.agent, self.outbox_floor, &self.records))
            .unwrap_or_default();
        if self.version >= 2 {
            payload = postcard::to_extend(&self.status, payload).unwrap_or_default();
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(self.version);
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    pub fn decode_binary(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() < HEADER_LEN {
            return Err(WireError::Truncated(bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = bytes[4];
        if !(MIN_WIRE_VERSION..=WIRE_VERSION).contains(&version) {
            return Err(WireError::UnsupportedVersion(version));
        }
        let expected = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        let payload = &bytes[HEADER_LEN..];
        let actual = crc32fast::hash(payload);
        if expected != actual {
            return Err(WireError::Checksum { expected, actual });
        }
        let body_error = |e: postcard::Error| WireError::Body(e.to_string());
        let ((agent, outbox_floor, records), rest): ((String, u64, Vec<Envelope>), _) =
            postcard::take_from_bytes(payload).map_err(body_error)?;
        let status = if version >= 2 {
            postcard::from_bytes(rest).map_err(body_error)?
        } else {
            None
        };
        let batch = Batch {
            version,
            agent,
            outbox_floor,
            records,
            status,
        };
        batch.validate()?;
        Ok(batch)
    }

    pub fn encode_json(&self) -> Vec<u8> {
        // Non-finite floats never reach a batch (they are dead-lettered at the
        // window engine), and serde_json writes them as null if they did.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode_json(bytes: &[u8]) -> Result<Self, WireError> {
        let batch: Batch =
            serde_json::from_slice(bytes).map_err(|e| WireError::Body(e.to_string()))?;
        batch.validate()?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests;
