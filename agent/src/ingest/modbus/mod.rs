//! Modbus source: polls PLCs over Modbus TCP and RTU slaves on serial buses,
//! and turns their registers into [`Reading`](millrace_protocol::Reading)s.
//!
//! What it is:
//! - one polling task per link: a Modbus TCP connection, a serial bus, or a
//!   TCP connection carrying RTU frames (`rtu-over-tcp`, serial device servers
//!   in transparent mode). Devices naming the same `address` or `path` share
//!   the link and are polled in turn over it, so several unit ids behind one
//!   Modbus gateway use one connection, as gateways expect;
//! - each value read on its device's `poll-interval`, or on its own
//!   (`poll-interval` on a register): registers sharing an interval are read
//!   together, each group on its own schedule;
//! - read planning that merges neighbouring registers into the fewest requests
//!   (at most 125 registers, 2000 bits), and decoding of `bool`, 16-, 32- and
//!   64-bit integers and floats in the four word orders `ABCD CDAB BADC DCBA`;
//! - value = raw × scale + offset, stamped with the time the reply arrived;
//!   64-bit integers beyond ±2^53 keep the nearest f64 but are flagged
//!   (quality `uncertain`, counted), never rounded silently;
//! - exception replies become counted `DeviceException` dead letters; timeouts
//!   and transport errors are counted, logged (rate-limited) and answered by
//!   rebuilding the link with exponential backoff, without holding up the
//!   other links; a gateway's 0A/0B exception backs off that unit only.
//!
//! What it is not: it never writes to a device (function codes 01–04 only), it
//! does not scan for devices, and it does not keep values between polls (no
//! report-by-exception): every poll yields every configured value.
//!
//! ```no_run
//! # async fn demo(tx: millrace_agent::ingest::IngestTx) -> Result<(), Box<dyn std::error::Error>> {
//! use millrace_agent::ingest::modbus::{ModbusConfig, ModbusSource};
//! let cfg: ModbusConfig = toml::from_str(r#"
//!     [[devices]]
//!     name = "press-1"
//!     transport = "tcp"
//!     address = "127.0.0.1:15020"
//!     [[devices.registers]]
//!     sensor = "temperature"
//!     function = "holding"
//!     address = 0
//!     type = "f32"
//!     unit = "degC"
//! "#)?;
//! let source = ModbusSource::new(cfg)?;
//! let stats = source.stats();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(source.run(tx, shutdown.clone()));
//! # let _ = stats; Ok(()) }
//! ```
//!
//! # Layout
//! - `config`: the `[modbus]` table and its validation.
//! - `plan`: read planning and decoding (pure).
//! - `poll`: the TCP device and RTU bus tasks.
//! - `stats`: per-device counters.

mod config;
mod plan;
mod poll;
mod stats;

pub use config::{
    defaults, ConfigError, DeviceConfig, ModbusConfig, Parity, RegisterConfig, Transport,
    MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ,
};
pub use plan::{
    decode, decode_checked, encode_words, plan_reads, DataType, DecodeError, Function, PlannedRead,
    WordOrder, F64_EXACT_INT,
};
pub use poll::LinkError;
pub use stats::{DeviceStats, ModbusStats};

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::IngestTx;
use config::LinkKey;
use poll::{run_link, DevicePoller, Link};

/// The Modbus source: a validated configuration and its counters.
#[derive(Debug)]
pub struct ModbusSource {
    devices: Vec<DeviceConfig>,
    stats: Arc<ModbusStats>,
}

impl ModbusSource {
    /// Validates the configuration; the error names the offending key.
    pub fn new(cfg: ModbusConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let stats = Arc::new(ModbusStats::new(cfg.devices.iter().map(|d| d.name.clone())));
        Ok(Self {
            devices: cfg.devices,
            stats,
        })
    }

    /// The per-device counters, live while [`run`](Self::run) polls.
    pub fn stats(&self) -> Arc<ModbusStats> {
        Arc::clone(&self.stats)
    }

    /// Polls every device until `shutdown` is cancelled or the pipeline's
    /// channel closes. Returns once every polling task has stopped.
    pub async fn run(self, tx: IngestTx, shutdown: CancellationToken) {
        let start = tokio::time::Instant::now();
        let mut tasks = JoinSet::new();
        let mut links: BTreeMap<LinkKey, Link> = BTreeMap::new();
        for (index, dev) in self.devices.iter().enumerate() {
            // validate() guarantees the transport's key is present.
            let Some(key) = dev.link() else {
                tracing::error!(device = %dev.name, "modbus device without address or path");
                continue;
            };
            let link = links.entry(key.clone()).or_insert_with(|| Link {
                key,
                line: (dev.transport == Transport::Rtu).then(|| dev.serial_line()),
                devices: Vec::new(),
            });
            for (interval, registers) in dev.register_groups() {
                link.devices.push(DevicePoller::new(
                    dev,
                    interval,
                    registers,
                    Arc::clone(&self.stats),
                    index,
                    start,
                ));
            }
        }
        for link in links.into_values() {
            tasks.spawn(run_link(link, tx.clone(), shutdown.clone()));
        }
        drop(tx);
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "modbus polling task failed");
            }
        }
    }
}
