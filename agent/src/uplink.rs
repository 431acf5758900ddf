//! The uplink: sends the outbox to the aggregator and deletes what it
//! acknowledged.
//!
//! What it does, in order of precedence on every round:
//! 1. **alerts** (the priority lane), oldest first, as soon as they exist;
//! 2. **live** records (bulk lane, appended since the agent started or the
//!    uplink last recovered from an outage), oldest first;
//! 3. **backlog** (bulk lane, older than that), oldest first, at most
//!    `replay-rate` records per second, so a long outage drains without
//!    starving live data or flooding the aggregator. The rate is spent in
//!    whole batches (`batch-records`, or one second's worth if less): a
//!    batch waits for its tokens instead of a request per record as they
//!    trickle in.
//!
//! Each batch is a [`Batch`] in the binary encoding, gzip-compressed, POSTed
//! to `{url}/api/v1/ingest` with the agent's bearer token. The aggregator
//! answers 200 only after its log acknowledged every record; only then are
//! the records deleted from the outbox. Batches carry the outbox floor, so the
//! aggregator can forget the dedup state below it, and the agent's status
//! ([`AgentStatus`]: outbox depth and oldest age, records dropped, uplink
//! retries), so the fleet view shows how far behind each gateway is.
//!
//! Answers and what the uplink does:
//! - `200`: ack the batch's seqs.
//! - `400` (scope `record`, or no scope from an older aggregator) / `413`: a
//!   record of the batch is at fault. The batch is split in halves to isolate
//!   it; a single record still refused is deleted, counted
//!   (`millrace_uplink_rejected_records_total`) and logged with the
//!   aggregator's reason — never retried forever.
//! - `415` / `422` / `426`, or any answer with scope `batch`: the aggregator
//!   cannot read the batch at all (a proxy mangling bodies, an agent newer
//!   than its aggregator). That says nothing about the records: they are
//!   kept and the batch is retried with backoff, counted
//!   (`millrace_uplink_kept_batches_total`) and logged as an error, until
//!   the aggregator (or the path to it) is fixed.
//! - `401`: token refused: retried with backoff (an operator must fix the
//!   config; the outbox keeps everything meanwhile), logged as an error.
//! - anything else (503, 5xx, timeouts, refused connections): retried with
//!   exponential backoff and full jitter, honouring `Retry-After`.
//!
//! What it is not: it never reorders records within a lane and never holds
//! more than one batch in flight.

use crate::store::{blocking, Lane, Store, StoreError};
use millrace_protocol::{AgentStatus, Batch, Envelope};
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const INGEST_PATH: &str = "/api/v1/ingest";

/// Environment variable that overrides `uplink.token`.
pub const TOKEN_ENV: &str = "MILLRACE_UPLINK_TOKEN";

/// `[uplink]`: where and how the outbox is sent. `Debug` never shows the token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UplinkConfig {
    /// Base URL of the aggregator, e.g. `https://aggregator.plant:8480`, or
    /// a list of them (the aggregators of a cluster): the uplink sends to
    /// one, moves on to the next when it is down, and follows an
    /// aggregator's redirect to another one of the list (never beyond it:
    /// the token goes only where it is configured to go). `http://` only to
    /// a loopback address, unless `allow-insecure`.
    pub url: Urls,
    /// Allows `http://` to a host that is not loopback: the token and every
    /// record then cross the network in clear text. Logged at start.
    #[serde(default)]
    pub allow_insecure: bool,
    /// Bearer token of this agent. `MILLRACE_UPLINK_TOKEN` in the environment
    /// wins, then `token-file`.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (its first line), e.g. the systemd credential
    /// `/run/credentials/millrace-agent.service/uplink-token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for `https` URLs.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, leaf first) for mutual TLS with the
    /// aggregator; goes with `client-key-file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Records per batch.
    #[serde(default = "defaults::batch_records")]
    pub batch_records: usize,
    /// Stored bytes per batch (before compression).
    #[serde(default = "defaults::batch_bytes")]
    pub batch_bytes: bytesize::ByteSize,
    /// Deadline of one POST, connection included.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First retry delay; doubles on each failure up to `backoff-max`.
    #[serde(default = "defaults::backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Backlog records per second sent after an outage (live data and alerts
    /// are not limited).
    #[serde(default = "defaults::replay_rate")]
    pub replay_rate: u32,
    /// How often an idle uplink looks at the outbox (it is also woken on append).
    #[serde(default = "defaults::idle_poll", with = "humantime_serde")]
    pub idle_poll: Duration,
    /// At shutdown, after the open windows were flushed into the outbox, how
    /// long the uplink may go on sending what is there (backlog unthrottled)
    /// before the agent exits. It stops early when the outbox is empty or a
    /// send fails; what is left goes out after the next start. `0s`: none.
    #[serde(default = "defaults::shutdown_drain", with = "humantime_serde")]
    pub shutdown_drain: Duration,
}

/// One aggregator URL, or several: `url = "https://a:8480"` or
/// `url = ["https://a:8480", "https://b:8480"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls(Vec<String>);

impl Urls {
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// The first URL (where the uplink starts).
    pub fn first(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }
}

impl std::fmt::Display for Urls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for Urls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Repr::deserialize(d)? {
            Repr::One(url) => Urls(vec![url]),
            Repr::Many(urls) => Urls(urls),
        })
    }
}

/// The defaults of `[uplink]`, in one place.
pub mod defaults {
    use std::time::Duration;
    pub fn batch_records() -> usize {
        500
    }
    pub fn batch_bytes() -> bytesize::ByteSize {
        bytesize::ByteSize::kib(512)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn backoff_min() -> Duration {
        Duration::from_millis(200)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn replay_rate() -> u32 {
        2000
    }
    pub fn idle_poll() -> Duration {
        Duration::from_millis(500)
    }
    /// Well inside systemd's `TimeoutStopSec=30s` of the unit.
    pub fn shutdown_drain() -> Duration {
        Duration::from_secs(5)
    }
}

impl UplinkConfig {
    pub fn apply_env_overrides(&mut self) {
        if let Ok(token) = std::env::var(TOKEN_ENV) {
            self.token = Some(token);
        }
    }

    /// Takes the token from `token-file` unless the environment gave one;
    /// warns when the file is readable by its group or others.
    pub fn load_secret_files(&mut self) -> Result<(), String> {
        if std::env::var_os(TOKEN_ENV).is_some() {
            return Ok(());
        }
        if let Some(path) = &self.token_file {
            let file = millrace_protocol::secret::read_secret_file(path)
                .map_err(|e| format!("uplink.token-file: {e}"))?;
            if let Some(warning) = &file.loose_permissions {
                tracing::warn!("uplink.token-file: {warning}");
            }
            self.token = Some(file.value);
        }
        Ok(())
    }

    /// Whether the URL sends in clear text beyond this host.
    pub fn is_insecure(&self) -> bool {
        self.url.iter().any(|url| {
            reqwest::Url::parse(url).is_ok_and(|u| u.scheme() == "http" && !is_loopback_host(&u))
        })
    }

    /// Checks every key; the error is `(key, reason)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: &str| Err((format!("uplink.{k}"), r.to_string()));
        if self.url.0.is_empty() {
            return bad("url", "needs at least one aggregator URL");
        }
        let mut origins = std::collections::HashSet::new();
        for url in self.url.iter() {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {
                    if !origins.insert(u.origin()) {
                        return bad("url", &format!("{url} is listed twice"));
                    }
                }
                Ok(_) => return bad("url", &format!("{url} must be an http:// or https:// URL")),
                Err(e) => return bad("url", &format!("{url} is not a URL: {e}")),
            }
        }
        if self.is_insecure() && !self.allow_insecure {
            return bad(
                "url",
                "http:// to a host that is not loopback sends the token and every record in \
                 clear text: use https://, or set allow-insecure = true to accept that",
            );
        }
        if self.batch_records == 0 {
            return bad("batch-records", "must be at least 1");
        }
        if self.batch_bytes.as_u64() < 1024 {
            return bad("batch-bytes", "must be at least 1KiB");
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return bad("backoff-min", "must be > 0 and ≤ backoff-max");
        }
        if self.replay_rate == 0 {
            return bad("replay-rate", "must be at least 1 record/s");
        }
        if self.request_timeout.is_zero() {
            return bad("request-timeout", "must be > 0");
        }
        if let Some(ca) = &self.ca_file {
            if !ca.exists() {
                return bad("ca-file", &format!("{} does not exist", ca.display()));
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return bad(
                    "client-cert-file",
                    "client-cert-file and client-key-file go together",
                )
            }
            (Some(cert), Some(key)) => {
                for (k, path) in [("client-cert-file", cert), ("client-key-file", key)] {
                    if !path.exists() {
                        return bad(k, &format!("{} does not exist", path.display()));
                    }
                }
            }
            (None, None) => {}
        }
        Ok(())
    }
}

impl std::fmt::Debug for UplinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkConfig")
            .field("url", &self.url)
            .field("allow_insecure", &self.allow_insecure)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("batch_records", &self.batch_records)
            .field("batch_bytes", &self.batch_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("replay_rate", &self.replay_rate)
            .field("idle_poll", &self.idle_poll)
            .field("shutdown_drain", &self.shutdown_drain)
            .finish()
    }
}

/// `localhost`, 127.0.0.0/8 or `::1`.
fn is_loopback_host(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// Why the uplink could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    #[error("cannot read the certificate or key file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// How one POST ended.
#[derive(Debug)]
enum SendOutcome {
    Committed,
    /// A record of this batch will never be accepted as it is (400, 413).
    Refused {
        status: u16,
        reason: String,
    },
    /// The aggregator cannot read this batch at all; the records are fine
    /// and stay (415, 422, 426, or scope `batch`).
    Kept {
        status: u16,
        reason: String,
    },
    /// Try again later.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    /// `batch` or `record` (absent from older aggregators).
    #[serde(default)]
    scope: Option<String>,
}

/// The uplink task.
#[derive(Debug)]
pub struct Uplink {
    cfg: UplinkConfig,
    agent: String,
    store: Arc<Store>,
    client: reqwest::Client,
    /// `{url}/api/v1/ingest` of every configured aggregator.
    endpoints: Vec<String>,
    /// The one sent to now.
    current: AtomicUsize,
    wake: Arc<Notify>,
    started: Instant,
    /// Failed sends since start, and in a row: reported in each batch's status.
    retries_total: AtomicU64,
    failures: AtomicU32,
}

impl Uplink {
    pub fn new(
        cfg: UplinkConfig,
        agent: String,
        store: Arc<Store>,
        wake: Arc<Notify>,
    ) -> Result<Self, UplinkError> {
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("millrace-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|source| UplinkError::CaFile {
                path: path.clone(),
                source,
            })?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        if let (Some(cert), Some(key)) = (&cfg.client_cert_file, &cfg.client_key_file) {
            let mut pem = Vec::new();
            for path in [cert, key] {
                let bytes = std::fs::read(path).map_err(|source| UplinkError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                pem.extend_from_slice(&bytes);
                pem.push(b'\n');
            }
            builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
        }
        if cfg.token.is_none() {
            tracing::warn!("uplink has no token (token, token-file or MILLRACE_UPLINK_TOKEN): the aggregator will answer 401");
        }
        if cfg.is_insecure() {
            tracing::warn!(url = %cfg.url, "uplink over plain http to a host that is not loopback (allow-insecure = true): the token and every record cross the network unencrypted");
        }
        let endpoints = cfg
            .url
            .iter()
            .map(|url| format!("{}{INGEST_PATH}", url.trim_end_matches('/')))
            .collect();
        // Redirects are followed by hand, to configured aggregators only
        // (reqwest would drop the token on a redirect to another port).
        builder = builder.redirect(reqwest::redirect::Policy::none());
        Ok(Self {
            client: builder.build()?,
            cfg,
            agent,
            store,
            endpoints,
            current: AtomicUsize::new(0),
            wake,
            started: Instant::now(),
            retries_total: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        })
    }

    /// Runs until `shutdown`, then drains the outbox for at most
    /// `shutdown-drain` (see [`Uplink::drain`]); cancel `shutdown` once the
    /// pipeline has flushed its windows into the outbox. Whatever is not
    /// acknowledged by then stays in the outbox and is sent after the next
    /// start.
    pub async fn run(self, shutdown: CancellationToken) {
        self.send_until(&shutdown).await;
        self.drain(self.cfg.shutdown_drain).await;
    }

    /// The uplink's life until `shutdown`.
    async fn send_until(&self, shutdown: &CancellationToken) {
        let mut failures: u32 = 0;
        // Bulk records with seq ≥ live_from are live; older ones are backlog,
        // and 0 means there is no backlog. What the outbox held at start is
        // backlog: after a long outage that spanned a restart it must not
        // crowd out live data either.
        let mut live_from: u64 = self.next_seq().await.unwrap_or(0);
        let mut bucket = TokenBucket::new(self.cfg.replay_rate);
        let batch_bytes = self.cfg.batch_bytes.as_u64();
        // Jitter only needs to differ between gateways, not to be secret.
        let mut rng = rand::rngs::SmallRng::seed_from_u64(
            u64::from(std::process::id()) ^ crate::ingest::now_ms() as u64,
        );
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            self.failures.store(failures, Ordering::Relaxed);
            let round = self.round(&mut live_from, &mut bucket, batch_bytes).await;
            let pause = match round {
                Ok(Progress::Sent) => {
                    if failures > 0 {
                        tracing::info!(after_failures = failures, "uplink recovered");
                        // Whatever is in the outbox now is backlog; what comes next is live.
                        live_from = self.next_seq().await.unwrap_or(live_from);
                    }
                    failures = 0;
                    continue;
                }
                Ok(Progress::Idle) => {
                    failures = 0;
                    self.cfg.idle_poll
                }
                Ok(Progress::Throttled(wait)) => wait,
                Err(RoundError::Retry {
                    reason,
                    retry_after,
                }) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        // Nothing is live until the uplink recovers: what
                        // piles up meanwhile drains at `replay-rate` after.
                        live_from = u64::MAX;
                    }
                    self.retries_total.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("millrace_uplink_retries_total").increment(1);
                    let backoff = backoff_delay(
                        self.cfg.backoff_min,
                        self.cfg.backoff_max,
                        failures,
                        &mut rng,
                    );
                    let wait = retry_after.map_or(backoff, |r| r.max(backoff));
                    tracing::warn!(%reason, failures, retry_in_ms = wait.as_millis() as u64, "uplink send failed; will retry");
                    wait
                }
                Err(RoundError::Store(e)) => {
                    tracing::error!(error = %e, "uplink cannot read the outbox");
                    self.cfg.backoff_max
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends what the outbox holds, alerts first, everything else as live
    /// (no backlog throttle), until it is empty, a send fails, or `budget`
    /// is spent (a POST in flight at the deadline is abandoned; its records
    /// stay in the outbox). Returns the batches acknowledged.
    pub async fn drain(&self, budget: Duration) -> u64 {
        if budget.is_zero() {
            return 0;
        }
        let deadline = tokio::time::Instant::now() + budget;
        let batch_bytes = self.cfg.batch_bytes.as_u64();
        // `live_from` 0: every bulk record is live, so the bucket is unused.
        let (mut live_from, mut bucket) = (0, TokenBucket::new(self.cfg.replay_rate));
        let mut sent = 0u64;
        let outcome = loop {
            let step = self.round(&mut live_from, &mut bucket, batch_bytes);
            match tokio::time::timeout_at(deadline, step).await {
                Ok(Ok(Progress::Idle | Progress::Throttled(_))) => break "outbox empty",
                Ok(Ok(Progress::Sent)) => sent += 1,
                Ok(Err(RoundError::Retry { reason, .. })) => {
                    tracing::warn!(%reason, "shutdown drain: send failed; the rest waits for the next start");
                    break "send failed";
                }
                Ok(Err(RoundError::Store(error))) => {
                    tracing::error!(%error, "shutdown drain: cannot read the outbox");
                    break "store error";
                }
                Err(_) => break "deadline",
            }
        };
        tracing::info!(batches = sent, stopped = outcome, "uplink stopped");
        sent
    }

    async fn next_seq(&self) -> Result<u64, StoreError> {
        let store = self.store.clone();
        blocking(move || Ok(store.outbox().stats()?.next_seq)).await
    }

    /// One step: the oldest sendable batch, by lane precedence.
    async fn round(
        &self,
        live_from: &mut u64,
        bucket: &mut TokenBucket,
        batch_bytes: u64,
    ) -> Result<Progress, RoundError> {
        let max = self.cfg.batch_records;
        let alerts = self.peek(Lane::Priority, 0, max, batch_bytes).await?;
        if !alerts.is_empty() {
            self.deliver(alerts).await?;
            return Ok(Progress::Sent);
        }
        let live = self.peek(Lane::Bulk, *live_from, max, batch_bytes).await?;
        if !live.is_empty() {
            self.deliver(live).await?;
            return Ok(Progress::Sent);
        }
        if *live_from == 0 {
            return Ok(Progress::Idle);
        }
        // Backlog, rate limited, in whole batches: a batch waits until its
        // tokens are there (rather than one record per round as tokens
        // trickle in, each its own request).
        let allowed = bucket.take_batch(max);
        if allowed == 0 {
            return Ok(Progress::Throttled(bucket.wait_for_batch(max)));
        }
        let mut backlog = self.peek(Lane::Bulk, 0, allowed, batch_bytes).await?;
        backlog.retain(|e| e.seq < *live_from);
        if backlog.is_empty() {
            // Caught up: everything pending is live again.
            *live_from = 0;
            return Ok(Progress::Idle);
        }
        self.deliver(backlog).await?;
        Ok(Progress::Sent)
    }

    async fn peek(
        &self,
        lane: Lane,
        from: u64,
        max: usize,
        bytes: u64,
    ) -> Result<Vec<Envelope>, RoundError> {
        let store = self.store.clone();
        blocking(move || store.outbox().peek_from(lane, from, max, bytes))
            .await
            .map_err(RoundError::Store)
    }

    /// Sends `records`, splitting batches the aggregator refuses until the
    /// record at fault is isolated; acks what was committed or refused for good.
    async fn deliver(&self, records: Vec<Envelope>) -> Result<(), RoundError> {
        let mut stack = vec![records];
        while let Some(part) = stack.pop() {
            let (floor, status) = self.floor_and_status().await?;
            let seqs: Vec<u64> = part.iter().map(|e| e.seq).collect();
            let n = part.len();
            let started = Instant::now();
            match self.post(part.clone(), floor, status).await {
                SendOutcome::Committed => {
                    metrics::counter!("millrace_uplink_batches_total", "outcome" => "committed")
                        .increment(1);
                    metrics::counter!("millrace_uplink_records_total").increment(n as u64);
                    metrics::histogram!("millrace_uplink_request_seconds")
                        .record(started.elapsed().as_secs_f64());
                    self.ack(seqs).await?;
                }
                SendOutcome::Refused { status, reason } if n > 1 => {
                    tracing::warn!(status, %reason, records = n, "batch refused; splitting it to find the record at fault");
                    let mut part = part;
                    let second = part.split_off(n / 2);
                    stack.push(second);
                    stack.push(part);
                }
                SendOutcome::Refused { status, reason } => {
                    metrics::counter!("millrace_uplink_batches_total", "outcome" => "refused")
                        .increment(1);
                    metrics::counter!("millrace_uplink_rejected_records_total").increment(1);
                    tracing::error!(status, %reason, seq = seqs[0], "aggregator refused a record for good; it is deleted from the outbox");
                    self.ack(seqs).await?;
                }
                SendOutcome::Kept { status, reason } => {
                    metrics::counter!("millrace_uplink_batches_total", "outcome" => "kept")
                        .increment(1);
                    metrics::counter!("millrace_uplink_kept_batches_total").increment(1);
                    tracing::error!(
                        status,
                        %reason,
                        records = n,
                        "the aggregator cannot read this batch (not a fault of its records): \
                         they stay in the outbox and the batch is retried; check the \
                         aggregator's version and anything between it and this agent"
                    );
                    return Err(RoundError::Retry {
                        reason: format!("batch refused as a whole ({status}): {reason}"),
                        retry_after: None,
                    });
                }
                SendOutcome::Retry {
                    reason,
                    retry_after,
                } => {
                    metrics::counter!("millrace_uplink_batches_total", "outcome" => "retry")
                        .increment(1);
                    return Err(RoundError::Retry {
                        reason,
                        retry_after,
                    });
                }
            }
        }
        Ok(())
    }

    async fn ack(&self, seqs: Vec<u64>) -> Result<(), RoundError> {
        let store = self.store.clone();
        blocking(move || store.outbox().ack(&seqs))
            .await
            .map(|_| ())
            .map_err(RoundError::Store)
    }

    /// The outbox floor for the next batch, and the status it reports.
    async fn floor_and_status(&self) -> Result<(u64, AgentStatus), RoundError> {
        let store = self.store.clone();
        let (floor, stats) = blocking(move || {
            let outbox = store.outbox();
            Ok((outbox.floor()?, outbox.stats()?))
        })
        .await
        .map_err(RoundError::Store)?;
        let oldest = [stats.priority.oldest_age, stats.bulk.oldest_age]
            .into_iter()
            .flatten()
            .max();
        let status = AgentStatus {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            outbox_records: stats.records(),
            outbox_bytes: stats.bytes(),
            outbox_max_bytes: stats.max_bytes,
            outbox_oldest_age_ms: oldest.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            outbox_dropped_total: [stats.priority, stats.bulk]
                .iter()
                .map(|l| l.dropped_full + l.expired)
                .sum(),
            uplink_retries_total: self.retries_total.load(Ordering::Relaxed),
            uplink_failures: self.failures.load(Ordering::Relaxed),
        };
        Ok((floor, status))
    }

    async fn post(&self, records: Vec<Envelope>, floor: u64, status: AgentStatus) -> SendOutcome {
        let mut batch = Batch::new(self.agent.clone(), records).with_status(status);
        batch.outbox_floor = floor.min(batch.outbox_floor);
        let body = match gzip(&batch.encode_binary()) {
            Ok(b) => b,
            Err(e) => {
                return SendOutcome::Retry {
                    reason: format!("compressing the batch: {e}"),
                    retry_after: None,
                }
            }
        };
        let body = bytes::Bytes::from(body);
        // Each configured aggregator at most once per call when they are
        // down, plus a few redirects between them.
        let mut tries = self.endpoints.len() + MAX_REDIRECTS;
        let resp = loop {
            tries -= 1;
            let at = self.current.load(Ordering::Relaxed) % self.endpoints.len();
            let endpoint = &self.endpoints[at];
            let mut req = self
                .client
                .post(endpoint)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-millrace-batch",
                )
                .header(reqwest::header::CONTENT_ENCODING, "gzip")
                .body(body.clone());
            if let Some(token) = &self.cfg.token {
                req = req.bearer_auth(token);
            }
            match req.send().await {
                Ok(r) if matches!(r.status().as_u16(), 307 | 308) => {
                    let location = r
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    match self.endpoint_of(&location) {
                        Some(next) if tries > 0 => {
                            tracing::debug!(from = %endpoint, to = %self.endpoints[next], "aggregator redirected this agent");
                            self.current.store(next, Ordering::Relaxed);
                        }
                        Some(_) => {
                            return SendOutcome::Retry {
                                reason: format!("redirected once too often (last to {location})"),
                                retry_after: None,
                            }
                        }
                        None => {
                            tracing::error!(from = %endpoint, %location, "aggregator redirected this agent to a URL that is not in uplink.url; not followed (the token goes only to configured aggregators)");
                            return SendOutcome::Retry {
                                reason: format!(
                                    "redirect to {location}, which uplink.url does not list"
                                ),
                                retry_after: None,
                            };
                        }
                    }
                }
                Ok(r) => {
                    if matches!(r.status().as_u16(), 502..=504) {
                        // Retried later, at the next aggregator.
                        self.fail_over(at);
                    }
                    break r;
                }
                Err(e) => {
                    self.fail_over(at);
                    if tries == 0 || self.endpoints.len() == 1 {
                        return SendOutcome::Retry {
                            reason: format!("request failed: {e}"),
                            retry_after: None,
                        };
                    }
                    tracing::warn!(aggregator = %endpoint, error = %e, "aggregator unreachable; trying the next one");
                }
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).ok();
        let batch_scope = body
            .as_ref()
            .and_then(|b| b.scope.as_deref())
            .is_some_and(|s| s == "batch");
        let reason = body
            .map(|b| b.error)
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| text.chars().take(200).collect());
        match status {
            200..=299 => SendOutcome::Committed,
            415 | 422 | 426 => SendOutcome::Kept { status, reason },
            400 | 413 if batch_scope => SendOutcome::Kept { status, reason },
            400 | 413 => SendOutcome::Refused { status, reason },
            401 | 403 => {
                tracing::error!(status, %reason, "aggregator refused this agent's token: check uplink.token and the aggregator's [[agents]]");
                SendOutcome::Retry {
                    reason: format!("unauthorized ({status})"),
                    retry_after: None,
                }
            }
            _ => SendOutcome::Retry {
                reason: format!("HTTP {status}: {reason}"),
                retry_after,
            },
        }
    }
}

/// Redirects followed in one send, beyond one try per aggregator.
const MAX_REDIRECTS: usize = 3;

impl Uplink {
    /// The index of the configured aggregator `location` points at.
    fn endpoint_of(&self, location: &str) -> Option<usize> {
        let target = reqwest::Url::parse(location).ok()?.origin();
        self.endpoints
            .iter()
            .position(|e| reqwest::Url::parse(e).is_ok_and(|u| u.origin() == target))
    }

    /// Moves on from aggregator `at` (unless another send already did).
    fn fail_over(&self, at: usize) {
        if self.endpoints.len() > 1 {
            let next = (at + 1) % self.endpoints.len();
            if self
                .current
                .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::info!(to = %self.endpoints[next], "uplink fails over to the next aggregator");
            }
        }
    }
}

#[derive(Debug)]
enum Progress {
    Sent,
    Idle,
    Throttled(Duration),
}

#[derive(Debug)]
enum RoundError {
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Store(StoreError),
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 3),
        flate2::Compression::fast(),
    );
    enc.write_all(bytes)?;
    enc.finish()
}

/// Exponential backoff with full jitter: uniform in `[min/2, min(max, min·2^(n−1))]`.
fn backoff_delay(min: Duration, max: Duration, failures: u32, rng: &mut impl Rng) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = min.saturating_mul(1u32 << exp).min(max);
    let floor = (min / 2).min(ceiling);
    let span = ceiling.saturating_sub(floor).as_millis() as u64;
    floor + Duration::from_millis(rng.random_range(0..=span))
}

/// A token bucket of `rate` records per second, holding at most one second.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
    }

    /// The tokens a batch of `want` records takes: `want`, but at most
    /// what the bucket holds (one second's worth) and at least one.
    fn batch(&self, want: usize) -> usize {
        want.min(self.rate as usize).max(1)
    }

    /// Takes the tokens of a batch of `want` records if they are all there
    /// (returns how many), else none (returns 0).
    fn take_batch(&mut self, want: usize) -> usize {
        self.refill();
        let n = self.batch(want);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            n
        } else {
            0
        }
    }

    /// How long until a batch of `want` records can be taken.
    fn wait_for_batch(&self, want: usize) -> Duration {
        let missing = self.batch(want) as f64 - self.tokens;
        Duration::from_secs_f64((missing / self.rate).max(0.001))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(30));
        for failures in 1..40 {
            let d = backoff_delay(min, max, failures, &mut rng);
            assert!(d >= min / 2, "{d:?}");
            assert!(d <= max, "{d:?}");
        }
        let first: Vec<_> = (0..50)
            .map(|_| backoff_delay(min, max, 1, &mut rng))
            .collect();
        assert!(first.iter().all(|d| *d <= min));
        let tenth: Vec<_> = (0..50)
            .map(|_| backoff_delay(min, max, 10, &mut rng))
            .collect();
        assert!(tenth.iter().any(|d| *d > Duration::from_secs(5)), "grows");
        assert!(tenth.windows(2).any(|w| w[0] != w[1]), "jittered");
    }

    #[test]
    fn token_bucket_limits_to_rate_in_whole_batches() {
        // A bucket smaller than a batch: one second's worth at a time.
        let mut b = TokenBucket::new(100);
        assert_eq!(b.take_batch(500), 100);
        assert_eq!(b.take_batch(500), 0);
        let wait = b.wait_for_batch(500);
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // A bucket larger than a batch: whole batches, never a trickle.
        let mut b = TokenBucket::new(2000);
        assert_eq!(b.take_batch(500), 500);
        b.tokens = 10.0;
        assert_eq!(b.take_batch(500), 0, "10 tokens are not a batch of 500");
        let wait = b.wait_for_batch(500);
        assert!(
            wait > Duration::from_millis(200) && wait <= Duration::from_millis(246),
            "{wait:?}"
        );
        // A rate of one record a second still sends one at a time.
        let mut b = TokenBucket::new(1);
        assert_eq!(b.take_batch(500), 1);
        assert_eq!(b.take_batch(500), 0);
    }

    #[test]
    fn plain_http_beyond_loopback_needs_allow_insecure() {
        for url in [
            "http://127.0.0.1:8480",
            "http://127.3.0.1:8480",
            "http://localhost:8480",
            "http://[::1]:8480",
            "https://aggregator.plant:8480",
        ] {
            let cfg: UplinkConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
            assert!(cfg.validate().is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.5:8480",
            "http://aggregator.plant:8480",
            "http://[fd00::1]/",
        ] {
            let cfg: UplinkConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
            let (key, reason) = cfg.validate().unwrap_err();
            assert_eq!(key, "uplink.url", "{url}");
            assert!(reason.contains("allow-insecure"), "{reason}");
            let cfg: UplinkConfig =
                toml::from_str(&format!("url = \"{url}\"\nallow-insecure = true")).unwrap();
            assert!(cfg.validate().is_ok(), "{url}");
        }
    }

    #[test]
    fn the_token_comes_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uplink-token");
        std::fs::write(&path, "token-from-a-file-0123\n").unwrap();
        let mut cfg: UplinkConfig = toml::from_str(&format!(
            "url = \"http://127.0.0.1:1\"\ntoken-file = \"{}\"",
            path.display()
        ))
        .unwrap();
        if std::env::var_os(TOKEN_ENV).is_none() {
            cfg.load_secret_files().unwrap();
            assert_eq!(cfg.token.as_deref(), Some("token-from-a-file-0123"));
        }
        cfg.token_file = Some(dir.path().join("missing"));
        if std::env::var_os(TOKEN_ENV).is_none() {
            assert!(cfg
                .load_secret_files()
                .unwrap_err()
                .contains("uplink.token-file"));
        }
    }

    #[test]
    fn the_agent_config_debug_output_holds_no_secret() {
        let text = r#"
[agent]
id = "gw-1"
[mqtt]
host = "127.0.0.1"
client-id = "gw-1"
username = "plant"
password = "mqtt-secret-do-not-print"
[[mqtt.subscriptions]]
filter = "plant/+/+"
[broker]
enabled = true
[[broker.users]]
name = "press-1"
password-hash = "$argon2id$v=19$m=7168,t=5,p=1$c2FsdHNhbHRzYWx0$hash-secret-do-not-print"
[[broker.subscriptions]]
filter = "plant/+/+"
[uplink]
url = "http://127.0.0.1:8480"
token = "uplink-secret-do-not-print"
"#;
        let cfg = crate::config::AgentConfig::parse(text).unwrap();
        for shown in [format!("{cfg:?}"), format!("{cfg:#?}")] {
            assert!(!shown.contains("mqtt-secret-do-not-print"), "{shown}");
            assert!(!shown.contains("uplink-secret-do-not-print"), "{shown}");
            assert!(!shown.contains("hash-secret-do-not-print"), "{shown}");
            assert!(shown.contains("<redacted>"));
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let cfg: UplinkConfig = toml::from_str("url = \"ftp://x\"").unwrap();
        assert_eq!(cfg.validate().unwrap_err().0, "uplink.url");
        let cfg: UplinkConfig =
            toml::from_str("url = \"http://127.0.0.1:1\"\nbatch-records = 0").unwrap();
        assert_eq!(cfg.validate().unwrap_err().0, "uplink.batch-records");
        assert!(toml::from_str::<UplinkConfig>("url = \"http://x\"\nbogus = 1").is_err());
    }

    #[test]
    fn gzip_round_trips() {
        let data = b"millrace".repeat(100);
        let z = gzip(&data).unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&z[..]), &mut out).unwrap();
        assert_eq!(out, data);
        assert!(z.len() < data.len());
    }

    /// At shutdown with the aggregator gone, the drain gives up at the first
    /// failed send instead of waiting out its budget, and nothing is lost:
    /// the record stays in the outbox for the next start.
    #[tokio::test]
    async fn a_drain_that_cannot_send_stops_and_keeps_the_outbox() {
        use millrace_protocol::{DeadLetter, DeadLetterReason, Record, Source};
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), crate::store::StoreConfig::default()).unwrap();
        let store = Arc::new(store);
        store
            .outbox()
            .append(vec![Record::DeadLetter(DeadLetter::new(
                Source::Mqtt,
                "plant/x",
                b"x".to_vec(),
                DeadLetterReason::Malformed,
                "",
                0,
            ))])
            .unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let cfg: UplinkConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
        let uplink = Uplink::new(cfg, "gw".into(), Arc::clone(&store), Arc::default()).unwrap();
        assert_eq!(uplink.drain(Duration::ZERO).await, 0);
        let drained = tokio::time::timeout(
            Duration::from_secs(4),
            uplink.drain(Duration::from_secs(60)),
        )
        .await
        .expect("a refused connection ends the drain at once");
        assert_eq!(drained, 0);
        assert_eq!(store.outbox().stats().unwrap().records(), 1);
    }

    /// A stand-in aggregator: answers every POST with the current
    /// `(status, body)`, reading the request fully first.
    async fn stub_aggregator(
        answer: Arc<std::sync::Mutex<(u16, String)>>,
        posts: Arc<AtomicU64>,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let answer = Arc::clone(&answer);
                let posts = Arc::clone(&posts);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf);
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    posts.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = answer.lock().unwrap().clone();
                    // A redirect's "body" is its location.
                    let (location, body) = match status {
                        307 | 308 => (format!("Location: {body}\r\n"), String::new()),
                        _ => (String::new(), body),
                    };
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{location}\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        url
    }

    fn dead_letters(n: usize) -> Vec<millrace_protocol::Record> {
        use millrace_protocol::{DeadLetter, DeadLetterReason, Record, Source};
        (0..n)
            .map(|i| {
                Record::DeadLetter(DeadLetter::new(
                    Source::Mqtt,
                    format!("plant/{i}"),
                    b"x".to_vec(),
                    DeadLetterReason::Malformed,
                    "",
                    0,
                ))
            })
            .collect()
    }

    /// Several aggregators: one down is skipped, a redirect to a configured
    /// one is followed, one to anywhere else is not.
    #[tokio::test]
    async fn the_uplink_fails_over_and_follows_redirects_to_configured_aggregators_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), crate::store::StoreConfig::default()).unwrap();
        let store = Arc::new(store);
        store.outbox().append(dead_letters(3)).unwrap();
        let down = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let stub = |status: u16, body: &str| {
            let answer = Arc::new(std::sync::Mutex::new((status, body.to_owned())));
            let posts = Arc::new(AtomicU64::new(0));
            (
                Arc::clone(&answer),
                Arc::clone(&posts),
                stub_aggregator(answer, posts),
            )
        };
        let (_, owner_posts, owner) = stub(200, r#"{"committed":3,"duplicates":0}"#);
        let owner = owner.await;
        let (other_answer, other_posts, other) = stub(307, &format!("{owner}/api/v1/ingest"));
        let other = other.await;
        let (_, stranger_posts, stranger) = stub(200, r#"{"committed":3,"duplicates":0}"#);
        let stranger = stranger.await;
        let cfg: UplinkConfig =
            toml::from_str(&format!("url = [\"{down}\", \"{other}\", \"{owner}\"]")).unwrap();
        cfg.validate().unwrap();
        let uplink = Uplink::new(cfg, "gw".into(), Arc::clone(&store), Arc::default()).unwrap();

        // Down → next; redirected → the owner, which takes it.
        assert_eq!(uplink.drain(Duration::from_secs(5)).await, 1);
        assert_eq!(store.outbox().stats().unwrap().records(), 0);
        assert_eq!(other_posts.load(Ordering::SeqCst), 1);
        assert_eq!(owner_posts.load(Ordering::SeqCst), 1);
        // The next batch goes straight to the owner.
        store.outbox().append(dead_letters(2)).unwrap();
        assert_eq!(uplink.drain(Duration::from_secs(5)).await, 1);
        assert_eq!(
            (
                other_posts.load(Ordering::SeqCst),
                owner_posts.load(Ordering::SeqCst)
            ),
            (1, 2)
        );

        // A redirect beyond the configured list is not followed: the token
        // and the records stay home.
        *other_answer.lock().unwrap() = (307, format!("{stranger}/api/v1/ingest"));
        let uplink = Uplink::new(
            toml::from_str(&format!("url = [\"{other}\", \"{down}\"]")).unwrap(),
            "gw".into(),
            Arc::clone(&store),
            Arc::default(),
        )
        .unwrap();
        store.outbox().append(dead_letters(1)).unwrap();
        assert_eq!(uplink.drain(Duration::from_secs(5)).await, 0);
        assert_eq!(stranger_posts.load(Ordering::SeqCst), 0);
        assert_eq!(store.outbox().stats().unwrap().records(), 1);

        let twice: UplinkConfig =
            toml::from_str(&format!("url = [\"{owner}\", \"{owner}/\"]")).unwrap();
        assert_eq!(twice.validate().unwrap_err().0, "uplink.url");
        let none: UplinkConfig = toml::from_str("url = []").unwrap();
        assert_eq!(none.validate().unwrap_err().0, "uplink.url");
    }

    /// A batch the aggregator cannot read as a whole (a newer wire version,
    /// a mangled body) deletes nothing, whatever the status: the records stay
    /// until it is readable. A record-level 400 still isolates and deletes
    /// only the record at fault.
    #[tokio::test]
    async fn a_batch_refused_as_a_whole_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), crate::store::StoreConfig::default()).unwrap();
        let store = Arc::new(store);
        store.outbox().append(dead_letters(4)).unwrap();
        let answer = Arc::new(std::sync::Mutex::new((0u16, String::new())));
        let posts = Arc::new(AtomicU64::new(0));
        let url = stub_aggregator(Arc::clone(&answer), Arc::clone(&posts)).await;
        let cfg: UplinkConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
        let uplink = Uplink::new(cfg, "gw".into(), Arc::clone(&store), Arc::default()).unwrap();

        for (status, body) in [
            (
                422,
                r#"{"error":"invalid batch: unsupported wire version 9","scope":"batch"}"#,
            ),
            (
                415,
                r#"{"error":"unsupported Content-Encoding","scope":"batch"}"#,
            ),
            // An aggregator that says 400 but names the whole batch.
            (
                400,
                r#"{"error":"invalid batch: checksum mismatch","scope":"batch"}"#,
            ),
        ] {
            *answer.lock().unwrap() = (status, body.to_owned());
            let before = posts.load(Ordering::SeqCst);
            assert_eq!(uplink.drain(Duration::from_secs(5)).await, 0, "{status}");
            assert_eq!(
                posts.load(Ordering::SeqCst) - before,
                1,
                "{status}: the batch is not split"
            );
            assert_eq!(
                store.outbox().stats().unwrap().records(),
                4,
                "{status}: nothing deleted"
            );
        }

        // Readable again: everything goes.
        *answer.lock().unwrap() = (200, r#"{"committed":4,"duplicates":0}"#.to_owned());
        assert_eq!(uplink.drain(Duration::from_secs(5)).await, 1, "one batch");
        assert_eq!(store.outbox().stats().unwrap().records(), 0);

        // A record-level refusal (or an older aggregator's plain 400) is the
        // one case that deletes, record by record after splitting.
        store.outbox().append(dead_letters(2)).unwrap();
        *answer.lock().unwrap() = (
            400,
            r#"{"error":"invalid batch: seq not strictly increasing"}"#.to_owned(),
        );
        let before = posts.load(Ordering::SeqCst);
        uplink.drain(Duration::from_secs(5)).await;
        assert_eq!(
            posts.load(Ordering::SeqCst) - before,
            3,
            "the pair, then each record"
        );
        assert_eq!(store.outbox().stats().unwrap().records(), 0);
    }
}
