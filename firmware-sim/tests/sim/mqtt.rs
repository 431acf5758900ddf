//! MQTT sensors publishing to a real mosquitto broker, read by a rumqttc subscriber.

use std::collections::BTreeMap;
use std::time::Duration;

use millrace_sim::config::SimConfig;
use millrace_sim::sim::{RunOptions, Simulation};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::util::{example_plant, Mosquitto};

async fn subscribe(port: u16, filter: &str) -> (AsyncClient, EventLoop) {
    let id = format!("test-sub-{}", crate::util::free_port());
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    // Wait for the subscription to be in place.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("no SUBACK from mosquitto");
    (client, eventloop)
}

/// Collects `(topic, payload)` for `duration`.
async fn collect(eventloop: &mut EventLoop, duration: Duration) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(duration, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                out.push((p.topic.clone(), p.payload.to_vec()));
            }
        }
    })
    .await;
    out
}

#[tokio::test]
async fn sensors_publish_the_documented_payloads() {
    let broker = Mosquitto::start();
    let (_sub, mut events) = subscribe(broker.port, "plant/#").await;
    let options = RunOptions {
        no_rtu: true,
        ..RunOptions::default()
    };
    let sim = Simulation::start(example_plant(broker.port), options)
        .await
        .unwrap();
    let messages = collect(&mut events, Duration::from_millis(2500)).await;
    let sim_value = |series: &str, ts: i64| sim.value_at(series, ts);

    let mut per_topic: BTreeMap<&str, usize> = BTreeMap::new();
    for (topic, payload) in &messages {
        *per_topic.entry(topic).or_default() += 1;
        let v: Value = serde_json::from_slice(payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        let ts = v["ts"]
            .as_i64()
            .unwrap_or_else(|| panic!("{topic}: no integer ts in {v}"));
        match topic.as_str() {
            "plant/boiler-3/temp" | "plant/boiler-3/steam-flow" => {
                let (series, unit) = if topic.ends_with("temp") {
                    ("boiler-3/temp", "degC")
                } else {
                    ("boiler-3/steam-flow", "t/h")
                };
                assert_eq!(ts % 100, 0, "readings are stamped on the 100 ms grid: {ts}");
                assert_eq!(v["unit"], unit);
                assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
                // Exact: the payload value is the signal at the payload's ts.
                assert_eq!(v["value"].as_f64(), sim_value(series, ts), "{topic} {v}");
            }
            "plant/env-1/state" => {
                assert_eq!(ts % 1000, 0);
                assert_eq!(v["humidity"].as_f64(), sim_value("env-1/humidity", ts));
                assert_eq!(v["ambient"].as_f64(), sim_value("env-1/ambient", ts));
                assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
            }
            other => panic!("unexpected topic {other}"),
        }
    }
    assert!(
        per_topic.get("plant/boiler-3/temp").copied().unwrap_or(0) >= 5,
        "{per_topic:?}"
    );
    assert!(
        per_topic
            .get("plant/boiler-3/steam-flow")
            .copied()
            .unwrap_or(0)
            >= 5,
        "{per_topic:?}"
    );
    assert!(
        per_topic.get("plant/env-1/state").copied().unwrap_or(0) >= 1,
        "{per_topic:?}"
    );
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn publishing_resumes_after_broker_restart() {
    let port = crate::util::free_port();
    let broker = Mosquitto::start_on(port);
    let mut plant = example_plant(port);
    plant.mqtt_sensors.truncate(1);
    let options = RunOptions {
        no_rtu: true,
        ..RunOptions::default()
    };
    let sim = Simulation::start(plant, options).await.unwrap();
    {
        let (_sub, mut events) = subscribe(port, "plant/#").await;
        assert!(!collect(&mut events, Duration::from_millis(500))
            .await
            .is_empty());
    }
    drop(broker);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _broker = Mosquitto::start_on(port);
    let (_sub, mut events) = subscribe(port, "plant/#").await;
    let resumed = collect(&mut events, Duration::from_secs(4)).await;
    assert!(
        !resumed.is_empty(),
        "no readings after the broker came back"
    );
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_rate_publishes_broken_payloads() {
    let broker = Mosquitto::start();
    let text = format!(
        r#"
[mqtt]
broker = "127.0.0.1:{}"
[[mqtt-sensor]]
topic = "plant/bad-1/temp"
interval = "50ms"
malformed-rate = 1.0
signal = {{ offset = 1.0 }}
"#,
        broker.port
    );
    let config = SimConfig::from_toml(&text, "bad.toml".as_ref()).unwrap();
    let (_sub, mut events) = subscribe(broker.port, "plant/#").await;
    let sim = Simulation::start(config, RunOptions::default())
        .await
        .unwrap();
    let messages = collect(&mut events, Duration::from_millis(1200)).await;
    sim.shutdown().await.unwrap();
    assert!(messages.len() >= 3, "{}", messages.len());
    for (_, payload) in messages {
        let valid = serde_json::from_slice::<Value>(&payload)
            .is_ok_and(|v| v["ts"].is_i64() && v["value"].is_f64());
        assert!(
            !valid,
            "a well-formed reading slipped through: {}",
            String::from_utf8_lossy(&payload)
        );
    }
}

#[tokio::test]
async fn a_sparkplug_node_births_sends_data_by_alias_and_rebirths_on_request() {
    use millrace_protocol::sparkplug::{proto, REBIRTH_METRIC};
    use prost::Message as _;

    let broker = Mosquitto::start();
    let (sub, mut events) = subscribe(broker.port, "spBv1.0/#").await;
    let mut plant = example_plant(broker.port);
    plant.mqtt_sensors.clear();
    assert_eq!(
        plant.sparkplug_nodes.len(),
        1,
        "the example plant has line-5"
    );
    let options = RunOptions {
        no_rtu: true,
        ..RunOptions::default()
    };
    let sim = Simulation::start(plant, options).await.unwrap();
    let decode = |payload: &[u8]| proto::Payload::decode(payload).expect("Sparkplug B");

    // Wait (on messages, not time) for the births and three DDATA.
    let mut seen: Vec<(String, proto::Payload)> = Vec::new();
    let wait = |seen: &Vec<(String, proto::Payload)>, topic: &str, n: usize| {
        seen.iter().filter(|(t, _)| t == topic).count() >= n
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !wait(&seen, "spBv1.0/plant-a/DDATA/line-5/filler", 3) {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("births and data within 15 s")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = event {
            seen.push((p.topic.clone(), decode(&p.payload)));
        }
    }
    let nbirth = &seen
        .iter()
        .find(|(t, _)| t == "spBv1.0/plant-a/NBIRTH/line-5")
        .expect("NBIRTH")
        .1;
    assert_eq!(nbirth.seq, Some(0));
    assert!(nbirth
        .metrics
        .iter()
        .any(|m| m.name.as_deref() == Some("bdSeq")));
    let dbirth = &seen
        .iter()
        .find(|(t, _)| t == "spBv1.0/plant-a/DBIRTH/line-5/filler")
        .expect("DBIRTH")
        .1;
    let names: Vec<_> = dbirth
        .metrics
        .iter()
        .map(|m| (m.name.clone().unwrap(), m.alias.unwrap()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("Fill/Level".to_string(), 1),
            ("Drive/Speed".to_string(), 2)
        ]
    );
    // DATA: aliases only, consecutive seq, values of the signal at the stamp.
    let mut last_seq = dbirth.seq.unwrap();
    for (_, data) in seen
        .iter()
        .filter(|(t, _)| t == "spBv1.0/plant-a/DDATA/line-5/filler")
    {
        assert_eq!(data.seq, Some((last_seq + 1) % 256));
        last_seq = data.seq.unwrap();
        for m in &data.metrics {
            assert_eq!(m.name, None);
            let name = if m.alias == Some(1) {
                "Fill/Level"
            } else {
                "Drive/Speed"
            };
            let ts = i64::try_from(m.timestamp.unwrap()).unwrap();
            let expected = sim.value_at(&format!("line-5.filler/{name}"), ts).unwrap();
            assert_eq!(m.value, Some(proto::Value::Double(expected)));
        }
    }

    // A host's Rebirth request: new BIRTHs, seq from 0 again.
    let rebirth = proto::Payload {
        metrics: vec![proto::Metric {
            name: Some(REBIRTH_METRIC.into()),
            datatype: Some(11),
            value: Some(proto::Value::Boolean(true)),
            ..Default::default()
        }],
        ..Default::default()
    };
    sub.publish(
        "spBv1.0/plant-a/NCMD/line-5",
        QoS::AtLeastOnce,
        false,
        rebirth.encode_to_vec(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("a new NBIRTH within 10 s")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = event {
            if p.topic == "spBv1.0/plant-a/NBIRTH/line-5" {
                assert_eq!(decode(&p.payload).seq, Some(0));
                break;
            }
        }
    }
    // Stopping is a death, with this run's bdSeq.
    sim.shutdown().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("an NDEATH within 10 s")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = event {
            if p.topic == "spBv1.0/plant-a/NDEATH/line-5" {
                let bd = |p: &proto::Payload| {
                    p.metrics
                        .iter()
                        .find(|m| m.name.as_deref() == Some("bdSeq"))
                        .and_then(|m| m.value.clone())
                };
                assert_eq!(bd(&decode(&p.payload)), bd(nbirth));
                break;
            }
        }
    }
}
