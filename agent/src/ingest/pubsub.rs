//! The local pub/sub broker: plant clients (an HMI, a historian) subscribe
//! to the gateway and see every sensor message live.
//!
//! What it is: a rumqttd broker on `broker.pubsub-listen` (MQTT 3.1.1; off
//! unless that key is set) that receives a copy of every publish the ingest
//! listener accepted, through rumqttd's in-process link. Subscribers get
//! them at QoS 0 as rumqttd delivers them.
//!
//! What it is not: part of ingest. The copy is handed over after the
//! message was decoded and never holds ingest up: when the broker cannot
//! keep up, copies are dropped, counted in
//! `millrace_pubsub_dropped_total` and logged, and the readings themselves
//! are unaffected. rumqttd keeps an in-memory log of `log-size` per
//! subscription filter; a subscriber that lags by more loses the oldest
//! messages (rumqttd's rule). rumqttd has no stop API: its threads run until
//! the process exits. No TLS and no authentication: a `pubsub-listen`
//! beyond loopback is refused by the config check unless `allow-anonymous =
//! true` says the segment is trusted.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::broker::{defaults, BrokerConfig, BrokerError};

/// Copies waiting for the broker; beyond this they are dropped (counted).
const FORWARD_QUEUE: usize = 4096;
/// Messages queued inside rumqttd's link beyond which copies are dropped.
const LINK_BACKLOG: usize = 16_384;

/// The sending side of the local pub/sub broker (cheap to share).
#[derive(Debug, Clone)]
pub struct PubSub {
    queue: mpsc::Sender<(Bytes, Bytes)>,
    dropped: Arc<AtomicU64>,
    local_addr: SocketAddr,
}

impl PubSub {
    /// Starts rumqttd on `listen` and the task that feeds it.
    pub fn start(config: &BrokerConfig, listen: SocketAddr) -> Result<Self, BrokerError> {
        // rumqttd binds on its own thread and only logs a failure there, so
        // check the address here first (and resolve port 0).
        let local_addr = probe_bind(listen)?;
        let connections = ConnectionSettings {
            connection_timeout_ms: defaults::CONNECT_TIMEOUT_MS,
            max_payload_size: config.max_payload_bytes(),
            max_inflight_count: defaults::MAX_INFLIGHT,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
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
                ServerSettings {
                    name: "millrace-pubsub".to_owned(),
                    listen: local_addr,
                    tls: None,
                    next_connection_delay_ms: 1,
                    connections,
                },
            )])),
            ..Config::default()
        };
        let mut broker = Broker::new(rumqttd_config);
        let (mut link_tx, _link_rx) = broker
            .link(defaults::LINK_CLIENT_ID)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        std::thread::Builder::new()
            .name("mqtt-pubsub".into())
            .spawn(move || {
                let result = broker.start();
                error!(?result, "local pub/sub broker stopped serving");
            })
            .map_err(BrokerError::Thread)?;

        let (queue, mut rx) = mpsc::channel::<(Bytes, Bytes)>(FORWARD_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&dropped);
        tokio::spawn(async move {
            // The link's receiving half is not read: the link only publishes.
            let _link_rx = _link_rx;
            while let Some((topic, payload)) = rx.recv().await {
                match link_tx.try_publish(topic, payload) {
                    Ok(backlog) if backlog <= LINK_BACKLOG => {}
                    Ok(_) | Err(_) => note_dropped(&counted, "the broker is behind"),
                }
            }
        });
        info!(listen = %local_addr, "local pub/sub broker started");
        Ok(Self {
            queue,
            dropped,
            local_addr,
        })
    }

    /// The pub/sub listener's address (port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Copies dropped because the broker was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Hands a copy of an accepted publish to the broker; never waits.
    pub fn forward(&self, topic: &str, payload: &[u8]) {
        let copy = (
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload),
        );
        if self.queue.try_send(copy).is_err() {
            note_dropped(&self.dropped, "its queue is full");
        }
    }
}

fn note_dropped(dropped: &AtomicU64, why: &str) {
    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
    metrics::counter!("millrace_pubsub_dropped_total").increment(1);
    if n.is_power_of_two() {
        warn!(
            dropped = n,
            why, "local pub/sub: copies for subscribers dropped (ingest is unaffected)"
        );
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
