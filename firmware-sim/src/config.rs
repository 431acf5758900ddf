//! Simulator configuration: the plant (servers, points, sensors, signals,
//! anomalies, faults) read from TOML.
//!
//! Two stages. The `Raw*` structs mirror the file (kebab-case keys, unknown
//! keys rejected, durations as `"5s"`); [`SimConfig::from_toml`] checks them
//! and builds a [`SimConfig`] whose every error names the file and the key
//! (`modbus-tcp[0].points[2].address`). Defaults live in the `default_*`
//! functions of this module and nowhere else.
//!
//! What it is not: a runtime. Nothing here opens sockets; see
//! [`crate::sim`]. Anomaly times are offsets from the simulation start, which
//! is only known when the simulation runs ([`Signal::start_ms`] is 0 here).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::encoding::{DataType, WordOrder};
use crate::signal::{Anomaly, AnomalyKind, Signal};

/// A configuration error, naming the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: key `{key}`: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

// ---------------------------------------------------------------- raw stage

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    /// Seed of every signal's noise and of fault decisions.
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    mqtt: Option<RawMqtt>,
    #[serde(default)]
    modbus_tcp: Vec<RawModbusTcp>,
    #[serde(default)]
    modbus_rtu: Vec<RawModbusRtu>,
    #[serde(default)]
    mqtt_sensor: Vec<RawMqttSensor>,
    #[serde(default)]
    sparkplug_node: Vec<RawSparkplugNode>,
    #[serde(default)]
    anomaly: Vec<RawAnomaly>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSparkplugNode {
    group: String,
    node: String,
    #[serde(default)]
    device: Option<String>,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    metrics: Vec<RawField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMqtt {
    /// `host:port` of the broker.
    broker: String,
    #[serde(default = "default_client_id")]
    client_id: String,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    keep_alive: Duration,
    #[serde(default = "default_reconnect_delay", with = "humantime_serde")]
    reconnect_delay: Duration,
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawModbusFaults {
    #[serde(default, with = "humantime_serde")]
    slow_response: Option<Duration>,
    #[serde(default)]
    exception_rate: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    disconnect_every: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawModbusTcp {
    name: String,
    listen: SocketAddr,
    unit_id: u8,
    #[serde(default = "default_refresh", with = "humantime_serde")]
    refresh: Duration,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    faults: RawModbusFaults,
    #[serde(default)]
    points: Vec<RawPoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawModbusRtu {
    name: String,
    device: PathBuf,
    #[serde(default = "default_baud_rate")]
    baud_rate: u32,
    unit_id: u8,
    #[serde(default = "default_refresh", with = "humantime_serde")]
    refresh: Duration,
    #[serde(default = "default_reopen_delay", with = "humantime_serde")]
    reopen_delay: Duration,
    #[serde(default)]
    faults: RawModbusFaults,
    #[serde(default)]
    points: Vec<RawPoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPoint {
    sensor: String,
    table: Table,
    address: u16,
    #[serde(rename = "type")]
    data_type: DataType,
    #[serde(default)]
    order: Option<WordOrder>,
    #[serde(default)]
    scale: Option<f64>,
    #[serde(default)]
    unit: Option<String>,
    signal: RawSignal,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSignal {
    #[serde(default)]
    offset: f64,
    #[serde(default)]
    amplitude: f64,
    #[serde(default, with = "humantime_serde")]
    period: Option<Duration>,
    #[serde(default)]
    noise_stddev: f64,
    #[serde(default)]
    drift_per_hour: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMqttSensor {
    topic: String,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    signal: Option<RawSignal>,
    #[serde(default)]
    fields: Vec<RawField>,
    #[serde(default)]
    malformed_rate: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawField {
    name: String,
    signal: RawSignal,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAnomaly {
    /// `device/sensor`.
    series: String,
    kind: RawAnomalyKind,
    #[serde(default)]
    magnitude: Option<f64>,
    #[serde(with = "humantime_serde")]
    from: Duration,
    #[serde(default, with = "humantime_serde")]
    to: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    every: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawAnomalyKind {
    Spike,
    Step,
    Stuck,
    Dropout,
}

fn default_seed() -> u64 {
    1
}
fn default_client_id() -> String {
    "millrace-sim".to_owned()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(5)
}
fn default_reconnect_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_queue_capacity() -> usize {
    1024
}
fn default_refresh() -> Duration {
    Duration::from_secs(1)
}
fn default_max_connections() -> usize {
    16
}
fn default_baud_rate() -> u32 {
    19_200
}
fn default_reopen_delay() -> Duration {
    Duration::from_secs(5)
}
/// Broker used when the file has no `[mqtt]` table.
pub const DEFAULT_BROKER: &str = "127.0.0.1:1883";

// ------------------------------------------------------------ checked stage

/// Modbus table a point lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Table {
    Holding,
    Input,
    Coil,
    DiscreteInput,
}

impl Table {
    pub fn is_bit_table(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }
}

/// The whole checked simulator configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub mqtt: MqttConfig,
    pub modbus_tcp: Vec<ModbusTcpConfig>,
    pub modbus_rtu: Vec<ModbusRtuConfig>,
    pub mqtt_sensors: Vec<MqttSensorConfig>,
    pub sparkplug_nodes: Vec<SparkplugNodeConfig>,
}

/// A simulated Sparkplug B edge node: its metrics (all Double) live on the
/// node itself, or on its one device when `device` is set.
#[derive(Debug, Clone)]
pub struct SparkplugNodeConfig {
    pub group: String,
    pub node: String,
    pub device: Option<String>,
    pub interval: Duration,
    /// Metric name and signal; aliases are 1, 2, ... in this order.
    pub metrics: Vec<(String, Signal)>,
}

impl SparkplugNodeConfig {
    /// The series device the agent maps these metrics to (its defaults:
    /// `<node>` for node metrics, `<node>.<device>` for device metrics).
    pub fn series_device(&self) -> String {
        match &self.device {
            Some(d) => format!("{}.{d}", self.node),
            None => self.node.clone(),
        }
    }
}

/// Broker connection of the MQTT sensors.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub reconnect_delay: Duration,
    /// Capacity of the publish queue in front of the broker connection; a
    /// reading that finds it full is dropped and counted.
    pub queue_capacity: usize,
}

/// Faults injected by a Modbus server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModbusFaults {
    /// Delay added before every response.
    pub slow_response: Duration,
    /// Fraction (0..=1) of requests answered with `ServerDeviceFailure`.
    pub exception_rate: f64,
    /// Drop each client connection this long after it was accepted (TCP only).
    pub disconnect_every: Option<Duration>,
}

/// One register-mapped sensor.
#[derive(Debug, Clone)]
pub struct PointConfig {
    pub sensor: String,
    pub table: Table,
    pub address: u16,
    pub data_type: DataType,
    pub order: WordOrder,
    /// Engineering value = raw × scale.
    pub scale: f64,
    pub unit: Option<String>,
    pub signal: Signal,
}

/// A simulated Modbus TCP PLC.
#[derive(Debug, Clone)]
pub struct ModbusTcpConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub unit_id: u8,
    /// Sample-and-hold period of the register values.
    pub refresh: Duration,
    pub max_connections: usize,
    pub faults: ModbusFaults,
    pub points: Vec<PointConfig>,
}

/// A simulated Modbus RTU slave on a serial device.
#[derive(Debug, Clone)]
pub struct ModbusRtuConfig {
    pub name: String,
    pub device: PathBuf,
    pub baud_rate: u32,
    pub unit_id: u8,
    pub refresh: Duration,
    /// Wait before retrying when the device cannot be opened.
    pub reopen_delay: Duration,
    pub faults: ModbusFaults,
    pub points: Vec<PointConfig>,
}

/// Payload shape of an MQTT sensor.
#[derive(Debug, Clone)]
pub enum MqttPayload {
    /// `{"ts": ms, "value": x, "unit": "..."}`, one reading per message.
    Single {
        sensor: String,
        unit: Option<String>,
        signal: Signal,
    },
    /// `{"ts": ms, "<field>": x, ...}`, several sensors per message.
    Multi { fields: Vec<(String, Signal)> },
}

/// A simulated MQTT sensor publishing on one topic.
#[derive(Debug, Clone)]
pub struct MqttSensorConfig {
    pub topic: String,
    /// Second topic segment: the series' device.
    pub device: String,
    pub interval: Duration,
    pub payload: MqttPayload,
    /// Fraction (0..=1) of messages replaced by a malformed payload.
    pub malformed_rate: f64,
}

impl SimConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and checks `text`; `path` names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Parse {
                path: path.to_owned(),
                key: if key == "." {
                    "(document)".to_owned()
                } else {
                    key
                },
                message: inner.message().to_owned() + &line_hint(text, inner.span()),
            }
        })?;
        Checker { path }.check(raw)
    }

    /// Every series the plant produces, `device/sensor` → signal.
    pub fn series(&self) -> BTreeMap<String, &Signal> {
        let mut out = BTreeMap::new();
        for server in &self.modbus_tcp {
            for p in &server.points {
                out.insert(format!("{}/{}", server.name, p.sensor), &p.signal);
            }
        }
        for server in &self.modbus_rtu {
            for p in &server.points {
                out.insert(format!("{}/{}", server.name, p.sensor), &p.signal);
            }
        }
        for s in &self.mqtt_sensors {
            match &s.payload {
                MqttPayload::Single { sensor, signal, .. } => {
                    out.insert(format!("{}/{}", s.device, sensor), signal);
                }
                MqttPayload::Multi { fields } => {
                    for (name, signal) in fields {
                        out.insert(format!("{}/{}", s.device, name), signal);
                    }
                }
            }
        }
        for n in &self.sparkplug_nodes {
            for (name, signal) in &n.metrics {
                out.insert(format!("{}/{name}", n.series_device()), signal);
            }
        }
        out
    }

    /// Sets every signal's start (anomaly and phase origin) to `start_ms`.
    pub fn set_start_ms(&mut self, start_ms: i64) {
        for p in self
            .modbus_tcp
            .iter_mut()
            .flat_map(|s| s.points.iter_mut())
            .chain(self.modbus_rtu.iter_mut().flat_map(|s| s.points.iter_mut()))
        {
            p.signal.start_ms = start_ms;
        }
        for s in &mut self.mqtt_sensors {
            match &mut s.payload {
                MqttPayload::Single { signal, .. } => signal.start_ms = start_ms,
                MqttPayload::Multi { fields } => fields
                    .iter_mut()
                    .for_each(|(_, signal)| signal.start_ms = start_ms),
            }
        }
        for n in &mut self.sparkplug_nodes {
            n.metrics
                .iter_mut()
                .for_each(|(_, signal)| signal.start_ms = start_ms);
        }
    }
}

fn line_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) if span.start <= text.len() => {
            let line = text[..span.start].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        _ => String::new(),
    }
}

/// Splits `host:port`.
pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn check(&self, raw: RawConfig) -> Result<SimConfig, ConfigError> {
        let mqtt = match raw.mqtt {
            Some(m) => {
                let (host, port) = parse_host_port(&m.broker)
                    .ok_or_else(|| self.err("mqtt.broker", "expected `host:port`"))?;
                if m.queue_capacity == 0 {
                    return Err(self.err("mqtt.queue-capacity", "must be at least 1"));
                }
                MqttConfig {
                    host,
                    port,
                    client_id: m.client_id,
                    keep_alive: m.keep_alive,
                    reconnect_delay: m.reconnect_delay,
                    queue_capacity: m.queue_capacity,
                }
            }
            None => MqttConfig {
                host: "127.0.0.1".to_owned(),
                port: 1883,
                client_id: default_client_id(),
                keep_alive: default_keep_alive(),
                reconnect_delay: default_reconnect_delay(),
                queue_capacity: default_queue_capacity(),
            },
        };

        let mut names = HashSet::new();
        let mut modbus_tcp = Vec::new();
        for (i, s) in raw.modbus_tcp.into_iter().enumerate() {
            let key = format!("modbus-tcp[{i}]");
            self.check_device_name(&mut names, &s.name, &format!("{key}.name"))?;
            let refresh = self.check_refresh(s.refresh, &key)?;
            if s.max_connections == 0 {
                return Err(self.err(format!("{key}.max-connections"), "must be at least 1"));
            }
            modbus_tcp.push(ModbusTcpConfig {
                faults: self.check_faults(s.faults, &key, true)?,
                points: self.check_points(s.points, &key)?,
                name: s.name,
                listen: s.listen,
                unit_id: s.unit_id,
                refresh,
                max_connections: s.max_connections,
            });
        }
        let mut modbus_rtu = Vec::new();
        for (i, s) in raw.modbus_rtu.into_iter().enumerate() {
            let key = format!("modbus-rtu[{i}]");
            self.check_device_name(&mut names, &s.name, &format!("{key}.name"))?;
            let refresh = self.check_refresh(s.refresh, &key)?;
            if s.baud_rate == 0 {
                return Err(self.err(format!("{key}.baud-rate"), "must be positive"));
            }
            if s.unit_id == 0 || s.unit_id > 247 {
                return Err(self.err(format!("{key}.unit-id"), "an RTU slave id is 1..=247"));
            }
            modbus_rtu.push(ModbusRtuConfig {
                faults: self.check_faults(s.faults, &key, false)?,
                points: self.check_points(s.points, &key)?,
                name: s.name,
                device: s.device,
                baud_rate: s.baud_rate,
                unit_id: s.unit_id,
                refresh,
                reopen_delay: s.reopen_delay,
            });
        }

        let mut mqtt_sensors = Vec::new();
        let mut topics = HashSet::new();
        for (i, s) in raw.mqtt_sensor.into_iter().enumerate() {
            let key = format!("mqtt-sensor[{i}]");
            mqtt_sensors.push(self.check_mqtt_sensor(s, &key, &mut topics)?);
        }

        let mut sparkplug_nodes = Vec::new();
        for (i, n) in raw.sparkplug_node.into_iter().enumerate() {
            let key = format!("sparkplug-node[{i}]");
            sparkplug_nodes.push(self.check_sparkplug_node(n, &key)?);
        }

        let mut config = SimConfig {
            seed: raw.seed,
            mqtt,
            modbus_tcp,
            modbus_rtu,
            mqtt_sensors,
            sparkplug_nodes,
        };
        for (i, a) in raw.anomaly.into_iter().enumerate() {
            self.attach_anomaly(&mut config, a, &format!("anomaly[{i}]"))?;
        }
        self.check_unique_series(&config)?;
        Ok(config)
    }

    fn check_device_name(
        &self,
        names: &mut HashSet<String>,
        name: &str,
        key: &str,
    ) -> Result<(), ConfigError> {
        if name.is_empty() || name.contains('/') || name.contains(char::is_whitespace) {
            return Err(self.err(key, "must be non-empty, without `/` or spaces"));
        }
        if !names.insert(name.to_owned()) {
            return Err(self.err(key, format!("duplicate device name `{name}`")));
        }
        Ok(())
    }

    fn check_refresh(&self, refresh: Duration, key: &str) -> Result<Duration, ConfigError> {
        if refresh.as_millis() == 0 {
            return Err(self.err(format!("{key}.refresh"), "must be at least 1ms"));
        }
        Ok(refresh)
    }

    fn check_faults(
        &self,
        raw: RawModbusFaults,
        key: &str,
        tcp: bool,
    ) -> Result<ModbusFaults, ConfigError> {
        let exception_rate = raw.exception_rate.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&exception_rate) {
            return Err(self.err(
                format!("{key}.faults.exception-rate"),
                "must be within 0..=1",
            ));
        }
        if let Some(every) = raw.disconnect_every {
            if !tcp {
                return Err(self.err(
                    format!("{key}.faults.disconnect-every"),
                    "only applies to Modbus TCP servers",
                ));
            }
            if every.is_zero() {
                return Err(self.err(format!("{key}.faults.disconnect-every"), "must be positive"));
            }
        }
        Ok(ModbusFaults {
            slow_response: raw.slow_response.unwrap_or_default(),
            exception_rate,
            disconnect_every: raw.disconnect_every,
        })
    }

    fn check_points(&self, raw: Vec<RawPoint>, key: &str) -> Result<Vec<PointConfig>, ConfigError> {
        let mut points: Vec<PointConfig> = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let key = format!("{key}.points[{i}]");
            if p.sensor.is_empty() || p.sensor.contains('/') {
                return Err(self.err(format!("{key}.sensor"), "must be non-empty, without `/`"));
            }
            if points.iter().any(|q| q.sensor == p.sensor) {
                return Err(self.err(
                    format!("{key}.sensor"),
                    format!("duplicate sensor `{}`", p.sensor),
                ));
            }
            let bit_type = p.data_type == DataType::Bool;
            if bit_type != p.table.is_bit_table() {
                return Err(self.err(
                    format!("{key}.type"),
                    "`bool` goes in `coil`/`discrete-input` tables, numeric types in `holding`/`input`",
                ));
            }
            if p.order.is_some() && !p.data_type.has_word_order() {
                return Err(self.err(
                    format!("{key}.order"),
                    "only 32- and 64-bit types have a word order",
                ));
            }
            let scale = p.scale.unwrap_or(1.0);
            if !scale.is_finite() || scale <= 0.0 {
                return Err(self.err(format!("{key}.scale"), "must be a positive number"));
            }
            let end = u32::from(p.address) + u32::from(p.data_type.width());
            if end > 65_536 {
                return Err(self.err(format!("{key}.address"), "point runs past address 65535"));
            }
            if let Some(other) = points.iter().find(|q| {
                q.table == p.table
                    && u32::from(q.address) < end
                    && u32::from(p.address) < u32::from(q.address) + u32::from(q.data_type.width())
            }) {
                return Err(self.err(
                    format!("{key}.address"),
                    format!("overlaps sensor `{}` in the same table", other.sensor),
                ));
            }
            points.push(PointConfig {
                signal: self.check_signal(p.signal, &format!("{key}.signal"))?,
                sensor: p.sensor,
                table: p.table,
                address: p.address,
                data_type: p.data_type,
                order: p.order.unwrap_or_default(),
                scale,
                unit: p.unit,
            });
        }
        Ok(points)
    }

    fn check_signal(&self, raw: RawSignal, key: &str) -> Result<Signal, ConfigError> {
        for (name, v) in [
            ("offset", raw.offset),
            ("amplitude", raw.amplitude),
            ("noise-stddev", raw.noise_stddev),
            ("drift-per-hour", raw.drift_per_hour),
        ] {
            if !v.is_finite() {
                return Err(self.err(format!("{key}.{name}"), "must be a finite number"));
            }
        }
        if raw.noise_stddev < 0.0 {
            return Err(self.err(format!("{key}.noise-stddev"), "must not be negative"));
        }
        if raw.amplitude != 0.0 && raw.period.is_none_or(|p| p.as_millis() == 0) {
            return Err(self.err(
                format!("{key}.period"),
                "a non-zero amplitude needs a period of at least 1ms",
            ));
        }
        Ok(Signal {
            offset: raw.offset,
            amplitude: raw.amplitude,
            period: raw.period.unwrap_or_default(),
            noise_stddev: raw.noise_stddev,
            drift_per_hour: raw.drift_per_hour,
            start_ms: 0,
            anomalies: Vec::new(),
        })
    }

    fn check_sparkplug_node(
        &self,
        n: RawSparkplugNode,
        key: &str,
    ) -> Result<SparkplugNodeConfig, ConfigError> {
        let id_ok = |id: &str| !id.is_empty() && !id.contains(['/', '+', '#', '.']);
        for (name, value) in [("group", &n.group), ("node", &n.node)] {
            if !id_ok(value) {
                return Err(self.err(
                    format!("{key}.{name}"),
                    "must be non-empty without '/', '+', '#' or '.'",
                ));
            }
        }
        if n.device.as_deref().is_some_and(|d| !id_ok(d)) {
            return Err(self.err(
                format!("{key}.device"),
                "must be non-empty without '/', '+', '#' or '.'",
            ));
        }
        if n.interval.as_millis() == 0 {
            return Err(self.err(format!("{key}.interval"), "must be at least 1ms"));
        }
        if n.metrics.is_empty() {
            return Err(self.err(format!("{key}.metrics"), "a node needs at least one metric"));
        }
        let mut metrics: Vec<(String, Signal)> = Vec::new();
        for (j, m) in n.metrics.into_iter().enumerate() {
            let mkey = format!("{key}.metrics[{j}]");
            if m.name.is_empty() || m.name == "bdSeq" || metrics.iter().any(|(x, _)| *x == m.name) {
                return Err(self.err(
                    format!("{mkey}.name"),
                    "must be non-empty, unique and not `bdSeq`",
                ));
            }
            let signal = self.check_signal(m.signal, &format!("{mkey}.signal"))?;
            metrics.push((m.name, signal));
        }
        Ok(SparkplugNodeConfig {
            group: n.group,
            node: n.node,
            device: n.device,
            interval: n.interval,
            metrics,
        })
    }

    fn check_mqtt_sensor(
        &self,
        s: RawMqttSensor,
        key: &str,
        topics: &mut HashSet<String>,
    ) -> Result<MqttSensorConfig, ConfigError> {
        let segments: Vec<&str> = s.topic.split('/').collect();
        if segments
            .iter()
            .any(|seg| seg.is_empty() || seg.contains(['+', '#']))
            || segments.len() < 2
        {
            return Err(self.err(
                format!("{key}.topic"),
                "expected a concrete topic `prefix/<device>/<sensor>` (no wildcards, no empty levels)",
            ));
        }
        if !topics.insert(s.topic.clone()) {
            return Err(self.err(
                format!("{key}.topic"),
                format!("duplicate topic `{}`", s.topic),
            ));
        }
        if s.interval.as_millis() == 0 {
            return Err(self.err(format!("{key}.interval"), "must be at least 1ms"));
        }
        if !(0.0..=1.0).contains(&s.malformed_rate) {
            return Err(self.err(format!("{key}.malformed-rate"), "must be within 0..=1"));
        }
        let device = segments[1].to_owned();
        let payload = match (s.signal, s.fields.is_empty()) {
            (Some(signal), true) => {
                let Some(sensor) = segments.get(2) else {
                    return Err(self.err(
                        format!("{key}.topic"),
                        "a single-reading sensor needs a third topic level naming the sensor",
                    ));
                };
                MqttPayload::Single {
                    sensor: (*sensor).to_owned(),
                    unit: s.unit,
                    signal: self.check_signal(signal, &format!("{key}.signal"))?,
                }
            }
            (None, false) => {
                if s.unit.is_some() {
                    return Err(
                        self.err(format!("{key}.unit"), "multi-field payloads carry no unit")
                    );
                }
                let mut fields: Vec<(String, Signal)> = Vec::new();
                for (j, f) in s.fields.into_iter().enumerate() {
                    let fkey = format!("{key}.fields[{j}]");
                    if f.name.is_empty()
                        || f.name == "ts"
                        || fields.iter().any(|(n, _)| *n == f.name)
                    {
                        return Err(self.err(
                            format!("{fkey}.name"),
                            "must be non-empty, unique and not `ts`",
                        ));
                    }
                    let signal = self.check_signal(f.signal, &format!("{fkey}.signal"))?;
                    fields.push((f.name, signal));
                }
                MqttPayload::Multi { fields }
            }
            (Some(_), false) => {
                return Err(self.err(
                    format!("{key}.fields"),
                    "give either `signal` or `fields`, not both",
                ))
            }
            (None, true) => {
                return Err(self.err(
                    format!("{key}.signal"),
                    "missing: give `signal` or `fields`",
                ))
            }
        };
        Ok(MqttSensorConfig {
            topic: s.topic,
            device,
            interval: s.interval,
            payload,
            malformed_rate: s.malformed_rate,
        })
    }

    fn attach_anomaly(
        &self,
        config: &mut SimConfig,
        a: RawAnomaly,
        key: &str,
    ) -> Result<(), ConfigError> {
        let magnitude = |kind: &str| {
            a.magnitude.filter(|m| m.is_finite()).ok_or_else(|| {
                self.err(
                    format!("{key}.magnitude"),
                    format!("a {kind} needs a finite magnitude"),
                )
            })
        };
        let span = || -> Result<Duration, ConfigError> {
            let to =
                a.to.ok_or_else(|| self.err(format!("{key}.to"), "missing end offset"))?;
            if to <= a.from {
                return Err(self.err(format!("{key}.to"), "must be after `from`"));
            }
            Ok(to - a.from)
        };
        let (target, sample_period) = find_signal_mut(config, &a.series).ok_or_else(|| {
            self.err(
                format!("{key}.series"),
                format!("no series `{}` in this plant", a.series),
            )
        })?;
        let (kind, duration) = match a.kind {
            RawAnomalyKind::Spike => {
                if a.to.is_some() {
                    return Err(self.err(
                        format!("{key}.to"),
                        "a spike lasts one sample; give only `from`",
                    ));
                }
                (
                    AnomalyKind::Spike {
                        magnitude: magnitude("spike")?,
                    },
                    sample_period,
                )
            }
            RawAnomalyKind::Step => (
                AnomalyKind::Step {
                    magnitude: magnitude("step")?,
                },
                span()?,
            ),
            RawAnomalyKind::Stuck | RawAnomalyKind::Dropout => {
                if a.magnitude.is_some() {
                    return Err(self.err(
                        format!("{key}.magnitude"),
                        "only spikes and steps have a magnitude",
                    ));
                }
                let kind = if matches!(a.kind, RawAnomalyKind::Stuck) {
                    AnomalyKind::Stuck
                } else {
                    AnomalyKind::Dropout
                };
                (kind, span()?)
            }
        };
        if let Some(every) = a.every {
            if every < duration || every.is_zero() {
                return Err(self.err(
                    format!("{key}.every"),
                    "must be at least the anomaly's duration",
                ));
            }
        }
        target.anomalies.push(Anomaly {
            kind,
            from: a.from,
            duration,
            every: a.every,
        });
        Ok(())
    }

    fn check_unique_series(&self, config: &SimConfig) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        let modbus = config
            .modbus_tcp
            .iter()
            .flat_map(|s| {
                s.points
                    .iter()
                    .map(move |p| format!("{}/{}", s.name, p.sensor))
            })
            .chain(config.modbus_rtu.iter().flat_map(|s| {
                s.points
                    .iter()
                    .map(move |p| format!("{}/{}", s.name, p.sensor))
            }));
        let mqtt = config.mqtt_sensors.iter().flat_map(|s| {
            let names: Vec<String> = match &s.payload {
                MqttPayload::Single { sensor, .. } => vec![sensor.clone()],
                MqttPayload::Multi { fields } => fields.iter().map(|(n, _)| n.clone()).collect(),
            };
            names
                .into_iter()
                .map(move |n| format!("{}/{}", s.device, n))
        });
        for series in modbus.chain(mqtt) {
            if !seen.insert(series.clone()) {
                return Err(self.err(
                    "mqtt-sensor",
                    format!("series `{series}` is produced twice"),
                ));
            }
        }
        Ok(())
    }
}

/// The signal of `device/sensor` and the sample period of its source.
fn find_signal_mut<'a>(
    config: &'a mut SimConfig,
    series: &str,
) -> Option<(&'a mut Signal, Duration)> {
    let (device, sensor) = series.split_once('/')?;
    for s in &mut config.modbus_tcp {
        if s.name != device {
            continue;
        }
        // A device of the same name elsewhere may have the sensor: keep looking.
        let refresh = s.refresh;
        if let Some(p) = s.points.iter_mut().find(|p| p.sensor == sensor) {
            return Some((&mut p.signal, refresh));
        }
    }
    for s in &mut config.modbus_rtu {
        if s.name != device {
            continue;
        }
        // A device of the same name elsewhere may have the sensor: keep looking.
        let refresh = s.refresh;
        if let Some(p) = s.points.iter_mut().find(|p| p.sensor == sensor) {
            return Some((&mut p.signal, refresh));
        }
    }
    for n in &mut config.sparkplug_nodes {
        if n.series_device() != device {
            continue;
        }
        let interval = n.interval;
        if let Some((_, signal)) = n.metrics.iter_mut().find(|(m, _)| m == sensor) {
            return Some((signal, interval));
        }
    }
    for s in &mut config.mqtt_sensors {
        if s.device != device {
            continue;
        }
        let interval = s.interval;
        match &mut s.payload {
            MqttPayload::Single {
                sensor: name,
                signal,
                ..
            } if name == sensor => return Some((signal, interval)),
            MqttPayload::Multi { fields } => {
                if let Some((_, signal)) = fields.iter_mut().find(|(n, _)| n == sensor) {
                    return Some((signal, interval));
                }
            }
            MqttPayload::Single { .. } => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SimConfig, ConfigError> {
        SimConfig::from_toml(text, Path::new("sim.toml"))
    }

    const POINT: &str = r#"
[[modbus-tcp]]
name = "press-1"
listen = "127.0.0.1:0"
unit-id = 1
[[modbus-tcp.points]]
sensor = "temperature"
table = "holding"
address = 0
type = "f32"
order = "ABCD"
signal = { offset = 80, amplitude = 5, period = "60s", noise-stddev = 0.2 }
"#;

    fn assert_key(result: Result<SimConfig, ConfigError>, key: &str) {
        let err = result.expect_err("config must be rejected");
        assert_eq!(err.key(), Some(key), "{err}");
        let text = err.to_string();
        assert!(text.contains("sim.toml"), "{text}");
        assert!(text.contains(key), "{text}");
    }

    #[test]
    fn example_plant_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sim.toml");
        let config = SimConfig::load(&path).unwrap();
        let series = config.series();
        for s in [
            "press-1/temperature",
            "press-1/pressure",
            "press-1/speed",
            "press-1/vibration",
            "press-1/running",
            "pump-2/flow",
            "pump-2/suction",
            "pump-2/energy",
            "tank-4/level",
            "boiler-3/temp",
            "boiler-3/steam-flow",
            "env-1/humidity",
            "env-1/ambient",
            "line-5.filler/Fill/Level",
            "line-5.filler/Drive/Speed",
        ] {
            assert!(series.contains_key(s), "missing {s}");
        }
        assert_eq!(series.len(), 15);
        assert_eq!(series["press-1/temperature"].anomalies.len(), 1);
        assert_eq!(series["boiler-3/temp"].anomalies.len(), 1);
        assert_eq!(series["pump-2/flow"].anomalies.len(), 1);
        assert_eq!(series["boiler-3/steam-flow"].anomalies.len(), 1);
    }

    #[test]
    fn minimal_point_parses() {
        let c = parse(POINT).unwrap();
        assert_eq!(c.modbus_tcp[0].points[0].data_type, DataType::F32);
        assert_eq!(c.modbus_tcp[0].refresh, Duration::from_secs(1));
        assert_eq!(c.mqtt.port, 1883);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = POINT.replace("unit-id = 1", "unit-id = 1\nlisten-port = 5");
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("listen-port"), "{err}");
        assert!(err.to_string().contains("modbus-tcp[0]"), "{err}");
    }

    #[test]
    fn bad_type_is_named() {
        assert_key(
            parse(&POINT.replace("\"f32\"", "\"f128\"")),
            "modbus-tcp[0].points[0].type",
        );
    }

    #[test]
    fn bad_duration_is_named() {
        assert_key(
            parse(&POINT.replace("period = \"60s\"", "period = \"sixty\"")),
            "modbus-tcp[0].points[0].signal.period",
        );
    }

    #[test]
    fn order_on_16_bit_is_rejected() {
        let text = POINT.replace("\"f32\"", "\"u16\"");
        assert_key(parse(&text), "modbus-tcp[0].points[0].order");
    }

    #[test]
    fn overlapping_points_are_rejected() {
        let text = format!(
            "{POINT}\n[[modbus-tcp.points]]\nsensor = \"p\"\ntable = \"holding\"\naddress = 1\ntype = \"u16\"\nsignal = {{ offset = 1 }}\n"
        );
        assert_key(parse(&text), "modbus-tcp[0].points[1].address");
    }

    #[test]
    fn anomaly_on_unknown_series_is_named() {
        let text = format!("{POINT}\n[[anomaly]]\nseries = \"press-1/nope\"\nkind = \"spike\"\nmagnitude = 1\nfrom = \"1s\"\n");
        assert_key(parse(&text), "anomaly[0].series");
    }

    #[test]
    fn an_anomaly_finds_its_sensor_past_a_modbus_device_of_the_same_name() {
        let text = format!(
            "{POINT}\n[[mqtt-sensor]]\ntopic = \"plant/press-1/vibration\"\ninterval = \"1s\"\nsignal = {{ offset = 1.0 }}\n\
             [[anomaly]]\nseries = \"press-1/vibration\"\nkind = \"spike\"\nmagnitude = 9\nfrom = \"5s\"\n"
        );
        let c = parse(&text).unwrap();
        assert!(c.modbus_tcp[0].points[0].signal.anomalies.is_empty());
        let MqttPayload::Single { signal, .. } = &c.mqtt_sensors[0].payload else {
            panic!("a single-value sensor");
        };
        assert_eq!(signal.anomalies.len(), 1);
    }

    #[test]
    fn step_without_end_is_named() {
        let text = format!("{POINT}\n[[anomaly]]\nseries = \"press-1/temperature\"\nkind = \"step\"\nmagnitude = 1\nfrom = \"1s\"\n");
        assert_key(parse(&text), "anomaly[0].to");
    }

    #[test]
    fn spike_lasts_one_refresh_period() {
        let text = format!("{POINT}\n[[anomaly]]\nseries = \"press-1/temperature\"\nkind = \"spike\"\nmagnitude = 40\nfrom = \"45s\"\nevery = \"45s\"\n");
        let c = parse(&text).unwrap();
        let a = &c.modbus_tcp[0].points[0].signal.anomalies[0];
        assert_eq!(a.duration, Duration::from_secs(1));
        assert_eq!(a.every, Some(Duration::from_secs(45)));
    }

    #[test]
    fn exception_rate_out_of_range_is_named() {
        let text = POINT.replace(
            "unit-id = 1",
            "unit-id = 1\nfaults = { exception-rate = 1.5 }",
        );
        assert_key(parse(&text), "modbus-tcp[0].faults.exception-rate");
    }

    #[test]
    fn broker_must_be_host_port() {
        assert_key(parse("[mqtt]\nbroker = \"localhost\"\n"), "mqtt.broker");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse("seed = 1\n[mqtt\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
