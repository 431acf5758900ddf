//! The device ingest listener: sensors publish MQTT straight to the gateway,
//! and a QoS 1 publish is acknowledged only once its readings are durable.
//!
//! # What it is
//!
//! An MQTT 3.1, 3.1.1 and 5 server for *publishers* (`[broker]` in the
//! agent config): each connection is one task that reads the socket,
//! decodes every complete `PUBLISH` in place with the same
//! [`Decoder`](super::decode::Decoder) as the external-broker source and
//! hands the readings to the pipeline's bounded ingest channel, followed by a
//! [`DurableAck`] marker. The `PUBACK` (QoS 1) or `PUBREC` (QoS 2) of each
//! message is written when that marker completes, that is once the journal's
//! group commit holding its readings has been fsynced. So a device never
//! holds an acknowledgement for a reading the gateway could lose in a crash;
//! after `kill -9` it resends what was not acknowledged, and readings that
//! were journaled but not acknowledged are recognised by the redelivery guard
//! and counted once.
//!
//! # Backpressure, never loss
//!
//! Nothing the listener accepted is ever dropped. When the pipeline is
//! behind, the ingest channel fills, the connection task waits for room and
//! stops reading its socket; the kernel's receive buffer fills and TCP flow
//! control slows the device. The same holds at QoS 0: a QoS 0 reading that
//! the TCP stack delivered reaches the window engine. Each connection also
//! stops reading while `max-inflight` of its QoS 1/2 messages wait for their
//! journal commit (MQTT 5 clients are told this as their receive maximum), so
//! the memory a connection holds is bounded by its read buffer, the channel
//! and those packet ids. A message too large for `max-payload` is read past
//! (not buffered), turned into one dead letter with the start of its payload,
//! and acknowledged: it is accounted for, and the device does not resend it
//! for ever.
//!
//! # Why not rumqttd for ingest
//!
//! rumqttd acknowledges a QoS 1 publish as soon as the message is in its
//! in-memory log, and a reader that lags by more than that log's size loses
//! the oldest messages without a count. Under a burst the gateway then
//! acknowledges readings it later loses, which is the one thing it must never
//! do. Ingest needs the acknowledgement tied to the journal commit and
//! backpressure on the device socket; neither can be added from outside
//! rumqttd. So ingest has its own small server: the publish fast path parses
//! in place (no allocation per message) and only the rare packets use
//! rumqttc's codec.
//!
//! # What it is not
//!
//! Not a pub/sub broker: `SUBSCRIBE` is refused (every filter fails in the
//! `SUBACK`). Plant clients that want the sensor data live (an HMI, a
//! historian) subscribe to the local pub/sub broker, a rumqttd started on
//! `pubsub-listen` when that key is set, which receives a copy of every
//! accepted publish ([`super::pubsub`]). Sessions are not kept across
//! connections (`CONNACK` says "no session present"), retained messages and
//! wills are ignored, and MQTT 5 topic aliases are not offered. There is no
//! TLS and no authentication: keep `listen` on loopback or a trusted segment.

pub mod frame;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use millrace_protocol::{DeadLetter, DeadLetterReason, Source};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub mod auth;

use self::auth::{Acl, Auth};
use self::frame::{kind, FrameError, Header, Version};
use super::broker::BrokerConfig;
use super::decode::Decoder;
use super::mqtt::{hand_off, Handoff, MqttStats};
use super::pubsub::PubSub;
use super::rest::{LowWater, COALESCE, COALESCE_BELOW};
use super::{now_ms, Delivery, DurableAck, IngestEvent, IngestTx};

/// Bytes read from a socket at a time (more when a larger packet is pending).
const READ_CHUNK: usize = 64 * 1024;
/// Time a new connection has to send `CONNECT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, how long a connection waits for the final journal commit to
/// acknowledge what it has handed over.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);
/// Bytes of an oversize publish's payload kept in its dead letter.
const OVERSIZE_KEEP: usize = 1024;
/// Room for a publish's topic and headers beyond `max-payload`.
const PACKET_OVERHEAD: usize = 64 * 1024 + 16;

/// Errors of the ingest listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// The listen address cannot be bound (in use, not local, no permission).
    #[error("mqtt ingest cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// `[broker.tls]` files that cannot be used.
    #[error("[broker.tls]: {0}")]
    Tls(String),
    /// Accepting connections failed for good.
    #[error("mqtt ingest listener on {addr}: {source}")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What every connection of a listener shares.
#[derive(Debug)]
struct Shared {
    decoder: Decoder,
    auth: Auth,
    /// `[broker.tls]`: every ingest connection starts with a TLS handshake.
    tls: Option<Arc<rustls::ServerConfig>>,
    stats: Arc<MqttStats>,
    pubsub: Option<PubSub>,
    max_packet: usize,
    max_payload: usize,
    max_inflight: usize,
}

/// The bound ingest listener(s).
#[derive(Debug)]
pub struct IngestListener {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    max_connections: usize,
}

impl IngestListener {
    /// Binds `listen` (and `listen-v5`; either accepts every protocol
    /// version) so a bad address fails the start with a clear error.
    /// Call from within the tokio runtime.
    pub fn bind(
        config: &BrokerConfig,
        decoder: Decoder,
        pubsub: Option<PubSub>,
    ) -> Result<Self, ListenerError> {
        let mut listeners = Vec::new();
        for addr in std::iter::once(config.listen).chain(config.listen_v5) {
            let bind = |addr| {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            };
            let l = bind(addr).map_err(|source| ListenerError::Bind { addr, source })?;
            listeners.push(l);
        }
        let max_payload = config.max_payload_bytes();
        Ok(Self {
            listeners,
            shared: Arc::new(Shared {
                decoder,
                auth: Auth::new(&config.users, config.allow_anonymous),
                tls: config
                    .tls
                    .as_ref()
                    .map(|t| t.server_config())
                    .transpose()
                    .map_err(ListenerError::Tls)?,
                stats: Arc::default(),
                pubsub,
                max_packet: max_payload.saturating_add(PACKET_OVERHEAD),
                max_payload,
                max_inflight: config.max_inflight,
            }),
            max_connections: config.max_connections,
        })
    }

    /// The addresses listened on (ports resolved), `listen` first.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The listener's counters (`connected` is true while it accepts).
    pub fn stats(&self) -> Arc<MqttStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Serves connections until `shutdown` is cancelled; then every
    /// connection stops reading, acknowledges what the final journal commit
    /// covers and closes.
    pub async fn run(self, tx: IngestTx, shutdown: CancellationToken) -> Result<(), ListenerError> {
        let Self {
            listeners,
            shared,
            max_connections,
        } = self;
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut connections = JoinSet::new();
        let mut accepting = JoinSet::new();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(16);
        for listener in listeners {
            let accepted_tx = accepted_tx.clone();
            let stop = shutdown.clone();
            accepting.spawn(async move { accept_loop(listener, accepted_tx, stop).await });
        }
        drop(accepted_tx);
        shared.stats.connected.store(true, Ordering::Relaxed);
        let result = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some(done) = accepting.join_next() => match done {
                    Ok(Err(e)) => break Err(e),
                    _ => break Ok(()),
                },
                Some((stream, peer)) = accepted.recv() => {
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        shared.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, max_connections, "mqtt ingest: connection refused, max-connections reached");
                        drop(stream);
                        continue;
                    };
                    let (shared, tx, stop) = (Arc::clone(&shared), tx.clone(), shutdown.clone());
                    connections.spawn(async move {
                        let _permit = permit;
                        let mark = LowWater::of(&stream);
                        let Some(tls) = shared.tls.clone() else {
                            serve(stream, mark, peer, None, &shared, &tx, &stop).await;
                            return;
                        };
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                // Verified by the handshake against `client-ca-file`.
                                let certificate = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .map(|c| c.clone().into_owned());
                                serve(tls, mark, peer, certificate, &shared, &tx, &stop).await;
                            }
                            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                                // Closed before saying anything (a port probe).
                                shared.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                                debug!(%peer, "mqtt ingest: connection closed before the TLS handshake");
                            }
                            Ok(Err(error)) => {
                                // Plaintext MQTT, or a client that rejects our certificate.
                                shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                                warn!(%peer, %error, "mqtt ingest: TLS handshake refused");
                            }
                            Err(_) => {
                                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                                warn!(%peer, "mqtt ingest: no TLS handshake within {CONNECT_TIMEOUT:?}");
                            }
                        }
                    });
                }
                Some(_) = connections.join_next() => {}
            }
        };
        shared.stats.connected.store(false, Ordering::Relaxed);
        accepting.abort_all();
        // Connections see the same token and finish on their own.
        while connections.join_next().await.is_some() {}
        result
    }
}

async fn accept_loop(
    listener: TcpListener,
    accepted: tokio::sync::mpsc::Sender<(TcpStream, SocketAddr)>,
    stop: CancellationToken,
) -> Result<(), ListenerError> {
    let addr = listener
        .local_addr()
        .map_err(|source| ListenerError::Accept {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    info!(listen = %addr, "mqtt ingest listening");
    let mut failures = 0u32;
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => { failures = 0; s }
                Err(source) => {
                    // EMFILE and friends pass; give up only if it persists.
                    failures += 1;
                    warn!(error = %source, failures, "mqtt ingest accept failed");
                    if failures > 50 {
                        return Err(ListenerError::Accept { addr, source });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if accepted.send((stream, peer)).await.is_err() {
            return Ok(());
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client disconnected (DISCONNECT or EOF).
    Client,
    /// The agent is stopping.
    Shutdown,
    /// The pipeline is gone.
    PipelineClosed,
    /// A journal commit failed: the messages behind it stay unacknowledged.
    NotDurable,
    /// The client broke the protocol; for MQTT 5, the reason code.
    Protocol(&'static str, u8),
    Io(std::io::Error),
}

/// A batch of acknowledgements waiting for its journal commit.
#[derive(Debug)]
struct Inflight {
    durable: oneshot::Receiver<()>,
    /// `(packet kind, packet id)`: `PUBACK` or `PUBREC`.
    acks: Vec<(u8, u16)>,
}

/// Per-connection protocol state (the socket and read buffer live beside it).
struct Session<'a> {
    /// Where this connection may publish (its user's filters).
    acl: Acl,
    shared: &'a Shared,
    /// This connection's decoder (its own interned names).
    decoder: Decoder,
    version: Version,
    peer: SocketAddr,
    /// Events decoded from the current read, handed over together.
    events: Vec<IngestEvent>,
    /// Acknowledgements due once `events` are durable.
    acks: Vec<(u8, u16)>,
    inflight: VecDeque<Inflight>,
    inflight_msgs: usize,
    /// QoS 2 packet ids received and not yet released (`PUBREL`).
    qos2: HashSet<u16>,
    out: BytesMut,
    /// Publishes on this connection, and those not yet in the shared counter.
    messages: u64,
    unreported: u64,
    disconnect: bool,
    /// An oversize publish being read past: bytes left, and its start.
    skipping: Option<Skip>,
}

#[derive(Debug)]
struct Skip {
    left: usize,
    byte1: u8,
    head: Vec<u8>,
    total: usize,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mark: LowWater,
    peer: SocketAddr,
    certificate: Option<rustls::pki_types::CertificateDer<'static>>,
    shared: &Shared,
    tx: &IngestTx,
    stop: &CancellationToken,
) {
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let connect = tokio::select! {
        () = stop.cancelled() => return,
        c = tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut stream, &mut rbuf, shared.max_packet)) => c,
    };
    let (version, keep_alive, client_id, username, password) = match connect {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, error = %e, "mqtt ingest: bad CONNECT; connection closed");
            if let ConnectError::Version(level) = e {
                // 3.1.1: "unacceptable protocol level".
                let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                debug!(level, "refused protocol level");
            }
            return;
        }
        Err(_) => {
            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, "mqtt ingest: no CONNECT within {CONNECT_TIMEOUT:?}; connection closed");
            return;
        }
    };
    let acl = match shared
        .auth
        .check(
            username.as_deref(),
            password.as_deref(),
            certificate.as_ref(),
        )
        .await
    {
        Ok(acl) => acl,
        Err(refused) => {
            let failures = shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(%peer, client_id, user = ?username, ?refused, failures, "mqtt ingest: CONNECT refused: bad user name, password or certificate");
            let mut out = BytesMut::new();
            frame::connack(&mut out, version, 4, 1, 0);
            let _ = stream.write_all(&out).await;
            return;
        }
    };
    let mut session = Session {
        shared,
        acl,
        decoder: shared.decoder.clone(),
        version,
        peer,
        events: Vec::with_capacity(1024),
        acks: Vec::new(),
        inflight: VecDeque::new(),
        inflight_msgs: 0,
        qos2: HashSet::new(),
        out: BytesMut::with_capacity(4096),
        messages: 0,
        unreported: 0,
        disconnect: false,
        skipping: None,
    };
    let receive_max = u16::try_from(shared.max_inflight).unwrap_or(u16::MAX);
    frame::connack(
        &mut session.out,
        version,
        0,
        receive_max,
        u32::try_from(shared.max_packet).unwrap_or(u32::MAX),
    );
    let clients = shared.stats.clients.fetch_add(1, Ordering::Relaxed) + 1;
    info!(%peer, client_id, ?version, keep_alive_s = keep_alive.as_secs(), clients, "mqtt device connected");
    let end = session
        .run(&mut stream, mark, &mut rbuf, keep_alive, tx, stop)
        .await;
    shared.stats.clients.fetch_sub(1, Ordering::Relaxed);
    let unacked = session.inflight_msgs + session.acks.len();
    if unacked > 0 {
        shared
            .stats
            .acks_withheld
            .fetch_add(unacked as u64, Ordering::Relaxed);
    }
    match end {
        End::Client | End::Shutdown => {
            info!(%peer, client_id, messages = session.messages, unacked, reason = ?end, "mqtt device disconnected")
        }
        End::Protocol(what, reason) => {
            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, client_id, error = what, unacked, "mqtt ingest: protocol error; connection closed, unacknowledged messages will be resent");
            session.out.clear();
            frame::disconnect(&mut session.out, version, reason);
            let _ = stream.write_all(&session.out).await;
        }
        End::NotDurable => {
            warn!(%peer, client_id, unacked, "mqtt ingest: journal commit failed; connection closed so the device resends")
        }
        End::PipelineClosed => {
            info!(%peer, client_id, unacked, "mqtt device connection closed: the pipeline stopped");
        }
        End::Io(error) => {
            shared
                .stats
                .connection_errors
                .fetch_add(1, Ordering::Relaxed);
            info!(%peer, client_id, %error, unacked, "mqtt device connection lost");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connection closed before CONNECT")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported protocol level {0}")]
    Version(u8),
}

/// What a `CONNECT` says: version, keep-alive, client id, user name, password.
type Connect = (Version, Duration, String, Option<String>, Option<Vec<u8>>);

/// Reads the `CONNECT`.
async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Connect, ConnectError> {
    loop {
        if let Some(h) = frame::header(rbuf)? {
            if h.kind() != kind::CONNECT {
                return Err(ConnectError::NotConnect);
            }
            if h.body_len > max_packet {
                return Err(FrameError::Malformed("CONNECT too large").into());
            }
            if rbuf.len() >= h.frame_len() {
                let parsed = parse_connect(&rbuf[h.header_len..h.frame_len()])?;
                rbuf.advance(h.frame_len());
                return Ok(parsed);
            }
            rbuf.reserve(h.frame_len() - rbuf.len());
        }
        if stream.read_buf(rbuf).await? == 0 {
            return Err(ConnectError::Closed);
        }
    }
}

/// What follows an MQTT 5 property block (a variable-byte length, then
/// that many bytes); `None` when it runs past the end.
fn skip_properties(rest: &[u8]) -> Option<&[u8]> {
    let mut len = 0usize;
    let mut used = 0;
    for (i, b) in rest.iter().take(4).enumerate() {
        len |= usize::from(b & 0x7F) << (7 * i);
        used = i + 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    rest.get(used + len..)
}

fn parse_connect(body: &[u8]) -> Result<Connect, ConnectError> {
    let bad = || ConnectError::Frame(FrameError::Malformed("CONNECT"));
    let [nh, nl, rest @ ..] = body else {
        return Err(bad());
    };
    let name_len = usize::from(u16::from_be_bytes([*nh, *nl]));
    let rest = rest.get(name_len..).ok_or_else(bad)?;
    let [level, flags, kh, kl, rest @ ..] = rest else {
        return Err(bad());
    };
    let version = match level {
        3 | 4 => Version::V4,
        5 => Version::V5,
        other => return Err(ConnectError::Version(*other)),
    };
    let mut rest = rest;
    if version == Version::V5 {
        rest = skip_properties(rest).ok_or_else(bad)?;
    }
    // A length-prefixed field of the payload, and what follows it.
    let field = |rest: &[u8]| -> Result<(Vec<u8>, usize), ConnectError> {
        let [h, l, data @ ..] = rest else {
            return Err(bad());
        };
        let n = usize::from(u16::from_be_bytes([*h, *l]));
        Ok((data.get(..n).ok_or_else(bad)?.to_vec(), 2 + n))
    };
    let (id, used) = field(rest)?;
    let client_id = String::from_utf8_lossy(&id).into_owned();
    let mut rest = &rest[used..];
    if flags & 0x04 != 0 {
        // Will: (MQTT 5: its properties), topic, payload. Not used here.
        if version == Version::V5 {
            rest = skip_properties(rest).ok_or_else(bad)?;
        }
        for _ in 0..2 {
            let (_, used) = field(rest)?;
            rest = &rest[used..];
        }
    }
    let mut username = None;
    if flags & 0x80 != 0 {
        let (name, used) = field(rest)?;
        username = Some(String::from_utf8(name).map_err(|_| bad())?);
        rest = &rest[used..];
    }
    let password = if flags & 0x40 != 0 {
        Some(field(rest)?.0)
    } else {
        None
    };
    let keep_alive = Duration::from_secs(u64::from(u16::from_be_bytes([*kh, *kl])));
    Ok((version, keep_alive, client_id, username, password))
}

/// Resolves with the oldest batch's durability, or never when none waits.
async fn oldest_durable(
    inflight: &mut VecDeque<Inflight>,
) -> Result<(), oneshot::error::RecvError> {
    match inflight.front_mut() {
        Some(f) => (&mut f.durable).await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        mut mark: LowWater,
        rbuf: &mut BytesMut,
        keep_alive: Duration,
        tx: &IngestTx,
        stop: &CancellationToken,
    ) -> End {
        // MQTT: the server may close after 1.5 keep-alive periods of silence.
        let idle_limit = (keep_alive > Duration::ZERO).then(|| keep_alive.mul_f32(1.5));
        let mut last_packet = Instant::now();
        let mut read_again_at: Option<Instant> = None;
        let mut eof = false;
        // Packets that came in the same read as the CONNECT.
        if !rbuf.is_empty() {
            if let Err(end) = self.take_packets(rbuf) {
                return end;
            }
            if let Some(end) = self.hand_over(tx, stop).await {
                return end;
            }
        }
        let end = loop {
            if !self.out.is_empty() {
                if let Err(e) = stream.write_all(&self.out).await {
                    break End::Io(e);
                }
                self.out.clear();
            }
            if self.disconnect || (eof && self.inflight.is_empty()) {
                break End::Client;
            }
            let want = self
                .skipping
                .as_ref()
                .map_or(READ_CHUNK, |s| s.left.min(READ_CHUNK));
            if rbuf.capacity() - rbuf.len() < want {
                rbuf.reserve(want);
            }
            // A rest ends here however the loop got here (its timer, or an
            // acknowledgement that went out as it expired).
            if read_again_at.is_some_and(|at| Instant::now() >= at) {
                read_again_at = None;
                mark.wake();
            }
            let resting = read_again_at.is_some();
            let can_read = !eof && !resting && self.inflight_msgs < self.shared.max_inflight;
            let idle_deadline = idle_limit.map(|l| last_packet + l);
            tokio::select! {
                biased;
                () = stop.cancelled() => break End::Shutdown,
                done = oldest_durable(&mut self.inflight) => {
                    if done.is_err() {
                        break End::NotDurable;
                    }
                    self.release_oldest();
                    // Batches that completed meanwhile go out in the same write.
                    while let Some(Ok(())) = self.inflight.front_mut().map(|f| f.durable.try_recv()) {
                        self.release_oldest();
                    }
                }
                () = sleep_until(read_again_at), if resting => {}
                read = stream.read_buf(rbuf), if can_read => match read {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        last_packet = Instant::now();
                        read_again_at = (n < COALESCE_BELOW).then(|| last_packet + COALESCE);
                        if read_again_at.is_some() {
                            mark.rest();
                        }
                        if let Err(end) = self.take_packets(rbuf) {
                            break end;
                        }
                        if let Some(end) = self.hand_over(tx, stop).await {
                            break end;
                        }
                    }
                    Err(e) => break End::Io(e),
                },
                () = sleep_until(idle_deadline) => {
                    break End::Protocol("keep-alive timeout", frame::reason::KEEP_ALIVE_TIMEOUT);
                }
            }
        };
        if matches!(end, End::Shutdown) {
            self.finish_at_shutdown(stream).await;
        }
        end
    }

    /// At shutdown: what was handed over is acknowledged when the final
    /// journal commit covers it (or left unacknowledged after a while).
    async fn finish_at_shutdown<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) {
        let deadline = Instant::now() + SHUTDOWN_ACK_WAIT;
        while !self.inflight.is_empty() {
            match tokio::time::timeout_at(deadline, oldest_durable(&mut self.inflight)).await {
                Ok(Ok(())) => self.release_oldest(),
                _ => break,
            }
        }
        frame::disconnect(
            &mut self.out,
            self.version,
            frame::reason::SERVER_SHUTTING_DOWN,
        );
        let _ = stream.write_all(&self.out).await;
        self.out.clear();
    }

    fn release_oldest(&mut self) {
        if let Some(f) = self.inflight.pop_front() {
            self.inflight_msgs -= f.acks.len();
            for &(kind, pkid) in &f.acks {
                frame::ack(&mut self.out, kind, pkid);
            }
            self.shared
                .stats
                .acks
                .fetch_add(f.acks.len() as u64, Ordering::Relaxed);
        }
    }

    /// Takes every complete packet from `rbuf`.
    fn take_packets(&mut self, rbuf: &mut BytesMut) -> Result<(), End> {
        let now = now_ms();
        loop {
            if let Some(skip) = self.skipping.as_mut() {
                let n = skip.left.min(rbuf.len());
                let keep = (PACKET_OVERHEAD + OVERSIZE_KEEP)
                    .saturating_sub(skip.head.len())
                    .min(n);
                skip.head.extend_from_slice(&rbuf[..keep]);
                rbuf.advance(n);
                skip.left -= n;
                if skip.left > 0 {
                    return Ok(());
                }
                if let Some(skip) = self.skipping.take() {
                    self.oversize(skip, now)?;
                }
            }
            let Some(h) = frame::header(rbuf).map_err(|_| malformed("remaining length"))? else {
                return Ok(());
            };
            if h.body_len > self.shared.max_packet {
                if h.kind() != kind::PUBLISH {
                    return Err(End::Protocol("packet too large", frame::reason::MALFORMED));
                }
                rbuf.advance(h.header_len);
                self.skipping = Some(Skip {
                    left: h.body_len,
                    byte1: h.byte1,
                    head: Vec::new(),
                    total: h.body_len,
                });
                continue;
            }
            if rbuf.len() < h.frame_len() {
                rbuf.reserve(h.frame_len() - rbuf.len());
                return Ok(());
            }
            self.packet(h, &rbuf[h.header_len..h.frame_len()], now)?;
            rbuf.advance(h.frame_len());
            if self.disconnect {
                return Ok(());
            }
        }
    }

    fn packet(&mut self, h: Header, body: &[u8], now: i64) -> Result<(), End> {
        match h.kind() {
            kind::PUBLISH => {
                let p = frame::publish(h.byte1, body, self.version).map_err(|e| match e {
                    FrameError::Malformed("publish: QoS 3") => {
                        End::Protocol("publish with QoS 3", frame::reason::QOS_NOT_SUPPORTED)
                    }
                    _ => malformed("publish"),
                })?;
                self.messages += 1;
                self.unreported += 1;
                match p.qos {
                    0 => {}
                    1 => self.acks.push((kind::PUBACK, p.pkid)),
                    _ => {
                        self.acks.push((kind::PUBREC, p.pkid));
                        if !self.qos2.insert(p.pkid) {
                            // Resent before our PUBREC arrived: taken already.
                            return Ok(());
                        }
                        if self.qos2.len() > self.shared.max_inflight {
                            return Err(End::Protocol(
                                "more unreleased QoS 2 messages than max-inflight",
                                frame::reason::RECEIVE_MAXIMUM_EXCEEDED,
                            ));
                        }
                    }
                }
                if !auth::may_publish(&self.acl, p.topic) {
                    // Acknowledged (see the auth module) but not read.
                    let denied = self.shared.stats.acl_denied.fetch_add(1, Ordering::Relaxed) + 1;
                    if denied.is_power_of_two() {
                        warn!(peer = %self.peer, topic = p.topic, denied, "mqtt ingest: publish outside this user's topics refused");
                    }
                    return Ok(());
                }
                let before = self.events.len();
                self.decoder.decode(
                    p.topic,
                    p.payload,
                    now,
                    Delivery::mqtt(p.qos, p.dup),
                    &mut self.events,
                );
                self.shared.stats.record_events(&self.events[before..]);
                if let Some(pubsub) = &self.shared.pubsub {
                    pubsub.forward(p.topic, p.payload);
                }
                // Sparkplug B Rebirth requests reach edge nodes through the
                // local pub/sub broker, where they subscribe to their NCMD
                // topic; without one they cannot be delivered.
                for command in self.decoder.take_commands() {
                    match &self.shared.pubsub {
                        Some(pubsub) => pubsub.forward(&command.topic, &command.payload),
                        None => {
                            debug!(topic = %command.topic, "sparkplug command not sent: no pubsub-listen broker")
                        }
                    }
                }
            }
            kind::PUBREL => {
                let pkid = frame::packet_id(body).map_err(|_| malformed("PUBREL"))?;
                self.qos2.remove(&pkid);
                frame::ack(&mut self.out, kind::PUBCOMP, pkid);
            }
            kind::PINGREQ => frame::pingresp(&mut self.out),
            kind::DISCONNECT => self.disconnect = true,
            kind::SUBSCRIBE => {
                let pkid = frame::packet_id(body).map_err(|_| malformed("SUBSCRIBE"))?;
                let n = frame::filter_count(body, self.version, true)
                    .map_err(|_| malformed("SUBSCRIBE"))?;
                warn!(peer = %self.peer, "mqtt ingest takes publishes only; SUBSCRIBE refused (subscribe on broker.pubsub-listen)");
                frame::suback_refused(&mut self.out, self.version, pkid, n);
            }
            kind::UNSUBSCRIBE => {
                let pkid = frame::packet_id(body).map_err(|_| malformed("UNSUBSCRIBE"))?;
                let n = frame::filter_count(body, self.version, false)
                    .map_err(|_| malformed("UNSUBSCRIBE"))?;
                frame::unsuback(&mut self.out, self.version, pkid, n);
            }
            kind::CONNECT => {
                return Err(End::Protocol(
                    "second CONNECT",
                    frame::reason::PROTOCOL_ERROR,
                ))
            }
            kind::PUBACK | kind::PUBREC | kind::PUBCOMP => {
                // The listener never publishes to a device.
                return Err(End::Protocol(
                    "unexpected acknowledgement",
                    frame::reason::PROTOCOL_ERROR,
                ));
            }
            kind::AUTH => {
                return Err(End::Protocol(
                    "AUTH is not supported",
                    frame::reason::PROTOCOL_ERROR,
                ))
            }
            _ => {
                return Err(End::Protocol(
                    "unexpected packet type",
                    frame::reason::PROTOCOL_ERROR,
                ))
            }
        }
        Ok(())
    }

    /// An oversize publish read past: one dead letter with the start of its
    /// payload, and its acknowledgement like any accepted message.
    fn oversize(&mut self, skip: Skip, now: i64) -> Result<(), End> {
        let Skip {
            byte1, head, total, ..
        } = skip;
        let p = frame::publish(byte1, &head, self.version)
            .map_err(|_| malformed("oversize publish"))?;
        self.messages += 1;
        self.unreported += 1;
        let payload_len = total - (head.len() - p.payload.len());
        let kept = &p.payload[..p.payload.len().min(OVERSIZE_KEEP)];
        let dl = DeadLetter::new(
            Source::Mqtt,
            p.topic,
            kept.to_vec(),
            DeadLetterReason::Oversize,
            format!(
                "payload of {payload_len} bytes exceeds max-payload of {} bytes",
                self.shared.max_payload
            ),
            now,
        );
        warn!(peer = %self.peer, topic = p.topic, bytes = payload_len, "mqtt ingest: oversize publish dead-lettered");
        self.events.push(IngestEvent::DeadLetter(dl));
        self.shared
            .stats
            .record_events(&self.events[self.events.len() - 1..]);
        match p.qos {
            0 => {}
            1 => self.acks.push((kind::PUBACK, p.pkid)),
            _ => {
                self.qos2.insert(p.pkid);
                self.acks.push((kind::PUBREC, p.pkid));
            }
        }
        Ok(())
    }

    /// Hands the decoded events to the pipeline (waiting for room: this is
    /// where a busy gateway stops reading the socket), then a durability
    /// marker for the messages to acknowledge.
    async fn hand_over(&mut self, tx: &IngestTx, stop: &CancellationToken) -> Option<End> {
        self.shared
            .stats
            .messages
            .fetch_add(std::mem::take(&mut self.unreported), Ordering::Relaxed);
        match hand_off(&mut self.events, tx, stop).await {
            Handoff::Accepted => {}
            Handoff::Stopped => return Some(End::Shutdown),
            Handoff::Closed => return Some(End::PipelineClosed),
        }
        if self.acks.is_empty() {
            return None;
        }
        let (marker, durable) = DurableAck::new();
        tokio::select! {
            biased;
            () = stop.cancelled() => return Some(End::Shutdown),
            sent = tx.send(IngestEvent::Durable(marker)) => if sent.is_err() {
                return Some(End::PipelineClosed);
            },
        }
        let acks = std::mem::take(&mut self.acks);
        self.inflight_msgs += acks.len();
        self.inflight.push_back(Inflight { durable, acks });
        None
    }
}

fn malformed(what: &'static str) -> End {
    End::Protocol(what, frame::reason::MALFORMED)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
