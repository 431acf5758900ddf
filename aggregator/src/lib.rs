//! Millrace aggregator: the central end of the agents' uplink.
//!
//! What it is: an HTTP ingest API ([`ingest`]) that authenticates each
//! agent by bearer token, decodes its batches (binary or JSON, optionally
//! gzip), drops records it has already committed ([`dedup`], backed by the
//! compact [`seqset::SeqSet`]), and writes the rest to a log ([`log`]):
//! Kafka when brokers are configured, otherwise an embedded durable log on
//! local disk that `millrace-aggregator tail` can read. A batch is answered
//! `200` only after the log acknowledged every new record and the dedup
//! state is fsync'd.
//!
//! Next to the ingest API it serves the live fleet dashboard, its JSON API
//! and `/metrics` ([`dashboard`]), fed by every committed batch.
//!
//! What it is not: there is no TLS termination here.
//!
//! # Layout
//! - [`config`]: the TOML file, raw and checked.
//! - [`ingest`]: routes, status codes, body limits, the commit path.
//! - [`dedup`]: per-agent committed-seq sets, saved atomically; crash
//!   reconciliation against the embedded log.
//! - [`seqset`]: the interval set itself.
//! - [`log`]: the [`log::LogWriter`] trait, [`log::kafka`] and [`log::local`].
//! - [`tail`]: the `tail` command over the embedded log.
//! - [`dashboard`]: live state, the page, `/api/v1/*` reads, events, `/metrics`.

// Tests may unwrap; library code may not (see [workspace.lints]).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod dedup;
pub mod ingest;
pub mod log;
pub mod seqset;
pub mod tail;
pub mod tls;

use config::{Config, SinkConfig};
use dashboard::Dashboard;
use dedup::{DedupError, DedupStore};
use ingest::{Ingest, IngestLimits};
use log::{kafka::KafkaWriter, local::LocalLogWriter, LogError, LogWriter};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the aggregator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the log writer: {0}")]
    Log(#[from] LogError),
    #[error("opening the dedup state: {0}")]
    Dedup(#[from] DedupError),
    #[error("[tls]: {0}")]
    Tls(String),
    #[error("joining the aggregator cluster: {0}")]
    Cluster(#[from] cluster::ClusterStartError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A ready aggregator: log writer open, dedup state loaded and reconciled.
#[derive(Debug)]
pub struct Aggregator {
    ingest: Arc<Ingest>,
    /// `None` when `[dashboard] enabled = false`.
    dashboard: Option<Arc<Dashboard>>,
    shutdown_grace: std::time::Duration,
    /// `Some` when `[tls]` is configured: HTTPS only. Replaced on reload
    /// (SIGHUP), so a renewed certificate or client CA applies to the next
    /// connection.
    tls: Option<tls::Reloadable>,
}

impl Aggregator {
    /// Opens the configured log writer and the dedup state. Blocks on disk
    /// I/O (recovery of the embedded log, reconciliation); call it before
    /// serving.
    pub fn open(config: &Config) -> Result<Self, StartError> {
        let log: Arc<dyn LogWriter> = match &config.sink {
            SinkConfig::Kafka(kafka) => {
                tracing::info!(brokers = %kafka.brokers, "writing to kafka");
                let writer = Arc::new(KafkaWriter::new(kafka.clone(), config.topics.clone())?);
                if let Some(cluster) = &config.cluster {
                    let log: Arc<dyn LogWriter> = writer.clone();
                    let cluster = cluster::Cluster::start(cluster.clone(), kafka, writer)?;
                    // No local state: the agents' dedup states live in the
                    // control topic.
                    let dedup = DedupStore::in_memory(config.agents.iter().map(|a| a.id.as_str()));
                    return Self::build(config, log, dedup, Some(cluster));
                }
                writer
            }
            SinkConfig::Local(local) => {
                let (writer, report) = LocalLogWriter::open(
                    &local.dir,
                    &config.topics,
                    local.segment_bytes,
                    local.retention,
                )
                .map_err(LogError::from)?;
                tracing::info!(
                    dir = %local.dir.display(),
                    torn_tails_truncated = report.truncations.len(),
                    next_offsets = ?report.next_offsets,
                    "writing to the embedded log"
                );
                Arc::new(writer)
            }
        };
        Self::with_log(config, log)
    }

    /// Like [`Aggregator::open`] with a given log writer.
    pub fn with_log(config: &Config, log: Arc<dyn LogWriter>) -> Result<Self, StartError> {
        let (dedup, recovery) = DedupStore::open(
            &config.data_dir.join("dedup"),
            config.agents.iter().map(|a| a.id.as_str()),
            log.as_ref(),
        )?;
        tracing::info!(
            agents = config.agents.len(),
            agents_with_state = recovery.agents_loaded,
            reconciled_records = recovery.reconciled_records,
            "dedup state loaded"
        );
        Self::build(config, log, dedup, None)
    }

    fn build(
        config: &Config,
        log: Arc<dyn LogWriter>,
        dedup: DedupStore,
        cluster: Option<Arc<cluster::Cluster>>,
    ) -> Result<Self, StartError> {
        let server_tls = config
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()
            .map_err(StartError::Tls)?;
        let dashboard = config.dashboard.enabled.then(|| {
            Arc::new(Dashboard::new(
                config.dashboard.clone(),
                config.agents.iter().map(|a| a.id.clone()).collect(),
                log.kind(),
            ))
        });
        if let Some(dashboard) = &dashboard {
            restore_history(dashboard, log.as_ref());
            if let (Some(cluster), SinkConfig::Kafka(kafka)) = (&cluster, &config.sink) {
                cluster
                    .follow_fleet(kafka, &config.topics, dashboard.clone())
                    .map_err(StartError::Cluster)?;
            }
        }
        let ingest = Ingest::new(
            config.agents.clone(),
            dedup,
            log,
            config.topics.clone(),
            IngestLimits {
                max_body_bytes: config.max_body_bytes,
                max_concurrent_batches: config.max_concurrent_batches,
                retry_after: config.retry_after,
                max_batch_records: config.max_batch_records,
                max_name_bytes: config.max_name_bytes,
                body_timeout: config.body_timeout,
                agent_rate_limit: config.agent_rate_limit,
            },
        );
        let ingest = match &dashboard {
            Some(d) => ingest.with_observer(d.clone()),
            None => ingest,
        };
        let ingest = match cluster {
            Some(c) => ingest.with_cluster(c),
            None => ingest,
        };
        Ok(Self {
            ingest: Arc::new(ingest),
            dashboard,
            shutdown_grace: config.shutdown_grace,
            tls: server_tls.map(|c| Arc::new(std::sync::RwLock::new(c))),
        })
    }

    /// The running TLS settings, for a reload to replace.
    pub fn tls(&self) -> Option<&tls::Reloadable> {
        self.tls.as_ref()
    }

    pub fn ingest(&self) -> &Arc<Ingest> {
        &self.ingest
    }

    pub fn dashboard(&self) -> Option<&Arc<Dashboard>> {
        self.dashboard.as_ref()
    }

    /// Serves the API on `listener` until `shutdown` is cancelled, then lets
    /// in-flight requests finish (up to the shutdown grace) and flushes the log.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let mut router = self.ingest.clone().router();
        if let Some(dashboard) = &self.dashboard {
            router = router.merge(dashboard::api::router(dashboard::api::App {
                dashboard: dashboard.clone(),
                ingest: self.ingest.clone(),
                shutdown: shutdown.clone(),
            }));
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(
                    url = %format!("{}://{addr}/", if self.tls.is_some() { "https" } else { "http" }),
                    auth = if dashboard.config().auth.is_open() { "open" } else { "required" },
                    "dashboard"
                );
            }
        }
        let server: std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>,
        > = match self.tls {
            None => Box::pin(
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                    .into_future(),
            ),
            Some(tls) => Box::pin(serve_tls(listener, router, tls, shutdown.clone())),
        };
        let grace = self.shutdown_grace;
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            result = server => result,
            () = deadline => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown grace elapsed with requests in flight");
                Ok(())
            }
        };
        if let Some(cluster) = self.ingest.cluster().cloned() {
            // Hands this aggregator's agents over before the writer closes.
            let _ = tokio::task::spawn_blocking(move || cluster.leave()).await;
        }
        self.ingest.log().close().await;
        result
    }
}

/// Serves `router` over TLS: each connection's handshake (at most 10 s),
/// then HTTP/1.1 with the verified client certificate, if any, as a request
/// extension ([`tls::PeerCertificate`]). Stops accepting at `shutdown` and
/// waits for the open connections (the caller bounds that by the grace).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    config: tls::Reloadable,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let current = Arc::clone(&config.read().unwrap_or_else(|e| e.into_inner()));
        let acceptor = tokio_rustls::TlsAcceptor::from(current);
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    metrics::counter!("millrace_aggregator_tls_handshake_failures_total")
                        .increment(1);
                    tracing::info!(%peer, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics::counter!("millrace_aggregator_tls_handshake_failures_total")
                        .increment(1);
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let service = router.layer(axum::Extension(tls::PeerCertificate(cert)));
            let service = hyper_util::service::TowerToHyperService::new(service);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(conn).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Reads the last `[dashboard] history` of windows and alerts back from the
/// log into the dashboard. A log that cannot be read leaves it empty (logged):
/// the dashboard must not keep the aggregator from starting.
fn restore_history(dashboard: &Dashboard, log: &dyn LogWriter) {
    let history = dashboard.config().history;
    if history.is_zero() {
        return;
    }
    let started = std::time::Instant::now();
    let since_ms = dashboard::now_ms().saturating_sub(history.as_millis() as i64);
    let mut live = dashboard.live();
    let result = log.recent(since_ms, &mut |r| {
        live.restore(&r.agent, r.seq, &r.record, r.appended_ms);
    });
    let totals = live.totals();
    drop(live);
    match result {
        Ok(records) => tracing::info!(
            records,
            series = totals.series,
            windows = totals.windows_retained,
            alerts = totals.alerts_retained,
            history = %humantime_serde::re::humantime::format_duration(history),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "dashboard history read back from the log"
        ),
        Err(error) => tracing::warn!(
            %error,
            "cannot read the dashboard history back from the log; the dashboard starts empty"
        ),
    }
}
