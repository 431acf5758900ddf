//! Ingest: the sources that turn plant traffic into [`Reading`]s.
//!
//! Every source sends [`IngestEvent`]s into one bounded channel that the
//! pipeline drains into the window engine. A source never drops an input
//! silently: what it cannot decode becomes a [`DeadLetter`].

pub mod modbus;

use millrace_protocol::{DeadLetter, Reading, UnixMs};

pub mod broker;
pub mod decode;
pub mod listener;
pub mod mqtt;
mod mqtt_v4;
pub mod opcua;
pub mod pubsub;
mod rest;

/// What a source hands to the pipeline.
#[derive(Debug)]
pub enum IngestEvent {
    Reading(Reading, Delivery),
    DeadLetter(DeadLetter),
    /// Completed once every event sent before it on the same channel is
    /// durable (journaled): the source may then acknowledge its input (MQTT
    /// QoS 1 `PUBACK`). Dropped without completion if the agent stops first,
    /// in which case the input is not acknowledged and the broker redelivers it.
    Durable(DurableAck),
}

/// How a reading's message was delivered: whether it can come back, and
/// whether this is it coming back. Decides what the pipeline's redelivery
/// guard does with the reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Never delivered twice: a Modbus poll, an MQTT QoS 0 message.
    Once,
    /// MQTT QoS 1 or 2: sent again if its acknowledgement is lost.
    /// `redelivered` is the message's DUP flag (set on every resend).
    AtLeastOnce { redelivered: bool },
}

impl Delivery {
    /// The delivery of an MQTT message of `qos` with DUP flag `dup`.
    pub fn mqtt(qos: u8, dup: bool) -> Self {
        if qos == 0 {
            Delivery::Once
        } else {
            Delivery::AtLeastOnce { redelivered: dup }
        }
    }
}

/// The completion half of [`IngestEvent::Durable`].
#[derive(Debug)]
pub struct DurableAck(tokio::sync::oneshot::Sender<()>);

impl DurableAck {
    /// A marker and the receiver that resolves once it is durable.
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(tx), rx)
    }

    /// Signals durability to the source.
    pub fn complete(self) {
        let _ = self.0.send(());
    }
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
