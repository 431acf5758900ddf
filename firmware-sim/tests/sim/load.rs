//! Load mode against a real mosquitto broker.

use std::time::Duration;

use millrace_sim::load::{run_load, LoadOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::util::Mosquitto;

fn options(port: u16, per_message: usize) -> LoadOptions {
    LoadOptions {
        broker_host: "127.0.0.1".to_owned(),
        broker_port: port,
        rate: 2_000.0,
        series: 20,
        devices: 4,
        per_message,
        duration: Duration::from_millis(1500),
        topic_prefix: "load".to_owned(),
        qos: QoS::AtLeastOnce,
        seed: 3,
        inflight: 100,
        queue_capacity: 256,
        connect_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(10),
    }
}

async fn run_and_capture(
    per_message: usize,
) -> (millrace_sim::load::LoadReport, Vec<(String, Value)>) {
    let broker = Mosquitto::start();
    let mut sub_options = MqttOptions::new("load-sub", "127.0.0.1", broker.port);
    sub_options.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut events) = AsyncClient::new(sub_options, 100);
    sub.subscribe("load/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let collector = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(6), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                    got.push((
                        p.topic.clone(),
                        serde_json::from_slice::<Value>(&p.payload).unwrap(),
                    ));
                }
            }
        })
        .await;
        got
    });
    let report = run_load(options(broker.port, per_message), CancellationToken::new())
        .await
        .unwrap();
    let got = collector.await.unwrap();
    (report, got)
}

#[tokio::test]
async fn batches_are_delivered_and_counted() {
    let (report, got) = run_and_capture(10).await;
    assert!(report.messages_sent > 0);
    assert_eq!(report.readings_sent, report.messages_sent * 10);
    // Open-loop pacing never runs ahead of the target.
    assert!(
        report.readings_sent as f64 <= 2_000.0 * 1.5 + 10.0,
        "{report:?}"
    );
    assert_eq!(report.messages_acked, report.messages_sent, "{report:?}");
    assert_eq!(
        got.len() as u64,
        report.messages_sent,
        "subscriber saw every message"
    );
    for (topic, v) in &got {
        let parts: Vec<&str> = topic.split('/').collect();
        assert_eq!(parts.len(), 3, "{topic}");
        assert_eq!((parts[0], parts[2]), ("load", "batch"));
        assert!(parts[1].starts_with("load-dev-"));
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), 10);
        for item in items {
            assert!(item["series"].as_str().unwrap().starts_with('s'));
            assert!(item["ts"].is_i64());
            assert!(item["value"].is_f64());
        }
    }
}

#[tokio::test]
async fn single_readings_use_the_plant_shape() {
    let (report, got) = run_and_capture(1).await;
    assert_eq!(report.readings_sent, report.messages_sent);
    assert_eq!(got.len() as u64, report.messages_sent);
    for (topic, v) in &got {
        assert!(topic.starts_with("load/load-dev-"), "{topic}");
        assert!(!topic.ends_with("/batch"));
        assert!(v["ts"].is_i64() && v["value"].is_f64(), "{v}");
    }
}
