//! Shared helpers for the end-to-end tests: the workspace's binaries, free
//! loopback ports, child processes that die with the test, and real peers
//! (mosquitto) started on those ports.
//!
//! A missing peer is a test failure with a message naming the package and the
//! set-up script, never a skip.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// The workspace's target directory (where `cargo build --workspace --bins` put the binaries).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    workspace_root().join("target")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a workspace binary built in the dev profile; fails with a hint if missing.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("debug").join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Path of an external program, failing the test with a set-up hint if it is absent.
pub fn require_program(name: &str, package: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("run sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "`{name}` is missing: install the Debian package `{package}` (scripts/setup.sh does)"
    );
    PathBuf::from(path)
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on {addr} after {timeout:?}");
}

/// A mosquitto broker on a free loopback port, with its own config file.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    pub guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        let exe = require_program("mosquitto", "mosquitto");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("write mosquitto.conf");
        let guard = ChildGuard::spawn(
            "mosquitto",
            Command::new(exe)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        );
        Self {
            port,
            guard,
            _dir: dir,
        }
    }
}

/// Reads JSON lines from a file that another process appends to, until
/// `done` says enough or the timeout passes. Returns every line read.
pub fn follow_json_lines(
    path: &Path,
    timeout: Duration,
    mut done: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut offset = 0u64;
    while Instant::now() < deadline {
        if let Ok(f) = std::fs::File::open(path) {
            use std::io::{Seek, SeekFrom};
            let mut r = BufReader::new(f);
            if r.seek(SeekFrom::Start(offset)).is_ok() {
                let mut line = String::new();
                while let Ok(n) = r.read_line(&mut line) {
                    if n == 0 || !line.ends_with('\n') {
                        break;
                    }
                    offset += n as u64;
                    if let Ok(v) = serde_json::from_str(line.trim_end()) {
                        seen.push(v);
                    }
                    line.clear();
                }
            }
        }
        if done(&seen) {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}
