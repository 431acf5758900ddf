//! Per-device counters of the Modbus source, shared with `/metrics`.
//!
//! Plain atomics, written by the polling tasks and read by anyone holding the
//! `Arc<ModbusStats>`; relaxed ordering (each counter is independent).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of every configured device, in configuration order.
#[derive(Debug)]
pub struct ModbusStats {
    devices: Vec<DeviceStats>,
}

impl ModbusStats {
    pub(crate) fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self {
            devices: names.into_iter().map(DeviceStats::new).collect(),
        }
    }

    /// All devices, in configuration order.
    pub fn devices(&self) -> &[DeviceStats] {
        &self.devices
    }

    /// The counters of the named device.
    pub fn device(&self, name: &str) -> Option<&DeviceStats> {
        self.devices.iter().find(|d| d.name == name)
    }

    pub(crate) fn at(&self, index: usize) -> &DeviceStats {
        &self.devices[index]
    }
}

/// Counters of one device.
#[derive(Debug)]
pub struct DeviceStats {
    name: String,
    polls: AtomicU64,
    polls_skipped: AtomicU64,
    readings: AtomicU64,
    inexact_readings: AtomicU64,
    exceptions: Box<[AtomicU64; 256]>,
    timeouts: AtomicU64,
    transport_errors: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicBool,
}

impl DeviceStats {
    fn new(name: String) -> Self {
        Self {
            name,
            polls: AtomicU64::new(0),
            polls_skipped: AtomicU64::new(0),
            readings: AtomicU64::new(0),
            inexact_readings: AtomicU64::new(0),
            exceptions: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            timeouts: AtomicU64::new(0),
            transport_errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// Polls that completed (every request answered, with data or an exception).
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }
    /// Poll instants passed over while the device was in failure backoff.
    pub fn polls_skipped(&self) -> u64 {
        self.polls_skipped.load(Ordering::Relaxed)
    }
    /// Readings produced.
    pub fn readings(&self) -> u64 {
        self.readings.load(Ordering::Relaxed)
    }
    /// Readings of 64-bit integers beyond ±2^53, kept as the nearest f64
    /// and marked quality `uncertain`.
    pub fn inexact_readings(&self) -> u64 {
        self.inexact_readings.load(Ordering::Relaxed)
    }
    /// Exception replies with the given exception code.
    pub fn exceptions(&self, code: u8) -> u64 {
        self.exceptions[usize::from(code)].load(Ordering::Relaxed)
    }
    /// Exception replies of every code, as `(code, count)` for non-zero counts.
    pub fn exceptions_by_code(&self) -> Vec<(u8, u64)> {
        (0..=u8::MAX)
            .map(|code| (code, self.exceptions(code)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
    pub fn exceptions_total(&self) -> u64 {
        self.exceptions_by_code().iter().map(|&(_, n)| n).sum()
    }
    /// Requests (or connection attempts) that got no answer within the timeout.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }
    /// I/O errors, connection failures and malformed or mismatched replies.
    pub fn transport_errors(&self) -> u64 {
        self.transport_errors.load(Ordering::Relaxed)
    }
    /// Connections (TCP) or port openings (RTU) established after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Whether the device's link is currently up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn add_poll(&self) {
        self.polls.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_polls_skipped(&self, n: u64) {
        self.polls_skipped.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_reading(&self) {
        self.readings.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_inexact_reading(&self) {
        self.inexact_readings.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_exception(&self, code: u8) {
        self.exceptions[usize::from(code)].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_transport_error(&self) {
        self.transport_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }
}
