//! An MQTT 3.1.1 client session for the external-broker source, on
//! rumqttc's packet codec (`rumqttc::mqttbytes::v4`) without its event loop.
//!
//! Why not rumqttc's `EventLoop`: with manual acknowledgements it writes and
//! flushes every PUBACK on its own, one `write` system call per message, and
//! returns one event per poll. At a broker's full rate that was most of the
//! agent's CPU on this path (7.6 CPU-µs per reading against 1.0 on the
//! gateway's own ingest listener). Here every request queued since the last
//! write (the PUBACKs of a whole journal commit) is encoded into one buffer
//! and written at once, and every packet of one socket read is decoded
//! before the caller is woken.
//!
//! What it is: connect (TCP or rustls TLS), CONNECT/CONNACK with
//! credentials, keep-alive and a persistent session, SUBSCRIBE, PUBACKs,
//! PINGREQ when nothing was sent for a keep-alive interval, and a clean
//! DISCONNECT. A lost connection is an error from [`Connection::poll`]; the
//! next poll connects again (the caller paces that with its backoff).
//!
//! What it is not: a publisher (it never sends PUBLISH) and not QoS 2 (it
//! subscribes at QoS 0 or 1 only, so a broker never sends QoS 2 to it).
//!
//! # Acknowledgements and connections
//!
//! A packet id names a message only on the connection it arrived on. Every
//! received publish carries the id of its connection ([`Incoming::Publish`])
//! and every ack request names it back ([`Request::Ack`]); an ack for an
//! earlier connection is dropped, never written to a later one (where the
//! same packet id may name another message). The broker redelivers the
//! message on the new connection instead.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::rest::{LowWater, COALESCE, COALESCE_BELOW};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq, PubAck, Publish, Subscribe,
    SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

/// Time to connect, finish TLS and receive the CONNACK, or to write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// What the caller asks of the session.
#[derive(Debug)]
pub(crate) enum Request {
    /// PUBACK `pkid` of a publish received on connection `connection`.
    Ack {
        pkid: u16,
        connection: u64,
    },
    Subscribe(Vec<(String, QoS)>),
    /// PUBLISH at QoS 0 (a Sparkplug B Rebirth request); dropped when no
    /// connection is open.
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
    Disconnect,
}

/// What a poll yields.
#[derive(Debug)]
pub(crate) enum Incoming {
    ConnAck {
        session_present: bool,
    },
    Publish {
        publish: Publish,
        connection: u64,
    },
    SubAck {
        rejected: usize,
    },
    /// The DISCONNECT asked for was written; the connection is closed.
    Disconnected,
}

/// Why the connection failed or was lost.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {host}: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("invalid TLS server name `{0}`")]
    ServerName(String),
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("expected CONNACK, the broker sent {0}")]
    NoConnAck(&'static str),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("no PINGRESP within the keep-alive interval")]
    KeepAlive,
    #[error("the broker closed the connection")]
    Closed,
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("MQTT packet: {0}")]
    Packet(#[from] mqttbytes::Error),
}

/// How to reach and log in to the broker.
#[derive(Clone)]
pub(crate) struct Options {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub credentials: Option<(String, String)>,
    /// Largest packet accepted from the broker.
    pub max_incoming_packet: usize,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("keep_alive", &self.keep_alive)
            .field("clean_session", &self.clean_session)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One open connection.
struct Open {
    stream: Box<dyn Io>,
    id: u64,
    input: BytesMut,
    output: BytesMut,
    last_write: Instant,
    /// When the PINGREQ still unanswered was sent.
    ping_sent: Option<Instant>,
    /// After a small read: when the socket is read again (see
    /// [`super::rest`]).
    read_again_at: Option<Instant>,
    mark: LowWater,
}

/// The requesting half: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub(crate) struct Requests(mpsc::UnboundedSender<Request>);

impl Requests {
    pub fn send(&self, request: Request) -> Result<(), &'static str> {
        self.0
            .send(request)
            .map_err(|_| "the MQTT session has ended")
    }
}

/// The connection half, polled by one task.
pub(crate) struct Connection {
    options: Options,
    requests: mpsc::UnboundedReceiver<Request>,
    open: Option<Open>,
    connections: u64,
    next_pkid: u16,
    incoming: VecDeque<Incoming>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("options", &self.options)
            .field("connected", &self.open.is_some())
            .finish_non_exhaustive()
    }
}

/// A session: the request half for the acker, the connection half for the
/// network task.
pub(crate) fn session(options: Options) -> (Requests, Connection) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Requests(tx),
        Connection {
            options,
            requests: rx,
            open: None,
            connections: 0,
            next_pkid: 0,
            incoming: VecDeque::new(),
        },
    )
}

impl Connection {
    /// The next event; connects first when not connected. After an error
    /// the connection is closed and the next call connects again.
    pub async fn poll(&mut self) -> Result<Incoming, SessionError> {
        let result = self.poll_inner().await;
        if result.is_err() {
            self.open = None;
            self.incoming.clear();
        }
        result
    }

    async fn poll_inner(&mut self) -> Result<Incoming, SessionError> {
        loop {
            if let Some(event) = self.incoming.pop_front() {
                return Ok(event);
            }
            if self.open.is_none() {
                let (open, session_present) = timeout(IO_TIMEOUT, self.connect())
                    .await
                    .map_err(|_| SessionError::Timeout(IO_TIMEOUT))??;
                self.open = Some(open);
                return Ok(Incoming::ConnAck { session_present });
            }
            let keep_alive = self.options.keep_alive;
            let max_incoming = self.options.max_incoming_packet;
            let Some(open) = self.open.as_mut() else {
                continue;
            };
            // The next keep-alive duty: a PINGREQ when idle, or giving up on
            // the one sent.
            let deadline = match open.ping_sent {
                Some(sent) => sent + keep_alive,
                None => open.last_write + keep_alive,
            };
            let keep_alive_on = !keep_alive.is_zero();
            // A rest ends here however the loop got here.
            if open.read_again_at.is_some_and(|at| Instant::now() >= at) {
                open.read_again_at = None;
                open.mark.wake();
            }
            let rest_until = open.read_again_at;
            tokio::select! {
                () = tokio::time::sleep_until(rest_until.unwrap_or_else(Instant::now)), if rest_until.is_some() => {}
                request = self.requests.recv() => {
                    let Some(request) = request else {
                        // Nobody can ask anything any more: leave cleanly.
                        return self.disconnect().await;
                    };
                    let mut disconnect = false;
                    let mut next = Some(request);
                    while let Some(request) = next {
                        match request {
                            Request::Ack { pkid, connection } if connection == open.id => {
                                PubAck::new(pkid).write(&mut open.output)?;
                            }
                            // For a connection that is gone: the broker redelivers.
                            Request::Ack { .. } => {}
                            Request::Subscribe(filters) => {
                                self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
                                let subscribe = Subscribe {
                                    pkid: self.next_pkid,
                                    filters: filters
                                        .into_iter()
                                        .map(|(path, qos)| SubscribeFilter::new(path, qos))
                                        .collect(),
                                };
                                subscribe.write(&mut open.output)?;
                            }
                            Request::Publish { topic, payload } => {
                                Publish::new(topic, QoS::AtMostOnce, payload)
                                    .write(&mut open.output)?;
                            }
                            Request::Disconnect => disconnect = true,
                        }
                        next = self.requests.try_recv().ok();
                    }
                    if disconnect {
                        return self.disconnect().await;
                    }
                    flush(open).await?;
                }
                read = open.stream.read_buf(&mut open.input), if rest_until.is_none() => {
                    let n = read?;
                    if n == 0 {
                        return Err(SessionError::Closed);
                    }
                    open.read_again_at = (n < COALESCE_BELOW).then(|| Instant::now() + COALESCE);
                    if open.read_again_at.is_some() {
                        open.mark.rest();
                    }
                    loop {
                        match Packet::read(&mut open.input, max_incoming) {
                            Ok(packet) => {
                                if let Some(event) = incoming(packet, open) {
                                    self.incoming.push_back(event);
                                }
                            }
                            Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    if open.input.capacity() - open.input.len() < READ_CHUNK / 4 {
                        open.input.reserve(READ_CHUNK);
                    }
                }
                () = tokio::time::sleep_until(deadline), if keep_alive_on => {
                    if open.ping_sent.is_some() {
                        return Err(SessionError::KeepAlive);
                    }
                    PingReq.write(&mut open.output)?;
                    flush(open).await?;
                    open.ping_sent = Some(Instant::now());
                }
            }
        }
    }

    /// Writes a DISCONNECT (the persistent session stays at the broker) and
    /// closes the connection.
    async fn disconnect(&mut self) -> Result<Incoming, SessionError> {
        if let Some(mut open) = self.open.take() {
            open.output.clear();
            Disconnect.write(&mut open.output)?;
            flush(&mut open).await?;
            let _ = open.stream.shutdown().await;
        }
        Ok(Incoming::Disconnected)
    }

    async fn connect(&mut self) -> Result<(Open, bool), SessionError> {
        // Requests queued for the previous connection: its acks are void
        // (see the module docs), its subscribe is asked again after CONNACK.
        while self.requests.try_recv().is_ok() {}
        let o = &self.options;
        let addr = format!("{}:{}", o.host, o.port);
        let tcp = TcpStream::connect((o.host.as_str(), o.port))
            .await
            .map_err(|source| SessionError::Connect {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let mark = LowWater::of(&tcp);
        let stream: Box<dyn Io> = match &o.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(o.host.clone())
                    .map_err(|_| SessionError::ServerName(o.host.clone()))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|source| SessionError::Tls {
                        host: o.host.clone(),
                        source,
                    })?;
                Box::new(tls)
            }
        };
        self.connections += 1;
        let mut open = Open {
            stream,
            id: self.connections,
            input: BytesMut::with_capacity(READ_CHUNK),
            output: BytesMut::with_capacity(4096),
            last_write: Instant::now(),
            ping_sent: None,
            read_again_at: None,
            mark,
        };
        let mut connect = Connect::new(o.client_id.clone());
        connect.keep_alive = u16::try_from(o.keep_alive.as_secs()).unwrap_or(u16::MAX);
        connect.clean_session = o.clean_session;
        if let Some((user, password)) = &o.credentials {
            connect.set_login(user.clone(), password.clone());
        }
        connect.write(&mut open.output)?;
        flush(&mut open).await?;
        let max_incoming = o.max_incoming_packet;
        loop {
            match Packet::read(&mut open.input, max_incoming) {
                Ok(Packet::ConnAck(ConnAck {
                    code,
                    session_present,
                })) => {
                    if code != ConnectReturnCode::Success {
                        return Err(SessionError::Refused(code));
                    }
                    // Anything the broker sent right behind the CONNACK.
                    loop {
                        match Packet::read(&mut open.input, max_incoming) {
                            Ok(packet) => {
                                if let Some(event) = incoming(packet, &mut open) {
                                    self.incoming.push_back(event);
                                }
                            }
                            Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    return Ok((open, session_present));
                }
                Ok(other) => return Err(SessionError::NoConnAck(packet_name(&other))),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {
                    if open.stream.read_buf(&mut open.input).await? == 0 {
                        return Err(SessionError::Closed);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Writes what `open.output` holds in one go.
async fn flush(open: &mut Open) -> Result<(), SessionError> {
    if open.output.is_empty() {
        return Ok(());
    }
    timeout(IO_TIMEOUT, async {
        open.stream.write_all(&open.output).await?;
        open.stream.flush().await
    })
    .await
    .map_err(|_| SessionError::Timeout(IO_TIMEOUT))??;
    open.output.clear();
    open.last_write = Instant::now();
    Ok(())
}

/// What a received packet means for the caller (`None`: nothing).
fn incoming(packet: Packet, open: &mut Open) -> Option<Incoming> {
    match packet {
        Packet::Publish(publish) => Some(Incoming::Publish {
            publish,
            connection: open.id,
        }),
        Packet::SubAck(ack) => Some(Incoming::SubAck {
            rejected: ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                .count(),
        }),
        Packet::PingResp => {
            open.ping_sent = None;
            None
        }
        _ => None,
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// QoS for a subscription (0, or 1 for anything higher: acks are QoS 1 only).
pub(crate) fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A broker stand-in on a loopback port: the test drives it packet by packet.
    struct Peer {
        stream: TcpStream,
        input: BytesMut,
        /// Socket reads that brought at least one packet.
        reads: usize,
    }

    impl Peer {
        async fn accept(listener: &TcpListener) -> Self {
            let (stream, _) = listener.accept().await.unwrap();
            let mut peer = Peer {
                stream,
                input: BytesMut::new(),
                reads: 0,
            };
            let Packet::Connect(connect) = peer.next().await else {
                panic!("expected CONNECT");
            };
            assert_eq!(connect.client_id, "gw-test");
            assert!(!connect.clean_session);
            assert_eq!(connect.keep_alive, 1);
            peer.send(|b| ConnAck::new(ConnectReturnCode::Success, true).write(b))
                .await;
            peer
        }

        async fn next(&mut self) -> Packet {
            loop {
                match Packet::read(&mut self.input, 1 << 20) {
                    Ok(packet) => return packet,
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {
                        self.input.reserve(64 * 1024);
                        let n = timeout(
                            Duration::from_secs(10),
                            self.stream.read_buf(&mut self.input),
                        )
                        .await
                        .expect("the client wrote within 10 s")
                        .unwrap();
                        assert!(n > 0, "the client closed the connection");
                        self.reads += 1;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }

        async fn send(
            &mut self,
            write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>,
        ) {
            let mut out = BytesMut::new();
            write(&mut out).unwrap();
            self.stream.write_all(&out).await.unwrap();
        }
    }

    fn options(port: u16) -> Options {
        Options {
            host: "127.0.0.1".into(),
            port,
            client_id: "gw-test".into(),
            keep_alive: Duration::from_secs(1),
            clean_session: false,
            credentials: None,
            max_incoming_packet: 1 << 20,
            tls: None,
        }
    }

    fn publish(pkid: u16) -> Publish {
        let mut p = Publish::new(
            "sensors/a/b",
            QoS::AtLeastOnce,
            format!("{{\"value\":{pkid}}}"),
        );
        p.pkid = pkid;
        p
    }

    #[tokio::test]
    async fn the_acks_of_a_commit_go_out_in_one_write() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests, mut connection) = session(options(port));
        let broker = tokio::spawn(async move {
            let mut peer = Peer::accept(&listener).await;
            let mut out = BytesMut::new();
            for pkid in 1..=500u16 {
                publish(pkid).write(&mut out).unwrap();
            }
            peer.stream.write_all(&out).await.unwrap();
            let reads_before = peer.reads;
            let mut acked = Vec::new();
            while acked.len() < 500 {
                match peer.next().await {
                    Packet::PubAck(ack) => acked.push(ack.pkid),
                    Packet::PingReq => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            (acked, peer.reads - reads_before)
        });
        assert!(matches!(
            connection.poll().await.unwrap(),
            Incoming::ConnAck {
                session_present: true
            }
        ));
        let mut received = Vec::new();
        while received.len() < 500 {
            match connection.poll().await.unwrap() {
                Incoming::Publish {
                    publish,
                    connection,
                } => received.push((publish.pkid, connection)),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Acknowledged together, as the acker does after one journal commit.
        for &(pkid, conn) in &received {
            requests
                .send(Request::Ack {
                    pkid,
                    connection: conn,
                })
                .unwrap();
        }
        let polling = tokio::spawn(async move {
            loop {
                if connection.poll().await.is_err() {
                    break;
                }
            }
        });
        let (acked, reads) = broker.await.unwrap();
        assert_eq!(
            acked,
            (1..=500).collect::<Vec<_>>(),
            "every PUBACK, in order"
        );
        // 500 PUBACKs are 2,000 bytes: one write, read in one or two reads.
        assert!(reads <= 2, "PUBACKs arrived over {reads} reads");
        polling.abort();
    }

    #[tokio::test]
    async fn an_ack_for_a_lost_connection_is_never_written_to_the_next_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests, mut connection) = session(options(port));
        let broker = tokio::spawn(async move {
            let mut first = Peer::accept(&listener).await;
            first.send(|b| publish(7).write(b)).await;
            // Wait until the client got it, then drop the connection.
            let _ = first.next().await;
            drop(first);
            let mut second = Peer::accept(&listener).await;
            // Sent again under another packet id, so that a stale PUBACK 7
            // cannot pass for the right one.
            second.send(|b| publish(9).write(b)).await;
            // The only PUBACK on this connection must be the one for its own delivery.
            let mut packets = Vec::new();
            loop {
                match second.next().await {
                    Packet::PubAck(ack) => {
                        packets.push(ack.pkid);
                        break;
                    }
                    Packet::PingReq => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            packets
        });
        assert!(matches!(
            connection.poll().await.unwrap(),
            Incoming::ConnAck { .. }
        ));
        let Incoming::Publish {
            connection: first_id,
            ..
        } = connection.poll().await.unwrap()
        else {
            panic!("expected the publish");
        };
        // Something for the stand-in to read before it hangs up: a stale ack
        // written while still connected would be fine; this one is queued late.
        requests
            .send(Request::Subscribe(vec![("x/#".into(), QoS::AtLeastOnce)]))
            .unwrap();
        assert!(
            connection.poll().await.is_err(),
            "the lost connection is an error"
        );
        // Acked only now, after the connection was lost.
        requests
            .send(Request::Ack {
                pkid: 7,
                connection: first_id,
            })
            .unwrap();
        assert!(matches!(
            connection.poll().await.unwrap(),
            Incoming::ConnAck { .. }
        ));
        let Incoming::Publish {
            publish,
            connection: second_id,
        } = connection.poll().await.unwrap()
        else {
            panic!("expected the redelivery");
        };
        assert_ne!(first_id, second_id);
        // A stale ack queued after the reconnect is dropped too.
        requests
            .send(Request::Ack {
                pkid: 7,
                connection: first_id,
            })
            .unwrap();
        requests
            .send(Request::Ack {
                pkid: publish.pkid,
                connection: second_id,
            })
            .unwrap();
        let polling = tokio::spawn(async move { while connection.poll().await.is_ok() {} });
        assert_eq!(broker.await.unwrap(), vec![9]);
        polling.abort();
    }

    #[tokio::test]
    async fn an_idle_connection_pings_and_a_silent_broker_is_a_keep_alive_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_requests, mut connection) = session(options(port));
        let broker = tokio::spawn(async move {
            let mut peer = Peer::accept(&listener).await;
            assert!(matches!(peer.next().await, Packet::PingReq));
            // Never answered: the client gives up after another interval.
            let mut rest = Vec::new();
            let _ = peer.stream.read_to_end(&mut rest).await;
        });
        assert!(matches!(
            connection.poll().await.unwrap(),
            Incoming::ConnAck { .. }
        ));
        let err = connection.poll().await.unwrap_err();
        assert!(matches!(err, SessionError::KeepAlive), "{err}");
        broker.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_clear_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut opts = options(port);
        opts.credentials = Some(("gw".into(), "wrong".into()));
        let (_requests, mut connection) = session(opts);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut peer = Peer {
                stream,
                input: BytesMut::new(),
                reads: 0,
            };
            let Packet::Connect(connect) = peer.next().await else {
                panic!("expected CONNECT");
            };
            assert_eq!(connect.login.unwrap().username, "gw");
            peer.send(|b| ConnAck::new(ConnectReturnCode::BadUserNamePassword, false).write(b))
                .await;
        });
        let err = connection.poll().await.unwrap_err();
        assert!(
            matches!(
                err,
                SessionError::Refused(ConnectReturnCode::BadUserNamePassword)
            ),
            "{err}"
        );
    }
}
