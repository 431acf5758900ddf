//! Sparkplug B (`format = "sparkplug-b"`): the protobuf payloads of the
//! Eclipse Sparkplug 3.0 specification on `spBv1.0/<group>/<type>/<node>[/<device>]`.
//!
//! What it does, per edge node (group + node id), in the decoder of the
//! connection the node's messages arrive on:
//! - `NBIRTH`/`DBIRTH` reset and learn the node's metrics: name, alias and
//!   datatype. Aliases are unique per edge node, devices included. A BIRTH's
//!   values are readings like any DATA's.
//! - `NDATA`/`DDATA` metrics are named by alias (or by name), typed by the
//!   datatype they carry or the one their BIRTH gave. Event time is the
//!   metric's timestamp, else the payload's, else the time of receipt.
//! - Numeric and boolean metrics (Int8…UInt64, Float, Double, Boolean)
//!   become readings; a 64-bit integer beyond ±2^53 is kept as the nearest
//!   f64 with quality `uncertain`. Strings, datasets, templates, bytes and
//!   the other non-numeric types are counted and skipped
//!   (`millrace_sparkplug_skipped_metrics_total`) — and with
//!   `non-numeric = "dead-letter"` also put in the message's dead letter —,
//!   as are null metrics and
//!   the control plane (`Node Control/*`, `Device Control/*`, `Properties/*`,
//!   `bdSeq`). NaN/±Inf and unknown aliases go to the message's one dead
//!   letter.
//! - `seq` must go up by one (mod 256) from the NBIRTH on. A gap, or DATA
//!   from a node or device with no BIRTH since the agent (re)started or since
//!   its DEATH, is counted and answered with a Rebirth request
//!   (`NCMD` `Node Control/Rebirth = true`) when the subscription allows
//!   commands (`commands = true`), at most one per node every 5 s; without
//!   it the need is counted (`millrace_sparkplug_rebirths_not_sent_total`).
//! - `NDEATH` (the node's will, matched to its NBIRTH by `bdSeq`) and
//!   `DDEATH` mark the node or device dead: until its next BIRTH, its DATA
//!   (late or replayed messages) becomes readings of quality `bad`. A DEATH
//!   whose `bdSeq` is not the current BIRTH's is stale and ignored.
//! - `NCMD`, `DCMD` and `STATE` are commands, not telemetry: not read.
//! - A payload that is not Sparkplug B protobuf is a `malformed` dead letter.
//!
//! Series: the subscription's `device` template over the topic levels (`{1}`
//! group, `{3}` edge node, `{4}` device), by default `{3}` for node metrics
//! and `{3}.{4}` for device metrics; the `sensor` template with `{field}` =
//! the metric name (default `{field}`).
//!
//! The decoder's state is one connection's: with an external broker, one
//! MQTT session carries every node. It is bounded ([`NODES_CAP`] nodes,
//! [`ALIASES_CAP`] aliases per node); past that a node starts over and gets
//! a Rebirth request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use millrace_protocol::{DeadLetterReason, Quality, Reading, Source, UnixMs};
use prost::Message as _;

use super::{BadParts, Names, Rejection, Route};
use crate::ingest::{Delivery, IngestEvent};

pub use millrace_protocol::sparkplug::{datatype, proto, REBIRTH_METRIC};

/// Edge nodes one decoder keeps state for.
pub const NODES_CAP: usize = 4096;
/// Aliases one edge node may define.
pub const ALIASES_CAP: usize = 65_536;
/// Least time between two Rebirth requests to one node.
const REBIRTH_EVERY_MS: i64 = 5_000;
/// Commands waiting for their source to publish them, at most.
const COMMANDS_CAP: usize = 1024;
/// 2^53: beyond it an f64 does not hold every integer.
const F64_EXACT_INT: u64 = 1 << 53;

/// Process-wide Sparkplug B counters (`/metrics`).
#[derive(Debug, Default)]
pub struct SparkplugStats {
    pub births: AtomicU64,
    pub deaths: AtomicU64,
    pub stale_deaths: AtomicU64,
    pub seq_gaps: AtomicU64,
    pub data_before_birth: AtomicU64,
    pub rebirth_requests: AtomicU64,
    pub rebirths_not_sent: AtomicU64,
    pub skipped_metrics: AtomicU64,
}

/// The counters of every Sparkplug B subscription of the process.
pub static STATS: SparkplugStats = SparkplugStats {
    births: AtomicU64::new(0),
    deaths: AtomicU64::new(0),
    stale_deaths: AtomicU64::new(0),
    seq_gaps: AtomicU64::new(0),
    data_before_birth: AtomicU64::new(0),
    rebirth_requests: AtomicU64::new(0),
    rebirths_not_sent: AtomicU64::new(0),
    skipped_metrics: AtomicU64::new(0),
};

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A message the agent publishes back to the broker (a Rebirth request).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What a BIRTH said about one metric.
#[derive(Debug, Clone)]
struct Known {
    /// `None`: a node metric; else the device's id.
    device: Option<Arc<str>>,
    name: Arc<str>,
    datatype: u32,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// An NBIRTH was seen and no NDEATH since.
    born: bool,
    /// An NDEATH (for the current BIRTH) was seen, and no BIRTH since.
    dead: bool,
    seq: Option<u8>,
    bd_seq: Option<u64>,
    aliases: HashMap<u64, Known>,
    /// Datatypes by (device, metric name), for DATA that names its metrics.
    types: HashMap<(Option<Arc<str>>, Arc<str>), u32>,
    /// Devices with a DBIRTH since the NBIRTH and no DDEATH since.
    devices: HashMap<Arc<str>, bool>,
    last_rebirth_ms: Option<UnixMs>,
}

/// The Sparkplug B state of one decoder: what every edge node's BIRTH said.
#[derive(Debug, Clone, Default)]
pub struct SparkplugState {
    nodes: HashMap<(Box<str>, Box<str>), Node>,
    commands: Vec<Command>,
}

/// Message types on `spBv1.0/<group>/<type>/...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NBirth,
    NDeath,
    NData,
    DBirth,
    DDeath,
    DData,
}

impl Kind {
    fn parse(text: &str) -> Option<Result<Self, ()>> {
        Some(Ok(match text {
            "NBIRTH" => Kind::NBirth,
            "NDEATH" => Kind::NDeath,
            "NDATA" => Kind::NData,
            "DBIRTH" => Kind::DBirth,
            "DDEATH" => Kind::DDeath,
            "DDATA" => Kind::DData,
            "NCMD" | "DCMD" | "STATE" => return None,
            _ => return Some(Err(())),
        }))
    }

    fn is_device(self) -> bool {
        matches!(self, Kind::DBirth | Kind::DDeath | Kind::DData)
    }
}

/// The Rebirth request of the specification: an NCMD with the boolean
/// metric `Node Control/Rebirth` = true.
pub fn rebirth_request(group: &str, node: &str, now_ms: UnixMs) -> Command {
    let payload = proto::Payload {
        timestamp: u64::try_from(now_ms).ok(),
        metrics: vec![proto::Metric {
            name: Some(REBIRTH_METRIC.into()),
            datatype: Some(datatype::BOOLEAN),
            value: Some(proto::Value::Boolean(true)),
            timestamp: u64::try_from(now_ms).ok(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Command {
        topic: format!("spBv1.0/{group}/NCMD/{node}"),
        payload: payload.encode_to_vec(),
    }
}

/// Everything about the message being decoded.
pub(super) struct Message<'a> {
    pub route: &'a Route,
    /// The topic's levels.
    pub segments: &'a [&'a str],
    pub payload: &'a [u8],
    pub now_ms: UnixMs,
    pub delivery: Delivery,
    pub max_metrics: usize,
}

impl SparkplugState {
    /// Messages to publish (Rebirth requests), oldest first.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Decodes one message into readings; `Err` is the message's one dead
    /// letter (readings made before it stand).
    pub(super) fn decode(
        &mut self,
        msg: &Message<'_>,
        names: &mut Names,
        out: &mut Vec<IngestEvent>,
    ) -> Result<(), Rejection> {
        let segments = msg.segments;
        if segments.first() != Some(&"spBv1.0") || segments.len() < 3 {
            return Err((
                DeadLetterReason::Unmapped,
                "not a Sparkplug B topic (spBv1.0/<group>/<type>/<node>[/<device>])".into(),
            ));
        }
        // Host applications' `spBv1.0/STATE/<host>` is not telemetry.
        if segments[1] == "STATE" {
            return Ok(());
        }
        let kind = match Kind::parse(segments[2]) {
            None => return Ok(()),
            Some(Err(())) => {
                return Err((
                    DeadLetterReason::Unmapped,
                    format!("unknown Sparkplug B message type {:?}", segments[2]),
                ))
            }
            Some(Ok(kind)) => kind,
        };
        let want = if kind.is_device() { 5 } else { 4 };
        if segments.len() != want || segments[1..].iter().any(|s| s.is_empty()) {
            return Err((
                DeadLetterReason::Unmapped,
                format!(
                    "a {} topic has {want} levels: spBv1.0/<group>/<type>/<node>{}",
                    segments[2],
                    if kind.is_device() { "/<device>" } else { "" }
                ),
            ));
        }
        let payload = proto::Payload::decode(msg.payload).map_err(|e| {
            (
                DeadLetterReason::Malformed,
                format!("not a Sparkplug B payload: {e}"),
            )
        })?;
        if payload.metrics.len() > msg.max_metrics {
            return Err((
                DeadLetterReason::Oversize,
                format!(
                    "{} metrics exceed max-fields of {}",
                    payload.metrics.len(),
                    msg.max_metrics
                ),
            ));
        }
        let (group, node_id) = (segments[1], segments[3]);
        let key = (Box::<str>::from(group), Box::<str>::from(node_id));
        if !self.nodes.contains_key(&key) && self.nodes.len() >= NODES_CAP {
            tracing::warn!(
                nodes = NODES_CAP,
                "sparkplug: edge node state cap reached; every node starts over (rebirths follow)"
            );
            self.nodes.clear();
        }
        let node = self.nodes.entry(key).or_default();
        let device: Option<Arc<str>> = if kind.is_device() {
            Some(names.get(segments[4])?)
        } else {
            None
        };
        let seq = payload.seq.and_then(|s| u8::try_from(s).ok());
        let mut rebirth = false;
        match kind {
            Kind::NBirth => {
                count(&STATS.births);
                *node = Node {
                    born: true,
                    seq,
                    last_rebirth_ms: node.last_rebirth_ms,
                    ..Node::default()
                };
                node.bd_seq = payload
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some("bdSeq"))
                    .and_then(metric_u64);
                tracing::debug!(group, node = node_id, bd_seq = ?node.bd_seq, "sparkplug NBIRTH");
            }
            Kind::NDeath => {
                let bd_seq = payload
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some("bdSeq"))
                    .and_then(metric_u64);
                if let (Some(theirs), Some(ours)) = (bd_seq, node.bd_seq) {
                    if theirs != ours {
                        count(&STATS.stale_deaths);
                        tracing::debug!(
                            group,
                            node = node_id,
                            theirs,
                            ours,
                            "sparkplug: stale NDEATH ignored"
                        );
                        return Ok(());
                    }
                }
                count(&STATS.deaths);
                tracing::info!(
                    group,
                    node = node_id,
                    "sparkplug NDEATH: the node's series are stale until its next NBIRTH"
                );
                node.born = false;
                node.dead = true;
                node.seq = None;
                return Ok(());
            }
            Kind::DBirth | Kind::DData | Kind::DDeath | Kind::NData => {
                if let (Some(last), Some(got)) = (node.seq, seq) {
                    if got != last.wrapping_add(1) {
                        count(&STATS.seq_gaps);
                        tracing::debug!(
                            group,
                            node = node_id,
                            expected = last.wrapping_add(1),
                            got,
                            "sparkplug sequence gap"
                        );
                        rebirth = true;
                    }
                }
                if seq.is_some() {
                    node.seq = seq;
                }
                if !node.born {
                    count(&STATS.data_before_birth);
                    rebirth = true;
                }
            }
        }
        match (kind, &device) {
            (Kind::DBirth, Some(d)) => {
                count(&STATS.births);
                node.aliases.retain(|_, k| k.device.as_ref() != Some(d));
                node.types.retain(|(dev, _), _| dev.as_ref() != Some(d));
                node.devices.insert(Arc::clone(d), true);
            }
            (Kind::DDeath, Some(d)) => {
                count(&STATS.deaths);
                tracing::info!(group, node = node_id, device = %d, "sparkplug DDEATH: the device's series are stale until its next DBIRTH");
                node.devices.insert(Arc::clone(d), false);
            }
            (Kind::DData, Some(d)) if node.devices.get(d) != Some(&true) && node.born => {
                count(&STATS.data_before_birth);
                rebirth = true;
            }
            _ => {}
        }
        if rebirth {
            request_rebirth(node, &mut self.commands, msg, group, node_id);
        }
        if kind == Kind::DDeath {
            return Ok(());
        }
        let stale = node.dead
            || device
                .as_ref()
                .is_some_and(|d| node.devices.get(d) == Some(&false));
        let birth = matches!(kind, Kind::NBirth | Kind::DBirth);
        let device_template = if device.is_some() {
            &msg.route.device
        } else {
            msg.route.node_device.as_ref().unwrap_or(&msg.route.device)
        };
        // One device name for every metric of the message.
        let series_device = names.render(device_template, segments, None);
        let unit = names.get(&msg.route.unit);
        let mut bad = BadParts::default();
        let total = payload.metrics.len();
        for metric in &payload.metrics {
            // Learn first: a BIRTH names and types every metric.
            let known = match (metric.name.as_deref(), metric.alias) {
                (Some(name), alias) => {
                    let name = match names.get(name) {
                        Ok(n) => n,
                        Err(r) => {
                            bad.add(r);
                            continue;
                        }
                    };
                    if birth {
                        let datatype = metric.datatype.unwrap_or(0);
                        if let Some(alias) = alias {
                            if node.aliases.len() < ALIASES_CAP || node.aliases.contains_key(&alias)
                            {
                                node.aliases.insert(
                                    alias,
                                    Known {
                                        device: device.clone(),
                                        name: Arc::clone(&name),
                                        datatype,
                                    },
                                );
                            }
                        }
                        if node.types.len() < ALIASES_CAP {
                            node.types
                                .insert((device.clone(), Arc::clone(&name)), datatype);
                        }
                    }
                    let datatype = metric.datatype.or_else(|| {
                        node.types
                            .get(&(device.clone(), Arc::clone(&name)))
                            .copied()
                    });
                    (name, datatype.unwrap_or(0))
                }
                (None, Some(alias)) => match node.aliases.get(&alias) {
                    Some(k) if k.device == device => {
                        (Arc::clone(&k.name), metric.datatype.unwrap_or(k.datatype))
                    }
                    _ => {
                        bad.add((
                            DeadLetterReason::Unmapped,
                            format!("metric alias {alias} is unknown: no BIRTH defined it"),
                        ));
                        continue;
                    }
                },
                (None, None) => {
                    bad.add((
                        DeadLetterReason::Malformed,
                        "metric has neither name nor alias".into(),
                    ));
                    continue;
                }
            };
            let (name, datatype) = known;
            if is_control(&name) || metric.is_null == Some(true) {
                continue;
            }
            let (value, exact) = match value_of(metric, datatype) {
                Ok(Some(v)) => v,
                Ok(None) => {
                    count(&STATS.skipped_metrics);
                    if msg.route.dead_letter_non_numeric {
                        bad.add((
                            DeadLetterReason::WrongType,
                            format!("metric {name:?} of datatype {datatype} is not a number"),
                        ));
                    }
                    continue;
                }
                Err(r) => {
                    bad.add((r.0, format!("metric {name:?}: {}", r.1)));
                    continue;
                }
            };
            let time_ms = match metric.timestamp.or(payload.timestamp) {
                Some(t) => match UnixMs::try_from(t) {
                    Ok(t) => t,
                    Err(_) => {
                        bad.add((
                            DeadLetterReason::ClockSkew,
                            format!("metric {name:?}: timestamp {t} is out of range"),
                        ));
                        continue;
                    }
                },
                None => msg.now_ms,
            };
            let series = series_device.clone().and_then(|d| {
                let sensor = names.render(&msg.route.sensor, segments, Some(&name))?;
                Ok(names.series(d, sensor))
            });
            let series = match series {
                Ok(s) => s,
                Err(r) => {
                    bad.add(r);
                    continue;
                }
            };
            let unit = match &unit {
                Ok(u) => Arc::clone(u),
                Err(r) => {
                    bad.add(r.clone());
                    continue;
                }
            };
            out.push(IngestEvent::Reading(
                Reading {
                    series,
                    time_ms,
                    value,
                    unit,
                    source: Source::Mqtt,
                    quality: if stale {
                        Quality::Bad
                    } else if exact {
                        Quality::Good
                    } else {
                        Quality::Uncertain
                    },
                },
                msg.delivery,
            ));
        }
        match bad.summary(total, "metrics") {
            Some(rejection) => Err(rejection),
            None => Ok(()),
        }
    }
}

/// Queues a Rebirth request for the node when commands are allowed and the
/// last one is old enough; counts it either way.
fn request_rebirth(
    node: &mut Node,
    commands: &mut Vec<Command>,
    msg: &Message<'_>,
    group: &str,
    node_id: &str,
) {
    if node
        .last_rebirth_ms
        .is_some_and(|last| msg.now_ms.saturating_sub(last) < REBIRTH_EVERY_MS)
    {
        return;
    }
    node.last_rebirth_ms = Some(msg.now_ms);
    if msg.route.commands && commands.len() < COMMANDS_CAP {
        count(&STATS.rebirth_requests);
        tracing::info!(
            group,
            node = node_id,
            "sparkplug: requesting a rebirth (sequence gap or data without birth)"
        );
        commands.push(rebirth_request(group, node_id, msg.now_ms));
    } else {
        count(&STATS.rebirths_not_sent);
        tracing::warn!(
            group,
            node = node_id,
            "sparkplug: the node needs a rebirth (sequence gap or data without birth) \
             but the subscription does not allow commands (commands = false)"
        );
    }
}

/// The control plane of a node, not telemetry.
fn is_control(name: &str) -> bool {
    name == "bdSeq"
        || name.starts_with("Node Control/")
        || name.starts_with("Device Control/")
        || name.starts_with("Properties/")
}

fn metric_u64(m: &proto::Metric) -> Option<u64> {
    match m.value {
        Some(proto::Value::Long(v)) => Some(v),
        Some(proto::Value::Int(v)) => Some(u64::from(v)),
        _ => None,
    }
}

/// The metric's value as a reading's, and whether it is exact; `Ok(None)`
/// for a type that is not a number.
fn value_of(m: &proto::Metric, datatype: u32) -> Result<Option<(f64, bool)>, Rejection> {
    use datatype::*;
    use proto::Value;
    let Some(value) = &m.value else {
        return Ok(None);
    };
    // Integer types travel in `int_value` (32 bits and narrower, two's
    // complement for the signed ones) or `long_value`; encoders differ on
    // sign extension, so the value is cut to the type's width.
    let int = |v: u64| -> Option<(f64, bool)> {
        Some(match datatype {
            INT8 => (f64::from(v as u8 as i8), true),
            INT16 => (f64::from(v as u16 as i16), true),
            INT32 => (f64::from(v as u32 as i32), true),
            INT64 => {
                let v = v as i64;
                (v as f64, v.unsigned_abs() <= F64_EXACT_INT)
            }
            UINT8 => (f64::from(v as u8), true),
            UINT16 => (f64::from(v as u16), true),
            UINT32 => (f64::from(v as u32), true),
            UINT64 | 0 => (v as f64, v <= F64_EXACT_INT),
            _ => return None,
        })
    };
    let made = match value {
        Value::Int(v) => int(u64::from(*v)),
        Value::Long(v) => int(*v),
        Value::Float(v) if matches!(datatype, FLOAT | DOUBLE | 0) => Some((f64::from(*v), true)),
        Value::Double(v) if matches!(datatype, FLOAT | DOUBLE | 0) => Some((*v, true)),
        Value::Boolean(b) if matches!(datatype, BOOLEAN | 0) => {
            Some((f64::from(u8::from(*b)), true))
        }
        _ => None,
    };
    match made {
        Some((v, _)) if v.is_nan() => Err((DeadLetterReason::NotANumber, "NaN".into())),
        Some((v, _)) if v.is_infinite() => Err((DeadLetterReason::Infinite, format!("{v}"))),
        other => Ok(other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signed_integers_are_cut_to_their_width_whatever_the_encoder_did() {
        let m = |v: proto::Value| proto::Metric {
            value: Some(v),
            ..Default::default()
        };
        // -7 as Int16, sign-extended to 32 bits or not.
        for raw in [0xFFF9u32, 0xFFFF_FFF9] {
            assert_eq!(
                value_of(&m(proto::Value::Int(raw)), datatype::INT16).unwrap(),
                Some((-7.0, true))
            );
        }
        assert_eq!(
            value_of(&m(proto::Value::Int(0xFFFF_FFFD)), datatype::INT32).unwrap(),
            Some((-3.0, true))
        );
        assert_eq!(
            value_of(&m(proto::Value::Long(u64::MAX)), datatype::INT64).unwrap(),
            Some((-1.0, true))
        );
        let (v, exact) = value_of(&m(proto::Value::Long((1 << 60) + 1)), datatype::UINT64)
            .unwrap()
            .unwrap();
        assert_eq!(v, 1_152_921_504_606_846_976.0);
        assert!(!exact);
        assert_eq!(
            value_of(&m(proto::Value::Boolean(true)), datatype::BOOLEAN).unwrap(),
            Some((1.0, true))
        );
        assert_eq!(
            value_of(&m(proto::Value::String("auto".into())), 12).unwrap(),
            None
        );
        assert!(value_of(&m(proto::Value::Double(f64::NAN)), datatype::DOUBLE).is_err());
    }

    #[test]
    fn the_rebirth_request_is_the_specification_s() {
        let c = rebirth_request("plant-a", "edge-1", 1_700_000_000_000);
        assert_eq!(c.topic, "spBv1.0/plant-a/NCMD/edge-1");
        let p = proto::Payload::decode(c.payload.as_slice()).unwrap();
        assert_eq!(p.metrics.len(), 1);
        assert_eq!(p.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
        assert_eq!(p.metrics[0].datatype, Some(datatype::BOOLEAN));
        assert_eq!(p.metrics[0].value, Some(proto::Value::Boolean(true)));
    }

    use crate::ingest::decode::{Decoder, PayloadFormat, SubscriptionConfig};

    const NOW: UnixMs = 1_700_000_000_000;

    fn metric(
        name: Option<&str>,
        alias: Option<u64>,
        datatype: u32,
        value: proto::Value,
    ) -> proto::Metric {
        proto::Metric {
            name: name.map(Into::into),
            alias,
            datatype: Some(datatype),
            value: Some(value),
            ..Default::default()
        }
    }

    fn payload(seq: u64, metrics: Vec<proto::Metric>) -> Vec<u8> {
        proto::Payload {
            timestamp: Some(NOW as u64 - 50),
            seq: Some(seq),
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn decoder(commands: bool) -> Decoder {
        let sub = SubscriptionConfig {
            commands,
            ..SubscriptionConfig::new("spBv1.0/#", PayloadFormat::SparkplugB)
        };
        Decoder::new(&[sub], 1 << 20, "mqtt.subscriptions").unwrap()
    }

    fn run(d: &mut Decoder, topic: &str, bytes: &[u8]) -> Vec<IngestEvent> {
        let mut out = Vec::new();
        d.decode(topic, bytes, NOW, Delivery::Once, &mut out);
        out
    }

    fn readings(events: &[IngestEvent]) -> Vec<(String, String, f64, UnixMs, Quality)> {
        events
            .iter()
            .filter_map(|e| match e {
                IngestEvent::Reading(r, _) => Some((
                    r.series.device.to_string(),
                    r.series.sensor.to_string(),
                    r.value,
                    r.time_ms,
                    r.quality,
                )),
                _ => None,
            })
            .collect()
    }

    fn dead(events: &[IngestEvent]) -> Vec<(DeadLetterReason, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                IngestEvent::DeadLetter(d) => Some((d.reason, d.detail.clone())),
                _ => None,
            })
            .collect()
    }

    fn birth() -> Vec<u8> {
        payload(
            0,
            vec![
                metric(
                    Some("Inputs/Temperature"),
                    Some(1),
                    datatype::DOUBLE,
                    proto::Value::Double(21.5),
                ),
                metric(
                    Some("Inputs/Count"),
                    Some(2),
                    datatype::INT32,
                    proto::Value::Int(0xFFFF_FFFD),
                ),
                metric(
                    Some("Status/Mode"),
                    Some(4),
                    12,
                    proto::Value::String("auto".into()),
                ),
                metric(Some("bdSeq"), None, datatype::INT64, proto::Value::Long(7)),
                metric(
                    Some("Node Control/Rebirth"),
                    None,
                    datatype::BOOLEAN,
                    proto::Value::Boolean(false),
                ),
            ],
        )
    }

    #[test]
    fn birth_then_data_by_alias_in_event_time() {
        let mut d = decoder(true);
        let skipped = STATS.skipped_metrics.load(Ordering::Relaxed);
        let out = run(&mut d, "spBv1.0/plant-a/NBIRTH/edge-1", &birth());
        assert_eq!(dead(&out), vec![]);
        assert_eq!(
            readings(&out),
            vec![
                (
                    "edge-1".into(),
                    "Inputs/Temperature".into(),
                    21.5,
                    NOW - 50,
                    Quality::Good
                ),
                (
                    "edge-1".into(),
                    "Inputs/Count".into(),
                    -3.0,
                    NOW - 50,
                    Quality::Good
                ),
            ]
        );
        assert!(
            STATS.skipped_metrics.load(Ordering::Relaxed) > skipped,
            "the string metric is counted"
        );
        let mut m = metric(None, Some(1), 0, proto::Value::Double(22.25));
        m.datatype = None;
        m.timestamp = Some(NOW as u64 - 2_000);
        let out = run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &payload(1, vec![m]));
        assert_eq!(
            readings(&out),
            vec![(
                "edge-1".into(),
                "Inputs/Temperature".into(),
                22.25,
                NOW - 2_000,
                Quality::Good
            )]
        );
        // A device's metrics: its own aliases, series `<node>.<device>`.
        let dbirth = payload(
            2,
            vec![metric(
                Some("Level"),
                Some(11),
                datatype::INT16,
                proto::Value::Int(0xFFF9),
            )],
        );
        let out = run(&mut d, "spBv1.0/plant-a/DBIRTH/edge-1/plc-1", &dbirth);
        assert_eq!(readings(&out)[0].0, "edge-1.plc-1");
        assert_eq!(readings(&out)[0].2, -7.0);
        let out = run(
            &mut d,
            "spBv1.0/plant-a/DDATA/edge-1/plc-1",
            &payload(
                3,
                vec![metric(
                    None,
                    Some(11),
                    datatype::INT16,
                    proto::Value::Int(12),
                )],
            ),
        );
        assert_eq!(readings(&out)[0].1, "Level");
        assert_eq!(readings(&out)[0].2, 12.0);
        assert!(d.take_commands().is_empty(), "no gap, no rebirth");
    }

    #[test]
    fn a_sequence_gap_or_data_without_birth_asks_for_a_rebirth() {
        let mut d = decoder(true);
        // Data from a node never born: its aliases are unknown.
        let data = payload(
            5,
            vec![metric(
                None,
                Some(1),
                datatype::DOUBLE,
                proto::Value::Double(1.0),
            )],
        );
        let out = run(&mut d, "spBv1.0/plant-a/NDATA/edge-9", &data);
        assert_eq!(readings(&out), vec![]);
        assert_eq!(dead(&out)[0].0, DeadLetterReason::Unmapped);
        assert!(dead(&out)[0].1.contains("alias 1"), "{:?}", dead(&out));
        let commands = d.take_commands();
        assert_eq!(commands, vec![rebirth_request("plant-a", "edge-9", NOW)]);

        run(&mut d, "spBv1.0/plant-a/NBIRTH/edge-1", &birth());
        let gap = payload(
            3,
            vec![metric(
                None,
                Some(1),
                datatype::DOUBLE,
                proto::Value::Double(1.5),
            )],
        );
        let out = run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &gap);
        assert_eq!(
            readings(&out).len(),
            1,
            "the values of a message after a gap are good"
        );
        assert_eq!(d.take_commands()[0].topic, "spBv1.0/plant-a/NCMD/edge-1");
        // At most one request per node every few seconds.
        run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &payload(9, vec![]));
        assert!(d.take_commands().is_empty());

        // Without `commands`, nothing is published; the need is counted.
        let mut quiet = decoder(false);
        let before = STATS.rebirths_not_sent.load(Ordering::Relaxed);
        run(&mut quiet, "spBv1.0/plant-a/NDATA/edge-9", &data);
        assert!(quiet.take_commands().is_empty());
        assert!(STATS.rebirths_not_sent.load(Ordering::Relaxed) > before);
    }

    #[test]
    fn death_marks_the_node_stale_until_its_next_birth() {
        let mut d = decoder(true);
        run(&mut d, "spBv1.0/plant-a/NBIRTH/edge-1", &birth());
        // A DEATH of an older session (other bdSeq) is stale and ignored.
        let stale = payload(
            0,
            vec![metric(
                Some("bdSeq"),
                None,
                datatype::INT64,
                proto::Value::Long(6),
            )],
        );
        run(&mut d, "spBv1.0/plant-a/NDEATH/edge-1", &stale);
        let data = |seq| {
            payload(
                seq,
                vec![metric(
                    None,
                    Some(1),
                    datatype::DOUBLE,
                    proto::Value::Double(30.0),
                )],
            )
        };
        assert_eq!(
            readings(&run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &data(1)))[0].4,
            Quality::Good
        );
        let death = payload(
            0,
            vec![metric(
                Some("bdSeq"),
                None,
                datatype::INT64,
                proto::Value::Long(7),
            )],
        );
        assert_eq!(
            run(&mut d, "spBv1.0/plant-a/NDEATH/edge-1", &death).len(),
            0
        );
        let late = run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &data(2));
        assert_eq!(readings(&late)[0].4, Quality::Bad);
        run(&mut d, "spBv1.0/plant-a/NBIRTH/edge-1", &birth());
        assert_eq!(
            readings(&run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &data(1)))[0].4,
            Quality::Good
        );
    }

    #[test]
    fn non_numeric_metrics_are_skipped_or_dead_lettered_as_configured() {
        let skip = run(
            &mut decoder(false),
            "spBv1.0/plant-a/NBIRTH/edge-1",
            &birth(),
        );
        assert_eq!(readings(&skip).len(), 2);
        assert_eq!(dead(&skip), vec![]);
        let sub = SubscriptionConfig {
            non_numeric: crate::ingest::decode::NonNumeric::DeadLetter,
            ..SubscriptionConfig::new("spBv1.0/#", PayloadFormat::SparkplugB)
        };
        let mut d = Decoder::new(&[sub], 1 << 20, "s").unwrap();
        let out = run(&mut d, "spBv1.0/plant-a/NBIRTH/edge-1", &birth());
        assert_eq!(readings(&out).len(), 2, "the numbers still count");
        let letters = dead(&out);
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].0, DeadLetterReason::WrongType);
        assert!(letters[0].1.contains("Status/Mode"), "{letters:?}");
        let json = SubscriptionConfig {
            non_numeric: crate::ingest::decode::NonNumeric::DeadLetter,
            ..SubscriptionConfig::new("a/#", PayloadFormat::Json)
        };
        assert_eq!(
            Decoder::new(&[json], 1024, "s").unwrap_err().key,
            "s[0].non-numeric"
        );
    }

    #[test]
    fn bad_payloads_are_one_dead_letter_each() {
        let mut d = decoder(true);
        let out = run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &[0x0a, 0x0b]);
        assert_eq!(dead(&out).len(), 1);
        assert_eq!(dead(&out)[0].0, DeadLetterReason::Malformed);
        let out = run(&mut d, "spBv1.0/plant-a/NDATA", &payload(0, vec![]));
        assert_eq!(dead(&out)[0].0, DeadLetterReason::Unmapped);
        let out = run(&mut d, "spBv1.0/plant-a/XDATA/edge-1", &payload(0, vec![]));
        assert_eq!(dead(&out)[0].0, DeadLetterReason::Unmapped);
        // Commands and host state are not telemetry.
        assert!(run(&mut d, "spBv1.0/plant-a/NCMD/edge-1", &[0xff]).is_empty());
        assert!(run(&mut d, "spBv1.0/STATE/host-1", b"{}").is_empty());
        run(&mut d, "spBv1.0/plant-a/NBIRTH/edge-1", &birth());
        let nan = payload(
            1,
            vec![
                metric(
                    None,
                    Some(1),
                    datatype::DOUBLE,
                    proto::Value::Double(f64::NAN),
                ),
                metric(None, Some(2), datatype::INT32, proto::Value::Int(4)),
            ],
        );
        let out = run(&mut d, "spBv1.0/plant-a/NDATA/edge-1", &nan);
        assert_eq!(readings(&out).len(), 1);
        assert_eq!(dead(&out)[0].0, DeadLetterReason::NotANumber);
    }
}
