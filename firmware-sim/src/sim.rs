//! The running simulation: every server and sensor of a plant, under one
//! cancellation token.
//!
//! [`Simulation::start`] binds every Modbus TCP listener first (so a port
//! conflict fails the start, and tests can read the bound addresses), then
//! spawns one task per TCP server, one per RTU slave and one for all MQTT
//! sensors into a `JoinSet`. If a task fails, the rest are cancelled.
//!
//! What it is not: a supervisor. A failed Modbus TCP server is not restarted;
//! the simulation stops and reports why. (The RTU slave and the MQTT
//! connection do retry by themselves: serial devices and brokers come and go.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::SimConfig;
use crate::modbus::{bind_tcp, serve_rtu, serve_tcp, ModbusServerError};
use crate::signal::{align_down, Signal};
use crate::unix_now_ms;

/// Command-line overrides applied on top of the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replaces the file's `seed`.
    pub seed: Option<u64>,
    /// Replaces `mqtt.broker`.
    pub mqtt_broker: Option<(String, u16)>,
    /// Added to every non-zero Modbus TCP listen port.
    pub modbus_port_offset: u16,
    /// Simulation start (Unix ms); defaults to now, rounded down to the second.
    pub start_ms: Option<i64>,
    /// `device name → serial path` overrides for RTU slaves.
    pub rtu_devices: Vec<(String, PathBuf)>,
    /// Run without the MQTT sensors.
    pub no_mqtt: bool,
    /// Run without the RTU slaves.
    pub no_rtu: bool,
}

/// Errors starting or running the simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Modbus(#[from] ModbusServerError),
    #[error("`--modbus-port-offset {offset}` moves `{device}` past port 65535")]
    PortOffset { device: String, offset: u16 },
    #[error("`--rtu-device`: no RTU slave named `{0}` in the config")]
    UnknownRtuDevice(String),
    #[error("simulation task panicked: {0}")]
    TaskPanicked(String),
}

/// A started simulation.
#[derive(Debug)]
pub struct Simulation {
    config: SimConfig,
    start_ms: i64,
    tcp_addrs: BTreeMap<String, SocketAddr>,
    cancel: CancellationToken,
    tasks: JoinSet<Result<(), SimError>>,
}

impl Simulation {
    /// Applies `options` to `config`, binds the Modbus listeners and starts every task.
    pub async fn start(mut config: SimConfig, options: RunOptions) -> Result<Self, SimError> {
        if let Some(seed) = options.seed {
            config.seed = seed;
        }
        if let Some((host, port)) = options.mqtt_broker {
            config.mqtt.host = host;
            config.mqtt.port = port;
        }
        for server in &mut config.modbus_tcp {
            let port = server.listen.port();
            if port != 0 {
                let shifted = port
                    .checked_add(options.modbus_port_offset)
                    .ok_or_else(|| SimError::PortOffset {
                        device: server.name.clone(),
                        offset: options.modbus_port_offset,
                    })?;
                server.listen.set_port(shifted);
            }
        }
        for (name, path) in options.rtu_devices {
            let slave = config
                .modbus_rtu
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or(SimError::UnknownRtuDevice(name))?;
            slave.device = path;
        }
        if options.no_mqtt {
            config.mqtt_sensors.clear();
            config.sparkplug_nodes.clear();
        }
        if options.no_rtu {
            config.modbus_rtu.clear();
        }
        // Whole seconds, so anomaly offsets line up with the sampling grids.
        let start_ms = options
            .start_ms
            .unwrap_or_else(|| align_down(unix_now_ms(), 1000));
        config.set_start_ms(start_ms);

        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut tcp_addrs = BTreeMap::new();
        let mut listeners = Vec::new();
        for server in &config.modbus_tcp {
            let listener = bind_tcp(server).await?;
            let addr = listener
                .local_addr()
                .map_err(|source| ModbusServerError::Bind {
                    device: server.name.clone(),
                    addr: server.listen,
                    source,
                })?;
            tcp_addrs.insert(server.name.clone(), addr);
            listeners.push((listener, server.clone()));
        }
        let seed = config.seed;
        for (listener, server) in listeners {
            let cancel = cancel.clone();
            tasks.spawn(async move {
                serve_tcp(listener, server, seed, cancel)
                    .await
                    .map_err(SimError::from)
            });
        }
        for slave in config.modbus_rtu.clone() {
            let cancel = cancel.clone();
            tasks.spawn(async move {
                serve_rtu(slave, seed, cancel).await;
                Ok(())
            });
        }
        if !config.mqtt_sensors.is_empty() {
            let mqtt = config.mqtt.clone();
            let sensors = config.mqtt_sensors.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                crate::mqtt::run_sensors(mqtt, sensors, seed, cancel).await;
                Ok(())
            });
        }
        for node in config.sparkplug_nodes.clone() {
            let mqtt = config.mqtt.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                crate::sparkplug::run_node(mqtt, node, seed, cancel).await;
                Ok(())
            });
        }
        info!(seed, start_ms, modbus_tcp = ?tcp_addrs, rtu = config.modbus_rtu.len(), mqtt_sensors = config.mqtt_sensors.len(), sparkplug_nodes = config.sparkplug_nodes.len(), "simulation started");
        Ok(Self {
            config,
            start_ms,
            tcp_addrs,
            cancel,
            tasks,
        })
    }

    /// The effective configuration (overrides applied, signals started).
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    /// Simulation start, Unix ms: the origin of anomaly times.
    pub fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// The bound address of a Modbus TCP server.
    pub fn modbus_addr(&self, device: &str) -> Option<SocketAddr> {
        self.tcp_addrs.get(device).copied()
    }

    /// The signal of series `device/sensor`, with the simulation's start.
    pub fn signal(&self, series: &str) -> Option<&Signal> {
        self.config.series().get(series).copied()
    }

    /// The value series `device/sensor` takes at `t_ms` in this simulation.
    pub fn value_at(&self, series: &str, t_ms: i64) -> Option<f64> {
        self.signal(series)?
            .value_at(self.config.seed, series, t_ms)
    }

    /// A token that stops the simulation when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs until cancelled or until a task fails; a failure cancels the rest.
    pub async fn wait(mut self) -> Result<(), SimError> {
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            let result = joined
                .map_err(|e| SimError::TaskPanicked(e.to_string()))
                .and_then(|r| r);
            if let Err(err) = result {
                error!(error = %err, "simulation task failed; stopping");
                self.cancel.cancel();
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(self) -> Result<(), SimError> {
        self.cancel.cancel();
        self.wait().await
    }
}
