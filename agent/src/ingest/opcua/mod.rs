//! The OPC UA source: a client of OPC UA servers (PLCs such as S7-1500,
//! Beckhoff, B&R, or a gateway in front of older ones), feeding the values
//! of configured nodes into the pipeline as readings.
//!
//! What it is: one task per `[[opcua.servers]]`, on async-opcua's client.
//! It connects to the endpoint with the configured security policy and mode
//! (`None`, or `Basic256Sha256` / `Aes128-Sha256-RsaOaep` /
//! `Aes256-Sha256-RsaPss` with `sign` or `sign-and-encrypt`) and identity
//! (anonymous, user name and password, or a user certificate), then either
//! subscribes to the nodes (`mode = "subscribe"`, the default: one
//! subscription, one monitored item per node with its sampling interval,
//! queue size and optional absolute or percent deadband) or reads them
//! every `poll-interval` (`mode = "poll"`, for servers without
//! subscriptions; a value is reported once per source timestamp).
//!
//! - **Event time** is the value's source timestamp, else its server
//!   timestamp, else the gateway's clock when it arrived.
//! - **Quality** follows the status code: Good → `good`, Uncertain →
//!   `uncertain`, Bad → `bad`. A Bad status normally comes without a value
//!   (the specification has the server null it): that is a dead letter
//!   `device-exception` naming the status (`BadSensorFailure`, …), counted
//!   in `millrace_opcua_bad_without_value_total`, so a failed sensor shows
//!   in the dead letters rather than as an invented value. 64-bit integers
//!   beyond ±2^53 are kept as the nearest `f64` and marked `uncertain`, as
//!   for Modbus.
//! - **Types:** Boolean (0/1), SByte…UInt64, Float, Double. Other types
//!   (strings, arrays, structures) are counted and skipped, or also
//!   dead-lettered (`wrong-type`) with `non-numeric = "dead-letter"`.
//! - **Nodes** are named by NodeId (`ns=2;s=Line1.Temperature`) or by a
//!   browse path from the Objects folder (`/2:Line1/2:Temperature`,
//!   resolved with TranslateBrowsePathsToNodeIds at every connect).
//! - **Reconnects:** a lost connection is retried by the session (backoff
//!   `reconnect-backoff-min` … `-max`); the session is reactivated, or a new
//!   one created and the subscription transferred or created again.
//!   Failing to connect at all is retried with the same backoff.
//! - **Trust:** a secured endpoint needs the server's certificate named
//!   explicitly (`server-certificate`, copied into the client's PKI trust
//!   list) or `trust-on-first-use = true`, which trusts whatever certificate
//!   the server shows first (logged). The client's own certificate and key
//!   are created in `pki-dir` on the first start (default
//!   `<data-dir>/opcua/<server name>`): add `own/cert.der` to the server's
//!   trusted clients.
//!
//! # Delivery
//!
//! OPC UA has no per-value acknowledgement to withhold: the session
//! acknowledges each publish response. Values go through a per-server queue
//! of `queue-capacity` to the ingest channel; should the pipeline fall that
//! far behind, further values are counted
//! (`millrace_opcua_dropped_values_total`) and logged, never dropped
//! silently. The server's own monitored-item queue (`queue-size`) is what
//! holds values while a publish is outstanding.

use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "opcua")]
mod client;
#[cfg(feature = "opcua")]
pub use client::OpcUaSource;

pub use crate::ingest::decode::NonNumeric;

/// `[opcua]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OpcUaConfig {
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
}

/// `security-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityPolicy {
    #[default]
    None,
    #[serde(rename = "basic256sha256")]
    Basic256Sha256,
    #[serde(rename = "aes128-sha256-rsaoaep")]
    Aes128Sha256RsaOaep,
    #[serde(rename = "aes256-sha256-rsapss")]
    Aes256Sha256RsaPss,
}

impl SecurityPolicy {
    /// The policy's URI.
    pub fn uri(self) -> &'static str {
        match self {
            SecurityPolicy::None => "http://opcfoundation.org/UA/SecurityPolicy#None",
            SecurityPolicy::Basic256Sha256 => {
                "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"
            }
            SecurityPolicy::Aes128Sha256RsaOaep => {
                "http://opcfoundation.org/UA/SecurityPolicy#Aes128_Sha256_RsaOaep"
            }
            SecurityPolicy::Aes256Sha256RsaPss => {
                "http://opcfoundation.org/UA/SecurityPolicy#Aes256_Sha256_RsaPss"
            }
        }
    }
}

/// `security-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityMode {
    #[default]
    None,
    Sign,
    SignAndEncrypt,
}

/// `identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Identity {
    #[default]
    Anonymous,
    /// `user` and `password` (or `password-file`).
    UserName,
    /// `user-certificate` (DER) and `user-private-key` (PEM).
    Certificate,
}

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One subscription with a monitored item per node.
    #[default]
    Subscribe,
    /// Read every node each `poll-interval`.
    Poll,
}

/// The password's environment override: `MILLRACE_OPCUA_PASSWORD_<NAME>`
/// with the server name upper-cased and `-`/`.` as `_`.
pub fn password_env(server: &str) -> String {
    millrace_protocol::secret::env_var_name("MILLRACE_OPCUA_PASSWORD", server)
}

/// `[[opcua.servers]]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Names the server in logs and metrics; the default device of its series.
    pub name: String,
    /// `opc.tcp://host:port/path`.
    pub endpoint: String,
    #[serde(default)]
    pub security_policy: SecurityPolicy,
    #[serde(default)]
    pub security_mode: SecurityMode,
    #[serde(default)]
    pub identity: Identity,
    #[serde(default)]
    pub user: Option<String>,
    /// Prefer `password-file` or the environment ([`password_env`]).
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub user_certificate: Option<PathBuf>,
    #[serde(default)]
    pub user_private_key: Option<PathBuf>,
    /// The client's own certificate, key and trust lists. Default
    /// `<data-dir>/opcua/<name>`.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// The server's certificate (DER or PEM), trusted explicitly.
    #[serde(default)]
    pub server_certificate: Option<PathBuf>,
    /// Trust the certificate the server shows on the first connection.
    #[serde(default)]
    pub trust_on_first_use: bool,
    #[serde(default)]
    pub mode: Mode,
    /// How often the server sends what changed (`"1s"`).
    #[serde(default = "defaults::publishing_interval", with = "humantime_serde")]
    pub publishing_interval: Duration,
    /// How often the server samples each node, unless the node says (`"500ms"`).
    #[serde(default = "defaults::sampling_interval", with = "humantime_serde")]
    pub sampling_interval: Duration,
    /// Values the server queues per node between publishes (`10`).
    #[serde(default = "defaults::queue_size")]
    pub queue_size: u32,
    /// `mode = "poll"`: how often every node is read (`"1s"`).
    #[serde(default = "defaults::poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default = "defaults::backoff_min", with = "humantime_serde")]
    pub reconnect_backoff_min: Duration,
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// Timeout of each request to the server (`"10s"`).
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Values waiting for the ingest channel (`10000`).
    #[serde(default = "defaults::queue_capacity")]
    pub queue_capacity: usize,
    #[serde(default)]
    pub non_numeric: NonNumeric,
    pub nodes: Vec<NodeConfig>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("security_policy", &self.security_policy)
            .field("security_mode", &self.security_mode)
            .field("identity", &self.identity)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("user_certificate", &self.user_certificate)
            .field("user_private_key", &self.user_private_key)
            .field("pki_dir", &self.pki_dir)
            .field("server_certificate", &self.server_certificate)
            .field("trust_on_first_use", &self.trust_on_first_use)
            .field("mode", &self.mode)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// `[[opcua.servers.nodes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// `ns=2;s=Line1.Temperature`, `ns=3;i=1001`, …
    #[serde(default)]
    pub node_id: Option<String>,
    /// From the Objects folder: `/2:Line1/2:Temperature`.
    #[serde(default)]
    pub browse_path: Option<String>,
    /// Default: the server's `name`.
    #[serde(default)]
    pub device: Option<String>,
    /// Default: the NodeId's identifier or the browse path's last name.
    #[serde(default)]
    pub sensor: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub sampling_interval: Option<Duration>,
    #[serde(default)]
    pub queue_size: Option<u32>,
    /// Report a change only when it exceeds this absolute amount.
    #[serde(default)]
    pub deadband_absolute: Option<f64>,
    /// ... or this percentage of the node's EU range (the server must know it).
    #[serde(default)]
    pub deadband_percent: Option<f64>,
}

impl NodeConfig {
    /// The sensor name of its series.
    pub fn sensor_name(&self) -> String {
        if let Some(s) = &self.sensor {
            return s.clone();
        }
        if let Some(id) = &self.node_id {
            // The identifier after `s=`, `i=`, `g=` or `b=`.
            return id
                .rsplit(';')
                .next()
                .and_then(|part| part.split_once('=').map(|(_, v)| v))
                .unwrap_or(id)
                .to_string();
        }
        self.browse_path
            .as_deref()
            .and_then(|p| p.rsplit(['/', '.']).find(|s| !s.is_empty()))
            .map(|last| last.split_once(':').map_or(last, |(_, n)| n).to_string())
            .unwrap_or_default()
    }
}

pub mod defaults {
    use std::time::Duration;
    pub fn publishing_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn sampling_interval() -> Duration {
        Duration::from_millis(500)
    }
    pub fn queue_size() -> u32 {
        10
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn backoff_min() -> Duration {
        Duration::from_secs(1)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn queue_capacity() -> usize {
        10_000
    }
}

impl OpcUaConfig {
    /// Takes passwords from the environment or `password-file`.
    pub fn load_secrets(&mut self) -> Result<(), String> {
        for (i, s) in self.servers.iter_mut().enumerate() {
            if let Ok(password) = std::env::var(password_env(&s.name)) {
                s.password = Some(password);
                continue;
            }
            if let Some(path) = &s.password_file {
                let file = millrace_protocol::secret::read_secret_file(path)
                    .map_err(|e| format!("opcua.servers[{i}].password-file: {e}"))?;
                if let Some(warning) = &file.loose_permissions {
                    tracing::warn!("opcua.servers[{i}].password-file: {warning}");
                }
                s.password = Some(file.value);
            }
        }
        Ok(())
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let key = |k: &str| format!("opcua.servers[{i}].{k}");
            let bad = |k: &str, why: &str| Err((key(k), why.to_string()));
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return bad(
                    "name",
                    "must be non-empty and use only letters, digits, '-', '_' and '.'",
                );
            }
            if !names.insert(s.name.as_str()) {
                return bad("name", "two servers have this name");
            }
            if !s.endpoint.starts_with("opc.tcp://") {
                return bad("endpoint", "must be an opc.tcp:// URL");
            }
            match (s.security_policy, s.security_mode) {
                (SecurityPolicy::None, SecurityMode::None) => {}
                (SecurityPolicy::None, _) => {
                    return bad(
                        "security-mode",
                        "must be \"none\" with security-policy = \"none\"",
                    )
                }
                (_, SecurityMode::None) => {
                    return bad(
                        "security-mode",
                        "must be \"sign\" or \"sign-and-encrypt\" with a security policy",
                    )
                }
                _ => {
                    if s.server_certificate.is_none() && !s.trust_on_first_use {
                        return bad(
                            "server-certificate",
                            "a secured endpoint needs the server's certificate (or trust-on-first-use = true)",
                        );
                    }
                }
            }
            if s.server_certificate.is_some() && s.trust_on_first_use {
                return bad(
                    "trust-on-first-use",
                    "give either server-certificate or trust-on-first-use",
                );
            }
            match s.identity {
                Identity::Anonymous => {}
                Identity::UserName => {
                    if s.user.as_deref().is_none_or(str::is_empty) {
                        return bad("user", "identity = \"user-name\" needs a user");
                    }
                    if s.password.is_none() && s.password_file.is_none() {
                        return bad(
                            "password-file",
                            "identity = \"user-name\" needs password-file (or password, or the environment)",
                        );
                    }
                }
                Identity::Certificate => {
                    if s.user_certificate.is_none() || s.user_private_key.is_none() {
                        return bad(
                            "user-certificate",
                            "identity = \"certificate\" needs user-certificate and user-private-key",
                        );
                    }
                }
            }
            for (k, d) in [
                ("publishing-interval", s.publishing_interval),
                ("sampling-interval", s.sampling_interval),
                ("poll-interval", s.poll_interval),
                ("reconnect-backoff-min", s.reconnect_backoff_min),
                ("request-timeout", s.request_timeout),
            ] {
                if d.is_zero() {
                    return bad(k, "must be greater than 0");
                }
            }
            if s.reconnect_backoff_max < s.reconnect_backoff_min {
                return bad(
                    "reconnect-backoff-max",
                    "must not be less than reconnect-backoff-min",
                );
            }
            if s.queue_size == 0 || s.queue_capacity == 0 {
                return bad(
                    "queue-size",
                    "queue-size and queue-capacity must be at least 1",
                );
            }
            if s.nodes.is_empty() {
                return bad("nodes", "list at least one node");
            }
            let mut series = std::collections::BTreeSet::new();
            for (j, n) in s.nodes.iter().enumerate() {
                let nkey = |k: &str| format!("opcua.servers[{i}].nodes[{j}].{k}");
                match (&n.node_id, &n.browse_path) {
                    (Some(_), Some(_)) | (None, None) => {
                        return Err((
                            nkey("node-id"),
                            "give exactly one of node-id and browse-path".into(),
                        ))
                    }
                    (Some(id), None) => {
                        if let Err(why) = check_node_id(id) {
                            return Err((nkey("node-id"), why));
                        }
                    }
                    (None, Some(path)) => {
                        if !path.starts_with('/') || path.len() < 2 {
                            return Err((
                                nkey("browse-path"),
                                "must start at the Objects folder with '/', e.g. \"/2:Line1/2:Temperature\"".into(),
                            ));
                        }
                    }
                }
                if n.sensor_name().is_empty() {
                    return Err((
                        nkey("sensor"),
                        "cannot derive a sensor name: set sensor".into(),
                    ));
                }
                let device = n.device.clone().unwrap_or_else(|| s.name.clone());
                if !series.insert((device, n.sensor_name())) {
                    return Err((
                        nkey("sensor"),
                        "two nodes of this server map to the same series".into(),
                    ));
                }
                if n.deadband_absolute.is_some() && n.deadband_percent.is_some() {
                    return Err((
                        nkey("deadband-percent"),
                        "give one deadband, absolute or percent".into(),
                    ));
                }
                if n.deadband_absolute
                    .is_some_and(|d| !(d >= 0.0 && d.is_finite()))
                    || n.deadband_percent
                        .is_some_and(|d| !(0.0..=100.0).contains(&d))
                {
                    return Err((
                        nkey("deadband-absolute"),
                        "must be ≥ 0 (percent: 0–100)".into(),
                    ));
                }
                if n.sampling_interval.is_some_and(|d| d.is_zero()) || n.queue_size == Some(0) {
                    return Err((nkey("sampling-interval"), "must be greater than 0".into()));
                }
            }
        }
        Ok(())
    }
}

/// Checks a NodeId string (`ns=<n>;` optional, then `i=`, `s=`, `g=` or `b=`).
fn check_node_id(id: &str) -> Result<(), String> {
    #[cfg(feature = "opcua")]
    {
        use std::str::FromStr;
        opcua::types::NodeId::from_str(id)
            .map(|_| ())
            .map_err(|_| format!("{id:?} is not a NodeId (e.g. \"ns=2;s=Line1.Temperature\")"))
    }
    #[cfg(not(feature = "opcua"))]
    {
        let rest = match id.split_once(';') {
            Some((ns, rest)) if ns.starts_with("ns=") || ns.starts_with("nsu=") => rest,
            Some(_) => return Err(format!("{id:?} is not a NodeId")),
            None => id,
        };
        if ["i=", "s=", "g=", "b="].iter().any(|p| rest.starts_with(p)) && rest.len() > 2 {
            Ok(())
        } else {
            Err(format!(
                "{id:?} is not a NodeId (e.g. \"ns=2;s=Line1.Temperature\")"
            ))
        }
    }
}

/// Counters of one server, read by the exporter.
#[derive(Debug, Default)]
pub struct OpcUaStats {
    pub connected: AtomicBool,
    /// Sessions established (the first one included).
    pub sessions: AtomicU64,
    pub connection_errors: AtomicU64,
    /// Values received (data changes, or every value read when polling).
    pub values: AtomicU64,
    pub readings: AtomicU64,
    /// Values of a type that is not a number (skipped or dead-lettered).
    pub non_numeric: AtomicU64,
    /// Values without a value (a Bad status: dead-lettered).
    pub bad_without_value: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Values dropped because the per-server queue was full.
    pub dropped: AtomicU64,
    /// Nodes the server refused (unknown NodeId, browse path not found).
    pub node_errors: AtomicU64,
}

impl OpcUaStats {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// What the exporter reads: each server's name and counters.
pub type OpcUaCounters = Vec<(String, Arc<OpcUaStats>)>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OpcUaConfig, String> {
        let cfg: OpcUaConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|(k, why)| format!("{k}: {why}"))?;
        Ok(cfg)
    }

    const BASE: &str = r#"
[[servers]]
name = "line-1"
endpoint = "opc.tcp://127.0.0.1:4840/"
[[servers.nodes]]
node-id = "ns=2;s=Line1.Temperature"
unit = "degC"
[[servers.nodes]]
browse-path = "/2:Line1/2:Pressure"
"#;

    #[test]
    fn defaults_and_derived_sensor_names() {
        let cfg = parse(BASE).unwrap();
        let s = &cfg.servers[0];
        assert_eq!(s.mode, Mode::Subscribe);
        assert_eq!(s.security_policy, SecurityPolicy::None);
        assert_eq!(s.nodes[0].sensor_name(), "Line1.Temperature");
        assert_eq!(s.nodes[1].sensor_name(), "Pressure");
    }

    #[test]
    fn a_secured_endpoint_needs_explicit_trust() {
        let text = BASE.replace(
            "endpoint = \"opc.tcp://127.0.0.1:4840/\"",
            "endpoint = \"opc.tcp://127.0.0.1:4840/\"\nsecurity-policy = \"basic256sha256\"\nsecurity-mode = \"sign-and-encrypt\"",
        );
        let e = parse(&text).unwrap_err();
        assert!(e.contains("servers[0].server-certificate"), "{e}");
        assert!(
            parse(&text.replace("security-mode", "trust-on-first-use = true\nsecurity-mode"))
                .is_ok()
        );
        let e = parse(&BASE.replace(
            "endpoint = \"opc.tcp://127.0.0.1:4840/\"",
            "endpoint = \"opc.tcp://h/\"\nsecurity-mode = \"sign\"",
        ))
        .unwrap_err();
        assert!(e.contains("security-mode"), "{e}");
    }

    #[test]
    fn bad_nodes_and_identities_are_named() {
        let e = parse(&BASE.replace("ns=2;s=Line1.Temperature", "Line1.Temperature")).unwrap_err();
        assert!(e.contains("nodes[0].node-id"), "{e}");
        let e = parse(&BASE.replace("/2:Line1/2:Pressure", "2:Line1")).unwrap_err();
        assert!(e.contains("nodes[1].browse-path"), "{e}");
        let e = parse(&BASE.replace(
            "name = \"line-1\"",
            "name = \"line-1\"\nidentity = \"user-name\"\nuser = \"op\"",
        ))
        .unwrap_err();
        assert!(e.contains("password-file"), "{e}");
        let e = parse(&BASE.replace("endpoint = \"opc.tcp", "endpoint = \"http")).unwrap_err();
        assert!(e.contains("endpoint"), "{e}");
    }

    #[test]
    fn debug_output_hides_the_password() {
        let text = BASE.replace(
            "name = \"line-1\"",
            "name = \"line-1\"\nidentity = \"user-name\"\nuser = \"op\"\npassword = \"s3cret-opcua-pw\"",
        );
        let cfg = parse(&text).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret-opcua-pw"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn password_env_names_the_server() {
        assert_eq!(password_env("line-1.a"), "MILLRACE_OPCUA_PASSWORD_LINE_1_A");
    }
}
