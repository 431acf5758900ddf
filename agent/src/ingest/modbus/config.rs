//! Modbus source configuration: the raw serde structs of the `[modbus]` table
//! and their validation.
//!
//! Stage one is serde (`deny_unknown_fields`, kebab-case keys, `"1s"`
//! durations); stage two is [`ModbusConfig::validate`], whose errors name the
//! offending key, e.g. `modbus.devices[1].registers[3].address`. Every default
//! lives in [`defaults`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use super::plan::{DataType, Function, WordOrder};

/// Every default of the `[modbus]` table, in one place.
pub mod defaults {
    use std::time::Duration;

    pub const UNIT_ID: u8 = 1;
    pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// Applies to every request and to connection set-up.
    pub const TIMEOUT: Duration = Duration::from_millis(500);
    /// Ceiling of the exponential backoff applied to a failing device.
    pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
    /// Unused registers (or bits) a read may span to merge two neighbours.
    pub const MAX_GAP: u16 = 8;
    pub const BAUD_RATE: u32 = 19_200;
    pub const DATA_BITS: u8 = 8;
    pub const STOP_BITS: u8 = 1;
    pub const SCALE: f64 = 1.0;
    pub const OFFSET: f64 = 0.0;

    pub(super) fn unit_id() -> u8 {
        UNIT_ID
    }
    pub(super) fn poll_interval() -> Duration {
        POLL_INTERVAL
    }
    pub(super) fn timeout() -> Duration {
        TIMEOUT
    }
    pub(super) fn backoff_max() -> Duration {
        BACKOFF_MAX
    }
    pub(super) fn max_gap() -> u16 {
        MAX_GAP
    }
    pub(super) fn baud_rate() -> u32 {
        BAUD_RATE
    }
    pub(super) fn data_bits() -> u8 {
        DATA_BITS
    }
    pub(super) fn stop_bits() -> u8 {
        STOP_BITS
    }
    pub(super) fn scale() -> f64 {
        SCALE
    }
    pub(super) fn offset() -> f64 {
        OFFSET
    }
}

/// The `[modbus]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModbusConfig {
    /// The PLCs and RTU slaves to poll (`[[modbus.devices]]`).
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

/// How a device is reached.
///
/// Devices that name the same link (the same `address` for `tcp` and
/// `rtu-over-tcp`, the same `path` for `rtu`) share one connection and are
/// polled in turn over it: several unit ids behind one Modbus TCP gateway, or
/// several RTU slaves on one RS-485 bus, local or behind a serial server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Modbus TCP (MBAP framing) to `address`.
    Tcp,
    /// Modbus RTU on the serial device at `path`.
    Rtu,
    /// Modbus RTU frames (unit id, PDU, CRC; no MBAP header) over a TCP
    /// connection to `address`: the "transparent" mode of serial device
    /// servers in front of an RS-485 bus.
    RtuOverTcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Rtu => "rtu",
            Transport::RtuOverTcp => "rtu-over-tcp",
        }
    }

    /// Whether the device is reached over TCP at `address`.
    pub fn uses_address(self) -> bool {
        matches!(self, Transport::Tcp | Transport::RtuOverTcp)
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// One `[[modbus.devices]]` entry: a TCP PLC or one RTU slave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceConfig {
    /// Device name: the `device` part of every series key it produces.
    pub name: String,
    pub transport: Transport,
    /// TCP: `host:port` of the PLC or gateway.
    #[serde(default)]
    pub address: Option<String>,
    /// RTU: serial device path. RTU devices with the same path share one bus.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// RTU: line speed in bit/s (default 19200).
    #[serde(default = "defaults::baud_rate")]
    pub baud_rate: u32,
    /// RTU: `none` (default), `even` or `odd`.
    #[serde(default)]
    pub parity: Parity,
    /// RTU: 5 to 8 (default 8).
    #[serde(default = "defaults::data_bits")]
    pub data_bits: u8,
    /// RTU: 1 or 2 (default 1).
    #[serde(default = "defaults::stop_bits")]
    pub stop_bits: u8,
    /// Modbus unit (slave) id (default 1; RTU: 1 to 247).
    #[serde(default = "defaults::unit_id")]
    pub unit_id: u8,
    /// Time between two polls of this device (default 1s); a register may
    /// set its own.
    #[serde(default = "defaults::poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Deadline of every request and of connection set-up (default 500ms).
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Ceiling of the exponential backoff of a failing device (default 30s).
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Unused registers (bits for coils and discrete inputs) a read may span
    /// to merge two neighbouring registers into one request (default 8).
    #[serde(default = "defaults::max_gap")]
    pub max_gap: u16,
    /// The values to read (`[[modbus.devices.registers]]`).
    #[serde(default)]
    pub registers: Vec<RegisterConfig>,
}

/// One value of a device: where it lives, how to decode and scale it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RegisterConfig {
    /// Sensor name: the `sensor` part of the series key.
    pub sensor: String,
    /// `coil`, `discrete-input`, `holding` or `input`.
    pub function: Function,
    /// Zero-based protocol address of the first register (or bit).
    pub address: u16,
    /// `bool u16 i16 u32 i32 u64 i64 f32 f64`.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Word/byte order of 32- and 64-bit types (default `ABCD`, big-endian).
    #[serde(default)]
    pub order: Option<WordOrder>,
    /// value = raw × scale + offset (default 1).
    #[serde(default = "defaults::scale")]
    pub scale: f64,
    /// value = raw × scale + offset (default 0).
    #[serde(default = "defaults::offset")]
    pub offset: f64,
    /// Engineering unit, e.g. `degC` (default empty).
    #[serde(default)]
    pub unit: String,
    /// Time between two reads of this value (default: the device's
    /// `poll-interval`). Registers sharing an interval are read together.
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

impl RegisterConfig {
    /// The word order used to decode: the configured one, else `ABCD`.
    pub fn word_order(&self) -> WordOrder {
        self.order.unwrap_or_default()
    }
}

impl DeviceConfig {
    /// The link this device is reached over; devices with equal links share it.
    pub(crate) fn link(&self) -> Option<LinkKey> {
        match self.transport {
            Transport::Tcp => self.address.clone().map(LinkKey::Tcp),
            Transport::RtuOverTcp => self.address.clone().map(LinkKey::RtuOverTcp),
            Transport::Rtu => self.path.clone().map(LinkKey::Serial),
        }
    }

    /// The registers grouped by their poll interval (shortest first), each
    /// group in configuration order.
    pub(crate) fn register_groups(&self) -> Vec<(Duration, Vec<RegisterConfig>)> {
        let mut groups: BTreeMap<Duration, Vec<RegisterConfig>> = BTreeMap::new();
        for reg in &self.registers {
            groups
                .entry(reg.poll_interval.unwrap_or(self.poll_interval))
                .or_default()
                .push(reg.clone());
        }
        groups.into_iter().collect()
    }
}

/// One shared link: a TCP connection (MBAP or RTU framing) or a serial port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum LinkKey {
    Tcp(String),
    RtuOverTcp(String),
    Serial(PathBuf),
}

/// A configuration error, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// Full key path, e.g. `modbus.devices[1].registers[3].address`.
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// Registers per read request (function codes 03 and 04), from the Modbus spec.
pub const MAX_REGISTERS_PER_READ: u16 = 125;
/// Bits per read request (function codes 01 and 02), from the Modbus spec.
pub const MAX_BITS_PER_READ: u16 = 2000;

impl ModbusConfig {
    /// Checks what serde cannot: required keys per transport, ranges, unique
    /// names, address spans, and that devices sharing a serial bus agree on
    /// its line settings. The first error found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut buses: BTreeMap<&PathBuf, (usize, SerialLine)> = BTreeMap::new();
        let mut hosts: BTreeMap<&str, (usize, Transport)> = BTreeMap::new();
        for (d, dev) in self.devices.iter().enumerate() {
            let key = format!("modbus.devices[{d}]");
            dev.validate(&key)?;
            if !names.insert(dev.name.as_str()) {
                return Err(err(
                    format!("{key}.name"),
                    format!("duplicate device name {:?}", dev.name),
                ));
            }
            if let (true, Some(address)) = (dev.transport.uses_address(), dev.address.as_deref()) {
                match hosts.get(address) {
                    Some((first, other)) if *other != dev.transport => {
                        return Err(err(
                            format!("{key}.transport"),
                            format!(
                                "{address} is shared with modbus.devices[{first}] as \
                                 transport = \"{other}\"; devices on one connection must \
                                 agree on its framing"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        hosts.insert(address, (d, dev.transport));
                    }
                }
            }
            if let (Transport::Rtu, Some(path)) = (dev.transport, dev.path.as_ref()) {
                let line = dev.serial_line();
                match buses.get(path) {
                    Some((first, other)) if *other != line => {
                        return Err(err(
                            format!("{key}.path"),
                            format!(
                                "{} is shared with modbus.devices[{first}] but the line \
                                 settings differ ({line} vs {other}); devices on one bus \
                                 must agree on baud-rate, parity, data-bits and stop-bits",
                                path.display()
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        buses.insert(path, (d, line));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The line settings of a serial bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SerialLine {
    pub baud_rate: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl std::fmt::Display for SerialLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        write!(
            f,
            "{} {}{}{}",
            self.baud_rate, self.data_bits, parity, self.stop_bits
        )
    }
}

impl DeviceConfig {
    pub(crate) fn serial_line(&self) -> SerialLine {
        SerialLine {
            baud_rate: self.baud_rate,
            parity: self.parity,
            data_bits: self.data_bits,
            stop_bits: self.stop_bits,
        }
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(err(format!("{key}.name"), "must not be empty"));
        }
        if self.name.contains('/') {
            return Err(err(
                format!("{key}.name"),
                format!(
                    "{:?} must not contain '/' (series keys are device/sensor)",
                    self.name
                ),
            ));
        }
        match self.transport {
            Transport::Tcp | Transport::RtuOverTcp => {
                match self.address.as_deref() {
                    None => {
                        return Err(err(
                            format!("{key}.address"),
                            format!(
                                "required for transport = \"{}\" (host:port)",
                                self.transport
                            ),
                        ))
                    }
                    Some(a) if !valid_host_port(a) => {
                        return Err(err(
                            format!("{key}.address"),
                            format!("{a:?} is not host:port with a port in 1..=65535"),
                        ))
                    }
                    Some(_) => {}
                }
                if self.path.is_some() {
                    return Err(err(
                        format!("{key}.path"),
                        format!(
                            "only for transport = \"rtu\"; a {} device uses address",
                            self.transport
                        ),
                    ));
                }
                if self.transport == Transport::RtuOverTcp && !(1..=247).contains(&self.unit_id) {
                    return Err(err(
                        format!("{key}.unit-id"),
                        format!("{} is not an RTU slave address (1..=247)", self.unit_id),
                    ));
                }
            }
            Transport::Rtu => {
                match &self.path {
                    None => {
                        return Err(err(
                            format!("{key}.path"),
                            "required for transport = \"rtu\" (serial device, e.g. /dev/ttyUSB0)",
                        ))
                    }
                    Some(p) if p.as_os_str().is_empty() => {
                        return Err(err(format!("{key}.path"), "must not be empty"))
                    }
                    Some(_) => {}
                }
                if self.address.is_some() {
                    return Err(err(
                        format!("{key}.address"),
                        "only for transport = \"tcp\"; an rtu device uses path",
                    ));
                }
                if !(1..=247).contains(&self.unit_id) {
                    return Err(err(
                        format!("{key}.unit-id"),
                        format!("{} is not an RTU slave address (1..=247)", self.unit_id),
                    ));
                }
                if self.baud_rate == 0 {
                    return Err(err(format!("{key}.baud-rate"), "must be positive"));
                }
                if !(5..=8).contains(&self.data_bits) {
                    return Err(err(
                        format!("{key}.data-bits"),
                        format!("{} is not 5, 6, 7 or 8", self.data_bits),
                    ));
                }
                if !(1..=2).contains(&self.stop_bits) {
                    return Err(err(
                        format!("{key}.stop-bits"),
                        format!("{} is not 1 or 2", self.stop_bits),
                    ));
                }
            }
        }
        if self.poll_interval.is_zero() {
            return Err(err(format!("{key}.poll-interval"), "must be positive"));
        }
        if self.timeout.is_zero() {
            return Err(err(format!("{key}.timeout"), "must be positive"));
        }
        if self.backoff_max < self.poll_interval {
            return Err(err(
                format!("{key}.backoff-max"),
                format!(
                    "{} is shorter than poll-interval {}",
                    humantime_serde::re::humantime::format_duration(self.backoff_max),
                    humantime_serde::re::humantime::format_duration(self.poll_interval)
                ),
            ));
        }
        if self.registers.is_empty() {
            return Err(err(
                format!("{key}.registers"),
                "a device needs at least one register",
            ));
        }
        let mut sensors = HashSet::new();
        for (r, reg) in self.registers.iter().enumerate() {
            let rkey = format!("{key}.registers[{r}]");
            reg.validate(&rkey)?;
            if let Some(interval) = reg.poll_interval {
                if self.backoff_max < interval {
                    return Err(err(
                        format!("{rkey}.poll-interval"),
                        format!(
                            "{} is longer than the device's backoff-max {}",
                            humantime_serde::re::humantime::format_duration(interval),
                            humantime_serde::re::humantime::format_duration(self.backoff_max)
                        ),
                    ));
                }
            }
            if !sensors.insert(reg.sensor.as_str()) {
                return Err(err(
                    format!("{rkey}.sensor"),
                    format!(
                        "duplicate sensor {:?} on device {:?}",
                        reg.sensor, self.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn valid_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && port.parse::<u16>().map(|p| p != 0).unwrap_or(false)
        }
        None => false,
    }
}

impl RegisterConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.sensor.trim().is_empty() {
            return Err(err(format!("{key}.sensor"), "must not be empty"));
        }
        if self.function.is_bit() && self.data_type != DataType::Bool {
            return Err(err(
                format!("{key}.type"),
                format!(
                    "{} holds single bits; only type = \"bool\" applies",
                    self.function
                ),
            ));
        }
        let width = u32::from(self.data_type.width());
        if u32::from(self.address) + width > 65_536 {
            return Err(err(
                format!("{key}.address"),
                format!(
                    "{} needs {width} register{} but {} + {width} > 65536",
                    self.data_type,
                    if width == 1 { "" } else { "s" },
                    self.address
                ),
            ));
        }
        if self.order.is_some() && self.data_type.width() < 2 {
            return Err(err(
                format!("{key}.order"),
                format!(
                    "applies to 32- and 64-bit types only, not {}",
                    self.data_type
                ),
            ));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return Err(err(
                format!("{key}.scale"),
                format!("{} is not a finite, non-zero number", self.scale),
            ));
        }
        if !self.offset.is_finite() {
            return Err(err(
                format!("{key}.offset"),
                format!("{} is not a finite number", self.offset),
            ));
        }
        if self.poll_interval.is_some_and(|i| i.is_zero()) {
            return Err(err(format!("{key}.poll-interval"), "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PRESS: &str = r#"
        [[devices]]
        name = "press-1"
        transport = "tcp"
        address = "127.0.0.1:15020"
        [[devices.registers]]
        sensor = "temperature"
        function = "holding"
        address = 0
        type = "f32"
        order = "ABCD"
        unit = "degC"
        [[devices.registers]]
        sensor = "speed"
        function = "holding"
        address = 4
        type = "u16"
        scale = 0.1
        unit = "rpm"
    "#;

    fn parse(toml_text: &str) -> ModbusConfig {
        toml::from_str(toml_text).expect("test config parses")
    }

    fn validation_error(toml_text: &str) -> ConfigError {
        parse(toml_text)
            .validate()
            .expect_err("config should be rejected")
    }

    #[test]
    fn example_parses_with_defaults() {
        let cfg = parse(PRESS);
        cfg.validate().unwrap();
        let dev = &cfg.devices[0];
        assert_eq!(dev.unit_id, defaults::UNIT_ID);
        assert_eq!(dev.poll_interval, defaults::POLL_INTERVAL);
        assert_eq!(dev.timeout, defaults::TIMEOUT);
        assert_eq!(dev.max_gap, defaults::MAX_GAP);
        assert_eq!(dev.registers[0].word_order(), WordOrder::Abcd);
        assert_eq!(dev.registers[1].scale, 0.1);
        assert_eq!(dev.registers[1].offset, 0.0);
    }

    #[test]
    fn durations_are_humantime() {
        let cfg = parse(&PRESS.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\npoll-interval = \"250ms\"\ntimeout = \"2s\"",
        ));
        assert_eq!(cfg.devices[0].poll_interval, Duration::from_millis(250));
        assert_eq!(cfg.devices[0].timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<ModbusConfig>(
            &PRESS
                .replace("unit-id", "x")
                .replace("transport = \"tcp\"", "transport = \"tcp\"\nunit_id = 3"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unit_id"), "{e}");
    }

    #[test]
    fn address_span_error_names_the_key() {
        let text = format!(
            "{PRESS}\n{}",
            r#"
        [[devices]]
        name = "pump-2"
        transport = "tcp"
        address = "127.0.0.1:15021"
        [[devices.registers]]
        sensor = "a"
        function = "holding"
        address = 0
        type = "u16"
        [[devices.registers]]
        sensor = "b"
        function = "holding"
        address = 1
        type = "u16"
        [[devices.registers]]
        sensor = "c"
        function = "input"
        address = 2
        type = "u16"
        [[devices.registers]]
        sensor = "flow"
        function = "holding"
        address = 65534
        type = "f64"
        "#
        );
        let e = validation_error(&text);
        assert_eq!(
            e.to_string(),
            "modbus.devices[1].registers[3].address: f64 needs 4 registers but 65534 + 4 > 65536"
        );
    }

    #[test]
    fn transport_keys_are_checked() {
        let e = validation_error(&PRESS.replace("address = \"127.0.0.1:15020\"", ""));
        assert_eq!(e.key, "modbus.devices[0].address");
        let e = validation_error(&PRESS.replace("127.0.0.1:15020", "127.0.0.1"));
        assert_eq!(e.key, "modbus.devices[0].address");
        let e = validation_error(&PRESS.replace("transport = \"tcp\"", "transport = \"rtu\""));
        assert_eq!(e.key, "modbus.devices[0].path");
        let e = validation_error(&PRESS.replace(
            "transport = \"tcp\"\n        address = \"127.0.0.1:15020\"",
            "transport = \"rtu\"\npath = \"/dev/ttyUSB0\"\nunit-id = 0",
        ));
        assert_eq!(e.key, "modbus.devices[0].unit-id");
        let e = validation_error(&PRESS.replace(
            "transport = \"tcp\"\n        address = \"127.0.0.1:15020\"",
            "transport = \"rtu\"\npath = \"/dev/ttyUSB0\"\nstop-bits = 3",
        ));
        assert_eq!(e.key, "modbus.devices[0].stop-bits");
    }

    #[test]
    fn register_errors_name_the_key() {
        let e =
            validation_error(&PRESS.replace("type = \"u16\"", "type = \"u16\"\norder = \"CDAB\""));
        assert_eq!(e.key, "modbus.devices[0].registers[1].order");
        let e = validation_error(&PRESS.replace("scale = 0.1", "scale = 0.0"));
        assert_eq!(e.key, "modbus.devices[0].registers[1].scale");
        let e = validation_error(&PRESS.replace(
            "function = \"holding\"\n        address = 4",
            "function = \"coil\"\n        address = 4",
        ));
        assert_eq!(e.key, "modbus.devices[0].registers[1].type");
        let e = validation_error(&PRESS.replace("sensor = \"speed\"", "sensor = \"temperature\""));
        assert_eq!(e.key, "modbus.devices[0].registers[1].sensor");
        let e = validation_error(&PRESS.replace("sensor = \"speed\"", "sensor = \"\""));
        assert_eq!(e.key, "modbus.devices[0].registers[1].sensor");
    }

    #[test]
    fn device_errors_name_the_key() {
        let twice = format!("{PRESS}\n{}", PRESS.replace("15020", "15021"));
        let e = validation_error(&twice);
        assert_eq!(e.key, "modbus.devices[1].name");
        let e = validation_error(&PRESS.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\npoll-interval = \"0s\"",
        ));
        assert_eq!(e.key, "modbus.devices[0].poll-interval");
        let e = validation_error(&PRESS.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\npoll-interval = \"1m\"",
        ));
        assert_eq!(e.key, "modbus.devices[0].backoff-max");
    }

    #[test]
    fn devices_on_one_bus_must_agree_on_line_settings() {
        let rtu = |name: &str, unit: u8, baud: u32| {
            format!(
                r#"
                [[devices]]
                name = "{name}"
                transport = "rtu"
                path = "/dev/ttyUSB0"
                unit-id = {unit}
                baud-rate = {baud}
                [[devices.registers]]
                sensor = "level"
                function = "holding"
                address = 0
                type = "u16"
                "#
            )
        };
        let same = format!("{}{}", rtu("tank-4", 3, 19200), rtu("tank-5", 4, 19200));
        parse(&same).validate().unwrap();
        let differ = format!("{}{}", rtu("tank-4", 3, 19200), rtu("tank-5", 4, 9600));
        let e = validation_error(&differ);
        assert_eq!(e.key, "modbus.devices[1].path");
        assert!(e.message.contains("9600 8N1 vs 19200 8N1"), "{}", e.message);
    }

    #[test]
    fn rtu_over_tcp_and_shared_connections_are_checked() {
        let over = PRESS.replace("transport = \"tcp\"", "transport = \"rtu-over-tcp\"");
        let cfg = parse(&over);
        cfg.validate().unwrap();
        assert_eq!(cfg.devices[0].transport, Transport::RtuOverTcp);
        let e = validation_error(&over.replace("address = \"127.0.0.1:15020\"", ""));
        assert_eq!(e.key, "modbus.devices[0].address");
        assert!(e.message.contains("rtu-over-tcp"), "{}", e.message);
        let e = validation_error(&over.replace(
            "transport = \"rtu-over-tcp\"",
            "transport = \"rtu-over-tcp\"\nunit-id = 248",
        ));
        assert_eq!(e.key, "modbus.devices[0].unit-id");
        // Two unit ids behind one gateway share its address...
        let second = PRESS
            .replace("press-1", "press-2")
            .replace("transport = \"tcp\"", "transport = \"tcp\"\nunit-id = 2");
        let cfg = parse(&format!("{PRESS}{second}"));
        cfg.validate().unwrap();
        assert_eq!(cfg.devices[0].link(), cfg.devices[1].link());
        // ...but one connection speaks one framing.
        let e = validation_error(&format!("{PRESS}{}", over.replace("press-1", "press-2")));
        assert_eq!(e.key, "modbus.devices[1].transport");
        assert!(e.message.contains("agree on its framing"), "{}", e.message);
    }

    #[test]
    fn registers_may_have_their_own_poll_interval() {
        let text = PRESS.replace("scale = 0.1", "scale = 0.1\npoll-interval = \"10s\"");
        let cfg = parse(&text.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\nbackoff-max = \"30s\"",
        ));
        cfg.validate().unwrap();
        let groups = cfg.devices[0].register_groups();
        let spans: Vec<(Duration, Vec<&str>)> = groups
            .iter()
            .map(|(i, regs)| (*i, regs.iter().map(|r| r.sensor.as_str()).collect()))
            .collect();
        assert_eq!(
            spans,
            vec![
                (Duration::from_secs(1), vec!["temperature"]),
                (Duration::from_secs(10), vec!["speed"]),
            ]
        );
        let e =
            validation_error(&PRESS.replace("scale = 0.1", "scale = 0.1\npoll-interval = \"0s\""));
        assert_eq!(e.key, "modbus.devices[0].registers[1].poll-interval");
        let e =
            validation_error(&PRESS.replace("scale = 0.1", "scale = 0.1\npoll-interval = \"1m\""));
        assert_eq!(e.key, "modbus.devices[0].registers[1].poll-interval");
        assert!(e.message.contains("backoff-max"), "{}", e.message);
    }
}
