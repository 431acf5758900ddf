//! `millrace-aggregator`: central ingest, dedup and log writer.
//!
//! ```text
//! millrace-aggregator run --config /etc/millrace/aggregator.toml
//! millrace-aggregator check-config /etc/millrace/aggregator.toml
//! millrace-aggregator tail --config aggregator.toml millrace.alerts --from-beginning --follow
//! ```

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use millrace_aggregator::config::{Config, SinkConfig};
use millrace_aggregator::tail::{tail, StartAt, TailOptions};
use millrace_aggregator::Aggregator;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Millrace aggregator: receives batches from Millrace agents over HTTP,
/// deduplicates them by (agent, seq), and writes windows, alerts and dead
/// letters to Kafka or to an embedded log on local disk.
///
/// Logging: `RUST_LOG` selects levels (default `info`), e.g.
/// `RUST_LOG=millrace_aggregator=debug,librdkafka=warn`.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the ingest API until SIGINT or SIGTERM.
    ///
    /// Endpoints: `POST /api/v1/ingest` (Bearer token; body a batch as
    /// application/x-millrace-batch or application/json, optionally gzip) and
    /// `GET /healthz` (200 when the log writer is healthy, 503 otherwise).
    Run {
        /// The TOML configuration (see config/aggregator.toml for every key).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a configuration file and print its effective settings; exit
    /// status 0 when valid. Tokens are not printed.
    CheckConfig {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Read an agent token from standard input (first line) and print its
    /// `sha256:` digest for `[[agents]] token-hashes`.
    HashToken,
    /// Print the records of an embedded-log topic, one JSON line each
    /// (offset, key, headers, value). Safe to run next to a running aggregator.
    Tail {
        /// The topic, e.g. millrace.windows, millrace.alerts, millrace.dead-letters.
        topic: String,
        /// Take the log directory from this configuration file.
        #[arg(long, short, value_name = "FILE", conflicts_with = "log_dir")]
        config: Option<PathBuf>,
        /// The embedded log directory (`[log] dir`, default `<data-dir>/log`).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
        /// Start at the first record (default: only records appended from now on).
        #[arg(long, conflicts_with = "from_offset")]
        from_beginning: bool,
        /// Start at this offset.
        #[arg(long, value_name = "OFFSET")]
        from_offset: Option<u64>,
        /// Keep printing records as they are appended.
        #[arg(long, short)]
        follow: bool,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::HashToken => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the token")?;
            let token = line.trim();
            anyhow::ensure!(token.len() >= 16, "a token needs at least 16 characters");
            println!("{}", millrace_aggregator::config::token_hash_string(token));
            Ok(())
        }
        Command::Tail {
            topic,
            config,
            log_dir,
            from_beginning,
            from_offset,
            follow,
        } => {
            let log_dir = match (log_dir, config) {
                (Some(dir), _) => dir,
                (None, Some(file)) => match Config::load(&file)?.sink {
                    SinkConfig::Local(local) => local.dir,
                    SinkConfig::Kafka(_) => anyhow::bail!(
                        "{}: Kafka is configured; read the topic with a Kafka client",
                        file.display()
                    ),
                },
                (None, None) => anyhow::bail!("tail needs --config FILE or --log-dir DIR"),
            };
            let start = match (from_beginning, from_offset) {
                (true, _) => StartAt::Beginning,
                (false, Some(offset)) => StartAt::Offset(offset),
                (false, None) => StartAt::End,
            };
            let options = TailOptions {
                log_dir,
                topic,
                start,
                follow,
                poll_interval: Duration::from_millis(200),
            };
            tail(&options, &mut std::io::stdout().lock())?;
            Ok(())
        }
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!("{}: ok", path.display());
    println!("listen: {}", config.listen);
    println!("data-dir: {}", config.data_dir.display());
    println!("max-body: {} bytes", config.max_body_bytes);
    let ids: Vec<&str> = config.agents.iter().map(|a| a.id.as_str()).collect();
    println!("agents: {}", ids.join(", "));
    println!(
        "topics: {}, {}, {}",
        config.topics.windows, config.topics.alerts, config.topics.dead_letters
    );
    match &config.sink {
        SinkConfig::Kafka(k) => println!(
            "log: kafka brokers={} message-timeout={:?} max-in-flight={}",
            k.brokers, k.message_timeout, k.max_in_flight
        ),
        SinkConfig::Local(l) => println!(
            "log: embedded dir={} segment-size={} bytes retention-age={} retention-size={}",
            l.dir.display(),
            l.segment_bytes,
            l.retention.max_age.map_or("forever".into(), |age| {
                humantime_serde::re::humantime::format_duration(age).to_string()
            }),
            l.retention
                .max_bytes
                .map_or("unlimited".into(), |b| format!("{b} bytes")),
        ),
    }
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let aggregator = Aggregator::open(&config)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let local = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        // Handlers are installed before "ready": a SIGTERM right after it
        // is a clean stop.
        tokio::spawn(wait_for_signal(shutdown.clone()));
        tracing::info!(listen = %local, "millrace-aggregator ready");
        #[cfg(unix)]
        tokio::spawn(reload_on_sighup(
            path.to_owned(),
            Arc::clone(aggregator.ingest()),
            aggregator.tls().cloned(),
            aggregator.dashboard().cloned(),
            shutdown.clone(),
        ));
        let status = format!("serving on {local}");
        if let Err(error) = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]) {
            tracing::warn!(%error, "sd_notify READY failed");
        }
        tokio::spawn(watchdog(shutdown.clone()));
        aggregator.serve(listener, shutdown).await?;
        tracing::info!("millrace-aggregator stopped");
        Ok(())
    })
}

/// Pings the systemd watchdog (`WatchdogSec=`) from the async runtime, so a
/// wedged runtime stops pinging and is restarted; outside systemd it returns
/// at once. A broker outage does not stop the pings: the aggregator answers
/// 503 and keeps running.
async fn watchdog(shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                return;
            }
            () = tokio::time::sleep(interval / 2) => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }
}

/// On SIGHUP, reads the config file again and applies the agents' tokens
/// (rotation, revocation), the TLS files and the dashboard's credentials
/// without a restart. A file that no longer parses changes nothing (logged).
#[cfg(unix)]
async fn reload_on_sighup(
    path: std::path::PathBuf,
    ingest: Arc<millrace_aggregator::ingest::Ingest>,
    tls: Option<millrace_aggregator::tls::Reloadable>,
    dashboard: Option<Arc<millrace_aggregator::dashboard::Dashboard>>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: tokens reload only with a restart");
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match Config::load(&path) {
            Ok(config) => {
                if let (Some(running), Some(files)) = (&tls, &config.tls) {
                    // Checked by Config::load already; built again here.
                    if let Ok(server) = millrace_aggregator::tls::server_config(files) {
                        *running.write().unwrap_or_else(|e| e.into_inner()) = server;
                        tracing::info!("TLS certificate and client CA reloaded");
                    }
                }
                if let Some(dashboard) = &dashboard {
                    if dashboard.set_auth(config.dashboard.auth.clone()) {
                        tracing::info!("dashboard credentials reloaded; browser sessions ended");
                    }
                }
                let agents = config.agents.len();
                let needs_restart = ingest.reload_credentials(config.agents);
                ingest
                    .stats()
                    .config_reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(file = %path.display(), agents, "agent tokens reloaded");
                if !needs_restart.is_empty() {
                    tracing::warn!(?needs_restart, "agents added or removed take effect at the next restart (removed ones are refused from now)");
                }
            }
            Err(error) => {
                ingest
                    .stats()
                    .config_reload_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(%error, "config reload failed; the running tokens are kept");
            }
        }
    }
}

/// Installs the SIGTERM handler now and returns the future that cancels
/// `shutdown` on SIGTERM or SIGINT.
fn wait_for_signal(shutdown: CancellationToken) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => Some(term),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the aggregator");
            None
        }
    };
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = ctrl_c.await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown requested");
        shutdown.cancel();
    }
}
