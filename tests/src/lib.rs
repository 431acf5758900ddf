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

// ---------------------------------------------------------------------------
// Helpers for the chained tests (sim → agent → aggregator → log/Kafka).
// ---------------------------------------------------------------------------

/// A small deterministic RNG (SplitMix64), so a failing chaos run can be
/// replayed with the same seed.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]` (inclusive).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Writes an aggregator config for one or more agents (`(id, token)`),
/// listening on `127.0.0.1:port` with its state in `data_dir`. `extra` is
/// appended verbatim (e.g. a `[kafka]` table).
pub fn write_aggregator_config(
    path: &Path,
    port: u16,
    data_dir: &Path,
    agents: &[(&str, &str)],
    extra: &str,
) {
    let mut text = format!(
        "listen = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\nretry-after = \"1s\"\nshutdown-grace = \"2s\"\n",
        data_dir.display()
    );
    for (id, token) in agents {
        text.push_str(&format!(
            "\n[[agents]]\nid = \"{id}\"\ntoken = \"{token}\"\n"
        ));
    }
    text.push('\n');
    text.push_str(extra);
    std::fs::write(path, text).expect("write aggregator config");
}

/// Starts `millrace-aggregator run --config CONFIG` (stderr appended to
/// `log`) and waits until it listens on `port`.
pub fn start_aggregator(config: &Path, port: u16, log: &Path) -> ChildGuard {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open aggregator log");
    let guard = ChildGuard::spawn(
        "millrace-aggregator",
        Command::new(bin("millrace-aggregator"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(30),
    );
    guard
}

/// Every record of `topic` in the aggregator's embedded log, read with
/// `millrace-aggregator tail TOPIC --from-beginning --config CONFIG`.
pub fn aggregator_tail(config: &Path, topic: &str) -> Vec<serde_json::Value> {
    let out = Command::new(bin("millrace-aggregator"))
        .args(["tail", topic, "--from-beginning", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run millrace-aggregator tail");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A topic that does not exist yet (nothing written) reads as empty.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.trim().is_empty(),
            "millrace-aggregator tail {topic} failed: {stderr}"
        );
        return Vec::new();
    }
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("tail line {l:?}: {e}")))
        .collect()
}

/// One HTTP/1.1 request to `127.0.0.1:port` on a fresh connection; returns
/// the status (0 if none) and the body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Posts `batch` (binary wire format) with bearer `token`; returns status and body.
pub fn post_batch(port: u16, token: &str, batch: &millrace_protocol::Batch) -> (u16, String) {
    let auth = format!("Bearer {token}");
    http_request(
        port,
        "POST",
        "/api/v1/ingest",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-millrace-batch"),
        ],
        &batch.encode_binary(),
    )
}

/// The sum of every sample of metric `name` (any labels) on `/metrics`.
pub fn metric_total(port: u16, name: &str) -> f64 {
    let (_, body) = http_request(port, "GET", "/metrics", &[], b"");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The status code of `GET path` on `127.0.0.1:port`, or `None` if nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Calls `count` every `every` until it returned the same value for
/// `stable_for` (and `ok` accepts it), or `timeout` passes. Returns the last value.
pub fn wait_until_stable<T: PartialEq + Clone + std::fmt::Debug>(
    mut count: impl FnMut() -> T,
    mut ok: impl FnMut(&T) -> bool,
    every: Duration,
    stable_for: Duration,
    timeout: Duration,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = count();
    let mut since = Instant::now();
    loop {
        if ok(&last) && since.elapsed() >= stable_for {
            return last;
        }
        if Instant::now() >= deadline {
            return last;
        }
        std::thread::sleep(every);
        let now = count();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// `device/sensor` of a window (or any record with a `series`).
pub fn series_name(window: &serde_json::Value) -> String {
    format!(
        "{}/{}",
        window["series"]["device"].as_str().unwrap_or("?"),
        window["series"]["sensor"].as_str().unwrap_or("?")
    )
}

/// What [`check_windows`] found.
#[derive(Debug, Default, Clone)]
pub struct WindowCheck {
    /// Windows looked at.
    pub total: usize,
    /// Per series: (first start, last start, distinct windows).
    pub series: std::collections::BTreeMap<String, (i64, i64, usize)>,
    /// (agent, series, start_ms, times seen) for every key seen more than once.
    pub duplicates: Vec<(String, String, i64, usize)>,
    /// (series, missing start_ms) between each series' first and last window.
    pub gaps: Vec<(String, i64)>,
}

/// Checks window values (the `value` of a log record, or a tap line): no
/// (agent, series, start_ms) twice, and for each series every start between
/// the first and the last, step `width_ms`, present.
pub fn check_windows<'a>(
    windows: impl IntoIterator<Item = &'a serde_json::Value>,
    width_ms: i64,
) -> WindowCheck {
    use std::collections::{BTreeMap, BTreeSet};
    let mut seen: BTreeMap<(String, String, i64), usize> = BTreeMap::new();
    let mut starts: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut check = WindowCheck::default();
    for w in windows {
        check.total += 1;
        let agent = w["agent"].as_str().unwrap_or("?").to_string();
        let series = series_name(w);
        let start = w["start_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("window without start_ms: {w}"));
        *seen.entry((agent, series.clone(), start)).or_insert(0) += 1;
        starts.entry(series).or_default().insert(start);
    }
    for ((agent, series, start), n) in seen {
        if n > 1 {
            check.duplicates.push((agent, series, start, n));
        }
    }
    for (series, set) in starts {
        let first = *set.iter().next().expect("non-empty");
        let last = *set.iter().next_back().expect("non-empty");
        let mut t = first;
        while t <= last {
            if !set.contains(&t) {
                check.gaps.push((series.clone(), t));
            }
            t += width_ms;
        }
        check.series.insert(series, (first, last, set.len()));
    }
    check
}

/// Path of a script in the workspace's `scripts/`.
pub fn script(name: &str) -> PathBuf {
    workspace_root().join("scripts").join(name)
}

/// A tansu broker (Kafka-compatible) started by `scripts/kafka-peer.sh start DIR`,
/// stopped by `scripts/kafka-peer.sh stop DIR` on drop, even when the test fails.
#[derive(Debug)]
pub struct KafkaPeer {
    pub dir: PathBuf,
    pub port: u16,
}

impl KafkaPeer {
    /// Starts a broker with its store in `dir`, on `port` (or a free one).
    pub fn start(dir: &Path, port: Option<u16>) -> Self {
        Self::start_with(dir, port, None, &[])
    }

    /// Starts a broker that requires SASL SCRAM-SHA-512 from `(user, password)`.
    pub fn start_with_scram(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_with(dir, None, Some((user, password)), &[])
    }

    /// Starts a broker with `topics` (`NAME` or `NAME:PARTITIONS`) instead
    /// of the three millrace topics.
    pub fn start_with_topics(dir: &Path, topics: &[&str]) -> Self {
        Self::start_with(dir, None, None, topics)
    }

    fn start_with(
        dir: &Path,
        port: Option<u16>,
        scram: Option<(&str, &str)>,
        topics: &[&str],
    ) -> Self {
        let mut cmd = Command::new(script("kafka-peer.sh"));
        cmd.arg("start").arg(dir);
        if let Some((user, password)) = scram {
            cmd.env("KAFKA_PEER_SCRAM_USER", format!("{user}:{password}"));
        }
        match port {
            Some(port) => cmd.arg(port.to_string()),
            None if !topics.is_empty() => cmd.arg(""),
            None => &mut cmd,
        };
        cmd.args(topics);
        let out = cmd.output().expect("run scripts/kafka-peer.sh");
        assert!(
            out.status.success(),
            "scripts/kafka-peer.sh start failed (needs tansu, built by `scripts/kafka-peer.sh install`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .expect("kafka-peer.sh start prints the port");
        Self {
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Stops the broker; its store stays in `dir` for a restart.
    pub fn stop(&self) {
        let status = Command::new(script("kafka-peer.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status()
            .expect("run scripts/kafka-peer.sh stop");
        assert!(status.success(), "kafka-peer.sh stop failed");
    }
}

impl Drop for KafkaPeer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- tail of {}/tansu.log ---", self.dir.display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{l}");
            }
        }
        let _ = Command::new(script("kafka-peer.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Every record of `topic` read with the independent client
/// `scripts/kafka-read.py` (confluent-kafka).
pub fn kafka_read(port: u16, topic: &str, idle_timeout_s: f64) -> Vec<serde_json::Value> {
    kafka_read_as(port, topic, idle_timeout_s, None)
}

/// [`kafka_read`] authenticated with SASL SCRAM-SHA-512 as `(user, password)`.
pub fn kafka_read_as(
    port: u16,
    topic: &str,
    idle_timeout_s: f64,
    scram: Option<(&str, &str)>,
) -> Vec<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(script("kafka-read.py"))
        .args(["--brokers", &format!("127.0.0.1:{port}"), "--topic", topic])
        .args(["--idle-timeout", &idle_timeout_s.to_string()]);
    if let Some((user, password)) = scram {
        cmd.args(["--scram-user", user, "--scram-password", password]);
    }
    let out = cmd.output().expect("run python3 scripts/kafka-read.py");
    assert!(
        out.status.success(),
        "scripts/kafka-read.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("kafka-read line {l:?}: {e}")))
        .collect()
}

/// A small tmpfs mounted for a test (to fill a file system for real),
/// unmounted on drop. Mounting needs root (CAP_SYS_ADMIN): the test fails
/// with that said otherwise.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed ({status}): this test needs root (CAP_SYS_ADMIN) to fill a file system"
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with `name` until a write fails with "no
    /// space"; returns the bytes written. Remove the file to free the space.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join(name)).expect("create filler");
        let mut written = 0u64;
        for chunk in [1 << 20, 4096, 1] {
            let block = vec![0xa5u8; chunk];
            loop {
                match file.write(&block) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => panic!("filling {}: {e}", self.path().display()),
                }
            }
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
