//! Aggregator configuration: the TOML file, checked in two stages.
//!
//! Stage one is [`RawConfig`], a plain serde mirror of the file
//! (`deny_unknown_fields`, kebab-case keys, durations like `"5s"`, sizes like
//! `"8MiB"`). Stage two, [`Config::from_raw`], applies defaults, reads secrets
//! from the environment and checks every value; its errors name the file and
//! the key. Defaults live in the `default_*` functions of this module only.
//!
//! ```toml
//! listen = "127.0.0.1:8480"
//! data-dir = "/var/lib/millrace-aggregator"
//! max-body = "8MiB"
//!
//! [[agents]]
//! id = "gw-press-1"
//! # or MILLRACE_TOKEN_GW_PRESS_1 in the environment
//! token-file = "${CREDENTIALS_DIRECTORY}/millrace_gw-press-1"   # systemd LoadCredential=
//!
//! [topics]
//! windows = "millrace.windows"
//!
//! [kafka]            # omit the table (or leave brokers empty) for the embedded log
//! brokers = "kafka-1:9092,kafka-2:9092"
//! message-timeout = "30s"
//! ```
//!
//! What it is not: there is no hot reload; a changed file takes effect on restart.

use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file as written, before defaults and checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawConfig {
    /// Address the HTTP API listens on. Default `127.0.0.1:8480`.
    pub listen: Option<String>,
    /// Directory for the dedup state (and the embedded log unless `[log] dir`
    /// says otherwise). Required.
    pub data_dir: Option<PathBuf>,
    /// Largest accepted request body, compressed and after decompression.
    /// Default `8MiB`.
    pub max_body: Option<ByteSize>,
    /// Ingest requests handled at once; further requests get `503` with
    /// `Retry-After` at once instead of queueing. Default 64.
    pub max_concurrent_batches: Option<usize>,
    /// The `Retry-After` sent with every `503`. Default `5s`.
    #[serde(default, with = "humantime_serde::option")]
    pub retry_after: Option<Duration>,
    /// How long a shutdown waits for in-flight requests. Default `10s`.
    #[serde(default, with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    /// Records one batch may carry; more get `413` and the agent splits.
    /// Default 10000.
    pub max_batch_records: Option<usize>,
    /// Longest device, sensor, unit or dead-letter origin name in a record;
    /// longer (or with a control character) gets `400` for that record.
    /// Default 256.
    pub max_name_bytes: Option<usize>,
    /// How long a request body may take to arrive (`408` after). Default `30s`.
    #[serde(default, with = "humantime_serde::option")]
    pub body_timeout: Option<Duration>,
    /// Records per second one agent may send (one second of burst, at least
    /// a full batch); more get `429` with `Retry-After`. `0` for no limit.
    /// Default 20000.
    pub agent_rate_limit: Option<u32>,
    /// The agents allowed to send, each with its bearer token.
    #[serde(default)]
    pub agents: Vec<RawAgent>,
    #[serde(default)]
    pub topics: RawTopics,
    pub kafka: Option<RawKafka>,
    #[serde(default)]
    pub log: RawLog,
    /// The live dashboard, its JSON API and `/metrics`.
    #[serde(default)]
    pub dashboard: crate::dashboard::config::RawDashboard,
    /// HTTPS, optionally with client certificates (see [`crate::tls`]).
    pub tls: Option<crate::tls::TlsConfig>,
    /// Several aggregators sharing the fleet through Kafka (see
    /// [`crate::cluster`]).
    pub cluster: Option<RawCluster>,
}

/// `[cluster]`: this aggregator is one of several that share the fleet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawCluster {
    /// The base URL agents reach this aggregator at (redirects name it).
    pub advertise_url: Option<String>,
    /// The control topic. Default `millrace.control`.
    pub control_topic: Option<String>,
    /// The Kafka consumer group of the aggregators. Default
    /// `millrace-aggregators`.
    pub group: Option<String>,
}

/// The checked `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub advertise_url: String,
    pub control_topic: String,
    pub group: String,
}

pub const DEFAULT_CONTROL_TOPIC: &str = "millrace.control";
pub const DEFAULT_CLUSTER_GROUP: &str = "millrace-aggregators";

impl RawCluster {
    /// The checked table, or the key at fault and why.
    fn check(self, kafka: bool) -> Result<ClusterConfig, (String, String)> {
        let invalid = |key: &str, message: String| (key.to_owned(), message);
        if !kafka {
            return Err(invalid(
                "cluster",
                "several aggregators share the fleet through Kafka: configure [kafka] brokers, \
                 or remove [cluster] to run one aggregator on the embedded log"
                    .into(),
            ));
        }
        let url = self.advertise_url.unwrap_or_default();
        let url = url.trim().trim_end_matches('/').to_owned();
        let parsed = url.parse::<axum::http::Uri>();
        let ok = parsed.as_ref().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some()
                && u.path_and_query()
                    .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty())
        });
        if !ok {
            return Err(invalid(
                "cluster.advertise-url",
                format!(
                    "`{url}` must be the http:// or https:// base URL (no path) agents reach \
                     this aggregator at; the other aggregators redirect its agents there"
                ),
            ));
        }
        let control_topic = self
            .control_topic
            .unwrap_or_else(|| DEFAULT_CONTROL_TOPIC.to_owned());
        if !valid_topic(&control_topic) {
            return Err(invalid(
                "cluster.control-topic",
                format!(
                    "`{control_topic}` is not a valid topic name (1 to 249 of A-Z a-z 0-9 . _ -)"
                ),
            ));
        }
        let group = self
            .group
            .unwrap_or_else(|| DEFAULT_CLUSTER_GROUP.to_owned())
            .trim()
            .to_owned();
        if group.is_empty() {
            return Err(invalid("cluster.group", "must not be empty".into()));
        }
        Ok(ClusterConfig {
            advertise_url: url,
            control_topic,
            group,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawAgent {
    /// Agent id as sent in `Batch::agent`: letters, digits, `.`, `_`, `-`.
    pub id: String,
    /// Bearer token; `MILLRACE_TOKEN_<ID>` (id upper-cased, `.`/`-` → `_`)
    /// in the environment takes precedence, then `token-file`.
    pub token: Option<String>,
    /// A file holding the token (its first line), e.g. a systemd credential
    /// (`/run/credentials/millrace-aggregator.service/<name>`). Warned about
    /// when its group or others may read it.
    pub token_file: Option<PathBuf>,
    /// Tokens kept as SHA-256 digests (`sha256:<hex>`, from
    /// `millrace-aggregator hash-token`), so the file holds no usable secret.
    /// Any of them is accepted, beside `token`: list the new one next to the
    /// old, reload (SIGHUP), move the agent over, remove the old, reload.
    #[serde(default)]
    pub token_hashes: Vec<String>,
}

/// Topic names, shared by the Kafka writer and the embedded log so that
/// downstream tools see the same names whichever is in use.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawTopics {
    /// Default `millrace.windows`.
    pub windows: Option<String>,
    /// Default `millrace.alerts`.
    pub alerts: Option<String>,
    /// Default `millrace.dead-letters`.
    pub dead_letters: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawKafka {
    /// `host:port[,host:port...]`; empty means: use the embedded log.
    pub brokers: String,
    /// How long the producer tries to deliver a record before the batch
    /// fails with `503`. Default `30s`.
    #[serde(default, with = "humantime_serde::option")]
    pub message_timeout: Option<Duration>,
    /// Records handed to the producer and not yet acknowledged, across all
    /// requests; a request waits for room. Default 10000.
    pub max_in_flight: Option<usize>,
    /// Kafka `client.id`. Default `millrace-aggregator`.
    pub client_id: Option<String>,
    /// librdkafka settings passed as they are to the producer and the
    /// read-back consumers: TLS and SASL (`security.protocol = "SASL_SSL"`,
    /// `sasl.mechanism = "SCRAM-SHA-512"`, `sasl.username`, `ssl.ca.location`,
    /// …) and tuning. `sasl.password` may instead come from
    /// `MILLRACE_KAFKA_SASL_PASSWORD`. The settings the delivery guarantee
    /// rests on (brokers, idempotence, acks, client and group ids,
    /// transactions, offset commits) cannot be overridden.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawLog {
    /// Directory of the embedded log. Default `<data-dir>/log`.
    pub dir: Option<PathBuf>,
    /// A segment file is closed and a new one started past this size.
    /// Default `64MiB`.
    pub segment_size: Option<ByteSize>,
    /// Closed segments whose records are all older than this are deleted;
    /// `"forever"` keeps them. Default `7d` (Kafka's default).
    pub retention_age: Option<String>,
    /// Oldest closed segments are deleted while a topic holds more than
    /// this. Default: no size limit.
    pub retention_size: Option<ByteSize>,
}

/// A byte count written as `"8MiB"`, `"512 KiB"`, `"1GB"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size like \"8MiB\""))?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB, kB, MB or GB)"
                ))
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) => Ok(ByteSize(n)),
            Repr::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// The checked configuration the aggregator runs with.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_body_bytes: usize,
    pub max_concurrent_batches: usize,
    pub retry_after: Duration,
    pub shutdown_grace: Duration,
    pub max_batch_records: usize,
    pub max_name_bytes: usize,
    pub body_timeout: Duration,
    pub agent_rate_limit: u32,
    pub agents: Vec<AgentCredential>,
    pub topics: Topics,
    pub sink: SinkConfig,
    pub dashboard: crate::dashboard::config::DashboardConfig,
    pub tls: Option<crate::tls::TlsConfig>,
    /// `Some` when this aggregator is one of several (`[cluster]`).
    pub cluster: Option<ClusterConfig>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_concurrent_batches", &self.max_concurrent_batches)
            .field("retry_after", &self.retry_after)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_batch_records", &self.max_batch_records)
            .field("max_name_bytes", &self.max_name_bytes)
            .field("body_timeout", &self.body_timeout)
            .field("agent_rate_limit", &self.agent_rate_limit)
            .field("agents", &self.agents)
            .field("topics", &self.topics)
            .field("sink", &self.sink)
            .field("dashboard", &self.dashboard)
            .field("tls", &self.tls)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// One agent and the SHA-256 digests of the tokens it may use (one, or two
/// while rotating). The tokens themselves are not kept. With `[tls]
/// client-ca-file` an agent may have none: its certificate says who it is.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentCredential {
    pub id: String,
    pub token_digests: Vec<[u8; 32]>,
}

impl AgentCredential {
    /// Whether `token` is one of this agent's, compared in constant time.
    pub fn accepts(&self, token: &str) -> bool {
        let digest = token_digest(token);
        self.token_digests
            .iter()
            .fold(false, |found, d| found | constant_time_eq(d, &digest))
    }
}

impl fmt::Debug for AgentCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCredential")
            .field("id", &self.id)
            .field("tokens", &self.token_digests.len())
            .finish()
    }
}

/// SHA-256 of a token (tokens are long random strings: a fast hash is enough).
pub fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// `sha256:<hex>` of a token, as `token-hashes` takes it.
pub fn token_hash_string(token: &str) -> String {
    let hex: String = token_digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn parse_token_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub windows: String,
    pub alerts: String,
    pub dead_letters: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            windows: "millrace.windows".into(),
            alerts: "millrace.alerts".into(),
            dead_letters: "millrace.dead-letters".into(),
        }
    }
}

impl Topics {
    pub fn all(&self) -> [&str; 3] {
        [&self.windows, &self.alerts, &self.dead_letters]
    }
}

/// Where committed records go.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    Kafka(KafkaConfig),
    Local(LocalLogConfig),
}

/// `Debug` redacts every property that may hold a secret.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub message_timeout: Duration,
    pub max_in_flight: usize,
    pub client_id: String,
    /// `[kafka.properties]`, checked; values as librdkafka strings.
    pub properties: Vec<(String, String)>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "key.pem", "sasl.jaas", "oauthbearer"]
                    .iter()
                    .any(|s| k.contains(s));
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("message_timeout", &self.message_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("client_id", &self.client_id)
            .field("properties", &properties)
            .finish()
    }
}

/// librdkafka keys `[kafka.properties]` may not set: the exactly-once write
/// and the read-back rely on them.
pub const KAFKA_RESERVED_KEYS: [&str; 9] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "client.id",
    "group.id",
    "transactional.id",
    "enable.auto.commit",
];

/// Environment variable that sets `sasl.password` for Kafka.
pub const KAFKA_SASL_PASSWORD_ENV: &str = "MILLRACE_KAFKA_SASL_PASSWORD";

#[derive(Debug, Clone)]
pub struct LocalLogConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub retention: crate::log::local::Retention,
}

/// A configuration error, naming the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Parse {
        file: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

fn default_listen() -> &'static str {
    "127.0.0.1:8480"
}
const DEFAULT_MAX_BODY: ByteSize = ByteSize(8 << 20);
const DEFAULT_MAX_CONCURRENT_BATCHES: usize = 64;
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
const DEFAULT_SEGMENT_SIZE: ByteSize = ByteSize(64 << 20);
const DEFAULT_RETENTION_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const MIN_TOKEN_LEN: usize = 16;
const MAX_AGENT_ID_LEN: usize = 128;

/// The environment variable that overrides the token of agent `id`.
pub fn token_env_var(id: &str) -> String {
    millrace_protocol::secret::env_var_name("MILLRACE_TOKEN", id)
}

/// Agent ids become file names of the dedup state, so they are restricted.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Config {
    /// Reads, parses and checks `path`, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let credentials = std::env::var("CREDENTIALS_DIRECTORY").ok();
        let text =
            millrace_protocol::secret::expand_credentials_directory(&text, credentials.as_deref())
                .map_err(|message| ConfigError::Invalid {
                    file: path.to_owned(),
                    key: millrace_protocol::secret::CREDENTIALS_DIRECTORY.to_owned(),
                    message,
                })?;
        Self::parse(path, &text, |name| std::env::var(name).ok())
    }

    /// Parses and checks `text` (read from `path`, used in errors), looking
    /// up environment overrides through `env`.
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: path.to_owned(),
            source: Box::new(source),
        })?;
        Self::from_raw(path, raw, env)
    }

    pub fn from_raw(
        path: &Path,
        raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            file: path.to_owned(),
            key: key.to_owned(),
            message,
        };

        let listen_text = raw.listen.as_deref().unwrap_or(default_listen());
        let listen: SocketAddr = listen_text.parse().map_err(|e| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8480: {e}"),
            )
        })?;
        let data_dir = raw
            .data_dir
            .ok_or_else(|| invalid("data-dir", "is required".into()))?;
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data-dir", "must not be empty".into()));
        }
        let max_body = raw.max_body.unwrap_or(DEFAULT_MAX_BODY);
        if max_body.0 == 0 {
            return Err(invalid("max-body", "must be greater than 0".into()));
        }
        let max_body_bytes = usize::try_from(max_body.0)
            .map_err(|_| invalid("max-body", "too large for this platform".into()))?;
        let max_concurrent_batches = raw
            .max_concurrent_batches
            .unwrap_or(DEFAULT_MAX_CONCURRENT_BATCHES);
        if max_concurrent_batches == 0 {
            return Err(invalid(
                "max-concurrent-batches",
                "must be at least 1".into(),
            ));
        }
        let retry_after = raw.retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
        if retry_after < Duration::from_secs(1) {
            return Err(invalid(
                "retry-after",
                "must be at least 1s (Retry-After counts whole seconds)".into(),
            ));
        }
        let shutdown_grace = raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let defaults = crate::ingest::IngestLimits::default();
        let max_batch_records = raw.max_batch_records.unwrap_or(defaults.max_batch_records);
        if max_batch_records == 0 {
            return Err(invalid("max-batch-records", "must be at least 1".into()));
        }
        let max_name_bytes = raw.max_name_bytes.unwrap_or(defaults.max_name_bytes);
        if !(16..=65_535).contains(&max_name_bytes) {
            return Err(invalid(
                "max-name-bytes",
                format!("must be between 16 and 65535, got {max_name_bytes}"),
            ));
        }
        let body_timeout = raw.body_timeout.unwrap_or(defaults.body_timeout);
        if body_timeout < Duration::from_secs(1) {
            return Err(invalid("body-timeout", "must be at least 1s".into()));
        }
        let agent_rate_limit = raw.agent_rate_limit.unwrap_or(defaults.agent_rate_limit);

        if let Some(tls) = &raw.tls {
            crate::tls::server_config(tls).map_err(|e| invalid("tls", e))?;
        }
        let client_certificates = raw.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        let mut agents = Vec::with_capacity(raw.agents.len());
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, agent) in raw.agents.into_iter().enumerate() {
            let key = |field: &str| format!("agents[{i}].{field}");
            if !valid_agent_id(&agent.id) {
                return Err(invalid(
                    &key("id"),
                    format!(
                        "`{}` is not a valid agent id (1 to {MAX_AGENT_ID_LEN} of A-Z a-z 0-9 . _ -, not starting with .)",
                        agent.id
                    ),
                ));
            }
            if !ids.insert(agent.id.clone()) {
                return Err(invalid(
                    &key("id"),
                    format!("duplicate agent id `{}`", agent.id),
                ));
            }
            let var = token_env_var(&agent.id);
            let from_file = match (&agent.token_file, env(&var)) {
                (Some(path), None) => {
                    let file = millrace_protocol::secret::read_secret_file(path)
                        .map_err(|e| invalid(&key("token-file"), e))?;
                    if let Some(warning) = &file.loose_permissions {
                        tracing::warn!(agent = %agent.id, "{warning}");
                    }
                    Some(file.value)
                }
                _ => None,
            };
            let mut token_digests = Vec::new();
            for (j, text) in agent.token_hashes.iter().enumerate() {
                let digest = parse_token_hash(text).ok_or_else(|| {
                    invalid(
                        &key(&format!("token-hashes[{j}]")),
                        "expected sha256:<64 hex digits> (millrace-aggregator hash-token)".into(),
                    )
                })?;
                if !digests.insert(digest) {
                    return Err(invalid(
                        &key(&format!("token-hashes[{j}]")),
                        "the same token is listed twice".into(),
                    ));
                }
                token_digests.push(digest);
            }
            let Some(token) = env(&var).or(from_file).or(agent.token) else {
                if client_certificates || !token_digests.is_empty() {
                    agents.push(AgentCredential {
                        id: agent.id,
                        token_digests,
                    });
                    continue;
                }
                return Err(invalid(
                    &key("token"),
                    format!(
                        "missing: set token-file, token, or {var} in the environment \
                         (e.g. `openssl rand -hex 24`), or identify agents by client \
                         certificate ([tls] client-ca-file)"
                    ),
                ));
            };
            if millrace_protocol::secret::is_placeholder(&token) {
                return Err(invalid(
                    &key("token"),
                    "is the placeholder of the example config: generate one, e.g. \
                     `openssl rand -hex 24`"
                        .into(),
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(invalid(
                    &key("token"),
                    format!("too short: at least {MIN_TOKEN_LEN} characters"),
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    &key("token"),
                    "must be printable ASCII without spaces".into(),
                ));
            }
            if !digests.insert(token_digest(&token)) {
                return Err(invalid(
                    &key("token"),
                    "the same token is used twice".into(),
                ));
            }
            token_digests.push(token_digest(&token));
            agents.push(AgentCredential {
                id: agent.id,
                token_digests,
            });
        }

        let defaults = Topics::default();
        let topics = Topics {
            windows: raw.topics.windows.unwrap_or(defaults.windows),
            alerts: raw.topics.alerts.unwrap_or(defaults.alerts),
            dead_letters: raw.topics.dead_letters.unwrap_or(defaults.dead_letters),
        };
        for (key, name) in [
            ("topics.windows", &topics.windows),
            ("topics.alerts", &topics.alerts),
            ("topics.dead-letters", &topics.dead_letters),
        ] {
            if !valid_topic(name) {
                return Err(invalid(
                    key,
                    format!("`{name}` is not a valid topic name (1 to 249 of A-Z a-z 0-9 . _ -)"),
                ));
            }
        }
        let distinct: HashSet<&str> = topics.all().into_iter().collect();
        if distinct.len() != 3 {
            return Err(invalid(
                "topics",
                "the three topic names must differ".into(),
            ));
        }

        let kafka = raw.kafka.filter(|k| !k.brokers.trim().is_empty());
        let sink = match kafka {
            Some(kafka) => {
                let message_timeout = kafka.message_timeout.unwrap_or(DEFAULT_MESSAGE_TIMEOUT);
                if message_timeout < Duration::from_millis(1) {
                    return Err(invalid("kafka.message-timeout", "must be positive".into()));
                }
                let max_in_flight = kafka.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
                if max_in_flight == 0 {
                    return Err(invalid("kafka.max-in-flight", "must be at least 1".into()));
                }
                let mut properties = Vec::with_capacity(kafka.properties.len());
                for (name, value) in &kafka.properties {
                    let key = format!("kafka.properties.{name}");
                    if KAFKA_RESERVED_KEYS.contains(&name.as_str()) {
                        return Err(invalid(
                            &key,
                            "is set by the aggregator (the exactly-once write relies on it)".into(),
                        ));
                    }
                    let text = match value {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(n) => n.to_string(),
                        toml::Value::Float(x) => x.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        _ => {
                            return Err(invalid(&key, "must be a string, number or boolean".into()))
                        }
                    };
                    properties.push((name.clone(), text));
                }
                if let Some(password) = env(KAFKA_SASL_PASSWORD_ENV) {
                    properties.retain(|(k, _)| k != "sasl.password");
                    properties.push(("sasl.password".into(), password));
                }
                let client = kafka
                    .client_id
                    .unwrap_or_else(|| "millrace-aggregator".into());
                // librdkafka checks every name and value: a typo fails here,
                // at check-config, not at the first write.
                let mut probe = rdkafka::ClientConfig::new();
                probe.set("bootstrap.servers", kafka.brokers.trim());
                for (k, v) in &properties {
                    probe.set(k, v);
                }
                if let Err(e) = probe.create::<rdkafka::producer::BaseProducer>() {
                    return Err(invalid("kafka.properties", e.to_string()));
                }
                SinkConfig::Kafka(KafkaConfig {
                    brokers: kafka.brokers.trim().to_owned(),
                    message_timeout,
                    max_in_flight,
                    client_id: client,
                    properties,
                })
            }
            None => {
                let segment = raw.log.segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE);
                if segment.0 < 4096 {
                    return Err(invalid("log.segment-size", "must be at least 4KiB".into()));
                }
                let max_age = match raw.log.retention_age.as_deref().map(str::trim) {
                    None => Some(DEFAULT_RETENTION_AGE),
                    Some("forever") => None,
                    Some(text) => match humantime_serde::re::humantime::parse_duration(text) {
                        Ok(age) if !age.is_zero() => Some(age),
                        Ok(_) => {
                            return Err(invalid(
                                "log.retention-age",
                                "must be above zero, or \"forever\"".into(),
                            ))
                        }
                        Err(e) => {
                            return Err(invalid(
                                "log.retention-age",
                                format!(
                                "{e}: write a duration such as \"7d\" or \"12h\", or \"forever\""
                            ),
                            ))
                        }
                    },
                };
                let max_bytes = raw.log.retention_size.map(|b| b.0);
                if max_bytes.is_some_and(|b| b < segment.0) {
                    return Err(invalid(
                        "log.retention-size",
                        "must be at least log.segment-size (a topic always keeps its active segment)"
                            .into(),
                    ));
                }
                SinkConfig::Local(LocalLogConfig {
                    dir: raw.log.dir.unwrap_or_else(|| data_dir.join("log")),
                    segment_bytes: segment.0,
                    retention: crate::log::local::Retention { max_age, max_bytes },
                })
            }
        };

        let cluster = raw
            .cluster
            .map(|c| c.check(matches!(sink, SinkConfig::Kafka(_))))
            .transpose()
            .map_err(|(key, message)| invalid(&key, message))?;
        let dashboard = crate::dashboard::config::DashboardConfig::from_raw(raw.dashboard, &env)
            .map_err(|(key, message)| invalid(&key, message))?;
        if dashboard.enabled && dashboard.auth.is_open() && !listen.ip().is_loopback() {
            return Err(invalid(
                "dashboard",
                format!(
                    "the dashboard, its API and /metrics would be open to anyone who can reach \
                     {listen}: set [dashboard] token (or MILLRACE_DASHBOARD_TOKEN) or \
                     username/password, listen on loopback, or set [dashboard] enabled = false"
                ),
            ));
        }

        Ok(Config {
            listen,
            data_dir,
            max_body_bytes,
            max_concurrent_batches,
            retry_after,
            shutdown_grace,
            max_batch_records,
            max_name_bytes,
            body_timeout,
            agent_rate_limit,
            tls: raw.tls,
            agents,
            topics,
            sink,
            dashboard,
            cluster,
        })
    }
}

/// Kafka's own rule, which the embedded log also uses for directory names.
pub fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agg.toml"), text, |_| None)
    }

    const MINIMAL: &str = r#"
data-dir = "/tmp/x"
[[agents]]
id = "gw-1"
token = "0123456789abcdef"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_embedded_log() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8480".parse().unwrap());
        assert_eq!(cfg.max_body_bytes, 8 << 20);
        assert_eq!(cfg.topics, Topics::default());
        match cfg.sink {
            SinkConfig::Local(l) => {
                assert_eq!(l.dir, PathBuf::from("/tmp/x/log"));
                assert_eq!(l.retention.max_age, Some(DEFAULT_RETENTION_AGE));
                assert_eq!(l.retention.max_bytes, None);
            }
            other => panic!("expected the embedded log, got {other:?}"),
        }
    }

    #[test]
    fn embedded_log_retention_parses_and_is_checked() {
        let local = |log: &str| match parse(&format!("{MINIMAL}[log]\n{log}")) {
            Ok(Config {
                sink: SinkConfig::Local(l),
                ..
            }) => Ok(l.retention),
            Ok(_) => panic!("expected the embedded log"),
            Err(e) => Err(e.to_string()),
        };
        let r = local("retention-age = \"12h\"\nretention-size = \"1GiB\"\n").unwrap();
        assert_eq!(r.max_age, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(r.max_bytes, Some(1 << 30));
        assert_eq!(
            local("retention-age = \"forever\"\n").unwrap().max_age,
            None
        );
        for (bad, key) in [
            ("retention-age = \"0s\"", "log.retention-age"),
            ("retention-age = \"soon\"", "log.retention-age"),
            ("retention-size = \"1MiB\"", "log.retention-size"),
        ] {
            let err = local(bad).unwrap_err();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_and_durations_parse() {
        let text = "max-body = \"512KiB\"\ndata-dir = \"/d\"\n\
                    [kafka]\nbrokers = \"k:9092\"\nmessage-timeout = \"3s\"\n";
        let cfg = parse(text).unwrap();
        assert_eq!(cfg.max_body_bytes, 512 << 10);
        match cfg.sink {
            SinkConfig::Kafka(k) => assert_eq!(k.message_timeout, Duration::from_secs(3)),
            other => panic!("expected kafka, got {other:?}"),
        }
        assert_eq!(ByteSize::parse("8 MiB"), Ok(ByteSize(8 << 20)));
        assert_eq!(ByteSize::parse("100kB"), Ok(ByteSize(100_000)));
        assert!(ByteSize::parse("8 parsecs").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let err = parse(&format!("bogus = 1\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agg.toml:"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let err = parse(&MINIMAL.replace("gw-1", "gw 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[0].id"), "{err}");
        let err = parse(&MINIMAL.replace("0123456789abcdef", "short"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[0].token"), "{err}");
        let err = parse(&format!("listen = \"nowhere\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `listen`"), "{err}");
    }

    #[test]
    fn token_comes_from_the_environment() {
        let text = "data-dir = \"/d\"\n[[agents]]\nid = \"gw-press.1\"\n";
        let cfg = Config::parse(Path::new("a.toml"), text, |name| {
            (name == "MILLRACE_TOKEN_GW_PRESS_1").then(|| "from-the-environment".to_owned())
        })
        .unwrap();
        assert!(cfg.agents[0].accepts("from-the-environment"));
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("MILLRACE_TOKEN_GW_PRESS_1"), "{err}");
        assert!(!format!("{:?}", cfg.agents).contains("from-the-environment"));
    }

    #[test]
    fn tokens_come_from_files_and_the_placeholder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw-1.token");
        std::fs::write(&file, "token-from-a-file-0123456789\n").unwrap();
        let text = format!(
            "data-dir = \"/tmp/x\"\n[[agents]]\nid = \"gw-1\"\ntoken-file = \"{}\"\n",
            file.display()
        );
        assert!(parse(&text).unwrap().agents[0].accepts("token-from-a-file-0123456789"));
        let missing = text.replace("gw-1.token", "nope.token");
        assert!(parse(&missing)
            .unwrap_err()
            .to_string()
            .contains("agents[0].token-file"));
        let placeholder = MINIMAL.replace("0123456789abcdef", "demo-token-change-me-0123456789");
        let err = parse(&placeholder).unwrap_err().to_string();
        assert!(err.contains("placeholder"), "{err}");
    }

    #[test]
    fn the_checked_config_debug_output_holds_no_secret() {
        let text = r#"
listen = "0.0.0.0:8480"
data-dir = "/tmp/x"
[[agents]]
id = "gw-1"
token = "agent-secret-token-0123"
[dashboard]
token = "dashboard-secret-token"
username = "ops"
password = "dashboard-secret-password"
[kafka]
brokers = "127.0.0.1:9092"
[kafka.properties]
"sasl.username" = "millrace"
"sasl.password" = "kafka-secret-password"
"#;
        let cfg = parse(text).unwrap();
        for shown in [format!("{cfg:?}"), format!("{cfg:#?}")] {
            for secret in [
                "agent-secret-token-0123",
                "dashboard-secret-token",
                "dashboard-secret-password",
                "kafka-secret-password",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
    }

    #[test]
    fn kafka_properties_pass_through_checked_and_redacted() {
        let text = format!(
            "{MINIMAL}\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n[kafka.properties]\n\
             \"linger.ms\" = 20\n\"sasl.username\" = \"millrace\"\n\"sasl.password\" = \"kafka-secret-xyz\"\n"
        );
        let cfg = parse(&text).unwrap();
        let SinkConfig::Kafka(kafka) = &cfg.sink else {
            panic!("kafka expected")
        };
        assert!(kafka
            .properties
            .contains(&("linger.ms".into(), "20".into())));
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("kafka-secret-xyz") && shown.contains("sasl.username"),
            "{shown}"
        );
        let reserved = text.replace("\"linger.ms\" = 20", "\"enable.idempotence\" = false");
        let err = parse(&reserved).unwrap_err().to_string();
        assert!(err.contains("kafka.properties.enable.idempotence"), "{err}");
        // TLS and SASL are built in.
        let secured = text.replace(
            "\"linger.ms\" = 20",
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"",
        );
        assert!(parse(&secured).is_ok(), "{:?}", parse(&secured).err());
        let typo = text.replace("\"linger.ms\" = 20", "\"linger.msx\" = 20");
        let err = parse(&typo).unwrap_err().to_string();
        assert!(
            err.contains("kafka.properties") && err.contains("linger.msx"),
            "{err}"
        );
    }

    #[test]
    fn an_open_dashboard_beyond_loopback_is_refused() {
        let open = MINIMAL.replace("data-dir", "listen = \"0.0.0.0:8480\"\ndata-dir");
        let err = parse(&open).unwrap_err().to_string();
        assert!(err.contains("dashboard") && err.contains("token"), "{err}");
        let closed = format!("{open}\n[dashboard]\ntoken = \"a-long-read-only-token\"\n");
        assert!(parse(&closed).is_ok());
        let off = format!("{open}\n[dashboard]\nenabled = false\n");
        assert!(parse(&off).is_ok());
        assert!(parse(MINIMAL).is_ok(), "loopback may stay open");
    }

    #[test]
    fn a_cluster_needs_kafka_and_a_base_url() {
        let kafka = "[kafka]\nbrokers = \"k:9092\"\n";
        let cluster = |table: &str, with_kafka: bool| {
            let text = format!(
                "{MINIMAL}{}[cluster]\n{table}",
                if with_kafka { kafka } else { "" }
            );
            parse(&text)
        };
        let cfg = cluster("advertise-url = \"https://agg-1.plant:8480/\"\n", true).unwrap();
        assert_eq!(
            cfg.cluster,
            Some(ClusterConfig {
                advertise_url: "https://agg-1.plant:8480".into(),
                control_topic: DEFAULT_CONTROL_TOPIC.into(),
                group: DEFAULT_CLUSTER_GROUP.into(),
            })
        );
        for (table, with_kafka, key) in [
            ("advertise-url = \"https://a:1\"\n", false, "cluster"),
            ("", true, "cluster.advertise-url"),
            (
                "advertise-url = \"agg-1:8480\"\n",
                true,
                "cluster.advertise-url",
            ),
            (
                "advertise-url = \"https://a:1/api\"\n",
                true,
                "cluster.advertise-url",
            ),
            (
                "advertise-url = \"https://a:1\"\ncontrol-topic = \"a b\"\n",
                true,
                "cluster.control-topic",
            ),
            (
                "advertise-url = \"https://a:1\"\ngroup = \" \"\n",
                true,
                "cluster.group",
            ),
        ] {
            let e = cluster(table, with_kafka).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{key}`")) || e.contains(key),
                "{table}: {e}"
            );
        }
    }

    #[test]
    fn shipped_examples_are_valid() {
        let env = |name: &str| Some(format!("token-from-the-environment-{name}"));
        for (name, text) in [
            (
                "aggregator.toml",
                include_str!("../../config/aggregator.toml"),
            ),
            (
                "aggregator-kafka.toml",
                include_str!("../../config/aggregator-kafka.toml"),
            ),
            (
                "aggregator-cluster.toml",
                include_str!("../../config/aggregator-cluster.toml"),
            ),
        ] {
            if let Err(e) = Config::parse(Path::new(name), text, env) {
                panic!("{e}");
            }
        }
    }
}
