//! The central side under load: how many windows per second a release
//! `millrace-aggregator` writes when many agents post batches at once, and
//! what that costs in CPU and memory.
//!
//! For each case: a fresh data directory, an aggregator with `--agents`
//! configured agents on a free loopback port, writing either to its embedded
//! log (`embedded`) or to a tansu broker this tool starts with
//! `scripts/kafka-peer.sh` (`kafka`; idempotent producer, `acks=all`, lz4,
//! keyed by series). The batches are built before the clock starts: each
//! agent's windows (one series per window, 1,000 series per agent, 5 s apart)
//! in batches of `--batch` records, in the binary wire encoding, gzip'd, as
//! the agents' uplink sends them. One thread per agent posts its batches in
//! order over one keep-alive HTTP/1.1 connection (a `503`/`429` is retried
//! after its `Retry-After`, counted). When every batch is acknowledged the
//! tool reads the aggregator's CPU time (utime + stime) and `VmHWM` from
//! `/proc` and checks `/metrics`: every window written once
//! (`millrace_aggregator_records_total{kind="window"}` = windows sent, no
//! duplicates).
//!
//! ```text
//! cargo build --release -p millrace-aggregator
//! cargo run --release -p millrace-benches --bin aggregator_load [-- --case embedded --windows 200000]
//! ```
//!
//! Options: `--aggregator PATH` (default `$CARGO_TARGET_DIR/release/…`),
//! `--case embedded|kafka|kafka-cluster` (repeatable; default embedded and
//! kafka; `kafka-cluster` is one `[cluster]` member on a six-partition
//! control topic), `--agents N` (20),
//! `--windows N` (1,000,000 in all), `--batch N` (500), `--keep`.

use flate2::write::GzEncoder;
use millrace_benches::process::{
    clock_ticks_per_s, cpu_seconds, free_port, log_file, metric, poll_until, port_open, scrape,
    status_kib, write_file, Proc,
};
use millrace_protocol::{Batch, Envelope, Record, SeriesKey, Window};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERIES_PER_AGENT: u64 = 1_000;
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Args {
    aggregator: PathBuf,
    cases: Vec<String>,
    agents: usize,
    windows: u64,
    batch: usize,
    keep: bool,
}

#[derive(Debug)]
struct Outcome {
    case: String,
    windows: u64,
    written: u64,
    duplicates: u64,
    retries: u64,
    wall_s: f64,
    cpu_s: f64,
    peak_rss_kib: u64,
}

fn token(agent: usize) -> String {
    format!("load-token-{agent:04}-0123456789abcdef")
}

fn agent_id(agent: usize) -> String {
    format!("load-gw-{agent:04}")
}

/// Agent `agent`'s batches: `windows` windows from seq 1, gzip'd binary.
fn build_batches(agent: usize, windows: u64, batch: usize) -> Vec<Vec<u8>> {
    let id = agent_id(agent);
    let agent_name: Arc<str> = id.as_str().into();
    let unit: Arc<str> = "bar".into();
    let keys: Vec<SeriesKey> = (0..SERIES_PER_AGENT)
        .map(|s| SeriesKey::new(format!("plc-{:02}", s / 50), format!("reg-{:02}", s % 50)))
        .collect();
    let base_ms = 1_700_000_000_000i64;
    let envelopes: Vec<Envelope> = (0..windows)
        .map(|i| {
            let start_ms = base_ms + (i / SERIES_PER_AGENT) as i64 * 5_000;
            let mean = 50.0 + (i % 97) as f64 * 0.25;
            Envelope {
                seq: i + 1,
                record: Record::Window(Window {
                    agent: Arc::clone(&agent_name),
                    series: keys[(i % SERIES_PER_AGENT) as usize].clone(),
                    start_ms,
                    end_ms: start_ms + 5_000,
                    count: 5,
                    mean,
                    min: mean - 1.0,
                    max: mean + 1.0,
                    stddev: 0.7,
                    first_event_ms: start_ms + 100,
                    last_event_ms: start_ms + 4_100,
                    unit: Arc::clone(&unit),
                    score: None,
                }),
            }
        })
        .collect();
    envelopes
        .chunks(batch)
        .map(|chunk| {
            let b = Batch::new(id.clone(), chunk.to_vec());
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&b.encode_binary()).expect("gzip into memory");
            gz.finish().expect("gzip into memory")
        })
        .collect()
}

/// Reads one HTTP/1.1 response; returns its status and `Retry-After` seconds.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<(u16, Option<u64>), String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("reading the status line: {e}"))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    let mut retry_after = None;
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("reading headers: {e}"))?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "retry-after" => retry_after = value.trim().parse().ok(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok((status, retry_after))
}

/// Posts `batches` in order over one keep-alive connection; returns retries.
fn post_all(port: u16, token: &str, batches: &[Vec<u8>]) -> Result<u64, String> {
    let connect = || -> Result<(TcpStream, BufReader<TcpStream>), String> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok((s, r))
    };
    let (mut stream, mut reader) = connect()?;
    let mut retries = 0;
    for body in batches {
        loop {
            let head = format!(
                "POST /api/v1/ingest HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Authorization: Bearer {token}\r\nContent-Type: application/x-millrace-batch\r\n\
                 Content-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let sent = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(body));
            let answer = match sent {
                Ok(()) => read_response(&mut reader),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok((200, _)) => break,
                Ok((503 | 429, retry_after)) => {
                    retries += 1;
                    std::thread::sleep(Duration::from_secs(retry_after.unwrap_or(1).min(5)));
                }
                Ok((status, _)) => return Err(format!("batch answered {status}")),
                Err(_) => {
                    // The server closed the connection: reconnect and resend.
                    retries += 1;
                    (stream, reader) = connect()?;
                }
            }
        }
    }
    Ok(retries)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// A tansu broker from `scripts/kafka-peer.sh`, stopped on drop.
struct Tansu {
    dir: PathBuf,
    port: u16,
}

impl Tansu {
    /// `topics`: none for the three millrace topics.
    fn start(dir: &Path, topics: &[&str]) -> Result<Self, String> {
        let script = workspace_root().join("scripts/kafka-peer.sh");
        let mut cmd = Command::new(&script);
        cmd.arg("start").arg(dir);
        if !topics.is_empty() {
            cmd.arg("").args(topics);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kafka-peer.sh start failed (install tansu with `scripts/kafka-peer.sh install`): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .ok_or("kafka-peer.sh start did not print a port")?;
        Ok(Self {
            dir: dir.to_owned(),
            port,
        })
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/kafka-peer.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn run_case(args: &Args, case: &str, root: &Path, ticks: f64) -> Result<Outcome, String> {
    let dir = root.join(case);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let tansu = match case {
        "kafka" => Some(Tansu::start(&dir.join("tansu"), &[])?),
        "kafka-cluster" => Some(Tansu::start(
            &dir.join("tansu"),
            &[
                "millrace.windows",
                "millrace.alerts",
                "millrace.dead-letters",
                "millrace.control:6",
            ],
        )?),
        "embedded" => None,
        other => {
            return Err(format!(
                "unknown case `{other}` (embedded, kafka, kafka-cluster)"
            ))
        }
    };
    let mut config = format!(
        // The per-agent rate limit is off: this measures the write path.
        "listen = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\nretry-after = \"1s\"\nagent-rate-limit = 0\n",
        dir.join("data").display()
    );
    for a in 0..args.agents {
        config.push_str(&format!(
            "\n[[agents]]\nid = \"{}\"\ntoken = \"{}\"\n",
            agent_id(a),
            token(a)
        ));
    }
    if let Some(t) = &tansu {
        config.push_str(&format!(
            "\n[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"10s\"\n",
            t.port
        ));
    }
    let cluster = case == "kafka-cluster";
    if cluster {
        // One member of a cluster: every batch also saves its agent's dedup
        // state to the control topic and reads it back.
        config.push_str(&format!(
            "\n[cluster]\nadvertise-url = \"http://127.0.0.1:{port}\"\n"
        ));
    }
    let config_path = dir.join("aggregator.toml");
    write_file(&config_path, &config)?;

    let per_agent = args.windows / args.agents as u64;
    let batches: Vec<Vec<Vec<u8>>> = (0..args.agents)
        .map(|a| build_batches(a, per_agent, args.batch))
        .collect();
    let windows = per_agent * args.agents as u64;

    let child = Command::new(&args.aggregator)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("aggregator.log"))?)
        .spawn()
        .map_err(|e| format!("{}: {e}", args.aggregator.display()))?;
    let mut proc = Proc {
        child,
        name: "millrace-aggregator",
    };
    let pid = proc.child.id();
    poll_until(
        "aggregator listening",
        START_TIMEOUT,
        Duration::from_millis(50),
        &mut proc,
        || port_open(port).then_some(()),
    )?;
    if cluster {
        poll_until(
            "aggregator owning the control partitions",
            START_TIMEOUT,
            Duration::from_millis(100),
            &mut proc,
            || {
                let text = scrape(port)?;
                (metric(&text, "millrace_aggregator_cluster_partitions_owned") == 6.0).then_some(())
            },
        )?;
    }
    let cpu_before = cpu_seconds(pid, ticks)?;

    let started = Instant::now();
    let senders: Vec<_> = batches
        .into_iter()
        .enumerate()
        .map(|(a, agent_batches)| {
            std::thread::spawn(move || post_all(port, &token(a), &agent_batches))
        })
        .collect();
    let mut retries = 0;
    for sender in senders {
        retries += sender
            .join()
            .map_err(|_| "a sender panicked".to_owned())??;
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds(pid, ticks)? - cpu_before;
    let peak_rss_kib = status_kib(pid, "VmHWM")?;
    let text = scrape(port).ok_or("no /metrics from the aggregator")?;
    let written = text
        .lines()
        .filter(|l| {
            l.starts_with("millrace_aggregator_records_total{") && l.contains("kind=\"window\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    let duplicates = metric(&text, "millrace_aggregator_duplicate_records_total") as u64;
    drop(proc);
    drop(tansu);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Outcome {
        case: case.to_owned(),
        windows,
        written,
        duplicates,
        retries,
        wall_s,
        cpu_s,
        peak_rss_kib,
    })
}

fn parse_args() -> Result<Args, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/millrace-target")
        });
    let mut args = Args {
        aggregator: target.join("release/millrace-aggregator"),
        cases: Vec::new(),
        agents: 20,
        windows: 1_000_000,
        batch: 500,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--aggregator" => args.aggregator = value("--aggregator")?.into(),
            "--case" => args.cases.push(value("--case")?),
            "--agents" => {
                args.agents = value("--agents")?
                    .parse()
                    .map_err(|e| format!("--agents: {e}"))?
            }
            "--windows" => {
                args.windows = value("--windows")?
                    .parse()
                    .map_err(|e| format!("--windows: {e}"))?
            }
            "--batch" => {
                args.batch = value("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?
            }
            "--keep" => args.keep = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if args.cases.is_empty() {
        args.cases = vec!["embedded".into(), "kafka".into()];
    }
    if args.agents == 0 || args.batch == 0 || args.windows < args.agents as u64 {
        return Err("--agents, --batch and --windows must be positive (windows ≥ agents)".into());
    }
    if !args.aggregator.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release -p millrace-aggregator` first",
            args.aggregator.display()
        ));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("aggregator_load: {e}");
            return ExitCode::from(2);
        }
    };
    let root =
        std::env::temp_dir().join(format!("millrace-aggregator-load-{}", std::process::id()));
    let ticks = clock_ticks_per_s();
    println!(
        "| case | agents | windows | written | duplicates | retries | wall s | windows/s | aggregator CPU-s per 100k | windows per CPU-s | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for case in &args.cases {
        match run_case(&args, case, &root, ticks) {
            Ok(o) => {
                let ok = o.written == o.windows && o.duplicates == 0;
                failed |= !ok;
                println!(
                    "| {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.0} | {:.1} |{}",
                    o.case,
                    args.agents,
                    o.windows,
                    o.written,
                    o.duplicates,
                    o.retries,
                    o.wall_s,
                    o.windows as f64 / o.wall_s,
                    o.cpu_s / o.windows as f64 * 100_000.0,
                    o.windows as f64 / o.cpu_s.max(1e-9),
                    o.peak_rss_kib as f64 / 1024.0,
                    if ok { "" } else { " **MISMATCH**" }
                );
            }
            Err(e) => {
                failed = true;
                println!("| {case} | error: {e} |");
            }
        }
    }
    if !args.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
