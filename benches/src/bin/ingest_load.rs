//! Ingest under load, end to end: how many readings a release `millrace-agent`
//! turns into windows when `millrace-sim publish` sends it a million of them
//! over MQTT, and what that costs in CPU and memory.
//!
//! For each case: a fresh state directory, an agent with no uplink and no
//! Modbus devices, `/metrics` on a free loopback port, and either its embedded
//! MQTT broker on a free port or (`external-…`) a mosquitto this tool starts;
//! one subscription `sensors/+/+` (JSON, `{1}`/`{2}` as device/sensor, `value`,
//! `ts` in ms), default windows (5 s, 2 s lateness). `millrace-sim publish`
//! runs the case; when it ends, the tool waits until the agent's
//! `millrace_readings_accepted_total` stops changing (2 s unchanged once the
//! agent received as many MQTT messages as the broker acknowledged to the
//! publisher, 30 s while it received fewer), reads
//! the agent's CPU time (utime + stime, `/proc/PID/stat`), peak RSS
//! (`VmHWM`) and its program code and libraries resident by then
//! (`RssFile`: file pages, shared with the page cache), sends SIGTERM (the
//! agent flushes every open window to its tap and exits) and sums `count`
//! over the tap's window records.
//!
//! lost = acked − in windows at QoS 1 (sent − in windows at QoS 0). Negative
//! means readings counted twice; any case with lost ≠ 0 fails the run.
//!
//! ```text
//! cargo build --release -p millrace-agent -p millrace-sim
//! cargo run --release -p millrace-benches --bin ingest_load [-- --case qos1-burst]
//! ```
//!
//! `qos1-backlog-uplink` (run only when named) is `qos1-burst` replayed as a
//! device would after an outage (`--event-step 1s`: each series' 1,000
//! readings 1 s apart, so 200,000 windows close), with an uplink to a
//! `millrace-aggregator` (embedded log) that is down while the publisher
//! runs. Once the agent settled the tool starts the aggregator and waits
//! until the agent's outbox is empty; it prints the backlog, how long the
//! drain took and the agent's CPU meanwhile, and the peak RSS covers both.
//! It needs `cargo build --release -p millrace-aggregator` too.
//!
//! Options: `--agent PATH`, `--sim PATH`, `--aggregator PATH` (default
//! `$CARGO_TARGET_DIR/release/…`, `CARGO_TARGET_DIR` default
//! `~/.cache/millrace-target`), `--case NAME` (repeatable; default all but
//! `qos1-backlog-uplink`),
//! `--messages N` (overrides every case), `--keep` (keep the state
//! directories, with the agent's log, the tap and the configs).

use millrace_benches::process::{
    clock_ticks_per_s, cpu_seconds, find_binary, free_port, log_file, metric, poll_until,
    port_open, scrape, shell_words, start_mosquitto, status_kib, write_file, Proc,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How long the accepted-readings counter must stay unchanged to count as
/// settled, once the agent received as many messages as were delivered…
const SETTLED_AFTER: Duration = Duration::from_secs(2);
/// … and while it has received fewer (an external broker may still hold some).
const STALLED_AFTER: Duration = Duration::from_secs(30);
/// How often the settle check scrapes `/metrics` (every scrape costs the agent CPU).
const SETTLE_POLL: Duration = Duration::from_millis(200);
/// How often start-up conditions are checked.
const START_POLL: Duration = Duration::from_millis(50);
/// Longest wait for the agent to settle after the publisher ended.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// The probe series of the external cases (not counted).
const PROBE_DEVICE: &str = "probe";

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    messages: u64,
    series: usize,
    qos: u8,
    inflight: u16,
    /// Readings/s; 0 = unpaced.
    rate: u64,
    /// Through a mosquitto the agent subscribes to, instead of its embedded broker.
    external: bool,
    /// With an uplink to a `millrace-aggregator` (embedded log) that is down
    /// while the publisher runs and started once the agent settled: the
    /// agent drains its outbox's backlog, and the case ends when it is empty.
    uplink: bool,
    /// Event time steps this many ms per reading of a series (`--event-step`
    /// of the publisher; a device replaying its buffer), 0 = wall clock.
    event_step_ms: u64,
}

/// The unthrottled QoS 1 burst to the embedded broker; the other cases
/// differ from it as written.
const BURST: Case = Case {
    name: "qos1-burst",
    messages: 1_000_000,
    series: 1000,
    qos: 1,
    inflight: 1000,
    rate: 0,
    external: false,
    uplink: false,
    event_step_ms: 0,
};

const CASES: [Case; 6] = [
    BURST,
    Case {
        name: "qos0-burst",
        qos: 0,
        ..BURST
    },
    Case {
        name: "qos1-20k",
        messages: 600_000,
        rate: 20_000,
        ..BURST
    },
    Case {
        name: "qos1-50k",
        messages: 600_000,
        rate: 50_000,
        ..BURST
    },
    // Sustained: 100,000 readings/s for 20 s.
    Case {
        name: "qos1-100k",
        messages: 2_000_000,
        rate: 100_000,
        ..BURST
    },
    Case {
        name: "external-qos1",
        external: true,
        ..BURST
    },
];

/// Cases run only when named (`--case`): they need more than the agent and
/// the simulator.
const EXTRA_CASES: [Case; 1] = [Case {
    name: "qos1-backlog-uplink",
    uplink: true,
    // 1,000 readings of each series 1 s apart: 200 windows per series,
    // 200,000 in the outbox when the aggregator comes up.
    event_step_ms: 1000,
    ..BURST
}];

#[derive(Debug)]
struct Args {
    agent: PathBuf,
    sim: PathBuf,
    aggregator: PathBuf,
    cases: Vec<Case>,
    keep: bool,
}

/// One case's measurements.
#[derive(Debug)]
struct Outcome {
    case: Case,
    sent: u64,
    acked: u64,
    in_windows: u64,
    /// Publisher start until the accepted counter last moved.
    wall_s: f64,
    publisher_s: f64,
    /// The publisher's own figure: acked (QoS 0: sent) messages per second.
    publisher_rate: f64,
    agent_cpu_s: f64,
    peak_rss_mib: f64,
    /// `RssFile` at the end: the program's code and the libraries' pages
    /// (clean, shared with the page cache), part of the peak RSS. They only
    /// grow over a run, so `peak − this` bounds the peak's own memory from below.
    file_rss_mib: f64,
    dead_letters: BTreeMap<String, u64>,
    metrics: BTreeMap<&'static str, f64>,
    publish_cmd: String,
    dir: PathBuf,
    drain: Option<Drain>,
}

/// An uplink case's drain of the outbox once the aggregator came up.
#[derive(Debug)]
struct Drain {
    /// Records in the outbox when the aggregator was started.
    backlog: f64,
    /// Aggregator start until the outbox was empty.
    seconds: f64,
    /// The agent's CPU time meanwhile (not in the table's CPU column).
    agent_cpu_s: f64,
    /// Peak RSS before the aggregator was started (the ingest's).
    ingest_peak_rss_mib: f64,
}

impl Outcome {
    /// What the publisher handed over and the broker took: acked at QoS 1, sent at QoS 0.
    fn delivered(&self) -> u64 {
        if self.case.qos == 0 {
            self.sent
        } else {
            self.acked
        }
    }

    fn lost(&self) -> i64 {
        self.delivered() as i64 - self.in_windows as i64
    }
}

/// Readings in the tap's window records (the probe series left out) and dead
/// letters by reason.
fn read_tap(path: &Path) -> Result<(u64, BTreeMap<String, u64>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut in_windows = 0;
    let mut dead_letters = BTreeMap::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        let record: Value =
            serde_json::from_str(&line).map_err(|e| format!("tap line `{line}`: {e}"))?;
        match record["type"].as_str() {
            Some("window") if record["series"]["device"] != PROBE_DEVICE => {
                in_windows += record["count"]
                    .as_u64()
                    .ok_or_else(|| format!("window without a count: {line}"))?;
            }
            Some("dead-letter") => {
                let reason = record["reason"].as_str().unwrap_or("?").to_owned();
                *dead_letters.entry(reason).or_default() += 1;
            }
            _ => {}
        }
    }
    Ok((in_windows, dead_letters))
}

const SUBSCRIPTION: &str = r#"filter = "sensors/+/+"
qos = 1
format = "json"
device = "{1}"
sensor = "{2}"
value-field = "value"
time-field = "ts"
time-unit = "ms"
"#;

fn agent_config(dir: &Path, http_port: u16, source: &str) -> String {
    format!(
        "[agent]\nid = \"gw-ingest-load\"\ndata-dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n{source}",
        dir.join("state").display()
    )
}

/// Publishes probe readings to mosquitto until the agent has received one: its
/// subscription is in place.
fn wait_subscribed(mqtt_port: u16, http_port: u16, agent: &mut Proc) -> Result<(), String> {
    let mosquitto_pub = find_binary("mosquitto_pub", "mosquitto-clients")?;
    let mut last_probe: Option<Instant> = None;
    poll_until(
        "the agent subscribed at mosquitto",
        START_TIMEOUT,
        START_POLL,
        agent,
        || {
            let received =
                scrape(http_port).map_or(0.0, |m| metric(&m, "millrace_mqtt_messages_total"));
            if received > 0.0 {
                return Some(());
            }
            if last_probe.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                last_probe = Some(Instant::now());
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let _ = Command::new(&mosquitto_pub)
                    .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
                    .args(["-t", &format!("sensors/{PROBE_DEVICE}/p")])
                    .args(["-m", &format!(r#"{{"ts":{ts},"value":0}}"#)])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            None
        },
    )
}

/// The token of the uplink cases' agent at their aggregator.
const UPLINK_TOKEN: &str = "ingest-load-uplink-token-0123456789";

/// A `millrace-aggregator` on loopback `port` with its embedded log,
/// expecting the agent `gw-ingest-load`.
fn start_aggregator(binary: &Path, dir: &Path, port: u16) -> Result<Proc, String> {
    let config = dir.join("aggregator.toml");
    write_file(
        &config,
        &format!(
            "listen = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\n\n\
             [[agents]]\nid = \"gw-ingest-load\"\ntoken = \"{UPLINK_TOKEN}\"\n",
            dir.join("aggregator-state").display()
        ),
    )?;
    let child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("aggregator.log"))?)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let mut proc = Proc {
        child,
        name: "millrace-aggregator",
    };
    poll_until(
        "aggregator listening",
        START_TIMEOUT,
        START_POLL,
        &mut proc,
        || port_open(port).then_some(()),
    )?;
    Ok(proc)
}

fn run_case(args: &Args, case: Case, root: &Path, ticks: f64) -> Result<Outcome, String> {
    let dir = root.join(case.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let http_port = free_port()?;

    let mut mosquitto = None;
    let (source, mqtt_port) = if case.external {
        let (proc, port) = start_mosquitto(&dir)?;
        mosquitto = Some(proc);
        (
            format!(
                "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient-id = \"gw-ingest-load\"\n\n\
                 [[mqtt.subscriptions]]\n{SUBSCRIPTION}"
            ),
            port,
        )
    } else {
        let port = free_port()?;
        (
            format!(
                "[broker]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n\n\
                 [[broker.subscriptions]]\n{SUBSCRIPTION}"
            ),
            port,
        )
    };
    let mut source = source;
    let aggregator_port = if case.uplink {
        let port = free_port()?;
        source.push_str(&format!(
            "\n\n[uplink]\nurl = \"http://127.0.0.1:{port}\"\ntoken = \"{UPLINK_TOKEN}\"\n\
             backoff-max = \"1s\"\n"
        ));
        Some(port)
    } else {
        None
    };
    let config = dir.join("agent.toml");
    write_file(&config, &agent_config(&dir, http_port, &source))?;
    let check = Command::new(&args.agent)
        .arg("check-config")
        .arg(&config)
        .output()
        .map_err(|e| format!("{}: {e}", args.agent.display()))?;
    if !check.status.success() {
        return Err(format!(
            "check-config {}: {}{}",
            config.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ));
    }

    let tap = dir.join("tap.jsonl");
    let child = Command::new(&args.agent)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--tap")
        .arg(&tap)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("agent.log"))?)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", args.agent.display()))?;
    let mut agent = Proc {
        child,
        name: "millrace-agent",
    };
    let pid = agent.child.id();
    poll_until(
        "agent /metrics",
        START_TIMEOUT,
        START_POLL,
        &mut agent,
        || scrape(http_port).map(|_| ()),
    )?;
    if case.external {
        wait_subscribed(mqtt_port, http_port, &mut agent)?;
    } else {
        poll_until(
            "agent broker listening",
            START_TIMEOUT,
            START_POLL,
            &mut agent,
            || port_open(mqtt_port).then_some(()),
        )?;
    }

    let sim_args: Vec<String> = [
        "publish".to_owned(),
        "--broker".to_owned(),
        format!("127.0.0.1:{mqtt_port}"),
        "--messages".to_owned(),
        case.messages.to_string(),
        "--series".to_owned(),
        case.series.to_string(),
        "--qos".to_owned(),
        case.qos.to_string(),
        "--inflight".to_owned(),
        case.inflight.to_string(),
        "--rate".to_owned(),
        case.rate.to_string(),
        "--drain-timeout".to_owned(),
        "30s".to_owned(),
    ]
    .into_iter()
    .chain(
        (case.event_step_ms > 0)
            .then(|| {
                [
                    "--event-step".to_owned(),
                    format!("{}ms", case.event_step_ms),
                ]
            })
            .into_iter()
            .flatten(),
    )
    .collect();
    let publish_cmd = shell_words(
        std::iter::once(args.sim.to_str().unwrap_or("millrace-sim"))
            .chain(sim_args.iter().map(String::as_str)),
    );
    eprintln!("[{}] {publish_cmd}", case.name);
    let started = Instant::now();
    let out = Command::new(&args.sim)
        .args(&sim_args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(log_file(&dir.join("publish.log"))?)
        .output()
        .map_err(|e| format!("running {}: {e}", args.sim.display()))?;
    let publisher_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "millrace-sim publish failed ({}); see {}",
            out.status,
            dir.join("publish.log").display()
        ));
    }
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("no JSON report from millrace-sim publish: {stdout}"))?;
    let count = |key: &str| -> Result<u64, String> {
        report[key]
            .as_u64()
            .ok_or_else(|| format!("report without `{key}`: {report}"))
    };
    let (sent, acked) = (count("sent")?, count("acked")?);

    // Settled: the accepted counter unchanged for SETTLED_AFTER once the
    // agent has received as many messages as the broker took; short of that,
    // unchanged for STALLED_AFTER (a broker may still hold the rest).
    let delivered = if case.qos == 0 { sent } else { acked } as f64;
    let mut last = (f64::NAN, Instant::now());
    let settled_at = poll_until(
        "agent settled",
        SETTLE_TIMEOUT,
        SETTLE_POLL,
        &mut agent,
        || {
            let text = scrape(http_port)?;
            let accepted = metric(&text, "millrace_readings_accepted_total");
            if accepted != last.0 {
                last = (accepted, Instant::now());
                return None;
            }
            let received = metric(&text, "millrace_mqtt_messages_total");
            let quiet_for = if received >= delivered {
                SETTLED_AFTER
            } else {
                STALLED_AFTER
            };
            (last.1.elapsed() >= quiet_for).then_some(last.1)
        },
    )?;
    // With an uplink: now the aggregator comes up, and the agent drains its
    // outbox (every window closed so far) into it.
    let mut aggregator = None;
    let mut drain = None;
    if let Some(port) = aggregator_port {
        let backlog = scrape(http_port).map_or(0.0, |m| metric(&m, "millrace_outbox_records"));
        let cpu_before = cpu_seconds(pid, ticks)?;
        let ingest_peak_rss_mib = status_kib(pid, "VmHWM")? as f64 / 1024.0;
        let drain_started = Instant::now();
        aggregator = Some(start_aggregator(&args.aggregator, &dir, port)?);
        poll_until(
            "agent outbox drained",
            SETTLE_TIMEOUT,
            SETTLE_POLL,
            &mut agent,
            || {
                let text = scrape(http_port)?;
                (metric(&text, "millrace_outbox_records") == 0.0).then_some(())
            },
        )?;
        drain = Some(Drain {
            backlog,
            seconds: drain_started.elapsed().as_secs_f64(),
            agent_cpu_s: cpu_seconds(pid, ticks)? - cpu_before,
            ingest_peak_rss_mib,
        });
    }
    let wall_s = (settled_at - started).as_secs_f64();
    let text = scrape(http_port).unwrap_or_default();
    let metrics: BTreeMap<&'static str, f64> = [
        "millrace_mqtt_messages_total",
        "millrace_readings_in_total",
        "millrace_readings_accepted_total",
        "millrace_late_readings_total",
        "millrace_redelivered_readings_total",
    ]
    .into_iter()
    .map(|name| (name, metric(&text, name)))
    .collect();
    // The table's CPU is the ingest's; the drain's is reported apart.
    let agent_cpu_s = cpu_seconds(pid, ticks)? - drain.as_ref().map_or(0.0, |d| d.agent_cpu_s);
    let peak_rss_mib = status_kib(pid, "VmHWM")? as f64 / 1024.0;
    let file_rss_mib = status_kib(pid, "RssFile")? as f64 / 1024.0;

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map_err(|e| format!("kill -TERM {pid}: {e}"))?;
    if !status.success() {
        return Err(format!("kill -TERM {pid} failed"));
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let exit = loop {
        if let Some(s) = agent.child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the agent did not stop within {STOP_TIMEOUT:?} of SIGTERM"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !exit.success() {
        return Err(format!(
            "the agent exited with {exit} after SIGTERM; see {}",
            dir.join("agent.log").display()
        ));
    }
    drop(mosquitto);
    drop(aggregator);
    let (in_windows, dead_letters) = read_tap(&tap)?;
    Ok(Outcome {
        case,
        sent,
        acked,
        in_windows,
        wall_s,
        publisher_s,
        publisher_rate: report["rate"].as_f64().unwrap_or(f64::NAN),
        agent_cpu_s,
        peak_rss_mib,
        file_rss_mib,
        dead_letters,
        metrics,
        publish_cmd,
        dir,
        drain,
    })
}

fn parse_args() -> Result<Args, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/millrace-target"))
        })
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("release");
    let mut agent = target.join("millrace-agent");
    let mut sim = target.join("millrace-sim");
    let mut aggregator = target.join("millrace-aggregator");
    let mut names = Vec::new();
    let mut messages = None;
    let mut keep = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or_else(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--agent" => agent = PathBuf::from(value("a path")?),
            "--sim" => sim = PathBuf::from(value("a path")?),
            "--aggregator" => aggregator = PathBuf::from(value("a path")?),
            "--case" => names.push(value("a case name")?),
            "--messages" => {
                messages = Some(
                    value("a number")?
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or("--messages needs a positive number")?,
                )
            }
            "--keep" => keep = true,
            other => {
                return Err(format!(
                    "unknown argument `{other}` (--agent PATH, --sim PATH, --aggregator PATH, --case NAME, --messages N, --keep)"
                ))
            }
        }
    }
    let mut cases = Vec::new();
    for name in &names {
        let all_cases = CASES.iter().chain(&EXTRA_CASES);
        let case = all_cases.clone().find(|c| c.name == name).ok_or_else(|| {
            let all: Vec<&str> = all_cases.map(|c| c.name).collect();
            format!("unknown case `{name}` (cases: {})", all.join(", "))
        })?;
        cases.push(*case);
    }
    if cases.is_empty() {
        cases = CASES.to_vec();
    }
    if let Some(n) = messages {
        for c in &mut cases {
            c.messages = n;
        }
    }
    for (bin, what) in [(&agent, "millrace-agent"), (&sim, "millrace-sim")] {
        if !bin.is_file() {
            return Err(format!(
                "{} not found: run `cargo build --release -p millrace-agent -p millrace-sim` (or pass --{})",
                bin.display(),
                if what == "millrace-agent" { "agent" } else { "sim" }
            ));
        }
    }
    if cases.iter().any(|c| c.uplink) && !aggregator.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release -p millrace-aggregator` (or pass --aggregator)",
            aggregator.display()
        ));
    }
    Ok(Args {
        agent,
        sim,
        aggregator,
        cases,
        keep,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ingest_load: {e}");
            return ExitCode::from(2);
        }
    };
    let command = shell_words(
        std::env::args()
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    let root = std::env::temp_dir().join(format!("millrace-ingest-load-{}", std::process::id()));
    let ticks = clock_ticks_per_s();

    let mut outcomes = Vec::new();
    let mut failed = false;
    for &case in &args.cases {
        eprintln!("[{}] starting", case.name);
        match run_case(&args, case, &root, ticks) {
            Ok(o) => {
                eprintln!(
                    "[{}] sent {} acked {} in windows {} lost {}",
                    case.name,
                    o.sent,
                    o.acked,
                    o.in_windows,
                    o.lost()
                );
                failed |= o.lost() != 0;
                outcomes.push(o);
            }
            Err(e) => {
                eprintln!("[{}] failed: {e}", case.name);
                failed = true;
            }
        }
    }

    println!("command: {command}");
    println!("agent:   {}", args.agent.display());
    for o in &outcomes {
        println!("{:<14} {}", o.case.name, o.publish_cmd);
    }
    println!();
    println!("| case | sent | acked | in windows | lost | wall s | agent CPU-s per 1M readings | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        let acked = if o.case.qos == 0 {
            "– (QoS 0)".to_owned()
        } else {
            o.acked.to_string()
        };
        let per_million = if o.in_windows > 0 {
            format!("{:.2}", o.agent_cpu_s / o.in_windows as f64 * 1e6)
        } else {
            "–".to_owned()
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {:.1} |",
            o.case.name,
            o.sent,
            acked,
            o.in_windows,
            o.lost(),
            o.wall_s,
            per_million,
            o.peak_rss_mib
        );
    }
    println!();
    for o in &outcomes {
        let dead: Vec<String> = o
            .dead_letters
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let metrics: Vec<String> = o
            .metrics
            .iter()
            .map(|(name, v)| format!("{} {v}", name.trim_start_matches("millrace_")))
            .collect();
        println!(
            "{}: publisher {:.1} s ({:.0} msg/s); agent CPU {:.1} s; code and libraries \
             resident at the end {:.1} MiB (RssFile, part of the peak RSS); dead letters: {}; {}",
            o.case.name,
            o.publisher_s,
            o.publisher_rate,
            o.agent_cpu_s,
            o.file_rss_mib,
            if dead.is_empty() {
                "none".to_owned()
            } else {
                dead.join(", ")
            },
            metrics.join(", ")
        );
        if let Some(d) = &o.drain {
            println!(
                "{}: uplink drained {:.0} outbox records in {:.1} s ({:.0}/s), agent CPU {:.1} s \
                 ({:.1} CPU-µs per record); peak RSS {:.1} MiB before the drain (the table's \
                 covers ingest and drain)",
                o.case.name,
                d.backlog,
                d.seconds,
                d.backlog / d.seconds,
                d.agent_cpu_s,
                d.agent_cpu_s * 1e6 / d.backlog.max(1.0),
                d.ingest_peak_rss_mib
            );
        }
    }
    if args.keep {
        for o in &outcomes {
            println!("{}: kept {}", o.case.name, o.dir.display());
        }
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
