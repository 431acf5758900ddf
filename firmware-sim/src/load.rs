//! Load mode: publish a fixed rate of readings over many series for a bounded time.
//!
//! `rate` readings per second are spread over `series` series grouped into
//! `devices` devices (series `i` belongs to device `load-dev-{i % devices}` and
//! is named `s{i}`). Each message carries `per-message` readings of one
//! device:
//!
//! - `per-message > 1`: topic `<prefix>/<device>/batch`, payload a JSON array
//!   `[{"series": "s17", "ts": 1718000000123, "value": 50.2}, ...]` where
//!   `series` is the sensor name (the device is the topic's second level);
//! - `per-message = 1`: topic `<prefix>/<device>/<sensor>`, payload
//!   `{"ts": ..., "value": ...}`, the plant's single-reading shape.
//!
//! Values follow a deterministic [`Signal`] (50 ± 10 sine, σ 1) keyed on the
//! series name, so a consumer can verify what it received.
//!
//! Pacing is open-loop against the wall clock: after `t` seconds, `t · rate`
//! readings should have been handed to the client; publishing awaits the
//! bounded client queue, so a slow broker lowers the achieved rate instead of
//! growing memory. The run stops by itself after `duration`, then waits up to
//! `drain-timeout` for outstanding acknowledgements, and reports the offered
//! and acknowledged rates.
//!
//! What it is not: a latency benchmark. It measures throughput only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::signal::Signal;
use crate::unix_now_ms;

/// Parameters of a load run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub broker_host: String,
    pub broker_port: u16,
    /// Target readings per second.
    pub rate: f64,
    pub series: usize,
    pub devices: usize,
    pub per_message: usize,
    pub duration: Duration,
    pub topic_prefix: String,
    pub qos: QoS,
    pub seed: u64,
    /// Most unacknowledged QoS 1 messages on the wire.
    pub inflight: u16,
    /// Client request queue capacity.
    pub queue_capacity: usize,
    /// How long to wait for the broker at start.
    pub connect_timeout: Duration,
    /// How long to wait for acknowledgements after the last publish.
    pub drain_timeout: Duration,
}

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid load option `{option}`: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
    #[error("broker {addr} not reachable within {timeout:?}: {reason}")]
    Connect {
        addr: String,
        timeout: Duration,
        reason: String,
    },
    #[error("mqtt client closed while publishing: {0}")]
    ClientClosed(#[from] rumqttc::ClientError),
}

/// What a load run achieved.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub target_rate: f64,
    pub readings_sent: u64,
    pub messages_sent: u64,
    pub messages_acked: u64,
    /// Time spent publishing.
    pub publish_secs: f64,
    /// Time until the last acknowledgement (or the drain timeout).
    pub total_secs: f64,
    /// Readings handed to the client per second of publishing.
    pub offered_rate: f64,
    /// Acknowledged readings per second, over the whole run.
    pub acked_rate: f64,
    pub connection_errors: u64,
}

#[derive(Debug)]
struct LoadSeries {
    device: String,
    sensor: String,
    key: String,
}

#[derive(Debug, Serialize)]
struct BatchItem<'a> {
    series: &'a str,
    ts: i64,
    value: f64,
}

#[derive(Debug, Serialize)]
struct SingleItem {
    ts: i64,
    value: f64,
}

impl LoadOptions {
    fn check(&self) -> Result<(), LoadError> {
        let bad = |option, message: &str| {
            Err(LoadError::InvalidOption {
                option,
                message: message.to_owned(),
            })
        };
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad("rate", "must be a positive number of readings per second");
        }
        if self.series == 0 {
            return bad("series", "must be at least 1");
        }
        if self.per_message == 0 || self.per_message > 10_000 {
            return bad("per-message", "must be within 1..=10000");
        }
        if self.devices == 0 {
            return bad("devices", "must be at least 1");
        }
        if self.duration.is_zero() {
            return bad("duration", "must be positive");
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) {
            return bad(
                "topic-prefix",
                "must be a non-empty topic without wildcards",
            );
        }
        if self.inflight == 0 || self.queue_capacity == 0 {
            return bad("inflight", "inflight and queue capacity must be at least 1");
        }
        Ok(())
    }
}

/// Runs a load test; stops after `duration` or when `cancel` fires.
pub async fn run_load(
    opts: LoadOptions,
    cancel: CancellationToken,
) -> Result<LoadReport, LoadError> {
    opts.check()?;
    let devices = opts.devices.min(opts.series);
    // Series grouped per device, round-robin.
    let mut by_device: Vec<Vec<LoadSeries>> = (0..devices).map(|_| Vec::new()).collect();
    for i in 0..opts.series {
        let device = format!("load-dev-{}", i % devices);
        let sensor = format!("s{i}");
        let key = format!("{device}/{sensor}");
        by_device[i % devices].push(LoadSeries {
            device,
            sensor,
            key,
        });
    }
    let signal = Signal {
        offset: 50.0,
        amplitude: 10.0,
        period: Duration::from_secs(60),
        noise_stddev: 1.0,
        drift_per_hour: 0.0,
        start_ms: 0,
        anomalies: Vec::new(),
    };

    let client_id = format!("millrace-sim-load-{}", std::process::id());
    let mut options = MqttOptions::new(client_id, opts.broker_host.clone(), opts.broker_port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_inflight(opts.inflight)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, opts.queue_capacity);
    let addr = format!("{}:{}", opts.broker_host, opts.broker_port);

    // Wait for the connection before the clock starts.
    let connected = tokio::time::timeout(opts.connect_timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(err.to_string()),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            return Err(LoadError::Connect {
                addr,
                timeout: opts.connect_timeout,
                reason,
            })
        }
        Err(_) => {
            return Err(LoadError::Connect {
                addr,
                timeout: opts.connect_timeout,
                reason: "timed out".to_owned(),
            })
        }
    }
    info!(broker = %addr, rate = opts.rate, series = opts.series, devices, per_message = opts.per_message, duration = ?opts.duration, "load run starting");

    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop_loop = CancellationToken::new();
    // Set once we disconnect on purpose, so the broker closing the socket is not an error.
    let closing = CancellationToken::new();
    let mut driver = tokio::spawn({
        let acked = Arc::clone(&acked);
        let errors = Arc::clone(&errors);
        let stop = stop_loop.clone();
        let closing = closing.clone();
        async move {
            loop {
                let event = tokio::select! {
                    e = eventloop.poll() => e,
                    () = stop.cancelled() => return,
                };
                match event {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) if closing.is_cancelled() => return,
                    Err(err) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %err, "load connection error; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });

    let message_rate = opts.rate / opts.per_message as f64;
    let started = Instant::now();
    let mut messages_sent: u64 = 0;
    let mut readings_sent: u64 = 0;
    let mut cursors = vec![0usize; devices];
    let mut device_turn = 0usize;
    let tick = Duration::from_millis(2);
    'publishing: loop {
        let elapsed = started.elapsed();
        if elapsed >= opts.duration || cancel.is_cancelled() {
            break;
        }
        let due = (elapsed.as_secs_f64() * message_rate) as u64;
        while messages_sent < due {
            let d = device_turn % devices;
            device_turn = device_turn.wrapping_add(1);
            let series = &by_device[d];
            let ts = unix_now_ms();
            let (topic, payload) = if opts.per_message == 1 {
                let s = &series[cursors[d] % series.len()];
                cursors[d] = cursors[d].wrapping_add(1);
                let value = signal
                    .value_at(opts.seed, &s.key, ts)
                    .unwrap_or(signal.offset);
                let body = serde_json::to_vec(&SingleItem { ts, value }).unwrap_or_default();
                (
                    format!("{}/{}/{}", opts.topic_prefix, s.device, s.sensor),
                    body,
                )
            } else {
                let items: Vec<BatchItem<'_>> = (0..opts.per_message)
                    .map(|_| {
                        let s = &series[cursors[d] % series.len()];
                        cursors[d] = cursors[d].wrapping_add(1);
                        let value = signal
                            .value_at(opts.seed, &s.key, ts)
                            .unwrap_or(signal.offset);
                        BatchItem {
                            series: &s.sensor,
                            ts,
                            value,
                        }
                    })
                    .collect();
                let body = serde_json::to_vec(&items).unwrap_or_default();
                (
                    format!("{}/{}/batch", opts.topic_prefix, series[0].device),
                    body,
                )
            };
            tokio::select! {
                res = client.publish(topic, opts.qos, false, payload) => res?,
                () = cancel.cancelled() => break 'publishing,
            }
            messages_sent += 1;
            readings_sent += opts.per_message as u64;
            if started.elapsed() >= opts.duration {
                break 'publishing;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = cancel.cancelled() => break,
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();

    if opts.qos != QoS::AtMostOnce {
        let drain_deadline = Instant::now() + opts.drain_timeout;
        while acked.load(Ordering::Relaxed) < messages_sent && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let total_secs = started.elapsed().as_secs_f64();
    closing.cancel();
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(1), &mut driver)
        .await
        .is_err()
    {
        stop_loop.cancel();
        let _ = driver.await;
    }

    let messages_acked = if opts.qos == QoS::AtMostOnce {
        messages_sent
    } else {
        acked.load(Ordering::Relaxed)
    };
    let acked_readings = messages_acked.min(messages_sent) * opts.per_message as u64;
    let report = LoadReport {
        target_rate: opts.rate,
        readings_sent,
        messages_sent,
        messages_acked,
        publish_secs,
        total_secs,
        offered_rate: readings_sent as f64 / publish_secs.max(1e-9),
        acked_rate: acked_readings as f64 / total_secs.max(1e-9),
        connection_errors: errors.load(Ordering::Relaxed),
    };
    info!(
        readings_sent = report.readings_sent,
        messages_acked = report.messages_acked,
        offered_rate = format_args!("{:.0}", report.offered_rate),
        acked_rate = format_args!("{:.0}", report.acked_rate),
        "load run finished"
    );
    Ok(report)
}
