//! `millrace-sim`: a simulated plant for Millrace demos, tests and load.
//!
//! It serves simulated PLCs over Modbus TCP and RTU and publishes simulated
//! MQTT sensors, all driven by deterministic signals with injected anomalies,
//! so that every reading an agent sees can be recomputed by a test.
//!
//! # Layout
//!
//! - [`signal`]: the pure signal model (`value_at`, `mean_over`) and anomalies.
//! - [`encoding`]: values to Modbus registers (type, scale, word/byte order).
//! - [`config`]: the plant file (`config/sim.toml`), raw then checked.
//! - [`modbus`]: register maps, Modbus TCP servers and RTU slaves, faults.
//! - [`mqtt`]: MQTT sensors publishing JSON readings, malformed-payload faults.
//! - [`sparkplug`]: Sparkplug B edge nodes (BIRTH, DATA by alias, DEATH as will,
//!   rebirth on NCMD).
//! - [`load`]: bounded load runs at a target readings/s rate.
//! - [`publish`]: a fixed number of readings over one pipelined MQTT 3.1.1
//!   connection, counting which were acknowledged (reconnects and republishes).
//! - [`sim`]: starting and stopping a whole plant.
//!
//! # What it is not
//!
//! Not a physical process model, not a writable PLC, not a broker. It is a
//! reproducible source of readings with known anomalies.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use millrace_sim::{config::SimConfig, sim::{RunOptions, Simulation}};
//!
//! let config = SimConfig::load("config/sim.toml".as_ref())?;
//! let sim = Simulation::start(config, RunOptions { no_rtu: true, ..Default::default() }).await?;
//! let addr = sim.modbus_addr("press-1").expect("press-1 is in the plant");
//! let expected = sim.value_at("press-1/temperature", millrace_sim::unix_now_ms());
//! # let _ = (addr, expected);
//! sim.shutdown().await?;
//! # Ok(()) }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod encoding;
pub mod load;
pub mod modbus;
pub mod mqtt;
pub mod publish;
pub mod signal;
pub mod sim;
pub mod sparkplug;

/// Wall-clock time as Unix milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
