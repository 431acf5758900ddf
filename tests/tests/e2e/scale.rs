//! The central side over time: the embedded log's retention, and the
//! dashboard's history rebuilt from the log after a restart.
//!
//! `scale_embedded_log_*`: the real `millrace-aggregator` with a tiny
//! segment size and a size retention, fed real wire batches over HTTP; the
//! log is read back with `millrace-aggregator tail --from-beginning`.
//! `scale_dashboard_history_*`: windows and an alert posted, the aggregator
//! restarted, the dashboard API asked for them (embedded log, and Kafka on a
//! tansu broker).

use millrace_protocol::{
    Alert, AlertKind, AnomalyScore, Batch, Envelope, Record, SeriesKey, Severity, Window,
};
use millrace_tests::{
    aggregator_tail, free_port, start_aggregator, wait_until_stable, write_aggregator_config,
    KafkaPeer,
};
use std::path::Path;
use std::time::Duration;

const AGENT: &str = "gw-scale";
const TOKEN: &str = "scale-test-token-0123456789";

fn post_batch(port: u16, batch: &Batch) -> u16 {
    millrace_tests::post_batch(port, TOKEN, batch).0
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
    millrace_tests::metric_total(port, name)
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

fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = millrace_tests::http_request(port, "GET", path, &[], b"");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// 20 series × 6 windows, then one critical alert on `press-1/reg-03`.
fn history_batches() -> Vec<Batch> {
    let mut batches: Vec<Batch> = (0..6).map(|b| batch(b * 20..(b + 1) * 20)).collect();
    let alert = Alert {
        agent: AGENT.into(),
        series: SeriesKey::new("press-1", "reg-03"),
        kind: AlertKind::Window,
        time_ms: 1_700_000_000_000,
        window_start_ms: 1_700_000_000_000,
        value: 99.5,
        score: AnomalyScore {
            z: 7.5,
            baseline_mean: 3.0,
            baseline_stddev: 1.0,
            p_value: 1e-13,
            severity: Severity::Critical,
        },
        unit: "bar".into(),
    };
    batches.push(Batch::new(
        AGENT,
        vec![Envelope {
            seq: 120,
            record: Record::Alert(alert),
        }],
    ));
    batches
}

/// Posts the history batches, restarts the aggregator and checks that the
/// dashboard API serves them again. `extra` selects the log.
fn dashboard_history_survives_a_restart(extra: &str, dir: &Path) {
    let port = free_port();
    let config = dir.join("aggregator.toml");
    let log = dir.join("aggregator.log");
    write_aggregator_config(&config, port, &dir.join("data"), &[(AGENT, TOKEN)], extra);
    let mut aggregator = start_aggregator(&config, port, &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for b in history_batches() {
        loop {
            // Kafka may answer 503 until its topics are ready.
            match post_batch(port, &b) {
                200 => break,
                503 if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                other => panic!("batch answered {other}"),
            }
        }
    }
    let before = get_json(port, "/api/v1/series?limit=500");
    assert_eq!(before["total"], 20, "{before}");
    aggregator.terminate(Duration::from_secs(10));

    let aggregator2 = start_aggregator(&config, port, &log);
    let series = get_json(port, "/api/v1/series?limit=500");
    assert_eq!(series["total"], 20, "series after the restart: {series}");
    for s in series["series"].as_array().unwrap() {
        assert_eq!(s["windows_retained"], 6, "{s}");
        assert_eq!(s["unit"], "bar", "{s}");
    }
    let windows = get_json(
        port,
        &format!(
            "/api/v1/series/windows?agent={AGENT}&series=press-1/reg-03&from_ms=0&to_ms=1800000000000"
        ),
    );
    let means: Vec<f64> = windows["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["mean"].as_f64().unwrap())
        .collect();
    assert_eq!(means, vec![3.0, 23.0, 43.0, 63.0, 83.0, 103.0], "{windows}");
    assert_eq!(windows["alerts"].as_array().unwrap().len(), 1, "{windows}");
    let alerts = get_json(port, "/api/v1/alerts");
    let alerts = alerts["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["score"]["severity"], "critical", "{alerts:?}");
    // Restored, not heard from: the agent is not shown online.
    let fleet = get_json(port, "/api/v1/fleet");
    let agent = fleet["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == AGENT)
        .unwrap_or_else(|| panic!("{fleet}"));
    assert_eq!(agent["online"], false, "{agent}");
    drop(aggregator2);
}

#[test]
fn scale_dashboard_history_survives_a_restart_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    dashboard_history_survives_a_restart("", dir.path());
}

#[test]
fn scale_dashboard_history_survives_a_restart_on_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = KafkaPeer::start(&dir.path().join("tansu"), None);
    let extra = format!(
        "[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"3s\"\n",
        kafka.port
    );
    dashboard_history_survives_a_restart(&extra, dir.path());
}
