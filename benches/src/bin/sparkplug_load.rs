//! Sparkplug B ingest under load, end to end: `millrace-sim` plays N
//! Sparkplug B edge nodes (NBIRTH/DBIRTH, then DDATA by alias every
//! `--interval-ms` with M Double metrics each) through mosquitto, and a
//! release `millrace-agent` subscribed to `spBv1.0/load/#` (`format =
//! "sparkplug-b"`, QoS 0 as Sparkplug data is) decodes them into readings.
//! After the first readings arrive, the tool measures until the agent made
//! `--readings` more (`millrace_readings_in_total`): its CPU time (utime +
//! stime from `/proc`), the rate, and its peak RSS (`VmHWM`).
//!
//! ```text
//! cargo build --release -p millrace-agent -p millrace-sim
//! cargo run --release -p millrace-benches --bin sparkplug_load [-- --nodes 100 --metrics 10 --interval-ms 20 --readings 1000000]
//! ```

use millrace_benches::process::{
    clock_ticks_per_s, cpu_seconds, free_port, log_file, metric, poll_until, scrape,
    start_mosquitto, status_kib, write_file, Proc,
};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

struct Args {
    agent: PathBuf,
    sim: PathBuf,
    nodes: usize,
    metrics: usize,
    interval_ms: u64,
    readings: u64,
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
        sim: target.join("release/millrace-sim"),
        nodes: 100,
        metrics: 10,
        interval_ms: 20,
        readings: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--agent" => args.agent = PathBuf::from(value()?),
            "--sim" => args.sim = PathBuf::from(value()?),
            "--nodes" => args.nodes = number(value()?)? as usize,
            "--metrics" => args.metrics = number(value()?)? as usize,
            "--interval-ms" => args.interval_ms = number(value()?)?,
            "--readings" => args.readings = number(value()?)?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    for bin in [&args.agent, &args.sim] {
        if !bin.exists() {
            return Err(format!(
                "{} is missing: cargo build --release -p millrace-agent -p millrace-sim",
                bin.display()
            ));
        }
    }
    Ok(args)
}

fn run(args: &Args) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let (_mosquitto, mqtt_port) = start_mosquitto(dir.path())?;
    let http_port = free_port()?;
    let agent_toml = dir.path().join("agent.toml");
    write_file(
        &agent_toml,
        &format!(
            "[agent]\nid = \"gw-sparkplug-load\"\ndata-dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {mqtt_port}\nclient-id = \"gw-sparkplug-load\"\n\n\
             [[mqtt.subscriptions]]\nfilter = \"spBv1.0/load/#\"\nqos = 0\nformat = \"sparkplug-b\"\n",
            dir.path().join("state").display()
        ),
    )?;
    let mut sim_toml = format!(
        "seed = 7\n\n[mqtt]\nbroker = \"127.0.0.1:{mqtt_port}\"\nclient-id = \"sim-sparkplug-load\"\nqueue-capacity = 4096\n"
    );
    for n in 0..args.nodes {
        sim_toml.push_str(&format!(
            "\n[[sparkplug-node]]\ngroup = \"load\"\nnode = \"n{n}\"\ndevice = \"d\"\ninterval = \"{}ms\"\n",
            args.interval_ms
        ));
        for m in 0..args.metrics {
            sim_toml.push_str(&format!(
                "\n[[sparkplug-node.metrics]]\nname = \"M/{m}\"\nsignal = {{ offset = {m}.0, noise-stddev = 1.0 }}\n"
            ));
        }
    }
    let sim_path = dir.path().join("sim.toml");
    write_file(&sim_path, &sim_toml)?;

    let mut agent = Proc {
        child: Command::new(&args.agent)
            .args(["run", "--config"])
            .arg(&agent_toml)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.path().join("agent.log"))?)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", args.agent.display()))?,
        name: "millrace-agent",
    };
    let readings = || scrape(http_port).map(|m| metric(&m, "millrace_readings_in_total"));
    poll_until(
        "the agent's /metrics",
        Duration::from_secs(30),
        Duration::from_millis(50),
        &mut agent,
        || readings(),
    )?;
    let _sim = Proc {
        child: Command::new(&args.sim)
            .args(["run", "--config"])
            .arg(&sim_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.path().join("sim.log"))?)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", args.sim.display()))?,
        name: "millrace-sim",
    };
    poll_until(
        "the first readings",
        Duration::from_secs(30),
        Duration::from_millis(50),
        &mut agent,
        || readings().filter(|&n| n > 0.0),
    )?;
    let pid = agent.child.id();
    let ticks = clock_ticks_per_s();
    let (cpu0, n0, t0) = (
        cpu_seconds(pid, ticks)?,
        readings().unwrap_or(0.0),
        Instant::now(),
    );
    poll_until(
        "the readings to measure",
        Duration::from_secs(600),
        Duration::from_millis(200),
        &mut agent,
        || readings().filter(|&n| n >= n0 + args.readings as f64),
    )?;
    let (cpu1, n1) = (cpu_seconds(pid, ticks)?, readings().unwrap_or(0.0));
    let elapsed = t0.elapsed().as_secs_f64();
    let got = n1 - n0;
    let offered = (args.nodes * args.metrics) as f64 * 1000.0 / args.interval_ms as f64;
    let text = scrape(http_port).unwrap_or_default();
    let gaps = metric(&text, "millrace_sparkplug_seq_gaps_total");
    let peak = status_kib(pid, "VmHWM")? as f64 / 1024.0;
    println!(
        "sparkplug_load: {} nodes × {} metrics every {} ms (offered {offered:.0} readings/s, {:.0} messages/s): \
         {got} readings in {elapsed:.1} s = {:.0} readings/s; agent CPU {:.2} s = {:.2} CPU-µs per reading \
         ({:.2} CPU-s per 1M); peak RSS {peak:.1} MiB; sequence gaps {gaps}",
        args.nodes,
        args.metrics,
        args.interval_ms,
        args.nodes as f64 * 1000.0 / args.interval_ms as f64,
        got / elapsed,
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1e6 / got.max(1.0),
        (cpu1 - cpu0) * 1e6 / got.max(1.0),
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
            eprintln!("sparkplug_load: {e}");
            ExitCode::FAILURE
        }
    }
}
