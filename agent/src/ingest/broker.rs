//! The embedded MQTT broker (`[broker]`): sensors publish straight to the
//! gateway.
//!
//! Two parts, each in its own module:
//!
//! - the ingest listener ([`super::listener`]) on `listen` (and
//!   `listen-v5`): devices publish MQTT 3.1.1 or 5, a QoS 1 publish is
//!   acknowledged only once its readings are in the journal, and a busy
//!   gateway stops reading device sockets instead of dropping anything;
//! - the local pub/sub broker ([`super::pubsub`], rumqttd) on
//!   `pubsub-listen`, only when that key is set: plant clients subscribe there
//!   and see a copy of every accepted publish.
//!
//! This module holds their configuration and starts them together.

use std::net::SocketAddr;
use std::sync::Arc;

use bytesize::ByteSize;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::decode::{ConfigError, DecodeLimits, Decoder, SubscriptionConfig};
use super::listener::{IngestListener, ListenerError};
use super::mqtt::MqttStats;
use super::pubsub::PubSub;
use super::IngestTx;

/// `[broker]`: the embedded broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The ingest listener (MQTT 3.1, 3.1.1 and 5); port 0 picks a free
    /// port (see [`EmbeddedBroker::local_addr`]).
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// A second ingest listener (kept for configs that separate MQTT 5
    /// devices; either listener accepts every version).
    #[serde(default)]
    pub listen_v5: Option<SocketAddr>,
    /// A publish with a larger payload is read past, dead-lettered with the
    /// start of its payload, and acknowledged.
    #[serde(default = "defaults::max_payload")]
    pub max_payload: ByteSize,
    /// Device connections at once; more are refused (counted).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// QoS 1/2 messages of one connection waiting for their journal commit;
    /// at this many the gateway stops reading that connection until commits
    /// release them (sent to MQTT 5 clients as their receive maximum).
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: usize,
    /// The local pub/sub broker for plant clients (HMI, historian): every
    /// accepted publish is copied there. Off when absent.
    #[serde(default)]
    pub pubsub_listen: Option<SocketAddr>,
    /// The pub/sub broker's memory for messages not yet read by a subscriber,
    /// per subscription filter; in segments of `max(max-payload, 256KiB)`, at
    /// least two of them.
    #[serde(default = "defaults::log_size")]
    pub log_size: ByteSize,
    /// What one message may cost: field, name and topic limits.
    #[serde(default)]
    pub limits: DecodeLimits,
    /// Devices allowed to publish, with their passwords and topics (see
    /// [`super::listener::auth`]). With none, devices connect anonymously.
    #[serde(default)]
    pub users: Vec<BrokerUser>,
    /// Lets devices without credentials in, also on a listener beyond
    /// loopback (refused otherwise). Logged at start.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// TLS on the ingest listener(s): devices connect with `mqtts`.
    #[serde(default)]
    pub tls: Option<BrokerTls>,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// `[broker.tls]`: the listener's certificate chain and key (PEM), and
/// optionally the CA of the devices' own certificates (mutual TLS).
///
/// With `client-ca-file`, a device may prove who it is by a certificate
/// signed by that CA that names its MQTT user name as a DNS subject
/// alternative name: a `CONNECT` with that user name then needs no password
/// (a `[[broker.users]]` entry without `password-hash` can only log in this
/// way), and a certificate naming another user than the `CONNECT`'s is
/// refused. With `client-cert = "required"` (the default) a device without a
/// certificate from that CA does not get past the TLS handshake.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerTls {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_cert: ClientCert,
}

/// Whether a device must present a certificate (with `client-ca-file`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCert {
    #[default]
    Required,
    /// A device may come with a certificate or with a password only.
    Optional,
}

impl BrokerTls {
    /// The TLS server config (ring provider); the error names the file.
    pub fn server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let named =
            |path: &std::path::Path, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .map_err(|e| named(&self.cert_file, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| named(&self.cert_file, &e))?;
        if certs.is_empty() {
            return Err(named(&self.cert_file, &"no PEM certificate found"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key_file).map_err(|e| named(&self.key_file, &e))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(std::sync::Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| named(ca, &e))? {
                    roots
                        .add(cert.map_err(|e| named(ca, &e))?)
                        .map_err(|e| named(ca, &e))?;
                }
                if roots.is_empty() {
                    return Err(named(ca, &"no PEM certificate found"));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                );
                let verifier = match self.client_cert {
                    ClientCert::Required => verifier,
                    ClientCert::Optional => verifier.allow_unauthenticated(),
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| named(ca, &e))?)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| named(&self.key_file, &e))?;
        Ok(std::sync::Arc::new(config))
    }
}

/// `[[broker.users]]`: one device (or group of devices) and where it may publish.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerUser {
    /// The MQTT user name.
    pub name: String,
    /// Argon2 PHC string from `millrace-agent hash-password`. Without it
    /// the device logs in only with a client certificate naming it
    /// (`[broker.tls] client-ca-file`).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// Topic filters this user may publish to. Default: every topic.
    #[serde(default = "defaults::all_topics")]
    pub publish: Vec<String>,
}

impl std::fmt::Debug for BrokerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUser")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("publish", &self.publish)
            .finish()
    }
}

/// The defaults of `[broker]`, in one place.
pub mod defaults {
    use bytesize::ByteSize;
    use std::net::{Ipv4Addr, SocketAddr};

    pub fn all_topics() -> Vec<String> {
        vec!["#".to_owned()]
    }

    pub fn listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 1883))
    }
    pub fn max_payload() -> ByteSize {
        ByteSize::kib(256)
    }
    pub fn max_connections() -> usize {
        256
    }
    /// Four journal group commits' worth (`journal.commit-readings`) per
    /// connection, so a fast publisher never waits for a commit to read on.
    pub fn max_inflight() -> usize {
        4096
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
    /// Unacknowledged QoS 1 messages per pub/sub subscriber.
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
            max_inflight: defaults::max_inflight(),
            pubsub_listen: None,
            log_size: defaults::log_size(),
            limits: DecodeLimits::default(),
            users: Vec::new(),
            allow_anonymous: false,
            tls: None,
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
        if self.max_inflight == 0 || self.max_inflight > usize::from(u16::MAX) {
            return bad("max-inflight", "must be between 1 and 65535");
        }
        if let Some(p) = self.pubsub_listen {
            if p.port() != 0 && (p == self.listen || Some(p) == self.listen_v5) {
                return bad("pubsub-listen", "must differ from listen and listen-v5");
            }
            if self.enabled && !p.ip().is_loopback() && !self.allow_anonymous {
                return bad(
                    "pubsub-listen",
                    &format!(
                        "{p} is beyond loopback, and the local pub/sub broker has no \
                         authentication or TLS: any host that reaches it could read every \
                         reading. Keep it on 127.0.0.1 (behind an authenticating proxy if \
                         needed), or set allow-anonymous = true"
                    ),
                );
            }
        }
        if let Some(tls) = &self.tls {
            tls.server_config()
                .map_err(|e| ConfigError::new("broker.tls", e))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            if user.name.is_empty() || !names.insert(user.name.as_str()) {
                return bad(&key("name"), "must be non-empty and unique");
            }
            match &user.password_hash {
                Some(hash) if argon2::password_hash::PasswordHash::new(hash).is_err() => {
                    return bad(
                        &key("password-hash"),
                        "is not a PHC password hash: make one with `millrace-agent hash-password`",
                    );
                }
                None if self.client_ca_file().is_none() => {
                    return bad(
                        &key("password-hash"),
                        "is needed unless devices log in with client certificates \
                         ([broker.tls] client-ca-file)",
                    );
                }
                _ => {}
            }
            if user.publish.iter().any(|f| f.is_empty()) {
                return bad(&key("publish"), "topic filters must be non-empty");
            }
        }
        let certificates_required = self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some() && t.client_cert == ClientCert::Required);
        if self.enabled && self.users.is_empty() && !self.allow_anonymous && !certificates_required
        {
            let open = std::iter::once(self.listen)
                .chain(self.listen_v5)
                .find(|a| !a.ip().is_loopback());
            if let Some(addr) = open {
                return bad(
                    "listen",
                    &format!(
                        "{addr} is beyond loopback and no [[broker.users]] are set: any host \
                         that reaches it could publish readings. Add users (passwords from \
                         `millrace-agent hash-password`), listen on 127.0.0.1, or set \
                         allow-anonymous = true"
                    ),
                );
            }
        }
        if self.subscriptions.is_empty() {
            if !self.enabled {
                // Switched off: nothing to route. The other keys are still
                // checked, so switching it on later does not surprise.
                return self.limits.validate("broker.limits");
            }
            return bad(
                "subscriptions",
                "at least one [[broker.subscriptions]] is needed",
            );
        }
        self.limits.validate("broker.limits")?;
        Decoder::new(
            &self.subscriptions,
            self.max_payload_bytes(),
            "broker.subscriptions",
        )?;
        Ok(())
    }

    fn client_ca_file(&self) -> Option<&std::path::Path> {
        self.tls.as_ref()?.client_ca_file.as_deref()
    }

    pub(crate) fn max_payload_bytes(&self) -> usize {
        usize::try_from(self.max_payload.as_u64()).unwrap_or(usize::MAX)
    }

    /// One segment of rumqttd's log: it must hold the largest message.
    pub(crate) fn log_segment_bytes(&self) -> usize {
        self.max_payload_bytes().max(defaults::MIN_LOG_SEGMENT)
    }

    pub(crate) fn log_segments(&self) -> usize {
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
    /// rumqttd refused the pub/sub broker's in-process link.
    #[error("local pub/sub broker link: {0}")]
    Link(String),
    /// The pub/sub broker's thread could not be started.
    #[error("local pub/sub broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The ingest listener stopped accepting connections.
    #[error(transparent)]
    Listener(#[from] ListenerError),
}

/// A running embedded broker: the ingest listener, and the local pub/sub
/// broker when `pubsub-listen` is set.
#[derive(Debug)]
pub struct EmbeddedBroker {
    listener: IngestListener,
    pubsub: Option<PubSub>,
}

impl EmbeddedBroker {
    /// Binds the ingest listener(s) and starts the pub/sub broker. A listen
    /// address that cannot be bound is an error here, not a silent exit
    /// later. Call from within the tokio runtime.
    pub fn start(config: &BrokerConfig) -> Result<Self, BrokerError> {
        config.validate()?;
        let decoder = Decoder::new(
            &config.subscriptions,
            config.max_payload_bytes(),
            "broker.subscriptions",
        )?
        .with_limits(config.limits);
        let pubsub = config
            .pubsub_listen
            .map(|addr| PubSub::start(config, addr))
            .transpose()?;
        let listener =
            IngestListener::bind(config, decoder, pubsub.clone()).map_err(|e| match e {
                ListenerError::Bind { addr, source } => BrokerError::Bind { addr, source },
                other => BrokerError::Listener(other),
            })?;
        Ok(Self { listener, pubsub })
    }

    /// The `listen` address (with the port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addrs()[0]
    }

    /// The `listen-v5` address, when configured.
    pub fn local_addr_v5(&self) -> Option<SocketAddr> {
        self.listener.local_addrs().get(1).copied()
    }

    /// The local pub/sub broker's address, when configured.
    pub fn pubsub_addr(&self) -> Option<SocketAddr> {
        self.pubsub.as_ref().map(PubSub::local_addr)
    }

    /// The ingest counters (`connected` is true while it accepts devices).
    pub fn stats(&self) -> Arc<MqttStats> {
        self.listener.stats()
    }

    /// Serves devices until `shutdown` is cancelled (see [`IngestListener::run`]).
    pub async fn run(self, tx: IngestTx, shutdown: CancellationToken) -> Result<(), BrokerError> {
        Ok(self.listener.run(tx, shutdown).await?)
    }
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
    fn a_disabled_broker_needs_no_subscriptions() {
        let mut c: BrokerConfig = toml::from_str("enabled = false").unwrap();
        assert!(c.validate().is_ok(), "{:?}", c.validate());
        c.enabled = true;
        assert_eq!(c.validate().unwrap_err().key, "broker.subscriptions");
    }

    #[test]
    fn an_open_pubsub_broker_beyond_loopback_is_refused() {
        let err = config("enabled = true\npubsub-listen = \"0.0.0.0:1884\"")
            .validate()
            .unwrap_err();
        assert_eq!(err.key, "broker.pubsub-listen", "{err:?}");
        assert!(config("enabled = true\npubsub-listen = \"127.0.0.1:1884\"")
            .validate()
            .is_ok());
        let allowed =
            config("enabled = true\npubsub-listen = \"0.0.0.0:1884\"\nallow-anonymous = true");
        assert!(allowed.validate().is_ok());
    }

    #[test]
    fn a_user_without_a_password_needs_client_certificates() {
        let err = config("[[users]]\nname = \"sensor-a\"\n")
            .validate()
            .unwrap_err();
        assert_eq!(err.key, "broker.users[0].password-hash", "{err:?}");
        assert!(err.to_string().contains("client-ca-file"), "{err}");
    }

    #[test]
    fn a_log_smaller_than_two_segments_is_refused_by_key() {
        let err = config("max-payload = \"1MiB\"\nlog-size = \"1MiB\"")
            .validate()
            .unwrap_err();
        assert_eq!(err.key, "broker.log-size", "{err:?}");
    }
}
