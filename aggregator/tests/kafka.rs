#![allow(clippy::unwrap_used)]
//! The Kafka writer against a real Kafka-compatible broker (tansu, started by
//! `scripts/kafka-peer.sh`), checked with an independent client
//! (`scripts/kafka-read.py`, confluent-kafka).
//!
//! Needs: cargo (to build tansu once into `$HOME/.cache/millrace-tools`),
//! python3 with venv (confluent-kafka is installed into
//! `$MILLRACE_VENV` or `$HOME/.cache/millrace-venv` on first use).

mod util;

use hyper::StatusCode;
use millrace_protocol::{Batch, Envelope};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use util::*;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// A tansu broker on loopback; stopped on drop, even when the test fails.
struct Broker {
    dir: PathBuf,
    port: u16,
}

impl Broker {
    fn start(dir: &Path, port: Option<u16>) -> Self {
        let mut command = Command::new(script("kafka-peer.sh"));
        command.arg("start").arg(dir);
        if let Some(port) = port {
            command.arg(port.to_string());
        }
        let output = command.output().expect("running scripts/kafka-peer.sh");
        assert!(
            output.status.success(),
            "scripts/kafka-peer.sh start failed (the Kafka test needs tansu; see the script): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let port = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("kafka-peer.sh prints the port");
        Self {
            dir: dir.to_owned(),
            port,
        }
    }

    fn stop(&self) {
        let status = Command::new(script("kafka-peer.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status()
            .expect("running scripts/kafka-peer.sh stop");
        assert!(status.success());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- tail of tansu.log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = Command::new(script("kafka-peer.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Every record of `topic` as read by confluent-kafka.
fn read_topic(port: u16, topic: &str) -> Vec<serde_json::Value> {
    let output = Command::new("python3")
        .arg(script("kafka-read.py"))
        .args(["--brokers", &format!("127.0.0.1:{port}"), "--topic", topic])
        .args(["--idle-timeout", "2"])
        .output()
        .expect("running scripts/kafka-read.py");
    assert!(
        output.status.success(),
        "kafka-read.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `seq -> times seen` of gw-1's records in `topic`.
fn seq_counts(records: &[serde_json::Value]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for r in records {
        assert_eq!(r["headers"]["agent"], "gw-1");
        let seq: u64 = r["headers"]["seq"].as_str().unwrap().parse().unwrap();
        *counts.entry(seq).or_insert(0) += 1;
    }
    counts
}

async fn wait_healthy(server: &Server, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = healthz(server.addr).await.status;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A tansu broker, an aggregator config writing to it (with this
/// `message-timeout`) and an aggregator serving it, healthy.
async fn start_with_kafka(
    message_timeout: &str,
) -> (
    tempfile::TempDir,
    Broker,
    millrace_aggregator::config::Config,
    Server,
) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("tansu"), None);
    let config = parse_config(&config_text(
        &tmp.path().join("agg"),
        "",
        &format!(
            "[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"{message_timeout}\"\n",
            broker.port
        ),
    ));
    let server = Server::start(&config).await;
    wait_healthy(&server, StatusCode::OK).await;
    (tmp, broker, config, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_in_kafka_once_and_outage_answers_503() {
    let (tmp, broker, _config, server) = start_with_kafka("3s").await;

    let mut first = batch("gw-1", &[1, 2, 3], 1);
    first.records.push(Envelope {
        seq: 4,
        record: dead_letter("plant/line1/temp"),
    });
    let reply = post_batch(server.addr, TOKEN_1, &first).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    assert_eq!(
        reply.json,
        serde_json::json!({"committed": 4, "duplicates": 0})
    );
    let again = post_batch(server.addr, TOKEN_1, &first).await;
    assert_eq!(
        again.json,
        serde_json::json!({"committed": 0, "duplicates": 4})
    );

    let windows = read_topic(broker.port, "millrace.windows");
    assert_eq!(
        seq_counts(&windows),
        BTreeMap::from([(1, 1), (2, 1), (3, 1)])
    );
    let w = &windows[0];
    assert_eq!(w["key"], "press-1/temp");
    assert_eq!(w["headers"]["kind"], "window");
    assert_eq!(
        w["headers"]["wire-version"],
        millrace_protocol::WIRE_VERSION.to_string()
    );
    assert_eq!(w["value"]["series"]["sensor"], "temp");
    assert_eq!(
        w["value"]["end_ms"].as_i64().unwrap() - w["value"]["start_ms"].as_i64().unwrap(),
        5_000
    );
    let dead = read_topic(broker.port, "millrace.dead-letters");
    assert_eq!(seq_counts(&dead), BTreeMap::from([(4, 1)]));
    assert_eq!(dead[0]["key"], "plant/line1/temp");
    assert_eq!(dead[0]["value"]["reason"], "malformed");

    // Broker down: the batch is not acknowledged.
    broker.stop();
    let down: Batch = batch("gw-1", &[5], 5);
    let reply = post_batch(server.addr, TOKEN_1, &down).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.json
    );
    assert!(reply.headers.contains_key("retry-after"));
    wait_healthy(&server, StatusCode::SERVICE_UNAVAILABLE).await;

    // Broker back on the same port and store: the agent's retry succeeds.
    let broker = Broker::start(&tmp.path().join("tansu"), Some(broker.port));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let reply = post_batch(server.addr, TOKEN_1, &down).await;
        if reply.status == StatusCode::OK {
            assert_eq!(
                reply.json,
                serde_json::json!({"committed": 1, "duplicates": 0})
            );
            break;
        }
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.json
        );
        assert!(
            Instant::now() < deadline,
            "still 503 after the broker came back: {}",
            reply.json
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_healthy(&server, StatusCode::OK).await;
    let windows = read_topic(broker.port, "millrace.windows");
    assert_eq!(
        seq_counts(&windows),
        BTreeMap::from([(1, 1), (2, 1), (3, 1), (5, 1)])
    );
    server.stop().await;
}

/// A crash between Kafka's acknowledgement and the dedup save: the records
/// are in Kafka, the saved state does not list them. The next start reads
/// Kafka back from the saved frontier, so the agent's resend is recognised
/// and nothing lands twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_kafka_ack_is_reconciled_at_start() {
    use millrace_aggregator::config::SinkConfig;
    use millrace_aggregator::log::kafka::KafkaWriter;
    use millrace_aggregator::log::{LogRecord, LogWriter};

    let (tmp, broker, config, server) = start_with_kafka("5s").await;
    let first = batch("gw-1", &[1, 2, 3], 1);
    assert_eq!(
        post_batch(server.addr, TOKEN_1, &first).await.status,
        StatusCode::OK
    );
    server.stop().await;

    // The crashed run: batch 4–6 written to Kafka and acknowledged, then
    // the process died before its dedup state was saved.
    let crashed = batch("gw-1", &[4, 5, 6], 4);
    let SinkConfig::Kafka(kafka) = &config.sink else {
        panic!("a kafka config")
    };
    let writer = KafkaWriter::new(kafka.clone(), config.topics.clone()).unwrap();
    let records = crashed
        .records
        .iter()
        .map(|e| LogRecord::from_envelope(&config.topics, "gw-1", crashed.version, e).unwrap())
        .collect();
    writer.write(records).await.unwrap();
    writer.close().await;
    drop(writer);

    // The restart reads Kafka back; the agent resends 4–6 with a new 7.
    let server = Server::start(&config).await;
    let resend = batch("gw-1", &[4, 5, 6, 7], 4);
    let reply = post_batch(server.addr, TOKEN_1, &resend).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    assert_eq!(
        reply.json,
        serde_json::json!({"committed": 1, "duplicates": 3})
    );
    server.stop().await;

    // And the next start reads only from the new frontier, finding nothing new.
    let server = Server::start(&config).await;
    let again = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[7, 8], 7)).await;
    assert_eq!(
        again.json,
        serde_json::json!({"committed": 1, "duplicates": 1})
    );
    server.stop().await;

    let windows = read_topic(broker.port, "millrace.windows");
    assert_eq!(
        seq_counts(&windows),
        (1..=8).map(|s| (s, 1)).collect::<BTreeMap<u64, usize>>(),
        "every seq once in Kafka"
    );
    // The saved frontier is the end of the windows partition (offsets 0–7).
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("agg/dedup/gw-1.json")).unwrap())
            .unwrap();
    assert_eq!(state["log-marks"]["millrace.windows/0"], 8, "{state}");
}

/// With the brokers unreachable at start-up the read back gives up (logged
/// and counted) and the aggregator still comes up, answering 503 until
/// Kafka is there: it must not crash-loop under systemd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_at_start_still_serves_and_answers_503() {
    let tmp = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = parse_config(&config_text(
        &tmp.path().join("agg"),
        "",
        &format!("[kafka]\nbrokers = \"127.0.0.1:{port}\"\nmessage-timeout = \"2s\"\n"),
    ));
    let server = tokio::time::timeout(Duration::from_secs(120), Server::start(&config))
        .await
        .expect("the aggregator starts while Kafka is down");
    assert_eq!(
        healthz(server.addr).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1], 1)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.json
    );
    server.stop().await;
}
