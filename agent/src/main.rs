//! `millrace-agent`: the edge agent's command line.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use millrace_agent::config::AgentConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Millrace edge agent: reads PLCs over Modbus TCP/RTU and sensors over MQTT,
/// computes event-time windows and anomaly scores, and forwards them.
#[derive(Debug, Parser)]
#[command(name = "millrace-agent", version, about, long_about = None)]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "MILLRACE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: sources → window engine → anomaly scorer → outputs.
    ///
    /// SIGINT or SIGTERM stops ingest, flushes every open window and exits 0.
    /// Exits 75 when the store refuses writes (a full disk): restarting
    /// reopens it, and nothing unacknowledged is lost. Other errors exit 1.
    /// Log verbosity follows RUST_LOG (default: info).
    Run {
        /// The agent config (TOML); see config/agent.toml for every key.
        #[arg(long, short)]
        config: PathBuf,
        /// Also write every window, alert and dead letter as one JSON object per
        /// line to this file (appended), or to standard output with `-`.
        #[arg(long)]
        tap: Option<PathBuf>,
    },
    /// Validate a config file and exit: 0 when valid, 2 with an error naming
    /// the file and the key otherwise.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Read a device password from standard input (first line) and print
    /// its Argon2id hash for `[[broker.users]] password-hash`.
    HashPassword,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::HashPassword => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("error: reading the password: {e}");
                return ExitCode::from(2);
            }
            let password = line.trim_end_matches(['\r', '\n']);
            if password.len() < 8 {
                eprintln!("error: a device password needs at least 8 characters");
                return ExitCode::from(2);
            }
            match millrace_agent::ingest::listener::auth::hash_password(password.as_bytes()) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file } => match AgentConfig::load(&file) {
            Ok(cfg) => {
                println!("{}: ok ({})", file.display(), cfg.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config, tap } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match run(cfg, tap) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "agent stopped with an error");
                    eprintln!("error: {e:#}");
                    let code = e
                        .downcast_ref::<millrace_agent::runtime::RuntimeError>()
                        .map_or(1, millrace_agent::runtime::RuntimeError::exit_code);
                    ExitCode::from(code)
                }
            }
        }
    }
}

/// glibc's allocator gives each thread that allocates its own arena (up to
/// 8 per core), each keeping the memory its thread freed: about 4.5 MiB of
/// the agent's peak RSS under load (`benches` `ingest_load`, 24.2 → 19.7
/// MiB at 20 000 readings/s) spread over the runtime's workers, the store's
/// worker and the blocking pool. One arena is enough: the hot path allocates
/// little, and glibc's per-thread cache serves most of it without the
/// arena's lock. `MALLOC_ARENA_MAX` (or `GLIBC_TUNABLES`) set by the
/// operator wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    // SAFETY: called first thing in `main`, before any other thread exists;
    // `mallopt` only sets an allocator parameter and reports failure with 0,
    // which leaves the default (many arenas) in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// One async worker. The agent's work is one pipeline fed by a few sources;
/// with two workers every hand-over between a connection and the pipeline
/// woke the other thread (a futex wake and a context switch, about 9 µs in
/// `finish_task_switch` on this class of VM), which is what a steady device
/// stream costs most. Measured with `benches` `ingest_load`: bursts 1.06 →
/// 0.75 CPU-s per 1M readings (and faster: 1.8 → 1.5 s for 1M), paced the
/// same or better. Blocking work (fsync, store writes) leaves the worker
/// through `block_in_place`/`spawn_blocking`; the store has its own thread.
const ASYNC_WORKERS: usize = 1;

fn run(cfg: AgentConfig, tap: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ASYNC_WORKERS)
        .enable_all()
        .thread_name("millrace")
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(millrace_agent::runtime::run(cfg, tap))?)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
