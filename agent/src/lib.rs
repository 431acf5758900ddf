//! Millrace edge agent.
//!
//! # Layout
//! Modules follow the data flow: `ingest` → `window` → `anomaly` → `store` →
//! `uplink`; `pipeline` is the loop that drives them, `runtime` starts and
//! stops everything, `config` reads the TOML file, `tap` writes records as
//! JSON lines.

pub mod anomaly;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod pipeline;
pub mod runtime;
pub mod service;
pub mod store;
pub mod tap;
pub mod telemetry;
pub mod uplink;
pub mod window;
