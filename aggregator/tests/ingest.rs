#![allow(clippy::unwrap_used)]
//! The ingest HTTP contract against a real server on 127.0.0.1, with the
//! embedded log.

mod util;

use futures::future::BoxFuture;
use hyper::{Method, StatusCode};
use millrace_aggregator::log::local::TopicReader;
use millrace_aggregator::log::{Health, LogError, LogRecord, LogWriter, WriteReceipt};
use millrace_protocol::{Envelope, Record};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use util::*;

/// `(agent header, seq header)` of every record in `topic` of the embedded log.
fn logged(log_dir: &Path, topic: &str) -> Vec<(String, u64)> {
    let Ok(reader) = TopicReader::open(log_dir, topic) else {
        return Vec::new();
    };
    let mut cursor = reader.cursor(0).unwrap();
    let mut out = Vec::new();
    while let Some(record) = cursor.next_record().unwrap() {
        let header = |name: &str| {
            let (_, v) = record.headers.iter().find(|(n, _)| n == name).unwrap();
            String::from_utf8(v.clone()).unwrap()
        };
        out.push((header("agent"), header("seq").parse().unwrap()));
    }
    out
}

fn seqs_of(log_dir: &Path, topic: &str) -> Vec<u64> {
    logged(log_dir, topic).into_iter().map(|(_, s)| s).collect()
}

#[tokio::test]
async fn unauthorized_requests_get_401() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    let body = batch("gw-1", &[1], 1).encode_binary();

    let no_auth = request(
        server.addr,
        Method::POST,
        "/api/v1/ingest",
        &[("content-type", "application/x-millrace-batch")],
        body.clone(),
    )
    .await;
    assert_eq!(no_auth.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_auth.headers["www-authenticate"], "Bearer");

    let wrong = post_batch(
        server.addr,
        "not-a-configured-token",
        &batch("gw-1", &[1], 1),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    // gw-2's token cannot send gw-1's batch.
    let other = post_batch(server.addr, TOKEN_2, &batch("gw-1", &[1], 1)).await;
    assert_eq!(other.status, StatusCode::UNAUTHORIZED);
    assert!(other.json["error"].as_str().unwrap().contains("agent"));

    // A valid token for an agent id that is not configured.
    let unknown = post_batch(server.addr, TOKEN_1, &batch("gw-9", &[1], 1)).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);

    assert!(seqs_of(&tmp.path().join("log"), "millrace.windows").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn oversize_bodies_get_413_also_after_decompression() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "max-body = \"16KiB\"", ""));
    let server = Server::start(&config).await;
    let auth = format!("Bearer {TOKEN_1}");

    let big = request(
        server.addr,
        Method::POST,
        "/api/v1/ingest",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        vec![b' '; 17 << 10],
    )
    .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);

    // 1 MiB of JSON whitespace compresses to about 1 KiB.
    let mut plain = batch("gw-1", &[1], 1).encode_json();
    plain.extend(std::iter::repeat_n(b' ', 1 << 20));
    let bomb = gzip(&plain);
    assert!(bomb.len() < 16 << 10);
    let reply = request(
        server.addr,
        Method::POST,
        "/api/v1/ingest",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        bomb,
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(seqs_of(&tmp.path().join("log"), "millrace.windows").is_empty());
    server.stop().await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn invalid_batches_get_a_status_and_scope_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    let auth = format!("Bearer {TOKEN_1}");
    let post = |content_type: &'static str, body: Vec<u8>| {
        let auth = auth.clone();
        let addr = server.addr;
        async move {
            request(
                addr,
                Method::POST,
                "/api/v1/ingest",
                &[("authorization", &auth), ("content-type", content_type)],
                body,
            )
            .await
        }
    };

    let garbage = post(
        "application/x-millrace-batch",
        b"definitely not a batch".to_vec(),
    )
    .await;
    // Batch-level faults: the records may be fine, the agent keeps them.
    assert_eq!(garbage.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        garbage.json["error"].as_str().unwrap().contains("magic"),
        "{}",
        garbage.json
    );
    assert_eq!(garbage.json["scope"], "batch");

    let mut corrupt = batch("gw-1", &[1, 2], 1).encode_binary();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let reply = post("application/x-millrace-batch", corrupt).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.json["error"].as_str().unwrap().contains("checksum"));
    assert_eq!(reply.json["scope"], "batch");

    // A newer wire version than this aggregator reads.
    let mut newer = batch("gw-1", &[1, 2], 1).encode_binary();
    newer[4] = 99;
    let reply = post("application/x-millrace-batch", newer).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.json
    );
    assert!(
        reply.json["error"].as_str().unwrap().contains("version"),
        "{}",
        reply.json
    );
    assert_eq!(reply.json["scope"], "batch");

    let mut unordered = batch("gw-1", &[1, 2], 1);
    unordered.records.swap(0, 1);
    let reply = post("application/json", unordered.encode_json()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.json["error"].as_str().unwrap().contains("seq"));
    assert_eq!(reply.json["scope"], "record");

    let reply = post("text/plain", batch("gw-1", &[1], 1).encode_json()).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply.json["scope"], "batch");
    assert!(reply.json["error"]
        .as_str()
        .unwrap()
        .contains("Content-Type"));

    assert!(seqs_of(&tmp.path().join("log"), "millrace.windows").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn committed_batch_is_written_once_and_resend_is_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    let log_dir = tmp.path().join("log");

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
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(
        again.json,
        serde_json::json!({"committed": 0, "duplicates": 4})
    );

    assert_eq!(seqs_of(&log_dir, "millrace.windows"), vec![1, 2, 3]);
    assert_eq!(seqs_of(&log_dir, "millrace.dead-letters"), vec![4]);

    // Layout of a logged record: key, headers, value.
    let reader = TopicReader::open(&log_dir, "millrace.windows").unwrap();
    let record = reader.cursor(0).unwrap().next_record().unwrap().unwrap();
    assert_eq!(record.key, b"press-1/temp");
    let names: Vec<&str> = record.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["agent", "seq", "wire-version", "kind"]);
    let Record::Window(sent) = &first.records[0].record else {
        unreachable!()
    };
    let stored: millrace_protocol::Window = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(&stored, sent);

    // JSON with gzip is accepted too, and agents are deduplicated separately.
    let auth = format!("Bearer {TOKEN_2}");
    let reply = request(
        server.addr,
        Method::POST,
        "/api/v1/ingest",
        &[
            ("authorization", &auth),
            ("content-type", "application/json; charset=utf-8"),
            ("content-encoding", "gzip"),
        ],
        gzip(&batch("gw-2", &[1, 2], 1).encode_json()),
    )
    .await;
    assert_eq!(
        reply.json,
        serde_json::json!({"committed": 2, "duplicates": 0})
    );
    assert_eq!(logged(&log_dir, "millrace.windows").len(), 5);

    let stats = server.aggregator_stats.stats();
    assert_eq!(stats.records_committed.load(Ordering::Relaxed), 6);
    assert_eq!(stats.records_duplicate.load(Ordering::Relaxed), 4);
    server.stop().await;
}

#[tokio::test]
async fn out_of_order_batches_are_deduplicated_by_set() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    let log_dir = tmp.path().join("log");

    // An alert batch overtakes the backlog 1..=9.
    let alert = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[10, 11], 1)).await;
    assert_eq!(alert.json["committed"], 2);
    let backlog = post_batch(
        server.addr,
        TOKEN_1,
        &batch("gw-1", &[1, 2, 3, 4, 5, 6, 7, 8, 9], 1),
    )
    .await;
    assert_eq!(
        backlog.json,
        serde_json::json!({"committed": 9, "duplicates": 0})
    );
    // A mixed resend: 5 and 11 are known, 12 is new.
    let mixed = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[5, 11, 12], 5)).await;
    assert_eq!(
        mixed.json,
        serde_json::json!({"committed": 1, "duplicates": 2})
    );

    // Gaps stay open until filled or floored: 20 arrives before 13..19.
    let ahead = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[20], 13)).await;
    assert_eq!(ahead.json["committed"], 1);
    let gap = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[13, 14], 13)).await;
    assert_eq!(gap.json["committed"], 2);
    // The agent abandoned 15..=19 (floor 21): a late copy of 17 is not written.
    let floor = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[21], 21)).await;
    assert_eq!(floor.json["committed"], 1);
    let late = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[17], 17)).await;
    assert_eq!(
        late.json,
        serde_json::json!({"committed": 0, "duplicates": 1})
    );

    let mut seqs = seqs_of(&log_dir, "millrace.windows");
    let written = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), written, "a seq was written twice");
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 20, 21]
    );

    // The saved state is compact: everything collapsed into the floor.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("dedup/gw-1.json")).unwrap())
            .unwrap();
    assert_eq!(state["committed"]["floor"], 22);
    assert_eq!(state["committed"]["ranges"], serde_json::json!([]));
    server.stop().await;
}

#[tokio::test]
async fn restart_keeps_the_dedup_state() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let log_dir = tmp.path().join("log");

    let server = Server::start(&config).await;
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[7, 8], 1)).await;
    assert_eq!(reply.json["committed"], 2);
    server.stop().await;

    let server = Server::start(&config).await;
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[7, 8, 9], 1)).await;
    assert_eq!(
        reply.json,
        serde_json::json!({"committed": 1, "duplicates": 2})
    );
    assert_eq!(seqs_of(&log_dir, "millrace.windows"), vec![7, 8, 9]);
    assert_eq!(healthz(server.addr).await.status, StatusCode::OK);
    server.stop().await;
}

/// A log writer that fails its first `failures` writes, then writes to the
/// embedded log.
#[derive(Debug)]
struct Flaky {
    failures: AtomicU32,
    inner: millrace_aggregator::log::local::LocalLogWriter,
}

impl LogWriter for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn write(&self, records: Vec<LogRecord>) -> BoxFuture<'_, Result<WriteReceipt, LogError>> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(LogError::Task("broker gone".into())) });
        }
        self.inner.write(records)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        let healthy = self.failures.load(Ordering::SeqCst) == 0;
        Box::pin(async move {
            if healthy {
                Health::Healthy
            } else {
                Health::Unhealthy("broker gone".into())
            }
        })
    }
}

#[tokio::test]
async fn log_failure_answers_503_and_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "retry-after = \"7s\"", ""));
    let log_dir = tmp.path().join("log");
    let (inner, _) = millrace_aggregator::log::local::LocalLogWriter::open(
        &log_dir,
        &config.topics,
        1 << 20,
        Default::default(),
    )
    .unwrap();
    let flaky = Arc::new(Flaky {
        failures: AtomicU32::new(1),
        inner,
    });
    let server = Server::start_with_log(&config, flaky).await;

    let health = healthz(server.addr).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1, 2], 1)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "7");

    // The retry is written: the failed attempt did not mark anything committed.
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1, 2], 1)).await;
    assert_eq!(
        reply.json,
        serde_json::json!({"committed": 2, "duplicates": 0})
    );
    assert_eq!(seqs_of(&log_dir, "millrace.windows"), vec![1, 2]);
    assert_eq!(healthz(server.addr).await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn tail_prints_json_lines_with_offset_key_and_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1, 2], 1)).await;
    server.stop().await;

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_millrace-aggregator"))
        .arg("tail")
        .arg("--log-dir")
        .arg(tmp.path().join("log"))
        .arg("millrace.windows")
        .arg("--from-beginning")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["offset"], 1);
    assert_eq!(lines[1]["key"], "press-1/temp");
    assert_eq!(lines[1]["headers"]["seq"], "2");
    assert_eq!(lines[1]["headers"]["kind"], "window");
    assert_eq!(lines[1]["value"]["mean"], 2.0);
}

#[test]
fn check_config_names_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, config_text(tmp.path(), "max-body = \"lots\"", "")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_millrace-aggregator"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("max-body"),
        "{stderr}"
    );

    let good = tmp.path().join("good.toml");
    std::fs::write(&good, config_text(tmp.path(), "", "")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_millrace-aggregator"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains(TOKEN_1));
}

#[tokio::test]
async fn a_batch_over_max_batch_records_gets_413_for_the_agent_to_split() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "max-batch-records = 2", ""));
    let server = Server::start(&config).await;
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1, 2, 3], 1)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json["scope"], "record");
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .contains("3 records exceeds max-batch-records of 2"),
        "{}",
        reply.json
    );
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1, 2], 1)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        seqs_of(&tmp.path().join("log"), "millrace.windows"),
        vec![1, 2]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_record_with_an_overlong_or_control_character_name_is_refused_by_record() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "max-name-bytes = 32", ""));
    let server = Server::start(&config).await;
    for (sensor, expected) in [
        (
            "s".repeat(33),
            "sensor of 33 bytes exceeds max-name-bytes of 32",
        ),
        ("temp\u{1b}[2J".to_owned(), "control character"),
    ] {
        let records = vec![Envelope {
            seq: 1,
            record: window("gw-1", &sensor, 1_700_000_000_000, 1.0),
        }];
        let reply = post_batch(
            server.addr,
            TOKEN_1,
            &millrace_protocol::Batch::new("gw-1", records),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.json["scope"], "record");
        let error = reply.json["error"].as_str().unwrap();
        assert!(
            error.contains(expected) && error.contains("seq 1"),
            "{error}"
        );
    }
    assert!(seqs_of(&tmp.path().join("log"), "millrace.windows").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "body-timeout = \"1s\"", ""));
    let server = Server::start(&config).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Promises 1000 bytes, sends 10, then nothing.
    let head = format!(
        "POST /api/v1/ingest HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {TOKEN_1}\r\n\
         content-type: application/x-millrace-batch\r\ncontent-length: 1000\r\n\r\n0123456789",
        server.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn an_agent_over_its_rate_limit_gets_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(
        tmp.path(),
        "agent-rate-limit = 3\nmax-batch-records = 3",
        "",
    ));
    let server = Server::start(&config).await;
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[1, 2, 3], 1)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the burst takes one full batch"
    );
    let reply = post_batch(server.addr, TOKEN_1, &batch("gw-1", &[4, 5, 6], 4)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json["scope"], "batch");
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Another agent has its own bucket.
    let reply = post_batch(server.addr, TOKEN_2, &batch("gw-2", &[1], 1)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        seqs_of(&tmp.path().join("log"), "millrace.windows"),
        vec![1, 2, 3, 1]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_record_claiming_another_agent_is_refused_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    // gw-1's token, a batch of gw-1 whose second window says it is gw-2's.
    let records = vec![
        Envelope {
            seq: 1,
            record: window("gw-1", "temp", 1_700_000_000_000, 1.0),
        },
        Envelope {
            seq: 2,
            record: window("gw-2", "temp", 1_700_000_000_000, 99.0),
        },
    ];
    let spoofed = millrace_protocol::Batch::new("gw-1", records);
    let reply = post_batch(server.addr, TOKEN_1, &spoofed).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json["scope"], "record");
    let error = reply.json["error"].as_str().unwrap();
    assert!(error.contains("seq 2 claims agent `gw-2`"), "{error}");
    let stats = server.aggregator_stats.stats();
    assert_eq!(stats.spoofed_records.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rejected_spoofed.load(Ordering::Relaxed), 1);
    assert!(seqs_of(&tmp.path().join("log"), "millrace.windows").is_empty());
    // The honest record alone goes through (the agent finds it by splitting).
    let honest = millrace_protocol::Batch::new("gw-1", spoofed.records[..1].to_vec());
    assert_eq!(
        post_batch(server.addr, TOKEN_1, &honest).await.status,
        StatusCode::OK
    );
    assert_eq!(
        logged(&tmp.path().join("log"), "millrace.windows"),
        vec![("gw-1".to_owned(), 1)]
    );
    server.stop().await;
}
