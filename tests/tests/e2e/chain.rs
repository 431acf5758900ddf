//! The whole chain under faults: simulator → agent → aggregator → embedded log
//! or Kafka (tansu), checked at the far end by independent readers
//! (`millrace-aggregator tail`, `scripts/kafka-read.py`).
//!
//! What each test asserts, at the end of the chain:
//! - `kill_9_the_agent_twenty_times_loses_and_duplicates_no_window`: SIGKILL
//!   of the agent at random moments (seeded) while an external mosquitto holds
//!   its persistent session: no (agent, series, start) twice, no missing
//!   window start in any series, no reading counted twice in its window.
//! - `aggregator_outage_backlog_drains`: a 30 s aggregator outage: every
//!   window the agent produced (its tap) lands in the log once, without gaps.
//! - `sigterm_sends_the_flushed_windows_before_exit`: the agent stopped
//!   while the plant is live flushes its open windows and the uplink sends
//!   them before the process exits: the log holds every tapped window;
//!   restarted, it scores its first windows with the saved baselines.
//! - `kafka_gets_exactly_the_expected_windows`: the aggregator writes to
//!   tansu; Kafka holds exactly the tap's windows once, with agent and seq
//!   headers, across a Kafka outage (healthz 503, the agent buffers).
//! - `kafka_survives_kill_9_of_the_aggregator`: the aggregator, writing to
//!   tansu, is SIGKILLed at random moments while the agent sends; after each
//!   restart it reads Kafka back from its saved frontier, so every tapped
//!   window is in Kafka exactly once.
//! - `full_outbox_drops_oldest_and_counts`: a 64 KiB outbox with no
//!   aggregator drops the oldest windows, counted in the log; what arrives
//!   later is the newest windows, once each.
//!
//! Every loop is bounded by a deadline; a missing peer (mosquitto, tansu,
//! python3) fails the test with a hint.

use millrace_tests::{
    aggregator_tail, bin, check_windows, follow_json_lines, free_port, http_status, kafka_read,
    series_name, start_aggregator, wait_for_port, wait_until_stable, write_aggregator_config,
    ChildGuard, KafkaPeer, Mosquitto, SeededRng,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const WIDTH_MS: i64 = 1000;
const AGENT: &str = "gw-chain";
const TOKEN: &str = "chain-test-token-0123456789";
pub(crate) const WINDOWS_TOPIC: &str = "millrace.windows";

/// A simulator config publishing `sensors` (`device/sensor`) every 100 ms.
pub(crate) fn sim_config(mqtt_port: u16, client_id: &str, sensors: &[String]) -> String {
    let mut text = format!(
        r#"
seed = 77
[mqtt]
broker = "127.0.0.1:{mqtt_port}"
client-id = "{client_id}"
keep-alive = "5s"
reconnect-delay = "200ms"
queue-capacity = 65536
"#
    );
    for (i, s) in sensors.iter().enumerate() {
        text.push_str(&format!(
            r#"
[[mqtt-sensor]]
topic = "plant/{s}"
interval = "100ms"
unit = "u"
signal = {{ offset = {off}.0, amplitude = 1.0, period = "60s", noise-stddev = 0.1 }}
"#,
            off = 10 * (i + 1)
        ));
    }
    text
}

/// Where the agent reads its readings from.
enum Source {
    /// Its embedded broker, listening on this port.
    Embedded(u16),
    /// An external broker (mosquitto) on this port, persistent session.
    External(u16),
}

fn agent_config(source: &Source, data_dir: &Path, uplink_port: u16, outbox: &str) -> String {
    let source = match source {
        Source::Embedded(port) => format!(
            r#"
[broker]
enabled = true
listen = "127.0.0.1:{port}"

[[broker.subscriptions]]
filter = "plant/+/+"
qos = 1
format = "json"
"#
        ),
        Source::External(port) => format!(
            r#"
[mqtt]
host = "127.0.0.1"
port = {port}
client-id = "{AGENT}-mqtt"
clean-session = false
keep-alive = "5s"
reconnect-backoff-min = "100ms"
reconnect-backoff-max = "1s"

[[mqtt.subscriptions]]
filter = "plant/+/+"
qos = 1
format = "json"
"#
        ),
    };
    format!(
        r#"
[agent]
id = "{AGENT}"
data-dir = "{dir}"

[window]
width = "1s"
allowed-lateness = "500ms"
idle-timeout = "2s"

[anomaly]
history = 8
warm-up = 5
{source}
[outbox]
{outbox}

[uplink]
url = "http://127.0.0.1:{uplink_port}"
token = "{TOKEN}"
backoff-min = "100ms"
backoff-max = "1s"
request-timeout = "5s"
"#,
        dir = data_dir.display()
    )
}

pub(crate) fn spawn_agent(
    config: &Path,
    tap: Option<&Path>,
    log: &Path,
    json_log: bool,
) -> ChildGuard {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open agent log");
    let mut cmd = Command::new(bin("millrace-agent"));
    if json_log {
        cmd.args(["--log-format", "json"]);
    }
    cmd.args(["run", "--config"]).arg(config);
    if let Some(tap) = tap {
        cmd.arg("--tap").arg(tap);
    }
    ChildGuard::spawn(
        "millrace-agent",
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr),
    )
}

/// Starts the simulator on a whole second (so its first window is complete).
pub(crate) fn spawn_sim(config: &Path, log: &Path) -> (ChildGuard, i64) {
    let start_ms = (millrace_sim::unix_now_ms() / 1000 + 1) * 1000;
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open sim log");
    let guard = ChildGuard::spawn(
        "millrace-sim",
        Command::new(bin("millrace-sim"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--start-ms", &start_ms.to_string(), "--no-rtu"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr),
    );
    (guard, start_ms)
}

fn port_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One chain test's set-up in `dir`: an aggregator (embedded log, or what
/// `aggregator_tables` configures) and an agent with a tap, reading its
/// embedded broker, which the simulator publishes to.
struct Rig {
    dir: PathBuf,
    agg_port: u16,
    mqtt_port: u16,
    agg_toml: PathBuf,
    agg_log: PathBuf,
    agent_toml: PathBuf,
    agent_log: PathBuf,
    tap: PathBuf,
}

impl Rig {
    /// Writes the aggregator's and the agent's configs.
    fn new(dir: &Path, aggregator_tables: &str) -> Self {
        let (agg_port, mqtt_port) = (free_port(), free_port());
        let agg_toml = dir.join("aggregator.toml");
        write_aggregator_config(
            &agg_toml,
            agg_port,
            &dir.join("agg-state"),
            &[(AGENT, TOKEN)],
            aggregator_tables,
        );
        let agent_toml = dir.join("agent.toml");
        std::fs::write(
            &agent_toml,
            agent_config(
                &Source::Embedded(mqtt_port),
                &dir.join("agent-state"),
                agg_port,
                "",
            ),
        )
        .unwrap();
        Self {
            dir: dir.to_owned(),
            agg_port,
            mqtt_port,
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

    /// Starts the agent (its log as JSON lines if `json_log`) and waits for
    /// its embedded broker.
    fn start_agent(&self, json_log: bool) -> ChildGuard {
        let agent = spawn_agent(&self.agent_toml, Some(&self.tap), &self.agent_log, json_log);
        wait_for_port(port_addr(self.mqtt_port), Duration::from_secs(20));
        agent
    }

    /// Waits (up to 60 s) until the embedded log holds at least `n` windows;
    /// returns how many it holds.
    fn wait_for_log_windows(&self, n: usize) -> usize {
        let have = wait_until_stable(
            || log_windows(&self.agg_toml).len(),
            |have| *have >= n,
            Duration::from_millis(500),
            Duration::ZERO,
            Duration::from_secs(60),
        );
        assert!(
            have >= n,
            "only {have} windows in the log, wanted {n}: {}",
            tail_of(&self.agent_log, 30)
        );
        have
    }

    /// Starts the simulator publishing `sensors` to the agent's broker.
    fn start_sim(&self, client_id: &str, sensors: &[String]) -> ChildGuard {
        let sim_toml = self.dir.join("sim.toml");
        std::fs::write(&sim_toml, sim_config(self.mqtt_port, client_id, sensors)).unwrap();
        spawn_sim(&sim_toml, &self.dir.join("sim.log")).0
    }
}

/// The window values in the aggregator's embedded log.
fn log_windows(agg_config: &Path) -> Vec<Value> {
    aggregator_tail(agg_config, WINDOWS_TOPIC)
        .into_iter()
        .map(|r| r["value"].clone())
        .collect()
}

/// The window lines of a tap file.
pub(crate) fn tap_windows(tap: &Path) -> Vec<Value> {
    follow_json_lines(tap, Duration::from_millis(1), |_| true)
        .into_iter()
        .filter(|r| r["type"] == "window")
        .collect()
}

pub(crate) type WindowKey = (String, i64);

pub(crate) fn key_of(w: &Value) -> WindowKey {
    (series_name(w), w["start_ms"].as_i64().expect("start_ms"))
}

pub(crate) fn key_set(ws: &[Value]) -> BTreeSet<WindowKey> {
    ws.iter().map(key_of).collect()
}

pub(crate) fn tail_of(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Per-window reading counts (`count`) that differ from a full window
/// (10 readings at 100 ms), excluding each series' first and last window.
fn short_windows(ws: &[Value]) -> Vec<(String, i64, u64)> {
    let mut by_series: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for w in ws {
        by_series.entry(series_name(w)).or_default().push(w);
    }
    let mut short = Vec::new();
    for (s, mut v) in by_series {
        v.sort_by_key(|w| w["start_ms"].as_i64());
        if v.len() < 3 {
            continue;
        }
        for w in &v[1..v.len() - 1] {
            let c = w["count"].as_u64().unwrap_or(0);
            if c != 10 {
                short.push((s.clone(), w["start_ms"].as_i64().unwrap_or(0), c));
            }
        }
    }
    short
}

/// Also: no window counts a reading twice (an inner window holds at most the
/// 10 readings the simulator published in it). After a SIGKILL between the
/// journal commit and the MQTT PUBACK, mosquitto redelivers readings the
/// journal already holds; the agent's redelivery guard must recognise them.
/// Fewer than 10 is printed, not asserted: a loaded simulator may skip ahead.
#[test]
fn kill_9_the_agent_twenty_times_loses_and_duplicates_no_window() {
    const SEED: u64 = 0x5EED_0009;
    const KILLS: usize = 20;
    let started = Instant::now();
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let agg_port = free_port();
    let agg_toml = dir.path().join("aggregator.toml");
    write_aggregator_config(
        &agg_toml,
        agg_port,
        &dir.path().join("agg-state"),
        &[(AGENT, TOKEN)],
        "",
    );
    let agg_log = dir.path().join("aggregator.log");
    let mut aggregator = start_aggregator(&agg_toml, agg_port, &agg_log);

    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        agent_config(
            &Source::External(mosquitto.port),
            &dir.path().join("agent-state"),
            agg_port,
            "",
        ),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");
    let mut agent = spawn_agent(&agent_toml, None, &agent_log, false);
    // Let the agent create its persistent session before anything is published.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.is_running(),
        "agent exited: {}",
        tail_of(&agent_log, 30)
    );

    let sensors = vec!["kiln-1/temp".to_string(), "kiln-1/pressure".to_string()];
    let sim_toml = dir.path().join("sim.toml");
    std::fs::write(
        &sim_toml,
        sim_config(mosquitto.port, "sim-chain-kill", &sensors),
    )
    .unwrap();
    let sim_log = dir.path().join("sim.log");
    let (mut sim, start_ms) = spawn_sim(&sim_toml, &sim_log);

    let mut rng = SeededRng::new(SEED);
    let mut kills = 0;
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.range(1000, 3000)));
        assert!(
            agent.is_running(),
            "agent exited by itself before kill {kills}: {}",
            tail_of(&agent_log, 30)
        );
        agent.kill(); // SIGKILL, reaped
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.range(0, 1500)));
        agent = spawn_agent(&agent_toml, None, &agent_log, false);
    }
    // A clean run, then the plant stops.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        agent.is_running(),
        "agent exited: {}",
        tail_of(&agent_log, 30)
    );
    sim.kill();
    let sim_stopped_ms = millrace_sim::unix_now_ms();

    // Idle close (2 s) + uplink drain: the log stops growing.
    let n = wait_until_stable(
        || log_windows(&agg_toml).len(),
        |n| *n > 0,
        Duration::from_millis(500),
        Duration::from_secs(6),
        Duration::from_secs(120),
    );
    assert!(
        n > 0,
        "no window reached the aggregator: {}",
        tail_of(&agent_log, 30)
    );
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "SIGTERM: clean exit 0; {}",
        tail_of(&agent_log, 30)
    );
    // Anything flushed at shutdown was sent (or stays in the outbox); give the
    // aggregator a moment, then read the log for good.
    std::thread::sleep(Duration::from_millis(500));
    let windows = log_windows(&agg_toml);
    assert!(
        aggregator.is_running(),
        "aggregator exited: {}",
        tail_of(&agg_log, 30)
    );
    aggregator.terminate(Duration::from_secs(10));

    let check = check_windows(&windows, WIDTH_MS);
    let short = short_windows(&windows);
    eprintln!(
        "kill -9 chain: seed {SEED:#x}, kills {kills}, windows {} in {} series {:?}, \
         duplicates {}, gaps {}, windows with count != 10 (inner) {}: {:?}, run {:?}",
        check.total,
        check.series.len(),
        check.series,
        check.duplicates.len(),
        check.gaps.len(),
        short.len(),
        short,
        started.elapsed()
    );
    assert_eq!(kills, KILLS);
    let records = aggregator_tail(&agg_toml, WINDOWS_TOPIC);
    for (_, series, start, _) in &check.duplicates {
        for r in records
            .iter()
            .filter(|r| series_name(&r["value"]) == *series && r["value"]["start_ms"] == *start)
        {
            eprintln!(
                "duplicate: offset {} seq {} count {} first {} last {} mean {}",
                r["offset"],
                r["headers"]["seq"],
                r["value"]["count"],
                r["value"]["first_event_ms"],
                r["value"]["last_event_ms"],
                r["value"]["mean"]
            );
        }
    }
    if std::env::var_os("MILLRACE_KEEP_TMP").is_some() {
        // Keep the agent's state and logs for a post-mortem.
        eprintln!("kept {}", dir.keep().display());
    }
    assert!(
        check.duplicates.is_empty(),
        "duplicate windows: {:?}",
        check.duplicates
    );
    assert!(check.gaps.is_empty(), "missing windows: {:?}", check.gaps);
    let counted_twice: Vec<_> = short.iter().filter(|(_, _, c)| *c > 10).collect();
    assert!(
        counted_twice.is_empty(),
        "windows counting a redelivered reading twice: {counted_twice:?}"
    );
    assert_eq!(
        check.series.len(),
        2,
        "both series arrived: {:?}",
        check.series
    );
    for (series, (first, last, n)) in &check.series {
        // Covers the whole run: from the sim's first second to its last ones.
        assert!(
            *first <= start_ms + 3 * WIDTH_MS,
            "{series}: first window {first}, sim started at {start_ms}"
        );
        assert!(
            *last >= sim_stopped_ms - 4 * WIDTH_MS,
            "{series}: last window {last}, sim stopped at {sim_stopped_ms}"
        );
        assert!(*n >= 40, "{series}: only {n} windows");
    }
    drop(mosquitto);
}

#[test]
fn aggregator_outage_backlog_drains() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::new(dir.path(), "");
    let (agg_toml, agg_log) = (&rig.agg_toml, &rig.agg_log);
    let (agent_log, tap) = (&rig.agent_log, &rig.tap);
    let mut aggregator = rig.start_aggregator();
    let mut agent = rig.start_agent(false);
    let sensors = vec!["line-2/speed".to_string(), "line-2/torque".to_string()];
    let mut sim = rig.start_sim("sim-chain-outage", &sensors);

    // Windows flow before the outage.
    rig.wait_for_log_windows(8);

    // 30 s outage.
    assert_eq!(
        aggregator.terminate(Duration::from_secs(15)),
        Some(0),
        "aggregator SIGTERM: exit 0; {}",
        tail_of(agg_log, 30)
    );
    let outage_from = millrace_sim::unix_now_ms();
    std::thread::sleep(Duration::from_secs(30));
    assert!(
        agent.is_running(),
        "agent died during the outage: {}",
        tail_of(agent_log, 30)
    );
    let produced_during = tap_windows(tap).len();
    let mut aggregator = rig.start_aggregator();
    let outage_to = millrace_sim::unix_now_ms();

    std::thread::sleep(Duration::from_secs(5));
    sim.kill();
    // Idle close (2 s): every window is closed and in the outbox.
    std::thread::sleep(Duration::from_secs(3));
    // Replay of the backlog.
    let tap_now = || key_set(&tap_windows(tap));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let produced = tap_now();
        let landed = key_set(&log_windows(agg_toml));
        if produced.len() > produced_during && produced.is_subset(&landed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not drained after 120 s: {} produced, {} landed, missing e.g. {:?}",
            produced.len(),
            landed.len(),
            produced.difference(&landed).take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "agent SIGTERM: exit 0; {}",
        tail_of(agent_log, 30)
    );
    std::thread::sleep(Duration::from_millis(500));
    let produced = tap_windows(tap);
    let landed = log_windows(agg_toml);
    aggregator.terminate(Duration::from_secs(10));

    let check = check_windows(&landed, WIDTH_MS);
    let tap_check = check_windows(&produced, WIDTH_MS);
    eprintln!(
        "aggregator outage: {} windows produced, {} landed, {:?}, duplicates {}, gaps {}, \
         outage {} ms, run {:?}",
        produced.len(),
        landed.len(),
        check.series,
        check.duplicates.len(),
        check.gaps.len(),
        outage_to - outage_from,
        started.elapsed()
    );
    assert!(
        check.duplicates.is_empty(),
        "duplicates in the log: {:?}",
        check.duplicates
    );
    assert!(check.gaps.is_empty(), "gaps in the log: {:?}", check.gaps);
    assert!(
        tap_check.duplicates.is_empty(),
        "agent emitted twice: {:?}",
        tap_check.duplicates
    );
    let (p, l) = (key_set(&produced), key_set(&landed));
    assert_eq!(
        p.difference(&l).collect::<Vec<_>>(),
        Vec::<&WindowKey>::new(),
        "produced but not in the log"
    );
    assert_eq!(
        l.difference(&p).collect::<Vec<_>>(),
        Vec::<&WindowKey>::new(),
        "in the log but never produced"
    );
    assert_eq!(check.series.len(), 2);
    for (series, (first, last, _)) in &check.series {
        assert!(
            *first < outage_from - 2 * WIDTH_MS && *last > outage_to,
            "{series}: windows {first}..{last} do not span the outage {outage_from}..{outage_to}"
        );
    }
}

#[test]
fn sigterm_sends_the_flushed_windows_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::new(dir.path(), "");
    let (agg_toml, agent_log, tap) = (&rig.agg_toml, &rig.agent_log, &rig.tap);
    let mut aggregator = rig.start_aggregator();
    let mut agent = rig.start_agent(true);
    let sensors = vec!["oven-4/temp".to_string(), "oven-4/humidity".to_string()];
    let _sim = rig.start_sim("sim-chain-stop", &sensors);
    rig.wait_for_log_windows(6);
    // Mid-window: both series have an open window with readings in it.
    let now = millrace_sim::unix_now_ms();
    std::thread::sleep(Duration::from_millis(
        (1_450 - now.rem_euclid(WIDTH_MS)) as u64 % WIDTH_MS as u64,
    ));
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "agent SIGTERM: exit 0; {}",
        tail_of(agent_log, 30)
    );
    // The agent is gone: what is in the log now is all it sent.
    let produced = tap_windows(tap);
    let landed = log_windows(agg_toml);
    aggregator.terminate(Duration::from_secs(10));
    let (p, l) = (key_set(&produced), key_set(&landed));
    let missing: Vec<_> = p.difference(&l).collect();
    let stopped: Vec<Value> = follow_json_lines(agent_log, Duration::from_millis(1), |_| true)
        .into_iter()
        .filter(|r| r["message"] == "uplink stopped")
        .collect();
    eprintln!(
        "stop: {} windows produced, {} landed, missing {:?}, uplink: {:?}",
        p.len(),
        l.len(),
        missing,
        stopped
    );
    assert!(
        missing.is_empty(),
        "flushed but not sent before exit: {missing:?}"
    );
    assert_eq!(stopped.len(), 1, "{}", tail_of(agent_log, 30));
    assert_eq!(stopped[0]["stopped"], "outbox empty", "{stopped:?}");
    // The windows flushed at the stop are partial (cut mid-window), and sent.
    let last_start = produced
        .iter()
        .filter_map(|w| w["start_ms"].as_i64())
        .max()
        .unwrap();
    let partial: Vec<_> = landed
        .iter()
        .filter(|w| w["start_ms"].as_i64() == Some(last_start))
        .collect();
    assert_eq!(
        partial.len(),
        2,
        "both series' flushed windows landed: {partial:?}"
    );
    assert!(
        partial.iter().all(|w| w["count"].as_u64().unwrap() < 10),
        "{partial:?}"
    );

    // Restarted, the agent scores at once: the baselines saved at the stop
    // are resumed, no second warm-up (5 windows here).
    let tap2 = dir.path().join("tap2.jsonl");
    let mut agent = spawn_agent(&rig.agent_toml, Some(&tap2), agent_log, true);
    let after: Vec<Value> = follow_json_lines(&tap2, Duration::from_secs(30), |seen| {
        seen.iter().filter(|r| r["type"] == "window").count() >= 4
    })
    .into_iter()
    .filter(|r| r["type"] == "window")
    .collect();
    assert!(after.len() >= 4, "{}", tail_of(agent_log, 30));
    assert!(
        after.iter().all(|w| !w["score"].is_null()),
        "windows right after the restart are scored: {after:?}"
    );
    let resumed: Vec<Value> = follow_json_lines(agent_log, Duration::from_millis(1), |_| true)
        .into_iter()
        .filter(|r| r["message"] == "anomaly baselines resumed from the last run")
        .collect();
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["restored"], 2, "{resumed:?}");
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}

/// Kafka windows: the value plus the agent and seq headers, checked.
pub(crate) fn kafka_windows(port: u16) -> Vec<Value> {
    kafka_read(port, WINDOWS_TOPIC, 1.5)
}

pub(crate) fn kafka_keys(records: &[Value]) -> BTreeSet<WindowKey> {
    records.iter().map(|r| key_of(&r["value"])).collect()
}

/// Waits (bounded) until every window of `taps` is in Kafka; returns Kafka's records.
fn wait_kafka_has(port: u16, taps: &[&Path], timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let want: BTreeSet<WindowKey> =
            taps.iter().flat_map(|t| key_set(&tap_windows(t))).collect();
        let records = kafka_windows(port);
        let have = kafka_keys(&records);
        if !want.is_empty() && want.is_subset(&have) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "Kafka lacks {} of {} tapped windows after {timeout:?}, e.g. {:?}",
            want.difference(&have).count(),
            want.len(),
            want.difference(&have).take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn kafka_gets_exactly_the_expected_windows() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let tansu_dir = dir.path().join("tansu");
    let kafka = KafkaPeer::start(&tansu_dir, None);
    let (agg_port, mqtt_port) = (free_port(), free_port());
    let agg_toml = dir.path().join("aggregator.toml");
    write_aggregator_config(
        &agg_toml,
        agg_port,
        &dir.path().join("agg-state"),
        &[(AGENT, TOKEN)],
        &format!(
            "[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"3s\"\n",
            kafka.port
        ),
    );
    let agg_log = dir.path().join("aggregator.log");
    let mut aggregator = start_aggregator(&agg_toml, agg_port, &agg_log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(agg_port, "/healthz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "aggregator /healthz not 200 with Kafka up: {:?}; {}",
            http_status(agg_port, "/healthz"),
            tail_of(&agg_log, 30)
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        agent_config(
            &Source::Embedded(mqtt_port),
            &dir.path().join("agent-state"),
            agg_port,
            "",
        ),
    )
    .unwrap();
    let sensors = vec!["mill-5/load".to_string(), "mill-5/temp".to_string()];
    let sim_toml = dir.path().join("sim.toml");
    std::fs::write(
        &sim_toml,
        sim_config(mqtt_port, "sim-chain-kafka", &sensors),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");
    let sim_log = dir.path().join("sim.log");

    // Phase 1: 10 s of plant, then the agent stops cleanly.
    let tap1 = dir.path().join("tap1.jsonl");
    let mut agent = spawn_agent(&agent_toml, Some(&tap1), &agent_log, false);
    wait_for_port(port_addr(mqtt_port), Duration::from_secs(20));
    let (mut sim, _) = spawn_sim(&sim_toml, &sim_log);
    std::thread::sleep(Duration::from_secs(10));
    sim.kill();
    std::thread::sleep(Duration::from_secs(3)); // idle close
    wait_kafka_has(kafka.port, &[&tap1], Duration::from_secs(60));
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "agent SIGTERM: exit 0; {}",
        tail_of(&agent_log, 30)
    );
    let phase1 = kafka_windows(kafka.port);
    let tapped1 = tap_windows(&tap1);
    let c1 = check_windows(phase1.iter().map(|r| &r["value"]), WIDTH_MS);
    assert!(
        tapped1.len() >= 16,
        "phase 1 produced only {} windows",
        tapped1.len()
    );
    assert_eq!(
        kafka_keys(&phase1),
        key_set(&tapped1),
        "phase 1: Kafka == tap"
    );
    assert!(
        c1.duplicates.is_empty(),
        "phase 1 duplicates: {:?}",
        c1.duplicates
    );
    assert_eq!(
        phase1.len(),
        tapped1.len(),
        "phase 1: one Kafka record per window"
    );

    // Phase 2: the agent runs again; Kafka goes away for a while.
    let tap2 = dir.path().join("tap2.jsonl");
    let mut agent = spawn_agent(&agent_toml, Some(&tap2), &agent_log, false);
    wait_for_port(port_addr(mqtt_port), Duration::from_secs(20));
    let (mut sim, _) = spawn_sim(&sim_toml, &sim_log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tap_windows(&tap2).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "phase 2: no windows; {}",
            tail_of(&agent_log, 30)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_kafka_has(kafka.port, &[&tap2], Duration::from_secs(60));

    kafka.stop();
    let outage_start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut health = http_status(agg_port, "/healthz");
    while health != Some(503) {
        assert!(
            Instant::now() < deadline,
            "aggregator /healthz is {health:?} 60 s after Kafka stopped; {}",
            tail_of(&agg_log, 30)
        );
        std::thread::sleep(Duration::from_millis(250));
        health = http_status(agg_port, "/healthz");
    }
    let time_to_503 = outage_start.elapsed();
    let tapped_at_503 = tap_windows(&tap2).len();
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        agent.is_running(),
        "agent died during the Kafka outage: {}",
        tail_of(&agent_log, 30)
    );
    assert!(
        aggregator.is_running(),
        "aggregator died during the Kafka outage: {}",
        tail_of(&agg_log, 30)
    );
    let tapped_in_outage = tap_windows(&tap2).len() - tapped_at_503;
    assert!(
        tapped_in_outage >= 10,
        "the agent kept producing: {tapped_in_outage}"
    );

    let kafka = KafkaPeer::start(&tansu_dir, Some(kafka.port));
    let deadline = Instant::now() + Duration::from_secs(90);
    while http_status(agg_port, "/healthz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "aggregator /healthz not back to 200 after Kafka restarted; {}",
            tail_of(&agg_log, 30)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(3));
    sim.kill();
    std::thread::sleep(Duration::from_secs(3)); // idle close
    wait_kafka_has(kafka.port, &[&tap1, &tap2], Duration::from_secs(90));
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "agent SIGTERM: exit 0; {}",
        tail_of(&agent_log, 30)
    );
    std::thread::sleep(Duration::from_secs(1));
    let all = kafka_windows(kafka.port);
    assert!(
        aggregator.is_running(),
        "aggregator exited: {}",
        tail_of(&agg_log, 30)
    );
    aggregator.terminate(Duration::from_secs(10));

    let mut tapped = tap_windows(&tap1);
    tapped.extend(tap_windows(&tap2));
    let check = check_windows(all.iter().map(|r| &r["value"]), WIDTH_MS);
    let mut seqs = BTreeMap::new();
    for r in &all {
        assert_eq!(r["headers"]["agent"], AGENT, "agent header: {r}");
        assert_eq!(r["headers"]["kind"], "window", "kind header: {r}");
        let seq: u64 = r["headers"]["seq"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("seq header: {r}"));
        *seqs.entry(seq).or_insert(0usize) += 1;
        assert_eq!(
            r["key"].as_str(),
            Some(series_name(&r["value"]).as_str()),
            "key = series: {r}"
        );
    }
    let dup_seqs: Vec<_> = seqs.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "kafka chain: {} windows tapped, {} in Kafka ({} in phase 1), duplicates {}, \
         duplicate seqs {}, windows tapped during the outage {tapped_in_outage}, \
         /healthz 503 after {time_to_503:?}, run {:?}",
        tapped.len(),
        all.len(),
        phase1.len(),
        check.duplicates.len(),
        dup_seqs.len(),
        started.elapsed()
    );
    assert!(
        check.duplicates.is_empty(),
        "duplicate windows in Kafka: {:?}",
        check.duplicates
    );
    assert!(dup_seqs.is_empty(), "seq written twice: {dup_seqs:?}");
    let (want, have) = (key_set(&tapped), kafka_keys(&all));
    assert_eq!(
        want.difference(&have).collect::<Vec<_>>(),
        Vec::<&WindowKey>::new(),
        "tapped but not in Kafka"
    );
    assert_eq!(
        have.difference(&want).collect::<Vec<_>>(),
        Vec::<&WindowKey>::new(),
        "in Kafka but never tapped"
    );
    assert_eq!(all.len(), tapped.len(), "one Kafka record per window");
}

/// The `outbox full` warnings of a JSON agent log: (lines, records dropped).
fn dropped_in_log(log: &Path) -> (usize, u64, Vec<Value>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .or_else(|| v["fields"]["message"].as_str())
                .is_some_and(|m| m.contains("outbox full: dropped oldest records"))
        })
        .collect();
    let dropped = lines
        .iter()
        .map(|v| {
            v["dropped"]
                .as_u64()
                .or_else(|| v["fields"]["dropped"].as_u64())
                .unwrap_or(0)
        })
        .sum();
    (lines.len(), dropped, lines)
}

#[test]
fn full_outbox_drops_oldest_and_counts() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (agg_port, mqtt_port) = (free_port(), free_port());
    let agent_toml = dir.path().join("agent.toml");
    // 64 KiB is the smallest cap the store accepts (agent/src/store/config.rs).
    std::fs::write(
        &agent_toml,
        agent_config(
            &Source::Embedded(mqtt_port),
            &dir.path().join("agent-state"),
            agg_port,
            "max-bytes = \"64KiB\"\nwhen-full = \"drop-oldest\"\n",
        ),
    )
    .unwrap();
    let (agent_log, tap) = (dir.path().join("agent.log"), dir.path().join("tap.jsonl"));
    let mut agent = spawn_agent(&agent_toml, Some(&tap), &agent_log, true);
    wait_for_port(port_addr(mqtt_port), Duration::from_secs(20));

    // 20 series: 20 windows a second fill 64 KiB within seconds.
    let sensors: Vec<String> = (0..20)
        .map(|i| format!("rack-{}/cell-{i}", i / 5))
        .collect();
    let sim_toml = dir.path().join("sim.toml");
    std::fs::write(&sim_toml, sim_config(mqtt_port, "sim-chain-full", &sensors)).unwrap();
    let (mut sim, _) = spawn_sim(&sim_toml, &dir.path().join("sim.log"));

    // Nothing listens on agg_port: the outbox fills and drops.
    let deadline = Instant::now() + Duration::from_secs(120);
    while dropped_in_log(&agent_log).1 == 0 {
        assert!(
            agent.is_running(),
            "agent exited with a full outbox: {}",
            tail_of(&agent_log, 30)
        );
        assert!(
            Instant::now() < deadline,
            "no `outbox full: dropped oldest records` after 120 s ({} windows tapped); {}",
            tap_windows(&tap).len(),
            tail_of(&agent_log, 20)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Keep overflowing for a while.
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        agent.is_running(),
        "agent exited with a full outbox: {}",
        tail_of(&agent_log, 30)
    );
    sim.kill();
    std::thread::sleep(Duration::from_secs(4)); // idle close: the last windows join the outbox

    let produced_before_agg = tap_windows(&tap);
    let (drop_lines, dropped, _) = dropped_in_log(&agent_log);

    // Now the aggregator comes up on the uplink's port.
    let agg_toml = dir.path().join("aggregator.toml");
    write_aggregator_config(
        &agg_toml,
        agg_port,
        &dir.path().join("agg-state"),
        &[(AGENT, TOKEN)],
        "",
    );
    let agg_log = dir.path().join("aggregator.log");
    let mut aggregator = start_aggregator(&agg_toml, agg_port, &agg_log);
    let landed_n = wait_until_stable(
        || log_windows(&agg_toml).len(),
        |n| *n > 0,
        Duration::from_millis(500),
        Duration::from_secs(4),
        Duration::from_secs(90),
    );
    assert!(landed_n > 0, "nothing arrived: {}", tail_of(&agent_log, 20));
    assert!(
        agent.is_running(),
        "agent exited: {}",
        tail_of(&agent_log, 30)
    );
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "agent SIGTERM: exit 0; {}",
        tail_of(&agent_log, 30)
    );
    std::thread::sleep(Duration::from_millis(500));
    let landed = log_windows(&agg_toml);
    aggregator.terminate(Duration::from_secs(10));
    let produced = tap_windows(&tap);
    let dead_letters = follow_json_lines(&tap, Duration::from_millis(1), |_| true)
        .iter()
        .filter(|r| r["type"] == "dead-letter")
        .count();
    let (_, dropped_total, drop_records) = dropped_in_log(&agent_log);

    let check = check_windows(&landed, WIDTH_MS);
    // The oldest were dropped: what landed is the newest part of what was produced.
    let landed_keys = key_set(&landed);
    let first_landed = produced
        .iter()
        .position(|w| landed_keys.contains(&key_of(w)))
        .expect("a landed window was produced");
    let suffix = key_set(&produced[first_landed..]);
    eprintln!(
        "full outbox: {} windows produced ({} before the aggregator came up), {} landed, \
         {} dropped in {} log lines (first: {}), dead letters {dead_letters}, \
         duplicates {}, landed windows not the newest suffix: {}, run {:?}",
        produced.len(),
        produced_before_agg.len(),
        landed.len(),
        dropped_total,
        drop_lines,
        drop_records
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        check.duplicates.len(),
        suffix.difference(&landed_keys).count(),
        started.elapsed()
    );
    assert!(dropped > 0);
    assert!(
        check.duplicates.is_empty(),
        "duplicates: {:?}",
        check.duplicates
    );
    assert!(
        landed.len() < produced.len(),
        "fewer windows landed ({}) than produced ({})",
        landed.len(),
        produced.len()
    );
    assert!(
        landed_keys.is_subset(&key_set(&produced)),
        "landed windows the agent never produced"
    );
    assert!(first_landed > 0, "the oldest windows were dropped");
    assert_eq!(
        suffix.difference(&landed_keys).collect::<Vec<_>>(),
        Vec::<&WindowKey>::new(),
        "every window newer than the oldest landed one arrived"
    );
    // Every produced window is accounted for: landed or counted as dropped.
    assert_eq!(
        produced.len() as u64 + dead_letters as u64,
        landed.len() as u64 + dropped_total,
        "produced = landed + dropped (bulk lane)"
    );
}

#[test]
fn kafka_survives_kill_9_of_the_aggregator() {
    const SEED: u64 = 0x5EED_0A66;
    const KILLS: usize = 8;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let kafka = KafkaPeer::start(&dir.path().join("tansu"), None);
    let rig = Rig::new(
        dir.path(),
        &format!(
            "[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"5s\"\n",
            kafka.port
        ),
    );
    let (agg_log, agent_log, tap) = (&rig.agg_log, &rig.agent_log, &rig.tap);
    let mut aggregator = rig.start_aggregator();
    let mut agent = rig.start_agent(false);
    // Four series at 10 Hz and 1 s windows: a batch every few hundred ms.
    let sensors: Vec<String> = (1..=4).map(|i| format!("press-7/s{i}")).collect();
    let mut sim = rig.start_sim("sim-chain-agg-kill", &sensors);

    let mut rng = SeededRng::new(SEED);
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.range(1000, 3000)));
        assert!(
            aggregator.is_running(),
            "aggregator exited by itself before kill {kill}: {}",
            tail_of(agg_log, 30)
        );
        aggregator.kill(); // SIGKILL, reaped
        std::thread::sleep(Duration::from_millis(rng.range(0, 800)));
        aggregator = rig.start_aggregator();
    }
    std::thread::sleep(Duration::from_secs(3));
    sim.kill();
    std::thread::sleep(Duration::from_secs(3)); // idle close
    wait_kafka_has(kafka.port, &[tap.as_path()], Duration::from_secs(90));
    assert_eq!(
        agent.terminate(Duration::from_secs(30)),
        Some(0),
        "agent SIGTERM: exit 0; {}",
        tail_of(agent_log, 30)
    );
    std::thread::sleep(Duration::from_secs(1));
    let all = kafka_windows(kafka.port);
    aggregator.terminate(Duration::from_secs(10));

    let tapped = tap_windows(tap);
    let mut seqs = BTreeMap::new();
    for r in &all {
        let seq: u64 = r["headers"]["seq"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("seq header: {r}"));
        *seqs.entry(seq).or_insert(0usize) += 1;
    }
    let dup_seqs: Vec<_> = seqs.iter().filter(|(_, n)| **n > 1).collect();
    let check = check_windows(all.iter().map(|r| &r["value"]), WIDTH_MS);
    let log_text = std::fs::read_to_string(agg_log).unwrap_or_default();
    let reconciled_starts = log_text
        .lines()
        .filter(|l| l.contains("dedup state was behind the log"))
        .count();
    let read_backs = log_text
        .lines()
        .filter(|l| l.contains("kafka read back from the saved frontier"))
        .count();
    eprintln!(
        "kafka aggregator kill -9: seed {SEED:#x}, kills {KILLS}, {} windows tapped, {} in \
         Kafka, duplicate windows {}, duplicate seqs {}, starts that reconciled records \
         {reconciled_starts} of {read_backs}, run {:?}",
        tapped.len(),
        all.len(),
        check.duplicates.len(),
        dup_seqs.len(),
        started.elapsed()
    );
    assert_eq!(read_backs, KILLS + 1, "every start read Kafka back");
    assert!(tapped.len() >= 60, "only {} windows tapped", tapped.len());
    assert!(dup_seqs.is_empty(), "seq written twice: {dup_seqs:?}");
    assert!(
        check.duplicates.is_empty(),
        "duplicate windows in Kafka: {:?}",
        check.duplicates
    );
    let (want, have) = (key_set(&tapped), kafka_keys(&all));
    assert_eq!(
        want.difference(&have).collect::<Vec<_>>(),
        Vec::<&WindowKey>::new(),
        "tapped but not in Kafka"
    );
    assert_eq!(all.len(), tapped.len(), "one Kafka record per window");
}
