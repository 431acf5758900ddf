//! OPC UA ingest against a server that is not ours: asyncua (FreeOpcUa's
//! Python implementation, `scripts/opcua-peer.py`), on a loopback port
//! chosen at run time, read by the agent's [`OpcUaSource`].

#![cfg(feature = "opcua")]
#![allow(clippy::unwrap_used)]

mod peers;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use millrace_agent::ingest::opcua::{OpcUaConfig, OpcUaSource};
use millrace_agent::ingest::IngestEvent;
use millrace_protocol::{DeadLetterReason, Quality, Reading};
use peers::ScriptPeer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `scripts/opcua-peer.py` on `port` with `extra` arguments.
fn peer(port: u16, extra: &[&str]) -> ScriptPeer {
    let port = port.to_string();
    let mut args = vec!["--port", port.as_str()];
    args.extend_from_slice(extra);
    ScriptPeer::start("opcua-peer.py", &args).0
}

struct Source {
    rx: mpsc::Receiver<IngestEvent>,
    stats: millrace_agent::ingest::opcua::OpcUaCounters,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Source {
    fn start(toml_text: &str, data_dir: &std::path::Path) -> Self {
        let mut cfg: OpcUaConfig = toml::from_str(toml_text).unwrap();
        cfg.load_secrets().unwrap();
        cfg.validate().unwrap();
        let source = OpcUaSource::new(cfg, data_dir);
        let stats = source.stats();
        let (tx, rx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Self {
            rx,
            stats,
            shutdown,
            task,
        }
    }

    fn stat(&self, pick: impl Fn(&millrace_agent::ingest::opcua::OpcUaStats) -> u64) -> u64 {
        self.stats.iter().map(|(_, s)| pick(s)).sum()
    }

    /// Events until `done` holds for the collected readings and dead letters.
    async fn collect(
        &mut self,
        what: &str,
        mut done: impl FnMut(&[Reading], &[millrace_protocol::DeadLetter]) -> bool,
    ) -> (Vec<Reading>, Vec<millrace_protocol::DeadLetter>) {
        let deadline = Instant::now() + WAIT;
        let (mut readings, mut dead) = (Vec::new(), Vec::new());
        while !done(&readings, &dead) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(IngestEvent::Reading(r, _))) => readings.push(r),
                Ok(Some(IngestEvent::DeadLetter(d))) => dead.push(d),
                Ok(Some(IngestEvent::Durable(ack))) => ack.complete(),
                Ok(None) => panic!("source ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; readings {readings:#?}, dead letters {dead:#?}"
                ),
            }
        }
        (readings, dead)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the source stops")
            .unwrap();
    }
}

fn at(readings: &[Reading], sensor: &str, time_ms: i64) -> Option<Reading> {
    readings
        .iter()
        .find(|r| &*r.series.sensor == sensor && r.time_ms == time_ms)
        .cloned()
}

fn server(port: u16, extra: &str) -> String {
    format!(
        r#"
[[servers]]
name = "line-1"
endpoint = "opc.tcp://127.0.0.1:{port}/millrace/"
publishing-interval = "100ms"
sampling-interval = "50ms"
reconnect-backoff-min = "200ms"
reconnect-backoff-max = "1s"
non-numeric = "dead-letter"
{extra}
[[servers.nodes]]
node-id = "ns=2;s=Line1.Temperature"
sensor = "temperature"
unit = "degC"
[[servers.nodes]]
node-id = "ns=2;s=Line1.Count"
sensor = "count"
[[servers.nodes]]
node-id = "ns=2;s=Line1.Running"
sensor = "running"
[[servers.nodes]]
browse-path = "/2:Line1/2:Pressure"
unit = "bar"
[[servers.nodes]]
node-id = "ns=2;s=Line1.Energy"
sensor = "energy"
[[servers.nodes]]
node-id = "ns=2;s=Line1.Mode"
sensor = "mode"
"#
    )
}

const T0: i64 = 1_796_360_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_subscription_values_arrive_with_source_timestamps_types_and_status() {
    init_logs();
    let port = free_port();
    let mut plc = peer(port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&server(port, ""), dir.path());
    // The subscription's first notification carries every current value.
    source
        .collect("the initial values", |r, _| r.len() >= 5)
        .await;
    plc.command(&format!("set Temperature 21.5 {}", T0 + 100));
    plc.command(&format!("set Count -7 {}", T0 + 200));
    plc.command(&format!("set Running false {}", T0 + 300));
    plc.command(&format!("set Pressure 2.25 {}", T0 + 400));
    plc.command(&format!("set Energy 1152921504606846977 {}", T0 + 500));
    plc.command(&format!("set Mode manual {}", T0 + 600));
    plc.command(&format!("uncertain Count 8 {}", T0 + 650));
    plc.command(&format!("bad Pressure {}", T0 + 700));
    let (readings, dead) = source
        .collect("every value set", |r, d| {
            at(r, "count", T0 + 650).is_some()
                && at(r, "energy", T0 + 500).is_some()
                && d.iter().any(|d| d.detail.contains("String"))
                && d.iter().any(|d| d.detail.contains("BadSensorFailure"))
        })
        .await;
    let t = at(&readings, "temperature", T0 + 100).unwrap();
    assert_eq!(
        (t.value, &*t.unit, t.quality),
        (21.5, "degC", Quality::Good)
    );
    assert_eq!(&*t.series.device, "line-1");
    assert_eq!(at(&readings, "count", T0 + 200).unwrap().value, -7.0);
    assert_eq!(at(&readings, "running", T0 + 300).unwrap().value, 0.0);
    let p = at(&readings, "Pressure", T0 + 400).unwrap();
    assert_eq!((p.value, &*p.unit, p.quality), (2.25, "bar", Quality::Good));
    let e = at(&readings, "energy", T0 + 500).unwrap();
    assert_eq!(
        (e.value, e.quality),
        (1152921504606846976.0, Quality::Uncertain)
    );
    let uncertain = at(&readings, "count", T0 + 650).unwrap();
    assert_eq!(
        (uncertain.value, uncertain.quality),
        (8.0, Quality::Uncertain)
    );
    // A Bad status has no value (the server nulls it): the device's error.
    let bad: Vec<_> = dead
        .iter()
        .filter(|d| d.detail.contains("BadSensorFailure"))
        .collect();
    assert_eq!(bad.len(), 1, "{dead:#?}");
    assert_eq!(bad[0].reason, DeadLetterReason::DeviceException);
    assert!(bad[0].origin.contains("Line1.Pressure"), "{bad:?}");
    assert!(bad[0].detail.contains(&(T0 + 700).to_string()), "{bad:?}");
    assert!(at(&readings, "Pressure", T0 + 700).is_none());
    let mode: Vec<_> = dead
        .iter()
        .filter(|d| d.origin.contains("Line1.Mode"))
        .collect();
    assert!(!mode.is_empty(), "{dead:#?}");
    assert!(mode.iter().all(|d| d.reason == DeadLetterReason::WrongType));
    assert!(source.stat(|s| s.sessions.load(Ordering::Relaxed)) >= 1);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_basic256sha256_sign_and_encrypt_with_a_trusted_certificate_and_a_password() {
    init_logs();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let server_pki = dir.path().join("server-pki");
    let mut plc = peer(
        port,
        &[
            "--pki",
            server_pki.to_str().unwrap(),
            "--user",
            "operator:s3cret",
        ],
    );
    std::fs::write(dir.path().join("password"), "s3cret\n").unwrap();
    let mut perms = std::fs::metadata(dir.path().join("password"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(dir.path().join("password"), perms).unwrap();
    let extra = format!(
        "security-policy = \"basic256sha256\"\nsecurity-mode = \"sign-and-encrypt\"\n\
         server-certificate = \"{}\"\nidentity = \"user-name\"\nuser = \"operator\"\n\
         password-file = \"{}\"\n",
        server_pki.join("server-cert.der").display(),
        dir.path().join("password").display()
    );
    let mut source = Source::start(&server(port, &extra), dir.path());
    source
        .collect("the initial values", |r, _| r.len() >= 5)
        .await;
    plc.command(&format!("set Temperature 80.5 {}", T0 + 1_000));
    let (readings, _) = source
        .collect("a value over the encrypted channel", |r, _| {
            at(r, "temperature", T0 + 1_000).is_some()
        })
        .await;
    assert_eq!(
        at(&readings, "temperature", T0 + 1_000).unwrap().value,
        80.5
    );
    // The client's own certificate was created in its PKI directory.
    assert!(dir.path().join("opcua/line-1/own/cert.der").exists());
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_a_user_certificate_identity_over_basic256sha256_sign() {
    init_logs();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (server_pki, user) = (dir.path().join("server-pki"), dir.path().join("user"));
    let mut plc = peer(
        port,
        &[
            "--pki",
            server_pki.to_str().unwrap(),
            "--user-cert",
            user.to_str().unwrap(),
        ],
    );
    let extra = format!(
        "security-policy = \"basic256sha256\"\nsecurity-mode = \"sign\"\n\
         server-certificate = \"{}\"\nidentity = \"certificate\"\n\
         user-certificate = \"{}\"\nuser-private-key = \"{}\"\n",
        server_pki.join("server-cert.der").display(),
        user.join("user-cert.der").display(),
        user.join("user-key.pem").display()
    );
    let mut source = Source::start(&server(port, &extra), dir.path());
    source
        .collect("the initial values", |r, _| r.len() >= 5)
        .await;
    plc.command(&format!("set Count 42 {}", T0 + 5_000));
    let (readings, _) = source
        .collect("a value for the certificate user", |r, _| {
            at(r, "count", T0 + 5_000).is_some()
        })
        .await;
    assert_eq!(at(&readings, "count", T0 + 5_000).unwrap().value, 42.0);
    source.stop().await;

    // Anonymous is refused by this server: no session, counted errors.
    let anonymous = format!(
        "security-policy = \"basic256sha256\"\nsecurity-mode = \"sign\"\nserver-certificate = \"{}\"\n",
        server_pki.join("server-cert.der").display()
    );
    let source = Source::start(&server(port, &anonymous), &dir.path().join("anon"));
    let deadline = Instant::now() + WAIT;
    while source.stat(|s| s.connection_errors.load(Ordering::Relaxed)) < 1 {
        assert!(Instant::now() < deadline, "anonymous was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(source.stat(|s| s.readings.load(Ordering::Relaxed)), 0);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_an_untrusted_server_certificate_is_refused() {
    init_logs();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let _plc = peer(port, &["--pki", dir.path().join("real").to_str().unwrap()]);
    // Trust a different server's certificate.
    let other_port = free_port();
    let other = peer(
        other_port,
        &["--pki", dir.path().join("other").to_str().unwrap()],
    );
    drop(other);
    let extra = format!(
        "security-policy = \"basic256sha256\"\nsecurity-mode = \"sign-and-encrypt\"\n\
         server-certificate = \"{}\"\n",
        dir.path().join("other/server-cert.der").display()
    );
    let mut source = Source::start(&server(port, &extra), dir.path());
    let deadline = Instant::now() + WAIT;
    while source.stat(|s| s.connection_errors.load(Ordering::Relaxed)) < 2 {
        assert!(Instant::now() < deadline, "no refused connection counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(source.stat(|s| s.readings.load(Ordering::Relaxed)), 0);
    assert!(
        source.rx.try_recv().is_err(),
        "a value from an untrusted server"
    );
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_server_restart_resubscribes_and_keeps_producing() {
    init_logs();
    let port = free_port();
    let mut plc = peer(port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&server(port, ""), dir.path());
    source
        .collect("the initial values", |r, _| r.len() >= 5)
        .await;
    plc.command(&format!("set Temperature 30 {}", T0 + 2_000));
    source
        .collect("a value before the restart", |r, _| {
            at(r, "temperature", T0 + 2_000).is_some()
        })
        .await;
    drop(plc);
    let deadline = Instant::now() + WAIT;
    while source.stats[0].1.is_connected() {
        assert!(
            Instant::now() < deadline,
            "the lost connection was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut plc = peer(port, &[]);
    let deadline = Instant::now() + WAIT;
    while !source.stats[0].1.is_connected() {
        assert!(Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A value set after the restart arrives (set again until it does: the
    // resubscription may come after the first write).
    let after = |r: &Reading| {
        &*r.series.sensor == "temperature" && (T0 + 3_001..T0 + 3_100).contains(&r.time_ms)
    };
    let mut n = 0;
    let r = loop {
        n += 1;
        plc.command(&format!("set Temperature 31 {}", T0 + 3_000 + n));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut found = None;
        while found.is_none() && Instant::now() < deadline {
            if let Ok(Some(IngestEvent::Reading(r, _))) =
                tokio::time::timeout(Duration::from_millis(200), source.rx.recv()).await
            {
                found = after(&r).then_some(r);
            }
        }
        if let Some(r) = found {
            break r;
        }
        assert!(n < 15, "no value after the server restart");
    };
    assert_eq!(r.value, 31.0);
    assert!(source.stat(|s| s.sessions.load(Ordering::Relaxed)) >= 2);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_poll_mode_reports_each_new_value_once() {
    init_logs();
    let port = free_port();
    let mut plc = peer(port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let text = server(port, "mode = \"poll\"\npoll-interval = \"100ms\"\n");
    let mut source = Source::start(&text, dir.path());
    source.collect("the first read", |r, _| r.len() >= 5).await;
    plc.command(&format!("set Temperature 40 {}", T0 + 4_000));
    let (readings, _) = source
        .collect("the new value", |r, _| {
            at(r, "temperature", T0 + 4_000).is_some()
        })
        .await;
    assert_eq!(
        at(&readings, "temperature", T0 + 4_000).unwrap().value,
        40.0
    );
    // Five more polls of the six nodes pass: the same value is not reported again.
    let read = source.stat(|s| s.values.load(Ordering::Relaxed));
    let deadline = Instant::now() + WAIT;
    while source.stat(|s| s.values.load(Ordering::Relaxed)) < read + 30 {
        assert!(Instant::now() < deadline, "no more polls");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = 0;
    while let Ok(event) = source.rx.try_recv() {
        if let IngestEvent::Reading(r, _) = event {
            if r.time_ms == T0 + 4_000 {
                again += 1;
            }
        }
    }
    assert_eq!(again, 0, "a polled value reported twice");
    source.stop().await;
}
