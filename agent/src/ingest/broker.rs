//! The embedded MQTT broker: sensors publish straight to the gateway.
//!
//! What it is: a rumqttd broker ([`EmbeddedBroker`]) listening for MQTT 3.1.1
//! on `listen` (and MQTT 5 on `listen-v5` when set), loopback by default, on
//! rumqttd's own threads. The agent reads it in-process through rumqttd's
//! local link (no socket, no second client), decodes with the same
//! [`Decoder`] as the external-broker source and feeds the ingest channel.
//!
//! What it is not: a durable broker. rumqttd acknowledges a QoS 1 publish
//! once the message is in its in-memory log, and the local link reads that
//! log at QoS 0; so messages accepted by the broker but not yet handed to the
//! pipeline are lost if the agent process dies. Use an external broker with
//! [`super::mqtt::MqttSource`] where that matters. There is no TLS and no
//! authentication: keep `listen` on loopback or a trusted segment.
//!
//! # Backpressure
//!
//! The reader hands each message to the ingest channel before taking the
//! next one. While it waits, rumqttd stops forwarding to the link once the
//! link's buffer is full (it parks the link until the reader asks for more),
//! and retains messages in its bounded in-memory log, `log-size` per
//! subscription filter (oldest segments are dropped first when that log is
//! full: a reader that lags by more than `log-size` loses the oldest
//! messages). The log is most of the broker's memory: at 10 000 readings/s
//! a 10 MiB log per filter fills in about 17 s and stays full.
//!
//! # Lifetime
//!
//! rumqttd has no stop API: its threads run until the process exits.
//! [`EmbeddedBroker::run`] returning stops reading, not the broker.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytesize::ByteSize;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::decode::{subscription_filters, ConfigError, Decoder, SubscriptionConfig};
use super::mqtt::{hand_off, Handoff, MqttStats};
use super::{now_ms, IngestTx};

/// `[broker]`: the embedded broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerConfig {
    #[serde(default)]
    pub enabled: bool,
    /// MQTT 3.1.1 listener; port 0 picks a free port (see [`EmbeddedBroker::local_addr`]).
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener.
    #[serde(default)]
    pub listen_v5: Option<SocketAddr>,
    /// Publishes with larger payloads are refused by the broker (the
    /// publisher is disconnected) and, should one reach the reader, dead-lettered.
    #[serde(default = "defaults::max_payload")]
    pub max_payload: ByteSize,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Memory for messages accepted and not yet read by the agent, per
    /// subscription filter; in segments of `max(max-payload, 256KiB)`, at
    /// least two of them.
    #[serde(default = "defaults::log_size")]
    pub log_size: ByteSize,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// The defaults of `[broker]`, in one place.
pub mod defaults {
    use bytesize::ByteSize;
    use std::net::{Ipv4Addr, SocketAddr};

    pub fn listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 1883))
    }
    pub fn max_payload() -> ByteSize {
        ByteSize::kib(256)
    }
    pub fn max_connections() -> usize {
        256
    }
    /// Seconds of lag at 1 000 messages/s of 600 B; the reader normally
    /// keeps up within milliseconds.
    pub fn log_size() -> ByteSize {
        ByteSize::mib(4)
    }
    /// Messages rumqttd hands the link per batch.
    pub const MAX_OUTGOING_PACKETS: u64 = 200;
    /// Smallest segment of rumqttd's in-memory log.
    pub const MIN_LOG_SEGMENT: usize = 256 * 1024;
    /// Seconds a new connection has to send CONNECT.
    pub const CONNECT_TIMEOUT_MS: u16 = 5_000;
    /// Unacknowledged QoS 1 messages per remote client.
    pub const MAX_INFLIGHT: usize = 100;
    /// The client id of the agent's in-process link.
    pub const LINK_CLIENT_ID: &str = "millrace-agent-ingest";
}

impl BrokerConfig {
    /// A config listening on `listen` with every other key at its default.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            enabled: true,
            listen,
            listen_v5: None,
            max_payload: defaults::max_payload(),
            max_connections: defaults::max_connections(),
            log_size: defaults::log_size(),
            subscriptions: Vec::new(),
        }
    }

    /// Checks every key; the error names the first bad one (`broker.<key>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::new(format!("broker.{key}"), reason));
        if self.max_payload.as_u64() == 0 || self.max_payload.as_u64() > 268_435_455 {
            return bad("max-payload", "must be between 1 B and 256 MiB");
        }
        if self.max_connections == 0 {
            return bad("max-connections", "must be at least 1");
        }
        let segment = self.log_segment_bytes() as u64;
        if self.log_size.as_u64() < 2 * segment {
            return bad(
                "log-size",
                &format!(
                    "must hold at least two segments of max(max-payload, 256KiB): {}",
                    ByteSize::b(2 * segment)
                ),
            );
        }
        if self.listen_v5 == Some(self.listen) && self.listen.port() != 0 {
            return bad("listen-v5", "must differ from listen");
        }
        if self.subscriptions.is_empty() {
            return bad(
                "subscriptions",
                "at least one [[broker.subscriptions]] is needed",
            );
        }
        Decoder::new(
            &self.subscriptions,
            self.max_payload_bytes(),
            "broker.subscriptions",
        )?;
        Ok(())
    }

    fn max_payload_bytes(&self) -> usize {
        usize::try_from(self.max_payload.as_u64()).unwrap_or(usize::MAX)
    }

    /// One segment of rumqttd's log: it must hold the largest message.
    fn log_segment_bytes(&self) -> usize {
        self.max_payload_bytes().max(defaults::MIN_LOG_SEGMENT)
    }

    fn log_segments(&self) -> usize {
        let segment = self.log_segment_bytes() as u64;
        usize::try_from(self.log_size.as_u64() / segment)
            .unwrap_or(usize::MAX)
            .max(2)
    }
}

/// Errors of the embedded broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address cannot be bound (in use, not local, no permission).
    #[error("embedded broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// rumqttd refused the in-process link or a subscription.
    #[error("embedded broker link: {0}")]
    Link(String),
    /// The broker's threads could not be started.
    #[error("embedded broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The broker's listeners stopped (see the log for rumqttd's reason).
    #[error("embedded broker stopped serving")]
    Stopped,
    /// The ingest channel's receiver is gone: the pipeline has stopped.
    #[error("the ingest channel is closed")]
    PipelineClosed,
}

/// A running embedded broker and the agent's in-process link to it.
pub struct EmbeddedBroker {
    local_addr: SocketAddr,
    local_addr_v5: Option<SocketAddr>,
    decoder: Decoder,
    link_tx: LinkTx,
    link_rx: LinkRx,
    serving: watch::Receiver<bool>,
    stats: Arc<MqttStats>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("local_addr", &self.local_addr)
            .field("local_addr_v5", &self.local_addr_v5)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd and subscribes the in-process link. A listen address
    /// that cannot be bound is an error here, not a silent thread exit.
    pub fn start(config: &BrokerConfig) -> Result<Self, BrokerError> {
        config.validate()?;
        let decoder = Decoder::new(
            &config.subscriptions,
            config.max_payload_bytes(),
            "broker.subscriptions",
        )?;
        // rumqttd binds on its own thread and only logs a failure there, so
        // check the address here first (and resolve port 0).
        let local_addr = probe_bind(config.listen)?;
        let local_addr_v5 = config.listen_v5.map(probe_bind).transpose()?;

        let max_payload = config.max_payload_bytes();
        let connections = ConnectionSettings {
            connection_timeout_ms: defaults::CONNECT_TIMEOUT_MS,
            max_payload_size: max_payload,
            max_inflight_count: defaults::MAX_INFLIGHT,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let server = |name: &str, listen| ServerSettings {
            name: name.to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: connections.clone(),
        };
        let rumqttd_config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: config.max_connections,
                max_outgoing_packet_count: defaults::MAX_OUTGOING_PACKETS,
                max_segment_size: config.log_segment_bytes(),
                max_segment_count: config.log_segments(),
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([(
                "v4".to_owned(),
                server("millrace-mqtt-v4", local_addr),
            )])),
            v5: local_addr_v5
                .map(|addr| HashMap::from([("v5".to_owned(), server("millrace-mqtt-v5", addr))])),
            ..Config::default()
        };

        let mut broker = Broker::new(rumqttd_config);
        let (mut link_tx, link_rx) = broker
            .link(defaults::LINK_CLIENT_ID)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        for (filter, _qos) in subscription_filters(&config.subscriptions) {
            link_tx
                .subscribe(filter.clone())
                .map_err(|e| BrokerError::Link(format!("subscribe {filter}: {e}")))?;
        }

        let (serving_tx, serving) = watch::channel(true);
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                // Returns only once every listener thread has exited.
                let result = broker.start();
                error!(?result, "embedded mqtt broker stopped serving");
                let _ = serving_tx.send(false);
            })
            .map_err(BrokerError::Thread)?;
        info!(listen = %local_addr, listen_v5 = ?local_addr_v5, "embedded mqtt broker started");
        Ok(Self {
            local_addr,
            local_addr_v5,
            decoder,
            link_tx,
            link_rx,
            serving,
            stats: Arc::default(),
        })
    }

    /// The MQTT 3.1.1 listener's address (with the port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The MQTT 5 listener's address, when configured.
    pub fn local_addr_v5(&self) -> Option<SocketAddr> {
        self.local_addr_v5
    }

    /// The reader's counters (`connected` is true while the broker serves).
    pub fn stats(&self) -> Arc<MqttStats> {
        Arc::clone(&self.stats)
    }

    /// Reads the broker until `shutdown` is cancelled, the broker stops
    /// serving or the ingest channel closes.
    pub async fn run(self, tx: IngestTx, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let Self {
            decoder,
            link_tx,
            mut link_rx,
            mut serving,
            stats,
            ..
        } = self;
        // The link's sending half must live as long as the reader: dropping it
        // would not unsubscribe, but keeping it makes the ownership explicit.
        let _link_tx = link_tx;
        stats.connected.store(true, Ordering::Relaxed);
        let result = read_link(&decoder, &mut link_rx, &mut serving, &stats, &tx, &shutdown).await;
        stats.connected.store(false, Ordering::Relaxed);
        result
    }
}

async fn read_link(
    decoder: &Decoder,
    link_rx: &mut LinkRx,
    serving: &mut watch::Receiver<bool>,
    stats: &MqttStats,
    tx: &IngestTx,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let mut events = Vec::new();
    loop {
        let notification = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            changed = serving.changed() => {
                if changed.is_err() || !*serving.borrow() {
                    return Err(BrokerError::Stopped);
                }
                continue;
            }
            n = link_rx.next() => n.map_err(|e| BrokerError::Link(e.to_string()))?,
        };
        match notification {
            Some(Notification::Forward(forward)) => {
                let publish = forward.publish;
                let topic = String::from_utf8_lossy(&publish.topic);
                decoder.decode(&topic, &publish.payload, now_ms(), &mut events);
                stats.record_decoded(&events);
                match hand_off(&mut events, tx, shutdown).await {
                    Handoff::Accepted => {}
                    Handoff::Stopped => return Ok(()),
                    Handoff::Closed => return Err(BrokerError::PipelineClosed),
                }
            }
            // rumqttd parks a link whose buffer filled up; ask for more.
            Some(Notification::Unschedule) => link_rx
                .wake()
                .await
                .map_err(|e| BrokerError::Link(e.to_string()))?,
            Some(Notification::Disconnect(..)) => {
                warn!("embedded broker disconnected the ingest link");
                return Err(BrokerError::Link("disconnected by the broker".into()));
            }
            Some(_) | None => {}
        }
    }
}

/// Binds `addr` once to report a clear error (and resolve port 0), then
/// releases it for rumqttd.
fn probe_bind(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> BrokerConfig {
        let mut c: BrokerConfig = toml::from_str(toml_text).unwrap();
        c.subscriptions = toml::from_str::<BrokerConfig>(
            "[[subscriptions]]\nfilter = \"plant/+/+\"\nformat = \"json\"\n",
        )
        .unwrap()
        .subscriptions;
        c
    }

    #[test]
    fn the_log_is_cut_into_segments_that_hold_the_largest_message() {
        let c = config("");
        assert_eq!(c.log_size, ByteSize::mib(4));
        assert_eq!((c.log_segment_bytes(), c.log_segments()), (256 * 1024, 16));
        let big = config("max-payload = \"1MiB\"\nlog-size = \"8MiB\"");
        assert_eq!((big.log_segment_bytes(), big.log_segments()), (1 << 20, 8));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_log_smaller_than_two_segments_is_refused_by_key() {
        let err = config("max-payload = \"1MiB\"\nlog-size = \"1MiB\"")
            .validate()
            .unwrap_err();
        assert_eq!(err.key, "broker.log-size", "{err:?}");
    }
}
