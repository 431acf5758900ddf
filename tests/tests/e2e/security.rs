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
