//! Simulated MQTT sensors: publish readings of the plant's signals to a broker.
//!
//! Every sensor publishes, QoS 1, at the multiples of its `interval` since the
//! Unix epoch, stamping each reading with that scheduled instant, so the
//! payload's `ts` and value can be recomputed with
//! [`Signal::value_at`](crate::signal::Signal::value_at). Payloads:
//!
//! - single: `{"ts": 1718000000100, "value": 181.2, "unit": "degC"}`
//! - multi:  `{"ts": 1718000001000, "humidity": 45.3, "ambient": 22.1}`
//!
//! A reading in a dropout is not published (a multi payload leaves the field
//! out, and is skipped when no field is left). With `malformed-rate` a fraction
//! of messages is replaced by one of the [`Malformed`] payloads.
//!
//! One broker connection serves all sensors. Its publish queue is bounded
//! (`queue-capacity`); a reading that finds it full is dropped and counted. If
//! the broker goes away the connection is retried every `reconnect-delay`
//! until it is back; sensors keep their schedule meanwhile.
//!
//! What it is not: an MQTT client library or a broker; it uses rumqttc against
//! an external broker such as mosquitto.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Map, Number, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{MqttConfig, MqttPayload, MqttSensorConfig};
use crate::signal::{align_up, duration_ms, fnv1a, SplitMix64};
use crate::unix_now_ms;

/// How often a repeated warning (queue full, broker down) is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// A sensor that falls this many intervals behind skips ahead instead of bursting.
const MAX_CATCH_UP_INTERVALS: i64 = 10;

/// Publish counters shared by all sensors of one connection.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub malformed: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub skipped_behind: AtomicU64,
    pub connection_errors: AtomicU64,
}

/// The broken payloads a sensor can publish in fault mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// JSON cut off in the middle.
    Truncated,
    /// The value is a string.
    NonNumericValue,
    /// No `ts` field.
    MissingTimestamp,
    /// Not UTF-8, not JSON.
    Garbage,
    /// A bare `NaN` token, which JSON does not allow.
    NanToken,
}

impl Malformed {
    const ALL: [Malformed; 5] = [
        Malformed::Truncated,
        Malformed::NonNumericValue,
        Malformed::MissingTimestamp,
        Malformed::Garbage,
        Malformed::NanToken,
    ];

    fn pick(rng: &mut SplitMix64) -> Self {
        Self::ALL[(rng.next_u64() % Self::ALL.len() as u64) as usize]
    }

    /// The broken payload for a reading at `ts_ms`.
    pub fn payload(self, ts_ms: i64) -> Vec<u8> {
        match self {
            Malformed::Truncated => format!("{{\"ts\": {ts_ms}, \"value\": 1").into_bytes(),
            Malformed::NonNumericValue => {
                format!("{{\"ts\": {ts_ms}, \"value\": \"n/a\"}}").into_bytes()
            }
            Malformed::MissingTimestamp => b"{\"value\": 1.0}".to_vec(),
            Malformed::Garbage => vec![0xff, 0xfe, 0x00, 0x13, 0x37],
            Malformed::NanToken => format!("{{\"ts\": {ts_ms}, \"value\": NaN}}").into_bytes(),
        }
    }
}

/// The JSON payload of a sensor at `ts_ms`, or `None` when every value is in a dropout.
pub fn payload_at(payload: &MqttPayload, device: &str, seed: u64, ts_ms: i64) -> Option<Vec<u8>> {
    let mut object = Map::new();
    object.insert("ts".to_owned(), Value::from(ts_ms));
    match payload {
        MqttPayload::Single {
            sensor,
            unit,
            signal,
        } => {
            let value = signal.value_at(seed, &format!("{device}/{sensor}"), ts_ms)?;
            object.insert("value".to_owned(), Value::Number(Number::from_f64(value)?));
            if let Some(unit) = unit {
                object.insert("unit".to_owned(), Value::from(unit.as_str()));
            }
        }
        MqttPayload::Multi { fields } => {
            for (name, signal) in fields {
                if let Some(n) = signal
                    .value_at(seed, &format!("{device}/{name}"), ts_ms)
                    .and_then(Number::from_f64)
                {
                    object.insert(name.clone(), Value::Number(n));
                }
            }
            if object.len() == 1 {
                return None;
            }
        }
    }
    serde_json::to_vec(&Value::Object(object)).ok()
}

/// Runs all MQTT sensors on one broker connection until `cancel` fires.
pub async fn run_sensors(
    config: MqttConfig,
    sensors: Vec<MqttSensorConfig>,
    seed: u64,
    cancel: CancellationToken,
) -> Arc<MqttStats> {
    let stats = Arc::new(MqttStats::default());
    if sensors.is_empty() {
        return stats;
    }
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options.set_keep_alive(config.keep_alive);
    let (client, eventloop) = AsyncClient::new(options, config.queue_capacity);
    info!(broker = %format!("{}:{}", config.host, config.port), sensors = sensors.len(), "mqtt sensors starting");

    let mut tasks = JoinSet::new();
    tasks.spawn(drive_connection(
        eventloop,
        config.reconnect_delay,
        Arc::clone(&stats),
        cancel.clone(),
    ));
    for sensor in sensors {
        tasks.spawn(run_sensor(
            client.clone(),
            sensor,
            seed,
            Arc::clone(&stats),
            cancel.clone(),
        ));
    }
    cancel.cancelled().await;
    // Sensors stop first; give the connection a moment to flush acknowledgements.
    let _ = client.try_disconnect();
    let drained = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    info!(
        published = stats.published.load(Ordering::Relaxed),
        acked = stats.acked.load(Ordering::Relaxed),
        malformed = stats.malformed.load(Ordering::Relaxed),
        dropped_queue_full = stats.dropped_queue_full.load(Ordering::Relaxed),
        skipped_behind = stats.skipped_behind.load(Ordering::Relaxed),
        connection_errors = stats.connection_errors.load(Ordering::Relaxed),
        "mqtt sensors stopped"
    );
    stats
}

/// Polls the connection, reconnecting after errors, until cancelled.
async fn drive_connection(
    mut eventloop: EventLoop,
    reconnect_delay: Duration,
    stats: Arc<MqttStats>,
    cancel: CancellationToken,
) {
    let mut connected = false;
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = cancel.cancelled() => {
                // Flush the disconnect request queued by the caller, briefly.
                let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                last_warn = None;
                info!("mqtt broker connected");
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(err) => {
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                if connected || last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warn!(error = %err, retry_in = ?reconnect_delay, "mqtt broker connection lost or refused");
                    last_warn = Some(tokio::time::Instant::now());
                }
                connected = false;
                tokio::select! {
                    () = tokio::time::sleep(reconnect_delay) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

async fn run_sensor(
    client: AsyncClient,
    sensor: MqttSensorConfig,
    seed: u64,
    stats: Arc<MqttStats>,
    cancel: CancellationToken,
) {
    let interval_ms = duration_ms(sensor.interval).max(1);
    let mut rng = SplitMix64::new(seed ^ fnv1a(sensor.topic.as_bytes()));
    let mut next_ms = align_up(unix_now_ms(), interval_ms);
    let mut last_warn: Option<tokio::time::Instant> = None;
    debug!(topic = %sensor.topic, interval = ?sensor.interval, "mqtt sensor started");
    loop {
        let wait_ms = next_ms - unix_now_ms();
        if wait_ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait_ms.unsigned_abs())) => {}
                () = cancel.cancelled() => return,
            }
        } else if cancel.is_cancelled() {
            return;
        }
        let ts_ms = next_ms;
        next_ms += interval_ms;
        let behind = unix_now_ms() - next_ms;
        if behind > MAX_CATCH_UP_INTERVALS * interval_ms {
            let skipped = behind / interval_ms;
            stats
                .skipped_behind
                .fetch_add(skipped.unsigned_abs(), Ordering::Relaxed);
            warn!(topic = %sensor.topic, skipped, "sensor fell behind its schedule; skipping ahead");
            next_ms = align_up(unix_now_ms(), interval_ms);
        }

        let malformed = sensor.malformed_rate > 0.0 && rng.next_f64() < sensor.malformed_rate;
        let payload = if malformed {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            Some(Malformed::pick(&mut rng).payload(ts_ms))
        } else {
            payload_at(&sensor.payload, &sensor.device, seed, ts_ms)
        };
        let Some(payload) = payload else { continue };
        match client.try_publish(sensor.topic.as_str(), QoS::AtLeastOnce, false, payload) {
            Ok(()) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                let dropped = stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed) + 1;
                if last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warn!(topic = %sensor.topic, error = %err, dropped_total = dropped, "publish queue full; reading dropped");
                    last_warn = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Signal;

    #[test]
    fn single_payload_shape() {
        let payload = MqttPayload::Single {
            sensor: "temp".into(),
            unit: Some("degC".into()),
            signal: Signal {
                noise_stddev: 0.5,
                ..Signal::constant(180.0, 0)
            },
        };
        let bytes = payload_at(&payload, "boiler-3", 7, 1_000).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["ts"], 1_000);
        assert_eq!(v["unit"], "degC");
        let MqttPayload::Single { signal, .. } = &payload else {
            unreachable!()
        };
        assert_eq!(
            v["value"].as_f64(),
            signal.value_at(7, "boiler-3/temp", 1_000)
        );
    }

    #[test]
    fn multi_payload_omits_dropped_fields() {
        use crate::signal::{Anomaly, AnomalyKind};
        let dropped = Signal {
            anomalies: vec![Anomaly {
                kind: AnomalyKind::Dropout,
                from: Duration::ZERO,
                duration: Duration::from_secs(10),
                every: None,
            }],
            ..Signal::constant(1.0, 0)
        };
        let payload = MqttPayload::Multi {
            fields: vec![
                ("humidity".into(), Signal::constant(45.0, 0)),
                ("ambient".into(), dropped.clone()),
            ],
        };
        let v: Value =
            serde_json::from_slice(&payload_at(&payload, "env-1", 1, 500).unwrap()).unwrap();
        assert_eq!(v["humidity"], 45.0);
        assert!(v.get("ambient").is_none());
        let all_dropped = MqttPayload::Multi {
            fields: vec![("ambient".into(), dropped)],
        };
        assert_eq!(payload_at(&all_dropped, "env-1", 1, 500), None);
    }

    #[test]
    fn malformed_payloads_do_not_parse_as_readings() {
        for m in Malformed::ALL {
            let bytes = m.payload(1_000);
            let parsed: Result<Value, _> = serde_json::from_slice(&bytes);
            let valid_reading = parsed.is_ok_and(|v| v["ts"].is_i64() && v["value"].is_f64());
            assert!(!valid_reading, "{m:?} parses as a valid reading");
        }
    }
}
