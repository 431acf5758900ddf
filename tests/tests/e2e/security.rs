//! Security: who may speak for an agent, and what the agent refuses to do.
//!
//! `security_*`: the real binaries. A batch whose records claim another
//! agent than the token's is refused and counted by `millrace-aggregator`,
//! and nothing of it reaches the log (read back with `tail`); the agent's
//! `check-config` refuses an uplink over plain `http://` beyond loopback unless
//! `allow-insecure` says so.

use millrace_protocol::{Batch, Envelope, Record, SeriesKey, Window};
use millrace_tests::{
    aggregator_tail, bin, free_port, metric_total, post_batch, start_aggregator, workspace_root,
    write_aggregator_config,
};
use std::process::Command;

const TOKEN_A: &str = "security-token-a-0123456789";
const TOKEN_B: &str = "security-token-b-0123456789";

fn window(agent: &str, seq: u64) -> Envelope {
    let start_ms = 1_700_000_000_000 + seq as i64 * 5_000;
    Envelope {
        seq,
        record: Record::Window(Window {
            agent: agent.into(),
            series: SeriesKey::new("press-1", "temperature"),
            start_ms,
            end_ms: start_ms + 5_000,
            count: 5,
            mean: 80.0,
            min: 79.0,
            max: 81.0,
            stddev: 0.5,
            first_event_ms: start_ms,
            last_event_ms: start_ms + 4_000,
            unit: "degC".into(),
            score: None,
        }),
    }
}

#[test]
fn security_a_record_claiming_another_agent_is_refused_counted_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("aggregator.toml");
    write_aggregator_config(
        &config,
        port,
        &dir.path().join("data"),
        &[("gw-a", TOKEN_A), ("gw-b", TOKEN_B)],
        "",
    );
    let mut aggregator = start_aggregator(&config, port, &dir.path().join("aggregator.log"));

    // gw-a's token; its second window says it is gw-b's.
    let spoofed = Batch::new("gw-a", vec![window("gw-a", 1), window("gw-b", 2)]);
    let (status, body) = post_batch(port, TOKEN_A, &spoofed);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("claims agent `gw-b`"), "{body}");
    assert_eq!(
        metric_total(port, "millrace_aggregator_spoofed_records_total"),
        1.0
    );
    assert!(aggregator_tail(&config, "millrace.windows").is_empty());

    // The honest record goes through; value and header name the token's agent.
    let honest = Batch::new("gw-a", vec![window("gw-a", 1)]);
    assert_eq!(post_batch(port, TOKEN_A, &honest).0, 200);
    let logged = aggregator_tail(&config, "millrace.windows");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["headers"]["agent"], "gw-a");
    assert_eq!(logged[0]["value"]["agent"], "gw-a", "{}", logged[0]);
    aggregator.terminate(std::time::Duration::from_secs(10));
}

#[test]
fn security_the_uplink_refuses_plain_http_beyond_loopback_without_allow_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(workspace_root().join("config/agent.toml")).unwrap();
    let loopback = "url = \"http://127.0.0.1:8480\"";
    assert!(
        example.contains(loopback),
        "config/agent.toml's uplink url moved"
    );
    let check = |text: String| {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Command::new(bin("millrace-agent"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let ok = check(example.clone());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let remote = example.replace(loopback, "url = \"http://192.0.2.10:8480\"");
    let refused = check(remote.clone());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "accepted plain http beyond loopback"
    );
    assert!(
        stderr.contains("uplink.url") && stderr.contains("allow-insecure"),
        "{stderr}"
    );

    let allowed = check(remote.replace("[uplink]\n", "[uplink]\nallow-insecure = true\n"));
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
}

#[test]
fn security_the_aggregator_refuses_an_open_dashboard_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aggregator.toml");
    let port = free_port();
    write_aggregator_config(
        &config,
        port,
        &dir.path().join("data"),
        &[("gw-a", TOKEN_A)],
        "",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:", "0.0.0.0:");
    std::fs::write(&config, &text).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin("millrace-aggregator"))
            .args(args)
            .arg(&config)
            .output()
            .unwrap()
    };
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} accepted an open dashboard on 0.0.0.0"
        );
        assert!(
            stderr.contains("dashboard") && stderr.contains("token"),
            "{stderr}"
        );
    }
    // With a read-only token it starts, and the dashboard wants it.
    std::fs::write(
        &config,
        format!("{text}\n[dashboard]\ntoken = \"dashboard-read-token-01\"\n"),
    )
    .unwrap();
    assert!(run(&["check-config"]).status.success());
    let mut aggregator = start_aggregator(&config, port, &dir.path().join("aggregator.log"));
    for path in ["/", "/api/v1/fleet", "/api/v1/events", "/metrics"] {
        assert_eq!(millrace_tests::http_status(port, path), Some(401), "{path}");
    }
    aggregator.terminate(std::time::Duration::from_secs(10));
}

/// A CA, the aggregator's certificate (127.0.0.1), and client certificates
/// whose DNS subject alternative name is the agent id, written as PEM files.
struct Pki {
    ca: std::path::PathBuf,
    server: (std::path::PathBuf, std::path::PathBuf),
}

fn write_pem(
    dir: &std::path::Path,
    name: &str,
    cert: &str,
    key: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

fn issue(
    names: &[&str],
    ip: bool,
    issuer: &(rcgen::Certificate, rcgen::KeyPair),
) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    if ip {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer.0, &issuer.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki(dir: &std::path::Path) -> (Pki, (rcgen::Certificate, rcgen::KeyPair)) {
    let authority = ca("millrace test agents CA");
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, authority.0.pem()).unwrap();
    let (cert, key) = issue(&["localhost"], true, &authority);
    let server = write_pem(dir, "aggregator", &cert, &key);
    (
        Pki {
            ca: ca_path,
            server,
        },
        authority,
    )
}

#[test]
fn security_mutual_tls_lands_windows_and_refuses_missing_unknown_or_other_identities() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, authority) = pki(dir.path());
    let (cert, key) = issue(&["gw-a"], false, &authority);
    let gw_a = write_pem(dir.path(), "gw-a", &cert, &key);
    let (cert, key) = issue(&["gw-b"], false, &authority);
    let gw_b = write_pem(dir.path(), "gw-b", &cert, &key);
    let stranger_ca = ca("someone else's CA");
    let (cert, key) = issue(&["gw-a"], false, &stranger_ca);
    let stranger = write_pem(dir.path(), "stranger", &cert, &key);

    // gw-a has no token at all: its certificate says who it is. gw-b has one.
    let port = free_port();
    let config = dir.path().join("aggregator.toml");
    write_aggregator_config(
        &config,
        port,
        &dir.path().join("data"),
        &[("gw-b", TOKEN_B)],
        "",
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[agents]]\nid = \"gw-a\"\n\n[tls]\ncert-file = \"{}\"\nkey-file = \"{}\"\nclient-ca-file = \"{}\"\n",
        pki.server.0.display(),
        pki.server.1.display(),
        pki.ca.display()
    ));
    std::fs::write(&config, text).unwrap();
    let mut aggregator = start_aggregator(&config, port, &dir.path().join("aggregator.log"));
    let url = format!("https://127.0.0.1:{port}/api/v1/ingest");

    let client = |identity: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
        let mut builder = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .timeout(std::time::Duration::from_secs(10));
        if let Some((c, k)) = identity {
            let mut pem = std::fs::read(c).unwrap();
            pem.extend(std::fs::read(k).unwrap());
            builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        builder.build().unwrap()
    };
    let post = |client: &reqwest::blocking::Client, token: Option<&str>, batch: &Batch| {
        let mut request = client
            .post(&url)
            .header("content-type", "application/x-millrace-batch")
            .body(batch.encode_binary());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let batch_a = Batch::new("gw-a", vec![window("gw-a", 1)]);

    // No certificate, an unknown CA's: the handshake does not complete.
    assert!(
        post(&client(None), None, &batch_a).is_err(),
        "no client certificate"
    );
    assert!(
        post(&client(Some(&stranger)), None, &batch_a).is_err(),
        "unknown CA"
    );
    // gw-b's certificate cannot speak for gw-a, nor with gw-b's token for gw-a's batch.
    let status = post(&client(Some(&gw_b)), None, &batch_a).unwrap().status();
    assert_eq!(status.as_u16(), 401);
    let status = post(&client(Some(&gw_a)), Some(TOKEN_B), &batch_a)
        .unwrap()
        .status();
    assert_eq!(
        status.as_u16(),
        401,
        "certificate of gw-a with gw-b's token"
    );
    assert!(aggregator_tail(&config, "millrace.windows").is_empty());

    // The real agent, over HTTPS with gw-a's certificate and no token.
    let mqtt_port = free_port();
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            r#"
[agent]
id = "gw-a"
data-dir = "{data}"

[broker]
enabled = true
listen = "127.0.0.1:{mqtt_port}"

[[broker.subscriptions]]
filter = "sensors/+/+"
qos = 1
format = "json"
device = "{{1}}"
sensor = "{{2}}"

[uplink]
url = "https://localhost:{port}"
ca-file = "{ca}"
client-cert-file = "{cert}"
client-key-file = "{key}"
backoff-min = "100ms"
backoff-max = "1s"
"#,
            data = dir.path().join("agent-data").display(),
            ca = pki.ca.display(),
            cert = gw_a.0.display(),
            key = gw_a.1.display(),
        ),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");
    let mut agent = start_agent(&agent_toml, &agent_log, mqtt_port);
    let mosquitto_pub = millrace_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // A minute back, at the start of a 5 s window: the five readings share it.
    let base_ms = (now_ms - 60_000).div_euclid(5_000) * 5_000 + 100;
    for i in 0..5 {
        let payload = format!("{{\"ts\": {}, \"value\": {i}}}", base_ms + i * 100);
        let ok = Command::new(&mosquitto_pub)
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
            .args(["-t", "sensors/press-1/temperature", "-m", &payload])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mosquitto_pub");
    }
    // SIGTERM flushes the open window into the outbox and sends it.
    assert_eq!(agent.terminate(std::time::Duration::from_secs(30)), Some(0));
    let logged = aggregator_tail(&config, "millrace.windows");
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert_eq!(logged.len(), 1, "{logged:?}\n{log}");
    assert_eq!(logged[0]["headers"]["agent"], "gw-a");
    assert_eq!(logged[0]["value"]["count"], 5);

    // The agents move to a new CA: SIGHUP applies it to the next connection,
    // without a restart; the old CA's certificates stop working.
    let next_ca = ca("millrace test agents CA, next");
    let next_ca_path = dir.path().join("ca-next.crt");
    std::fs::write(&next_ca_path, next_ca.0.pem()).unwrap();
    let (cert, key) = issue(&["gw-a"], false, &next_ca);
    let gw_a_next = write_pem(dir.path(), "gw-a-next", &cert, &key);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &pki.ca.display().to_string(),
        &next_ca_path.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let pid = aggregator.pid();
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let batch = Batch::new("gw-a", vec![window("gw-a", 2)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let moved = loop {
        let ok =
            post(&client(Some(&gw_a_next)), None, &batch).is_ok_and(|r| r.status().as_u16() == 200);
        if ok || std::time::Instant::now() > deadline {
            break ok;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        moved,
        "the new CA's certificate is not accepted after SIGHUP"
    );
    assert!(
        post(&client(Some(&gw_a)), None, &batch).is_err(),
        "old CA still accepted"
    );
    assert_eq!(aggregator.pid(), pid);
    aggregator.terminate(std::time::Duration::from_secs(10));
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
fn wait_for(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    f()
}

#[test]
fn security_device_ingest_needs_its_password_and_stays_in_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let hash = hashed("millrace-agent", "hash-password", "press-1-password");
    let (mqtt_port, http_port) = (free_port(), free_port());
    let config = |listen: &str| {
        format!(
            r#"
[agent]
id = "gw-secure"
data-dir = "{data}"

[broker]
enabled = true
listen = "{listen}:{mqtt_port}"

[[broker.users]]
name = "press-1"
password-hash = "{hash}"
publish = ["plant/press-1/#"]

[[broker.subscriptions]]
filter = "plant/+/+"
qos = 1
format = "number"

[http]
listen = "127.0.0.1:{http_port}"
"#,
            data = dir.path().join("data").display(),
        )
    };
    let agent_toml = dir.path().join("agent.toml");
    // Beyond loopback without users: refused by check-config.
    let open = config("0.0.0.0").replace("[[broker.users]]", "[[not-users]]");
    let open: String = open
        .lines()
        .filter(|l| {
            !l.starts_with("name =")
                && !l.starts_with("password-hash")
                && !l.starts_with("publish =")
        })
        .map(|l| if l == "[[not-users]]" { "" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&agent_toml, &open).unwrap();
    let out = Command::new(bin("millrace-agent"))
        .arg("check-config")
        .arg(&agent_toml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an open listener beyond loopback was accepted"
    );
    assert!(
        stderr.contains("broker.listen") && stderr.contains("allow-anonymous"),
        "{stderr}"
    );

    std::fs::write(&agent_toml, config("127.0.0.1")).unwrap();
    let agent_log = dir.path().join("agent.log");
    let mut agent = start_agent(&agent_toml, &agent_log, mqtt_port);
    // /metrics comes up after the device listener.
    millrace_tests::wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], http_port)),
        std::time::Duration::from_secs(30),
    );
    let mosquitto_pub = millrace_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let publish = |user: Option<(&str, &str)>, topic: &str| {
        let mut cmd = Command::new(&mosquitto_pub);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt_port.to_string(),
            "-q",
            "1",
            "-V",
            "mqttv311",
        ])
        .args(["-t", topic, "-m", "42.5"]);
        if let Some((u, p)) = user {
            cmd.args(["-u", u, "-P", p]);
        }
        cmd.output().unwrap().status.success()
    };
    let metric = |name: &str| metric_total(http_port, name);

    assert!(
        !publish(None, "plant/press-1/temp"),
        "anonymous publish accepted"
    );
    assert!(!publish(
        Some(("press-1", "wrong-password")),
        "plant/press-1/temp"
    ));
    assert!(!publish(
        Some(("nobody", "press-1-password")),
        "plant/press-1/temp"
    ));
    assert!(wait_for(std::time::Duration::from_secs(20), || {
        metric("millrace_mqtt_auth_failures_total") == 3.0
    }));
    // Its own topic lands; another device's topic is not read, and counted.
    assert!(publish(
        Some(("press-1", "press-1-password")),
        "plant/press-1/temp"
    ));
    assert!(publish(
        Some(("press-1", "press-1-password")),
        "plant/pump-2/temp"
    ));
    assert!(
        wait_for(std::time::Duration::from_secs(20), || {
            metric("millrace_mqtt_acl_denied_total") == 1.0
                && metric("millrace_readings_accepted_total") == 1.0
        }),
        "acl denied {} accepted {}",
        metric("millrace_mqtt_acl_denied_total"),
        metric("millrace_readings_accepted_total")
    );
    assert_eq!(agent.terminate(std::time::Duration::from_secs(30)), Some(0));
}

/// Starts `millrace-agent run` on `config` (stderr to `log`) and waits for
/// its ingest listener on `mqtt_port`.
fn start_agent(
    config: &std::path::Path,
    log: &std::path::Path,
    mqtt_port: u16,
) -> millrace_tests::ChildGuard {
    let agent = millrace_tests::ChildGuard::spawn(
        "millrace-agent",
        Command::new(bin("millrace-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap()),
    );
    millrace_tests::wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        std::time::Duration::from_secs(30),
    );
    agent
}

/// What `binary command` prints for `secret` given on its standard input.
fn hashed(binary: &str, command: &str, secret: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(bin(binary))
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{secret}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{binary} {command}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn hash_token(token: &str) -> String {
    hashed("millrace-aggregator", "hash-token", token)
}

#[test]
fn security_token_rotation_by_reload_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        "rotation-old-token-0123456789",
        "rotation-new-token-9876543210",
    );
    let (old_hash, new_hash) = (hash_token(old), hash_token(new));
    assert!(
        old_hash.starts_with("sha256:") && old_hash.len() == 71,
        "{old_hash}"
    );
    let port = free_port();
    let config = dir.path().join("aggregator.toml");
    let write = |hashes: &[&str]| {
        write_aggregator_config(&config, port, &dir.path().join("data"), &[], "");
        let mut text = std::fs::read_to_string(&config).unwrap();
        let list: Vec<String> = hashes.iter().map(|h| format!("\"{h}\"")).collect();
        text.push_str(&format!(
            "\n[[agents]]\nid = \"gw-a\"\ntoken-hashes = [{}]\n",
            list.join(", ")
        ));
        std::fs::write(&config, text).unwrap();
    };
    write(&[&old_hash]);
    assert!(
        !std::fs::read_to_string(&config).unwrap().contains(old),
        "the config holds no usable token"
    );
    let mut aggregator = start_aggregator(&config, port, &dir.path().join("aggregator.log"));
    let pid = aggregator.pid();
    let mut seq = 0;
    let mut status_of = |token: &str| {
        seq += 1;
        post_batch(port, token, &Batch::new("gw-a", vec![window("gw-a", seq)])).0
    };
    assert_eq!(status_of(old), 200);
    assert_eq!(status_of(new), 401);

    let reloads = |n: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if metric_total(port, "millrace_aggregator_config_reloads_total") >= n {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    };
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    // Both tokens during the move.
    write(&[&old_hash, &new_hash]);
    hup();
    assert!(reloads(1.0), "no reload counted");
    assert_eq!(status_of(old), 200);
    assert_eq!(status_of(new), 200);
    // The old one retired.
    write(&[&new_hash]);
    hup();
    assert!(reloads(2.0), "no second reload counted");
    assert_eq!(status_of(old), 401);
    assert_eq!(status_of(new), 200);
    assert_eq!(aggregator.pid(), pid, "no restart");
    assert!(aggregator.is_running());
    aggregator.terminate(std::time::Duration::from_secs(10));
}

#[test]
fn security_device_ingest_over_tls_with_a_password_and_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, _authority) = pki(dir.path());
    let hash = hashed("millrace-agent", "hash-password", "sensor-password");
    let (mqtt_port, http_port) = (free_port(), free_port());
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            r#"
[agent]
id = "gw-tls"
data-dir = "{data}"

[broker]
enabled = true
listen = "127.0.0.1:{mqtt_port}"

[broker.tls]
cert-file = "{cert}"
key-file = "{key}"

[[broker.users]]
name = "sensor"
password-hash = "{hash}"

[[broker.subscriptions]]
filter = "plant/+/+"
qos = 1
format = "number"

[http]
listen = "127.0.0.1:{http_port}"
"#,
            data = dir.path().join("data").display(),
            cert = pki.server.0.display(),
            key = pki.server.1.display(),
        ),
    )
    .unwrap();
    let mut agent = start_agent(&agent_toml, &dir.path().join("agent.log"), mqtt_port);
    let mosquitto_pub = millrace_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let publish = |tls: bool, password: &str| {
        let mut cmd = Command::new(&mosquitto_pub);
        cmd.args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
            .args(["-t", "plant/boiler-3/temp", "-m", "180.5"])
            .args(["-u", "sensor", "-P", password]);
        if tls {
            cmd.arg("--cafile").arg(&pki.ca);
        }
        cmd.output().unwrap().status.success()
    };
    assert!(!publish(false, "sensor-password"), "plaintext accepted");
    assert!(
        !publish(true, "not-the-password"),
        "wrong password accepted over TLS"
    );
    assert!(
        publish(true, "sensor-password"),
        "TLS with the password refused"
    );
    assert!(
        wait_for(std::time::Duration::from_secs(20), || {
            metric_total(http_port, "millrace_readings_accepted_total") == 1.0
                && metric_total(http_port, "millrace_mqtt_auth_failures_total") == 2.0
        }),
        "accepted {} auth failures {}",
        metric_total(http_port, "millrace_readings_accepted_total"),
        metric_total(http_port, "millrace_mqtt_auth_failures_total")
    );
    assert_eq!(agent.terminate(std::time::Duration::from_secs(30)), Some(0));
}

#[test]
fn security_kafka_with_sasl_scram_writes_and_a_wrong_password_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (user, password) = ("millrace", "kafka-scram-password-0123");
    let kafka =
        millrace_tests::KafkaPeer::start_with_scram(&dir.path().join("kafka"), user, password);
    let run = |name: &str, secret: &str| {
        let port = free_port();
        let config = dir.path().join(format!("{name}.toml"));
        write_aggregator_config(
            &config,
            port,
            &dir.path().join(name),
            &[("gw-a", TOKEN_A)],
            &format!(
                "[kafka]\nbrokers = \"127.0.0.1:{}\"\nmessage-timeout = \"5s\"\n\n[kafka.properties]\n\
                 \"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
                 \"sasl.username\" = \"{user}\"\n",
                kafka.port
            ),
        );
        let log = dir.path().join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        let guard = millrace_tests::ChildGuard::spawn(
            "millrace-aggregator",
            Command::new(bin("millrace-aggregator"))
                .args(["run", "--config"])
                .arg(&config)
                .env("MILLRACE_KAFKA_SASL_PASSWORD", secret)
                .stderr(stderr),
        );
        millrace_tests::wait_for_port(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            std::time::Duration::from_secs(30),
        );
        (guard, port, log)
    };

    let (mut good, port, log) = run("good", password);
    let status = post_batch(port, TOKEN_A, &Batch::new("gw-a", vec![window("gw-a", 1)])).0;
    assert_eq!(
        status,
        200,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    good.terminate(std::time::Duration::from_secs(10));
    let logged =
        millrace_tests::kafka_read_as(kafka.port, "millrace.windows", 3.0, Some((user, password)));
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["headers"]["agent"], "gw-a");
    let shown = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !shown.contains(password),
        "the SASL password reached the log"
    );

    let (mut bad, port, _) = run("bad", "not-the-password-000");
    let status = post_batch(port, TOKEN_A, &Batch::new("gw-a", vec![window("gw-a", 2)])).0;
    assert_eq!(
        status, 503,
        "a write with a refused SASL login must not be acknowledged"
    );
    bad.terminate(std::time::Duration::from_secs(10));
    assert_eq!(
        millrace_tests::kafka_read_as(kafka.port, "millrace.windows", 3.0, Some((user, password)))
            .len(),
        1
    );
    kafka.stop();
}

/// `BINARY check-config CONFIG` with `CREDENTIALS_DIRECTORY` set to `creds`
/// (unset without), and no uplink token in the environment.
fn check_config(
    binary: &str,
    config: &std::path::Path,
    creds: Option<&std::path::Path>,
) -> std::process::Output {
    let mut cmd = Command::new(bin(binary));
    cmd.arg("check-config")
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("MILLRACE_UPLINK_TOKEN");
    if let Some(d) = creds {
        cmd.env("CREDENTIALS_DIRECTORY", d);
    }
    cmd.output().unwrap()
}

/// Secrets handed over the way the shipped units do it (`LoadCredential=`,
/// `$CREDENTIALS_DIRECTORY`): the aggregator takes an agent's token from
/// `${CREDENTIALS_DIRECTORY}/…` and accepts it (another is refused); the
/// agent's `check-config` reads its uplink token there, names the missing
/// file, and refuses a config using the directory when it is not set.
#[test]
fn security_secrets_from_the_systemd_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let secret = |name: &str, value: &str| {
        let path = creds.join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    };
    secret("millrace_gw-cred", TOKEN_A);

    // The aggregator, started as the unit starts it.
    let port = free_port();
    let config = dir.path().join("aggregator.toml");
    write_aggregator_config(&config, port, &dir.path().join("data"), &[], "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[agents]]\nid = \"gw-cred\"\ntoken-file = \"${CREDENTIALS_DIRECTORY}/millrace_gw-cred\"\n",
    );
    std::fs::write(&config, &text).unwrap();
    let agg_check =
        |creds: Option<&std::path::Path>| check_config("millrace-aggregator", &config, creds);
    let unset = agg_check(None);
    let stderr = String::from_utf8_lossy(&unset.stderr);
    assert!(
        !unset.status.success(),
        "accepted without CREDENTIALS_DIRECTORY"
    );
    assert!(
        stderr.contains("CREDENTIALS_DIRECTORY") && stderr.contains("LoadCredential="),
        "{stderr}"
    );
    let set = agg_check(Some(&creds));
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );

    let log = std::fs::File::create(dir.path().join("aggregator.log")).unwrap();
    let mut aggregator = millrace_tests::ChildGuard::spawn(
        "millrace-aggregator",
        Command::new(bin("millrace-aggregator"))
            .args(["run", "--config"])
            .arg(&config)
            .env("CREDENTIALS_DIRECTORY", &creds)
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    millrace_tests::wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        std::time::Duration::from_secs(30),
    );
    let batch = Batch::new("gw-cred", vec![window("gw-cred", 1)]);
    assert_eq!(post_batch(port, TOKEN_B, &batch).0, 401, "another token");
    assert_eq!(
        post_batch(port, TOKEN_A, &batch).0,
        200,
        "the credential's token"
    );
    assert_eq!(
        metric_total(port, "millrace_aggregator_records_total"),
        1.0,
        "the window taken"
    );
    aggregator.terminate(std::time::Duration::from_secs(10));

    // The agent's uplink token, the same way.
    let example = std::fs::read_to_string(workspace_root().join("config/agent.toml")).unwrap();
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        example.replace(
            "[uplink]\n",
            "[uplink]\ntoken-file = \"${CREDENTIALS_DIRECTORY}/millrace_uplink-token\"\n",
        ),
    )
    .unwrap();
    let agent_check =
        |creds: Option<&std::path::Path>| check_config("millrace-agent", &agent_config, creds);
    let unset = agent_check(None);
    let stderr = String::from_utf8_lossy(&unset.stderr);
    assert!(
        !unset.status.success() && stderr.contains("LoadCredential="),
        "{stderr}"
    );
    let missing = agent_check(Some(&creds));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("millrace_uplink-token"),
        "{stderr}"
    );
    secret("millrace_uplink-token", TOKEN_A);
    let ok = agent_check(Some(&creds));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// Devices that log in with client certificates (`[broker.tls]
/// client-ca-file`): a certificate naming the `CONNECT`'s user name stands
/// for its password; no certificate, one from another CA, or one naming
/// another user is refused and counted; a certified device stays in its
/// topics.
#[test]
fn security_device_ingest_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, authority) = pki(dir.path());
    let (cert, key) = issue(&["sensor-a"], false, &authority);
    let sensor_a = write_pem(dir.path(), "sensor-a", &cert, &key);
    let rogue_ca = ca("not the plant's CA");
    let (cert, key) = issue(&["sensor-a"], false, &rogue_ca);
    let rogue = write_pem(dir.path(), "rogue", &cert, &key);
    let (mqtt_port, http_port) = (free_port(), free_port());
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            r#"
[agent]
id = "gw-mtls"
data-dir = "{data}"

[broker]
enabled = true
listen = "127.0.0.1:{mqtt_port}"

[broker.tls]
cert-file = "{cert}"
key-file = "{key}"
client-ca-file = "{ca}"

[[broker.users]]
name = "sensor-a"
publish = ["plant/sensor-a/#"]

[[broker.users]]
name = "sensor-b"
publish = ["plant/sensor-b/#"]

[[broker.subscriptions]]
filter = "plant/+/+"
qos = 1
format = "number"

[http]
listen = "127.0.0.1:{http_port}"
"#,
            data = dir.path().join("data").display(),
            cert = pki.server.0.display(),
            key = pki.server.1.display(),
            ca = pki.ca.display(),
        ),
    )
    .unwrap();
    let mut agent = start_agent(&agent_toml, &dir.path().join("agent.log"), mqtt_port);
    let mosquitto_pub = millrace_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let publish =
        |client: Option<&(std::path::PathBuf, std::path::PathBuf)>, user: &str, topic: &str| {
            let mut cmd = Command::new(&mosquitto_pub);
            cmd.args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
                .args(["-t", topic, "-m", "21.5", "-u", user])
                .arg("--cafile")
                .arg(&pki.ca);
            if let Some((cert, key)) = client {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
            cmd.output().unwrap().status.success()
        };
    assert!(
        publish(Some(&sensor_a), "sensor-a", "plant/sensor-a/temp"),
        "its own certificate refused"
    );
    assert!(
        !publish(None, "sensor-a", "plant/sensor-a/temp"),
        "no certificate accepted"
    );
    assert!(
        !publish(Some(&rogue), "sensor-a", "plant/sensor-a/temp"),
        "a certificate from another CA accepted"
    );
    assert!(
        !publish(Some(&sensor_a), "sensor-b", "plant/sensor-b/temp"),
        "sensor-a's certificate opened sensor-b"
    );
    // Acknowledged (MQTT 3.1.1 has no refusal) but outside its topics: not read.
    assert!(publish(Some(&sensor_a), "sensor-a", "plant/sensor-b/temp"));
    assert!(
        wait_for(std::time::Duration::from_secs(20), || {
            metric_total(http_port, "millrace_readings_accepted_total") == 1.0
                && metric_total(http_port, "millrace_mqtt_auth_failures_total") == 3.0
                && metric_total(http_port, "millrace_mqtt_acl_denied_total") == 1.0
        }),
        "accepted {} auth failures {} acl denied {}",
        metric_total(http_port, "millrace_readings_accepted_total"),
        metric_total(http_port, "millrace_mqtt_auth_failures_total"),
        metric_total(http_port, "millrace_mqtt_acl_denied_total")
    );
    assert_eq!(agent.terminate(std::time::Duration::from_secs(30)), Some(0));
}

/// The dashboard's credentials are re-read on SIGHUP like the agents'
/// tokens: the new token works, the old one is refused, and a browser
/// session opened with the old one ends — all without a restart.
#[test]
fn security_dashboard_credentials_reload_without_a_restart_and_end_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ("dashboard-token-old-0123", "dashboard-token-new-4567");
    let port = free_port();
    let config = dir.path().join("aggregator.toml");
    let write = |token: &str| {
        write_aggregator_config(
            &config,
            port,
            &dir.path().join("data"),
            &[("gw-a", TOKEN_A)],
            &format!("[dashboard]\ntoken = \"{token}\"\n"),
        );
    };
    write(old);
    let mut aggregator = start_aggregator(&config, port, &dir.path().join("aggregator.log"));
    let pid = aggregator.pid();
    let fleet = |headers: &[(&str, &str)]| {
        millrace_tests::http_request(port, "GET", "/api/v1/fleet", headers, b"").0
    };
    let bearer = |token: &str| format!("Bearer {token}");
    assert_eq!(fleet(&[("Authorization", &bearer(old))]), 200);
    assert_eq!(fleet(&[("Authorization", &bearer(new))]), 401);

    // A browser session, opened with the old token.
    let raw = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST /api/v1/session HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Authorization: {}\r\nContent-Length: 0\r\n\r\n",
            bearer(old)
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let cookie = raw
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie in {raw}"))
        .to_owned();
    assert!(cookie.starts_with("millrace_session="), "{cookie}");
    assert_eq!(fleet(&[("Cookie", &cookie)]), 200, "the session works");

    write(new);
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    assert!(
        wait_for(std::time::Duration::from_secs(20), || {
            metric_total(port, "millrace_aggregator_config_reloads_total") >= 1.0
                || fleet(&[("Authorization", &bearer(new))]) == 200
        }),
        "no reload"
    );
    assert_eq!(
        fleet(&[("Authorization", &bearer(new))]),
        200,
        "the new token"
    );
    assert_eq!(
        fleet(&[("Authorization", &bearer(old))]),
        401,
        "the old token"
    );
    assert_eq!(fleet(&[("Cookie", &cookie)]), 401, "the old session");
    assert_eq!(aggregator.pid(), pid, "no restart");
    assert!(aggregator.is_running());
    aggregator.terminate(std::time::Duration::from_secs(10));
}
