//! The `millrace-sim` binary: config checking and clean shutdown on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_millrace-sim");

#[test]
fn check_config_accepts_the_example_plant() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sim.toml");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("press-1/temperature  (1 anomalies)"),
        "{stdout}"
    );
}

#[test]
fn check_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "seed = 1\n[mqtt]\nbroker = \"127.0.0.1:1883\"\nkeep-alive = \"soon\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.toml") && stderr.contains("mqtt.keep-alive"),
        "{stderr}"
    );
}

#[test]
fn help_documents_every_subcommand() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "load", "check-config"] {
        assert!(text.contains(word), "{text}");
    }
    let out = Command::new(BIN).args(["load", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--broker",
        "--rate",
        "--series",
        "--per-message",
        "--duration",
        "--topic-prefix",
    ] {
        assert!(text.contains(flag), "{text}");
    }
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plant.toml");
    std::fs::write(
        &path,
        "[[modbus-tcp]]\nname = \"p\"\nlisten = \"127.0.0.1:0\"\nunit-id = 1\n\
         [[modbus-tcp.points]]\nsensor = \"s\"\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\nsignal = { offset = 1 }\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .take(50)
        .map_while(Result::ok)
        .any(|line| line.contains("simulation started"));
    assert!(started, "no start log line");
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "millrace-sim did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Drain the rest of the log so the child never blocks on a full pipe.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("simulation stopped")),
        "{rest:?}"
    );
}
