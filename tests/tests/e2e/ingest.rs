//! Devices publishing straight to the agent's ingest listener (`[broker]`),
//! driven by `millrace-sim publish`, which counts the PUBACKs it gets and
//! writes every acknowledged reading down (`--acked-out`). An acknowledged
//! reading is one the agent promised to keep, so the far end of the chain is
//! checked against that file, reading by reading.
//!
//! - `embedded_ingest_survives_kill_9_with_every_acked_reading_in_one_window`:
//!   QoS 1 readings from a reconnecting publisher while the agent is SIGKILLed
//!   twenty times (each time the publisher got more acknowledgements from the
//!   running agent, restarted at once on the same state and port): for every
//!   (series, 5 s window) holding acknowledged readings the aggregator's log
//!   holds exactly one window, whose `count` and `mean` are those of the
//!   distinct acknowledged readings in it; no window twice, none extra, and
//!   no reading resent after a restart dead-lettered as `late`.
//! - `a_200k_qos1_burst_to_the_default_ingest_loses_nothing`: 200 000 QoS 1
//!   readings, unpaced, 1 000 in flight, to an ingest listener with its
//!   default settings: every one acknowledged, accepted by the window engine
//!   (`/metrics`), and counted in the windows the agent taps and the
//!   aggregator logs.
//!
//! Every wait is on a condition (a port, a counter, a file, a process exit)
//! with a deadline.

use millrace_tests::{
    aggregator_tail, bin, check_windows, follow_json_lines, free_port, series_name,
    start_aggregator, wait_until_stable, write_aggregator_config, ChildGuard, SeededRng,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = "gw-ingest";
const TOKEN: &str = "ingest-test-token-0123456789";
const WINDOWS_TOPIC: &str = "millrace.windows";
/// The agent's default window width (`[window]` is left at its defaults).
const WIDTH_MS: i64 = 5_000;
/// The `source` label of the ingest listener's counters in `/metrics`.
const ACKS_METRIC: &str = "millrace_mqtt_acks_total{source=\"embedded-broker\"}";
const ACCEPTED_METRIC: &str = "millrace_readings_accepted_total";
const REDELIVERED_METRIC: &str = "millrace_redelivered_readings_total";

/// The agent's config: the ingest listener on `mqtt_port` with one QoS 1
/// JSON subscription (`sensors/<device>/<sensor>`) and every other `[broker]`
/// key at its default; `/metrics` on `http_port`; the uplink to the
/// aggregator on `agg_port`. `[window]` and `[journal]` keep their defaults
/// (5 s windows, 2 s allowed lateness, 5 s idle timeout).
fn agent_config(mqtt_port: u16, http_port: u16, agg_port: u16, data_dir: &Path) -> String {
    format!(
        r#"
[agent]
id = "{AGENT}"
data-dir = "{dir}"

[broker]
enabled = true
listen = "127.0.0.1:{mqtt_port}"

[[broker.subscriptions]]
filter = "sensors/+/+"
qos = 1
format = "json"
device = "{{1}}"
sensor = "{{2}}"
value-field = "value"
time-field = "ts"
time-unit = "ms"

[http]
listen = "127.0.0.1:{http_port}"

[uplink]
url = "http://127.0.0.1:{agg_port}"
token = "{TOKEN}"
backoff-min = "100ms"
backoff-max = "1s"
request-timeout = "10s"
"#,
        dir = data_dir.display()
    )
}

fn port_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn tail_of(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An aggregator (embedded log) and an agent whose ingest listener the
/// publisher sends to, all in `dir`.
struct Rig {
    dir: PathBuf,
    agg_port: u16,
    mqtt_port: u16,
    http_port: u16,
    agg_toml: PathBuf,
    agg_log: PathBuf,
    agent_toml: PathBuf,
    agent_log: PathBuf,
    tap: PathBuf,
}

impl Rig {
    fn new(dir: &Path) -> Self {
        let (agg_port, mqtt_port, http_port) = (free_port(), free_port(), free_port());
        let agg_toml = dir.join("aggregator.toml");
        write_aggregator_config(
            &agg_toml,
            agg_port,
            &dir.join("agg-state"),
            &[(AGENT, TOKEN)],
            "",
        );
        let agent_toml = dir.join("agent.toml");
        std::fs::write(
            &agent_toml,
            agent_config(mqtt_port, http_port, agg_port, &dir.join("agent-state")),
        )
        .expect("write agent.toml");
        Self {
            dir: dir.to_owned(),
            agg_port,
            mqtt_port,
            http_port,
            agg_toml,
            agg_log: dir.join("aggregator.log"),
            agent_toml,
            agent_log: dir.join("agent.log"),
            tap: dir.join("tap.jsonl"),
        }
    }

    fn start_aggregator(&self) -> ChildGuard {
        start_aggregator(&self.agg_toml, self.agg_port, &self.agg_log)
    }

    /// Starts the agent (one tap file and one JSON-lines log, appended to
    /// across restarts) and waits for `/metrics`, which the agent binds after
    /// its ingest listener: devices can connect from then on.
    fn start_agent(&self) -> ChildGuard {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .expect("open agent log");
        let mut agent = ChildGuard::spawn(
            "millrace-agent",
            Command::new(bin("millrace-agent"))
                .args(["--log-format", "json", "run", "--config"])
                .arg(&self.agent_toml)
                .arg("--tap")
                .arg(&self.tap)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(stderr),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while scrape(self.http_port).is_none() {
            assert!(
                agent.is_running(),
                "agent exited at start: {}",
                tail_of(&self.agent_log, 30)
            );
            assert!(
                Instant::now() < deadline,
                "agent /metrics not up after 60 s: {}",
                tail_of(&self.agent_log, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// Starts `millrace-sim publish` against the agent's ingest listener.
    fn start_publisher(&self, args: &[&str]) -> Publisher {
        let (report, acked_out) = (self.dir.join("report.json"), self.dir.join("acked.txt"));
        let log = self.dir.join("publisher.log");
        let stderr = std::fs::File::create(&log).expect("create publisher log");
        let guard = ChildGuard::spawn(
            "millrace-sim publish",
            Command::new(bin("millrace-sim"))
                .arg("publish")
                .args(["--broker", &format!("127.0.0.1:{}", self.mqtt_port)])
                .args(["--topic-prefix", "sensors"])
                .args(args)
                .arg("--acked-out")
                .arg(&acked_out)
                .arg("--report")
                .arg(&report)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(stderr),
        );
        Publisher {
            guard,
            report,
            acked_out,
            log,
        }
    }

    /// Every window record in the aggregator's embedded log (the `value`s).
    fn landed_windows(&self) -> Vec<Value> {
        aggregator_tail(&self.agg_toml, WINDOWS_TOPIC)
            .into_iter()
            .map(|r| r["value"].clone())
            .collect()
    }

    /// Stops the agent the way a service manager does, once its outbox is
    /// empty: SIGTERM flushes the open windows and the uplink drains them
    /// (`shutdown-drain`, 5 s) before the exit; then waits until the
    /// aggregator's log has not changed for 3 s and returns its windows.
    fn stop_agent(&self, agent: &mut ChildGuard) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pending = scrape(self.http_port).map(|t| metric_sum(&t, "millrace_outbox_records"));
            if pending == Some(0.0) {
                break;
            }
            assert!(
                agent.is_running(),
                "agent exited: {}",
                tail_of(&self.agent_log, 30)
            );
            assert!(
                Instant::now() < deadline,
                "outbox not empty after 120 s ({pending:?} records): {}",
                tail_of(&self.agent_log, 30)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        assert_eq!(
            agent.terminate(Duration::from_secs(60)),
            Some(0),
            "SIGTERM: clean exit 0; {}",
            tail_of(&self.agent_log, 30)
        );
        wait_until_stable(
            || self.landed_windows().len(),
            |n| *n > 0,
            Duration::from_millis(500),
            Duration::from_secs(3),
            Duration::from_secs(120),
        );
        self.landed_windows()
    }

    /// The tap's lines of one record type (`window`, `dead-letter`, …).
    fn tapped(&self, kind: &str) -> Vec<Value> {
        follow_json_lines(&self.tap, Duration::from_millis(1), |_| true)
            .into_iter()
            .filter(|r| r["type"] == kind)
            .collect()
    }
}

/// A running `millrace-sim publish`.
struct Publisher {
    guard: ChildGuard,
    report: PathBuf,
    acked_out: PathBuf,
    log: PathBuf,
}

impl Publisher {
    /// Waits for the publisher to exit on its own (exit 0) and returns its
    /// report.
    fn finish(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(status)) = self.guard.child.try_wait() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "publisher still running after {timeout:?}: {}",
                tail_of(&self.log, 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "publisher failed ({status}): {}",
            tail_of(&self.log, 30)
        );
        let text = std::fs::read_to_string(&self.report).unwrap_or_default();
        let line = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("publisher report {line:?}: {e}; {}", tail_of(&self.log, 20))
        })
    }
}

/// The body of `GET /metrics` on the agent, or `None` while nothing answers.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&port_addr(port), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// The value of the sample whose name (with labels) is exactly `name`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// The sum of every sample of `name`, whatever its labels.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `name` in the agent's `/metrics` (0 while it is absent or nothing answers).
fn agent_metric(port: u16, name: &str) -> u64 {
    scrape(port)
        .and_then(|t| metric(&t, name))
        .map_or(0, |v| v as u64)
}

/// (series, window start) → event time → value, for readings of
/// `--acked-out` lines `<device>/<sensor> <ts> <value>`. A reading
/// acknowledged twice (a resend that the agent acknowledged again) appears
/// once.
type Acked = BTreeMap<(String, i64), BTreeMap<i64, f64>>;

/// Reads an `--acked-out` file: the distinct acknowledged readings by
/// window, and how many lines it has.
fn read_acked(path: &Path) -> (Acked, usize) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut acked = Acked::new();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let mut parts = line.split_whitespace();
        let (Some(series), Some(ts), Some(value), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            panic!("acked-out line {line:?}: want `<device>/<sensor> <ts> <value>`");
        };
        let ts: i64 = ts
            .parse()
            .unwrap_or_else(|e| panic!("acked-out ts in {line:?}: {e}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("acked-out value in {line:?}: {e}"));
        let start = ts.div_euclid(WIDTH_MS) * WIDTH_MS;
        let readings = acked.entry((series.to_string(), start)).or_default();
        if let Some(old) = readings.insert(ts, value) {
            assert_eq!(
                old.to_bits(),
                value.to_bits(),
                "{series} at {ts} acknowledged with two values"
            );
        }
    }
    (acked, lines)
}

/// How the windows that landed compare with the acknowledged readings.
#[derive(Debug, Default)]
struct Reconciliation {
    /// Acknowledged (series, start) with no window at the aggregator.
    missing: Vec<(String, i64)>,
    /// (series, start, records) landed more than once.
    duplicated: Vec<(String, i64, usize)>,
    /// Windows landed for a (series, start) with no acknowledged reading.
    extra: Vec<(String, i64)>,
    /// (series, start, window count, acknowledged readings).
    miscounted: Vec<(String, i64, u64, usize)>,
    /// (series, start, window mean, mean of the acknowledged readings).
    wrong_mean: Vec<(String, i64, f64, f64)>,
}

impl Reconciliation {
    fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.extra.is_empty()
            && self.miscounted.is_empty()
            && self.wrong_mean.is_empty()
    }
}

fn reconcile(acked: &Acked, windows: &[Value]) -> Reconciliation {
    let mut landed: BTreeMap<(String, i64), Vec<&Value>> = BTreeMap::new();
    for w in windows {
        let start = w["start_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("window without start_ms: {w}"));
        landed.entry((series_name(w), start)).or_default().push(w);
    }
    let mut r = Reconciliation::default();
    for ((series, start), ws) in &landed {
        if ws.len() > 1 {
            r.duplicated.push((series.clone(), *start, ws.len()));
        }
        if !acked.contains_key(&(series.clone(), *start)) {
            r.extra.push((series.clone(), *start));
        }
    }
    for ((series, start), readings) in acked {
        let Some(ws) = landed.get(&(series.clone(), *start)) else {
            r.missing.push((series.clone(), *start));
            continue;
        };
        let want_mean = readings.values().sum::<f64>() / readings.len() as f64;
        for w in ws {
            let count = w["count"].as_u64().unwrap_or(0);
            if count != readings.len() as u64 {
                r.miscounted
                    .push((series.clone(), *start, count, readings.len()));
                continue;
            }
            let mean = w["mean"].as_f64().unwrap_or(f64::NAN);
            if (mean - want_mean).abs() > 1e-9 * want_mean.abs().max(1.0) {
                r.wrong_mean.push((series.clone(), *start, mean, want_mean));
            }
        }
    }
    r
}

fn head<T: std::fmt::Debug>(v: &[T]) -> String {
    format!("{} (first {:?})", v.len(), &v[..v.len().min(5)])
}

/// The `late` dead letters the agent tapped: (series, event time), from
/// their `origin` and `detail` (`value=… time_ms=…`).
fn late_readings(rig: &Rig) -> Vec<(String, i64)> {
    rig.tapped("dead-letter")
        .iter()
        .filter(|d| d["reason"] == "late")
        .map(|d| {
            let time_ms = d["detail"]
                .as_str()
                .and_then(|t| {
                    t.split_whitespace()
                        .find_map(|f| f.strip_prefix("time_ms="))
                })
                .and_then(|t| t.parse().ok())
                .unwrap_or(i64::MIN);
            (d["origin"].as_str().unwrap_or("?").to_string(), time_ms)
        })
        .collect()
}

#[test]
fn embedded_ingest_survives_kill_9_with_every_acked_reading_in_one_window() {
    const SEED: u64 = 0x5EED_1E57;
    const KILLS: usize = 20;
    const MESSAGES: u64 = 150_000;
    const SERIES: u64 = 100;
    /// Readings per second, 60 per series (event time is the wall clock):
    /// 20 kills at the acknowledgement counts below take about 60 000 of the
    /// messages (10 s of the 25 s), so the publisher is still sending at the
    /// last kill, and about two windows per series close between kills.
    const RATE: u64 = 6_000;
    /// Acknowledgements from one agent run before it is killed.
    const ACKS_BEFORE_KILL: (u64, u64) = (1_000, 5_000);
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let rig = Rig::new(dir.path());
    let mut aggregator = rig.start_aggregator();
    let mut agent = rig.start_agent();
    let messages = MESSAGES.to_string();
    let mut publisher = rig.start_publisher(&[
        "--messages",
        &messages,
        "--series",
        &SERIES.to_string(),
        "--qos",
        "1",
        "--inflight",
        "1000",
        "--rate",
        &RATE.to_string(),
        "--reconnect",
        "--give-up-after",
        "120s",
        "--drain-timeout",
        "120s",
        "--client-id",
        "ingest-kill-9",
    ]);

    let mut rng = SeededRng::new(SEED);
    let mut kills = 0;
    let mut acks_per_run = Vec::new();
    // Per agent run: readings whose resent message the redelivery guard
    // recognised (journaled before the kill, acknowledgement lost with it).
    let mut redelivered_per_run = Vec::new();
    for _ in 0..KILLS {
        // Kill once this run of the agent acknowledged a random number of
        // messages: it is mid-stream, with a journal commit in flight or not.
        let want = rng.range(ACKS_BEFORE_KILL.0, ACKS_BEFORE_KILL.1);
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut acks, mut redelivered) = (0, 0);
        while acks < want {
            assert!(
                agent.is_running(),
                "agent exited by itself before kill {kills}: {}",
                tail_of(&rig.agent_log, 30)
            );
            assert!(
                publisher.guard.is_running(),
                "the publisher ended after {kills} of {KILLS} kills: send more messages or \
                 slower; {}",
                tail_of(&publisher.log, 20)
            );
            assert!(
                Instant::now() < deadline,
                "agent acknowledged {acks} of {want} messages in 90 s (kill {kills}): {}",
                tail_of(&rig.agent_log, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
            if let Some(text) = scrape(rig.http_port) {
                acks = metric(&text, ACKS_METRIC).unwrap_or(0.0) as u64;
                redelivered = metric(&text, REDELIVERED_METRIC).unwrap_or(0.0) as u64;
            }
        }
        agent.kill(); // SIGKILL, reaped
        kills += 1;
        acks_per_run.push(acks);
        redelivered_per_run.push(redelivered);
        agent = rig.start_agent();
    }
    let killed_at = started.elapsed();

    // The publisher resends what the killed agents did not acknowledge and
    // sends the rest; it ends once everything is acknowledged.
    let report = publisher.finish(Duration::from_secs(600));
    let published_at = started.elapsed();
    assert!(
        agent.is_running(),
        "agent exited: {}",
        tail_of(&rig.agent_log, 30)
    );
    redelivered_per_run.push(agent_metric(rig.http_port, REDELIVERED_METRIC));
    let windows = rig.stop_agent(&mut agent);
    assert!(
        aggregator.is_running(),
        "aggregator exited: {}",
        tail_of(&rig.agg_log, 30)
    );
    aggregator.terminate(Duration::from_secs(10));

    let (acked, acked_lines) = read_acked(&publisher.acked_out);
    let distinct: usize = acked.values().map(BTreeMap::len).sum();
    let r = reconcile(&acked, &windows);
    let check = check_windows(&windows, WIDTH_MS);
    let late = late_readings(&rig);
    let agent_log = std::fs::read_to_string(&rig.agent_log).unwrap_or_default();
    // Per restart: journaled readings that rebuilt open windows, and those
    // skipped because their window had already been emitted.
    let replayed: Vec<(u64, u64)> = agent_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "open windows rebuilt from the journal")
        .map(|v| {
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            (n("readings"), n("skipped_closed"))
        })
        .collect();
    eprintln!(
        "ingest kill -9: seed {SEED:#x}, messages {MESSAGES} over {SERIES} series at {RATE}/s, \
         report {report}, acked-out lines {acked_lines} ({distinct} distinct readings), \
         kills {kills} (acks per run {acks_per_run:?}; journal readings (replayed, \
         skipped as closed) per restart {replayed:?}; redeliveries recognised per run \
         {redelivered_per_run:?}, {} in all), windows acked {} landed {} in {} series, \
         duplicates {}, missing {}, extra {}, miscounted {}, wrong mean {}, late dead \
         letters {}, kills done at {killed_at:?}, publisher done at {published_at:?}, \
         run {:?}",
        redelivered_per_run.iter().sum::<u64>(),
        acked.len(),
        windows.len(),
        check.series.len(),
        head(&r.duplicated),
        head(&r.missing),
        head(&r.extra),
        head(&r.miscounted),
        head(&r.wrong_mean),
        head(&late),
        started.elapsed()
    );
    assert_eq!(kills, KILLS);
    assert_eq!(report["sent"].as_u64(), Some(MESSAGES), "sent: {report}");
    assert_eq!(report["acked"].as_u64(), Some(MESSAGES), "acked: {report}");
    assert_eq!(report["unacked"].as_u64(), Some(0), "unacked: {report}");
    assert!(
        report["connections"].as_u64().unwrap_or(0) > KILLS as u64,
        "the publisher reconnected after every kill: {report}"
    );
    assert!(
        report["republished"].as_u64().unwrap_or(0) > 0,
        "messages in flight at the kills were sent again: {report}"
    );
    assert_eq!(
        distinct as u64, MESSAGES,
        "every message's reading is in the acked-out file once"
    );
    assert!(
        r.is_clean(),
        "the log does not hold exactly the acknowledged readings, one window each: {r:?}"
    );
    assert!(
        late.is_empty(),
        "acknowledged readings came back late: {}",
        head(&late)
    );
}

#[test]
fn a_200k_qos1_burst_to_the_default_ingest_loses_nothing() {
    const MESSAGES: u64 = 200_000;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let rig = Rig::new(dir.path());
    let mut aggregator = rig.start_aggregator();
    let mut agent = rig.start_agent();
    let mut publisher = rig.start_publisher(&[
        "--messages",
        &MESSAGES.to_string(),
        "--series",
        "1000",
        "--qos",
        "1",
        "--inflight",
        "1000",
        "--client-id",
        "ingest-burst",
    ]);
    let report = publisher.finish(Duration::from_secs(600));
    let published_at = started.elapsed();
    assert!(
        agent.is_running(),
        "agent exited under the burst: {}",
        tail_of(&rig.agent_log, 30)
    );
    assert_eq!(report["sent"].as_u64(), Some(MESSAGES), "sent: {report}");
    assert_eq!(report["acked"].as_u64(), Some(MESSAGES), "acked: {report}");
    assert_eq!(report["unacked"].as_u64(), Some(0), "unacked: {report}");

    // Every acknowledged reading reaches the window engine (its counter is
    // exported about once a second).
    let accepted = wait_until_stable(
        || agent_metric(rig.http_port, ACCEPTED_METRIC),
        |n| *n >= MESSAGES,
        Duration::from_millis(250),
        Duration::ZERO,
        Duration::from_secs(120),
    );
    let accepted_at = started.elapsed();
    let metrics = scrape(rig.http_port).unwrap_or_default();
    let late = metric(
        &metrics,
        "millrace_window_dead_letters_total{reason=\"late\"}",
    );
    assert_eq!(accepted, MESSAGES, "{ACCEPTED_METRIC}");

    let landed = rig.stop_agent(&mut agent);
    aggregator.terminate(Duration::from_secs(10));
    let tapped = rig.tapped("window");
    let sum = |ws: &[Value]| {
        ws.iter()
            .map(|w| w["count"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (acked, acked_lines) = read_acked(&publisher.acked_out);
    let r = reconcile(&acked, &landed);
    let check = check_windows(&landed, WIDTH_MS);
    eprintln!(
        "200k burst: report {report}, acked-out lines {acked_lines}, accepted {accepted} \
         (late dead letters {late:?}), windows tapped {} holding {} readings, landed {} \
         holding {} readings in {} series, duplicates {}, missing {}, miscounted {}, \
         publisher done at {published_at:?}, all accepted at {accepted_at:?}, run {:?}",
        tapped.len(),
        sum(&tapped),
        landed.len(),
        sum(&landed),
        check.series.len(),
        check.duplicates.len(),
        r.missing.len(),
        r.miscounted.len(),
        started.elapsed()
    );
    assert_eq!(sum(&tapped), MESSAGES, "readings in the tapped windows");
    assert_eq!(sum(&landed), MESSAGES, "readings in the landed windows");
    assert!(
        check.duplicates.is_empty(),
        "duplicate windows: {:?}",
        check.duplicates
    );
    assert!(
        r.is_clean(),
        "the log does not hold exactly the acknowledged readings: {r:?}"
    );
}
