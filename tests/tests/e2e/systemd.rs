//! The unit files in `systemd/`, checked by systemd's own tools:
//! `systemd-analyze verify` must be clean (exit 0 and no message) and
//! `systemd-analyze security --offline=yes` must rate each unit at 2.0 or
//! lower. No systemd runs as PID 1 here, so `verify` works on a scratch root
//! holding the host's stock units, the unit under test in
//! `/etc/systemd/system/` and the real binary at its `ExecStart=` path.
//!
//! A missing `systemd-analyze` fails the tests (Debian package `systemd`,
//! installed by scripts/setup.sh).

use millrace_tests::{bin, require_program, workspace_root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Highest overall exposure level `systemd-analyze security` may report.
const MAX_EXPOSURE: f64 = 2.0;

/// Where the units install the binaries (`ExecStart=`).
const INSTALL_BIN_DIR: &str = "usr/local/bin";

fn unit_path(unit: &str) -> PathBuf {
    workspace_root().join("systemd").join(unit)
}

fn systemd_analyze() -> PathBuf {
    require_program("systemd-analyze", "systemd")
}

/// A scratch root for `systemd-analyze verify --root`: the host's stock units
/// (so targets and mounts a unit pulls in resolve), `unit` installed, and
/// `binary` at the path its `ExecStart=` names.
fn scratch_root(unit: &Path, binary: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let stock = Path::new("/usr/lib/systemd/system");
    assert!(
        stock.is_dir(),
        "{} is missing: install the Debian package `systemd` (scripts/setup.sh does)",
        stock.display()
    );
    let lib = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&lib).expect("mkdir usr/lib/systemd");
    let status = Command::new("cp")
        .arg("-r")
        .arg(stock)
        .arg(&lib)
        .status()
        .expect("run cp");
    assert!(status.success(), "copying {} failed", stock.display());

    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).expect("mkdir etc/systemd/system");
    std::fs::copy(unit, units.join(unit.file_name().expect("unit file name")))
        .expect("install the unit");

    let bin_dir = root.path().join(INSTALL_BIN_DIR);
    std::fs::create_dir_all(&bin_dir).expect("mkdir usr/local/bin");
    let built = bin(binary);
    let installed = bin_dir.join(binary);
    if std::fs::hard_link(&built, &installed).is_err() {
        std::fs::copy(&built, &installed).expect("install the binary");
    }
    root
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `systemd-analyze verify` of `unit` installed in a scratch root: exit
/// status and everything it printed.
fn verify(unit: &Path, binary: &str) -> (bool, String) {
    let root = scratch_root(unit, binary);
    let installed = root
        .path()
        .join("etc/systemd/system")
        .join(unit.file_name().expect("unit file name"));
    let out = run(Command::new(systemd_analyze())
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.path().display()))
        .arg(&installed));
    (out.status.success(), text(&out))
}

fn assert_verify_clean(unit: &str, binary: &str) {
    let (ok, messages) = verify(&unit_path(unit), binary);
    assert!(
        ok && messages.trim().is_empty(),
        "systemd-analyze verify {unit} is not clean (exit ok: {ok}):\n{messages}"
    );
}

/// The overall exposure level `systemd-analyze security --offline=yes`
/// reports for `unit`, with its full report for failure messages.
fn exposure(unit: &str) -> (f64, String) {
    let path = unit_path(unit);
    let out = run(Command::new(systemd_analyze())
        .args(["security", "--offline=yes", "--no-pager"])
        // The tool's own scale is 0..100 for 0.0..10.0.
        .arg(format!("--threshold={}", (MAX_EXPOSURE * 10.0) as u32))
        .arg(&path));
    let report = text(&out);
    let level = report
        .lines()
        .find_map(|line| {
            let rest = line.split("Overall exposure level for ").nth(1)?;
            let value = rest.split(": ").nth(1)?.split_whitespace().next()?;
            value.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("no overall exposure level in the report for {unit}:\n{report}"));
    assert_eq!(
        out.status.success(),
        level <= MAX_EXPOSURE,
        "exit status and reported level {level} disagree for {unit}:\n{report}"
    );
    (level, report)
}

/// `key=value` lines of the `[Service]` section of a unit file.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let body = std::fs::read_to_string(unit_path(unit)).expect("read unit file");
    let mut in_service = false;
    let mut settings = Vec::new();
    for line in body.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    settings
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn agent_unit_verifies_clean() {
    assert_verify_clean("millrace-agent.service", "millrace-agent");
}

#[test]
fn aggregator_unit_verifies_clean() {
    assert_verify_clean("millrace-aggregator.service", "millrace-aggregator");
}

#[test]
fn verify_reports_what_a_broken_unit_gets_wrong() {
    // The clean checks above rely on `verify` printing what it ignores (it
    // still exits 0 for an unknown key): make sure that holds on this host.
    let good = std::fs::read_to_string(unit_path("millrace-agent.service")).expect("read unit");
    let broken = good
        .replacen("Restart=always", "Restart=alwayz", 1)
        .replacen("[Service]\n", "[Service]\nWatchdogSecs=30s\n", 1);
    assert_ne!(
        good, broken,
        "the agent unit lost Restart=always or [Service]"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("millrace-agent.service");
    std::fs::write(&unit, broken).expect("write broken unit");
    let (_, messages) = verify(&unit, "millrace-agent");
    assert!(
        messages.contains("alwayz") && messages.contains("WatchdogSecs"),
        "systemd-analyze verify did not report the broken settings:\n{messages}"
    );
}

#[test]
fn agent_unit_exposure_is_at_most_2() {
    let (level, report) = exposure("millrace-agent.service");
    assert!(
        level <= MAX_EXPOSURE,
        "agent unit exposure {level} > {MAX_EXPOSURE}:\n{report}"
    );
}

#[test]
fn aggregator_unit_exposure_is_at_most_2() {
    let (level, report) = exposure("millrace-aggregator.service");
    assert!(
        level <= MAX_EXPOSURE,
        "aggregator unit exposure {level} > {MAX_EXPOSURE}:\n{report}"
    );
}

#[test]
fn agent_unit_is_a_watched_notify_service() {
    let s = service_settings("millrace-agent.service");
    let one = |key: &str| -> String {
        let values = setting(&s, key);
        assert_eq!(
            values.len(),
            1,
            "{key}= should be set once in the agent unit: {values:?}"
        );
        values[0].to_string()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "millrace");
    assert_eq!(one("ConfigurationDirectory"), "millrace");
    assert_eq!(one("DevicePolicy"), "closed");
    assert!(
        one("ExecStart").contains("/etc/millrace/agent.toml"),
        "the agent reads its config from /etc/millrace"
    );
    let watchdog = one("WatchdogSec");
    let seconds: u64 = watchdog
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("WatchdogSec={watchdog} is not whole seconds"));
    // The agent pings every WatchdogSec/2 while its pipeline (50 ms tick) beats.
    assert!(
        (2..=300).contains(&seconds),
        "WatchdogSec={watchdog} out of range"
    );
    let serial: Vec<&str> = setting(&s, "DeviceAllow");
    assert!(
        serial.iter().any(|d| d.starts_with("/dev/tty")),
        "no serial port in DeviceAllow= for Modbus RTU: {serial:?}"
    );
}
