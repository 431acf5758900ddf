//! Millrace shared records and wire format.
//!
//! What it is: the records every Millrace part speaks — [`Reading`],
//! [`Window`], [`AnomalyScore`], [`Alert`], [`DeadLetter`] — and the versioned
//! batch envelope ([`Batch`]) that carries them from an agent to the
//! aggregator, with a compact binary encoding and a JSON one.
//!
//! What it is not: there is no I/O here, no async runtime and no storage.
//! Decoding never panics: truncated, corrupt or hostile bytes return a
//! [`WireError`].
//!
//! ```
//! use millrace_protocol::{Batch, Envelope, Record, DeadLetter, DeadLetterReason, Source};
//! let dl = DeadLetter::new(Source::Mqtt, "plant/line1/temp", b"{oops".to_vec(),
//!     DeadLetterReason::Malformed, "expected value", 1_700_000_000_000);
//! let batch = Batch::new("gw-1", vec![Envelope { seq: 7, record: Record::DeadLetter(dl) }]);
//! let bytes = batch.encode_binary();
//! assert_eq!(Batch::decode_binary(&bytes).unwrap(), batch);
//! ```
//!
//! # Layout
//! - `records`: the plant records.
//! - `wire`: the batch envelope and its two encodings.
//! - `secret`: secrets read from files, shared by the agent and the aggregator.

mod records;
pub mod secret;
pub mod sparkplug;
mod wire;

pub use records::*;
pub use wire::*;
