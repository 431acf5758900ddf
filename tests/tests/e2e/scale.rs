//! The central side over time and scaled out: the embedded log's retention,
//! the dashboard's history rebuilt from the log after a restart, and several
//! aggregators sharing the fleet through Kafka (`[cluster]`).
//!
//! `scale_embedded_log_*`: the real `millrace-aggregator` with a tiny
//! segment size and a size retention, fed real wire batches over HTTP; the
//! log is read back with `millrace-aggregator tail --from-beginning`.
//! `scale_dashboard_history_*`: windows and an alert posted, the aggregator
//! restarted, the dashboard API asked for them (embedded log, and Kafka on a
//! tansu broker).
//! `scale_three_aggregators_six_agents_*`: three aggregators, six real agents
//! fed by six simulators, one aggregator SIGKILLed and restarted, another
//! stopped and started (an upgrade); Kafka read back with the Python client:
//! every tapped window once, no (agent, seq) twice; every dashboard shows the
//! whole fleet.
//! `scale_a_batch_resent_*`: one owner writes, the other redirects (307 to
//! the owner); the owner dies, the resend to another aggregator is answered
//! as duplicates. `scale_records_a_crashed_owner_*`: records in Kafka that no
//! saved state lists are found by the next owner's takeover.

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

// ---- Several aggregators on one Kafka (`[cluster]`) ----

const CONTROL_TOPIC_PARTITIONS: f64 = 6.0;

/// tansu with the three data topics and a six-partition control topic.
fn cluster_kafka(dir: &Path) -> KafkaPeer {
    KafkaPeer::start_with_topics(
        dir,
        &[
            "millrace.windows",
            "millrace.alerts",
            "millrace.dead-letters",
            "millrace.control:6",
        ],
    )
}

/// One aggregator of a cluster: its port, config, log and process.
struct Node {
    port: u16,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    process: Option<millrace_tests::ChildGuard>,
}

impl Node {
    fn new(dir: &Path, name: &str, kafka_port: u16, agents: &[(&str, &str)]) -> Self {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        write_aggregator_config(
            &config,
            port,
            &dir.join(format!("{name}-state")),
            agents,
            &format!(
                "[kafka]\nbrokers = \"127.0.0.1:{kafka_port}\"\nmessage-timeout = \"5s\"\n\n\
                 [cluster]\nadvertise-url = \"http://127.0.0.1:{port}\"\n"
            ),
        );
        Self {
            port,
            config,
            log: dir.join(format!("{name}.log")),
            process: None,
        }
    }

    fn start(&mut self) {
        self.process = Some(start_aggregator(&self.config, self.port, &self.log));
    }

    fn rebalances(&self) -> f64 {
        metric(self.port, "millrace_aggregator_cluster_rebalances_total")
    }

    /// Kills the aggregator (SIGKILL) and waits until the group noticed (a
    /// survivor was rebalanced once the session expired). A broker may
    /// only reassign a dead member's partitions when a member joins
    /// (tansu 0.6.0 does so), so the killed one is restarted after this.
    fn kill_and_wait_noticed(&mut self, survivors: &[&Node]) {
        let before: Vec<f64> = survivors.iter().map(|n| n.rebalances()).collect();
        self.process.as_mut().expect("running").kill();
        self.process = None;
        let noticed = wait_until_stable(
            || {
                survivors
                    .iter()
                    .zip(&before)
                    .any(|(n, b)| n.rebalances() > *b)
            },
            |all| *all,
            Duration::from_millis(200),
            Duration::ZERO,
            Duration::from_secs(60),
        );
        assert!(
            noticed,
            "the group never rebalanced the survivors after the kill: {:?} → {:?}\n{}",
            before,
            survivors.iter().map(|n| n.rebalances()).collect::<Vec<_>>(),
            survivors
                .iter()
                .map(|n| n.log_tail())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }

    fn owned(&self) -> f64 {
        metric(self.port, "millrace_aggregator_cluster_partitions_owned")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Waits until `nodes` (the running ones) own every control partition
/// between them, each one once.
fn wait_all_partitions_owned(nodes: &[&Node]) {
    let owned = wait_until_stable(
        || nodes.iter().map(|n| n.owned()).sum::<f64>(),
        |sum| *sum == CONTROL_TOPIC_PARTITIONS,
        Duration::from_millis(200),
        Duration::from_millis(600),
        Duration::from_secs(90),
    );
    assert_eq!(
        owned,
        CONTROL_TOPIC_PARTITIONS,
        "control partitions owned: {:?}; logs:\n{}",
        nodes.iter().map(|n| n.owned()).collect::<Vec<_>>(),
        nodes
            .iter()
            .map(|n| n.log_tail())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
}

/// A batch written by one aggregator and sent again to another one (after
/// the first died, and while both run) is written to Kafka once.
#[test]
fn scale_a_batch_resent_to_another_aggregator_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = cluster_kafka(&dir.path().join("tansu"));
    let agents = [(AGENT, TOKEN)];
    let mut a = Node::new(dir.path(), "agg-a", kafka.port, &agents);
    let mut b = Node::new(dir.path(), "agg-b", kafka.port, &agents);
    a.start();
    b.start();
    wait_all_partitions_owned(&[&a, &b]);

    // Exactly one of them owns the agent; the other redirects.
    let first = batch(0..40);
    let (status_a, _) = post_batch_full(a.port, &first);
    let (status_b, _) = post_batch_full(b.port, &first);
    let mut statuses = [status_a.0, status_b.0];
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 307],
        "one owner writes, the other redirects"
    );
    let (owner, other) = if status_a.0 == 200 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let location = if status_a.0 == 307 {
        &status_a.1
    } else {
        &status_b.1
    };
    assert_eq!(
        location.as_deref(),
        Some(format!("http://127.0.0.1:{}/api/v1/ingest", owner.port).as_str()),
        "the redirect names the owner"
    );
    // Resent to the owner: a duplicate.
    assert_eq!(post_batch_full(owner.port, &first).0 .0, 200);

    // The owner dies (and a third aggregator joins); the agent moves to
    // another aggregator, which recognises the resend from the control
    // topic alone.
    owner.kill_and_wait_noticed(&[&*other]);
    let mut c = Node::new(dir.path(), "agg-c", kafka.port, &agents);
    c.start();
    wait_all_partitions_owned(&[&*other, &c]);
    let resend = batch(0..40);
    let ((mut status, location), mut body) = post_batch_full(other.port, &resend);
    if status == 307 {
        assert_eq!(
            location,
            Some(format!("http://127.0.0.1:{}/api/v1/ingest", c.port))
        );
        let ((s, _), b) = post_batch_full(c.port, &resend);
        (status, body) = (s, b);
    }
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["committed"], 0, "{reply}");
    assert_eq!(reply["duplicates"], 40, "{reply}");
    let new_owner = if location.is_some() {
        c.port
    } else {
        other.port
    };
    // And new records still go in.
    let (status, body) = post_batch_full(new_owner, &batch(30..60));
    assert_eq!(status.0, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (reply["committed"].as_u64(), reply["duplicates"].as_u64()),
        (Some(20), Some(10))
    );

    let records = millrace_tests::kafka_read(kafka.port, "millrace.windows", 1.5);
    let mut seqs: Vec<u64> = records.iter().map(seq_of).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..60).collect::<Vec<_>>(), "every seq once in Kafka");
}

/// `(status, Location)` and the body of a batch POST.
fn post_batch_full(port: u16, batch: &Batch) -> ((u16, Option<String>), String) {
    use std::io::{Read, Write};
    let body = batch.encode_binary();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /api/v1/ingest HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/x-millrace-batch\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let location = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location")
            .then(|| v.trim().to_owned())
    });
    ((status, location), body.to_owned())
}

/// The agent config of one of the fleet's gateways: its embedded broker on
/// `mqtt_port`, 1 s windows, its uplink to `urls` (a cluster's aggregators).
fn fleet_agent_config(
    id: &str,
    token: &str,
    data_dir: &Path,
    mqtt_port: u16,
    urls: &[String],
) -> String {
    let urls = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[agent]
id = "{id}"
data-dir = "{dir}"

[window]
width = "1s"
allowed-lateness = "500ms"
idle-timeout = "2s"

[broker]
enabled = true
listen = "127.0.0.1:{mqtt_port}"

[[broker.subscriptions]]
filter = "plant/+/+"
qos = 1
format = "json"

[uplink]
url = [{urls}]
token = "{token}"
batch-records = 20
backoff-min = "100ms"
backoff-max = "1s"
request-timeout = "5s"
"#,
        dir = data_dir.display()
    )
}

/// Windows tapped by an agent so far.
fn tapped(tap: &Path) -> usize {
    crate::chain::tap_windows(tap).len()
}

/// Three aggregators share six agents through Kafka. One is killed with
/// SIGKILL mid-run and restarted, another is stopped (SIGTERM) for an
/// upgrade and started again: every window every agent produced is in
/// Kafka exactly once, read back with the independent Python client.
#[test]
fn scale_three_aggregators_six_agents_exactly_once_through_kill_and_upgrade() {
    use crate::chain::{
        kafka_keys, key_set, sim_config, spawn_agent, spawn_sim, tail_of, tap_windows, WindowKey,
    };
    use millrace_tests::{kafka_read, wait_for_port};
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let kafka = cluster_kafka(&dir.path().join("tansu"));
    let ids: Vec<(String, String)> = (1..=6)
        .map(|i| {
            (
                format!("gw-fleet-{i}"),
                format!("fleet-token-{i}-0123456789abcdef"),
            )
        })
        .collect();
    let credentials: Vec<(&str, &str)> =
        ids.iter().map(|(a, t)| (a.as_str(), t.as_str())).collect();
    let mut nodes: Vec<Node> = ["agg-1", "agg-2", "agg-3"]
        .iter()
        .map(|name| Node::new(dir.path(), name, kafka.port, &credentials))
        .collect();
    for node in &mut nodes {
        node.start();
    }
    wait_all_partitions_owned(&nodes.iter().collect::<Vec<_>>());
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("http://127.0.0.1:{}", n.port))
        .collect();

    // Six gateways, each starting its uplink at another aggregator, each
    // with two sensors at 10 Hz from its own simulator.
    let mut agents = Vec::new();
    let mut sims = Vec::new();
    let mut taps = Vec::new();
    for (i, (id, token)) in ids.iter().enumerate() {
        let mqtt_port = free_port();
        let mut order = urls.clone();
        order.rotate_left(i % 3);
        let config = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            fleet_agent_config(
                id,
                token,
                &dir.path().join(format!("{id}-state")),
                mqtt_port,
                &order,
            ),
        )
        .unwrap();
        let tap = dir.path().join(format!("{id}.tap.jsonl"));
        let log = dir.path().join(format!("{id}.log"));
        agents.push((spawn_agent(&config, Some(&tap), &log, false), log));
        wait_for_port(
            std::net::SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
            Duration::from_secs(20),
        );
        let sensors: Vec<String> = (1..=2).map(|s| format!("{id}-press/s{s}")).collect();
        let sim_toml = dir.path().join(format!("{id}.sim.toml"));
        std::fs::write(
            &sim_toml,
            sim_config(mqtt_port, &format!("sim-{id}"), &sensors),
        )
        .unwrap();
        sims.push(spawn_sim(&sim_toml, &dir.path().join(format!("{id}.sim.log"))).0);
        taps.push(tap);
    }
    let wait_windows = |each: usize| {
        for tap in &taps {
            let have = wait_until_stable(
                || tapped(tap),
                |n| *n >= each,
                Duration::from_millis(200),
                Duration::ZERO,
                Duration::from_secs(60),
            );
            assert!(have >= each, "{} tapped only {have} windows", tap.display());
        }
    };
    wait_windows(6);

    // kill -9 one aggregator mid-run, and bring it back.
    let (killed, survivors) = nodes.split_at_mut(1);
    killed[0].kill_and_wait_noticed(&survivors.iter().collect::<Vec<_>>());
    wait_windows(10);
    nodes[0].start();
    wait_all_partitions_owned(&nodes.iter().collect::<Vec<_>>());
    wait_windows(14);

    // Stop another one for an upgrade: it gives its agents up in order.
    let code = nodes[1]
        .process
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "SIGTERM: exit 0; {}", nodes[1].log_tail());
    nodes[1].process = None;
    wait_all_partitions_owned(&[&nodes[0], &nodes[2]]);
    wait_windows(18);
    nodes[1].start();
    wait_all_partitions_owned(&nodes.iter().collect::<Vec<_>>());
    wait_windows(22);

    // The plant stops; the open windows close on the idle timeout.
    for sim in &mut sims {
        sim.kill();
    }
    let tap_paths: Vec<&Path> = taps.iter().map(|t| t.as_path()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let records = loop {
        let want: std::collections::BTreeSet<WindowKey> = tap_paths
            .iter()
            .flat_map(|t| key_set(&tap_windows(t)))
            .collect();
        let records = kafka_read(kafka.port, "millrace.windows", 1.5);
        let stable = want
            == tap_paths
                .iter()
                .flat_map(|t| key_set(&tap_windows(t)))
                .collect();
        if stable && want.is_subset(&kafka_keys(&records)) {
            break records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Kafka lacks {} of {} tapped windows; agent logs:\n{}",
            want.difference(&kafka_keys(&records)).count(),
            want.len(),
            agents
                .iter()
                .map(|(_, log)| tail_of(log, 10))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Any aggregator's dashboard shows the whole fleet: its own agents from
    // its ingest, the others' from Kafka (and its history after a restart).
    for node in &nodes {
        let total = wait_until_stable(
            || {
                let (_, body) = millrace_tests::http_request(
                    node.port,
                    "GET",
                    "/api/v1/series?limit=1",
                    &[],
                    b"",
                );
                serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["total"].as_u64())
            },
            |t| *t == Some(12),
            Duration::from_millis(200),
            Duration::ZERO,
            Duration::from_secs(30),
        );
        assert_eq!(
            total,
            Some(12),
            "the dashboard on {} shows the fleet's 12 series",
            node.port
        );
    }
    for (agent, _) in &mut agents {
        agent.terminate(Duration::from_secs(20));
    }

    // Exactly once: no (agent, seq) twice, every tapped window once, nothing else.
    let mut seen = std::collections::BTreeMap::new();
    for r in &records {
        let agent = r["headers"]["agent"].as_str().unwrap_or("?").to_owned();
        *seen.entry((agent, seq_of(r))).or_insert(0usize) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let tapped_all: Vec<serde_json::Value> =
        tap_paths.iter().flat_map(|t| tap_windows(t)).collect();
    let redirected: f64 = nodes
        .iter()
        .map(|n| metric_labelled(n.port, "millrace_aggregator_batches_total", "redirected"))
        .sum();
    eprintln!(
        "scale: 3 aggregators, 6 agents, {} windows tapped, {} in Kafka, {} (agent, seq) twice, \
         {redirected} redirects answered (after the restarts), run {:?}",
        tapped_all.len(),
        records.len(),
        twice.len(),
        started.elapsed()
    );
    assert!(twice.is_empty(), "written twice: {twice:?}");
    assert_eq!(
        records.len(),
        tapped_all.len(),
        "one Kafka record per tapped window"
    );
    assert_eq!(
        kafka_keys(&records),
        key_set(&tapped_all),
        "the same windows"
    );
    assert!(
        tapped_all.len() >= 6 * 22,
        "only {} windows tapped",
        tapped_all.len()
    );
    drop(kafka);
}

/// The value of `name{…result="<result>"…}` on `/metrics`.
fn metric_labelled(port: u16, name: &str, result: &str) -> f64 {
    let (_, body) = millrace_tests::http_request(port, "GET", "/metrics", &[], b"");
    let label = format!("result=\"{result}\"");
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An owner that crashed after writing a batch to the data topics but before
/// saving its state: the next owner finds those records when it takes the
/// agent over, so the resend is not written again. (The crashed owner is
/// played by an aggregator without `[cluster]` on the same Kafka: it writes
/// the data topics and saves nothing to the control topic.)
#[test]
fn scale_records_a_crashed_owner_did_not_save_are_found_at_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = cluster_kafka(&dir.path().join("tansu"));
    let agents = [(AGENT, TOKEN)];
    let mut first = Node::new(dir.path(), "agg-first", kafka.port, &agents);
    first.start();
    wait_all_partitions_owned(&[&first]);
    assert_eq!(post_batch_full(first.port, &batch(0..10)).0 .0, 200);
    let code = first
        .process
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", first.log_tail());
    first.process = None;

    let crashed_port = free_port();
    let crashed_config = dir.path().join("crashed.toml");
    write_aggregator_config(
        &crashed_config,
        crashed_port,
        &dir.path().join("crashed-state"),
        &agents,
        &format!(
            "[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"5s\"\n",
            kafka.port
        ),
    );
    let mut crashed = start_aggregator(
        &crashed_config,
        crashed_port,
        &dir.path().join("crashed.log"),
    );
    assert_eq!(post_batch_full(crashed_port, &batch(10..20)).0 .0, 200);
    crashed.kill();

    let mut next = Node::new(dir.path(), "agg-next", kafka.port, &agents);
    next.start();
    wait_all_partitions_owned(&[&next]);
    let (status, body) = post_batch_full(next.port, &batch(10..25));
    assert_eq!(status.0, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (reply["committed"].as_u64(), reply["duplicates"].as_u64()),
        (Some(5), Some(10)),
        "{reply}; {}",
        next.log_tail()
    );
    let log = strip_ansi(&std::fs::read_to_string(&next.log).unwrap_or_default());
    assert!(
        log.lines().any(|l| l.contains("unsaved_records_found=10")),
        "the takeover names what it found: {}",
        next.log_tail()
    );
    let records = millrace_tests::kafka_read(kafka.port, "millrace.windows", 1.5);
    let mut seqs: Vec<u64> = records.iter().map(seq_of).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..25).collect::<Vec<_>>(), "every seq once in Kafka");
}

/// `text` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
