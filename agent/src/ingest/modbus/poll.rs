//! The polling tasks: one per link. A link is a TCP connection (MBAP or RTU
//! framing) or a serial port; every device configured on it is polled in
//! turn over it, each register group on its own schedule (the device's
//! `poll-interval`, or a register's own). A Modbus TCP gateway in front of an
//! RS-485 bus is one link carrying several unit ids.
//!
//! Invariants:
//! - Every request and every connection attempt has a deadline (the device's
//!   `timeout`). After a timeout or a transport error the link (TCP
//!   connection or serial port) is dropped and rebuilt on the next attempt,
//!   so a late answer is never read as the answer to a later request.
//! - A device that fails is retried with exponential backoff, from one poll
//!   interval up to `backoff-max`; on a shared link the other devices keep
//!   their schedule and lose at most one timeout (and, over TCP, one
//!   reconnect) per failing attempt.
//! - A gateway's "path unavailable" (0A) or "target device failed to respond"
//!   (0B) exception is the unit behind it being unreachable, not bad data:
//!   counted as an exception, backed off like a timeout, not dead-lettered,
//!   and the link to the gateway is kept.
//! - A 64-bit integer beyond ±2^53 cannot be held exactly by the f64 of a
//!   reading: the nearest f64 is kept, the reading's quality is `uncertain`
//!   and it is counted (`millrace_modbus_inexact_readings_total`).
//! - Only read function codes (01, 02, 03, 04) are ever sent.
//! - An exception reply is the device speaking: it is counted, becomes a
//!   `DeviceException` dead letter, and the poll goes on. Timeouts and
//!   transport errors are counted and logged (rate-limited), not
//!   dead-lettered: there is no input to keep.

use std::sync::Arc;
use std::time::Duration;

use millrace_protocol::{DeadLetter, DeadLetterReason, Quality, Reading, SeriesKey, Source};
use tokio::time::Instant;
use tokio_modbus::client::{Client as _, Context};
use tokio_modbus::slave::{Slave, SlaveContext as _};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

use super::config::{DeviceConfig, LinkKey, RegisterConfig, SerialLine};
use super::plan::{decode_checked, plan_reads, split_read, Function, PlannedRead};
use super::stats::{DeviceStats, ModbusStats};
use crate::ingest::{now_ms, Delivery, IngestEvent, IngestTx};

/// Why a link to a device failed; the link is rebuilt after any of these.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no answer within {}", humantime_serde::re::humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("serial port: {0}")]
    Serial(#[from] tokio_serial::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] tokio_modbus::ProtocolError),
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
    /// Exception 0A or 0B from a gateway: the unit behind it is unreachable.
    #[error("gateway answers exception {code:02X} ({})", gateway_exception_name(*.code))]
    GatewayTarget { code: u8 },
}

/// Exception 0A: the gateway has no path to the unit.
const GATEWAY_PATH_UNAVAILABLE: u8 = 0x0A;
/// Exception 0B: the unit behind the gateway did not answer.
const GATEWAY_TARGET_FAILED: u8 = 0x0B;

fn gateway_exception_name(code: u8) -> &'static str {
    match code {
        GATEWAY_PATH_UNAVAILABLE => "gateway path unavailable",
        _ => "gateway target device failed to respond",
    }
}

impl From<tokio_modbus::Error> for LinkError {
    fn from(e: tokio_modbus::Error) -> Self {
        match e {
            tokio_modbus::Error::Protocol(p) => LinkError::Protocol(p),
            tokio_modbus::Error::Transport(io) => LinkError::Io(io),
        }
    }
}

/// Why a poll ended early.
#[derive(Debug)]
enum PollError {
    /// The link failed; drop it.
    Link(LinkError),
    /// The device is unreachable but the link is fine (a gateway said so).
    Device(LinkError),
    /// The pipeline's channel is closed: the source stops.
    ChannelClosed,
}

/// When a device is next due, and how many attempts in a row have failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub next_due: Instant,
    pub failures: u32,
}

impl Schedule {
    pub fn new(start: Instant) -> Self {
        Self {
            next_due: start,
            failures: 0,
        }
    }

    /// After a good poll: the next point of the poll grid after `now`.
    /// Returns the number of grid points passed over (a poll that overran).
    pub fn on_success(&mut self, now: Instant, interval: Duration) -> u64 {
        self.failures = 0;
        let behind = now.saturating_duration_since(self.next_due);
        let steps = behind.as_nanos() / interval.as_nanos() + 1;
        let steps_u32 = u32::try_from(steps).unwrap_or(u32::MAX);
        self.next_due += interval.saturating_mul(steps_u32);
        u64::try_from(steps - 1).unwrap_or(u64::MAX)
    }

    /// After a failed attempt: retry after `interval × 2^(failures − 1)`,
    /// capped at `max`. Returns the number of poll instants skipped.
    pub fn on_failure(&mut self, now: Instant, interval: Duration, max: Duration) -> u64 {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff_delay(self.failures, interval, max);
        self.next_due = now + delay;
        u64::try_from((delay.as_nanos() / interval.as_nanos()).saturating_sub(1))
            .unwrap_or(u64::MAX)
    }
}

/// `interval × 2^(failures − 1)`, capped at `max` (and at least `interval`).
pub(crate) fn backoff_delay(failures: u32, interval: Duration, max: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(30);
    interval
        .saturating_mul(1 << exponent)
        .min(max)
        .max(interval)
}

/// Logs at most once per interval, reporting how many were held back.
#[derive(Debug)]
struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last log)` when this event may be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

const LOG_EVERY: Duration = Duration::from_secs(10);

/// Everything needed to poll one device, whatever its transport.
#[derive(Debug)]
pub(crate) struct DevicePoller {
    name: Arc<str>,
    unit_id: u8,
    poll_interval: Duration,
    timeout: Duration,
    backoff_max: Duration,
    registers: Vec<RegisterConfig>,
    /// Each register's series key and unit, built once: every reading of a
    /// register carries the same (shared) key and unit.
    series: Vec<(SeriesKey, Arc<str>)>,
    reads: Vec<PlannedRead>,
    stats: Arc<ModbusStats>,
    stats_index: usize,
    schedule: Schedule,
    failure_log: LogLimiter,
}

impl DevicePoller {
    /// The poller of one register group of a device: `registers`, all read
    /// every `poll_interval`.
    pub fn new(
        cfg: &DeviceConfig,
        poll_interval: Duration,
        registers: Vec<RegisterConfig>,
        stats: Arc<ModbusStats>,
        stats_index: usize,
        start: Instant,
    ) -> Self {
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let series = registers
            .iter()
            .map(|reg| {
                let key = SeriesKey::new(Arc::clone(&name), reg.sensor.as_str());
                (key, Arc::from(reg.unit.as_str()))
            })
            .collect();
        Self {
            name,
            unit_id: cfg.unit_id,
            poll_interval,
            timeout: cfg.timeout,
            backoff_max: cfg.backoff_max,
            reads: plan_reads(&registers, cfg.max_gap),
            registers,
            series,
            stats,
            stats_index,
            schedule: Schedule::new(start),
            failure_log: LogLimiter::new(LOG_EVERY),
        }
    }

    fn stats(&self) -> &DeviceStats {
        self.stats.at(self.stats_index)
    }

    pub fn next_due(&self) -> Instant {
        self.schedule.next_due
    }

    fn on_success(&mut self) {
        self.stats().add_poll();
        let skipped = self.schedule.on_success(Instant::now(), self.poll_interval);
        if skipped > 0 {
            self.stats().add_polls_skipped(skipped);
            tracing::debug!(device = %self.name, skipped, "modbus poll overran its interval");
        }
    }

    /// Counts and logs (rate-limited) a failed attempt, and backs off.
    fn on_failure(&mut self, error: &LinkError) {
        match error {
            LinkError::Timeout(_) => self.stats().add_timeout(),
            // Already counted as an exception reply.
            LinkError::GatewayTarget { .. } => {}
            _ => self.stats().add_transport_error(),
        }
        self.stats().set_connected(false);
        let now = Instant::now();
        let skipped = self
            .schedule
            .on_failure(now, self.poll_interval, self.backoff_max);
        self.stats().add_polls_skipped(skipped);
        if let Some(suppressed) = self.failure_log.allow(now) {
            let retry_in = self.schedule.next_due.saturating_duration_since(now);
            tracing::warn!(
                device = %self.name,
                unit_id = self.unit_id,
                %error,
                failures = self.schedule.failures,
                retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                suppressed,
                "modbus device unreachable; link dropped"
            );
        }
    }

    /// Runs every planned read once against `ctx`. Exceptions are handled
    /// here; a link failure ends the poll.
    async fn poll(&mut self, ctx: &mut Context, tx: &IngestTx) -> Result<(), PollError> {
        ctx.set_slave(Slave(self.unit_id));
        let mut to_split = Vec::new();
        for r in 0..self.reads.len() {
            let read = &self.reads[r];
            let request = match read.function {
                Function::Coil => Request::ReadCoils(read.start, read.count),
                Function::DiscreteInput => Request::ReadDiscreteInputs(read.start, read.count),
                Function::Holding => Request::ReadHoldingRegisters(read.start, read.count),
                Function::Input => Request::ReadInputRegisters(read.start, read.count),
            };
            let reply = tokio::time::timeout(self.timeout, ctx.call(request)).await;
            let arrived_ms = now_ms();
            let response = match reply {
                Err(_elapsed) => return Err(PollError::Link(LinkError::Timeout(self.timeout))),
                Ok(Err(e)) => return Err(PollError::Link(e.into())),
                Ok(Ok(Err(exception))) => {
                    if self.on_exception(r, exception, arrived_ms, tx).await? {
                        to_split.push(r);
                    }
                    continue;
                }
                Ok(Ok(Ok(response))) => response,
            };
            let events = self
                .decode_response(r, response, arrived_ms)
                .map_err(PollError::Link)?;
            for event in events {
                tx.send(event).await.map_err(|_| PollError::ChannelClosed)?;
            }
        }
        // Later reads keep their indices while earlier ones are split.
        for r in to_split.into_iter().rev() {
            let pieces = split_read(&self.reads[r], &self.registers);
            tracing::info!(
                device = %self.name,
                function = %self.reads[r].function,
                address = self.reads[r].start,
                count = self.reads[r].count,
                pieces = pieces.len(),
                "modbus device rejects the merged read; reading its registers one by one"
            );
            self.reads.splice(r..=r, pieces);
        }
        self.stats().set_connected(true);
        Ok(())
    }

    /// Counts an exception reply and dead-letters it. Returns whether the
    /// read should be split (exception 02 on a read serving several values).
    async fn on_exception(
        &self,
        r: usize,
        exception: ExceptionCode,
        time_ms: i64,
        tx: &IngestTx,
    ) -> Result<bool, PollError> {
        let read = &self.reads[r];
        let code = u8::from(exception);
        self.stats().add_exception(code);
        if code == GATEWAY_PATH_UNAVAILABLE || code == GATEWAY_TARGET_FAILED {
            return Err(PollError::Device(LinkError::GatewayTarget { code }));
        }
        let sensors: Vec<&str> = read
            .registers
            .iter()
            .map(|&i| self.registers[i].sensor.as_str())
            .collect();
        let detail = format!(
            "function={} ({:02}) address={} count={} exception={exception:?} ({code:02}) sensors={}",
            read.function,
            read.function.code(),
            read.start,
            read.count,
            sensors.join(",")
        );
        tracing::debug!(device = %self.name, %detail, "modbus exception reply");
        // The exception PDU as it came off the wire: function | 0x80, code.
        let input = vec![read.function.code() | 0x80, code];
        let letter = DeadLetter::new(
            Source::Modbus,
            self.name.as_ref(),
            input,
            DeadLetterReason::DeviceException,
            detail,
            time_ms,
        );
        tx.send(IngestEvent::DeadLetter(letter))
            .await
            .map_err(|_| PollError::ChannelClosed)?;
        Ok(exception == ExceptionCode::IllegalDataAddress && read.registers.len() > 1)
    }

    /// Turns one reply into readings (and dead letters for non-finite values).
    fn decode_response(
        &self,
        r: usize,
        response: Response,
        time_ms: i64,
    ) -> Result<Vec<IngestEvent>, LinkError> {
        let read = &self.reads[r];
        let count = usize::from(read.count);
        let (bits, words) = match (read.function, response) {
            (Function::Coil, Response::ReadCoils(bits))
            | (Function::DiscreteInput, Response::ReadDiscreteInputs(bits)) => (bits, Vec::new()),
            (Function::Holding, Response::ReadHoldingRegisters(words))
            | (Function::Input, Response::ReadInputRegisters(words)) => (Vec::new(), words),
            (function, other) => {
                return Err(LinkError::UnexpectedReply(format!(
                    "{function} read answered with {other:?}"
                )))
            }
        };
        // Bit replies are padded to whole bytes; register replies are exact.
        let got = if read.function.is_bit() {
            bits.len()
        } else {
            words.len()
        };
        let short = if read.function.is_bit() {
            got < count
        } else {
            got != count
        };
        if short {
            return Err(LinkError::UnexpectedReply(format!(
                "asked {count} items from {} {}, got {got}",
                read.function, read.start
            )));
        }
        let mut events = Vec::with_capacity(read.registers.len());
        for &i in &read.registers {
            let reg = &self.registers[i];
            let (series, unit) = &self.series[i];
            let offset = usize::from(reg.address - read.start);
            let (raw, exact) = if read.function.is_bit() {
                (f64::from(u8::from(bits[offset])), true)
            } else {
                let width = usize::from(reg.data_type.width());
                decode_checked(
                    reg.data_type,
                    reg.word_order(),
                    &words[offset..offset + width],
                )
                .map_err(|e| LinkError::UnexpectedReply(e.to_string()))?
            };
            let reading = Reading {
                series: series.clone(),
                time_ms,
                value: raw * reg.scale + reg.offset,
                unit: Arc::clone(unit),
                source: Source::Modbus,
                quality: if exact {
                    Quality::Good
                } else {
                    Quality::Uncertain
                },
            };
            if reading.value.is_finite() {
                self.stats().add_reading();
                if !exact {
                    self.stats().add_inexact_reading();
                    if self.stats().inexact_readings() == 1 {
                        tracing::warn!(
                            device = %self.name,
                            sensor = %reg.sensor,
                            data_type = %reg.data_type,
                            "modbus 64-bit value beyond 2^53 kept as the nearest f64; \
                             readings marked quality uncertain and counted"
                        );
                    }
                }
                events.push(IngestEvent::Reading(reading, Delivery::Once));
            } else {
                let reason = if reading.value.is_nan() {
                    DeadLetterReason::NotANumber
                } else {
                    DeadLetterReason::Infinite
                };
                events.push(IngestEvent::DeadLetter(DeadLetter::for_reading(
                    &reading, reason, time_ms,
                )));
            }
        }
        Ok(events)
    }
}

/// Outcome of waiting for something while watching for shutdown.
enum Step<T> {
    Done(T),
    Shutdown,
}

async fn until_shutdown<F: std::future::Future>(
    shutdown: &CancellationToken,
    f: F,
) -> Step<F::Output> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Step::Shutdown,
        out = f => Step::Done(out),
    }
}

/// One link and the device register groups polled over it.
#[derive(Debug)]
pub(crate) struct Link {
    pub key: LinkKey,
    /// Serial links: the line settings every device on it agrees on.
    pub line: Option<SerialLine>,
    pub devices: Vec<DevicePoller>,
}

impl Link {
    fn describe(&self) -> String {
        match &self.key {
            LinkKey::Tcp(address) => format!("tcp {address}"),
            LinkKey::RtuOverTcp(address) => format!("rtu-over-tcp {address}"),
            LinkKey::Serial(path) => match self.line {
                Some(line) => format!("rtu {} {line}", path.display()),
                None => format!("rtu {}", path.display()),
            },
        }
    }

    /// Opens the link, on behalf of the device about to be polled.
    async fn open(&self, device: &DevicePoller) -> Result<Context, LinkError> {
        match &self.key {
            LinkKey::Tcp(address) => {
                let stream = connect_tcp(address, device.timeout).await?;
                Ok(tokio_modbus::client::tcp::attach_slave(
                    stream,
                    Slave(device.unit_id),
                ))
            }
            LinkKey::RtuOverTcp(address) => {
                let stream = connect_tcp(address, device.timeout).await?;
                Ok(tokio_modbus::client::rtu::attach_slave(
                    stream,
                    Slave(device.unit_id),
                ))
            }
            LinkKey::Serial(path) => open_serial(path, self.line.unwrap_or(DEFAULT_LINE)),
        }
    }
}

/// Line settings of a serial link that (never, after validation) has none.
const DEFAULT_LINE: SerialLine = SerialLine {
    baud_rate: super::config::defaults::BAUD_RATE,
    parity: super::config::Parity::None,
    data_bits: super::config::defaults::DATA_BITS,
    stop_bits: super::config::defaults::STOP_BITS,
};

/// Polls the devices of one link in turn, each register group on its own
/// schedule, until shutdown or until the pipeline closes. The link is opened
/// lazily and rebuilt (a fresh connection, or a reopened and flushed port)
/// after any timeout or transport error, so a late answer is never read as
/// the reply to a later request.
pub(crate) async fn run_link(mut link: Link, tx: IngestTx, shutdown: CancellationToken) {
    let mut ctx: Option<Context> = None;
    let mut opened_before = false;
    let what = link.describe();
    let units: std::collections::BTreeSet<u8> = link.devices.iter().map(|d| d.unit_id).collect();
    tracing::info!(
        link = %what,
        groups = link.devices.len(),
        unit_ids = ?units,
        "modbus link polling"
    );
    // The group due first; ties go to configuration order.
    while let Some(next) = (0..link.devices.len()).min_by_key(|&i| link.devices[i].next_due()) {
        if let Step::Shutdown = until_shutdown(
            &shutdown,
            tokio::time::sleep_until(link.devices[next].next_due()),
        )
        .await
        {
            break;
        }
        if ctx.is_none() {
            match until_shutdown(&shutdown, link.open(&link.devices[next])).await {
                Step::Shutdown => break,
                Step::Done(Err(e)) => {
                    link.devices[next].on_failure(&e);
                    continue;
                }
                Step::Done(Ok(opened)) => {
                    let device = &link.devices[next];
                    if opened_before {
                        device.stats().add_reconnect();
                    }
                    opened_before = true;
                    device.stats().set_connected(true);
                    tracing::debug!(link = %what, "modbus link open");
                    ctx = Some(opened);
                }
            }
        }
        let Some(open) = ctx.as_mut() else { continue };
        let device = &mut link.devices[next];
        match until_shutdown(&shutdown, device.poll(open, &tx)).await {
            Step::Shutdown => break,
            Step::Done(Ok(())) => device.on_success(),
            Step::Done(Err(PollError::Device(e))) => device.on_failure(&e),
            Step::Done(Err(PollError::Link(e))) => {
                // A late answer to this device must not be read as the next
                // device's reply: start over on a fresh link.
                ctx = None;
                device.on_failure(&e);
            }
            Step::Done(Err(PollError::ChannelClosed)) => {
                tracing::info!(link = %what, "ingest channel closed; modbus link stops");
                break;
            }
        }
    }
    for device in &link.devices {
        device.stats().set_connected(false);
    }
    if let (Some(mut open), Some(first)) = (ctx, link.devices.first()) {
        let _ = tokio::time::timeout(first.timeout, open.disconnect()).await;
    }
}

async fn connect_tcp(address: &str, timeout: Duration) -> Result<tokio::net::TcpStream, LinkError> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| LinkError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn open_serial(path: &std::path::Path, line: SerialLine) -> Result<Context, LinkError> {
    use super::config::Parity;
    use tokio_serial::SerialPort as _;
    let data_bits = match line.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits = match line.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    let parity = match line.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let builder = tokio_serial::new(path.to_string_lossy(), line.baud_rate)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .parity(parity)
        .flow_control(tokio_serial::FlowControl::None);
    let port = tokio_serial::SerialStream::open(&builder)?;
    // Whatever a slave sent after we gave up on it is not an answer to anyone.
    port.clear(tokio_serial::ClearBuffer::All)?;
    Ok(tokio_modbus::client::rtu::attach(port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_doubles_from_the_interval_and_caps() {
        let max = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=8)
            .map(|n| backoff_delay(n, S, max).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff_delay(u32::MAX, S, max), max);
        assert_eq!(backoff_delay(0, S, max), S);
    }

    #[test]
    fn schedule_keeps_the_grid_and_skips_overruns() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        assert_eq!(s.on_success(t0 + Duration::from_millis(20), S), 0);
        assert_eq!(s.next_due, t0 + S);
        // A poll that overran 2.5 intervals lands on the next grid point.
        assert_eq!(s.on_success(t0 + Duration::from_millis(3500), S), 2);
        assert_eq!(s.next_due, t0 + 4 * S);
    }

    #[test]
    fn schedule_backs_off_then_recovers() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let max = Duration::from_secs(5);
        assert_eq!(s.on_failure(t0, S, max), 0);
        assert_eq!(s.next_due, t0 + S);
        assert_eq!(s.on_failure(t0 + S, S, max), 1);
        assert_eq!(s.next_due, t0 + 3 * S);
        assert_eq!(s.on_failure(t0 + 3 * S, S, max), 3);
        assert_eq!(s.on_failure(t0 + 7 * S, S, max), 4);
        assert_eq!(s.next_due, t0 + 12 * S);
        assert_eq!(s.failures, 4);
        s.on_success(t0 + 12 * S, S);
        assert_eq!(s.failures, 0);
        assert_eq!(s.next_due, t0 + 13 * S);
    }

    #[test]
    fn log_limiter_holds_back_and_reports() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + S), None);
        assert_eq!(l.allow(t0 + 2 * S), None);
        assert_eq!(l.allow(t0 + 10 * S), Some(2));
    }
}
