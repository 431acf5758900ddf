//! `millrace-sim`: the firmware simulator's command line.
//!
//! `run` serves the plant of a config file, `load` publishes a bounded MQTT
//! load, `publish` publishes a fixed number of readings and reports which were
//! acknowledged, `check-config` validates a plant file. SIGINT/SIGTERM stop
//! cleanly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use millrace_sim::config::{parse_host_port, SimConfig};
use millrace_sim::load::{run_load, LoadOptions};
use millrace_sim::publish::{run_publish, PublishOptions};
use millrace_sim::sim::{RunOptions, Simulation};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Simulated PLCs (Modbus TCP/RTU) and MQTT sensors with deterministic signals
/// and injected anomalies, for Millrace demos, tests and load.
#[derive(Debug, Parser)]
#[command(name = "millrace-sim", version)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "MILLRACE_SIM_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the plant described by a config file until SIGINT/SIGTERM.
    ///
    /// Log filtering follows RUST_LOG (default `info`).
    Run {
        /// Plant config file (see config/sim.toml).
        #[arg(long, short)]
        config: PathBuf,
        /// Seed of every signal's noise; overrides `seed` in the file.
        #[arg(long)]
        seed: Option<u64>,
        /// MQTT broker HOST:PORT; overrides `mqtt.broker` in the file.
        #[arg(long, value_name = "HOST:PORT")]
        mqtt: Option<String>,
        /// Added to every Modbus TCP listen port in the file (port 0 stays 0).
        #[arg(long, default_value_t = 0)]
        modbus_port_offset: u16,
        /// Simulation start as Unix ms (origin of anomaly times); default now, rounded down to the second.
        #[arg(long)]
        start_ms: Option<i64>,
        /// Serial device of an RTU slave, NAME=PATH (repeatable); overrides `device`.
        #[arg(long, value_name = "NAME=PATH")]
        rtu_device: Vec<String>,
        /// Do not start the MQTT sensors.
        #[arg(long)]
        no_mqtt: bool,
        /// Do not start the Modbus RTU slaves.
        #[arg(long)]
        no_rtu: bool,
    },
    /// Publish a bounded MQTT load and print the achieved rate.
    ///
    /// Batches go to <prefix>/<device>/batch as a JSON array of
    /// {"series","ts","value"}; with --per-message 1 each reading goes to
    /// <prefix>/<device>/<sensor> as {"ts","value"}.
    Load {
        /// Broker HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        broker: String,
        /// Target readings per second.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// Number of series the readings are spread over.
        #[arg(long, default_value_t = 100)]
        series: usize,
        /// Number of devices the series are grouped into.
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Readings per MQTT message.
        #[arg(long, default_value_t = 10)]
        per_message: usize,
        /// How long to publish, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = humantime_serde::re::humantime::parse_duration)]
        duration: Duration,
        /// First topic level.
        #[arg(long, default_value = "load")]
        topic_prefix: String,
        /// MQTT QoS (0 or 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Most unacknowledged QoS 1 messages on the wire.
        #[arg(long, default_value_t = 500)]
        inflight: u16,
        /// Seed of the values.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How long to wait for acknowledgements after the last publish.
        #[arg(long, default_value = "10s", value_parser = humantime_serde::re::humantime::parse_duration)]
        drain_timeout: Duration,
        /// Print the report as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish a fixed number of readings over one pipelined MQTT 3.1.1
    /// connection and report how many the broker acknowledged.
    ///
    /// Series i is device d{i % devices}, sensor s{i}, topic
    /// <prefix>/<device>/<sensor>, payload
    /// {"device":"d3","sensor":"s17","ts":<unix ms>,"value":50.123}; messages go
    /// round-robin over the series, ts strictly increasing per series. The
    /// report is one JSON object: sent, acked, unacked, qos, connections,
    /// republished, elapsed_s, rate, ...
    Publish {
        /// Broker HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        broker: String,
        /// Distinct messages (one reading each).
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Number of series the messages go round-robin over.
        #[arg(long, default_value_t = 1000)]
        series: usize,
        /// Number of devices the series are spread over.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// MQTT QoS (0 or 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Most unacknowledged QoS 1 messages on the wire.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
        inflight: u16,
        /// Readings per second, open loop against the wall clock; 0 = as fast as possible.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// First topic level.
        #[arg(long, default_value = "sensors")]
        topic_prefix: String,
        /// MQTT client id.
        #[arg(long, default_value = "millrace-publish")]
        client_id: String,
        /// After a dropped connection, reconnect and republish what was not acknowledged.
        #[arg(long)]
        reconnect: bool,
        /// With --reconnect: stop after this long without a successful connect.
        #[arg(long, default_value = "120s", value_parser = humantime_serde::re::humantime::parse_duration)]
        give_up_after: Duration,
        /// How long to wait for missing acknowledgements after the last write.
        #[arg(long, default_value = "30s", value_parser = humantime_serde::re::humantime::parse_duration)]
        drain_timeout: Duration,
        /// Write `<device>/<sensor> <ts> <value>` per acked (QoS 0: sent) message to this file.
        #[arg(long, value_name = "PATH")]
        acked_out: Option<PathBuf>,
        /// Step event time by this much per reading of a series (ending about
        /// now) instead of following the wall clock: a device replaying what
        /// it buffered through an outage, e.g. "1s".
        #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
        event_step: Option<Duration>,
        /// Where the JSON report goes; `-` is standard output.
        #[arg(long, value_name = "PATH|-", default_value = "-")]
        report: PathBuf,
    },
    /// Validate a plant config file and list its series.
    CheckConfig {
        /// Plant config file.
        file: PathBuf,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping"),
            _ = term.recv() => info!("SIGTERM received; stopping"),
        }
        token.cancel();
    });
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => {
            let config = SimConfig::load(&file)?;
            println!("{}: ok", file.display());
            for (series, signal) in config.series() {
                println!("  {series}  ({} anomalies)", signal.anomalies.len());
            }
            Ok(())
        }
        Command::Run {
            config,
            seed,
            mqtt,
            modbus_port_offset,
            start_ms,
            rtu_device,
            no_mqtt,
            no_rtu,
        } => {
            let plant = SimConfig::load(&config)?;
            let mqtt_broker = match mqtt {
                Some(s) => Some(
                    parse_host_port(&s)
                        .with_context(|| format!("--mqtt `{s}`: expected HOST:PORT"))?,
                ),
                None => None,
            };
            let mut rtu_devices = Vec::new();
            for spec in rtu_device {
                let Some((name, path)) = spec.split_once('=') else {
                    bail!("--rtu-device `{spec}`: expected NAME=PATH");
                };
                rtu_devices.push((name.to_owned(), PathBuf::from(path)));
            }
            let options = RunOptions {
                seed,
                mqtt_broker,
                modbus_port_offset,
                start_ms,
                rtu_devices,
                no_mqtt,
                no_rtu,
            };
            // Signals are caught from before the start log line on, so a
            // supervisor's SIGTERM right after "simulation started" stops
            // the simulation cleanly instead of killing the process.
            let stop = CancellationToken::new();
            cancel_on_signals(stop.clone())?;
            let sim = Simulation::start(plant, options).await?;
            let sim_stop = sim.cancel_token();
            tokio::spawn(async move {
                stop.cancelled().await;
                sim_stop.cancel();
            });
            sim.wait().await?;
            info!("simulation stopped");
            Ok(())
        }
        Command::Publish {
            broker,
            messages,
            series,
            devices,
            qos,
            inflight,
            rate,
            topic_prefix,
            client_id,
            reconnect,
            give_up_after,
            drain_timeout,
            acked_out,
            event_step,
            report,
        } => {
            let opts = PublishOptions {
                broker,
                messages,
                series,
                devices,
                qos: mqtt_qos(qos),
                inflight,
                rate,
                topic_prefix,
                client_id,
                reconnect,
                give_up_after,
                drain_timeout,
                acked_out,
                event_step,
            };
            let cancel = CancellationToken::new();
            cancel_on_signals(cancel.clone())?;
            let outcome = run_publish(opts, cancel).await?;
            let line = serde_json::to_string(&outcome)?;
            if report.as_os_str() == "-" {
                println!("{line}");
            } else {
                std::fs::write(&report, format!("{line}\n"))
                    .with_context(|| format!("writing the report to {}", report.display()))?;
            }
            Ok(())
        }
        Command::Load {
            broker,
            rate,
            series,
            devices,
            per_message,
            duration,
            topic_prefix,
            qos,
            inflight,
            seed,
            drain_timeout,
            json,
        } => {
            let (broker_host, broker_port) = parse_host_port(&broker)
                .with_context(|| format!("--broker `{broker}`: expected HOST:PORT"))?;
            let opts = LoadOptions {
                broker_host,
                broker_port,
                rate,
                series,
                devices,
                per_message,
                duration,
                topic_prefix,
                qos: mqtt_qos(qos),
                seed,
                inflight,
                queue_capacity: 1024,
                connect_timeout: Duration::from_secs(5),
                drain_timeout,
            };
            let cancel = CancellationToken::new();
            cancel_on_signals(cancel.clone())?;
            let report = run_load(opts, cancel).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "target {:.0} readings/s; sent {} readings in {} messages over {:.2}s (offered {:.0} readings/s); \
                     acked {} messages, achieved {:.0} readings/s over {:.2}s; connection errors {}",
                    report.target_rate,
                    report.readings_sent,
                    report.messages_sent,
                    report.publish_secs,
                    report.offered_rate,
                    report.messages_acked,
                    report.acked_rate,
                    report.total_secs,
                    report.connection_errors,
                );
            }
            Ok(())
        }
    }
}

/// The MQTT QoS of a `--qos` argument (0, else 1; clap checks the range).
fn mqtt_qos(qos: u8) -> rumqttc::QoS {
    if qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}
