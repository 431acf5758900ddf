//! Simulated PLCs: Modbus TCP servers and Modbus RTU slaves serving a
//! register map computed from the plant's signals.
//!
//! A [`RegisterMap`] answers reads of the four Modbus tables from the
//! configured points: every read evaluates the point's [`Signal`] at the read
//! time rounded down to the server's `refresh` period (sample-and-hold, like a
//! PLC scan), encodes it with the point's type, scale and word order, and
//! returns the requested slice. [`PlcService`] puts it behind tokio-modbus'
//! server [`Service`] trait and injects the configured faults.
//!
//! Answers, as a real device would give them:
//! - an address not covered by a point → `IllegalDataAddress`;
//! - a quantity outside 1..=125 registers or 1..=2000 bits → `IllegalDataValue`;
//! - any write or other function code → `IllegalFunction`;
//! - a point in a dropout → `ServerDeviceFailure`;
//! - TCP, another unit id (255 is accepted) → `GatewayTargetDevice`; RTU,
//!   another slave id → no answer at all.
//!
//! What it is not: a writable PLC. The map is read-only; its state is the
//! signal, not memory.
//!
//! [`Signal`]: crate::signal::Signal

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{ModbusFaults, ModbusRtuConfig, ModbusTcpConfig, PointConfig, Table};
use crate::encoding::encode;
use crate::signal::{align_down, duration_ms, fnv1a, SplitMix64};
use crate::unix_now_ms;

/// Most registers one read may ask for (Modbus application protocol, FC 3/4).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most bits one read may ask for (FC 1/2).
pub const MAX_READ_BITS: u16 = 2000;

/// Errors of the Modbus server layer (transport, not device exceptions).
#[derive(Debug, thiserror::Error)]
pub enum ModbusServerError {
    #[error("cannot listen on {addr} for `{device}`: {source}")]
    Bind {
        device: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("Modbus TCP server `{device}` stopped: {source}")]
    Serve {
        device: String,
        #[source]
        source: io::Error,
    },
}

/// Why a read is refused; each maps to a Modbus exception code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("address not mapped")]
    IllegalDataAddress,
    #[error("quantity out of range")]
    IllegalDataValue,
    #[error("sensor in dropout")]
    SensorDropout,
}

impl From<ReadError> for ExceptionCode {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::IllegalDataAddress => ExceptionCode::IllegalDataAddress,
            ReadError::IllegalDataValue => ExceptionCode::IllegalDataValue,
            ReadError::SensorDropout => ExceptionCode::ServerDeviceFailure,
        }
    }
}

#[derive(Debug)]
struct MappedPoint {
    series: String,
    point: PointConfig,
}

/// The read-only register map of one simulated device.
#[derive(Debug)]
pub struct RegisterMap {
    device: String,
    seed: u64,
    refresh_ms: i64,
    points: Vec<MappedPoint>,
}

impl RegisterMap {
    pub fn new(device: &str, seed: u64, refresh: Duration, points: &[PointConfig]) -> Self {
        Self {
            device: device.to_owned(),
            seed,
            refresh_ms: duration_ms(refresh).max(1),
            points: points
                .iter()
                .map(|p| MappedPoint {
                    series: format!("{device}/{}", p.sensor),
                    point: p.clone(),
                })
                .collect(),
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The instant whose signal values a read at `now_ms` serves.
    pub fn sample_time(&self, now_ms: i64) -> i64 {
        align_down(now_ms, self.refresh_ms)
    }

    /// Reads `quantity` registers of a register table (`holding`/`input`) at `now_ms`.
    pub fn read_registers(
        &self,
        table: Table,
        address: u16,
        quantity: u16,
        now_ms: i64,
    ) -> Result<Vec<u16>, ReadError> {
        if table.is_bit_table() || quantity == 0 || quantity > MAX_READ_REGISTERS {
            return Err(ReadError::IllegalDataValue);
        }
        let words = self.read_words(table, address, quantity, now_ms)?;
        Ok(words)
    }

    /// Reads `quantity` bits of a bit table (`coil`/`discrete-input`) at `now_ms`.
    pub fn read_bits(
        &self,
        table: Table,
        address: u16,
        quantity: u16,
        now_ms: i64,
    ) -> Result<Vec<bool>, ReadError> {
        if !table.is_bit_table() || quantity == 0 || quantity > MAX_READ_BITS {
            return Err(ReadError::IllegalDataValue);
        }
        let words = self.read_words(table, address, quantity, now_ms)?;
        Ok(words.into_iter().map(|w| w != 0).collect())
    }

    fn read_words(
        &self,
        table: Table,
        address: u16,
        quantity: u16,
        now_ms: i64,
    ) -> Result<Vec<u16>, ReadError> {
        let start = u32::from(address);
        let end = start + u32::from(quantity);
        if end > 65_536 {
            return Err(ReadError::IllegalDataAddress);
        }
        let t_ms = self.sample_time(now_ms);
        let mut words = vec![0u16; usize::from(quantity)];
        let mut covered = vec![false; usize::from(quantity)];
        for mp in self.points.iter().filter(|mp| mp.point.table == table) {
            let p = &mp.point;
            let p_start = u32::from(p.address);
            let p_end = p_start + u32::from(p.data_type.width());
            if p_end <= start || p_start >= end {
                continue;
            }
            let value = p
                .signal
                .value_at(self.seed, &mp.series, t_ms)
                .ok_or(ReadError::SensorDropout)?;
            let encoded = encode(value, p.data_type, p.order, p.scale);
            for reg in p_start.max(start)..p_end.min(end) {
                let i = (reg - start) as usize;
                words[i] = encoded[(reg - p_start) as usize];
                covered[i] = true;
            }
        }
        if covered.iter().all(|c| *c) {
            Ok(words)
        } else {
            Err(ReadError::IllegalDataAddress)
        }
    }

    /// Answers one request (no faults, no unit-id check).
    pub fn answer(&self, request: &Request<'_>, now_ms: i64) -> Result<Response, ExceptionCode> {
        let answer = match *request {
            Request::ReadHoldingRegisters(addr, qty) => Response::ReadHoldingRegisters(
                self.read_registers(Table::Holding, addr, qty, now_ms)?,
            ),
            Request::ReadInputRegisters(addr, qty) => Response::ReadInputRegisters(
                self.read_registers(Table::Input, addr, qty, now_ms)?,
            ),
            Request::ReadCoils(addr, qty) => {
                Response::ReadCoils(self.read_bits(Table::Coil, addr, qty, now_ms)?)
            }
            Request::ReadDiscreteInputs(addr, qty) => Response::ReadDiscreteInputs(
                self.read_bits(Table::DiscreteInput, addr, qty, now_ms)?,
            ),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        Ok(answer)
    }
}

/// How a server treats a request for another unit id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherUnit {
    /// Answer `GatewayTargetDevice` (Modbus TCP).
    Exception,
    /// Stay silent (a slave on a shared serial bus).
    Ignore,
}

/// Request counters of one server, for the shutdown summary.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub exceptions: AtomicU64,
    pub injected_exceptions: AtomicU64,
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub forced_disconnects: AtomicU64,
}

/// A Modbus [`Service`] for one connection (TCP) or one serial line (RTU).
#[derive(Debug)]
pub struct PlcService {
    map: Arc<RegisterMap>,
    unit_id: u8,
    other_unit: OtherUnit,
    faults: ModbusFaults,
    rng: Mutex<SplitMix64>,
    stats: Arc<ServerStats>,
    _permit: Option<OwnedSemaphorePermit>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl PlcService {
    pub fn new(
        map: Arc<RegisterMap>,
        unit_id: u8,
        other_unit: OtherUnit,
        faults: ModbusFaults,
        fault_seed: u64,
        stats: Arc<ServerStats>,
    ) -> Self {
        Self {
            map,
            unit_id,
            other_unit,
            faults,
            rng: Mutex::new(SplitMix64::new(fault_seed)),
            stats,
            _permit: None,
        }
    }

    fn with_permit(mut self, permit: OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    fn inject_exception(&self) -> bool {
        if self.faults.exception_rate <= 0.0 {
            return false;
        }
        // A poisoned lock only means another request panicked mid-draw; the
        // generator state is still a valid u64.
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        rng.next_f64() < self.faults.exception_rate
    }

    fn respond(&self, req: &SlaveRequest<'_>) -> Result<Option<Response>, ExceptionCode> {
        let for_us = req.slave == self.unit_id
            || (self.other_unit == OtherUnit::Exception && req.slave == 255);
        if !for_us {
            return match self.other_unit {
                OtherUnit::Exception => Err(ExceptionCode::GatewayTargetDevice),
                OtherUnit::Ignore => Ok(None),
            };
        }
        if self.inject_exception() {
            self.stats
                .injected_exceptions
                .fetch_add(1, Ordering::Relaxed);
            return Err(ExceptionCode::ServerDeviceFailure);
        }
        self.map.answer(&req.request, unix_now_ms()).map(Some)
    }
}

impl Service for PlcService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = ServiceFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.respond(&req);
        if let Err(code) = &result {
            self.stats.exceptions.fetch_add(1, Ordering::Relaxed);
            debug!(device = self.map.device(), unit = req.slave, request = ?req.request, exception = ?code, "modbus exception");
        }
        let delay = self.faults.slow_response;
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            result
        })
    }
}

/// Binds the listener of a Modbus TCP server (port 0 picks a free port).
pub async fn bind_tcp(config: &ModbusTcpConfig) -> Result<TcpListener, ModbusServerError> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| ModbusServerError::Bind {
            device: config.name.clone(),
            addr: config.listen,
            source,
        })
}

/// Serves a simulated PLC on `listener` until `cancel` fires.
pub async fn serve_tcp(
    listener: TcpListener,
    config: ModbusTcpConfig,
    seed: u64,
    cancel: CancellationToken,
) -> Result<(), ModbusServerError> {
    let map = Arc::new(RegisterMap::new(
        &config.name,
        seed,
        config.refresh,
        &config.points,
    ));
    let stats = Arc::new(ServerStats::default());
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let device = config.name.clone();
    let connection_seq = AtomicU64::new(0);
    let fault_seed = seed ^ fnv1a(config.name.as_bytes());
    let local = listener.local_addr().ok();
    info!(device = %device, addr = ?local, points = config.points.len(), "modbus tcp server listening");

    let on_connected = |stream: TcpStream, peer: SocketAddr| {
        let map = Arc::clone(&map);
        let stats = Arc::clone(&stats);
        let permits = Arc::clone(&permits);
        let faults = config.faults.clone();
        let n = connection_seq.fetch_add(1, Ordering::Relaxed);
        let device = device.clone();
        let unit_id = config.unit_id;
        async move {
            let Ok(permit) = permits.try_acquire_owned() else {
                stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                warn!(device = %device, %peer, "connection refused: max-connections reached");
                return Ok(None);
            };
            stats.connections.fetch_add(1, Ordering::Relaxed);
            debug!(device = %device, %peer, "modbus client connected");
            let disconnect_after = faults.disconnect_every;
            let service = PlcService::new(
                map,
                unit_id,
                OtherUnit::Exception,
                faults,
                crate::signal::splitmix64(fault_seed ^ n),
                Arc::clone(&stats),
            )
            .with_permit(permit);
            Ok(Some((
                service,
                ExpiringStream::new(stream, disconnect_after, stats),
            )))
        }
    };
    let on_process_error = {
        let device = config.name.clone();
        move |err: io::Error| debug!(device = %device, error = %err, "modbus connection ended with an error")
    };

    let server = tokio_modbus::server::tcp::Server::new(listener);
    let result = tokio::select! {
        res = server.serve(&on_connected, on_process_error) => res,
        () = cancel.cancelled() => Ok(()),
    };
    info!(
        device = %config.name,
        requests = stats.requests.load(Ordering::Relaxed),
        exceptions = stats.exceptions.load(Ordering::Relaxed),
        injected_exceptions = stats.injected_exceptions.load(Ordering::Relaxed),
        connections = stats.connections.load(Ordering::Relaxed),
        refused_connections = stats.refused_connections.load(Ordering::Relaxed),
        forced_disconnects = stats.forced_disconnects.load(Ordering::Relaxed),
        "modbus tcp server stopped"
    );
    result.map_err(|source| ModbusServerError::Serve {
        device: config.name.clone(),
        source,
    })
}

/// Serves a simulated RTU slave on its serial device until `cancel` fires,
/// reopening the device after `reopen-delay` when it is missing or fails.
pub async fn serve_rtu(config: ModbusRtuConfig, seed: u64, cancel: CancellationToken) {
    let map = Arc::new(RegisterMap::new(
        &config.name,
        seed,
        config.refresh,
        &config.points,
    ));
    let stats = Arc::new(ServerStats::default());
    let fault_seed = seed ^ fnv1a(config.name.as_bytes());
    let device_path = config.device.to_string_lossy().into_owned();
    loop {
        let builder = tokio_serial::new(device_path.as_str(), config.baud_rate)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::None)
            .stop_bits(tokio_serial::StopBits::One);
        match tokio_serial::SerialStream::open(&builder) {
            Ok(serial) => {
                info!(device = %config.name, path = %device_path, baud = config.baud_rate, unit = config.unit_id, "modbus rtu slave listening");
                let service = PlcService::new(
                    Arc::clone(&map),
                    config.unit_id,
                    OtherUnit::Ignore,
                    config.faults.clone(),
                    fault_seed,
                    Arc::clone(&stats),
                );
                let server = tokio_modbus::server::rtu::Server::new(serial);
                tokio::select! {
                    res = server.serve_forever(service) => match res {
                        Ok(()) => warn!(device = %config.name, path = %device_path, "serial line closed; reopening"),
                        Err(err) => warn!(device = %config.name, path = %device_path, error = %err, "serial line failed; reopening"),
                    },
                    () = cancel.cancelled() => break,
                }
            }
            Err(err) => {
                warn!(device = %config.name, path = %device_path, error = %err, retry_in = ?config.reopen_delay, "cannot open serial device");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.reopen_delay) => {}
            () = cancel.cancelled() => break,
        }
    }
    info!(
        device = %config.name,
        requests = stats.requests.load(Ordering::Relaxed),
        exceptions = stats.exceptions.load(Ordering::Relaxed),
        "modbus rtu slave stopped"
    );
}

/// A TCP stream that reports end-of-file once its lifetime is over, so the
/// server drops the connection (`disconnect-every` fault).
#[derive(Debug)]
struct ExpiringStream {
    inner: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
    stats: Arc<ServerStats>,
    expired: bool,
}

impl ExpiringStream {
    fn new(inner: TcpStream, lifetime: Option<Duration>, stats: Arc<ServerStats>) -> Self {
        Self {
            inner,
            deadline: lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
            stats,
            expired: false,
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.expired {
            return true;
        }
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                self.expired = true;
                self.stats
                    .forced_disconnects
                    .fetch_add(1, Ordering::Relaxed);
                debug!("dropping modbus connection (disconnect-every)");
            }
        }
        self.expired
    }
}

impl AsyncRead for ExpiringStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.poll_expired(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ExpiringStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.poll_expired(cx) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::{DataType, WordOrder};
    use crate::signal::Signal;

    const NOW: i64 = 1_700_000_000_500;

    fn point(
        sensor: &str,
        table: Table,
        address: u16,
        data_type: DataType,
        value: f64,
    ) -> PointConfig {
        PointConfig {
            sensor: sensor.to_owned(),
            table,
            address,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            unit: None,
            signal: Signal::constant(value, 0),
        }
    }

    fn map() -> RegisterMap {
        RegisterMap::new(
            "plc",
            1,
            Duration::from_secs(1),
            &[
                point("a", Table::Holding, 0, DataType::U32, 65_537.0),
                point("b", Table::Holding, 2, DataType::U16, 7.0),
                point("c", Table::Holding, 10, DataType::U16, 9.0),
                point("on", Table::Coil, 0, DataType::Bool, 1.0),
            ],
        )
    }

    #[test]
    fn contiguous_read_spans_points() {
        assert_eq!(
            map().read_registers(Table::Holding, 0, 3, NOW),
            Ok(vec![1, 1, 7])
        );
        assert_eq!(map().read_registers(Table::Holding, 1, 1, NOW), Ok(vec![1]));
    }

    #[test]
    fn gaps_and_unknown_addresses_are_illegal() {
        let m = map();
        assert_eq!(
            m.read_registers(Table::Holding, 0, 4, NOW),
            Err(ReadError::IllegalDataAddress)
        );
        assert_eq!(
            m.read_registers(Table::Holding, 100, 1, NOW),
            Err(ReadError::IllegalDataAddress)
        );
        assert_eq!(
            m.read_registers(Table::Input, 0, 1, NOW),
            Err(ReadError::IllegalDataAddress)
        );
        assert_eq!(
            m.read_registers(Table::Holding, 65_535, 2, NOW),
            Err(ReadError::IllegalDataAddress)
        );
        assert_eq!(
            m.read_registers(Table::Holding, 0, 0, NOW),
            Err(ReadError::IllegalDataValue)
        );
        assert_eq!(
            m.read_registers(Table::Holding, 0, 126, NOW),
            Err(ReadError::IllegalDataValue)
        );
    }

    #[test]
    fn writes_are_illegal_functions() {
        let m = map();
        assert_eq!(
            m.answer(&Request::WriteSingleRegister(0, 1), NOW),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            m.answer(&Request::WriteSingleCoil(0, true), NOW),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            m.answer(&Request::ReadCoils(0, 1), NOW),
            Ok(Response::ReadCoils(vec![true]))
        );
    }

    #[test]
    fn other_unit_handling() {
        let svc = |other| {
            PlcService::new(
                Arc::new(map()),
                3,
                other,
                ModbusFaults::default(),
                1,
                Arc::default(),
            )
        };
        let req = |slave| SlaveRequest {
            slave,
            request: Request::ReadHoldingRegisters(2, 1),
        };
        assert_eq!(svc(OtherUnit::Ignore).respond(&req(4)), Ok(None));
        assert_eq!(
            svc(OtherUnit::Exception).respond(&req(4)),
            Err(ExceptionCode::GatewayTargetDevice)
        );
        assert_eq!(
            svc(OtherUnit::Ignore).respond(&req(3)),
            Ok(Some(Response::ReadHoldingRegisters(vec![7])))
        );
    }

    #[test]
    fn exception_rate_is_honoured() {
        let faults = ModbusFaults {
            exception_rate: 0.25,
            ..ModbusFaults::default()
        };
        let stats = Arc::new(ServerStats::default());
        let svc = PlcService::new(
            Arc::new(map()),
            1,
            OtherUnit::Exception,
            faults,
            99,
            Arc::clone(&stats),
        );
        let req = SlaveRequest {
            slave: 1,
            request: Request::ReadHoldingRegisters(2, 1),
        };
        let failures = (0..4000)
            .filter(|_| svc.respond(&req) == Err(ExceptionCode::ServerDeviceFailure))
            .count();
        assert!((800..1200).contains(&failures), "{failures} of 4000");
        assert_eq!(
            stats.injected_exceptions.load(Ordering::Relaxed),
            failures as u64
        );
    }

    #[test]
    fn sample_and_hold_uses_refresh_period() {
        let m = map();
        assert_eq!(m.sample_time(NOW), 1_700_000_000_000);
    }
}
