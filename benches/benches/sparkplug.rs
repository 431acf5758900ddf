//! What decoding a Sparkplug B reading costs: NDATA messages of 100 edge
//! nodes, 10 metrics each named by alias (the common case after a BIRTH),
//! through the same `Decoder` the MQTT sources use, on one thread's CPU
//! time. Sequence numbers run in step, so no rebirth is ever asked for.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace_agent::ingest::decode::sparkplug::proto;
use millrace_agent::ingest::decode::{Decoder, PayloadFormat, SubscriptionConfig};
use millrace_agent::ingest::{Delivery, IngestEvent};
use millrace_benches::thread_cpu_time;
use prost::Message as _;
use std::hint::black_box;
use std::time::Duration;

const NODES: usize = 100;
const METRICS: u64 = 10;
const NOW: i64 = 1_700_000_000_000;

fn encode(seq: u64, metrics: Vec<proto::Metric>) -> Vec<u8> {
    proto::Payload {
        timestamp: Some(NOW as u64),
        seq: Some(seq),
        metrics,
        ..Default::default()
    }
    .encode_to_vec()
}

fn sparkplug_decode(c: &mut Criterion) {
    let sub = SubscriptionConfig::new("spBv1.0/#", PayloadFormat::SparkplugB);
    let mut decoder = Decoder::new(&[sub], 1 << 20, "bench").expect("valid rule");
    let mut out: Vec<IngestEvent> = Vec::with_capacity(1 << 16);
    let topic = |kind: &str, n: usize| format!("spBv1.0/plant-a/{kind}/edge-{n}");
    for n in 0..NODES {
        let metrics = (1..=METRICS)
            .map(|a| proto::Metric {
                name: Some(format!("Line/Sensor-{a}")),
                alias: Some(a),
                datatype: Some(10),
                value: Some(proto::Value::Double(a as f64)),
                ..Default::default()
            })
            .collect();
        decoder.decode(
            &topic("NBIRTH", n),
            &encode(0, metrics),
            NOW,
            Delivery::Once,
            &mut out,
        );
    }
    out.clear();
    // One full sequence cycle per node: seq 1, 2, ..., 255, 0.
    let messages: Vec<(String, Vec<u8>)> = (1..=256u64)
        .flat_map(|s| {
            (0..NODES).map(move |n| {
                let metrics = (1..=METRICS)
                    .map(|a| proto::Metric {
                        alias: Some(a),
                        timestamp: Some((NOW + s as i64 * 100) as u64),
                        datatype: Some(10),
                        value: Some(proto::Value::Double(s as f64 + a as f64 / 10.0)),
                        ..Default::default()
                    })
                    .collect();
                (topic("NDATA", n), encode(s % 256, metrics))
            })
        })
        .collect();
    let readings = messages.len() as u64 * METRICS;
    // One cycle outside the measurement: every metric is a reading.
    let mut made = 0;
    for (topic, payload) in &messages {
        decoder.decode(topic, payload, NOW, Delivery::Once, &mut out);
        made += out
            .iter()
            .filter(|e| matches!(e, IngestEvent::Reading(..)))
            .count() as u64;
        out.clear();
    }
    assert_eq!(made, readings, "every metric decodes to a reading");

    let mut group = c.benchmark_group("sparkplug_decode");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(readings));
    group.bench_function("ndata_10_metrics_by_alias_100_nodes", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let started = thread_cpu_time();
                for (topic, payload) in &messages {
                    decoder.decode(topic, payload, NOW, Delivery::Once, &mut out);
                    black_box(out.len());
                    out.clear();
                }
                timed += thread_cpu_time() - started;
            }
            timed
        })
    });
    group.finish();
    assert!(decoder.take_commands().is_empty(), "no rebirth was needed");
}

criterion_group!(benches, sparkplug_decode);
criterion_main!(benches);
