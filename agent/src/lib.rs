//! Millrace edge agent.
//!
//! # Layout
//! Modules follow the data flow: `ingest` → `window` → `anomaly` → `store` → `uplink`.

pub mod ingest;
pub mod store;
