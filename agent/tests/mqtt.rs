//! MQTT ingest against real peers: mosquitto as the external broker, and a
//! rumqttc client publishing to the embedded rumqttd broker.

#![allow(clippy::unwrap_used)]

#[path = "util/mosquitto.rs"]
mod mosquitto;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use millrace_agent::ingest::broker::{BrokerConfig, BrokerError, EmbeddedBroker};
use millrace_agent::ingest::decode::{PayloadFormat, SubscriptionConfig};
use millrace_agent::ingest::mqtt::{
    MqttConfig, MqttProtocol, MqttSource, MqttStats, MqttTlsConfig,
};
use millrace_agent::ingest::IngestEvent;
use millrace_protocol::{DeadLetterReason, Reading, SeriesKey};
use mosquitto::{Mosquitto, Options};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Logs to the test's captured output (`RUST_LOG` filters; default: info).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn config(broker: &Mosquitto, client_id: &str, protocol: MqttProtocol) -> MqttConfig {
    let mut c = MqttConfig::new("127.0.0.1", broker.port(), client_id);
    c.protocol = protocol;
    c.reconnect_backoff_min = Duration::from_millis(100);
    c.reconnect_backoff_max = Duration::from_millis(500);
    c.subscriptions = vec![
        // Filters must not overlap: MQTT 5 brokers deliver one copy per matching subscription.
        SubscriptionConfig::new("multi/+/state", PayloadFormat::JsonMulti),
        SubscriptionConfig::new("raw/+/+", PayloadFormat::Number),
        SubscriptionConfig::new("plant/+/+", PayloadFormat::Json),
        SubscriptionConfig::new("load/#", PayloadFormat::JsonBatch),
        // Topics with fewer than three levels cannot fill the sensor template.
        SubscriptionConfig::new("dev/#", PayloadFormat::Json),
    ];
    c
}

struct Running {
    rx: mpsc::Receiver<IngestEvent>,
    stats: Arc<MqttStats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), millrace_agent::ingest::mqtt::MqttError>>,
}

impl Running {
    /// A running source whose durability markers are completed as soon as
    /// they arrive, as a pipeline with an instant journal would.
    fn start(config: MqttConfig, channel_capacity: usize) -> Self {
        let mut running = Self::start_raw(config, channel_capacity);
        let (tx, rx) = mpsc::channel(channel_capacity);
        let mut source_rx = std::mem::replace(&mut running.rx, rx);
        tokio::spawn(async move {
            while let Some(event) = source_rx.recv().await {
                match event {
                    IngestEvent::Durable(ack) => ack.complete(),
                    other => {
                        if tx.send(other).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        running
    }

    /// A running source whose channel (markers included) the test reads itself.
    fn start_raw(config: MqttConfig, channel_capacity: usize) -> Self {
        init_logs();
        let source = MqttSource::new(config).expect("valid source config");
        let stats = source.stats();
        let (tx, rx) = mpsc::channel(channel_capacity);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Self {
            rx,
            stats,
            shutdown,
            task,
        }
    }

    async fn subscribed(&self) {
        wait_for("subscribed", || {
            self.stats.subscribed.load(Ordering::Relaxed)
        })
        .await;
    }

    /// The next reading or dead letter. Durability markers are completed on
    /// the way, as the pipeline does once its journal commit covers them.
    async fn next(&mut self) -> IngestEvent {
        loop {
            match self.next_raw().await {
                IngestEvent::Durable(ack) => ack.complete(),
                other => return other,
            }
        }
    }

    async fn next_raw(&mut self) -> IngestEvent {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("an ingest event within 20 s")
            .expect("channel open")
    }

    async fn reading(&mut self) -> Reading {
        match self.next().await {
            IngestEvent::Reading(r, _) => r,
            other => panic!("expected a reading, got {other:?}"),
        }
    }

    async fn stop(self) -> mpsc::Receiver<IngestEvent> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("source stops within 20 s")
            .expect("task not panicked")
            .expect("source ends without error");
        self.rx
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), mosquitto::free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_qos0_and_qos1_readings_through_wildcards() {
    let broker = Mosquitto::start();
    let mut src = Running::start(config(&broker, &unique("v4"), MqttProtocol::V4), 64);
    src.subscribed().await;
    assert!(src.stats.is_connected());

    broker.publish(
        "plant/boiler-3/temp",
        br#"{"ts": 1700000000100, "value": 181.5, "unit": "degC"}"#,
        0,
        &[],
    );
    let r = src.reading().await;
    assert_eq!(r.series, SeriesKey::new("boiler-3", "temp"));
    assert_eq!(
        (r.time_ms, r.value, &*r.unit),
        (1_700_000_000_100, 181.5, "degC")
    );

    broker.publish(
        "plant/boiler-3/steam-flow",
        br#"{"ts": 1700000000200, "value": 12.25, "unit": "t/h"}"#,
        1,
        &[],
    );
    let r = src.reading().await;
    assert_eq!(r.series, SeriesKey::new("boiler-3", "steam-flow"));
    assert_eq!((r.time_ms, r.value), (1_700_000_000_200, 12.25));

    broker.publish(
        "multi/env-1/state",
        br#"{"ts": 1700000000300, "humidity": 45.5, "ambient": 22.0}"#,
        1,
        &[],
    );
    let h = src.reading().await;
    let a = src.reading().await;
    assert_eq!(h.series, SeriesKey::new("env-1", "humidity"));
    assert_eq!(a.series, SeriesKey::new("env-1", "ambient"));
    assert_eq!((a.time_ms, a.value), (1_700_000_000_300, 22.0));

    broker.publish("load/gen-1", br#"[{"series":"dev-7/s-1","ts":1700000000400,"value":1},{"series":"dev-7/s-2","ts":1700000000401,"value":2}]"#, 1, &[]);
    assert_eq!(src.reading().await.series, SeriesKey::new("dev-7", "s-1"));
    assert_eq!(src.reading().await.value, 2.0);

    wait_for("acks", || src.stats.acks.load(Ordering::Relaxed) == 3).await;
    assert_eq!(src.stats.messages.load(Ordering::Relaxed), 4);
    assert_eq!(src.stats.readings.load(Ordering::Relaxed), 6);
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_readings_qos0_and_qos1() {
    let broker = Mosquitto::start();
    let mut src = Running::start(config(&broker, &unique("v5"), MqttProtocol::V5), 64);
    src.subscribed().await;
    broker.publish("raw/press-1/pressure", b"80.5", 1, &["-V", "mqttv5"]);
    let r = src.reading().await;
    assert_eq!(
        (r.series, r.value),
        (SeriesKey::new("press-1", "pressure"), 80.5)
    );
    broker.publish(
        "plant/boiler-3/temp",
        br#"{"ts": 1700000000000, "value": 3}"#,
        0,
        &["-V", "mqttv5"],
    );
    let r = src.reading().await;
    assert_eq!((r.time_ms, r.value), (1_700_000_000_000, 3.0));
    wait_for("ack", || src.stats.acks.load(Ordering::Relaxed) == 1).await;
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password() {
    let broker = Mosquitto::start_with(Options {
        login: Some(("gw".into(), "s3cret".into())),
        ..Options::default()
    });
    let mut wrong = config(&broker, &unique("bad-login"), MqttProtocol::V4);
    wrong.username = Some("gw".into());
    wrong.password = Some("nope".into());
    let bad = Running::start(wrong, 8);
    wait_for("refused connects", || {
        bad.stats.connection_errors.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(!bad.stats.is_connected());
    bad.stop().await;

    let mut right = config(&broker, &unique("login"), MqttProtocol::V4);
    right.username = Some("gw".into());
    right.password = Some("s3cret".into());
    let mut src = Running::start(right, 8);
    src.subscribed().await;
    broker.publish(
        "plant/a/b",
        br#"{"value": 1}"#,
        1,
        &["-u", "gw", "-P", "s3cret"],
    );
    assert_eq!(src.reading().await.series, SeriesKey::new("a", "b"));
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_become_counted_dead_letters_and_the_source_keeps_running() {
    let broker = Mosquitto::start();
    let mut cfg = config(&broker, &unique("bad"), MqttProtocol::V4);
    cfg.max_payload = bytesize::ByteSize::kib(4);
    let mut src = Running::start(cfg, 64);
    src.subscribed().await;

    let cases: [(&str, Vec<u8>, DeadLetterReason); 4] = [
        (
            "plant/boiler-3/temp",
            b"{\"value\": ".to_vec(),
            DeadLetterReason::Malformed,
        ),
        (
            "plant/boiler-3/temp",
            br#"{"value": "hot"}"#.to_vec(),
            DeadLetterReason::WrongType,
        ),
        (
            "plant/boiler-3/temp",
            vec![b' '; 5000],
            DeadLetterReason::Oversize,
        ),
        (
            "dev/only-device",
            br#"{"value": 1}"#.to_vec(),
            DeadLetterReason::Unmapped,
        ),
    ];
    for (topic, payload, reason) in &cases {
        broker.publish(topic, payload, 1, &[]);
        match src.next().await {
            IngestEvent::DeadLetter(dl) => {
                assert_eq!(dl.reason, *reason, "{dl:?}");
                assert_eq!(dl.origin, *topic);
                assert!(dl.input.len() <= payload.len().max(1024));
                if *reason == DeadLetterReason::Oversize {
                    assert_eq!(dl.input.len(), 1024);
                }
            }
            other => panic!("expected a {reason} dead letter, got {other:?}"),
        }
    }
    // NaN and Inf pass through as readings; the window engine judges them.
    broker.publish("raw/press-1/pressure", b"NaN", 1, &[]);
    assert!(src.reading().await.value.is_nan());
    broker.publish("raw/press-1/pressure", b"-inf", 0, &[]);
    assert_eq!(src.reading().await.value, f64::NEG_INFINITY);
    // Still running.
    broker.publish("plant/boiler-3/temp", br#"{"value": 7}"#, 1, &[]);
    assert_eq!(src.reading().await.value, 7.0);

    for (_, _, reason) in &cases {
        assert_eq!(src.stats.dead_letters(*reason), 1, "{reason}");
    }
    assert_eq!(src.stats.dead_letters_total(), 4);
    assert_eq!(src.stats.readings.load(Ordering::Relaxed), 3);
    assert!(src.stats.is_connected());
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_is_killed_and_restarted() {
    let mut broker = Mosquitto::start();
    let mut src = Running::start(config(&broker, &unique("restart"), MqttProtocol::V4), 64);
    src.subscribed().await;
    broker.publish("plant/a/b", br#"{"value": 1}"#, 1, &[]);
    assert_eq!(src.reading().await.value, 1.0);

    broker.kill();
    wait_for("disconnect noticed", || !src.stats.is_connected()).await;
    broker.restart();
    // The restarted broker has no session (persistence false): the source resubscribes.
    wait_for("reconnect", || {
        src.stats.reconnects.load(Ordering::Relaxed) >= 1
    })
    .await;
    src.subscribed().await;
    broker.publish("plant/a/b", br#"{"value": 2}"#, 1, &[]);
    assert_eq!(src.reading().await.value, 2.0);
    assert!(src.stats.connection_errors.load(Ordering::Relaxed) >= 1);
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_not_acked_while_the_channel_is_full_and_is_redelivered() {
    for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
        let broker = Mosquitto::start();
        let client_id = unique("slow");
        let v = if protocol == MqttProtocol::V5 {
            &["-V", "mqttv5"][..]
        } else {
            &[][..]
        };
        // A channel of one: each message's reading fills it, and its ack
        // waits for the durability marker behind it.
        let mut slow = Running::start_raw(config(&broker, &client_id, protocol), 1);
        slow.subscribed().await;
        let publish = |value: u32| {
            broker.publish(
                "plant/a/b",
                format!("{{\"value\": {value}}}").as_bytes(),
                1,
                v,
            )
        };
        publish(1);
        assert_eq!(slow.next_raw().await.reading_value(), Some(1.0));
        // 2 and 3 arrive while message 1 waits for its marker: a later batch.
        publish(2);
        publish(3);
        let marker = match slow.next_raw().await {
            IngestEvent::Durable(ack) => ack,
            other => panic!("expected the durability marker, got {other:?}"),
        };
        let acked = 1;
        // Not acked while its marker is not complete.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            slow.stats.acks.load(Ordering::Relaxed),
            0,
            "acked before durable"
        );
        marker.complete();
        wait_for("the first ack", || {
            slow.stats.acks.load(Ordering::Relaxed) == acked
        })
        .await;
        // Messages 2 and 3 now wait in the channel, their marker never completed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stats = Arc::clone(&slow.stats);
        slow.stop().await;
        assert_eq!(
            stats.acks.load(Ordering::Relaxed),
            acked,
            "only the durable message is acked"
        );

        // Same client id, persistent session: the broker redelivers the rest.
        let mut again = Running::start(config(&broker, &client_id, protocol), 16);
        let mut values = Vec::new();
        for _ in acked..3 {
            values.push(again.reading().await.value);
        }
        values.sort_by(f64::total_cmp);
        let rest: Vec<f64> = (acked + 1..=3).map(|v| v as f64).collect();
        assert_eq!(values, rest, "{protocol:?}");
        wait_for("acks after redelivery", || {
            again.stats.acks.load(Ordering::Relaxed) == 3 - acked
        })
        .await;
        again.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let broker = Mosquitto::start_with(Options {
        tls: true,
        ..Options::default()
    });
    let mut cfg = config(&broker, &unique("tls"), MqttProtocol::V4);
    cfg.tls = Some(MqttTlsConfig {
        ca_file: broker.ca_file.clone().expect("ca file"),
        client_cert_file: None,
        client_key_file: None,
    });
    let mut src = Running::start(cfg, 8);
    src.subscribed().await;
    broker.publish("plant/a/b", br#"{"value": 42}"#, 1, &[]);
    assert_eq!(src.reading().await.value, 42.0);
    src.stop().await;
}

fn embedded_config() -> BrokerConfig {
    let mut cfg = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.subscriptions = vec![
        SubscriptionConfig::new("plant/+/state", PayloadFormat::JsonMulti),
        SubscriptionConfig::new("plant/+/+", PayloadFormat::Json),
    ];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_feeds_readings_from_a_rumqttc_publisher() {
    init_logs();
    let broker = EmbeddedBroker::start(&embedded_config()).expect("embedded broker starts");
    let addr = broker.local_addr();
    assert_ne!(addr.port(), 0);
    let stats = broker.stats();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let reader = tokio::spawn(broker.run(tx, shutdown.clone()));

    let mut options = rumqttc::MqttOptions::new(unique("pub"), "127.0.0.1", addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let pump = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
        .publish(
            "plant/boiler-3/temp",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"ts": 1700000000000, "value": 180.5, "unit": "degC"}"#,
        )
        .await
        .unwrap();
    client
        .publish(
            "plant/env-1/state",
            rumqttc::QoS::AtMostOnce,
            false,
            r#"{"ts": 1700000001000, "humidity": 45, "ambient": 22}"#,
        )
        .await
        .unwrap();
    client
        .publish(
            "plant/boiler-3/temp",
            rumqttc::QoS::AtLeastOnce,
            false,
            "{oops",
        )
        .await
        .unwrap();

    let mut got = Vec::new();
    while got.len() < 4 {
        let e = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("event within 20 s")
            .expect("open");
        match e {
            // Stands in for the journal commit: the PUBACK may go out now.
            IngestEvent::Durable(ack) => ack.complete(),
            e => got.push(e),
        }
    }
    let reading = |i: usize| match &got[i] {
        IngestEvent::Reading(r, _) => r.clone(),
        other => panic!("expected a reading, got {other:?}"),
    };
    assert_eq!(reading(0).series, SeriesKey::new("boiler-3", "temp"));
    assert_eq!(
        (reading(0).time_ms, reading(0).value),
        (1_700_000_000_000, 180.5)
    );
    assert_eq!(reading(1).series, SeriesKey::new("env-1", "humidity"));
    assert_eq!(reading(2).series, SeriesKey::new("env-1", "ambient"));
    assert!(
        matches!(&got[3], IngestEvent::DeadLetter(d) if d.reason == DeadLetterReason::Malformed)
    );
    assert_eq!(stats.messages.load(Ordering::Relaxed), 3);
    assert_eq!(stats.dead_letters(DeadLetterReason::Malformed), 1);
    assert!(stats.is_connected());

    shutdown.cancel();
    tokio::time::timeout(WAIT, reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    pump.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_on_a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = embedded_config();
    cfg.listen = taken.local_addr().unwrap();
    let err = EmbeddedBroker::start(&cfg).expect_err("port in use");
    assert!(matches!(err, BrokerError::Bind { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&cfg.listen.to_string()), "{text}");
    assert!(text.to_lowercase().contains("in use"), "{text}");
}

trait ReadingValue {
    fn reading_value(&self) -> Option<f64>;
}

impl ReadingValue for IngestEvent {
    fn reading_value(&self) -> Option<f64> {
        match self {
            IngestEvent::Reading(r, _) => Some(r.value),
            _ => None,
        }
    }
}
