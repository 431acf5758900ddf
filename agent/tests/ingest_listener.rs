//! The embedded ingest listener, driven over real sockets by a raw MQTT
//! client (rumqttc's codec) so each test sees exactly which packets the
//! gateway writes and when.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::BytesMut;
use millrace_agent::ingest::broker::{BrokerConfig, EmbeddedBroker};
use millrace_agent::ingest::decode::{PayloadFormat, SubscriptionConfig};
use millrace_agent::ingest::{DurableAck, IngestEvent};
use millrace_protocol::DeadLetterReason;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn config() -> BrokerConfig {
    let mut cfg = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
    let mut sub = SubscriptionConfig::new("sensors/+/+", PayloadFormat::Json);
    sub.device = Some("{1}".into());
    sub.sensor = Some("{2}".into());
    cfg.subscriptions = vec![sub];
    cfg
}

struct Running {
    port: u16,
    events: mpsc::Receiver<IngestEvent>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(cfg: BrokerConfig, channel: usize) -> Running {
    let broker = EmbeddedBroker::start(&cfg).unwrap();
    let port = broker.local_addr().port();
    let (tx, events) = mpsc::channel(channel);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { broker.run(tx, token).await.unwrap() });
    Running {
        port,
        events,
        stop,
        task,
    }
}

struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut c = Self {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = v4::Connect::new("test-device");
        connect.keep_alive = 30;
        c.send(Packet::Connect(connect)).await;
        match c.next().await {
            Packet::ConnAck(ack) => assert_eq!(ack.code, v4::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, 1 << 20).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
    }

    /// The next packet from the gateway.
    async fn next(&mut self) -> Packet {
        tokio::time::timeout(WAIT, async {
            loop {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return p,
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from the gateway: {e}"),
                }
                let n = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "the gateway closed the connection");
            }
        })
        .await
        .expect("a packet within 20 s")
    }

    /// Whether the gateway wrote anything within `within`.
    async fn silent_for(&mut self, within: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        tokio::time::timeout(within, self.stream.read_buf(&mut self.buf))
            .await
            .is_err()
    }
}

async fn next_event(events: &mut mpsc::Receiver<IngestEvent>) -> IngestEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event within 20 s")
        .expect("channel open")
}

/// The next two events: a reading, then the durability marker behind it.
async fn reading_then_marker(events: &mut mpsc::Receiver<IngestEvent>) -> DurableAck {
    assert!(matches!(next_event(events).await, IngestEvent::Reading(..)));
    match next_event(events).await {
        IngestEvent::Durable(marker) => marker,
        other => panic!("expected the durability marker, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_publish_is_acknowledged_only_once_its_readings_are_durable() {
    let mut gw = start(config(), 64);
    let mut client = Client::connect(gw.port).await;
    client
        .publish(
            "sensors/kiln-1/temp",
            QoS::AtLeastOnce,
            7,
            br#"{"ts":1700000000000,"value":21.5}"#,
        )
        .await;
    let IngestEvent::Reading(r, _) = next_event(&mut gw.events).await else {
        panic!("expected the reading first");
    };
    assert_eq!(
        (&*r.series.device, &*r.series.sensor, r.value),
        ("kiln-1", "temp", 21.5)
    );
    let IngestEvent::Durable(marker) = next_event(&mut gw.events).await else {
        panic!("expected the durability marker after the reading");
    };
    // The journal has not committed: no PUBACK yet.
    assert!(
        client.silent_for(Duration::from_millis(300)).await,
        "PUBACK before the commit"
    );
    marker.complete();
    assert_eq!(client.next().await, Packet::PubAck(v4::PubAck::new(7)));
    gw.stop.cancel();
    tokio::time::timeout(WAIT, gw.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_marker_withholds_the_ack_and_closes_the_connection() {
    let mut gw = start(config(), 64);
    let mut client = Client::connect(gw.port).await;
    client
        .publish(
            "sensors/kiln-1/temp",
            QoS::AtLeastOnce,
            1,
            br#"{"value":1}"#,
        )
        .await;
    assert!(matches!(
        next_event(&mut gw.events).await,
        IngestEvent::Reading(..)
    ));
    // A failed journal commit drops the marker.
    drop(next_event(&mut gw.events).await);
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(WAIT, client.stream.read(&mut byte))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed without a PUBACK");
    gw.stop.cancel();
}

/// 20 000 QoS 0 readings through a channel of 8: the listener stops reading
/// the socket while the consumer is slow, and every reading arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pipeline_pushes_back_on_the_socket_and_loses_nothing() {
    const N: u64 = 20_000;
    let mut gw = start(config(), 8);
    let port = gw.port;
    let publisher = tokio::spawn(async move {
        let mut client = Client::connect(port).await;
        let mut out = BytesMut::new();
        for i in 0..N {
            let payload = format!(r#"{{"ts":{},"value":{i}}}"#, 1_700_000_000_000u64 + i);
            let p = v4::Publish::new(format!("sensors/d{}/s", i % 10), QoS::AtMostOnce, payload);
            Packet::Publish(p).write(&mut out, 1 << 20).unwrap();
        }
        client.stream.write_all(&out).await.unwrap();
        client.send(Packet::Disconnect).await;
        client.stream.shutdown().await.unwrap();
    });
    let mut sum = 0u64;
    let mut readings = 0u64;
    while readings < N {
        match next_event(&mut gw.events).await {
            IngestEvent::Reading(r, _) => {
                readings += 1;
                sum += r.value as u64;
                if readings % 1000 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sum, N * (N - 1) / 2, "every reading exactly once");
    publisher.await.unwrap();
    gw.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_is_taken_once_and_released_with_pubcomp() {
    let mut gw = start(config(), 64);
    let mut client = Client::connect(gw.port).await;
    let payload = br#"{"ts":1700000000000,"value":3}"#;
    client
        .publish("sensors/a/b", QoS::ExactlyOnce, 11, payload)
        .await;
    reading_then_marker(&mut gw.events).await.complete();
    assert_eq!(client.next().await, Packet::PubRec(v4::PubRec::new(11)));
    // The device did not see the PUBREC in time and resends: not taken again.
    let mut again = v4::Publish::new("sensors/a/b", QoS::ExactlyOnce, payload.to_vec());
    again.pkid = 11;
    again.dup = true;
    client.send(Packet::Publish(again)).await;
    let IngestEvent::Durable(marker) = next_event(&mut gw.events).await else {
        panic!("a resent QoS 2 message yields only a marker, no second reading");
    };
    marker.complete();
    assert_eq!(client.next().await, Packet::PubRec(v4::PubRec::new(11)));
    client.send(Packet::PubRel(v4::PubRel::new(11))).await;
    assert_eq!(client.next().await, Packet::PubComp(v4::PubComp::new(11)));
    gw.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_refused_and_ping_is_answered() {
    let gw = start(config(), 64);
    let mut client = Client::connect(gw.port).await;
    let mut sub = v4::Subscribe::new("sensors/#", QoS::AtLeastOnce);
    sub.pkid = 3;
    client.send(Packet::Subscribe(sub)).await;
    match client.next().await {
        Packet::SubAck(ack) => {
            assert_eq!(ack.pkid, 3);
            assert_eq!(ack.return_codes, vec![v4::SubscribeReasonCode::Failure]);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    client.send(Packet::PingReq).await;
    assert_eq!(client.next().await, Packet::PingResp);
    gw.stop.cancel();
}

/// A publish over `max-payload` is read past, dead-lettered with the start
/// of its payload, and acknowledged; the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_publish_is_one_dead_letter_and_is_acknowledged() {
    let mut cfg = config();
    cfg.max_payload = bytesize::ByteSize::kib(1);
    let mut gw = start(cfg, 64);
    let mut client = Client::connect(gw.port).await;
    let big = vec![b'x'; 200 * 1024];
    client
        .publish("sensors/a/big", QoS::AtLeastOnce, 5, &big)
        .await;
    client
        .publish("sensors/a/ok", QoS::AtLeastOnce, 6, br#"{"value":2}"#)
        .await;
    let IngestEvent::DeadLetter(dl) = next_event(&mut gw.events).await else {
        panic!("expected a dead letter");
    };
    assert_eq!(dl.reason, DeadLetterReason::Oversize);
    assert!(dl.detail.contains("204800"), "{}", dl.detail);
    // The two messages may share a marker or have one each: a stand-in for
    // the journal completes every marker and counts what else arrives.
    let mut events = gw.events;
    let pipeline = tokio::spawn(async move {
        let mut readings = 0;
        while let Some(e) = events.recv().await {
            match e {
                IngestEvent::Durable(m) => m.complete(),
                IngestEvent::Reading(..) => readings += 1,
                IngestEvent::DeadLetter(dl) => panic!("second dead letter {dl:?}"),
            }
        }
        readings
    });
    let mut acked = Vec::new();
    while acked.len() < 2 {
        match client.next().await {
            Packet::PubAck(a) => acked.push(a.pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(acked, vec![5, 6], "both acknowledged, in order");
    gw.stop.cancel();
    gw.task.await.unwrap();
    assert_eq!(
        pipeline.await.unwrap(),
        1,
        "one reading besides the dead letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_client_is_told_the_receive_maximum_and_gets_its_pubacks() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::{mqttbytes::QoS as Q5, AsyncClient, Event, MqttOptions};
    let mut cfg = config();
    cfg.max_inflight = 100;
    let mut gw = start(cfg, 64);
    let options = MqttOptions::new("v5-device", "127.0.0.1", gw.port);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .publish("sensors/v5/temp", Q5::AtLeastOnce, false, r#"{"value":5}"#)
        .await
        .unwrap();
    let acker = tokio::spawn(async move {
        while let Some(e) = gw.events.recv().await {
            if let IngestEvent::Durable(m) = e {
                m.complete();
            }
        }
    });
    let mut receive_max = None;
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(P5::ConnAck(c)) => {
                    receive_max = c.properties.and_then(|p| p.receive_max)
                }
                Event::Incoming(P5::PubAck(_)) => break,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(receive_max, Some(100));
    gw.stop.cancel();
    acker.abort();
}

/// With `pubsub-listen` set, a plant client subscribed there sees a copy of
/// what a device published to the ingest listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_pubsub_broker_gets_a_copy_of_every_accepted_publish() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as P};
    let mut cfg = config();
    cfg.pubsub_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = EmbeddedBroker::start(&cfg).unwrap();
    let (port, pubsub) = (broker.local_addr().port(), broker.pubsub_addr().unwrap());
    let (tx, mut events) = mpsc::channel(64);
    let stop = CancellationToken::new();
    tokio::spawn(broker.run(tx, stop.clone()));
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let IngestEvent::Durable(m) = e {
                m.complete();
            }
        }
    });
    let (hmi, mut hmi_loop) =
        AsyncClient::new(MqttOptions::new("hmi", "127.0.0.1", pubsub.port()), 16);
    hmi.subscribe("sensors/#", QoS::AtMostOnce).await.unwrap();
    // rumqttd listens a moment after it starts: retry until it answers.
    tokio::time::timeout(WAIT, async {
        loop {
            match hmi_loop.poll().await {
                Ok(Event::Incoming(P::SubAck(_))) => break,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .unwrap();
    let mut device = Client::connect(port).await;
    let payload = br#"{"value":42}"#;
    device
        .publish("sensors/press-1/temp", QoS::AtLeastOnce, 1, payload)
        .await;
    assert_eq!(device.next().await, Packet::PubAck(v4::PubAck::new(1)));
    let copy = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(P::Publish(p)) = hmi_loop.poll().await.unwrap() {
                break p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (copy.topic.as_str(), &copy.payload[..]),
        ("sensors/press-1/temp", &payload[..])
    );
    stop.cancel();
}

/// A device that writes CONNECT and its first PUBLISH in one segment: the
/// publish is taken at once, not when more bytes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_in_the_same_segment_as_the_connect_is_taken() {
    let mut gw = start(config(), 64);
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut out = BytesMut::new();
    Packet::Connect(v4::Connect::new("eager"))
        .write(&mut out, 1 << 20)
        .unwrap();
    let mut p = v4::Publish::new("sensors/a/b", QoS::AtLeastOnce, br#"{"value":9}"#.to_vec());
    p.pkid = 4;
    Packet::Publish(p).write(&mut out, 1 << 20).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut client = Client {
        stream,
        buf: BytesMut::new(),
    };
    assert!(matches!(client.next().await, Packet::ConnAck(_)));
    reading_then_marker(&mut gw.events).await.complete();
    assert_eq!(client.next().await, Packet::PubAck(v4::PubAck::new(4)));
    gw.stop.cancel();
}
