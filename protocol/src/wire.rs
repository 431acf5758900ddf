//! The batch envelope an agent sends to the aggregator, and its encodings.
//!
//! Binary form (`application/x-millrace-batch`):
//!
//! ```text
//! +---------+---------+-----------+----------------------------+
//! | "MLRC"  | version | crc32 LE  | postcard(BatchBody)        |
//! | 4 bytes | 1 byte  | 4 bytes   | rest                       |
//! +---------+---------+-----------+----------------------------+
//! ```
//!
//! The CRC covers the postcard body. JSON form (`application/json`) is the
//! serde form of [`Batch`]. Both decoders validate the same invariants: a
//! known wire version, a non-empty agent id, and `seq` strictly increasing
//! within the batch.

use crate::records::{Alert, DeadLetter, Window};
use serde::{Deserialize, Serialize};

/// The wire version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;
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
}

#[derive(Serialize, Deserialize)]
struct BatchBody {
    agent: String,
    outbox_floor: u64,
    records: Vec<Envelope>,
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
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
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
        }
    }

    /// The highest `seq` in the batch, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|e| e.seq)
    }

    /// Checks the invariants every decoder enforces.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion(self.version));
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

    /// Compact binary encoding (see the module docs).
    pub fn encode_binary(&self) -> Vec<u8> {
        let body = BatchBodyRef {
            agent: &self.agent,
            outbox_floor: self.outbox_floor,
            records: &self.records,
        };
        // Serialising plain data into a Vec cannot fail.
        let payload = postcard::to_stdvec(&body).unwrap_or_default();
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
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let expected = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        let payload = &bytes[HEADER_LEN..];
        let actual = crc32fast::hash(payload);
        if expected != actual {
            return Err(WireError::Checksum { expected, actual });
        }
        let body: BatchBody =
            postcard::from_bytes(payload).map_err(|e| WireError::Body(e.to_string()))?;
        let batch = Batch {
            version,
            agent: body.agent,
            outbox_floor: body.outbox_floor,
            records: body.records,
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

#[derive(Serialize)]
struct BatchBodyRef<'a> {
    agent: &'a str,
    outbox_floor: u64,
    records: &'a [Envelope],
}

#[cfg(test)]
mod tests;
