//! Alert latency, end to end: a spike injected at the simulator until the
//! alert is visible through the aggregator's API (its event stream,
//! `/api/v1/events`, which the dashboard page uses).
//!
//! Starts `millrace-aggregator`, `millrace-agent` (with its embedded MQTT
//! broker) and `millrace-sim` on free loopback ports, the simulator
//! injecting one spike a second, round-robin over ten `boiler-3/temp-N`
//! sensors (10 Hz each, 1 s windows). For each spike alert
//! the stream delivers, latency = arrival time − the spike reading's event
//! time (the simulator stamps it when it publishes). Prints p50, p99 and max.
//!
//! ```text
//! cargo build --workspace --bins
//! cargo run -p millrace-benches --bin alert_latency -- --spikes 100
//! ```
//!
//! Options: `--spikes N` (default 100), `--bin-dir DIR` (default
//! `$CARGO_TARGET_DIR/debug` or `target/debug`).

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const AGENT: &str = "gw-bench";
const TOKEN: &str = "bench-token-0123456789abcdef";
const DEVICE: &str = "boiler-3";
/// Sensors with injected spikes.
const SENSORS: usize = 10;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn wait_for_port(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "nothing listening on 127.0.0.1:{port} after {timeout:?}"
    ))
}

fn spawn(bin_dir: &Path, name: &str, args: &[&str], config: &Path) -> Result<Proc, String> {
    let exe = bin_dir.join(name);
    if !exe.exists() {
        return Err(format!(
            "{} not built: run `cargo build --workspace --bins`",
            exe.display()
        ));
    }
    Command::new(&exe)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map(Proc)
        .map_err(|e| format!("starting {name}: {e}"))
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> Result<(), String> {
    let mut spikes = 100usize;
    let mut bin_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target"))
        .join("debug");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--spikes" => {
                spikes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--spikes needs a positive number")?;
            }
            "--bin-dir" => bin_dir = PathBuf::from(args.next().ok_or("--bin-dir needs a path")?),
            other => {
                return Err(format!(
                    "unknown argument `{other}` (--spikes N, --bin-dir DIR)"
                ))
            }
        }
    }

    let dir = std::env::temp_dir().join(format!("millrace-alert-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (agg_port, mqtt_port) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    let agg_toml = write(
        "aggregator.toml",
        format!(
            "listen = \"127.0.0.1:{agg_port}\"\ndata-dir = \"{}\"\n[[agents]]\nid = \"{AGENT}\"\ntoken = \"{TOKEN}\"\n",
            dir.join("agg").display()
        ),
    )?;
    let agent_toml = write(
        "agent.toml",
        format!(
            r#"[agent]
id = "{AGENT}"
data-dir = "{}"
[window]
width = "1s"
allowed-lateness = "300ms"
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
url = "http://127.0.0.1:{agg_port}"
token = "{TOKEN}"
"#,
            dir.join("agent").display()
        ),
    )?;
    // Ten sensors, each spiking every 10 s, staggered by 1 s: one spike a
    // second overall, and at most one spiked window in each baseline history.
    let mut sim = format!(
        "seed = 5\n[mqtt]\nbroker = \"127.0.0.1:{mqtt_port}\"\nclient-id = \"sim-alert-latency\"\nreconnect-delay = \"200ms\"\n"
    );
    for i in 0..SENSORS {
        sim.push_str(&format!(
            r#"
[[mqtt-sensor]]
topic = "plant/{DEVICE}/temp-{i}"
interval = "100ms"
unit = "degC"
signal = {{ offset = 180.0, noise-stddev = 0.5 }}

[[anomaly]]
series = "{DEVICE}/temp-{i}"
kind = "spike"
magnitude = 60.0
from = "{from_s}s"
every = "{SENSORS}s"
"#,
            from_s = 10 + i
        ));
    }
    let sim_toml = write("sim.toml", sim)?;

    let _aggregator = spawn(&bin_dir, "millrace-aggregator", &["run"], &agg_toml)?;
    wait_for_port(agg_port, Duration::from_secs(20))?;
    let _agent = spawn(&bin_dir, "millrace-agent", &["run"], &agent_toml)?;
    wait_for_port(mqtt_port, Duration::from_secs(20))?;
    let _sim = spawn(&bin_dir, "millrace-sim", &["run", "--no-rtu"], &sim_toml)?;

    let mut stream = TcpStream::connect(("127.0.0.1", agg_port)).map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /api/v1/events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(stream).lines();
    let mut latencies_ms = Vec::with_capacity(spikes);
    let mut event = String::new();
    eprintln!("waiting for {spikes} spike alerts (warm-up ≈ 10 s, then one a second)…");
    while latencies_ms.len() < spikes {
        let line = lines
            .next()
            .ok_or("the event stream ended")?
            .map_err(|e| format!("reading the event stream: {e}"))?;
        let arrived_ms = now_ms();
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            if event != "alert" {
                continue;
            }
            let alert: Value =
                serde_json::from_str(data).map_err(|e| format!("alert event: {e}"))?;
            let spiked = alert["series"]["device"] == DEVICE
                && alert["series"]["sensor"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("temp-"));
            if alert["kind"] == "spike" && spiked {
                let time_ms = alert["time_ms"].as_i64().ok_or("alert without time_ms")?;
                latencies_ms.push(arrived_ms - time_ms);
                if latencies_ms.len() % 10 == 0 {
                    eprintln!("{} spike alerts", latencies_ms.len());
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    latencies_ms.sort_unstable();
    let mean = latencies_ms.iter().sum::<i64>() as f64 / latencies_ms.len() as f64;
    println!(
        "alert latency over {} spikes (spike event time → alert on /api/v1/events): \
         p50 {} ms, p99 {} ms, max {} ms, min {} ms, mean {:.1} ms",
        latencies_ms.len(),
        percentile(&latencies_ms, 50.0),
        percentile(&latencies_ms, 99.0),
        latencies_ms[latencies_ms.len() - 1],
        latencies_ms[0],
        mean
    );
    Ok(())
}
