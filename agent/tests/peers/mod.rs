//! Real peers for the integration tests, started as child processes:
//! `scripts/modbus-peer.py` (pymodbus) and `scripts/sparkplug-peer.py`
//! (pysparkplug), from the project's venv, and a socat pty pair standing in
//! for an RS-485 line.
//!
//! A missing peer fails the test with a message saying how to install it;
//! nothing is skipped. Every child is killed when its handle drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The Python interpreter of the venv holding pymodbus: `$MILLRACE_VENV`,
/// else `$HOME/.cache/millrace-venv`.
pub fn venv_python() -> PathBuf {
    let venv = match std::env::var_os("MILLRACE_VENV") {
        Some(v) => PathBuf::from(v),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/millrace-venv")
        }
    };
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "Python peers missing: no venv at {} (set MILLRACE_VENV or run scripts/setup.sh, \
         which installs pymodbus, pyserial and pysparkplug into it)",
        venv.display()
    );
    python
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives in the workspace")
        .to_path_buf()
}

/// A peer script from `scripts/`, run by the venv's Python: it prints a
/// `ready` line, then answers each command line on stdin with `ok <command>`.
/// Killed when dropped.
pub struct ScriptPeer {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    name: &'static str,
}

impl ScriptPeer {
    /// Starts `scripts/<name>` and returns it with its `ready` line.
    pub fn start(name: &'static str, args: &[&str]) -> (Self, String) {
        let script = repo_root().join("scripts").join(name);
        let mut child = Command::new(venv_python())
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = Self {
            child,
            stdin,
            lines,
            name,
        };
        let ready = peer.expect_line("ready", START_TIMEOUT);
        (peer, ready)
    }

    /// The next line starting with `prefix` (others are passed over).
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "{} did not print {prefix:?} within {timeout:?} (exit status {status:?}); \
                         is its Python package installed in the venv (scripts/setup.sh)?",
                        self.name
                    );
                }
            }
        }
    }

    /// Sends a command line and waits until the peer has applied it.
    pub fn command(&mut self, cmd: &str) {
        self.send(cmd);
        self.expect_line(&format!("ok {cmd}"), Duration::from_secs(5));
    }

    /// Sends a line without waiting for its answer.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("peer stdin open");
        self.stdin.flush().expect("peer stdin flush");
    }
}

impl Drop for ScriptPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `scripts/modbus-peer.py`.
pub struct ModbusPeer {
    peer: ScriptPeer,
    /// TCP: the port it listens on (127.0.0.1).
    pub port: u16,
}

impl ModbusPeer {
    /// Serves a plant map over Modbus TCP on a free port of 127.0.0.1, unit id 1.
    pub fn tcp(map: &str) -> Self {
        Self::start(&["tcp", "--map", map])
    }

    /// Serves a plant map over Modbus RTU on `path` for the given unit ids.
    pub fn rtu(map: &str, path: &Path, units: &[u8]) -> Self {
        let mut args = vec![
            "rtu".to_string(),
            "--map".into(),
            map.into(),
            "--path".into(),
            path.display().to_string(),
        ];
        for u in units {
            args.push("--unit".into());
            args.push(u.to_string());
        }
        Self::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Serves several units, each with its own map, over TCP (`tcp`: MBAP,
    /// `rtu-over-tcp`: RTU frames) on a free port of 127.0.0.1. Units in
    /// `gateway_absent` answer every request with exception 0B, as a gateway
    /// does for a dead unit behind it.
    pub fn units(transport: &str, units: &[(u8, &str)], gateway_absent: &[u8]) -> Self {
        let mut args = vec![transport.to_string()];
        for (unit, map) in units {
            args.push("--unit".into());
            args.push(format!("{unit}:{map}"));
        }
        for unit in gateway_absent {
            args.push("--gateway-absent".into());
            args.push(unit.to_string());
        }
        Self::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn start(args: &[&str]) -> Self {
        let (peer, ready) = ScriptPeer::start("modbus-peer.py", args);
        let port = match ready.split_once(" 127.0.0.1 ") {
            Some((_, port)) => port.parse().expect("peer prints its port"),
            None => 0,
        };
        Self { peer, port }
    }

    /// Sends a control command (`silent`, `normal`, `exception FC FIRST LAST CODE`)
    /// and waits until the peer has applied it.
    pub fn command(&mut self, cmd: &str) {
        self.peer.command(cmd);
    }

    /// TCP connections the peer has accepted so far.
    pub fn connections(&mut self) -> u64 {
        self.peer.send("connections");
        let line = self
            .peer
            .expect_line("ok connections ", Duration::from_secs(5));
        line["ok connections ".len()..]
            .parse()
            .expect("peer prints a count")
    }
}

/// A running `scripts/sparkplug-peer.py`: a Sparkplug B edge node (pysparkplug)
/// connected to the MQTT broker on `port` of 127.0.0.1.
pub struct SparkplugPeer {
    pub peer: ScriptPeer,
}

impl SparkplugPeer {
    pub fn start(port: u16, group: &str, node: &str, device: &str) -> Self {
        let port = port.to_string();
        let (peer, _) = ScriptPeer::start(
            "sparkplug-peer.py",
            &[
                "--port", &port, "--group", group, "--node", node, "--device", device,
            ],
        );
        Self { peer }
    }
}

/// Two linked ptys made by socat: what is written to one is read from the
/// other, like the two ends of a serial line.
pub struct PtyPair {
    child: Child,
    _dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
}

impl PtyPair {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("socat missing ({e}): install it with `apt-get install socat`")
            });
        let mut pair = Self {
            child,
            _dir: dir,
            a,
            b,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !(pair.a.exists() && pair.b.exists()) {
            if let Ok(Some(status)) = pair.child.try_wait() {
                panic!("socat exited before creating the pty pair: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "socat did not create the pty pair"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pair
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
