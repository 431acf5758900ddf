//! Millrace edge agent.
//!
//! # Layout
//! Modules follow the data flow: `ingest` → `window` → `anomaly` → `store` → `uplink`.

pub mod anomaly;
pub mod ingest;
pub mod window;
