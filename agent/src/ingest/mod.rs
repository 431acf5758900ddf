//! Ingest: the sources that turn plant traffic into [`Reading`]s.
//!
//! Every source sends [`IngestEvent`]s into one bounded channel that the
//! pipeline drains into the window engine. A source never drops an input
//! silently: what it cannot decode becomes a [`DeadLetter`].

pub mod modbus;

use millrace_protocol::{DeadLetter, Reading, UnixMs};

pub mod broker;
pub mod decode;
pub mod mqtt;

/// What a source hands to the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestEvent {
    Reading(Reading),
    DeadLetter(DeadLetter),
}

/// The sending half of the pipeline's ingest channel (bounded; a full channel
/// applies backpressure to the source).
pub type IngestTx = tokio::sync::mpsc::Sender<IngestEvent>;

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as UnixMs)
        .unwrap_or(0)
}
