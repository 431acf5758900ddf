//! The running agent: starts the configured sources, the pipeline and the
//! outputs under one root [`CancellationToken`], and shuts them down in
//! pipeline order on SIGINT/SIGTERM or when any task fails.
//!
//! Start-up order: the store opens (quarantining what is unreadable) → the
//! scorer resumes the baselines saved by the last run (at most an hour old)
//! → the journal is replayed into the window engine, which resumes every
//! series from its closed-up-to mark (no window emitted twice) → the uplink,
//! the sources and the pipeline start.
//!
//! Shutdown order: the token is cancelled → sources stop taking input → the
//! pipeline drains the channel, flushes every open window into the outbox and
//! commits the journal → outputs get the last records → the uplink sends what
//! the outbox holds for at most `uplink.shutdown-drain` (5 s) → `run`
//! returns. Whatever the uplink could not send by then stays in the outbox
//! for the next start.
//!
//! # A full disk
//!
//! fjall refuses every write after one failed (a full disk among the
//! causes) until the database is reopened. The pipeline then stops at once
//! ([`pipeline::Ended::StoreBroken`]): what was not durable was never
//! acknowledged, open windows are not flushed, and `run` returns
//! [`RuntimeError::StoreBroken`], on which the binary exits with code 75
//! (`EX_TEMPFAIL`). The service manager starts it again (`Restart=always`;
//! the unit sets `StartLimitIntervalSec=0` so it never gives up), which is
//! the crash-recovery path: the store reopens, the journal rebuilds the open
//! windows, and the devices' and the broker's unacknowledged messages come
//! back on the new connections. Whatever `[outbox] when-full` says, a full
//! file system therefore holds ingest back (sources stop being
//! acknowledged) rather than dropping records: deleting from the store
//! would itself need space.
//!
//! At start, a store that cannot be opened because the file system is full
//! is waited for (retried with backoff up to 30 s, logged, systemd told
//! `READY=1` with the reason as `STATUS=` and its watchdog pinged) instead
//! of failing the start, so a gateway whose disk fills resumes by itself
//! once space is freed.

use crate::anomaly::Scorer;
use crate::config::AgentConfig;
use crate::ingest::broker::{BrokerError, EmbeddedBroker};
use crate::ingest::modbus::ModbusSource;
use crate::ingest::mqtt::{MqttError, MqttSource};
use crate::pipeline::{self, Analytics, Durability, Output};
use crate::service;
use crate::store::Store;
use crate::tap::Tap;
use crate::telemetry;
use crate::uplink::Uplink;
use crate::window::WindowEngine;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Why the agent could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("cannot open the tap {path}: {source}")]
    Tap {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("embedded broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("mqtt source: {0}")]
    Mqtt(#[from] MqttError),
    #[error("modbus source: {0}")]
    Modbus(String),
    #[error("{name} source task failed: {reason}")]
    SourceTask { name: &'static str, reason: String },
    #[error("cannot install the signal handler: {0}")]
    Signals(std::io::Error),
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        source: crate::store::StoreError,
    },
    #[error("cannot listen for /metrics on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("uplink: {0}")]
    Uplink(#[from] crate::uplink::UplinkError),
    #[error("the store in {dir} refuses writes until it is reopened (full disk or failed write); restart the agent (exit code 75) to reopen it")]
    StoreBroken { dir: PathBuf },
}

impl RuntimeError {
    /// The process exit code for this error: 75 (`EX_TEMPFAIL`) when a
    /// restart is the remedy, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RuntimeError::StoreBroken { .. } => 75,
            _ => 1,
        }
    }
}

/// Opens the store; while the file system is full, waits and tries again
/// (backoff 1 s doubling to 30 s) until it opens or a signal arrives
/// (`Ok(None)`). Any other error fails the start.
async fn open_store(
    cfg: &AgentConfig,
    heartbeat: &service::Heartbeat,
    signals: &mut std::pin::Pin<
        &mut impl std::future::Future<Output = std::io::Result<&'static str>>,
    >,
) -> Result<Option<(Store, crate::store::RecoveryReport)>, RuntimeError> {
    let dir = cfg.agent.data_dir.clone();
    let mut wait = std::time::Duration::from_secs(1);
    let mut waited = false;
    loop {
        heartbeat.beat();
        let (open_dir, store_cfg) = (dir.clone(), cfg.store());
        let opened = tokio::task::spawn_blocking(move || Store::open(&open_dir, store_cfg))
            .await
            .map_err(|e| RuntimeError::Store {
                dir: dir.clone(),
                source: crate::store::StoreError::Task(e.to_string()),
            })?;
        match opened {
            Ok(opened) => {
                if waited {
                    tracing::info!(dir = %dir.display(), "store open again: disk space is back");
                }
                return Ok(Some(opened));
            }
            Err(source) if source.is_disk_full() => {
                metrics::counter!("millrace_store_open_retries_total").increment(1);
                tracing::error!(dir = %dir.display(), error = %source, retry_in_ms = wait.as_millis() as u64, "cannot open the store: the file system is full; waiting for space (nothing is ingested meanwhile)");
                if !waited {
                    service::ready("waiting for disk space to open the store");
                    waited = true;
                }
                let deadline = tokio::time::Instant::now() + wait;
                // Keep the watchdog fed: the process is waiting, not hung.
                let mut beat = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tokio::select! {
                        sig = signals.as_mut() => {
                            if let Ok(name) = sig {
                                tracing::info!(signal = name, "stopping while waiting for disk space");
                            }
                            return Ok(None);
                        }
                        () = tokio::time::sleep_until(deadline) => break,
                        _ = beat.tick() => heartbeat.beat(),
                    }
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
            Err(source) => return Err(RuntimeError::Store { dir, source }),
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM (returns `Ok`) or a fatal error.
pub async fn run(cfg: AgentConfig, tap: Option<PathBuf>) -> Result<(), RuntimeError> {
    let shutdown = CancellationToken::new();
    let mut outputs: Vec<Box<dyn Output>> = Vec::new();
    if let Some(path) = tap {
        let t = Tap::open(&path).map_err(|source| RuntimeError::Tap { path, source })?;
        outputs.push(Box::new(t));
    }

    let signals = wait_for_signal();
    tokio::pin!(signals);
    let heartbeat = service::Heartbeat::default();
    heartbeat.beat();
    let watchdog = tokio::spawn(service::watchdog(heartbeat.clone(), shutdown.clone()));

    // The store first: recovery decides what the window engine starts from.
    let Some((store, recovery)) = open_store(&cfg, &heartbeat, &mut signals).await? else {
        shutdown.cancel();
        let _ = watchdog.await;
        return Ok(());
    };
    tracing::info!(dir = %cfg.agent.data_dir.display(), ?recovery, "store open");
    let store = Arc::new(store);
    let replay = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || {
            Ok::<_, crate::store::StoreError>((
                store.journal().replay()?,
                store.journal().closed_marks(),
                // Only the scorer's warm-up depends on these: a store that
                // cannot read them must not keep the agent from starting.
                store.baselines().load().unwrap_or_else(|error| {
                    tracing::warn!(%error, "anomaly baselines unreadable; every series warms up again");
                    crate::store::LoadedBaselines::default()
                }),
            ))
        })
        .await
        .map_err(|e| RuntimeError::Store {
            dir: cfg.agent.data_dir.clone(),
            source: crate::store::StoreError::Task(e.to_string()),
        })?
        .map_err(|source| RuntimeError::Store {
            dir: cfg.agent.data_dir.clone(),
            source,
        })?
    };

    let wake_uplink = Arc::new(Notify::new());
    let uplink_stop = CancellationToken::new();
    let uplink_task = match cfg.uplink.clone() {
        Some(u) => {
            let uplink = Uplink::new(
                u,
                cfg.agent.id.clone(),
                Arc::clone(&store),
                Arc::clone(&wake_uplink),
            )?;
            // Stopped after the pipeline flushed, not with the sources: its
            // last job is to send those windows.
            let token = uplink_stop.clone();
            Some(tokio::spawn(uplink.run(token)))
        }
        None => None,
    };

    let (tx, rx) = mpsc::channel(cfg.agent.channel_capacity);
    let mut sources: JoinSet<Result<(), RuntimeError>> = JoinSet::new();
    // Which source each task runs, to name it if it panics.
    let mut source_names: std::collections::HashMap<tokio::task::Id, &'static str> =
        std::collections::HashMap::new();
    let mut counters = telemetry::Sources {
        store: Some(Arc::clone(&store)),
        ..Default::default()
    };
    if let Some(b) = cfg.broker.as_ref().filter(|b| b.enabled) {
        let broker = EmbeddedBroker::start(b)?;
        tracing::info!(listen = %broker.local_addr(), pubsub = ?broker.pubsub_addr(), "embedded MQTT broker up: devices publish to listen");
        counters.mqtt.push(("embedded-broker", broker.stats()));
        let (tx, token) = (tx.clone(), shutdown.clone());
        let task = sources.spawn(async move { Ok(broker.run(tx, token).await?) });
        source_names.insert(task.id(), "embedded broker");
    }
    if let Some(m) = cfg.mqtt.clone() {
        let source = MqttSource::new(m)?;
        counters.mqtt.push(("mqtt", source.stats()));
        let (tx, token) = (tx.clone(), shutdown.clone());
        let task = sources.spawn(async move { Ok(source.run(tx, token).await?) });
        source_names.insert(task.id(), "mqtt");
    }
    if let Some(m) = cfg.modbus.clone().filter(|m| !m.devices.is_empty()) {
        let source = ModbusSource::new(m).map_err(|e| RuntimeError::Modbus(e.to_string()))?;
        counters.modbus = Some(source.stats());
        let (tx, token) = (tx.clone(), shutdown.clone());
        let task = sources.spawn(async move {
            source.run(tx, token).await;
            Ok(())
        });
        source_names.insert(task.id(), "modbus");
    }
    #[cfg(feature = "opcua")]
    if let Some(o) = cfg.opcua.clone().filter(|o| !o.servers.is_empty()) {
        let source = crate::ingest::opcua::OpcUaSource::new(o, &cfg.agent.data_dir);
        counters.opcua = source.stats();
        let (tx, token) = (tx.clone(), shutdown.clone());
        let task = sources.spawn(async move {
            source.run(tx, token).await;
            Ok(())
        });
        source_names.insert(task.id(), "opcua");
    }
    drop(tx);

    let engine = WindowEngine::new(cfg.agent.id.clone(), cfg.window.clone());
    let scorer = Scorer::new(cfg.agent.id.clone(), cfg.anomaly.clone())
        .with_max_series(cfg.window.max_series);
    let mut analytics = Analytics::new(engine, scorer);
    let (journaled, marks, baselines) = replay;
    analytics.restore_closed(marks);
    let now = crate::ingest::now_ms();
    let (saved, corrupt) = (baselines.series.len(), baselines.corrupt);
    let restored = analytics.restore_baselines(baselines, now);
    if saved > 0 || corrupt > 0 {
        tracing::info!(
            restored,
            saved,
            corrupt,
            "anomaly baselines resumed from the last run"
        );
    }
    let replayed = journaled.readings.len();
    for r in &journaled.readings {
        analytics.replay(r, now);
    }
    if replayed > 0 {
        tracing::info!(
            readings = replayed,
            skipped_closed = journaled.skipped_closed,
            "open windows rebuilt from the journal"
        );
    }
    let durability = Durability::new(Arc::clone(&store), cfg.uplink.is_some(), wake_uplink);
    let pipeline_token = shutdown.clone();
    heartbeat.beat();
    let beat = heartbeat.clone();
    let mut pipeline = tokio::spawn(async move {
        let mut outputs = outputs;
        pipeline::run(
            analytics,
            rx,
            &mut outputs,
            Some(durability),
            beat,
            pipeline_token,
        )
        .await
    });
    let http = match (cfg.http.as_ref(), telemetry::install_recorder()) {
        (Some(http), Some(handle)) => {
            let listener = tokio::net::TcpListener::bind(http.listen)
                .await
                .map_err(|source| RuntimeError::Http {
                    addr: http.listen,
                    source,
                })?;
            tracing::info!(listen = %http.listen, "metrics on /metrics, health on /healthz");
            let serve = telemetry::serve(
                listener,
                handle,
                counters,
                heartbeat.clone(),
                shutdown.clone(),
            );
            Some(tokio::spawn(serve))
        }
        _ => None,
    };
    tracing::info!(agent = %cfg.agent.id, "agent running");
    service::ready(&format!("agent {} running", cfg.agent.id));

    let mut failure = None;
    let mut pipeline_done = None;
    loop {
        tokio::select! {
            done = &mut pipeline => {
                pipeline_done = Some(done);
                break;
            }
            sig = &mut signals => {
                match sig {
                    Ok(name) => tracing::info!(signal = name, "stopping: ingest stops, open windows flush"),
                    Err(e) => failure = Some(RuntimeError::Signals(e)),
                }
                break;
            }
            Some(done) = sources.join_next_with_id() => {
                match done {
                    Ok((_, Ok(()))) => continue,
                    Ok((_, Err(e))) => {
                        tracing::error!(error = %e, "source failed; stopping the agent");
                        failure = Some(e);
                    }
                    Err(e) => {
                        let name = source_names.get(&e.id()).copied().unwrap_or("unknown");
                        tracing::error!(error = %e, source = name, "source task panicked; stopping the agent");
                        failure = Some(RuntimeError::SourceTask {
                            name,
                            reason: e.to_string(),
                        });
                    }
                }
                break;
            }
        }
    }
    service::stopping();
    shutdown.cancel();
    let _ = watchdog.await;
    while sources.join_next().await.is_some() {}
    let done = match pipeline_done {
        Some(done) => done,
        None => pipeline.await,
    };
    match done {
        // The sources may have noticed first (their channel closed).
        Ok((_, pipeline::Ended::StoreBroken)) => {
            tracing::error!(dir = %cfg.agent.data_dir.display(), "stopped: the store must be reopened; exiting with code 75 for the service manager to restart the agent");
            failure = Some(RuntimeError::StoreBroken {
                dir: cfg.agent.data_dir.clone(),
            });
        }
        Ok((_, pipeline::Ended::Drained)) => {}
        Err(e) => tracing::error!(error = %e, "pipeline task failed"),
    }
    uplink_stop.cancel();
    if let Some(task) = uplink_task {
        let _ = task.await;
    }
    if let Some(task) = http {
        let _ = task.await;
    }
    failure.map_or(Ok(()), Err)
}

/// Installs the SIGTERM and SIGINT handlers now (a signal that arrives
/// while the store opens or the listeners bind is not lost, nor does it
/// kill the process) and returns the future that resolves on the first.
fn wait_for_signal() -> impl std::future::Future<Output = std::io::Result<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = signal(SignalKind::terminate())
        .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    async move {
        let (mut term, mut int) = handlers?;
        Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        })
    }
}
