//! Faults, measured, against the real binaries and mosquitto (tests named `faults_*`: `cargo test -p millrace-tests --test e2e faults`).
//! Each prints its figures at the end.
//!
//! - `faults_a_poison_message_from_an_external_broker_is_one_dead_letter_and_never_comes_back`:
//!   a 256 KiB `json-multi` message of ~37,000 empty-string fields, QoS 1, from
//!   mosquitto: the agent stays up with its peak RSS far under the unit's
//!   `MemoryMax` (256 MiB), writes one dead letter, acknowledges the message,
//!   keeps reading what follows, and after a restart on the same persistent
//!   session the message is not delivered again (no crash loop).
//! - `faults_far_future_and_1970_timestamps_leave_the_other_windows_unchanged`:
//!   40 live readings with one stamped in 2090 and one in 1970 mixed in, to
//!   the agent's ingest listener: both strays are `clock-skew` dead letters,
//!   the tapped windows hold exactly the 40 (count and sum), none elsewhere.
//!
//! - `faults_a_whole_batch_rejection_deletes_no_record`: an aggregator that
//!   answers every send `400` with scope `batch` (an unreadable wire version):
//!   the agent keeps every record (outbox count never falls, no record
//!   rejected), and once a real aggregator takes its port every tapped window
//!   lands once.
//!
//! - `faults_a_full_state_file_system_holds_ingest_and_delivers_everything_once_space_returns`:
//!   the agent's state directory on a 48 MiB tmpfs, readings from mosquitto
//!   (QoS 1, persistent session), an aggregator up. The file system is
//!   filled, 300 more readings are published: the agent acknowledges none of
//!   them, exits 75 without a panic, and started again (as systemd would)
//!   waits or exits 75 again while the disk stays full. Once the filler is
//!   deleted every reading published, before and during the full disk, is in
//!   the aggregator's log exactly once (window counts and sums per series).
//! - `faults_a_full_aggregator_log_directory_answers_503_and_the_records_land_once_after_space_returns`:
//!   the aggregator's data directory (embedded log and dedup state) on a
//!   16 MiB tmpfs, filled: every send is answered `503`, the agent keeps its
//!   records (outbox never empties, none rejected), and once the filler is
//!   deleted every tapped window is in the log exactly once.
//! - `faults_a_dedup_save_failure_then_a_resend_and_a_crash_writes_no_duplicate`:
//!   the dedup directory alone on a full tmpfs, so the log write of a batch
//!   succeeds and its dedup save fails (`503`); the agent resends, the
//!   aggregator is killed (`kill -9`) while its state is unsaved, space
//!   returns, it starts again: every tapped window is in the log exactly once.
//!
//! Every wait is on a condition (a port, a counter, a process) with a deadline.

use millrace_tests::{bin, free_port, metric_total, require_program, ChildGuard, Mosquitto};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn agent_config(mqtt_port: u16, http_port: u16, data_dir: &Path) -> String {
    format!(
        r#"
[agent]
id = "gw-faults"
data-dir = "{dir}"

[broker]
enabled = false

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
client-id = "gw-faults-mqtt"
clean-session = false
keep-alive = "5s"
reconnect-backoff-min = "100ms"
reconnect-backoff-max = "1s"

[[mqtt.subscriptions]]
filter = "plant/+/state"
qos = 1
format = "json-multi"

[http]
listen = "127.0.0.1:{http_port}"
"#,
        dir = data_dir.display()
    )
}

fn spawn_agent(config: &Path, log: &Path) -> ChildGuard {
    spawn_agent_tapped(config, log, None)
}

/// The agent binary on `config`, stderr appended to `log`, windows to `tap`.
fn spawn_agent_tapped(config: &Path, log: &Path, tap: Option<&Path>) -> ChildGuard {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open agent log");
    let mut cmd = Command::new(bin("millrace-agent"));
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

/// Publishes each line as one QoS 1 message on `topic` (`mosquitto_pub -l`).
fn publish_lines(port: u16, topic: &str, lines: &[String]) {
    use std::io::Write;
    let exe = require_program("mosquitto_pub", "mosquitto-clients");
    let mut publisher = Command::new(exe)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", topic, "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    let mut stdin = publisher.stdin.take().expect("piped stdin");
    stdin
        .write_all((lines.join("\n") + "\n").as_bytes())
        .expect("write to mosquitto_pub");
    drop(stdin);
    assert!(publisher.wait().expect("mosquitto_pub exits").success());
}

fn publish(port: u16, topic: &str, payload: &Path) {
    let exe = require_program("mosquitto_pub", "mosquitto-clients");
    let status = Command::new(exe)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-f",
        ])
        .arg(payload)
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed: {status}");
}

fn wait_until(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    wait_or_show(what, within, None, cond);
}

/// Waits for `cond`; on timeout the panic shows the end of `log`.
fn wait_or_show(what: &str, within: Duration, log: Option<&Path>, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            let text = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!("timed out waiting for {what}\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `VmHWM` of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn faults_a_poison_message_from_an_external_broker_is_one_dead_letter_and_never_comes_back() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(broker.port, http_port, &dir.path().join("state")),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = spawn_agent(&config, &log);
    millrace_tests::wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], http_port)),
        Duration::from_secs(30),
    );
    wait_until("the agent's MQTT session", Duration::from_secs(30), || {
        metric_total(http_port, "millrace_mqtt_connected") >= 1.0
    });

    // A good message first: the subscription is in place once it is read.
    let good = dir.path().join("good.json");
    let ts = millrace_sim::unix_now_ms();
    std::fs::write(&good, format!(r#"{{"ts": {ts}, "humidity": 45.0}}"#)).unwrap();
    publish(broker.port, "plant/env-1/state", &good);
    wait_until("the first reading", Duration::from_secs(30), || {
        metric_total(http_port, "millrace_readings_accepted_total") >= 1.0
    });

    // The poison: 256 KiB of empty-string fields.
    let mut poison = String::from("{");
    let mut i = 0;
    while poison.len() < 256 * 1024 - 16 {
        if i > 0 {
            poison.push(',');
        }
        poison.push_str(&format!("\"f{i}\":\"\""));
        i += 1;
    }
    poison.push('}');
    let fields = i;
    let poison_file = dir.path().join("poison.json");
    std::fs::write(&poison_file, &poison).unwrap();
    let dead_before = metric_total(http_port, "millrace_decode_errors_total");
    let acks_before = metric_total(http_port, "millrace_mqtt_acks_total");
    publish(broker.port, "plant/env-1/state", &poison_file);
    wait_until("the poison's dead letter", Duration::from_secs(30), || {
        metric_total(http_port, "millrace_decode_errors_total") > dead_before
    });
    wait_until("the poison's PUBACK", Duration::from_secs(30), || {
        metric_total(http_port, "millrace_mqtt_acks_total") > acks_before
    });
    // Still reading: a good message after it lands.
    let accepted = metric_total(http_port, "millrace_readings_accepted_total");
    let ts = millrace_sim::unix_now_ms();
    std::fs::write(&good, format!(r#"{{"ts": {ts}, "humidity": 46.0}}"#)).unwrap();
    publish(broker.port, "plant/env-1/state", &good);
    wait_until(
        "a reading after the poison",
        Duration::from_secs(30),
        || metric_total(http_port, "millrace_readings_accepted_total") > accepted,
    );
    let dead = metric_total(http_port, "millrace_decode_errors_total") - dead_before;
    assert_eq!(dead, 1.0, "one dead letter for the whole message");
    assert!(agent.is_running(), "the agent stays up");
    let rss_kib = peak_rss_kib(agent.pid());
    assert!(
        rss_kib < 128 * 1024,
        "peak RSS {rss_kib} KiB is not far under MemoryMax=256M"
    );

    // Restart on the same persistent session: the poison was acknowledged,
    // so the broker does not deliver it again.
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    let mut agent = spawn_agent(&config, &log);
    millrace_tests::wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], http_port)),
        Duration::from_secs(30),
    );
    let ts = millrace_sim::unix_now_ms();
    std::fs::write(&good, format!(r#"{{"ts": {ts}, "humidity": 47.0}}"#)).unwrap();
    publish(broker.port, "plant/env-1/state", &good);
    // Decoded, not necessarily accepted: stopping flushed the open window,
    // so a reading in that same window is now `late`. Anything redelivered
    // would have come before it.
    wait_or_show(
        "a reading after the restart",
        Duration::from_secs(30),
        Some(&log),
        || metric_total(http_port, "millrace_readings_in_total") >= 1.0,
    );
    let redelivered = metric_total(http_port, "millrace_decode_errors_total");
    assert_eq!(redelivered, 0.0, "the poison came back after the restart");
    assert!(agent.is_running());
    agent.terminate(Duration::from_secs(20));
    eprintln!(
        "faults figures: poison of {} bytes, {fields} fields -> {dead} dead letter, \
         acknowledged; agent peak RSS {:.1} MiB (MemoryMax 256 MiB); not redelivered \
         after a restart",
        poison.len(),
        rss_kib as f64 / 1024.0
    );
}

fn listener_config(mqtt_port: u16, http_port: u16, data_dir: &Path) -> String {
    format!(
        r#"
[agent]
id = "gw-faults-clock"
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

[http]
listen = "127.0.0.1:{http_port}"
"#,
        dir = data_dir.display()
    )
}

#[test]
fn faults_far_future_and_1970_timestamps_leave_the_other_windows_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, http_port) = (free_port(), free_port());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        listener_config(mqtt_port, http_port, &dir.path().join("state")),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let tap = dir.path().join("tap.jsonl");
    let mut agent = spawn_agent_tapped(&config, &log, Some(&tap));
    for port in [mqtt_port, http_port] {
        millrace_tests::wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        );
    }
    // A live stream of 40 readings, 100 ms apart, ending now; a reading
    // stamped in 2090 after the 10th and one stamped in 1970 after the 20th.
    let now = millrace_sim::unix_now_ms();
    let base = now - 4_000;
    let mut lines = Vec::new();
    let mut sum = 0.0;
    for i in 0..40 {
        let value = 20.0 + f64::from(i) / 4.0;
        sum += value;
        lines.push(format!(
            r#"{{"ts": {}, "value": {value}}}"#,
            base + i64::from(i) * 100
        ));
        if i == 10 {
            lines.push(r#"{"ts": 3786912000000, "value": 1e6}"#.to_string());
        }
        if i == 20 {
            lines.push(r#"{"ts": 1000, "value": -1e6}"#.to_string());
        }
    }
    publish_lines(mqtt_port, "sensors/kiln-2/temp", &lines);
    wait_until(
        "40 readings and 2 dead letters",
        Duration::from_secs(30),
        || {
            metric_total(http_port, "millrace_readings_accepted_total") >= 40.0
                && metric_total(http_port, "millrace_window_dead_letters_total") >= 2.0
        },
    );
    let (_, body) = millrace_tests::http_request(http_port, "GET", "/metrics", &[], b"");
    let skewed: f64 = body
        .lines()
        .filter(|l| l.starts_with("millrace_window_dead_letters_total") && l.contains("clock-skew"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(skewed, 2.0, "both strays are clock-skew dead letters");
    // SIGTERM flushes every open window to the tap.
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    let text = std::fs::read_to_string(&tap).unwrap();
    let windows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "window" && v["series"]["device"] == "kiln-2")
        .collect();
    let count: u64 = windows.iter().map(|w| w["count"].as_u64().unwrap()).sum();
    let total: f64 = windows
        .iter()
        .map(|w| w["mean"].as_f64().unwrap() * w["count"].as_f64().unwrap())
        .sum();
    assert_eq!(count, 40, "{windows:#?}");
    assert!((total - sum).abs() < 1e-6, "sum {total} != {sum}");
    for w in &windows {
        let start = w["start_ms"].as_i64().unwrap();
        assert!(
            (base - 5_000..=now + 5_000).contains(&start),
            "a window at {start} outside the live stream"
        );
    }
    eprintln!(
        "faults figures: 40 live readings in {} windows (sum of values exact), \
         2 clock-skew dead letters (2090 and 1970), no stray window",
        windows.len()
    );
}

/// Answers every request `400` with scope `batch`, as an aggregator that
/// cannot read a batch's wire version does; counts the requests. Stops
/// listening once `stop` is set and one more connection arrives.
fn rejecting_aggregator(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&seen);
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            // Read the headers, then the body of Content-Length bytes.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let head_end = loop {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + length {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            count.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"error":"invalid batch: unsupported wire version 9","scope":"batch"}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (seen, handle)
}

#[test]
fn faults_a_whole_batch_rejection_deletes_no_record() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, http_port, agg_port) = (free_port(), free_port(), free_port());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (requests, fake) = rejecting_aggregator(agg_port, std::sync::Arc::clone(&stop));
    let token = "faults-test-token-0123456789abcdef";
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[uplink]\nurl = \"http://127.0.0.1:{agg_port}\"\ntoken = \"{token}\"\n\
             backoff-min = \"100ms\"\nbackoff-max = \"500ms\"\n",
            listener_config(mqtt_port, http_port, &dir.path().join("state"))
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let tap = dir.path().join("tap.jsonl");
    let mut agent = spawn_agent_tapped(&config, &log, Some(&tap));
    for port in [mqtt_port, http_port] {
        millrace_tests::wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        );
    }
    // 60 readings over the last 12 s: the earlier windows close at once.
    let now = millrace_sim::unix_now_ms();
    let lines: Vec<String> = (0..60)
        .map(|i| format!(r#"{{"ts": {}, "value": {i}}}"#, now - 12_000 + i * 200))
        .collect();
    publish_lines(mqtt_port, "sensors/kiln-3/temp", &lines);
    wait_or_show(
        "three rejected sends",
        Duration::from_secs(30),
        Some(&log),
        || metric_total(http_port, "millrace_uplink_kept_batches_total") >= 3.0,
    );
    let held = metric_total(http_port, "millrace_outbox_records");
    assert!(held > 0.0, "the outbox holds the rejected records");
    wait_until("three more rejected sends", Duration::from_secs(30), || {
        metric_total(http_port, "millrace_uplink_kept_batches_total") >= 6.0
    });
    assert!(metric_total(http_port, "millrace_outbox_records") >= held);
    assert_eq!(
        metric_total(http_port, "millrace_uplink_rejected_records_total"),
        0.0,
        "a batch-level rejection deleted records"
    );
    let rejected_sends = requests.load(Ordering::SeqCst);

    // The aggregator is fixed: the same records land.
    stop.store(true, Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(("127.0.0.1", agg_port));
    fake.join().unwrap();
    let agg_toml = dir.path().join("aggregator.toml");
    millrace_tests::write_aggregator_config(
        &agg_toml,
        agg_port,
        &dir.path().join("agg"),
        &[("gw-faults-clock", token)],
        "",
    );
    let mut aggregator =
        millrace_tests::start_aggregator(&agg_toml, agg_port, &dir.path().join("agg.log"));
    wait_or_show(
        "the outbox to drain",
        Duration::from_secs(60),
        Some(&log),
        || metric_total(http_port, "millrace_outbox_records") == 0.0,
    );
    let tapped: std::collections::BTreeSet<(String, i64)> = std::fs::read_to_string(&tap)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "window")
        .map(|w| {
            (
                w["series"]["sensor"].to_string(),
                w["start_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    aggregator.terminate(Duration::from_secs(20));
    agent.terminate(Duration::from_secs(20));
    let logged: Vec<(String, i64)> = millrace_tests::aggregator_tail(&agg_toml, "millrace.windows")
        .iter()
        .map(|r| &r["value"])
        .map(|w| {
            (
                w["series"]["sensor"].to_string(),
                w["start_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    let logged_set: std::collections::BTreeSet<_> = logged.iter().cloned().collect();
    assert!(!tapped.is_empty());
    assert_eq!(logged.len(), logged_set.len(), "a window logged twice");
    assert!(
        tapped.is_subset(&logged_set),
        "tapped {tapped:?} not all in the log {logged_set:?}"
    );
    eprintln!(
        "faults figures: {rejected_sends} sends answered 400 scope=batch, {held} records kept \
         in the outbox, 0 deleted; after the fix {} windows landed once each",
        logged.len()
    );
}

/// Windows of `device`'s series in the aggregator's log: per series, the
/// sum of counts and of values; panics on a window logged twice.
fn logged_totals(agg_toml: &Path, device: &str) -> std::collections::BTreeMap<String, (u64, f64)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut totals = std::collections::BTreeMap::new();
    for record in millrace_tests::aggregator_tail(agg_toml, "millrace.windows") {
        let w = &record["value"];
        if w["series"]["device"] != device {
            continue;
        }
        let sensor = w["series"]["sensor"].as_str().unwrap().to_string();
        let start = w["start_ms"].as_i64().unwrap();
        assert!(
            seen.insert((sensor.clone(), start)),
            "window {sensor}@{start} logged twice"
        );
        let count = w["count"].as_u64().unwrap();
        let entry = totals.entry(sensor).or_insert((0u64, 0.0f64));
        entry.0 += count;
        entry.1 += w["mean"].as_f64().unwrap() * count as f64;
    }
    totals
}

#[test]
fn faults_a_full_state_file_system_holds_ingest_and_delivers_everything_once_space_returns() {
    const SENSORS: usize = 10;
    let fs = millrace_tests::Tmpfs::mount("48m");
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (http_port, agg_port) = (free_port(), free_port());
    let token = "faults-test-token-0123456789abcdef";
    let agg_toml = dir.path().join("aggregator.toml");
    millrace_tests::write_aggregator_config(
        &agg_toml,
        agg_port,
        &dir.path().join("agg"),
        &[("gw-full-disk", token)],
        "",
    );
    let mut aggregator =
        millrace_tests::start_aggregator(&agg_toml, agg_port, &dir.path().join("agg.log"));
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
id = "gw-full-disk"
data-dir = "{state}"

[broker]
enabled = false

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
client-id = "gw-full-disk"
clean-session = false
keep-alive = "5s"
reconnect-backoff-min = "100ms"
reconnect-backoff-max = "1s"

[[mqtt.subscriptions]]
filter = "sensors/+/+"
qos = 1
format = "json"
device = "{{1}}"
sensor = "{{2}}"

[uplink]
url = "http://127.0.0.1:{agg_port}"
token = "{token}"
backoff-min = "100ms"
backoff-max = "1s"

[http]
listen = "127.0.0.1:{http_port}"
"#,
            state = fs.path().join("state").display(),
            mqtt_port = broker.port,
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let start_agent = || {
        let agent = spawn_agent(&config, &log);
        wait_or_show(
            "the agent's /metrics",
            Duration::from_secs(30),
            Some(&log),
            || millrace_tests::http_status(http_port, "/metrics") == Some(200),
        );
        agent
    };
    let mut agent = start_agent();
    wait_or_show(
        "the mqtt session",
        Duration::from_secs(30),
        Some(&log),
        || metric_total(http_port, "millrace_mqtt_connected") >= 1.0,
    );

    // Before: 30 readings of one series, durable and acknowledged.
    let now = millrace_sim::unix_now_ms();
    let mut expected: std::collections::BTreeMap<String, (u64, f64)> = Default::default();
    let before: Vec<String> = (0..30)
        .map(|i| format!(r#"{{"ts": {}, "value": {i}}}"#, now - 3_000 + i * 100))
        .collect();
    expected.insert("s0".into(), (30, (0..30).map(|i| i as f64).sum()));
    publish_lines(broker.port, "sensors/press-1/s0", &before);
    wait_or_show(
        "30 readings acknowledged",
        Duration::from_secs(30),
        Some(&log),
        || metric_total(http_port, "millrace_mqtt_acks_total") >= 30.0,
    );

    // The file system fills up; 300 more readings over 10 series arrive.
    let filled = fs.fill("filler");
    let now = millrace_sim::unix_now_ms();
    for s in 0..SENSORS {
        let lines: Vec<String> = (0..30)
            .map(|i| {
                format!(
                    r#"{{"ts": {}, "value": {}}}"#,
                    now + i * 100,
                    1000 * s as i64 + i
                )
            })
            .collect();
        let e = expected.entry(format!("s{s}")).or_insert((0, 0.0));
        e.0 += 30;
        e.1 += (0..30).map(|i| (1000 * s + i) as f64).sum::<f64>();
        publish_lines(broker.port, &format!("sensors/press-1/s{s}"), &lines);
    }
    // The agent stops with code 75 (a restart reopens the store), having
    // acknowledged nothing it could not make durable.
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Ok(Some(status)) = agent.child.try_wait() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not stop on the full disk"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(75), "exit code on a full disk\n{text}");
    assert!(
        !text.contains("panicked"),
        "a panic on the full disk:\n{text}"
    );
    // Started again on the still-full disk (as `Restart=always` does), with
    // whatever its exit freed taken as well: it waits for space, or it opens
    // and either runs on the little room its files still have or fails a
    // write and exits 75 again (then it is started again).
    let mut starts_while_full = 0;
    let (mut agent, outcome) = loop {
        starts_while_full += 1;
        fs.fill(&format!("filler-{starts_while_full}"));
        let mut a = spawn_agent(&config, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        let outcome = loop {
            if std::fs::read_to_string(&log)
                .unwrap()
                .contains("waiting for space")
            {
                break "waited for space";
            }
            if let Ok(Some(status)) = a.child.try_wait() {
                assert_eq!(status.code(), Some(75), "exit code on a full disk");
                break "exited 75";
            }
            if millrace_tests::http_status(http_port, "/metrics") == Some(200) {
                break "ran";
            }
            assert!(
                Instant::now() < deadline,
                "the agent neither ran, waited nor stopped on the full disk"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if outcome != "exited 75" {
            break (a, outcome);
        }
        assert!(
            starts_while_full < 10,
            "the agent kept exiting on the full disk"
        );
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("panicked"),
        "a panic on the full disk:\n{text}"
    );

    // Space returns: everything lands, once.
    for entry in std::fs::read_dir(fs.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("filler")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    let complete = || {
        let logged = logged_totals(&agg_toml, "press-1");
        logged.iter().map(|(_, (n, _))| n).sum::<u64>() >= 330
    };
    wait_or_show(
        "all 330 readings in the aggregator's log",
        Duration::from_secs(90),
        Some(&log),
        complete,
    );
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    aggregator.terminate(Duration::from_secs(20));
    let logged = logged_totals(&agg_toml, "press-1");
    assert_eq!(logged.len(), expected.len(), "{logged:?}");
    for (sensor, (count, sum)) in &expected {
        let (n, total) = logged[sensor];
        assert_eq!(n, *count, "readings of {sensor} in windows");
        assert!(
            (total - sum).abs() < 1e-6,
            "sum of {sensor}: {total} != {sum}"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "a panic:\n{text}");
    eprintln!(
        "faults figures: state tmpfs 48 MiB filled with {:.1} MiB; 300 readings published while full, \
         agent exited 75 and was started {starts_while_full} time(s) on the full disk (last: {outcome}); \
         after space returned 330/330 readings landed once each in {} series",
        filled as f64 / 1048576.0,
        logged.len()
    );
}

/// The listener agent of [`listener_config`] sending to an aggregator on
/// `agg_port` with `token`.
fn uplink_agent_config(
    mqtt_port: u16,
    http_port: u16,
    agg_port: u16,
    token: &str,
    data_dir: &Path,
) -> String {
    format!(
        "{}\n[uplink]\nurl = \"http://127.0.0.1:{agg_port}\"\ntoken = \"{token}\"\n\
         backoff-min = \"100ms\"\nbackoff-max = \"500ms\"\n",
        listener_config(mqtt_port, http_port, data_dir)
    )
}

/// A labelled sample of `name` (`label` as `key="value"`), summed.
fn metric_with(port: u16, name: &str, label: &str) -> f64 {
    let (_, body) = millrace_tests::http_request(port, "GET", "/metrics", &[], b"");
    body.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `(series, start_ms)` of every window in the tap.
fn tapped_windows(tap: &Path) -> std::collections::BTreeSet<(String, i64)> {
    std::fs::read_to_string(tap)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "window")
        .map(|w| {
            (
                millrace_tests::series_name(&w),
                w["start_ms"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Asserts every window in `tapped` is in the aggregator's log, and no
/// window is there twice; returns how many windows the log holds.
fn assert_logged_once(
    agg_toml: &Path,
    tapped: &std::collections::BTreeSet<(String, i64)>,
) -> usize {
    let logged: Vec<(String, i64)> = millrace_tests::aggregator_tail(agg_toml, "millrace.windows")
        .iter()
        .map(|r| {
            (
                millrace_tests::series_name(&r["value"]),
                r["value"]["start_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    let set: std::collections::BTreeSet<_> = logged.iter().cloned().collect();
    assert!(!tapped.is_empty());
    assert_eq!(logged.len(), set.len(), "a window logged twice: {logged:?}");
    assert!(
        tapped.is_subset(&set),
        "tapped {tapped:?} not all in the log {set:?}"
    );
    logged.len()
}

/// 60 readings over the last 12 s on each of `sensors`, through the agent's
/// listener: the earlier windows close at once.
fn publish_recent(mqtt_port: u16, device: &str, sensors: usize) {
    let now = millrace_sim::unix_now_ms();
    for s in 0..sensors {
        let lines: Vec<String> = (0..60)
            .map(|i| format!(r#"{{"ts": {}, "value": {i}}}"#, now - 12_000 + i * 200))
            .collect();
        publish_lines(mqtt_port, &format!("sensors/{device}/s{s}"), &lines);
    }
}

/// An aggregator keeping its log in `agg_dir` and a tapped agent sending it
/// what devices publish to its ingest listener, both up (state, configs and
/// logs under `dir`).
struct Chain {
    aggregator: ChildGuard,
    agg_toml: PathBuf,
    agg_log: PathBuf,
    agg_port: u16,
    agent: ChildGuard,
    log: PathBuf,
    tap: PathBuf,
    mqtt_port: u16,
    http_port: u16,
}

fn start_chain(dir: &Path, agg_dir: &Path) -> Chain {
    let (mqtt_port, http_port, agg_port) = (free_port(), free_port(), free_port());
    let token = "faults-test-token-0123456789abcdef";
    let agg_toml = dir.join("aggregator.toml");
    millrace_tests::write_aggregator_config(
        &agg_toml,
        agg_port,
        agg_dir,
        &[("gw-faults-clock", token)],
        "",
    );
    let agg_log = dir.join("agg.log");
    let aggregator = millrace_tests::start_aggregator(&agg_toml, agg_port, &agg_log);
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        uplink_agent_config(mqtt_port, http_port, agg_port, token, &dir.join("state")),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let tap = dir.join("tap.jsonl");
    let agent = spawn_agent_tapped(&config, &log, Some(&tap));
    for port in [mqtt_port, http_port] {
        millrace_tests::wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        );
    }
    Chain {
        aggregator,
        agg_toml,
        agg_log,
        agg_port,
        agent,
        log,
        tap,
        mqtt_port,
        http_port,
    }
}

#[test]
fn faults_a_full_aggregator_log_directory_answers_503_and_the_records_land_once_after_space_returns(
) {
    let fs = millrace_tests::Tmpfs::mount("16m");
    let dir = tempfile::tempdir().unwrap();
    let Chain {
        mut aggregator,
        agg_toml,
        agg_log,
        agg_port,
        mut agent,
        log,
        tap,
        mqtt_port,
        http_port,
    } = start_chain(dir.path(), &fs.path().join("agg"));
    // Some windows land while there is space.
    publish_recent(mqtt_port, "oven-1", 2);
    wait_or_show(
        "the first windows committed",
        Duration::from_secs(30),
        Some(&log),
        || {
            metric_with(
                http_port,
                "millrace_uplink_batches_total",
                "outcome=\"committed\"",
            ) >= 1.0
                && metric_total(http_port, "millrace_outbox_records") == 0.0
        },
    );

    let filled = fs.fill("filler");
    publish_recent(mqtt_port, "oven-2", 5);
    wait_or_show(
        "three sends answered 503",
        Duration::from_secs(60),
        Some(&log),
        || {
            metric_with(
                http_port,
                "millrace_uplink_batches_total",
                "outcome=\"retry\"",
            ) >= 3.0
        },
    );
    let held = metric_total(http_port, "millrace_outbox_records");
    assert!(
        held > 0.0,
        "the outbox holds the records the aggregator could not write"
    );
    let text = std::fs::read_to_string(&agg_log).unwrap();
    assert!(
        !text.contains("panicked"),
        "the aggregator panicked:\n{text}"
    );
    assert!(
        aggregator.is_running(),
        "the aggregator stopped on the full disk"
    );
    let retries_while_full = metric_with(
        http_port,
        "millrace_uplink_batches_total",
        "outcome=\"retry\"",
    );
    assert_eq!(
        metric_total(http_port, "millrace_uplink_rejected_records_total"),
        0.0
    );
    let (status, health) = millrace_tests::http_request(agg_port, "GET", "/healthz", &[], b"");
    assert_eq!(
        status, 503,
        "/healthz while the log cannot be written: {health}"
    );

    std::fs::remove_file(fs.path().join("filler")).unwrap();
    wait_or_show(
        "the outbox to drain",
        Duration::from_secs(60),
        Some(&log),
        || metric_total(http_port, "millrace_outbox_records") == 0.0,
    );
    let tapped = tapped_windows(&tap);
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    aggregator.terminate(Duration::from_secs(20));
    let logged = assert_logged_once(&agg_toml, &tapped);
    eprintln!(
        "faults figures: aggregator tmpfs 16 MiB filled with {:.1} MiB; {retries_while_full} sends \
         answered 503 (healthz {status}), {held} records kept by the agent, 0 rejected; after space \
         returned {logged} windows in the log, each once",
        filled as f64 / 1048576.0
    );
}

#[test]
fn faults_a_dedup_save_failure_then_a_resend_and_a_crash_writes_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let agg_dir = dir.path().join("agg");
    std::fs::create_dir_all(agg_dir.join("dedup")).unwrap();
    // The dedup state alone on its own small file system.
    let dedup_fs = millrace_tests::Tmpfs::mount("1m");
    let status = Command::new("mount")
        .args(["--bind"])
        .arg(dedup_fs.path())
        .arg(agg_dir.join("dedup"))
        .status()
        .expect("run mount --bind");
    assert!(status.success(), "bind-mounting the dedup tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _bind = Unmount(agg_dir.join("dedup"));

    let Chain {
        mut aggregator,
        agg_toml,
        agg_log,
        agg_port,
        mut agent,
        log,
        tap,
        mqtt_port,
        http_port,
    } = start_chain(dir.path(), &agg_dir);
    publish_recent(mqtt_port, "oven-3", 2);
    wait_or_show(
        "the first windows committed",
        Duration::from_secs(30),
        Some(&log),
        || {
            metric_with(
                http_port,
                "millrace_uplink_batches_total",
                "outcome=\"committed\"",
            ) >= 1.0
                && metric_total(http_port, "millrace_outbox_records") == 0.0
        },
    );
    let logged_before = millrace_tests::aggregator_tail(&agg_toml, "millrace.windows").len();

    // The dedup directory fills: log writes succeed, state saves fail.
    dedup_fs.fill("filler");
    publish_recent(mqtt_port, "oven-4", 3);
    wait_or_show(
        "the log to grow while sends are answered 503",
        Duration::from_secs(60),
        Some(&log),
        || {
            metric_with(
                http_port,
                "millrace_uplink_batches_total",
                "outcome=\"retry\"",
            ) >= 3.0
                && millrace_tests::aggregator_tail(&agg_toml, "millrace.windows").len()
                    > logged_before
        },
    );
    let resends = metric_with(
        http_port,
        "millrace_uplink_batches_total",
        "outcome=\"retry\"",
    );
    let written_unsaved =
        millrace_tests::aggregator_tail(&agg_toml, "millrace.windows").len() - logged_before;
    // A crash while the state is unsaved, then space returns.
    aggregator.kill();
    std::fs::remove_file(dedup_fs.path().join("filler")).unwrap();
    let mut aggregator = millrace_tests::start_aggregator(&agg_toml, agg_port, &agg_log);
    wait_or_show(
        "the outbox to drain",
        Duration::from_secs(60),
        Some(&log),
        || metric_total(http_port, "millrace_outbox_records") == 0.0,
    );
    let tapped = tapped_windows(&tap);
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
    aggregator.terminate(Duration::from_secs(20));
    let logged = assert_logged_once(&agg_toml, &tapped);
    let text = std::fs::read_to_string(&agg_log).unwrap();
    assert!(
        !text.contains("panicked"),
        "the aggregator panicked:\n{text}"
    );
    eprintln!(
        "faults figures: dedup saves failing on a full 1 MiB tmpfs; {resends} sends answered 503, \
         {written_unsaved} windows written while unsaved, aggregator killed -9 and restarted; \
         {logged} windows in the log, each once"
    );
}
