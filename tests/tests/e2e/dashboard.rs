#![allow(clippy::unwrap_used)] // a failed step fails the test
//! Simulator → agent → aggregator → headless Chromium: the dashboard lists
//! the agent online, shows the backlog its outbox built while the aggregator
//! was not there yet (records, oldest age, retries) and watches it drain,
//! draws a chart with points, and shows an injected spike in the alert feed
//! within 2 s of the agent emitting it; `/metrics` and the JSON API agree
//! with what was committed. A screenshot is saved to
//! `$CARGO_TARGET_DIR/e2e-artifacts/dashboard.png`.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`
//! (scripts/setup.sh installs them); without them the test fails.

use fantoccini::{Client, ClientBuilder};
use millrace_tests::{bin, free_port, require_program, target_dir, wait_for_port, ChildGuard};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = "gw-e2e";
const TOKEN: &str = "e2e-dashboard-token-0123456789";
/// The issue's promise: an alert is on the page within this long of its event.
const ALERT_ON_PAGE_WITHIN_MS: i64 = 2000;
/// The agent runs this long before the aggregator starts: its outbox holds
/// about two windows per second of it.
const OUTAGE: Duration = Duration::from_secs(8);

fn sim_config(mqtt_port: u16) -> String {
    format!(
        r#"
seed = 77
[mqtt]
broker = "127.0.0.1:{mqtt_port}"
client-id = "sim-dashboard"
keep-alive = "5s"
reconnect-delay = "200ms"
queue-capacity = 4096

[[mqtt-sensor]]
topic = "plant/boiler-3/temp"
interval = "100ms"
unit = "degC"
signal = {{ offset = 180.0, amplitude = 0.5, period = "600s", noise-stddev = 0.5 }}

[[mqtt-sensor]]
topic = "plant/boiler-3/pressure"
interval = "100ms"
unit = "bar"
signal = {{ offset = 12.0, amplitude = 0.2, period = "60s", noise-stddev = 0.05 }}

[[anomaly]]
series = "boiler-3/temp"
kind = "spike"
magnitude = 60.0
from = "10s"
every = "3s"
"#
    )
}

fn agent_config(mqtt_port: u16, aggregator_port: u16, http_port: u16, data_dir: &Path) -> String {
    format!(
        r#"
[agent]
id = "{AGENT}"
data-dir = "{dir}"

[http]
listen = "127.0.0.1:{http_port}"

[window]
width = "1s"
allowed-lateness = "300ms"
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

[uplink]
url = "http://127.0.0.1:{aggregator_port}"
token = "{TOKEN}"
backoff-min = "100ms"
backoff-max = "1s"
# The backlog drains at one record a second, so the fleet view can be seen
# showing it; live windows and alerts are not limited.
replay-rate = 1
"#,
        dir = data_dir.display()
    )
}

fn aggregator_config(port: u16, data_dir: &Path) -> String {
    format!(
        r#"
listen = "127.0.0.1:{port}"
data-dir = "{dir}"

[[agents]]
id = "{AGENT}"
token = "{TOKEN}"

[[agents]]
id = "gw-never-connected"
token = "another-token-0123456789"
"#,
        dir = data_dir.display()
    )
}

/// A plain HTTP/1.0 GET (no chunking to undo): status and body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the aggregator");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = http_get(port, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series);
        if metric == name && labels.iter().all(|l| series.contains(l)) {
            let value: f64 = value.parse().expect("a sample value");
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

async fn js(client: &Client, script: &str) -> Value {
    client
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Runs `script` until it returns something other than null/false.
async fn wait_js(client: &Client, script: &str, timeout: Duration, what: &str) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = js(client, script).await;
        if !(v.is_null() || v == Value::Bool(false)) {
            return v;
        }
        if Instant::now() > deadline {
            let page = client.source().await.unwrap_or_default();
            panic!("{what}: not seen after {timeout:?}; page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/api/v1/fleet` until the agent's reported status satisfies `ok`.
fn wait_for_status(port: u16, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let fleet = get_json(port, "/api/v1/fleet");
        if let Some(row) = fleet["agents"]
            .as_array()
            .and_then(|agents| agents.iter().find(|a| a["id"] == AGENT))
        {
            last = row["status"].clone();
            if !last.is_null() && ok(&last) {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("agent status never as expected within {timeout:?}; last: {last}");
}

fn now_ms() -> i64 {
    millrace_sim::unix_now_ms()
}

#[test]
fn dashboard_shows_the_plant_live_in_chromium() {
    let chromium = require_program("chromium", "chromium");
    let chromedriver = require_program("chromedriver", "chromium-driver");
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, aggregator_port, driver_port, agent_http_port) =
        (free_port(), free_port(), free_port(), free_port());
    let agg_toml = dir.path().join("aggregator.toml");
    let agent_toml = dir.path().join("agent.toml");
    let sim_toml = dir.path().join("sim.toml");
    std::fs::write(
        &agg_toml,
        aggregator_config(aggregator_port, &dir.path().join("agg")),
    )
    .unwrap();
    std::fs::write(
        &agent_toml,
        agent_config(
            mqtt_port,
            aggregator_port,
            agent_http_port,
            &dir.path().join("agent"),
        ),
    )
    .unwrap();
    std::fs::write(&sim_toml, sim_config(mqtt_port)).unwrap();

    // The plant and the agent start first; the aggregator only after OUTAGE.
    let mut agent = ChildGuard::spawn(
        "millrace-agent",
        Command::new(bin("millrace-agent"))
            .args(["run", "--config"])
            .arg(&agent_toml)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        Duration::from_secs(20),
    );
    let _sim = ChildGuard::spawn(
        "millrace-sim",
        Command::new(bin("millrace-sim"))
            .args(["run", "--config"])
            .arg(&sim_toml)
            .arg("--no-rtu")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    std::thread::sleep(OUTAGE);
    let _aggregator = ChildGuard::spawn(
        "millrace-aggregator",
        Command::new(bin("millrace-aggregator"))
            .args(["run", "--config"])
            .arg(&agg_toml)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], aggregator_port)),
        Duration::from_secs(20),
    );

    // 0. The first batches report the backlog the outage left and the
    // retries it cost.
    let first_status = wait_for_status(aggregator_port, Duration::from_secs(20), |s| {
        s["outbox_records"].as_u64().is_some()
    });
    eprintln!("first status after the outage: {first_status}");
    assert!(
        first_status["uplink_retries_total"].as_u64().unwrap() >= 1,
        "{first_status}"
    );
    assert!(
        first_status["outbox_records"].as_u64().unwrap() >= 8,
        "{first_status}"
    );
    assert!(
        first_status["outbox_oldest_age_ms"].as_u64().unwrap() >= 4_000,
        "{first_status}"
    );
    assert_eq!(first_status["outbox_dropped_total"], 0);
    let metrics_before = http_get(aggregator_port, "/metrics").1;

    let _driver = ChildGuard::spawn(
        "chromedriver",
        Command::new(&chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], driver_port)),
        Duration::from_secs(20),
    );
    let profile = dir.path().join("chromium-profile");
    let artifacts = target_dir().join("e2e-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1500,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("chromedriver starts a Chromium session");

        let url = format!("http://127.0.0.1:{aggregator_port}/");
        client.goto(&url).await.unwrap();

        // 1. The fleet view lists the agent, online; the never-connected one offline.
        wait_js(
            &client,
            &format!(
                "return document.querySelector('#fleet tr[data-agent=\"{AGENT}\"][data-online=\"true\"]') !== null;"
            ),
            Duration::from_secs(40),
            "the agent online in the fleet view",
        )
        .await;
        let offline = js(
            &client,
            "return document.querySelector('#fleet tr[data-agent=\"gw-never-connected\"]').dataset.online;",
        )
        .await;
        assert_eq!(offline, json!("false"));
        // Its outbox and retries as the agent reported them.
        let cells = wait_js(
            &client,
            &format!(
                "const row = document.querySelector('#fleet tr[data-agent=\"{AGENT}\"]');
                 const cell = f => row.querySelector('td[data-field=\"' + f + '\"]');
                 if (!cell('outbox-records')) return null;
                 return {{ records: Number(cell('outbox-records').textContent),
                          retries: Number(cell('uplink-retries').textContent),
                          oldest: cell('outbox-oldest').textContent }};"
            ),
            Duration::from_secs(10),
            "the agent's outbox in the fleet view",
        )
        .await;
        assert!(cells["retries"].as_u64().unwrap() >= 1, "{cells}");
        assert!(cells["records"].as_u64().is_some(), "{cells}");

        // 2. A chart with points (the page opens the first series by itself).
        let points = wait_js(
            &client,
            "const n = Number(document.getElementById('chart').dataset.points); return n >= 3 ? n : null;",
            Duration::from_secs(30),
            "a chart with at least 3 points",
        )
        .await;
        assert!(points.as_u64().unwrap() >= 3);

        // 3. Spikes arriving while the page is open show in the feed within 2 s.
        let opened_ms = now_ms();
        let live_alerts = wait_js(
            &client,
            &format!(
                "const items = Array.from(document.querySelectorAll('#alerts li[data-series=\"{AGENT}/boiler-3/temp\"]'))
                   .map(li => ({{ time: Number(li.dataset.timeMs), shown: Number(li.dataset.shownMs) }}))
                   .filter(a => a.time >= {opened_ms});
                 return items.length >= 3 ? items : null;"
            ),
            Duration::from_secs(40),
            "three live spike alerts in the feed",
        )
        .await;
        for alert in live_alerts.as_array().unwrap() {
            let latency_ms = alert["shown"].as_i64().unwrap() - alert["time"].as_i64().unwrap();
            assert!(
                latency_ms <= ALERT_ON_PAGE_WITHIN_MS,
                "alert on the page {latency_ms} ms after its event: {alert}"
            );
        }

        // Open the spiking series' chart through the feed's link, as a user would.
        js(
            &client,
            &format!(
                "document.querySelector('#alerts li[data-series=\"{AGENT}/boiler-3/temp\"] a').click(); return true;"
            ),
        )
        .await;
        wait_js(
            &client,
            "return document.getElementById('chart-title').textContent.includes('boiler-3/temp') && Number(document.getElementById('chart').dataset.points) >= 3;",
            Duration::from_secs(10),
            "the spiking series' chart",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let png = client.screenshot().await.expect("screenshot");
        std::fs::write(&screenshot, png).unwrap();
        client.close().await.unwrap();
    });
    assert!(agent.is_running(), "agent exited early");

    // 4. /metrics: the expected names, counters that grew.
    let (status, metrics) = http_get(aggregator_port, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "millrace_aggregator_batches_total",
        "millrace_aggregator_records_total",
        "millrace_aggregator_readings_total",
        "millrace_aggregator_alerts_total",
        "millrace_aggregator_log_write_seconds_bucket",
        "millrace_aggregator_event_to_commit_seconds_count",
        "millrace_aggregator_live_series",
        "millrace_aggregator_agent_up",
        "millrace_aggregator_sse_clients",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    let accepted = |text: &str| {
        metric_sum(
            text,
            "millrace_aggregator_batches_total",
            &["result=\"accepted\""],
        )
        .unwrap_or(0.0)
    };
    assert!(accepted(&metrics) > accepted(&metrics_before));
    assert!(
        metric_sum(
            &metrics,
            "millrace_aggregator_alerts_total",
            &[&format!("agent=\"{AGENT}\"")]
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "millrace_aggregator_agent_up",
            &[&format!("agent=\"{AGENT}\"")]
        ),
        Some(1.0)
    );

    // 5. The JSON API agrees with the metrics about this agent.
    let fleet = get_json(aggregator_port, "/api/v1/fleet");
    let row = fleet["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == AGENT)
        .expect("the agent in /api/v1/fleet");
    assert_eq!(row["online"], true);
    assert!(row["readings_per_s"].as_f64().unwrap() > 10.0, "{row}");

    // 6. The backlog drains, and the fleet view follows it down.
    let drained = wait_for_status(aggregator_port, Duration::from_secs(60), |s| {
        s["outbox_records"].as_u64().is_some_and(|n| n <= 4)
            && s["outbox_oldest_age_ms"]
                .as_u64()
                .is_none_or(|ms| ms < 3_000)
    });
    eprintln!("status once drained: {drained}");
    assert!(
        drained["uplink_retries_total"].as_u64() >= first_status["uplink_retries_total"].as_u64()
    );
    assert_eq!(drained["uplink_failures"], 0);

    // 7. The Grafana dashboard's agent-side queries ask for names the agent
    // exports (its aggregator-side ones are checked in the aggregator's tests).
    let (status, agent_metrics) = http_get(agent_http_port, "/metrics");
    assert_eq!(status, 200);
    let grafana: Value =
        serde_json::from_str(include_str!("../../../config/grafana-dashboard.json")).unwrap();
    let mut asked = 0;
    for panel in grafana["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("millrace_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.starts_with("millrace_aggregator_") || expr[..at].ends_with('_') {
                    continue;
                }
                assert!(
                    agent_metrics.contains(&name),
                    "Grafana asks for {name}, not exported by the agent:\n{agent_metrics}"
                );
                asked += 1;
            }
        }
    }
    assert!(asked >= 4, "{asked} agent metrics in the Grafana dashboard");
    let series = get_json(aggregator_port, "/api/v1/series?q=boiler-3");
    assert_eq!(series["total"], 2, "{series}");

    let meta = std::fs::metadata(&screenshot).expect("screenshot saved");
    assert!(meta.len() > 10_000, "screenshot is {} bytes", meta.len());
    eprintln!("dashboard screenshot: {}", screenshot.display());
}
