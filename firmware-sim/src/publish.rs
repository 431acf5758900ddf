//! Publish mode: a fixed number of single-reading MQTT 3.1.1 messages over one
//! pipelined connection, counting exactly which ones the broker acknowledged.
//!
//! Series `i` in `0..series` is device `d{i % devices}`, sensor `s{i}`, topic
//! `<prefix>/<device>/<sensor>`; messages go round-robin over the series, each
//! one reading:
//!
//! ```text
//! sensors/d3/s17  {"device":"d3","sensor":"s17","ts":1733212345678,"value":50.123}
//! ```
//!
//! `ts` is the wall clock (Unix ms) when the message is made, but strictly
//! increasing per series, so no two readings of a series share an event time.
//! With `--event-step` it steps by that much per reading of a series instead,
//! ending about now: a device replaying what it buffered through an outage.
//! The value is a pure function of the series and the message index
//! ([`reading_value`]), rounded to three decimals.
//!
//! # How it talks to the broker
//!
//! It speaks MQTT 3.1.1 itself over a `TcpStream`, with rumqttc's packet codec
//! (`rumqttc::mqttbytes::v4`) and no client event loop, so that it can keep
//! many publishes on the wire and knows the fate of each:
//!
//! - the writer encodes publishes into one buffer and hands a whole batch to
//!   the socket with one write; at QoS 1 it keeps at most `inflight`
//!   unacknowledged messages, one packet id each, and refills the window once
//!   an eighth of it is free (or after 1 ms), not with one write per PUBACK;
//! - a reader task on the other half of the socket turns PUBACKs into acked
//!   messages (each message counts once) and wakes the writer;
//! - `rate` paces open-loop against the wall clock (after `t` s, `t · rate`
//!   messages handed to the socket); 0 publishes as fast as the broker takes
//!   them;
//! - the run ends when every message is sent and (QoS 1) acknowledged, or
//!   `drain-timeout` after the last write with acknowledgements missing; then a
//!   DISCONNECT and a TCP shutdown, and the reader waits for the broker to
//!   close, so at QoS 0 the broker has read every byte;
//! - with `reconnect`, a dropped connection is retried (50 ms doubling to 1 s,
//!   for up to `give-up-after` without success); the new connection first
//!   republishes every message sent but not acknowledged (same topic, payload
//!   and `ts`, DUP set, same packet id), then goes on with new ones. Without
//!   it, a drop ends the run with the counts so far.
//!
//! What it is not: a general MQTT client (no subscriptions, no QoS 2, no TLS,
//! no login) or a latency benchmark. It measures what a broker accepts.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Disconnect, Packet, PingReq, Publish};
use rumqttc::mqttbytes::{self, QoS};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::signal::splitmix64;
use crate::unix_now_ms;

/// Most messages encoded into one write.
const BATCH_MESSAGES: usize = 2048;
/// Largest packet accepted from the broker.
const MAX_INCOMING_PACKET: usize = 64 * 1024;
/// Limit of one TCP connect plus CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive announced in CONNECT; a PINGREQ goes out after half of it idle.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long to wait for the broker to close after our DISCONNECT.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a refill's worth of acknowledgements before writing
/// what is free (a peer with Nagle on sends its PUBACKs only as we write).
const REFILL_WAIT: Duration = Duration::from_millis(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Parameters of a publish run (the CLI's defaults in [`Default`]).
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Broker `HOST:PORT`.
    pub broker: String,
    /// Distinct messages (readings) to publish.
    pub messages: u64,
    pub series: usize,
    pub devices: usize,
    /// `AtMostOnce` or `AtLeastOnce`.
    pub qos: QoS,
    /// Most unacknowledged QoS 1 messages on the wire.
    pub inflight: u16,
    /// Messages per second, open loop; 0 = as fast as possible.
    pub rate: f64,
    pub topic_prefix: String,
    pub client_id: String,
    /// Reconnect and republish after a dropped connection.
    pub reconnect: bool,
    /// With `reconnect`: stop after this long without a successful connect.
    pub give_up_after: Duration,
    /// How long to wait for missing acknowledgements after the last write.
    pub drain_timeout: Duration,
    /// Write `<device>/<sensor> <ts> <value>` per acked (QoS 0: sent) message here.
    pub acked_out: Option<PathBuf>,
    /// Event time steps by this much per reading of a series instead of
    /// following the wall clock, ending near now: a device replaying what it
    /// buffered through an outage (`messages / series` readings of each
    /// series, `event_step` apart). `None`: the wall clock.
    pub event_step: Option<Duration>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            broker: "127.0.0.1:1883".to_owned(),
            messages: 1_000_000,
            series: 1000,
            devices: 100,
            qos: QoS::AtLeastOnce,
            inflight: 1000,
            rate: 0.0,
            topic_prefix: "sensors".to_owned(),
            client_id: "millrace-publish".to_owned(),
            reconnect: false,
            give_up_after: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            acked_out: None,
            event_step: None,
        }
    }
}

/// Errors that stop a publish run before it has a report.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid publish option `{option}`: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
    #[error("could not connect to the broker at {broker}: {reason}")]
    Connect { broker: String, reason: String },
    #[error("writing {path}: {source}")]
    AckedOut {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a publish run achieved; serialised as the report line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublishReport {
    /// Distinct messages fully written to a connection (a republish is not new).
    pub sent: u64,
    /// Distinct messages acknowledged (QoS 1; 0 at QoS 0).
    pub acked: u64,
    /// Sent but never acknowledged (QoS 1; 0 at QoS 0).
    pub unacked: u64,
    pub qos: u8,
    /// Successful connects (CONNACK accepted).
    pub connections: u64,
    /// Publishes written again on a new connection.
    pub republished: u64,
    /// From the first CONNACK to the end of the run.
    pub elapsed_s: f64,
    /// Acked (QoS 1) or sent (QoS 0) messages per second of `elapsed_s`.
    pub rate: f64,
    /// Messages asked for.
    pub messages: u64,
    /// `--rate` (0 = unpaced).
    pub target_rate: f64,
    /// From the first CONNACK to the last new message handed to the socket.
    pub send_s: f64,
    /// The broker stayed unreachable for `give-up-after`.
    pub gave_up: bool,
}

/// A series' names.
#[derive(Debug, Clone)]
struct SeriesName {
    device: String,
    sensor: String,
    topic: String,
}

/// The device and sensor of series `i`.
pub fn series_name(i: usize, devices: usize) -> (String, String) {
    (format!("d{}", i % devices.max(1)), format!("s{i}"))
}

/// The value of message `index` (of series `index % series`): 50 ± 10 sine
/// over 600 readings of the series, plus ±1 of hashed noise, rounded to three
/// decimals. Always finite.
pub fn reading_value(index: u64, series: usize) -> f64 {
    let series = series.max(1) as u64;
    let s = index % series;
    let k = index / series;
    let phase = std::f64::consts::TAU * (k % 600) as f64 / 600.0 + s as f64 * 0.1;
    let noise = (splitmix64(index) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    ((50.0 + 10.0 * phase.sin() + noise) * 1000.0).round() / 1000.0
}

/// The JSON payload of one reading.
pub fn payload(device: &str, sensor: &str, ts: i64, value: f64) -> String {
    format!(r#"{{"device":"{device}","sensor":"{sensor}","ts":{ts},"value":{value}}}"#)
}

/// A message given a packet id (0 at QoS 0) and an event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    pkid: u16,
    index: u64,
    ts: i64,
}

/// A QoS 1 message on the wire, not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Pending {
    index: u64,
    ts: i64,
    /// Its first write completed (it counts as sent).
    written: bool,
}

/// The acknowledgement state shared by the writer and a connection's reader.
#[derive(Debug)]
struct Window {
    /// By packet id (index 0 unused): the message waiting for its PUBACK.
    slots: Vec<Option<Pending>>,
    /// Packet ids with no message.
    free: Vec<u16>,
    sent: u64,
    acked: u64,
    /// PUBACKs for packet ids with nothing in flight.
    stray_acks: u64,
    /// `(index, ts)` of every acked (QoS 0: sent) message, if asked for.
    log: Option<Vec<(u64, i64)>>,
}

impl Window {
    fn new(inflight: u16, log: bool) -> Self {
        Self {
            slots: vec![None; usize::from(inflight) + 1],
            free: (1..=inflight).rev().collect(),
            sent: 0,
            acked: 0,
            stray_acks: 0,
            log: log.then(Vec::new),
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - 1 - self.free.len()
    }

    fn ack(&mut self, pkid: u16) {
        match self.slots.get_mut(usize::from(pkid)).and_then(Option::take) {
            Some(p) => {
                self.free.push(pkid);
                self.acked += 1;
                if !p.written {
                    // Acked before the writer saw its write complete.
                    self.sent += 1;
                }
                if let Some(log) = &mut self.log {
                    log.push((p.index, p.ts));
                }
            }
            None => self.stray_acks += 1,
        }
    }

    /// Counts the batch's messages sent; those acked meanwhile already count.
    fn mark_written(&mut self, batch: &[Sent]) {
        for m in batch {
            if let Some(Some(p)) = self.slots.get_mut(usize::from(m.pkid)) {
                if p.index == m.index && !p.written {
                    p.written = true;
                    self.sent += 1;
                }
            }
        }
    }

    /// Every message in flight, oldest first.
    fn unacked(&self) -> Vec<Sent> {
        let mut v: Vec<Sent> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(pkid, p)| {
                let p = (*p)?;
                Some(Sent {
                    pkid: u16::try_from(pkid).ok()?,
                    index: p.index,
                    ts: p.ts,
                })
            })
            .collect();
        v.sort_by_key(|m| m.index);
        v
    }
}

#[derive(Debug)]
struct Shared {
    window: Mutex<Window>,
    /// Woken when acknowledgements free packet ids or a reader ends.
    acked: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads what the broker sends on one connection: PUBACKs release their
/// messages; EOF, an error or a DISCONNECT cancel `lost`.
async fn read_acks(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    shared: Arc<Shared>,
    lost: CancellationToken,
) {
    let mut pkids = Vec::new();
    let reason = 'conn: loop {
        loop {
            match Packet::read(&mut buf, MAX_INCOMING_PACKET) {
                Ok(Packet::PubAck(ack)) => pkids.push(ack.pkid),
                Ok(Packet::Disconnect) => break 'conn "DISCONNECT from the broker".to_owned(),
                Ok(_) => {}
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => break 'conn format!("malformed packet from the broker: {e}"),
            }
        }
        if !pkids.is_empty() {
            let mut window = shared.lock();
            for &pkid in &pkids {
                window.ack(pkid);
            }
            drop(window);
            pkids.clear();
            shared.acked.notify_one();
        }
        buf.reserve(64 * 1024);
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "closed by the broker".to_owned(),
            Ok(_) => {}
            Err(e) => break format!("read: {e}"),
        }
    };
    tracing::debug!(%reason, "connection reader ended");
    lost.cancel();
    shared.acked.notify_one();
}

/// One live connection: its write half and the task reading its acks.
#[derive(Debug)]
struct Connection {
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
    /// Cancelled when the reader ends (EOF, error, DISCONNECT from the broker).
    lost: CancellationToken,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Writes `bytes`; fails when the write fails or the reader saw the connection end.
async fn write_all(conn: &mut Connection, bytes: &[u8]) -> Result<(), String> {
    tokio::select! {
        r = conn.writer.write_all(bytes) => r.map_err(|e| format!("write: {e}")),
        () = conn.lost.cancelled() => Err("the connection was closed".to_owned()),
    }
}

/// Topic and payload of every message.
#[derive(Debug)]
struct Encoder {
    names: Vec<SeriesName>,
    qos: QoS,
}

impl Encoder {
    fn series_of(&self, index: u64) -> &SeriesName {
        &self.names[(index % self.names.len() as u64) as usize]
    }

    fn encode(&self, buf: &mut BytesMut, m: &Sent, dup: bool) {
        let s = self.series_of(m.index);
        let value = reading_value(m.index, self.names.len());
        let publish = Publish {
            dup,
            qos: self.qos,
            retain: false,
            topic: s.topic.clone(),
            pkid: m.pkid,
            payload: Bytes::from(payload(&s.device, &s.sensor, m.ts, value)),
        };
        // Fails only for a QoS 1 packet id 0, which the window never hands out.
        if let Err(error) = publish.write(buf) {
            warn!(%error, index = m.index, "publish not encoded");
        }
    }
}

/// How a connection's run ended.
#[derive(Debug)]
enum Ended {
    /// Everything sent and acknowledged, or the drain timed out.
    Done,
    Cancelled,
    Dropped(String),
}

#[derive(Debug)]
struct Publisher {
    opts: PublishOptions,
    encoder: Encoder,
    last_ts: Vec<i64>,
    /// [`PublishOptions::event_step`] in ms.
    event_step_ms: Option<i64>,
    /// Index of the next new message.
    next: u64,
    shared: Arc<Shared>,
    /// Pacing origin: the first CONNACK.
    started: Instant,
    /// Any packet written (for keep-alive).
    last_write: Instant,
    /// The last publish (new or republished) written.
    last_publish: Instant,
    /// When the last new message was written.
    send_done: Option<Instant>,
    connections: u64,
    republished: u64,
    buf: BytesMut,
    batch: Vec<Sent>,
    /// Free packet ids worth a write while others are in flight: an eighth of
    /// the window, so a slow acknowledger does not cost a write per PUBACK.
    refill: usize,
    /// Since when the window has had fewer free ids than `refill`.
    short_since: Option<Instant>,
}

impl PublishOptions {
    fn check(&self) -> Result<(), PublishError> {
        let bad = |option, message: &str| {
            Err(PublishError::InvalidOption {
                option,
                message: message.to_owned(),
            })
        };
        if self.messages == 0 {
            return bad("messages", "must be at least 1");
        }
        if self.series == 0 {
            return bad("series", "must be at least 1");
        }
        if self.devices == 0 {
            return bad("devices", "must be at least 1");
        }
        if !matches!(self.qos, QoS::AtMostOnce | QoS::AtLeastOnce) {
            return bad("qos", "must be 0 or 1");
        }
        if self.inflight == 0 {
            return bad("inflight", "must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return bad("rate", "must be messages per second, 0 = unpaced");
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) {
            return bad(
                "topic-prefix",
                "must be a non-empty topic without wildcards",
            );
        }
        if self.client_id.is_empty() {
            return bad("client-id", "must not be empty");
        }
        Ok(())
    }
}

/// Runs a publish; ends early (with a report of what was done) when `cancel` fires.
/// What `last_ts` starts at: with an event step, one step before the first
/// reading of a series, so its last reading lands about now.
fn first_ts(opts: &PublishOptions) -> i64 {
    match opts.event_step {
        Some(step) => {
            let step_ms = step.as_millis().max(1) as i64;
            let per_series = opts.messages.div_ceil(opts.series as u64) as i64;
            unix_now_ms() - step_ms.saturating_mul(per_series)
        }
        None => i64::MIN,
    }
}

pub async fn run_publish(
    opts: PublishOptions,
    cancel: CancellationToken,
) -> Result<PublishReport, PublishError> {
    opts.check()?;
    let names = (0..opts.series)
        .map(|i| {
            let (device, sensor) = series_name(i, opts.devices);
            let topic = format!("{}/{device}/{sensor}", opts.topic_prefix);
            SeriesName {
                device,
                sensor,
                topic,
            }
        })
        .collect();
    let now = Instant::now();
    let mut p = Publisher {
        encoder: Encoder {
            names,
            qos: opts.qos,
        },
        last_ts: vec![first_ts(&opts); opts.series],
        event_step_ms: opts.event_step.map(|d| d.as_millis().max(1) as i64),
        next: 0,
        shared: Arc::new(Shared {
            window: Mutex::new(Window::new(opts.inflight, opts.acked_out.is_some())),
            acked: Notify::new(),
        }),
        started: now,
        last_write: now,
        last_publish: now,
        send_done: None,
        connections: 0,
        republished: 0,
        buf: BytesMut::with_capacity(256 * 1024),
        batch: Vec::with_capacity(BATCH_MESSAGES),
        refill: usize::from(opts.inflight / 8).clamp(1, BATCH_MESSAGES),
        short_since: None,
        opts,
    };

    let first = if p.opts.reconnect {
        p.reconnect(&cancel).await
    } else {
        Some(p.connect().await)
    };
    let mut conn = match first {
        Some(Ok(conn)) => conn,
        Some(Err(reason)) => {
            return Err(PublishError::Connect {
                broker: p.opts.broker.clone(),
                reason,
            })
        }
        None => return Ok(p.report(false)),
    };
    p.started = Instant::now();
    p.last_publish = p.started;
    info!(broker = %p.opts.broker, messages = p.opts.messages, series = p.opts.series,
        qos = p.opts.qos as u8, inflight = p.opts.inflight, rate = p.opts.rate, "publishing");

    let mut gave_up = false;
    loop {
        let ended = p.drive(&mut conn, &cancel).await;
        drop(conn);
        match ended {
            Ended::Done | Ended::Cancelled => break,
            Ended::Dropped(reason) if !p.opts.reconnect => {
                warn!(%reason, "connection lost; ending the run");
                break;
            }
            Ended::Dropped(reason) => {
                warn!(%reason, "connection lost; reconnecting");
                match p.reconnect(&cancel).await {
                    Some(Ok(c)) => conn = c,
                    Some(Err(reason)) => {
                        warn!(%reason, give_up_after = ?p.opts.give_up_after,
                            "broker unreachable; giving up");
                        gave_up = true;
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    let report = p.report(gave_up);
    if let Some(path) = &p.opts.acked_out {
        p.write_acked_out(path)
            .map_err(|source| PublishError::AckedOut {
                path: path.clone(),
                source,
            })?;
    }
    let stray_acks = p.shared.lock().stray_acks;
    info!(
        sent = report.sent,
        acked = report.acked,
        unacked = report.unacked,
        connections = report.connections,
        republished = report.republished,
        stray_acks,
        rate = format_args!("{:.0}", report.rate),
        "publish run finished"
    );
    Ok(report)
}

impl Publisher {
    fn qos1(&self) -> bool {
        self.opts.qos == QoS::AtLeastOnce
    }

    fn report(&self, gave_up: bool) -> PublishReport {
        let w = self.shared.lock();
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let (acked, unacked) = if self.qos1() {
            (w.acked, w.sent.saturating_sub(w.acked))
        } else {
            (0, 0)
        };
        let done = if self.qos1() { acked } else { w.sent };
        PublishReport {
            sent: w.sent,
            acked,
            unacked,
            qos: self.opts.qos as u8,
            connections: self.connections,
            republished: self.republished,
            elapsed_s,
            rate: done as f64 / elapsed_s.max(1e-9),
            messages: self.opts.messages,
            target_rate: self.opts.rate,
            send_s: self
                .send_done
                .map_or(elapsed_s, |t| (t - self.started).as_secs_f64()),
            gave_up,
        }
    }

    fn write_acked_out(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut log = self.shared.lock().log.take().unwrap_or_default();
        log.sort_unstable();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (index, ts) in log {
            let s = self.encoder.series_of(index);
            let value = reading_value(index, self.opts.series);
            writeln!(out, "{}/{} {ts} {value}", s.device, s.sensor)?;
        }
        out.flush()
    }

    /// One connect attempt: TCP, CONNECT, CONNACK; starts the ack reader.
    async fn connect(&mut self) -> Result<Connection, String> {
        let attempt = async {
            let stream = TcpStream::connect(&self.opts.broker)
                .await
                .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let (mut rd, mut wr) = stream.into_split();
            let mut connect = Connect::new(self.opts.client_id.clone());
            connect.keep_alive = u16::try_from(KEEP_ALIVE.as_secs()).unwrap_or(u16::MAX);
            connect.clean_session = true;
            let mut out = BytesMut::new();
            connect.write(&mut out).map_err(|e| e.to_string())?;
            wr.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut inbuf = BytesMut::with_capacity(64 * 1024);
            loop {
                match Packet::read(&mut inbuf, MAX_INCOMING_PACKET) {
                    Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => break,
                    Ok(Packet::ConnAck(ack)) => {
                        return Err(format!("connection refused: {:?}", ack.code))
                    }
                    Ok(other) => return Err(format!("expected CONNACK, got {other:?}")),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Err(format!("bad CONNACK: {e}")),
                }
                if rd.read_buf(&mut inbuf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("the broker closed the connection before CONNACK".to_owned());
                }
            }
            Ok((rd, wr, inbuf))
        };
        let (rd, wr, inbuf) = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("no CONNACK within {CONNECT_TIMEOUT:?}"))??;
        self.connections += 1;
        let lost = CancellationToken::new();
        let reader = tokio::spawn(read_acks(rd, inbuf, Arc::clone(&self.shared), lost.clone()));
        self.last_write = Instant::now();
        Ok(Connection {
            writer: wr,
            reader,
            lost,
        })
    }

    /// Connects with backoff until `give-up-after` passes without success
    /// (`Some(Err)`) or `cancel` fires (`None`).
    async fn reconnect(
        &mut self,
        cancel: &CancellationToken,
    ) -> Option<Result<Connection, String>> {
        let deadline = Instant::now() + self.opts.give_up_after;
        let mut delay = BACKOFF_MIN;
        loop {
            let err = tokio::select! {
                () = cancel.cancelled() => return None,
                c = self.connect() => match c {
                    Ok(c) => return Some(Ok(c)),
                    Err(e) => e,
                },
            };
            if Instant::now() + delay >= deadline {
                return Some(Err(err));
            }
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Publishes on `conn` until the run is done, cancelled or the connection drops.
    async fn drive(&mut self, conn: &mut Connection, cancel: &CancellationToken) -> Ended {
        if let Err(reason) = self.republish(conn).await {
            return Ended::Dropped(reason);
        }
        let messages = self.opts.messages;
        loop {
            let all_new_sent = self.next >= messages;
            if all_new_sent && self.send_done.is_none() {
                self.send_done = Some(Instant::now());
            }
            let in_flight = if self.qos1() {
                self.shared.lock().in_flight()
            } else {
                0
            };
            let drain_deadline = self.last_publish + self.opts.drain_timeout;
            if all_new_sent && (in_flight == 0 || Instant::now() >= drain_deadline) {
                if in_flight > 0 {
                    warn!(in_flight, drain_timeout = ?self.opts.drain_timeout,
                        "acknowledgements missing after the drain timeout");
                }
                self.close(conn).await;
                return Ended::Done;
            }
            if cancel.is_cancelled() {
                self.close(conn).await;
                return Ended::Cancelled;
            }
            if conn.lost.is_cancelled() {
                return Ended::Dropped("the broker closed the connection".to_owned());
            }
            if Instant::now() >= self.last_write + KEEP_ALIVE / 2 {
                if let Err(reason) = self.ping(conn).await {
                    return Ended::Dropped(reason);
                }
            }

            // What to wait for, if nothing can be written now.
            let wake_at = if all_new_sent {
                Some(drain_deadline)
            } else if self.opts.rate > 0.0 {
                let due =
                    ((self.started.elapsed().as_secs_f64() * self.opts.rate) as u64).min(messages);
                if due > self.next {
                    let want = usize::try_from(due - self.next)
                        .unwrap_or(usize::MAX)
                        .min(BATCH_MESSAGES);
                    self.send_new(conn, want).await
                } else {
                    let next_due = (self.next + 1) as f64 / self.opts.rate;
                    Some(self.started + Duration::from_secs_f64(next_due))
                }
            } else {
                let want = usize::try_from(messages - self.next)
                    .unwrap_or(usize::MAX)
                    .min(BATCH_MESSAGES);
                self.send_new(conn, want).await
            };
            match wake_at {
                // Sent a batch.
                None => {}
                Some(at) => {
                    let at = at.min(self.last_write + KEEP_ALIVE / 2);
                    tokio::select! {
                        () = self.shared.acked.notified() => {}
                        () = conn.lost.cancelled() => {}
                        () = cancel.cancelled() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }

    /// Sends up to `want` new messages. `None` when a batch went out (or the
    /// write failed: the caller sees `lost`), else when to look again: the
    /// QoS 1 window has fewer free packet ids than a refill, and only
    /// acknowledgements help.
    async fn send_new(&mut self, conn: &mut Connection, want: usize) -> Option<Instant> {
        if self.encode_new(want) == 0 {
            // Woken by acknowledgements; by the clock only to end a refill wait.
            let ping_at = self.last_write + KEEP_ALIVE / 2;
            return Some(match self.short_since {
                Some(t) if t + REFILL_WAIT > Instant::now() => (t + REFILL_WAIT).min(ping_at),
                _ => ping_at,
            });
        }
        self.short_since = None;
        if let Err(reason) = self.flush_batch(conn).await {
            tracing::debug!(%reason, "batch not written");
            conn.lost.cancel();
        }
        None
    }

    /// Encodes up to `want` new messages into the buffer (fewer, or none, when
    /// the QoS 1 window is short of packet ids); returns how many.
    fn encode_new(&mut self, want: usize) -> usize {
        self.batch.clear();
        let now_ms = unix_now_ms();
        let series = self.opts.series as u64;
        let qos1 = self.qos1();
        let mut window = self.shared.lock();
        let n = if qos1 {
            // With messages in flight, wait (briefly) until a refill is
            // worth a write.
            let worth = want.min(self.refill);
            let free = window.free.len();
            let now = Instant::now();
            let short_since = *self.short_since.get_or_insert(now);
            if free == 0 || (free < worth && now < short_since + REFILL_WAIT) {
                0
            } else {
                want.min(free)
            }
        } else {
            want
        };
        for _ in 0..n {
            let index = self.next;
            self.next += 1;
            let s = (index % series) as usize;
            let ts = match self.event_step_ms {
                Some(step) => self.last_ts[s].saturating_add(step),
                None => now_ms.max(self.last_ts[s].saturating_add(1)),
            };
            self.last_ts[s] = ts;
            let pkid = if qos1 {
                let pkid = window.free.pop().unwrap_or(0);
                if let Some(slot) = window.slots.get_mut(usize::from(pkid)) {
                    *slot = Some(Pending {
                        index,
                        ts,
                        written: false,
                    });
                }
                pkid
            } else {
                0
            };
            self.batch.push(Sent { pkid, index, ts });
        }
        drop(window);
        for m in &self.batch {
            self.encoder.encode(&mut self.buf, m, false);
        }
        n
    }

    /// Writes the encoded batch and counts it sent (QoS 0: logs it too). At
    /// QoS 0 a batch that fails to write is lost, as QoS 0 allows.
    async fn flush_batch(&mut self, conn: &mut Connection) -> Result<(), String> {
        let written = write_all(conn, &self.buf).await;
        self.buf.clear();
        written?;
        let now = Instant::now();
        self.last_write = now;
        self.last_publish = now;
        let mut window = self.shared.lock();
        if self.qos1() {
            window.mark_written(&self.batch);
        } else {
            window.sent += self.batch.len() as u64;
            if let Some(log) = &mut window.log {
                log.extend(self.batch.iter().map(|m| (m.index, m.ts)));
            }
        }
        Ok(())
    }

    /// Writes every unacknowledged message again (DUP set, same packet id).
    async fn republish(&mut self, conn: &mut Connection) -> Result<(), String> {
        let pending = self.shared.lock().unacked();
        if pending.is_empty() {
            return Ok(());
        }
        info!(
            messages = pending.len(),
            "republishing unacknowledged messages"
        );
        for chunk in pending.chunks(BATCH_MESSAGES) {
            self.batch.clear();
            self.batch.extend_from_slice(chunk);
            for m in chunk {
                self.encoder.encode(&mut self.buf, m, true);
            }
            self.flush_batch(conn).await?;
            self.republished += chunk.len() as u64;
        }
        Ok(())
    }

    async fn ping(&mut self, conn: &mut Connection) -> Result<(), String> {
        let mut b = BytesMut::new();
        PingReq.write(&mut b).map_err(|e| e.to_string())?;
        write_all(conn, &b).await?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// DISCONNECT, TCP shutdown, then wait (bounded) for the broker to close,
    /// so it has read every byte before the run ends.
    async fn close(&mut self, conn: &mut Connection) {
        let mut b = BytesMut::new();
        if Disconnect.write(&mut b).is_ok() && write_all(conn, &b).await.is_ok() {
            let _ = conn.writer.shutdown().await;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.lost.cancelled()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{ConnAck, PingResp, PubAck};
    use std::collections::{HashMap, HashSet};
    use tokio::net::TcpListener;

    /// What the fake broker saw.
    #[derive(Debug, Default)]
    struct Seen {
        /// (connection number from 1, publish), in arrival order.
        publishes: Vec<(usize, Publish)>,
        disconnects: usize,
    }

    /// How the fake broker misbehaves.
    #[derive(Debug, Clone, Copy, Default)]
    struct Faults {
        /// On the first connection, close the socket on reading this publish
        /// (1-based), acknowledging neither it nor anything after.
        drop_at: Option<usize>,
        /// Never acknowledge this publish (1-based, first connection).
        never_ack: Option<usize>,
    }

    /// A broker that accepts any CONNECT, acknowledges QoS 1 publishes in
    /// batches (one write per read) and records what it gets.
    async fn fake_broker(listener: TcpListener, faults: Faults, seen: Arc<Mutex<Seen>>) {
        let mut conn_no = 0;
        while let Ok((mut sock, _)) = listener.accept().await {
            conn_no += 1;
            let mut buf = BytesMut::new();
            let mut n = 0;
            'conn: loop {
                let mut out = BytesMut::new();
                loop {
                    match Packet::read(&mut buf, 1 << 20) {
                        Ok(Packet::Connect(_)) => {
                            ConnAck::new(ConnectReturnCode::Success, false)
                                .write(&mut out)
                                .unwrap();
                        }
                        Ok(Packet::Publish(p)) => {
                            n += 1;
                            if conn_no == 1 && faults.drop_at == Some(n) {
                                break 'conn;
                            }
                            let skip = conn_no == 1 && faults.never_ack == Some(n);
                            if p.qos == QoS::AtLeastOnce && !skip {
                                PubAck::new(p.pkid).write(&mut out).unwrap();
                            }
                            seen.lock().unwrap().publishes.push((conn_no, p));
                        }
                        Ok(Packet::PingReq) => {
                            PingResp.write(&mut out).unwrap();
                        }
                        Ok(Packet::Disconnect) => {
                            seen.lock().unwrap().disconnects += 1;
                            break 'conn;
                        }
                        Ok(other) => panic!("unexpected packet {other:?}"),
                        Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => panic!("bad packet: {e}"),
                    }
                }
                if !out.is_empty() && sock.write_all(&out).await.is_err() {
                    break;
                }
                match sock.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    async fn start_broker(faults: Faults) -> (String, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(fake_broker(listener, faults, Arc::clone(&seen)));
        (addr, seen)
    }

    fn options(broker: String) -> PublishOptions {
        PublishOptions {
            broker,
            messages: 2000,
            series: 7,
            devices: 3,
            inflight: 64,
            give_up_after: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            ..PublishOptions::default()
        }
    }

    /// `(series, ts, value)` per line of an `--acked-out` file.
    fn read_acked_out(path: &std::path::Path) -> Vec<(String, i64, f64)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                let mut f = line.split(' ');
                let series = f.next().unwrap().to_owned();
                let ts = f.next().unwrap().parse().unwrap();
                let value = f.next().unwrap().parse().unwrap();
                assert!(f.next().is_none(), "{line}");
                (series, ts, value)
            })
            .collect()
    }

    fn parse_payload(p: &Publish) -> serde_json::Value {
        serde_json::from_slice(&p.payload).unwrap()
    }

    #[test]
    fn payload_is_a_json_reading_with_four_fields() {
        let (device, sensor) = series_name(17, 7);
        assert_eq!((device.as_str(), sensor.as_str()), ("d3", "s17"));
        let text = payload(&device, &sensor, 1_733_212_345_678, 50.123);
        assert_eq!(
            text,
            r#"{"device":"d3","sensor":"s17","ts":1733212345678,"value":50.123}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 4);
        assert_eq!(obj["device"], "d3");
        assert_eq!(obj["sensor"], "s17");
        assert_eq!(obj["ts"].as_i64(), Some(1_733_212_345_678));
        assert_eq!(obj["value"].as_f64(), Some(50.123));
    }

    #[test]
    fn values_are_finite_deterministic_and_round_trip() {
        for index in (0..100_000u64).step_by(7) {
            let v = reading_value(index, 1000);
            assert!(v.is_finite() && (38.0..=62.0).contains(&v), "{v}");
            assert_eq!(v, reading_value(index, 1000));
            assert_eq!(format!("{v}").parse::<f64>().unwrap(), v);
        }
    }

    #[test]
    fn an_ack_before_the_write_completes_counts_the_message_once() {
        let mut w = Window::new(4, true);
        let pkid = w.free.pop().unwrap();
        w.slots[usize::from(pkid)] = Some(Pending {
            index: 0,
            ts: 5,
            written: false,
        });
        let batch = [Sent {
            pkid,
            index: 0,
            ts: 5,
        }];
        w.ack(pkid);
        w.mark_written(&batch);
        w.ack(pkid);
        assert_eq!((w.sent, w.acked, w.stray_acks, w.in_flight()), (1, 1, 1, 0));
        assert_eq!(w.log.as_deref(), Some(&[(0, 5)][..]));
    }

    /// With an event step, each series' event times are `step` apart and
    /// its last one lands at about the wall clock (never ahead of it).
    #[tokio::test]
    async fn an_event_step_spaces_each_series_readings_and_ends_about_now() {
        let (broker, _seen) = start_broker(Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let acked_out = dir.path().join("acked");
        let opts = PublishOptions {
            acked_out: Some(acked_out.clone()),
            event_step: Some(Duration::from_secs(1)),
            ..options(broker)
        };
        let before_ms = unix_now_ms();
        let report = run_publish(opts, CancellationToken::new()).await.unwrap();
        assert_eq!(report.acked, 2000);
        let mut by_series: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
        for (series, ts, _) in read_acked_out(&acked_out) {
            by_series.entry(series).or_default().push(ts);
        }
        assert_eq!(by_series.len(), 7);
        for times in by_series.values_mut() {
            times.sort_unstable();
            assert!(times.windows(2).all(|w| w[1] - w[0] == 1000), "1 s apart");
            let last = *times.last().unwrap();
            assert!(last <= unix_now_ms(), "never ahead of the clock");
            assert!(
                last >= before_ms - 2000,
                "ends about now: {last} vs {before_ms}"
            );
        }
    }

    #[tokio::test]
    async fn qos1_every_message_acked_once() {
        let (broker, seen) = start_broker(Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let acked_out = dir.path().join("acked");
        let opts = PublishOptions {
            acked_out: Some(acked_out.clone()),
            ..options(broker)
        };
        let report = run_publish(opts, CancellationToken::new()).await.unwrap();
        assert_eq!((report.sent, report.acked, report.unacked), (2000, 2000, 0));
        assert_eq!(
            (report.connections, report.republished, report.qos),
            (1, 0, 1)
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.publishes.len(), 2000);
        assert_eq!(seen.disconnects, 1);
        let (_, first) = &seen.publishes[0];
        assert_eq!(first.topic, "sensors/d0/s0");
        assert!(!first.dup);
        let v = parse_payload(first);
        assert_eq!(
            (v["device"].as_str(), v["sensor"].as_str()),
            (Some("d0"), Some("s0"))
        );
        assert_eq!(v["value"].as_f64(), Some(reading_value(0, 7)));
        assert_eq!(read_acked_out(&acked_out).len(), 2000);
    }

    #[tokio::test]
    async fn reconnect_republishes_the_unacked_and_counts_each_message_once() {
        let (broker, seen) = start_broker(Faults {
            drop_at: Some(777),
            ..Faults::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let acked_out = dir.path().join("acked");
        let opts = PublishOptions {
            messages: 5000,
            reconnect: true,
            acked_out: Some(acked_out.clone()),
            ..options(broker)
        };
        let report = run_publish(opts, CancellationToken::new()).await.unwrap();
        assert_eq!((report.sent, report.acked, report.unacked), (5000, 5000, 0));
        assert_eq!(report.connections, 2);
        assert!(
            (1..=64).contains(&report.republished),
            "{}",
            report.republished
        );
        assert!(!report.gave_up);

        // The broker got every message, the republished ones again with DUP
        // and the same payload; nothing was new on the second connection
        // before the republished ones.
        let seen = seen.lock().unwrap();
        let mut payloads: HashMap<Vec<u8>, usize> = HashMap::new();
        for (_, p) in &seen.publishes {
            *payloads.entry(p.payload.to_vec()).or_default() += 1;
        }
        assert_eq!(payloads.len(), 5000);
        let second: Vec<&Publish> = seen
            .publishes
            .iter()
            .filter(|(c, _)| *c == 2)
            .map(|(_, p)| p)
            .collect();
        let dups = second.iter().take_while(|p| p.dup).count();
        assert_eq!(dups as u64, report.republished);
        assert!(second[dups..].iter().all(|p| !p.dup));
        assert!(seen
            .publishes
            .iter()
            .filter(|(c, _)| *c == 1)
            .all(|(_, p)| !p.dup));

        // Acked-out: each message once, event times strictly increasing per
        // series, values as published.
        let lines = read_acked_out(&acked_out);
        assert_eq!(lines.len(), 5000);
        let published: HashMap<(String, i64), f64> = seen
            .publishes
            .iter()
            .map(|(_, p)| {
                let v = parse_payload(p);
                let series = format!(
                    "{}/{}",
                    v["device"].as_str().unwrap(),
                    v["sensor"].as_str().unwrap()
                );
                (
                    (series, v["ts"].as_i64().unwrap()),
                    v["value"].as_f64().unwrap(),
                )
            })
            .collect();
        let mut last: HashMap<&str, i64> = HashMap::new();
        let mut distinct = HashSet::new();
        for (series, ts, value) in &lines {
            if let Some(prev) = last.insert(series, *ts) {
                assert!(*ts > prev, "{series}: {ts} after {prev}");
            }
            assert!(distinct.insert((series.clone(), *ts)));
            assert_eq!(published.get(&(series.clone(), *ts)), Some(value));
        }
    }

    #[tokio::test]
    async fn without_reconnect_a_drop_ends_the_run() {
        let (broker, _seen) = start_broker(Faults {
            drop_at: Some(300),
            ..Faults::default()
        })
        .await;
        let report = run_publish(options(broker), CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(report.connections, 1);
        assert!(report.acked < 300, "{report:?}");
        assert!(report.sent >= report.acked);
        assert_eq!(report.unacked, report.sent - report.acked);
    }

    #[tokio::test]
    async fn a_missing_ack_is_reported_after_the_drain_timeout() {
        let (broker, _seen) = start_broker(Faults {
            never_ack: Some(10),
            ..Faults::default()
        })
        .await;
        let opts = PublishOptions {
            messages: 100,
            drain_timeout: Duration::from_millis(200),
            ..options(broker)
        };
        let report = run_publish(opts, CancellationToken::new()).await.unwrap();
        assert_eq!((report.sent, report.acked, report.unacked), (100, 99, 1));
    }

    #[tokio::test]
    async fn qos0_writes_everything_then_disconnects() {
        let (broker, seen) = start_broker(Faults::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let acked_out = dir.path().join("sent");
        let opts = PublishOptions {
            messages: 10_000,
            qos: QoS::AtMostOnce,
            acked_out: Some(acked_out.clone()),
            ..options(broker)
        };
        let report = run_publish(opts, CancellationToken::new()).await.unwrap();
        assert_eq!(
            (report.sent, report.acked, report.unacked, report.qos),
            (10_000, 0, 0, 0)
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.publishes.len(), 10_000);
        assert!(seen.publishes.iter().all(|(_, p)| p.qos == QoS::AtMostOnce));
        assert_eq!(seen.disconnects, 1);
        assert_eq!(read_acked_out(&acked_out).len(), 10_000);
    }

    #[tokio::test]
    async fn rate_paces_against_the_wall_clock() {
        let (broker, _seen) = start_broker(Faults::default()).await;
        let opts = PublishOptions {
            messages: 400,
            rate: 2000.0,
            ..options(broker)
        };
        let report = run_publish(opts, CancellationToken::new()).await.unwrap();
        assert_eq!(report.acked, 400);
        // The last message is due at 400 / 2000 = 0.2 s.
        assert!(report.send_s >= 0.19, "{report:?}");
    }

    #[tokio::test]
    async fn an_unreachable_broker_fails_the_start() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = run_publish(options(addr), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, PublishError::Connect { .. }), "{err}");
    }
}
