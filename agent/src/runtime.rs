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
}

/// Runs the agent until SIGINT/SIGTERM (returns `Ok`) or a fatal error.
pub async fn run(cfg: AgentConfig, tap: Option<PathBuf>) -> Result<(), RuntimeError> {
    let shutdown = CancellationToken::new();
    let mut outputs: Vec<Box<dyn Output>> = Vec::new();
    if let Some(path) = tap {
        let t = Tap::open(&path).map_err(|source| RuntimeError::Tap { path, source })?;
        outputs.push(Box::new(t));
    }

    // The store first: recovery decides what the window engine starts from.
    let dir = cfg.agent.data_dir.clone();
    let (store, recovery) = {
        let (open_dir, store_cfg) = (dir.clone(), cfg.store());
        tokio::task::spawn_blocking(move || Store::open(&open_dir, store_cfg))
            .await
            .map_err(|e| RuntimeError::Store {
                dir: dir.clone(),
                source: crate::store::StoreError::Task(e.to_string()),
            })?
            .map_err(|source| RuntimeError::Store { dir, source })?
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
    let heartbeat = service::Heartbeat::default();
    heartbeat.beat();
    let beat = heartbeat.clone();
    let pipeline = tokio::spawn(async move {
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
    let watchdog = tokio::spawn(service::watchdog(heartbeat, shutdown.clone()));
    tracing::info!(agent = %cfg.agent.id, "agent running");
    service::ready(&format!("agent {} running", cfg.agent.id));

    let mut failure = None;
    let signals = wait_for_signal();
    tokio::pin!(signals);
    loop {
        tokio::select! {
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
    match pipeline.await {
        Ok(_) => {}
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

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
