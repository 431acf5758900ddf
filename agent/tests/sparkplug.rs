//! Sparkplug B ingest against peers that are not ours: an edge node written
//! with the public `pysparkplug` library (`scripts/sparkplug-peer.py`)
//! publishing through mosquitto, read by the agent's MQTT source.

#![allow(clippy::unwrap_used)]

#[path = "util/mosquitto.rs"]
mod mosquitto;
mod peers;

use std::sync::atomic::Ordering;
use std::time::Duration;

use millrace_agent::ingest::decode::sparkplug::STATS;
use millrace_agent::ingest::decode::{PayloadFormat, SubscriptionConfig};
use millrace_agent::ingest::mqtt::{MqttConfig, MqttProtocol, MqttSource};
use millrace_agent::ingest::IngestEvent;
use millrace_protocol::{DeadLetterReason, Quality, Reading};
use mosquitto::Mosquitto;
use peers::SparkplugPeer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Agent {
    rx: mpsc::Receiver<IngestEvent>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), millrace_agent::ingest::mqtt::MqttError>>,
}

/// Logs to the test's captured output (`RUST_LOG` filters; default: info).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The source's events without its durability markers, which are completed
/// as they pass (as a pipeline with an instant journal would).
fn completing_markers(mut source_rx: mpsc::Receiver<IngestEvent>) -> mpsc::Receiver<IngestEvent> {
    let (out, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some(event) = source_rx.recv().await {
            match event {
                IngestEvent::Durable(ack) => ack.complete(),
                other => {
                    if out.send(other).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

impl Agent {
    /// The MQTT source on `spBv1.0/plant-a/#` as Sparkplug B, Rebirth
    /// requests allowed; durability markers completed at once.
    async fn start(broker: &Mosquitto, protocol: MqttProtocol) -> Self {
        init_logs();
        let id = format!("agent-{}-{}", std::process::id(), mosquitto::free_port());
        let mut config = MqttConfig::new("127.0.0.1", broker.port(), id);
        config.protocol = protocol;
        config.subscriptions = vec![SubscriptionConfig {
            commands: true,
            ..SubscriptionConfig::new("spBv1.0/plant-a/#", PayloadFormat::SparkplugB)
        }];
        let source = MqttSource::new(config).expect("valid config");
        let stats = source.stats();
        let (tx, source_rx) = mpsc::channel(1024);
        let rx = completing_markers(source_rx);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !stats.subscribed.load(Ordering::Relaxed) {
            assert!(tokio::time::Instant::now() < deadline, "not subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { rx, shutdown, task }
    }

    /// Events until `done` holds on them.
    async fn until(&mut self, mut done: impl FnMut(&[IngestEvent]) -> bool) -> Vec<IngestEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&events) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => events.push(e),
                Ok(None) => panic!("the source stopped"),
                Err(_) => panic!("condition not met within {WAIT:?}; got {events:#?}"),
            }
        }
        events
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("no error");
    }
}

fn reading<'a>(events: &'a [IngestEvent], device: &str, sensor: &str) -> Option<&'a Reading> {
    events.iter().rev().find_map(|e| match e {
        IngestEvent::Reading(r, _)
            if &*r.series.device == device && &*r.series.sensor == sensor =>
        {
            Some(r)
        }
        _ => None,
    })
}

fn has(events: &[IngestEvent], device: &str, sensor: &str, value: f64) -> bool {
    reading(events, device, sensor).is_some_and(|r| r.value == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_birth_then_data_by_alias_land_with_their_values_and_timestamps() {
    let broker = Mosquitto::start();
    let mut agent = Agent::start(&broker, MqttProtocol::V4).await;
    let mut node = SparkplugPeer::start(broker.port(), "plant-a", "edge-1", "plc-1");
    node.peer.command("birth");
    let events = agent
        .until(|ev| {
            has(ev, "edge-1.plc-1", "Level", -7.0) && has(ev, "edge-1", "Counters/Energy", 1234.0)
        })
        .await;
    // The BIRTH's values, each typed as the BIRTH said.
    assert!(has(&events, "edge-1", "Inputs/Temperature", 21.5));
    assert!(has(&events, "edge-1", "Inputs/Count", -3.0));
    assert!(has(&events, "edge-1", "Status/Running", 1.0));
    assert!(has(&events, "edge-1.plc-1", "Pressure", 6.25));
    // Strings and the control plane are not readings.
    assert!(reading(&events, "edge-1", "Status/Mode").is_none());
    assert!(reading(&events, "edge-1", "bdSeq").is_none());
    assert!(reading(&events, "edge-1", "Node Control/Rebirth").is_none());

    // DATA names its metrics by alias only; event time is the metric's.
    let ts = millrace_agent::ingest::now_ms() - 3_000;
    node.peer.command(&format!("ndata 1 22.75 {ts}"));
    node.peer.command("ddata 11 -9");
    node.peer.command("text");
    let events = agent
        .until(|ev| {
            has(ev, "edge-1", "Inputs/Temperature", 22.75) && has(ev, "edge-1.plc-1", "Level", -9.0)
        })
        .await;
    let t = reading(&events, "edge-1", "Inputs/Temperature").unwrap();
    assert_eq!(t.time_ms, ts);
    assert_eq!(t.quality, Quality::Good);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, IngestEvent::DeadLetter(_))),
        "{events:#?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_a_sequence_gap_gets_a_rebirth_request_seen_at_the_broker() {
    for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
        let broker = Mosquitto::start();
        let mut agent = Agent::start(&broker, protocol).await;
        let mut node = SparkplugPeer::start(broker.port(), "plant-a", "edge-2", "plc-1");
        node.peer.command("birth");
        agent
            .until(|ev| has(ev, "edge-2.plc-1", "Level", -7.0))
            .await;
        let gaps = STATS.seq_gaps.load(Ordering::Relaxed);
        node.peer.command("skip");
        node.peer.command("ndata 1 30.5");
        // The node receives the host's NCMD through mosquitto.
        node.peer
            .expect_line("ncmd Node Control/Rebirth=True", WAIT);
        assert!(STATS.seq_gaps.load(Ordering::Relaxed) > gaps);
        // The value of the message after the gap still counts; a rebirth
        // brings the node back in step.
        agent
            .until(|ev| has(ev, "edge-2", "Inputs/Temperature", 30.5))
            .await;
        node.peer.command("birth");
        node.peer.command("ndata 1 31.5");
        agent
            .until(|ev| has(ev, "edge-2", "Inputs/Temperature", 31.5))
            .await;
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_death_marks_series_stale_and_a_malformed_payload_is_a_dead_letter() {
    let broker = Mosquitto::start();
    let mut agent = Agent::start(&broker, MqttProtocol::V5).await;
    let mut node = SparkplugPeer::start(broker.port(), "plant-a", "edge-3", "plc-1");
    node.peer.command("birth");
    agent
        .until(|ev| has(ev, "edge-3.plc-1", "Level", -7.0))
        .await;
    let deaths = STATS.deaths.load(Ordering::Relaxed);
    node.peer.command("ndeath");
    // After the NDEATH, data (late or replayed) is stale until the next BIRTH.
    node.peer.command("ndata 1 40.5");
    let events = agent
        .until(|ev| has(ev, "edge-3", "Inputs/Temperature", 40.5))
        .await;
    assert_eq!(
        reading(&events, "edge-3", "Inputs/Temperature")
            .unwrap()
            .quality,
        Quality::Bad
    );
    assert!(STATS.deaths.load(Ordering::Relaxed) > deaths);

    // Not protobuf: one dead letter, and the source keeps reading.
    node.peer.command("raw NDATA 0a0b");
    let events = agent
        .until(|ev| ev.iter().any(|e| matches!(e, IngestEvent::DeadLetter(_))))
        .await;
    let letter = events
        .iter()
        .find_map(|e| match e {
            IngestEvent::DeadLetter(d) => Some(d),
            _ => None,
        })
        .unwrap();
    assert_eq!(letter.reason, DeadLetterReason::Malformed);
    assert_eq!(letter.origin, "spBv1.0/plant-a/NDATA/edge-3");
    assert_eq!(letter.input, vec![0x0a, 0x0b]);

    node.peer.command("birth");
    node.peer.command("ndata 1 41.5");
    let events = agent
        .until(|ev| has(ev, "edge-3", "Inputs/Temperature", 41.5))
        .await;
    assert_eq!(
        reading(&events, "edge-3", "Inputs/Temperature")
            .unwrap()
            .quality,
        Quality::Good
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_through_the_gateway_s_own_ingest_listener() {
    use millrace_agent::ingest::broker::{BrokerConfig, EmbeddedBroker};
    // The edge node publishes straight to the agent's device ingest.
    let mut cfg = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.subscriptions = vec![SubscriptionConfig::new(
        "spBv1.0/plant-a/#",
        PayloadFormat::SparkplugB,
    )];
    let broker = EmbeddedBroker::start(&cfg).unwrap();
    let port = broker.local_addr().port();
    let (tx, source_rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { broker.run(tx, token).await.unwrap() });
    let rx = completing_markers(source_rx);
    let mut agent = Agent {
        rx,
        shutdown: CancellationToken::new(),
        task: tokio::spawn(async { Ok(()) }),
    };
    let mut node = SparkplugPeer::start(port, "plant-a", "edge-4", "plc-1");
    node.peer.command("birth");
    node.peer.command("ddata 11 5");
    let events = agent
        .until(|ev| {
            has(ev, "edge-4", "Inputs/Temperature", 21.5) && has(ev, "edge-4.plc-1", "Level", 5.0)
        })
        .await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, IngestEvent::DeadLetter(_))),
        "{events:#?}"
    );
    drop(node);
    stop.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}
