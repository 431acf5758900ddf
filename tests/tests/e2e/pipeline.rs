//! Simulator → agent → tap, for a fixed seed: what the agent computes is what
//! the simulator's signal predicts, an injected step is scored critical, and
//! bad input becomes counted dead letters while the agent keeps running.

use millrace_sim::config::SimConfig;
use millrace_tests::{
    bin, follow_json_lines, free_port, require_program, wait_for_port, ChildGuard,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SEED: u64 = 424242;
/// Step on boiler-3/temp, from this many ms after the simulation start.
const STEP_FROM_MS: i64 = 14_000;

fn sim_config(mqtt_port: u16, modbus_port: u16) -> String {
    format!(
        r#"
seed = {SEED}
[mqtt]
broker = "127.0.0.1:{mqtt_port}"
client-id = "sim-e2e"
keep-alive = "5s"
reconnect-delay = "200ms"
queue-capacity = 4096

[[modbus-tcp]]
name = "press-1"
listen = "127.0.0.1:{modbus_port}"
unit-id = 1
refresh = "1s"

[[modbus-tcp.points]]
sensor = "temperature"
unit = "degC"
table = "holding"
address = 0
type = "f32"
order = "ABCD"
signal = {{ offset = 80.0, amplitude = 5.0, period = "60s", noise-stddev = 0.2 }}

[[modbus-tcp.points]]
sensor = "pressure"
unit = "bar"
table = "holding"
address = 2
type = "f32"
order = "CDAB"
signal = {{ offset = 6.0, amplitude = 0.5, period = "30s", noise-stddev = 0.05 }}

[[mqtt-sensor]]
topic = "plant/boiler-3/temp"
interval = "100ms"
unit = "degC"
signal = {{ offset = 180.0, amplitude = 0.5, period = "600s", noise-stddev = 0.5 }}

[[anomaly]]
series = "boiler-3/temp"
kind = "step"
magnitude = 30.0
from = "{step_s}s"
to = "60s"
"#,
        step_s = STEP_FROM_MS / 1000
    )
}

fn agent_config(mqtt_port: u16, modbus_port: u16, http_port: u16, data_dir: &Path) -> String {
    format!(
        r#"
[agent]
id = "gw-e2e"
data-dir = "{dir}"

[http]
listen = "127.0.0.1:{http_port}"

[window]
width = "1s"
allowed-lateness = "500ms"
idle-timeout = "3s"

[anomaly]
history = 8
warm-up = 5

[broker]
enabled = true
listen = "127.0.0.1:{mqtt_port}"

[[broker.subscriptions]]
filter = "plant/+/+"
format = "json"

[[modbus.devices]]
name = "press-1"
transport = "tcp"
address = "127.0.0.1:{modbus_port}"
poll-interval = "500ms"
timeout = "500ms"

[[modbus.devices.registers]]
sensor = "temperature"
function = "holding"
address = 0
type = "f32"
order = "ABCD"
unit = "degC"

[[modbus.devices.registers]]
sensor = "pressure"
function = "holding"
address = 2
type = "f32"
order = "CDAB"
unit = "bar"
"#,
        dir = data_dir.display()
    )
}

fn windows_of<'a>(records: &'a [Value], series: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["type"] == "window" && series_of(r) == series)
        .collect()
}

fn series_of(r: &Value) -> String {
    format!(
        "{}/{}",
        r["series"]["device"].as_str().unwrap_or(""),
        r["series"]["sensor"].as_str().unwrap_or("")
    )
}

#[test]
fn simulated_plant_through_the_agent_matches_the_signal() {
    let mosquitto_pub = require_program("mosquitto_pub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, modbus_port, http_port) = (free_port(), free_port(), free_port());
    let sim_toml = dir.path().join("sim.toml");
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(&sim_toml, sim_config(mqtt_port, modbus_port)).unwrap();
    std::fs::write(
        &agent_toml,
        agent_config(mqtt_port, modbus_port, http_port, &dir.path().join("state")),
    )
    .unwrap();
    let tap = dir.path().join("tap.jsonl");

    let mut agent = ChildGuard::spawn(
        "millrace-agent",
        Command::new(bin("millrace-agent"))
            .args(["run", "--config"])
            .arg(&agent_toml)
            .arg("--tap")
            .arg(&tap)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        Duration::from_secs(20),
    );
    // Start on a whole second so the first 1 s window is complete.
    let start_ms = (millrace_sim::unix_now_ms() / 1000 + 1) * 1000;
    let mut sim = ChildGuard::spawn(
        "millrace-sim",
        Command::new(bin("millrace-sim"))
            .args(["run", "--config"])
            .arg(&sim_toml)
            .args(["--start-ms", &start_ms.to_string(), "--no-rtu"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );

    // Run until a few windows after the step are scored.
    let step_window = start_ms + STEP_FROM_MS;
    let records = follow_json_lines(&tap, Duration::from_secs(60), |seen| {
        windows_of(seen, "boiler-3/temp")
            .iter()
            .any(|w| w["start_ms"].as_i64() >= Some(step_window + 3000))
    });
    assert!(agent.is_running(), "agent exited early");
    let first_scrape = scrape(http_port);

    // Bad input to the agent's broker: each becomes a dead letter, the agent goes on.
    let publish = |topic: &str, payload: &str| {
        let ok = Command::new(&mosquitto_pub)
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
            .args(["-t", topic, "-m", payload])
            .status()
            .expect("mosquitto_pub runs")
            .success();
        assert!(ok, "mosquitto_pub {topic} failed");
    };
    publish("plant/bad-1/json", "{\"value\": ");
    publish("plant/bad-1/type", "{\"value\": \"hot\"}");
    publish("plant/bad-1/nan", "{\"value\": NaN}");
    // Far behind boiler-3/temp's watermark: its window was emitted long ago.
    publish(
        "plant/boiler-3/temp",
        &format!("{{\"value\": 1.0, \"ts\": {start_ms}}}"),
    );
    // A reading, the same message sent again by its device (QoS 1, DUP set:
    // what a device does when it never saw the PUBACK), then another one in
    // the same window: the window counts two readings.
    let base = millrace_sim::unix_now_ms() / 1000 * 1000 + 1000;
    let first = format!("{{\"value\": 5.0, \"ts\": {}}}", base + 100);
    publish("plant/dup-1/level", &first);
    resend_with_dup(mqtt_port, "plant/dup-1/level", &first);
    publish(
        "plant/dup-1/level",
        &format!("{{\"value\": 7.0, \"ts\": {}}}", base + 200),
    );
    let before_bad = records.len();
    let more = follow_json_lines(&tap, Duration::from_secs(20), |seen| {
        seen.iter().filter(|r| r["type"] == "dead-letter").count() >= 3
            && windows_of(seen, "boiler-3/temp").len()
                > windows_of(&records, "boiler-3/temp").len() + 1
    });
    assert!(
        more.len() > before_bad,
        "the agent kept producing after bad input"
    );

    // /metrics: Prometheus text with the expected names, counters increasing.
    let second_scrape = scrape(http_port);
    for name in [
        "millrace_readings_in_total{source=\"embedded-broker\"}",
        "millrace_readings_in_total{source=\"modbus\"}",
        "millrace_windows_emitted_total",
        "millrace_readings_accepted_total",
    ] {
        let (a, b) = (metric(&first_scrape, name), metric(&second_scrape, name));
        assert!(b > a && a > 0.0, "{name}: {a} then {b}");
    }
    for name in [
        "millrace_late_readings_total",
        "millrace_outbox_records{lane=\"bulk\"}",
        "millrace_live_series",
        "millrace_alerts_total{kind=\"spike\",severity=\"any\"}",
    ] {
        assert!(second_scrape.contains(name), "{name} missing from /metrics");
    }
    assert!(metric(&second_scrape, "millrace_late_readings_total") >= 1.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&scrape(http_port), "millrace_redelivered_readings_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "millrace_redelivered_readings_total stayed 0"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(http_get(http_port, "/healthz").starts_with("HTTP/1.1 200"));

    assert_eq!(
        agent.terminate(Duration::from_secs(20)),
        Some(0),
        "SIGTERM: clean exit 0"
    );
    sim.kill();
    let all = follow_json_lines(&tap, Duration::from_millis(200), |_| false);

    // 1. MQTT windows equal the signal's prediction exactly (count) and to
    //    float precision (mean, min, max).
    let cfg = SimConfig::from_toml(&sim_config(mqtt_port, modbus_port), &sim_toml).unwrap();
    let series = cfg.series();
    let mut temp = (*series["boiler-3/temp"]).clone();
    temp.start_ms = start_ms;
    let windows = windows_of(&all, "boiler-3/temp");
    assert!(windows.len() >= 15, "only {} windows", windows.len());
    let mut checked = 0;
    for w in &windows {
        let first = w["first_event_ms"].as_i64().unwrap();
        let last = w["last_event_ms"].as_i64().unwrap();
        // The simulator publishes on the 100 ms grid: nothing between the
        // first and the last reading of a window may be missing.
        let expected: Vec<f64> = (first..=last)
            .step_by(100)
            .filter_map(|t| temp.value_at(SEED, "boiler-3/temp", t))
            .collect();
        let n = expected.len() as f64;
        let mean = expected.iter().sum::<f64>() / n;
        assert_eq!(w["count"].as_u64(), Some(expected.len() as u64), "{w}");
        let got = w["mean"].as_f64().unwrap();
        assert!(
            (got - mean).abs() <= 1e-9 * mean.abs(),
            "mean {got} vs {mean}: {w}"
        );
        let min = expected.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(w["min"].as_f64(), Some(min), "{w}");
        checked += 1;
    }
    assert!(checked >= 15);

    // 2. The step is scored critical in the first window after it.
    let step = windows
        .iter()
        .find(|w| w["start_ms"].as_i64() == Some(step_window))
        .expect("the window where the step starts");
    assert_eq!(step["score"]["severity"], "critical", "{step}");
    let alerts: Vec<&Value> = all
        .iter()
        .filter(|r| r["type"] == "alert" && series_of(r) == "boiler-3/temp")
        .collect();
    assert!(
        alerts
            .iter()
            .any(|a| a["window_start_ms"].as_i64() == Some(step_window)
                && a["score"]["severity"] == "critical"),
        "a critical alert for the step window: {alerts:?}"
    );
    // No critical alert before the step: noise alone is not an anomaly.
    assert!(
        alerts
            .iter()
            .all(|a| a["window_start_ms"].as_i64() >= Some(step_window)
                || a["score"]["severity"] != "critical"),
        "critical alerts before the step: {alerts:?}"
    );

    // 3. Modbus: every press-1 temperature reading is a value the simulated PLC
    //    served (sample-and-hold on a 1 s grid, f32 on the wire).
    let temp_plc = {
        let mut s = (*series["press-1/temperature"]).clone();
        s.start_ms = start_ms;
        s
    };
    let plc_windows = windows_of(&all, "press-1/temperature");
    assert!(
        plc_windows.len() >= 10,
        "modbus windows: {}",
        plc_windows.len()
    );
    for w in &plc_windows {
        let t = w["first_event_ms"].as_i64().unwrap();
        let grid = t - t.rem_euclid(1000);
        let candidates: Vec<f64> = [grid - 1000, grid]
            .iter()
            .filter_map(|g| temp_plc.value_at(SEED, "press-1/temperature", *g))
            .map(|v| f64::from(v as f32))
            .collect();
        let min = w["min"].as_f64().unwrap();
        assert!(
            candidates.iter().any(|c| (c - min).abs() < 1e-4),
            "{min} not among {candidates:?}: {w}"
        );
    }
    assert!(!windows_of(&all, "press-1/pressure").is_empty());

    // 4. A reading delivered twice counts once.
    let dup = windows_of(&all, "dup-1/level");
    assert_eq!(dup.len(), 1, "{dup:?}");
    assert_eq!(dup[0]["count"], 2, "{}", dup[0]);
    assert_eq!(dup[0]["mean"], 6.0, "{}", dup[0]);

    // 5. Bad input: counted dead letters with their reasons.
    let reasons: Vec<&str> = all
        .iter()
        .filter(|r| r["type"] == "dead-letter")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    for reason in ["malformed", "wrong-type", "late"] {
        assert!(
            reasons.contains(&reason),
            "{reason} missing from {reasons:?}"
        );
    }
    assert!(
        reasons.contains(&"not-a-number") || reasons.contains(&"malformed"),
        "NaN payload dead-lettered: {reasons:?}"
    );
}

/// Sends `payload` to `topic` as a QoS 1 PUBLISH with the DUP flag set (a
/// device resending a message whose PUBACK it never saw), on a connection
/// of its own, and waits for the PUBACK.
fn resend_with_dup(port: u16, topic: &str, payload: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("agent mqtt");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let client_id = b"dup-resender";
    let mut connect = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id);
    let mut publish = (topic.len() as u16).to_be_bytes().to_vec();
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&1u16.to_be_bytes());
    publish.extend_from_slice(payload.as_bytes());
    assert!(
        connect.len() < 128 && publish.len() < 128,
        "short packets only"
    );
    let mut out = vec![0x10, connect.len() as u8];
    out.extend_from_slice(&connect);
    out.extend_from_slice(&[0x3A, publish.len() as u8]); // PUBLISH, DUP, QoS 1
    out.extend_from_slice(&publish);
    s.write_all(&out).unwrap();
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).expect("CONNACK and PUBACK");
    assert_eq!(&reply[..4], &[0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    assert_eq!(
        &reply[4..],
        &[0x40, 0x02, 0x00, 0x01],
        "PUBACK of the resend"
    );
    s.write_all(&[0xE0, 0x00]).unwrap();
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("agent http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn scrape(port: u16) -> String {
    let resp = http_get(port, "/metrics");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp
}

/// The value of the sample whose name (with labels) is exactly `name`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}
