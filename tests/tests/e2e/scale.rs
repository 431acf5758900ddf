//! The central side over time: the embedded log's retention.
//!
//! `scale_embedded_log_*`: the real `millrace-aggregator` with a tiny
//! segment size and a size retention, fed real wire batches over HTTP; the
//! log is read back with `millrace-aggregator tail --from-beginning`.

use millrace_protocol::{Batch, Envelope, Record, SeriesKey, Window};
use millrace_tests::{
    aggregator_tail, free_port, start_aggregator, wait_until_stable, write_aggregator_config,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

const AGENT: &str = "gw-scale";
const TOKEN: &str = "scale-test-token-0123456789";

/// One HTTP/1.1 request on a fresh connection; returns the status and body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

fn post_batch(port: u16, batch: &Batch) -> u16 {
    let auth = format!("Bearer {TOKEN}");
    http(
        port,
        "POST",
        "/api/v1/ingest",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-millrace-batch"),
        ],
        &batch.encode_binary(),
    )
    .0
}

/// `seqs` as windows of one series, 5 s apart.
fn batch(seqs: std::ops::Range<u64>) -> Batch {
    let records = seqs
        .map(|seq| Envelope {
            seq,
            record: Record::Window(Window {
                agent: AGENT.into(),
                series: SeriesKey::new("press-1", format!("reg-{:02}", seq % 20)),
                start_ms: 1_700_000_000_000 + seq as i64 * 5_000,
                end_ms: 1_700_000_000_000 + seq as i64 * 5_000 + 5_000,
                count: 5,
                mean: seq as f64,
                min: seq as f64 - 1.0,
                max: seq as f64 + 1.0,
                stddev: 0.5,
                first_event_ms: 1_700_000_000_000 + seq as i64 * 5_000,
                last_event_ms: 1_700_000_000_000 + seq as i64 * 5_000 + 4_000,
                unit: "bar".into(),
                score: None,
            }),
        })
        .collect();
    Batch::new(AGENT, records)
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = http(port, "GET", "/metrics", &[], b"");
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn seq_of(record: &serde_json::Value) -> u64 {
    record["headers"]["seq"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("record without a seq header: {record}"))
}

fn offsets_and_seqs(config: &Path) -> Vec<(u64, u64)> {
    aggregator_tail(config, "millrace.windows")
        .iter()
        .map(|r| (r["offset"].as_u64().expect("offset"), seq_of(r)))
        .collect()
}

#[test]
fn scale_embedded_log_deletes_old_segments_and_tail_starts_at_the_oldest_kept_record() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("aggregator.toml");
    let log = dir.path().join("aggregator.log");
    write_aggregator_config(
        &config,
        port,
        &dir.path().join("data"),
        &[(AGENT, TOKEN)],
        "[log]\nsegment-size = \"4KiB\"\nretention-size = \"16KiB\"\nretention-age = \"7d\"\n",
    );
    let mut aggregator = start_aggregator(&config, port, &log);

    // 2,000 windows in 200 batches: ~100 segments of 4 KiB written.
    const BATCHES: u64 = 200;
    const PER_BATCH: u64 = 10;
    for b in 0..BATCHES {
        let status = post_batch(port, &batch(b * PER_BATCH..(b + 1) * PER_BATCH));
        assert_eq!(status, 200, "batch {b}");
    }
    let total = BATCHES * PER_BATCH;
    let deleted = wait_until_stable(
        || metric(port, "millrace_aggregator_log_segments_deleted_total") as u64,
        |&n| n > 0,
        Duration::from_millis(100),
        Duration::from_millis(300),
        Duration::from_secs(30),
    );
    assert!(deleted > 0, "retention deleted no segment");
    let deleted_records = metric(port, "millrace_aggregator_log_deleted_records_total") as u64;

    let kept = offsets_and_seqs(&config);
    assert!(!kept.is_empty());
    let (first_offset, _) = kept[0];
    // tail --from-beginning starts at the oldest kept record, which is
    // exactly where retention stopped deleting.
    assert_eq!(first_offset, deleted_records, "first kept offset");
    assert!(first_offset > 0);
    // Kept records are contiguous to the end: the newest are all there.
    for (i, &(offset, seq)) in kept.iter().enumerate() {
        assert_eq!(offset, first_offset + i as u64, "offsets contiguous");
        assert_eq!(seq, offset, "one window per seq, in order");
    }
    assert_eq!(kept.last().unwrap().1, total - 1);
    // The topic stays within its limit plus the active segment's overshoot.
    let topic_dir = dir.path().join("data/log/millrace.windows");
    let bytes: u64 = std::fs::read_dir(&topic_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        bytes <= 16 * 1024 + 4 * 1024 + 16 * 1024,
        "{bytes} bytes kept"
    );

    // After a restart the dedup state still knows every seq (the deleted
    // ones included): a resent batch is answered 200 and written once.
    aggregator.terminate(Duration::from_secs(10));
    let aggregator2 = start_aggregator(&config, port, &log);
    let status = post_batch(port, &batch(total - PER_BATCH..total));
    assert_eq!(status, 200, "resent batch");
    let status = post_batch(port, &batch(0..PER_BATCH));
    assert_eq!(status, 200, "resent batch whose records retention deleted");
    let duplicates = metric(port, "millrace_aggregator_duplicate_records_total") as u64;
    assert_eq!(duplicates, 2 * PER_BATCH, "both resends recognised");
    let after = offsets_and_seqs(&config);
    assert_eq!(after.last(), kept.last(), "nothing written twice");
    drop(aggregator2);
    eprintln!(
        "retention: {total} windows written, {deleted} segments ({deleted_records} records) deleted, \
         {} kept from offset {first_offset}, {bytes} bytes on disk",
        kept.len()
    );
}
