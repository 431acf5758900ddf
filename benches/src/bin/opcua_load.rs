//! OPC UA ingest under load, end to end: a release `millrace-agent` subscribed
//! to N variables of an asyncua server (`scripts/opcua-peer.py --load N`,
//! the same peer the tests use) that writes each of them once per round;
//! how many values become readings, at what rate, and what the agent pays
//! in CPU and memory.
//!
//! One subscription (publishing interval 100 ms, sampling 50 ms, queue 10
//! per item), security None, anonymous, no uplink, `/metrics` on a free
//! loopback port. After the initial values arrived, the peer runs `load
//! ROUNDS PERIOD`; the tool waits until `millrace_opcua_readings_total`
//! reaches the initial values plus every value written (or stops changing
//! for 5 s), then reads the agent's CPU time (utime + stime) and peak RSS
//! (`VmHWM`) from `/proc`. CPU per reading is the agent's CPU during the
//! load divided by the readings it made then. Readings lost = written −
//! received; the server's per-item queue may merge values if the agent's
//! publishes fall behind (counted, printed).
//!
//! ```text
//! cargo build --release -p millrace-agent
//! cargo run --release -p millrace-benches --bin opcua_load [-- --nodes 1000 --rounds 200 --period-ms 100]
//! ```
//!
//! Needs the Python venv of `scripts/setup.sh` (`MILLRACE_VENV`, default
//! `~/.cache/millrace-venv`) with asyncua.

use millrace_benches::process::{
    clock_ticks_per_s, cpu_seconds, free_port, log_file, metric, poll_until, port_open, scrape,
    status_kib, write_file, Proc,
};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(100);
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    agent: PathBuf,
    nodes: usize,
    rounds: usize,
    period_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/millrace-target")
        });
    let mut args = Args {
        agent: target.join("release/millrace-agent"),
        nodes: 1000,
        rounds: 200,
        period_ms: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--agent" => args.agent = PathBuf::from(value()?),
            "--nodes" => args.nodes = value()?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--period-ms" => {
                args.period_ms = value()?.parse().map_err(|e| format!("--period-ms: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !args.agent.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p millrace-agent",
            args.agent.display()
        ));
    }
    Ok(args)
}

fn venv_python() -> PathBuf {
    std::env::var_os("MILLRACE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/millrace-venv")
        })
        .join("bin/python")
}

fn agent_config(dir: &Path, http_port: u16, opcua_port: u16, nodes: usize) -> String {
    let mut text = format!(
        "[agent]\nid = \"gw-opcua-load\"\ndata-dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n\
         [[opcua.servers]]\nname = \"load\"\nendpoint = \"opc.tcp://127.0.0.1:{opcua_port}/millrace/\"\n\
         publishing-interval = \"100ms\"\nsampling-interval = \"50ms\"\nqueue-size = 10\n",
        dir.join("state").display()
    );
    for i in 0..nodes {
        text.push_str(&format!(
            "\n[[opcua.servers.nodes]]\nnode-id = \"ns=2;s=Load.{i}\"\nsensor = \"l{i}\"\n"
        ));
    }
    text
}

fn run(args: &Args) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let (http_port, opcua_port) = (free_port()?, free_port()?);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/opcua-peer.py");
    let mut peer = Command::new(venv_python())
        .arg(&script)
        .args([
            "--port",
            &opcua_port.to_string(),
            "--load",
            &args.nodes.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file(&dir.path().join("peer.log"))?)
        .spawn()
        .map_err(|e| {
            format!(
                "starting the asyncua peer ({}): {e}",
                venv_python().display()
            )
        })?;
    let mut peer_in = peer.stdin.take().ok_or("peer stdin")?;
    let mut peer_out = BufReader::new(peer.stdout.take().ok_or("peer stdout")?);
    let mut peer = Proc {
        child: peer,
        name: "opcua-peer",
    };
    let mut line = String::new();
    peer_out
        .read_line(&mut line)
        .map_err(|e| format!("peer: {e}"))?;
    if !line.starts_with("ready") {
        return Err(format!(
            "the asyncua peer did not start: {line:?} (scripts/setup.sh installs asyncua)"
        ));
    }
    poll_until("the peer listening", START_TIMEOUT, POLL, &mut peer, || {
        port_open(opcua_port).then_some(())
    })?;

    let config = dir.path().join("agent.toml");
    write_file(
        &config,
        &agent_config(dir.path(), http_port, opcua_port, args.nodes),
    )?;
    let child = Command::new(&args.agent)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.path().join("agent.log"))?)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", args.agent.display()))?;
    let mut agent = Proc {
        child,
        name: "millrace-agent",
    };
    let pid = agent.child.id();
    let readings =
        |port: u16| scrape(port).map_or(0.0, |m| metric(&m, "millrace_opcua_readings_total"));
    let initial = args.nodes as f64;
    poll_until(
        "the initial values",
        START_TIMEOUT,
        POLL,
        &mut agent,
        || (readings(http_port) >= initial).then_some(()),
    )?;
    let ticks = clock_ticks_per_s();
    let cpu_before = cpu_seconds(pid, ticks)?;
    let got_before = readings(http_port);
    let started = Instant::now();
    writeln!(peer_in, "load {} {}", args.rounds, args.period_ms)
        .map_err(|e| format!("peer: {e}"))?;
    peer_in.flush().map_err(|e| format!("peer: {e}"))?;
    line.clear();
    peer_out
        .read_line(&mut line)
        .map_err(|e| format!("peer: {e}"))?;
    let written: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("written="))
        .and_then(|n| n.parse().ok())
        .ok_or(format!("peer answered {line:?}"))?;
    let write_s: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("seconds="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    // Until every written value arrived, or nothing more comes for 5 s.
    let (mut last, mut since) = (readings(http_port), Instant::now());
    poll_until(
        "the readings to settle",
        Duration::from_secs(600),
        POLL,
        &mut agent,
        || {
            let now = readings(http_port);
            if now >= got_before + written {
                return Some(());
            }
            if now != last {
                (last, since) = (now, Instant::now());
            }
            (since.elapsed() >= Duration::from_secs(5)).then_some(())
        },
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid, ticks)? - cpu_before;
    let got = readings(http_port) - got_before;
    let dropped =
        scrape(http_port).map_or(0.0, |m| metric(&m, "millrace_opcua_dropped_values_total"));
    let peak_kib = status_kib(pid, "VmHWM")?;
    println!(
        "opcua_load: {} nodes × {} rounds every {} ms: {written} values written in {write_s:.1} s by the peer; \
         agent made {got} readings ({} missing, {dropped} dropped by the agent) in {elapsed:.1} s = {:.0} readings/s; \
         agent CPU {cpu:.2} s = {:.2} CPU-µs per reading ({:.2} CPU-s per 1M); peak RSS {:.1} MiB",
        args.nodes,
        args.rounds,
        args.period_ms,
        written - got,
        got / elapsed,
        cpu * 1e6 / got.max(1.0),
        cpu * 1e6 / got.max(1.0),
        peak_kib as f64 / 1024.0
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opcua_load: {e}");
            ExitCode::FAILURE
        }
    }
}
