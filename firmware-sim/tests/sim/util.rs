//! Shared helpers: free ports, peer processes, the example plant.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use millrace_sim::config::SimConfig;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Full path of `program`, or a test failure naming the Debian package.
pub fn require(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{program}` not found: install it with `apt-get install {package}`")
        })
}

/// The example plant, with every Modbus TCP server on a free port and the
/// MQTT broker at `mqtt_port`.
pub fn example_plant(mqtt_port: u16) -> SimConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sim.toml");
    let mut config = SimConfig::load(&path).unwrap();
    for server in &mut config.modbus_tcp {
        server.listen = "127.0.0.1:0".parse().unwrap();
    }
    config.mqtt.port = mqtt_port;
    config.mqtt.reconnect_delay = Duration::from_millis(200);
    config
}

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct Peer {
    pub child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mosquitto broker on a loopback port.
pub struct Mosquitto {
    pub port: u16,
    _dir: tempfile::TempDir,
    _peer: Peer,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let binary = require("mosquitto", "mosquitto");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto");
        let peer = Peer { child };
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        );
        Self {
            port,
            _dir: dir,
            _peer: peer,
        }
    }
}

/// Decoders written from the word-order definition, independent of the crate.
pub mod decode {
    /// Registers → big-endian bytes for `order` (ABCD, CDAB, BADC, DCBA).
    pub fn be_bytes(words: &[u16], order: &str) -> Vec<u8> {
        let wire: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        match order {
            "ABCD" => wire,
            "DCBA" => wire.into_iter().rev().collect(),
            "BADC" => wire.chunks(2).flat_map(|w| [w[1], w[0]]).collect(),
            "CDAB" => words.iter().rev().flat_map(|w| w.to_be_bytes()).collect(),
            other => panic!("unknown order {other}"),
        }
    }

    pub fn f32(words: &[u16], order: &str) -> f64 {
        f64::from(f32::from_be_bytes(
            be_bytes(words, order).try_into().unwrap(),
        ))
    }

    pub fn f64(words: &[u16], order: &str) -> f64 {
        f64::from_be_bytes(be_bytes(words, order).try_into().unwrap())
    }

    pub fn i32(words: &[u16], order: &str) -> i32 {
        i32::from_be_bytes(be_bytes(words, order).try_into().unwrap())
    }

    pub fn u64(words: &[u16], order: &str) -> u64 {
        u64::from_be_bytes(be_bytes(words, order).try_into().unwrap())
    }
}
