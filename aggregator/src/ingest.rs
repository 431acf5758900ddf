//! The ingest API: `POST /api/v1/ingest` and `GET /healthz`.
//!
//! What it is: the HTTP contract the agents' uplink relies on.
//!
//! `POST /api/v1/ingest`, `Authorization: Bearer <token>`, body a
//! [`Batch`] as `application/x-millrace-batch` (binary) or
//! `application/json`, optionally `Content-Encoding: gzip`:
//!
//! | status | meaning | agent does |
//! |---|---|---|
//! | 200 `{"committed": n, "duplicates": m}` | every new record is acknowledged by the log and the dedup state is saved | deletes the batch |
//! | 401 | unknown token, or the batch's `agent` is not the token's agent | alerts an operator |
//! | 413 | body over `max-body`, compressed or decompressed, or more than `max-batch-records` records | splits the batch; drops a single record only if it alone is too large |
//! | 400 `{"error": reason, "scope": "record"}` | a record of the batch is invalid (seq order, not representable, a name over `max-name-bytes` or with a control character) | splits the batch to find it; deletes only that record |
//! | 408 `{"error": reason, "scope": "batch"}` | the body did not arrive within `body-timeout` | retries with backoff |
//! | 429 + `Retry-After` `{"scope": "batch"}` | the agent sent more than `agent-rate-limit` records/s (token bucket, one second of burst, at least one full batch) | retries after the given time |
//! | 415 `{"error": reason, "scope": "batch"}` | unsupported `Content-Type` or `Content-Encoding` | keeps the records, retries with backoff |
//! | 422 `{"error": reason, "scope": "batch"}` | the body is not a batch this aggregator reads: bad magic, checksum, truncated, unknown wire version, undecodable body | keeps the records, retries with backoff |
//! | 503 + `Retry-After` | log unavailable, dedup state not saved, or too many requests at once | retries later |
//!
//! A batch-level fault says nothing about the records: a proxy that mangles
//! bodies, or an agent upgraded before its aggregator, must not empty the
//! agent's outbox. So only `400` (`scope: record`) and `413` make an agent
//! delete anything, and then one record at a time.
//!
//! Processing order for one batch: authenticate (before reading the body),
//! read at most `max-body` bytes, decompress at most `max-body` bytes
//! (a gzip bomb stops there), decode and validate, check the agent, then
//! under that agent's lock: split the records into new and already
//! committed, write the new ones to the log, record them (and the batch's
//! `outbox_floor`) in the dedup state, save it, answer.
//!
//! What it is not: no TLS here (terminate it in front, or add it at the
//! listener).

use crate::cluster::{Cluster, ClusterError};
use crate::config::{AgentCredential, Topics};
use crate::dedup::{DedupError, DedupStore};
use crate::log::{Health, LogError, LogRecord, LogWriter};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use millrace_protocol::{Batch, Envelope, WireError};
use serde::Serialize;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub const INGEST_PATH: &str = "/api/v1/ingest";
pub const HEALTH_PATH: &str = "/healthz";
pub const CONTENT_TYPE_BINARY: &str = "application/x-millrace-batch";
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// The `200` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IngestReply {
    /// Records written to the log by this request.
    pub committed: u64,
    /// Records already committed earlier, acknowledged without a second write.
    pub duplicates: u64,
}

/// Why a request was not answered `200`.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("too many ingest requests in progress")]
    Busy,
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("request body exceeds {limit_bytes} bytes")]
    TooLarge { limit_bytes: usize },
    #[error("batch of {records} records exceeds max-batch-records of {limit}")]
    TooManyRecords { records: usize, limit: usize },
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("agent rate limit of {rate} records/s exceeded; retry in {retry_after:?}")]
    RateLimited { rate: u32, retry_after: Duration },
    /// A record is at fault (scope `record`).
    #[error("{0}")]
    BadRequest(String),
    /// A record names another agent than the token's (scope `record`).
    #[error("{reason}")]
    Spoofed { reason: String, records: u64 },
    /// Content type or encoding this aggregator does not read (scope `batch`).
    #[error("{0}")]
    Unsupported(String),
    /// A body that is not a batch this aggregator reads (scope `batch`).
    #[error("{0}")]
    Unprocessable(String),
    #[error("log unavailable: {0}")]
    LogUnavailable(#[from] LogError),
    #[error("dedup state not saved: {0}")]
    StateUnavailable(#[from] DedupError),
    /// Another aggregator of the cluster owns the agent, or nobody does yet.
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Busy
            | IngestError::LogUnavailable(_)
            | IngestError::StateUnavailable(_)
            | IngestError::Cluster(ClusterError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Cluster(ClusterError::Elsewhere { .. }) => StatusCode::TEMPORARY_REDIRECT,
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::TooLarge { .. } | IngestError::TooManyRecords { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::BadRequest(_) | IngestError::Spoofed { .. } => StatusCode::BAD_REQUEST,
            IngestError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// What the refusal is about: the whole `batch` (its records are fine,
    /// keep them) or one `record` of it.
    pub fn scope(&self) -> &'static str {
        match self {
            IngestError::BadRequest(_)
            | IngestError::Spoofed { .. }
            | IngestError::TooLarge { .. }
            | IngestError::TooManyRecords { .. } => "record",
            _ => "batch",
        }
    }
}

impl From<WireError> for IngestError {
    fn from(e: WireError) -> Self {
        match e {
            // The batch decoded; one of its records breaks the order.
            WireError::SeqOrder { .. } => IngestError::BadRequest(format!("invalid batch: {e}")),
            // Truncated, bad magic, unknown version, checksum, body, empty
            // agent, and whatever a later wire version adds: the batch as a
            // whole could not be read, its records may be fine.
            _ => IngestError::Unprocessable(format!("invalid batch: {e}")),
        }
    }
}

/// Counters of the ingest API, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub batches_accepted: AtomicU64,
    pub records_committed: AtomicU64,
    pub records_duplicate: AtomicU64,
    pub rejected_unauthorized: AtomicU64,
    pub rejected_too_large: AtomicU64,
    pub rejected_bad_request: AtomicU64,
    /// Batches refused for records claiming another agent.
    pub rejected_spoofed: AtomicU64,
    /// Records claiming another agent than their token's.
    pub spoofed_records: AtomicU64,
    pub rejected_unsupported: AtomicU64,
    pub rejected_unprocessable: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub rejected_timeout: AtomicU64,
    pub rejected_rate_limited: AtomicU64,
    /// Config reloads (SIGHUP) applied, and refused for an invalid file.
    pub config_reloads: AtomicU64,
    pub config_reload_errors: AtomicU64,
    pub log_errors: AtomicU64,
    pub state_errors: AtomicU64,
    /// Batches of agents another aggregator of the cluster owns (`307`).
    pub redirected: AtomicU64,
    /// Batches no aggregator could take yet (a partition moving), `503`.
    pub cluster_unavailable: AtomicU64,
}

impl IngestStats {
    fn count_error(&self, error: &IngestError) {
        let counter = match error {
            IngestError::Busy => &self.rejected_busy,
            IngestError::Unauthorized(_) => &self.rejected_unauthorized,
            IngestError::TooLarge { .. } | IngestError::TooManyRecords { .. } => {
                &self.rejected_too_large
            }
            IngestError::BodyTimeout(_) => &self.rejected_timeout,
            IngestError::RateLimited { .. } => &self.rejected_rate_limited,
            IngestError::BadRequest(_) => &self.rejected_bad_request,
            IngestError::Spoofed { records, .. } => {
                self.spoofed_records.fetch_add(*records, Ordering::Relaxed);
                &self.rejected_spoofed
            }
            IngestError::Unsupported(_) => &self.rejected_unsupported,
            IngestError::Unprocessable(_) => &self.rejected_unprocessable,
            IngestError::LogUnavailable(_) => &self.log_errors,
            IngestError::StateUnavailable(_) => &self.state_errors,
            IngestError::Cluster(ClusterError::Elsewhere { .. }) => &self.redirected,
            IngestError::Cluster(ClusterError::Unavailable(_)) => &self.cluster_unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Told about every committed batch (the dashboard's live state and metrics).
pub trait CommitObserver: Send + Sync + std::fmt::Debug {
    /// Called after the log acknowledged the batch and the dedup state was
    /// saved. `new` holds only the records this batch wrote — never those
    /// recognised as already committed; `log_write` is how long the log
    /// write took (`None` when there was nothing new to write).
    fn committed(&self, batch: &Batch, new: &[&Envelope], log_write: Option<Duration>);
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct Ingest {
    /// Replaced as a whole by [`Ingest::reload_credentials`] (SIGHUP).
    agents: std::sync::RwLock<Vec<AgentCredential>>,
    dedup: DedupStore,
    log: Arc<dyn LogWriter>,
    topics: Topics,
    max_body_bytes: usize,
    max_batch_records: usize,
    max_name_bytes: usize,
    body_timeout: Duration,
    retry_after: Duration,
    /// Per agent, when `agent-rate-limit` is set.
    rates: Option<std::collections::HashMap<String, std::sync::Mutex<TokenBucket>>>,
    agent_rate_limit: u32,
    admission: Semaphore,
    stats: IngestStats,
    observer: Option<Arc<dyn CommitObserver>>,
    /// `Some` when this aggregator is one of several ([`crate::cluster`]).
    cluster: Option<Arc<Cluster>>,
}

/// Settings of [`Ingest::new`], taken from the checked config.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_body_bytes: usize,
    pub max_concurrent_batches: usize,
    pub retry_after: Duration,
    /// Records one batch may carry (`413` above, so the agent splits it).
    pub max_batch_records: usize,
    /// Longest agent, device, sensor, unit or dead-letter origin name.
    pub max_name_bytes: usize,
    /// How long the body of one request may take to arrive.
    pub body_timeout: Duration,
    /// Records per second per agent; `0` means no limit.
    pub agent_rate_limit: u32,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_concurrent_batches: 64,
            retry_after: Duration::from_secs(5),
            max_batch_records: 10_000,
            max_name_bytes: 256,
            body_timeout: Duration::from_secs(30),
            agent_rate_limit: 20_000,
        }
    }
}

/// Records per second with one second of burst (at least `min_burst`).
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, min_burst: usize) -> Self {
        let burst = f64::from(rate).max(min_burst as f64);
        Self {
            tokens: burst,
            burst,
            rate: f64::from(rate),
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens, or says how long until there are enough.
    fn take(&mut self, n: usize, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let n = n as f64;
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        let wait = ((n.min(self.burst) - self.tokens) / self.rate).max(0.0);
        Err(Duration::from_secs_f64(wait).max(Duration::from_secs(1)))
    }
}

impl Ingest {
    pub fn new(
        agents: Vec<AgentCredential>,
        dedup: DedupStore,
        log: Arc<dyn LogWriter>,
        topics: Topics,
        limits: IngestLimits,
    ) -> Self {
        let rates = (limits.agent_rate_limit > 0).then(|| {
            agents
                .iter()
                .map(|a| {
                    let bucket =
                        TokenBucket::new(limits.agent_rate_limit, limits.max_batch_records);
                    (a.id.clone(), std::sync::Mutex::new(bucket))
                })
                .collect()
        });
        Self {
            agents: std::sync::RwLock::new(agents),
            dedup,
            log,
            topics,
            max_body_bytes: limits.max_body_bytes,
            max_batch_records: limits.max_batch_records,
            max_name_bytes: limits.max_name_bytes,
            body_timeout: limits.body_timeout,
            rates,
            agent_rate_limit: limits.agent_rate_limit,
            retry_after: limits.retry_after,
            admission: Semaphore::new(limits.max_concurrent_batches),
            stats: IngestStats::default(),
            observer: None,
            cluster: None,
        }
    }

    /// Takes batches only for the agents this aggregator owns in `cluster`
    /// (redirecting the others); states are saved to its control topic.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Takes the agents' credentials of a re-read config (SIGHUP): changed
    /// and rotated tokens apply to the next request. An agent added or
    /// removed needs a restart (its dedup state is opened at start); it is
    /// named in the returned list and the others still apply.
    pub fn reload_credentials(&self, agents: Vec<AgentCredential>) -> Vec<String> {
        let mut current = self.agents.write().unwrap_or_else(|e| e.into_inner());
        let mut needs_restart = Vec::new();
        let mut next = Vec::with_capacity(current.len());
        for agent in current.iter() {
            match agents.iter().find(|a| a.id == agent.id) {
                Some(new) => next.push(new.clone()),
                None => {
                    // Removed from the file: its tokens stop working now.
                    needs_restart.push(agent.id.clone());
                    next.push(AgentCredential {
                        id: agent.id.clone(),
                        token_digests: Vec::new(),
                    });
                }
            }
        }
        for agent in &agents {
            if !current.iter().any(|a| a.id == agent.id) {
                needs_restart.push(agent.id.clone());
            }
        }
        *current = next;
        needs_restart
    }

    /// Tells `observer` about every committed batch.
    pub fn with_observer(mut self, observer: Arc<dyn CommitObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    pub fn log(&self) -> &Arc<dyn LogWriter> {
        &self.log
    }

    /// The routes of the ingest API.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(INGEST_PATH, post(ingest))
            .route(HEALTH_PATH, get(healthz))
            // The handler enforces `max-body` itself, compressed and not.
            .layer(DefaultBodyLimit::disable())
            .with_state(self)
    }

    /// The agent this request speaks for: the token's, or with no token the
    /// one the verified client certificate names; with both, they must be
    /// the same agent. Every configured token is compared in constant time,
    /// so timing does not reveal which one nearly matched.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: &crate::tls::PeerCertificate,
    ) -> Result<String, IngestError> {
        let agents = self.agents.read().unwrap_or_else(|e| e.into_inner());
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            if peer.0.is_none() {
                return Err(IngestError::Unauthorized("missing Authorization header"));
            }
            return agents
                .iter()
                .find(|a| peer.names(&a.id))
                .map(|a| a.id.clone())
                .ok_or(IngestError::Unauthorized(
                    "the client certificate names no configured agent",
                ));
        };
        let value = value
            .to_str()
            .map_err(|_| IngestError::Unauthorized("malformed Authorization header"))?;
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(IngestError::Unauthorized("expected a Bearer token"))?;
        let mut found = None;
        for agent in agents.iter() {
            if agent.accepts(token) {
                found = Some(agent.id.clone());
            }
        }
        let agent = found.ok_or(IngestError::Unauthorized("unknown token"))?;
        if peer.0.is_some() && !peer.names(&agent) {
            return Err(IngestError::Unauthorized(
                "the client certificate belongs to another agent than the token",
            ));
        }
        Ok(agent)
    }

    async fn handle(
        &self,
        headers: HeaderMap,
        peer: crate::tls::PeerCertificate,
        body: Body,
    ) -> Result<(String, IngestReply), IngestError> {
        let _admitted = self
            .admission
            .try_acquire()
            .map_err(|_| IngestError::Busy)?;
        let token_agent = self.authenticate(&headers, &peer)?;
        let format = BodyFormat::from_headers(&headers)?;
        let limit_bytes = self.max_body_bytes;
        if let Some(length) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if length > limit_bytes as u64 {
                return Err(IngestError::TooLarge { limit_bytes });
            }
        }
        // A body that trickles in (a stalled or hostile client) holds an
        // admission slot only this long.
        let read = Limited::new(body, limit_bytes).collect();
        let bytes = match tokio::time::timeout(self.body_timeout, read).await {
            Err(_) => return Err(IngestError::BodyTimeout(self.body_timeout)),
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(IngestError::TooLarge { limit_bytes })
            }
            Ok(Err(e)) => {
                return Err(IngestError::Unprocessable(format!(
                    "reading the body failed: {e}"
                )))
            }
        };
        let batch = tokio::task::spawn_blocking(move || format.decode(bytes, limit_bytes))
            .await
            .map_err(|e| IngestError::Unprocessable(format!("decoding failed: {e}")))??;
        if batch.agent != token_agent {
            return Err(IngestError::Unauthorized(
                "batch agent does not match the token",
            ));
        }
        if batch.records.len() > self.max_batch_records {
            return Err(IngestError::TooManyRecords {
                records: batch.records.len(),
                limit: self.max_batch_records,
            });
        }
        check_identity(&batch)?;
        check_names(&batch, self.max_name_bytes)?;
        self.take_rate(&batch)?;
        let reply = self.commit(&batch).await?;
        Ok((token_agent, reply))
    }

    /// Charges the agent's token bucket for the batch's records.
    fn take_rate(&self, batch: &Batch) -> Result<(), IngestError> {
        let Some(bucket) = self.rates.as_ref().and_then(|r| r.get(&batch.agent)) else {
            return Ok(());
        };
        let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket
            .take(batch.records.len(), Instant::now())
            .map_err(|retry_after| IngestError::RateLimited {
                rate: self.agent_rate_limit,
                retry_after,
            })
    }

    /// Dedups `batch`, writes its new records, records them as committed.
    async fn commit(&self, batch: &Batch) -> Result<IngestReply, IngestError> {
        let state = self
            .dedup
            .agent(&batch.agent)
            .ok_or(IngestError::Unauthorized("unknown agent"))?;
        let mut state = state.lock().await;
        // In a cluster: owned here, and everything committed anywhere known.
        let lease = match &self.cluster {
            Some(cluster) => Some(cluster.admit(&batch.agent, &mut state).await?),
            None => None,
        };
        // Seqs below the saved floor were promised never to come again; treat
        // them as already committed. The batch's own floor applies afterwards,
        // so a record carried by this batch is never skipped because of it.
        let new: Vec<_> = batch
            .records
            .iter()
            .filter(|e| !state.is_committed(e.seq))
            .collect();
        let duplicates = (batch.records.len() - new.len()) as u64;
        let records = new
            .iter()
            .map(|e| LogRecord::from_envelope(&self.topics, &batch.agent, batch.version, e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                IngestError::BadRequest(format!("record not representable as JSON: {e}"))
            })?;
        let write_started = Instant::now();
        let (receipt, log_write) = if records.is_empty() {
            (Default::default(), None)
        } else {
            let receipt = self.log.write(records).await?;
            (receipt, Some(write_started.elapsed()))
        };
        // Saves when this batch changed the state, and also when an earlier
        // save failed (this may be that batch, resent as a duplicate).
        if state.commit(new.iter().map(|e| e.seq), batch.outbox_floor, receipt) {
            match &self.cluster {
                Some(cluster) => {
                    cluster.save(&state, state.log_marks().clone()).await?;
                    state.mark_saved();
                }
                None => state.persist().await?,
            }
        }
        drop(lease);
        if let Some(observer) = &self.observer {
            observer.committed(batch, &new, log_write);
        }
        Ok(IngestReply {
            committed: new.len() as u64,
            duplicates,
        })
    }

    fn retry_after_header(&self) -> HeaderValue {
        HeaderValue::from(self.retry_after.as_secs().max(1))
    }
}

#[derive(Debug, Clone, Copy)]
struct BodyFormat {
    binary: bool,
    gzip: bool,
}

impl BodyFormat {
    fn from_headers(headers: &HeaderMap) -> Result<Self, IngestError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let binary = match mime.as_str() {
            CONTENT_TYPE_BINARY => true,
            CONTENT_TYPE_JSON => false,
            _ => {
                return Err(IngestError::Unsupported(format!(
                    "unsupported Content-Type `{content_type}`: use {CONTENT_TYPE_BINARY} or {CONTENT_TYPE_JSON}"
                )))
            }
        };
        let encoding = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .trim()
            .to_ascii_lowercase();
        let gzip = match encoding.as_str() {
            "gzip" | "x-gzip" => true,
            "identity" | "" => false,
            other => {
                return Err(IngestError::Unsupported(format!(
                    "unsupported Content-Encoding `{other}`: use gzip or none"
                )))
            }
        };
        Ok(Self { binary, gzip })
    }

    /// Decompresses (at most `limit_bytes`) and decodes. Blocking.
    fn decode(self, body: Bytes, limit_bytes: usize) -> Result<Batch, IngestError> {
        let plain: Vec<u8>;
        let bytes: &[u8] = if self.gzip {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&body[..])
                .take(limit_bytes as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| IngestError::Unprocessable(format!("bad gzip body: {e}")))?;
            if out.len() > limit_bytes {
                return Err(IngestError::TooLarge { limit_bytes });
            }
            plain = out;
            &plain
        } else {
            &body
        };
        let batch = if self.binary {
            Batch::decode_binary(bytes)?
        } else {
            Batch::decode_json(bytes)?
        };
        Ok(batch)
    }
}

/// Every window and alert must name the agent the token belongs to: the
/// log's values then agree with its `agent` header, and one gateway cannot
/// make its records pass for another's.
fn check_identity(batch: &Batch) -> Result<(), IngestError> {
    let claimed = |e: &Envelope| match &e.record {
        millrace_protocol::Record::Window(w) => Some(w.agent.clone()),
        millrace_protocol::Record::Alert(a) => Some(a.agent.clone()),
        millrace_protocol::Record::DeadLetter(_) => None,
    };
    let mut spoofed = batch.records.iter().filter_map(|e| {
        claimed(e)
            .filter(|a| **a != *batch.agent)
            .map(|a| (e.seq, a))
    });
    let Some((seq, other)) = spoofed.next() else {
        return Ok(());
    };
    let records = 1 + spoofed.count() as u64;
    tracing::warn!(
        agent = %batch.agent,
        claimed = %other,
        seq,
        records,
        "records claiming another agent refused"
    );
    Err(IngestError::Spoofed {
        reason: format!(
            "record seq {seq} claims agent `{other}`, but the token is `{}`'s",
            batch.agent
        ),
        records,
    })
}

/// A record whose names break the limits fails the batch with scope
/// `record` (the agent then finds it by splitting, and drops only it).
fn check_names(batch: &Batch, max_bytes: usize) -> Result<(), IngestError> {
    let check = |what: &str, name: &str, seq: u64| -> Result<(), IngestError> {
        if name.len() > max_bytes {
            return Err(IngestError::BadRequest(format!(
                "record seq {seq}: {what} of {} bytes exceeds max-name-bytes of {max_bytes}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(IngestError::BadRequest(format!(
                "record seq {seq}: {what} {name:?} holds a control character"
            )));
        }
        Ok(())
    };
    for e in &batch.records {
        let seq = e.seq;
        match &e.record {
            millrace_protocol::Record::Window(w) => {
                check("agent", &w.agent, seq)?;
                check("device", &w.series.device, seq)?;
                check("sensor", &w.series.sensor, seq)?;
                check("unit", &w.unit, seq)?;
            }
            millrace_protocol::Record::Alert(a) => {
                check("agent", &a.agent, seq)?;
                check("device", &a.series.device, seq)?;
                check("sensor", &a.series.sensor, seq)?;
                check("unit", &a.unit, seq)?;
            }
            millrace_protocol::Record::DeadLetter(d) => check("origin", &d.origin, seq)?,
        }
    }
    Ok(())
}

/// Decodes a request body as the ingest API does (content type and
/// encoding from `headers`, gzip bounded by `limit_bytes`), without I/O: what
/// the fuzz targets and tests drive. Blocking.
pub fn decode_body(
    headers: &HeaderMap,
    body: Bytes,
    limit_bytes: usize,
) -> Result<Batch, IngestError> {
    BodyFormat::from_headers(headers)?.decode(body, limit_bytes)
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    /// `batch` or `record`: see the module docs.
    scope: &'static str,
}

async fn ingest(
    State(app): State<Arc<Ingest>>,
    peer: Option<axum::Extension<crate::tls::PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.map(|p| p.0).unwrap_or_default();
    let started = Instant::now();
    // The server drops this future when the client disconnects. The commit
    // (log write, then dedup save) runs in its own task so a disconnect can
    // never cut it between the two steps: that would leave written records
    // unrecorded, and the agent's resend would write them a second time.
    let worker = Arc::clone(&app);
    let outcome = tokio::spawn(async move { worker.handle(headers, peer, body).await })
        .await
        .unwrap_or_else(|e| {
            // Not the batch's fault: answer 503 so the agent retries it.
            tracing::error!(error = %e, "ingest task failed");
            Err(IngestError::Busy)
        });
    match outcome {
        Ok((agent, reply)) => {
            app.stats.batches_accepted.fetch_add(1, Ordering::Relaxed);
            app.stats
                .records_committed
                .fetch_add(reply.committed, Ordering::Relaxed);
            app.stats
                .records_duplicate
                .fetch_add(reply.duplicates, Ordering::Relaxed);
            tracing::debug!(
                %agent,
                committed = reply.committed,
                duplicates = reply.duplicates,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "batch committed"
            );
            (StatusCode::OK, Json(reply)).into_response()
        }
        Err(error) => {
            app.stats.count_error(&error);
            let status = error.status();
            if status.is_server_error() {
                tracing::warn!(%error, status = status.as_u16(), "batch not committed");
            } else if status.is_redirection() {
                // The normal way in a cluster: counted, not logged per batch.
                tracing::debug!(%error, status = status.as_u16(), "batch redirected");
            } else {
                tracing::info!(%error, status = status.as_u16(), "batch rejected");
            }
            let mut response = (
                status,
                Json(ErrorBody {
                    error: error.to_string(),
                    scope: error.scope(),
                }),
            )
                .into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, app.retry_after_header());
            }
            if let IngestError::RateLimited { retry_after, .. } = &error {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            if let IngestError::Cluster(ClusterError::Elsewhere { url, .. }) = &error {
                if let Ok(location) = HeaderValue::from_str(&format!("{url}{INGEST_PATH}")) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
            }
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

#[derive(Serialize)]
struct HealthBody {
    status: &'static str,
    log: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

async fn healthz(State(app): State<Arc<Ingest>>) -> Response {
    let log = app.log.kind();
    match app.log.health().await {
        Health::Healthy => (
            StatusCode::OK,
            Json(HealthBody {
                status: "ok",
                log,
                reason: None,
            }),
        )
            .into_response(),
        Health::Unhealthy(reason) => {
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(HealthBody {
                    status: "unavailable",
                    log,
                    reason: Some(reason),
                }),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, app.retry_after_header());
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&vec![0u8; 4 << 20]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        let format = BodyFormat {
            binary: true,
            gzip: true,
        };
        let err = format.decode(Bytes::from(bomb), 1 << 20).unwrap_err();
        assert!(matches!(err, IngestError::TooLarge { .. }), "{err:?}");
    }
}
