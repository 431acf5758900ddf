//! The MQTT source: subscribes to an external broker and feeds decoded
//! readings into the pipeline's ingest channel.
//!
//! What it is: one [`MqttSource`] task per broker, speaking MQTT 3.1.1
//! (`protocol = "v4"`, the agent's own session on rumqttc's packet codec,
//! which writes the acks of a journal commit at once: see `mqtt_v4`) or 5
//! (`"v5"`, rumqttc's event loop), over TCP or TLS (rustls with
//! the ring provider, a CA file and an optional client certificate), with
//! username/password, keep-alive, a persistent session and reconnects with
//! capped exponential backoff (with jitter, so a fleet does not reconnect in
//! lock-step after a broker restart).
//!
//! What it is not: it does not judge values (NaN, late readings and the series
//! cap are the window engine's business) and it never drops an input
//! silently: what it cannot decode goes to the channel as a dead letter.
//!
//! # Delivery guarantee
//!
//! QoS 1 messages are acknowledged manually, and only once every reading and
//! dead letter decoded from the message has been accepted by the ingest
//! channel: see [`acknowledge_accepted`], the one place where a message
//! counts as done. A message received on a connection that has since been
//! lost is not acknowledged at all; the broker redelivers it on the next
//! connection (so a reading can arrive twice, never zero times).
//!
//! # Backpressure
//!
//! The network side keeps polling the broker (and answering keep-alives)
//! while up to `queue-capacity` received messages wait for the ingest
//! channel; beyond that it stops reading the socket. A full ingest channel
//! therefore holds acks back, the broker's in-flight window fills, and the
//! broker stops sending QoS 1 messages until the pipeline catches up.
//!
//! # Subscriptions
//!
//! A filter covered by another configured filter (`plant/+/state` under
//! `plant/+/+`) is not subscribed separately, since brokers (MQTT 5 always)
//! deliver a message once per matching subscription; the first matching
//! rule still decides how a topic is decoded. Filters that only partly
//! overlap (`plant/a/+` and `plant/+/b`) can still deliver duplicates: avoid them.
//!
//! # Payload size
//!
//! Payloads over `max-payload` become `oversize` dead letters. The client
//! accepts packets up to four times that (plus headroom for the topic) so
//! that such payloads can be dead-lettered; MQTT 5 also tells the broker
//! that limit, so it drops larger packets instead of sending them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use millrace_protocol::DeadLetterReason;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::decode::{subscription_filters, ConfigError, DecodeLimits, Decoder, SubscriptionConfig};
use super::mqtt_v4;
use super::{now_ms, DurableAck, IngestEvent, IngestTx};

/// The environment variable that overrides `mqtt.password`.
pub const PASSWORD_ENV: &str = "MILLRACE_MQTT_PASSWORD";

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    V4,
    /// MQTT 5.
    V5,
}

/// `[mqtt]`: an external broker to subscribe to. `Debug` never shows the password.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MqttConfig {
    #[serde(default = "defaults::host")]
    pub host: String,
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// Client id; must be stable and unique per gateway for a persistent session.
    pub client_id: String,
    #[serde(default)]
    pub protocol: MqttProtocol,
    #[serde(default)]
    pub username: Option<String>,
    /// Prefer the `MILLRACE_MQTT_PASSWORD` environment variable (see
    /// [`MqttConfig::apply_env_overrides`]).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (its first line); the environment wins.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Ping interval; a dead broker is noticed within about two of them.
    #[serde(default = "defaults::keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// `false` keeps a persistent session: subscriptions and unacknowledged
    /// QoS 1 messages survive a disconnect.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT 5 only: how long the broker keeps a persistent session after a disconnect.
    #[serde(default = "defaults::session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// Larger payloads become `oversize` dead letters.
    #[serde(default = "defaults::max_payload")]
    pub max_payload: ByteSize,
    /// First reconnect delay; doubles on each failure up to `reconnect-backoff-max`.
    #[serde(default = "defaults::reconnect_backoff_min", with = "humantime_serde")]
    pub reconnect_backoff_min: Duration,
    #[serde(default = "defaults::reconnect_backoff_max", with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// Received messages that may wait for the ingest channel before the
    /// source stops reading from the broker.
    #[serde(default = "defaults::queue_capacity")]
    pub queue_capacity: usize,
    #[serde(default)]
    pub tls: Option<MqttTlsConfig>,
    /// What one message may cost: field, name and topic limits.
    #[serde(default)]
    pub limits: DecodeLimits,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// `[mqtt.tls]`: PEM files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MqttTlsConfig {
    /// CA certificate(s) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// Client certificate chain, for brokers that require client certificates.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Private key of the client certificate (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// The defaults of `[mqtt]`, in one place.
pub mod defaults {
    use bytesize::ByteSize;
    use std::time::Duration;

    pub fn host() -> String {
        "127.0.0.1".into()
    }
    pub fn port() -> u16 {
        1883
    }
    pub fn keep_alive() -> Duration {
        Duration::from_secs(5)
    }
    pub fn session_expiry() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn max_payload() -> ByteSize {
        ByteSize::kib(256)
    }
    pub fn reconnect_backoff_min() -> Duration {
        Duration::from_millis(500)
    }
    pub fn reconnect_backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn queue_capacity() -> usize {
        64
    }
}

/// The largest packet MQTT can carry (256 MiB − 1).
const MQTT_MAX_PACKET_BYTES: u64 = 268_435_455;
/// Room for the fixed header, topic and properties above the payload cap.
const PACKET_HEADROOM_BYTES: u64 = 64 * 1024;
/// How long a clean disconnect may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("protocol", &self.protocol)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("keep_alive", &self.keep_alive)
            .field("clean_session", &self.clean_session)
            .field("session_expiry", &self.session_expiry)
            .field("max_payload", &self.max_payload)
            .field("reconnect_backoff_min", &self.reconnect_backoff_min)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("queue_capacity", &self.queue_capacity)
            .field("tls", &self.tls)
            .field("limits", &self.limits)
            .field("subscriptions", &self.subscriptions)
            .finish()
    }
}

impl MqttConfig {
    /// A config for `host:port` with every other key at its default.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            protocol: MqttProtocol::default(),
            username: None,
            password: None,
            password_file: None,
            keep_alive: defaults::keep_alive(),
            clean_session: false,
            session_expiry: defaults::session_expiry(),
            max_payload: defaults::max_payload(),
            reconnect_backoff_min: defaults::reconnect_backoff_min(),
            reconnect_backoff_max: defaults::reconnect_backoff_max(),
            queue_capacity: defaults::queue_capacity(),
            tls: None,
            limits: DecodeLimits::default(),
            subscriptions: Vec::new(),
        }
    }

    /// Takes the password from `MILLRACE_MQTT_PASSWORD` when it is set.
    pub fn apply_env_overrides(&mut self) {
        if let Ok(password) = std::env::var(PASSWORD_ENV) {
            self.password = Some(password);
        }
    }

    /// Takes the password from `password-file` unless the environment gave
    /// one; warns when the file is readable by its group or others.
    pub fn load_secret_files(&mut self) -> Result<(), String> {
        if std::env::var_os(PASSWORD_ENV).is_some() {
            return Ok(());
        }
        if let Some(path) = &self.password_file {
            let file = millrace_protocol::secret::read_secret_file(path)
                .map_err(|e| format!("mqtt.password-file: {e}"))?;
            if let Some(warning) = &file.loose_permissions {
                tracing::warn!("mqtt.password-file: {warning}");
            }
            self.password = Some(file.value);
        }
        Ok(())
    }

    /// Checks every key; the error names the first bad one (`mqtt.<key>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::new(format!("mqtt.{key}"), reason));
        if self.host.trim().is_empty() {
            return bad("host", "must not be empty");
        }
        if self.port == 0 {
            return bad("port", "must not be 0");
        }
        if self.client_id.is_empty() {
            return bad(
                "client-id",
                "must not be empty (a persistent session is keyed by it)",
            );
        }
        if self.keep_alive < Duration::from_secs(1) || self.keep_alive > Duration::from_secs(65_535)
        {
            return bad("keep-alive", "must be between 1s and 65535s");
        }
        if self.protocol == MqttProtocol::V5 && self.session_expiry.as_secs() > u64::from(u32::MAX)
        {
            return bad("session-expiry", "must fit in 32 bits of seconds");
        }
        if self.max_payload.as_u64() == 0 || self.max_payload.as_u64() > MQTT_MAX_PACKET_BYTES {
            return bad("max-payload", "must be between 1 B and 256 MiB");
        }
        if self.reconnect_backoff_min.is_zero() {
            return bad("reconnect-backoff-min", "must be greater than 0");
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min {
            return bad(
                "reconnect-backoff-max",
                "must not be less than reconnect-backoff-min",
            );
        }
        if self.queue_capacity == 0 {
            return bad("queue-capacity", "must be at least 1");
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("username", "a password is set but no username");
        }
        if let Some(tls) = &self.tls {
            if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
                return bad(
                    "tls.client-key-file",
                    "client-cert-file and client-key-file go together",
                );
            }
        }
        if self.subscriptions.is_empty() {
            return bad(
                "subscriptions",
                "at least one [[mqtt.subscriptions]] is needed",
            );
        }
        self.limits.validate("mqtt.limits")?;
        Decoder::new(
            &self.subscriptions,
            self.max_payload_bytes(),
            "mqtt.subscriptions",
        )?;
        Ok(())
    }

    fn max_payload_bytes(&self) -> usize {
        usize::try_from(self.max_payload.as_u64()).unwrap_or(usize::MAX)
    }

    /// The incoming packet limit given to the client (see the module docs).
    fn max_incoming_packet_bytes(&self) -> usize {
        let limit = self
            .max_payload
            .as_u64()
            .saturating_mul(4)
            .saturating_add(PACKET_HEADROOM_BYTES)
            .min(MQTT_MAX_PACKET_BYTES);
        usize::try_from(limit).unwrap_or(usize::MAX)
    }
}

/// Errors that stop an MQTT source. Broker outages are not errors: the
/// source reconnects by itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A TLS file could not be read or used.
    #[error("mqtt TLS file {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    /// The ingest channel's receiver is gone: the pipeline has stopped.
    #[error("the ingest channel is closed")]
    PipelineClosed,
}

/// Counters of one MQTT source (external or embedded broker), shared with
/// the pipeline's metrics. Every field is monotonic except `connected`.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Messages received.
    pub messages: AtomicU64,
    /// Readings decoded.
    pub readings: AtomicU64,
    dead_letters: [AtomicU64; DeadLetterReason::ALL.len()],
    /// Successful connections after the first one.
    pub reconnects: AtomicU64,
    /// Failed connection attempts and lost connections.
    pub connection_errors: AtomicU64,
    /// QoS 1 messages acknowledged to the broker.
    pub acks: AtomicU64,
    /// QoS 1 messages left unacknowledged because their connection was lost
    /// before the pipeline accepted them (the broker redelivers them).
    pub acks_withheld: AtomicU64,
    /// Devices connected now (ingest listener only).
    pub clients: AtomicU64,
    /// Connections closed for breaking the MQTT protocol (ingest listener only).
    pub protocol_errors: AtomicU64,
    /// `CONNECT`s refused for their credentials (ingest listener only).
    pub auth_failures: AtomicU64,
    /// Publishes outside the user's topics, not read (ingest listener only).
    pub acl_denied: AtomicU64,
    /// Whether the source is connected to its broker now.
    pub connected: AtomicBool,
    /// Whether the broker has acknowledged every subscription on the current
    /// connection (or kept them in a resumed session).
    pub subscribed: AtomicBool,
}

impl MqttStats {
    /// Dead letters produced for `reason`.
    pub fn dead_letters(&self, reason: DeadLetterReason) -> u64 {
        self.dead_letters[reason_index(reason)].load(Ordering::Relaxed)
    }

    /// Dead letters produced, all reasons.
    pub fn dead_letters_total(&self) -> u64 {
        self.dead_letters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Counts one decoded message and what came out of it.
    pub(crate) fn record_decoded(&self, events: &[IngestEvent]) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.record_events(events);
    }

    /// Counts the readings and dead letters among `events`.
    pub(crate) fn record_events(&self, events: &[IngestEvent]) {
        let mut readings = 0;
        for event in events {
            match event {
                IngestEvent::Reading(..) => readings += 1,
                IngestEvent::DeadLetter(dl) => {
                    self.dead_letters[reason_index(dl.reason)].fetch_add(1, Ordering::Relaxed);
                }
                IngestEvent::Durable(_) => {}
            }
        }
        if readings > 0 {
            self.readings.fetch_add(readings, Ordering::Relaxed);
        }
    }
}

fn reason_index(reason: DeadLetterReason) -> usize {
    DeadLetterReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(0)
}

/// How handing a message's events to the pipeline ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// Every event was accepted by the channel.
    Accepted,
    /// Shutdown was requested first.
    Stopped,
    /// The receiver is gone.
    Closed,
}

/// Sends `events` into the ingest channel in order, waiting for room
/// (backpressure) unless shutdown is requested. Room is reserved for up to
/// [`HANDOFF_CHUNK`] events at a time, so a burst costs one wait per chunk
/// rather than one per event. On `Stopped` or `Closed` the events not sent
/// stay in `events`.
pub(crate) async fn hand_off(
    events: &mut Vec<IngestEvent>,
    tx: &IngestTx,
    stop: &CancellationToken,
) -> Handoff {
    while !events.is_empty() {
        let n = events.len().min(HANDOFF_CHUNK).min(tx.max_capacity());
        let permits = tokio::select! {
            biased;
            _ = stop.cancelled() => return Handoff::Stopped,
            permits = tx.reserve_many(n) => match permits {
                Ok(permits) => permits,
                Err(_) => return Handoff::Closed,
            },
        };
        for (permit, event) in permits.zip(events.drain(..n)) {
            permit.send(event);
        }
    }
    Handoff::Accepted
}

/// Events sent per channel reservation.
const HANDOFF_CHUNK: usize = 256;

/// Messages handed to the pipeline behind one durability marker at most.
const HANDOVER_BATCH: usize = 256;

/// A source of readings from an external MQTT broker.
pub struct MqttSource {
    config: MqttConfig,
    decoder: Decoder,
    /// `[mqtt.tls]`, loaded.
    tls: Option<Arc<rustls::ClientConfig>>,
    stats: Arc<MqttStats>,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// Validates the config and loads the TLS files; connects only in [`run`](Self::run).
    pub fn new(config: MqttConfig) -> Result<Self, MqttError> {
        config.validate()?;
        let decoder = Decoder::new(
            &config.subscriptions,
            config.max_payload_bytes(),
            "mqtt.subscriptions",
        )?
        .with_limits(config.limits);
        let tls = config.tls.as_ref().map(tls_client_config).transpose()?;
        Ok(Self {
            config,
            decoder,
            tls,
            stats: Arc::default(),
        })
    }

    /// The source's counters.
    pub fn stats(&self) -> Arc<MqttStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` is cancelled (then disconnects cleanly, keeping
    /// the persistent session) or the ingest channel closes.
    pub async fn run(self, tx: IngestTx, shutdown: CancellationToken) -> Result<(), MqttError> {
        let Self {
            config,
            mut decoder,
            tls,
            stats,
        } = self;
        // Acks and subscribes are the only requests. The broker can have one
        // unacknowledged QoS 1/2 message per packet id (65 535) in flight to
        // us, so room for that many acks means an ack is never refused for
        // lack of room (with less, a broker sending 1 000 at a time saw most
        // acks refused and stalled). The queue grows only as acks wait.
        let request_capacity = usize::from(u16::MAX) + 16;
        let (client, eventloop) = Session::open(&config, tls.as_ref(), request_capacity);
        let filters = subscription_filters(&config.subscriptions);
        let (queue_tx, mut queue_rx) = mpsc::channel(config.queue_capacity);
        let stop = shutdown.child_token();
        let epoch = AtomicU64::new(0);
        let backoff = Backoff::new(config.reconnect_backoff_min, config.reconnect_backoff_max);
        info!(
            host = %config.host, port = config.port, client_id = %config.client_id,
            protocol = ?config.protocol, tls = config.tls.is_some(),
            subscriptions = filters.len(), "mqtt source starting"
        );

        let network = network_loop(
            eventloop, &client, &filters, &epoch, &stats, backoff, queue_tx, &stop,
        );
        // Acks wait for the pipeline's journal commit; they are sent in the
        // order the messages were received, as MQTT requires. Messages that
        // queued up meanwhile are handed over together, behind one marker.
        let (ack_tx, mut ack_rx) = mpsc::channel::<(oneshot::Receiver<()>, Vec<Delivery>)>(
            config.queue_capacity.max(1) * 4,
        );
        let acker = async {
            while let Some((durable, deliveries)) = ack_rx.recv().await {
                let done = tokio::select! {
                    done = durable => done.is_ok(),
                    // Stopping: what is not durable by now is left to the
                    // broker's redelivery (the session is persistent).
                    () = stop.cancelled() => false,
                };
                for delivery in &deliveries {
                    if done {
                        acknowledge_accepted(&client, delivery, &epoch, &stats);
                    } else if delivery.message.needs_ack() {
                        stats.acks_withheld.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        let processing = async {
            // Owned here, so the acker ends once processing does.
            let ack_tx = ack_tx;
            let mut events = Vec::new();
            loop {
                let first = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    d = queue_rx.recv() => match d {
                        Some(d) => d,
                        None => return Ok(()),
                    },
                };
                let mut batch = Vec::with_capacity(1);
                batch.push(first);
                while batch.len() < HANDOVER_BATCH.min(config.queue_capacity) {
                    match queue_rx.try_recv() {
                        Ok(d) => batch.push(d),
                        Err(_) => break,
                    }
                }
                let now = now_ms();
                for delivery in &batch {
                    let before = events.len();
                    decoder.decode(
                        &delivery.message.topic(),
                        delivery.message.payload(),
                        now,
                        delivery.message.delivery(),
                        &mut events,
                    );
                    stats.record_decoded(&events[before..]);
                }
                for command in decoder.take_commands() {
                    if let Err(e) = client.try_publish(command.topic.clone(), command.payload) {
                        warn!(error = %e, topic = %command.topic, "could not queue a sparkplug command");
                    }
                }
                let durable = if batch.iter().any(|d| d.message.needs_ack()) {
                    let (marker, durable) = DurableAck::new();
                    events.push(IngestEvent::Durable(marker));
                    Some(durable)
                } else {
                    None
                };
                match hand_off(&mut events, &tx, &stop).await {
                    Handoff::Accepted => {}
                    Handoff::Stopped => return Ok(()),
                    Handoff::Closed => {
                        error!("ingest channel closed; mqtt source stopping");
                        stop.cancel();
                        return Err(MqttError::PipelineClosed);
                    }
                }
                if let Some(durable) = durable {
                    if ack_tx.send((durable, batch)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        };
        let ((), result, ()) = tokio::join!(network, processing, acker);
        info!(client_id = %config.client_id, "mqtt source stopped");
        result
    }
}

/// The one place where a received message counts as done: every event
/// decoded from it has been accepted by the pipeline and made durable by its
/// journal commit (the message's [`IngestEvent::Durable`] marker completed),
/// so a QoS 1 message is acknowledged to the broker here. Messages from a
/// connection that has since been lost are left unacknowledged; the broker
/// redelivers them.
fn acknowledge_accepted(
    client: &Client,
    delivery: &Delivery,
    epoch: &AtomicU64,
    stats: &MqttStats,
) {
    if !delivery.message.needs_ack() {
        return;
    }
    if delivery.epoch != epoch.load(Ordering::Acquire) {
        stats.acks_withheld.fetch_add(1, Ordering::Relaxed);
        debug!(topic = %delivery.message.topic(), "connection changed since receipt; leaving the message to redelivery");
        return;
    }
    match client.try_ack(&delivery.message) {
        Ok(()) => {
            stats.acks.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.acks_withheld.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, topic = %delivery.message.topic(), "could not queue an ack; the broker will redeliver");
        }
    }
}

/// Drives the connection: connect, subscribe, keep-alive, reconnect with
/// backoff; hands received publishes to the processing side.
#[allow(clippy::too_many_arguments)]
async fn network_loop(
    mut eventloop: EventLoop,
    client: &Client,
    filters: &[(String, u8)],
    epoch: &AtomicU64,
    stats: &MqttStats,
    mut backoff: Backoff,
    queue: mpsc::Sender<Delivery>,
    stop: &CancellationToken,
) {
    let mut connected = false;
    let mut ever_connected = false;
    loop {
        let polled = tokio::select! {
            _ = stop.cancelled() => break,
            p = eventloop.poll() => p,
        };
        match polled {
            Ok(Polled::ConnAck { session_present }) => {
                epoch.fetch_add(1, Ordering::AcqRel);
                if ever_connected {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                stats.connected.store(true, Ordering::Relaxed);
                backoff.reset();
                info!(session_present, "connected to mqtt broker");
                // The broker keeps the subscriptions of a present session; the
                // first connection of this process subscribes anyway, since the
                // configured filters may have changed since that session began.
                if !session_present || !ever_connected {
                    if let Err(e) = client.try_subscribe(filters) {
                        error!(error = %e, "could not queue the subscriptions");
                    }
                } else {
                    stats.subscribed.store(true, Ordering::Relaxed);
                }
                connected = true;
                ever_connected = true;
            }
            Ok(Polled::Publish(message)) => {
                let delivery = Delivery {
                    epoch: epoch.load(Ordering::Acquire),
                    message,
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    sent = queue.send(delivery) => if sent.is_err() { break },
                }
            }
            Ok(Polled::SubAck { rejected }) => {
                if rejected > 0 {
                    error!(rejected, "the broker rejected subscriptions");
                } else {
                    stats.subscribed.store(true, Ordering::Relaxed);
                    debug!("subscriptions acknowledged");
                }
            }
            Ok(Polled::Disconnected | Polled::Other) => {}
            Err(e) => {
                // Invalidate acks for messages of the lost connection.
                epoch.fetch_add(1, Ordering::AcqRel);
                stats.connected.store(false, Ordering::Relaxed);
                stats.subscribed.store(false, Ordering::Relaxed);
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                let delay = backoff.next_delay();
                if connected {
                    warn!(error = %e, retry_in = ?delay, "mqtt connection lost");
                } else {
                    warn!(error = %e, retry_in = ?delay, "mqtt connect failed");
                }
                connected = false;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if connected {
        // A clean DISCONNECT keeps the persistent session and its unacked messages.
        if client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
                while let Ok(p) = eventloop.poll().await {
                    if matches!(p, Polled::Disconnected) {
                        break;
                    }
                }
            })
            .await;
        }
    }
    stats.connected.store(false, Ordering::Relaxed);
    stats.subscribed.store(false, Ordering::Relaxed);
}

/// A received publish and the connection epoch it arrived on.
#[derive(Debug)]
struct Delivery {
    epoch: u64,
    message: Message,
}

/// A received publish, in either protocol version.
#[derive(Debug)]
enum Message {
    /// A publish and the connection it arrived on (its packet id is only
    /// valid there).
    V4 {
        publish: rumqttc::Publish,
        connection: u64,
    },
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

impl Message {
    fn topic(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Message::V4 { publish: p, .. } => std::borrow::Cow::Borrowed(p.topic.as_str()),
            Message::V5(p) => String::from_utf8_lossy(&p.topic),
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            Message::V4 { publish: p, .. } => &p.payload,
            Message::V5(p) => &p.payload,
        }
    }

    /// Its QoS and DUP flag, for the redelivery guard.
    fn delivery(&self) -> super::Delivery {
        match self {
            Message::V4 { publish: p, .. } => super::Delivery::mqtt(p.qos as u8, p.dup),
            Message::V5(p) => super::Delivery::mqtt(p.qos as u8, p.dup),
        }
    }

    fn needs_ack(&self) -> bool {
        match self {
            Message::V4 { publish: p, .. } => p.qos != rumqttc::QoS::AtMostOnce,
            Message::V5(p) => p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        }
    }
}

/// What the network side cares about from one poll (short-lived, so the
/// size of a publish is not worth a box).
#[allow(clippy::large_enum_variant)]
enum Polled {
    ConnAck { session_present: bool },
    Publish(Message),
    SubAck { rejected: usize },
    Disconnected,
    Other,
}

/// The request side of a session.
enum Client {
    V4(mqtt_v4::Requests),
    V5(rumqttc::v5::AsyncClient),
}

/// The connection side of a session.
enum EventLoop {
    V4(Box<mqtt_v4::Connection>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// An error from either client version (rendered for logs).
type PollError = Box<dyn std::error::Error + Send + Sync>;

struct Session;

impl Session {
    fn open(
        config: &MqttConfig,
        tls: Option<&Arc<rustls::ClientConfig>>,
        request_capacity: usize,
    ) -> (Client, EventLoop) {
        let credentials = config
            .username
            .as_ref()
            .map(|u| (u.clone(), config.password.clone().unwrap_or_default()));
        match config.protocol {
            MqttProtocol::V4 => {
                let (requests, connection) = mqtt_v4::session(mqtt_v4::Options {
                    host: config.host.clone(),
                    port: config.port,
                    client_id: config.client_id.clone(),
                    keep_alive: config.keep_alive,
                    clean_session: config.clean_session,
                    credentials,
                    max_incoming_packet: config.max_incoming_packet_bytes(),
                    tls: tls.cloned(),
                });
                (Client::V4(requests), EventLoop::V4(Box::new(connection)))
            }
            MqttProtocol::V5 => {
                let mut o =
                    rumqttc::v5::MqttOptions::new(&config.client_id, &config.host, config.port);
                let limit = u32::try_from(config.max_incoming_packet_bytes()).unwrap_or(u32::MAX);
                o.set_keep_alive(config.keep_alive)
                    .set_clean_start(config.clean_session)
                    .set_manual_acks(true)
                    .set_max_packet_size(Some(limit))
                    .set_transport(match tls {
                        None => rumqttc::Transport::Tcp,
                        Some(tls) => rumqttc::Transport::tls_with_config(
                            rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
                        ),
                    });
                if !config.clean_session {
                    let secs = u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX);
                    o.set_session_expiry_interval(Some(secs));
                }
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(o, request_capacity);
                (Client::V5(c), EventLoop::V5(Box::new(e)))
            }
        }
    }
}

impl Client {
    fn try_subscribe(&self, filters: &[(String, u8)]) -> Result<(), PollError> {
        match self {
            Client::V4(c) => c
                .send(mqtt_v4::Request::Subscribe(
                    filters
                        .iter()
                        .map(|(f, q)| (f.clone(), mqtt_v4::qos(*q)))
                        .collect(),
                ))
                .map_err(Into::into),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters.iter().map(|(f, q)| {
                        rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), v5_qos(*q))
                    }),
                )
                .map_err(Into::into),
        }
    }

    fn try_ack(&self, message: &Message) -> Result<(), PollError> {
        match (self, message) {
            (
                Client::V4(c),
                Message::V4 {
                    publish,
                    connection,
                },
            ) => c
                .send(mqtt_v4::Request::Ack {
                    pkid: publish.pkid,
                    connection: *connection,
                })
                .map_err(Into::into),
            (Client::V5(c), Message::V5(p)) => c.try_ack(p).map_err(Into::into),
            _ => Err("message and client protocol versions differ".into()),
        }
    }

    /// Publishes at QoS 0 (Sparkplug B Rebirth requests).
    fn try_publish(&self, topic: String, payload: Vec<u8>) -> Result<(), PollError> {
        match self {
            Client::V4(c) => c
                .send(mqtt_v4::Request::Publish { topic, payload })
                .map_err(Into::into),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .map_err(Into::into),
        }
    }

    fn try_disconnect(&self) -> Result<(), PollError> {
        match self {
            Client::V4(c) => c.send(mqtt_v4::Request::Disconnect).map_err(Into::into),
            Client::V5(c) => c.try_disconnect().map_err(Into::into),
        }
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    if qos == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Polled, PollError> {
        match self {
            EventLoop::V4(e) => {
                use mqtt_v4::Incoming;
                Ok(match e.poll().await? {
                    Incoming::ConnAck { session_present } => Polled::ConnAck { session_present },
                    Incoming::Publish {
                        publish,
                        connection,
                    } => Polled::Publish(Message::V4 {
                        publish,
                        connection,
                    }),
                    Incoming::SubAck { rejected } => Polled::SubAck { rejected },
                    Incoming::Disconnected => Polled::Disconnected,
                })
            }
            EventLoop::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                use rumqttc::v5::Event;
                use rumqttc::Outgoing;
                Ok(match e.poll().await? {
                    Event::Incoming(Packet::ConnAck(ack)) => Polled::ConnAck {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::Publish(p)) => Polled::Publish(Message::V5(p)),
                    Event::Incoming(Packet::SubAck(s)) => Polled::SubAck {
                        rejected: s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .count(),
                    },
                    Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
                    _ => Polled::Other,
                })
            }
        }
    }
}

/// Capped exponential backoff with "equal jitter": each delay is drawn from
/// `[d/2, d]`, and `d` doubles up to the cap.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: SmallRng,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            min,
            max,
            next: min,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(self.rng.random::<f64>())
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Builds a rustls client config (ring provider, no process-wide default
/// needed) from the PEM files.
fn tls_client_config(tls: &MqttTlsConfig) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let tls_err = |path: &PathBuf, reason: String| MqttError::Tls {
        path: path.clone(),
        reason,
    };
    let read_certs = |path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, MqttError> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_err(path, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(path, e.to_string()))?;
        if certs.is_empty() {
            return Err(tls_err(path, "no PEM certificate found".into()));
        }
        Ok(certs)
    };

    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(&tls.ca_file)? {
        roots
            .add(cert)
            .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let certs = read_certs(cert_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| tls_err(key_path, e.to_string()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err(key_path, e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config_from(toml_text: &str) -> Result<MqttConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            mqtt: MqttConfig,
        }
        toml::from_str::<File>(toml_text)
            .map(|f| f.mqtt)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_documented_example() {
        let cfg = config_from(
            r#"
            [mqtt]
            host = "127.0.0.1"
            port = 1883
            client-id = "millrace-gw-1"
            protocol = "v5"
            username = "gw"
            password = "secret"
            keep-alive = "5s"
            clean-session = false
            max-payload = "256KiB"
            reconnect-backoff-max = "30s"
            [mqtt.tls]
            ca-file = "/etc/millrace/ca.pem"
            [[mqtt.subscriptions]]
            filter = "plant/+/+"
            qos = 1
            format = "json"
            device = "{1}"
            sensor = "{2}"
            value-field = "value"
            time-field = "ts"
            time-unit = "ms"
            unit-field = "unit"
            unit = ""
            "#,
        )
        .unwrap();
        assert_eq!(cfg.protocol, MqttProtocol::V5);
        assert_eq!(cfg.max_payload.as_u64(), 256 * 1024);
        assert_eq!(cfg.keep_alive, Duration::from_secs(5));
        assert_eq!(cfg.reconnect_backoff_min, defaults::reconnect_backoff_min());
        assert_eq!(cfg.subscriptions.len(), 1);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = config_from("[mqtt]\nclient-id = \"a\"\nkeepalive = \"5s\"\n").unwrap_err();
        assert!(err.contains("keepalive"), "{err}");
        let err = config_from(
            "[mqtt]\nclient-id = \"a\"\n[[mqtt.subscriptions]]\nfilter = \"a/#\"\nvalue = \"v\"\n",
        )
        .unwrap_err();
        assert!(err.contains("value"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let base = || {
            let mut c = MqttConfig::new("127.0.0.1", 1883, "gw");
            c.subscriptions.push(SubscriptionConfig::new(
                "plant/+/+",
                super::super::decode::PayloadFormat::Json,
            ));
            c
        };
        base().validate().unwrap();
        type Mutation = Box<dyn Fn(&mut MqttConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.client_id.clear()), "mqtt.client-id"),
            (
                Box::new(|c| c.keep_alive = Duration::from_millis(500)),
                "mqtt.keep-alive",
            ),
            (
                Box::new(|c| c.max_payload = ByteSize(0)),
                "mqtt.max-payload",
            ),
            (
                Box::new(|c| c.reconnect_backoff_max = Duration::from_millis(1)),
                "mqtt.reconnect-backoff-max",
            ),
            (Box::new(|c| c.subscriptions.clear()), "mqtt.subscriptions"),
            (
                Box::new(|c| c.subscriptions[0].qos = 2),
                "mqtt.subscriptions[0].qos",
            ),
            (
                Box::new(|c| c.subscriptions[0].filter = "a/#/b".into()),
                "mqtt.subscriptions[0].filter",
            ),
            (
                Box::new(|c| c.subscriptions[0].device = Some("{x}".into())),
                "mqtt.subscriptions[0].device",
            ),
            (Box::new(|c| c.password = Some("p".into())), "mqtt.username"),
            (
                Box::new(|c| {
                    c.tls = Some(MqttTlsConfig {
                        ca_file: "ca.pem".into(),
                        client_cert_file: Some("c.pem".into()),
                        client_key_file: None,
                    })
                }),
                "mqtt.tls.client-key-file",
            ),
        ];
        for (mutate, key) in cases {
            let mut c = base();
            mutate(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
    }

    #[test]
    fn missing_tls_files_are_a_clear_error() {
        let mut c = MqttConfig::new("127.0.0.1", 8883, "gw");
        c.subscriptions.push(SubscriptionConfig::new(
            "a/+/+",
            super::super::decode::PayloadFormat::Json,
        ));
        c.tls = Some(MqttTlsConfig {
            ca_file: "/nonexistent/ca.pem".into(),
            client_cert_file: None,
            client_key_file: None,
        });
        let err = MqttSource::new(c).unwrap_err();
        assert!(matches!(err, MqttError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let caps = [100, 200, 400, 800, 800, 800];
        for cap in caps {
            let d = b.next_delay();
            let cap = Duration::from_millis(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn stats_count_by_reason() {
        use millrace_protocol::{DeadLetter, Source};
        let stats = MqttStats::default();
        let dl = |r| IngestEvent::DeadLetter(DeadLetter::new(Source::Mqtt, "t", vec![], r, "", 0));
        stats.record_decoded(&[
            dl(DeadLetterReason::Malformed),
            dl(DeadLetterReason::Oversize),
        ]);
        stats.record_decoded(&[dl(DeadLetterReason::Malformed)]);
        assert_eq!(stats.messages.load(Ordering::Relaxed), 2);
        assert_eq!(stats.dead_letters(DeadLetterReason::Malformed), 2);
        assert_eq!(stats.dead_letters(DeadLetterReason::Oversize), 1);
        assert_eq!(stats.dead_letters(DeadLetterReason::Late), 0);
        assert_eq!(stats.dead_letters_total(), 3);
    }
}
