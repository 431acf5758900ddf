//! Simulated Sparkplug B edge nodes: each its own MQTT session, speaking
//! Sparkplug B 3.0 as an edge node must.
//!
//! - The session's will is the node's `NDEATH`, carrying this run's `bdSeq`,
//!   so the broker announces the node's death when the connection is lost.
//! - On every CONNACK the node publishes its `NBIRTH` (seq 0: every metric's
//!   name, alias, datatype Double and value, `bdSeq`, `Node Control/Rebirth`)
//!   and, with a device, the device's `DBIRTH`; it subscribes to its `NCMD`
//!   topic and answers `Node Control/Rebirth = true` with new BIRTHs.
//! - Every `interval` (aligned to the Unix epoch, like the MQTT sensors) it
//!   publishes `NDATA` (or `DDATA`) naming each metric by alias only, stamped
//!   with the scheduled instant, so the agent can only read it through what
//!   the BIRTH taught; values come from the metric's signal at that instant.
//!
//! The agent maps node metrics to series `<node>/<metric>` and device
//! metrics to `<node>.<device>/<metric>` ([`SparkplugNodeConfig::series_device`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use millrace_protocol::sparkplug::{datatype, proto, REBIRTH_METRIC};
use prost::Message as _;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{MqttConfig, SparkplugNodeConfig};
use crate::signal::{align_up, duration_ms};
use crate::unix_now_ms;

/// Counters of one simulated edge node.
#[derive(Debug, Default)]
pub struct SparkplugStats {
    pub births: AtomicU64,
    pub data_messages: AtomicU64,
    pub rebirths_requested: AtomicU64,
    pub connection_errors: AtomicU64,
}

/// What one node publishes, apart from the session.
struct Node {
    config: SparkplugNodeConfig,
    seed: u64,
    bd_seq: u64,
    seq: u8,
}

impl Node {
    fn topic(&self, kind: &str) -> String {
        let (group, node) = (&self.config.group, &self.config.node);
        match (&self.config.device, kind.starts_with('D')) {
            (Some(device), true) => format!("spBv1.0/{group}/{kind}/{node}/{device}"),
            _ => format!("spBv1.0/{group}/{kind}/{node}"),
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(seq)
    }

    fn bd_seq_metric(&self, now_ms: u64) -> proto::Metric {
        proto::Metric {
            name: Some("bdSeq".into()),
            timestamp: Some(now_ms),
            datatype: Some(datatype::INT64),
            value: Some(proto::Value::Long(self.bd_seq)),
            ..Default::default()
        }
    }

    fn death(&self) -> Vec<u8> {
        let now = now_u64();
        proto::Payload {
            timestamp: Some(now),
            metrics: vec![self.bd_seq_metric(now)],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The metrics' values at `ts_ms`, by alias (and by name in a BIRTH).
    fn metrics(&self, ts_ms: i64, birth: bool) -> Vec<proto::Metric> {
        let device = self.config.series_device();
        self.config
            .metrics
            .iter()
            .zip(1u64..)
            .map(|((name, signal), alias)| {
                let value = signal.value_at(self.seed, &format!("{device}/{name}"), ts_ms);
                proto::Metric {
                    name: birth.then(|| name.clone()),
                    alias: Some(alias),
                    timestamp: u64::try_from(ts_ms).ok(),
                    datatype: Some(datatype::DOUBLE),
                    is_null: value.is_none().then_some(true),
                    value: value.map(proto::Value::Double),
                    ..Default::default()
                }
            })
            .collect()
    }

    /// NBIRTH (and DBIRTH): topic and payload of each, in order.
    fn births(&mut self) -> Vec<(String, Vec<u8>)> {
        self.seq = 0;
        let now = unix_now_ms();
        let now_u = now_u64();
        let mut node_metrics = vec![
            self.bd_seq_metric(now_u),
            proto::Metric {
                name: Some(REBIRTH_METRIC.into()),
                timestamp: Some(now_u),
                datatype: Some(datatype::BOOLEAN),
                value: Some(proto::Value::Boolean(false)),
                ..Default::default()
            },
        ];
        let own = self.metrics(now, true);
        let mut out = Vec::new();
        if self.config.device.is_none() {
            node_metrics.extend(own);
            let payload = self.payload(now_u, node_metrics);
            out.push((self.topic("NBIRTH"), payload));
        } else {
            let payload = self.payload(now_u, node_metrics);
            out.push((self.topic("NBIRTH"), payload));
            let payload = self.payload(now_u, own);
            out.push((self.topic("DBIRTH"), payload));
        }
        out
    }

    fn data(&mut self, ts_ms: i64) -> (String, Vec<u8>) {
        let metrics = self.metrics(ts_ms, false);
        let kind = if self.config.device.is_some() {
            "DDATA"
        } else {
            "NDATA"
        };
        let payload = self.payload(now_u64(), metrics);
        (self.topic(kind), payload)
    }

    fn payload(&mut self, now: u64, metrics: Vec<proto::Metric>) -> Vec<u8> {
        proto::Payload {
            timestamp: Some(now),
            seq: Some(self.next_seq()),
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    }
}

fn now_u64() -> u64 {
    u64::try_from(unix_now_ms()).unwrap_or(0)
}

/// Whether an NCMD payload asks for a rebirth.
fn asks_rebirth(payload: &[u8]) -> bool {
    proto::Payload::decode(payload).is_ok_and(|p| {
        p.metrics.iter().any(|m| {
            m.name.as_deref() == Some(REBIRTH_METRIC)
                && m.value == Some(proto::Value::Boolean(true))
        })
    })
}

/// Runs one edge node until `cancel` fires.
pub async fn run_node(
    mqtt: MqttConfig,
    config: SparkplugNodeConfig,
    seed: u64,
    cancel: CancellationToken,
) -> Arc<SparkplugStats> {
    let stats = Arc::new(SparkplugStats::default());
    let interval_ms = duration_ms(config.interval).max(1);
    let mut node = Node {
        // A new bdSeq per run ties the will to this run's BIRTH.
        bd_seq: now_u64() % 256,
        config,
        seed,
        seq: 0,
    };
    let client_id = format!("{}-spb-{}", mqtt.client_id, node.config.node);
    let mut options = MqttOptions::new(client_id, mqtt.host.clone(), mqtt.port);
    options.set_keep_alive(mqtt.keep_alive);
    options.set_last_will(LastWill::new(
        node.topic("NDEATH"),
        node.death(),
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = AsyncClient::new(options, mqtt.queue_capacity.max(16));
    let ncmd = node.topic("NCMD");
    info!(group = %node.config.group, node = %node.config.node, device = ?node.config.device,
          metrics = node.config.metrics.len(), "sparkplug edge node starting");
    let mut connected = false;
    let mut next_ms = align_up(unix_now_ms(), interval_ms);
    let publish = |client: &AsyncClient, (topic, payload): (String, Vec<u8>)| {
        if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, false, payload) {
            debug!(error = %e, "sparkplug publish not queued");
        }
    };
    loop {
        let wait = Duration::from_millis((next_ms - unix_now_ms()).max(0).unsigned_abs());
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(wait) => {
                let ts_ms = next_ms;
                next_ms = align_up(unix_now_ms().max(next_ms + 1), interval_ms);
                if connected {
                    publish(&client, node.data(ts_ms));
                    stats.data_messages.fetch_add(1, Ordering::Relaxed);
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    if let Err(e) = client.try_subscribe(ncmd.clone(), QoS::AtLeastOnce) {
                        debug!(error = %e, "sparkplug NCMD subscription not queued");
                    }
                    for birth in node.births() {
                        publish(&client, birth);
                    }
                    stats.births.fetch_add(1, Ordering::Relaxed);
                    info!(node = %node.config.node, bd_seq = node.bd_seq, "sparkplug edge node born");
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ncmd.as_str() => {
                    if asks_rebirth(&p.payload) {
                        stats.rebirths_requested.fetch_add(1, Ordering::Relaxed);
                        info!(node = %node.config.node, "sparkplug rebirth requested; publishing BIRTHs");
                        for birth in node.births() {
                            publish(&client, birth);
                        }
                        stats.births.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        warn!(error = %e, node = %node.config.node, "sparkplug edge node disconnected; retrying");
                    }
                    connected = false;
                    stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(mqtt.reconnect_delay) => {}
                    }
                }
            },
        }
    }
    // A clean stop is a death too: say so before leaving.
    if connected {
        let _ = client.try_publish(node.topic("NDEATH"), QoS::AtMostOnce, false, node.death());
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Signal;

    fn node(device: Option<&str>) -> Node {
        Node {
            config: SparkplugNodeConfig {
                group: "plant-a".into(),
                node: "edge-1".into(),
                device: device.map(Into::into),
                interval: Duration::from_secs(1),
                metrics: vec![
                    ("Temperature".into(), Signal::constant(21.5, 0)),
                    ("Flow".into(), Signal::constant(3.0, 0)),
                ],
            },
            seed: 7,
            bd_seq: 3,
            seq: 9,
        }
    }

    #[test]
    fn births_name_and_alias_every_metric_and_data_uses_aliases_only() {
        let mut n = node(Some("plc-1"));
        let births = n.births();
        assert_eq!(births[0].0, "spBv1.0/plant-a/NBIRTH/edge-1");
        assert_eq!(births[1].0, "spBv1.0/plant-a/DBIRTH/edge-1/plc-1");
        let nbirth = proto::Payload::decode(births[0].1.as_slice()).unwrap();
        assert_eq!(nbirth.seq, Some(0));
        assert!(nbirth
            .metrics
            .iter()
            .any(|m| m.name.as_deref() == Some("bdSeq") && m.value == Some(proto::Value::Long(3))));
        let dbirth = proto::Payload::decode(births[1].1.as_slice()).unwrap();
        assert_eq!(dbirth.seq, Some(1));
        assert_eq!(dbirth.metrics[1].name.as_deref(), Some("Flow"));
        assert_eq!(dbirth.metrics[1].alias, Some(2));
        let (topic, bytes) = n.data(1_700_000_000_000);
        assert_eq!(topic, "spBv1.0/plant-a/DDATA/edge-1/plc-1");
        let data = proto::Payload::decode(bytes.as_slice()).unwrap();
        assert_eq!(data.seq, Some(2));
        assert_eq!(data.metrics[0].name, None);
        assert_eq!(data.metrics[0].alias, Some(1));
        assert_eq!(data.metrics[0].timestamp, Some(1_700_000_000_000));
        assert_eq!(data.metrics[0].value, Some(proto::Value::Double(21.5)));
        let death = proto::Payload::decode(n.death().as_slice()).unwrap();
        assert_eq!(death.metrics[0].value, Some(proto::Value::Long(3)));
    }

    #[test]
    fn a_rebirth_request_is_recognised() {
        let ask = |v: bool| {
            proto::Payload {
                metrics: vec![proto::Metric {
                    name: Some(REBIRTH_METRIC.into()),
                    value: Some(proto::Value::Boolean(v)),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(asks_rebirth(&ask(true)));
        assert!(!asks_rebirth(&ask(false)));
        assert!(!asks_rebirth(b"\xff\x00"));
    }
}
