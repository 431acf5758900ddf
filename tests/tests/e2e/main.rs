//! End-to-end tests: the real binaries (`millrace-sim`, `millrace-agent`,
//! `millrace-aggregator`) and real peers, on free loopback ports.

mod chain;
mod dashboard;
mod faults;
mod ingest;
mod pipeline;
mod scale;
mod security;
mod systemd;
