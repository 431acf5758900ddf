#![allow(clippy::unwrap_used)]
//! The dashboard's JSON API, event stream, access control and `/metrics`
//! against a real server on 127.0.0.1 with the embedded log: what the API
//! serves is what the log holds, and re-sent batches are not counted twice.

mod util;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use millrace_aggregator::log::local::TopicReader;
use millrace_protocol::{
    AgentStatus, Alert, AlertKind, AnomalyScore, Batch, Envelope, Record, SeriesKey, Severity,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use util::*;

const T0: i64 = 1_700_000_000_000;

fn get(addr: SocketAddr, path: &str) -> impl std::future::Future<Output = Reply> + '_ {
    let path = path.to_owned();
    async move { request(addr, Method::GET, &path, &[], Vec::new()).await }
}

async fn get_text(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let response = response_head(addr, path, headers).await;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn scored_window(sensor: &str, start_ms: i64, mean: f64, severity: Severity) -> Record {
    let Record::Window(mut w) = window("gw-1", sensor, start_ms, mean) else {
        unreachable!()
    };
    w.score = Some(AnomalyScore {
        z: (mean - 80.0) / 0.5,
        baseline_mean: 80.0,
        baseline_stddev: 0.5,
        p_value: 0.5,
        severity,
    });
    Record::Window(w)
}

fn alert(sensor: &str, time_ms: i64, value: f64) -> Record {
    Record::Alert(Alert {
        agent: "gw-1".into(),
        series: SeriesKey::new("press-1", sensor),
        kind: AlertKind::Spike,
        time_ms,
        window_start_ms: time_ms - time_ms % 5000,
        value,
        score: AnomalyScore {
            z: 40.0,
            baseline_mean: 80.0,
            baseline_stddev: 0.5,
            p_value: 1e-12,
            severity: Severity::Critical,
        },
        unit: "degC".into(),
    })
}

fn batch_of(floor: u64, records: Vec<(u64, Record)>) -> Batch {
    let mut batch = Batch::new(
        "gw-1",
        records
            .into_iter()
            .map(|(seq, record)| Envelope { seq, record })
            .collect(),
    );
    batch.outbox_floor = floor;
    batch
}

/// The JSON values of every record in `topic` of the embedded log.
fn logged_values(log_dir: &Path, topic: &str) -> Vec<Value> {
    let reader = TopicReader::open(log_dir, topic).unwrap();
    let mut cursor = reader.cursor(0).unwrap();
    let mut out = Vec::new();
    while let Some(record) = cursor.next_record().unwrap() {
        out.push(serde_json::from_slice(&record.value).unwrap());
    }
    out
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test]
async fn api_serves_what_the_log_holds_and_duplicates_count_once() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;

    // Windows out of order (a backlog window arrives after newer ones), an
    // alert and a dead letter; then the same batch again.
    let first = batch_of(
        0,
        vec![
            (
                1,
                scored_window("temp", T0 + 10_000, 80.2, Severity::Normal),
            ),
            (
                2,
                scored_window("temp", T0 + 15_000, 95.0, Severity::Critical),
            ),
            (3, alert("temp", T0 + 16_200, 130.0)),
            (4, dead_letter("plant/x/y")),
        ],
    );
    let backlog = batch_of(
        0,
        vec![(0, scored_window("temp", T0 + 5_000, 79.9, Severity::Normal))],
    );
    assert_eq!(
        post_batch(server.addr, TOKEN_1, &first).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post_batch(server.addr, TOKEN_1, &backlog).await.status,
        StatusCode::OK
    );
    // The resend carries the agent's status (a batch of duplicates still
    // reports how the agent is doing).
    let status = AgentStatus {
        agent_version: "0.1.0".into(),
        uptime_s: 120,
        outbox_records: 1_500,
        outbox_bytes: 150_000,
        outbox_max_bytes: 600_000,
        outbox_oldest_age_ms: Some(42_000),
        outbox_dropped_total: 7,
        uplink_retries_total: 9,
        uplink_failures: 3,
    };
    let again = post_batch(server.addr, TOKEN_1, &first.clone().with_status(status)).await;
    assert_eq!(again.json["duplicates"], 4);

    // Windows: exactly the log's, in event-time order.
    let log_dir = tmp.path().join("log");
    let mut logged = logged_values(&log_dir, "millrace.windows");
    assert_eq!(logged.len(), 3, "each window logged once");
    logged.sort_by_key(|w| w["start_ms"].as_i64());
    let api = get(
        server.addr,
        "/api/v1/series/windows?agent=gw-1&series=press-1/temp",
    )
    .await;
    assert_eq!(api.status, StatusCode::OK, "{}", api.json);
    let windows = api.json["windows"].as_array().unwrap();
    assert_eq!(windows.len(), logged.len());
    for (served, log) in windows.iter().zip(&logged) {
        for field in [
            "start_ms", "end_ms", "count", "mean", "min", "max", "stddev",
        ] {
            assert_eq!(served[field], log[field], "{field}: {served} vs {log}");
        }
        for field in ["z", "baseline_mean", "baseline_stddev", "severity"] {
            assert_eq!(served["score"][field], log["score"][field], "{field}");
        }
    }
    assert_eq!(api.json["unit"], "degC");
    assert_eq!(api.json["alerts"][0]["time_ms"], T0 + 16_200);
    let ranged = get(
        server.addr,
        &format!(
            "/api/v1/series/windows?agent=gw-1&series=press-1/temp&from_ms={}&to_ms={}",
            T0 + 10_000,
            T0 + 15_000
        ),
    )
    .await;
    assert_eq!(ranged.json["windows"].as_array().unwrap().len(), 1);

    // Alerts: the log's one alert, once.
    let logged_alerts = logged_values(&log_dir, "millrace.alerts");
    assert_eq!(logged_alerts.len(), 1);
    let alerts = get(server.addr, "/api/v1/alerts").await;
    let served = alerts.json["alerts"].as_array().unwrap();
    assert_eq!(served.len(), 1, "{}", alerts.json);
    for field in [
        "agent",
        "series",
        "kind",
        "time_ms",
        "window_start_ms",
        "value",
        "score",
        "unit",
    ] {
        assert_eq!(served[0][field], logged_alerts[0][field], "{field}");
    }
    assert_eq!(served[0]["seq"], 3);

    // Fleet: counts of records committed, not of records received.
    let fleet = get(server.addr, "/api/v1/fleet").await;
    let agents = fleet.json["agents"].as_array().unwrap();
    let ids: Vec<&str> = agents.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["gw-1", "gw-2"]);
    let gw1 = &agents[0];
    assert_eq!(gw1["online"], true);
    assert_eq!(gw1["records"], 5);
    assert_eq!(gw1["windows"], 3);
    assert_eq!(gw1["alerts"], 1);
    assert_eq!(gw1["dead_letters"], 1);
    assert_eq!(gw1["batches"], 3);
    assert_eq!(gw1["highest_seq"], 4);
    assert_eq!(gw1["outbox_floor"], 0);
    assert_eq!(gw1["seq_span_records"], 5);
    let status = &gw1["status"];
    assert_eq!(status["outbox_records"], 1_500, "{gw1}");
    assert_eq!(status["outbox_oldest_age_ms"], 42_000);
    assert_eq!(status["outbox_dropped_total"], 7);
    assert_eq!(status["uplink_retries_total"], 9);
    assert_eq!(status["uplink_failures"], 3);
    assert_eq!(status["outbox_fill"], 0.25);
    assert!(status["reported_ms_ago"].as_i64().unwrap() >= 0);
    assert_eq!(agents[1]["online"], false);
    assert_eq!(agents[1]["status"], Value::Null);
    let (_, text) = get_text(server.addr, "/metrics", &[]).await;
    assert_eq!(
        metric(
            &text,
            "millrace_aggregator_agent_outbox_records{agent=\"gw-1\"}"
        ),
        Some(1_500.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "millrace_aggregator_agent_outbox_oldest_age_seconds{agent=\"gw-1\"}"
        ),
        Some(42.0)
    );
    assert_eq!(
        metric(
            &text,
            "millrace_aggregator_agent_uplink_retries_total{agent=\"gw-1\"}"
        ),
        Some(9.0)
    );

    // Series search.
    let list = get(server.addr, "/api/v1/series?q=PRESS&alerting=critical").await;
    assert_eq!(list.json["total"], 1, "{}", list.json);
    assert_eq!(list.json["series"][0]["id"], "gw-1/press-1/temp");
    assert_eq!(list.json["series"][0]["last"]["mean"], 95.0);
    let none = get(server.addr, "/api/v1/series?q=nothing-like-this").await;
    assert_eq!(none.json["total"], 0);

    // Bad queries are 400 with a reason; unknown series 404.
    let bad = get(
        server.addr,
        "/api/v1/series/windows?agent=gw-1&series=no-slash",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.json["error"]
        .as_str()
        .unwrap()
        .contains("device/sensor"));
    let bad = get(server.addr, "/api/v1/alerts?severity=apocalyptic").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let missing = get(server.addr, "/api/v1/series/windows?agent=gw-2&series=a/b").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    server.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_counters_grow() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    let (status, before) = get_text(server.addr, "/metrics", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        before.contains("# TYPE millrace_aggregator_batches_total counter"),
        "{before}"
    );

    let b = batch_of(
        1,
        vec![
            (1, scored_window("temp", T0, 80.0, Severity::Normal)),
            (2, alert("temp", T0 + 1_000, 130.0)),
            (3, dead_letter("plant/x/y")),
        ],
    );
    post_batch(server.addr, TOKEN_1, &b).await;
    let b = b.with_status(AgentStatus {
        outbox_records: 12,
        uplink_retries_total: 2,
        ..AgentStatus::default()
    });
    post_batch(server.addr, TOKEN_1, &b).await;
    let (_, after) = get_text(server.addr, "/metrics", &[]).await;

    for (name, want) in [
        (
            "millrace_aggregator_batches_total{result=\"accepted\"}",
            2.0,
        ),
        ("millrace_aggregator_duplicate_records_total", 3.0),
        (
            "millrace_aggregator_records_total{agent=\"gw-1\",kind=\"window\"}",
            1.0,
        ),
        (
            "millrace_aggregator_records_total{agent=\"gw-1\",kind=\"alert\"}",
            1.0,
        ),
        ("millrace_aggregator_readings_total{agent=\"gw-1\"}", 10.0),
        (
            "millrace_aggregator_alerts_total{agent=\"gw-1\",severity=\"critical\",kind=\"spike\"}",
            1.0,
        ),
        (
            "millrace_aggregator_dead_letters_total{agent=\"gw-1\",reason=\"malformed\"}",
            1.0,
        ),
        ("millrace_aggregator_live_series", 1.0),
        ("millrace_aggregator_agent_up{agent=\"gw-1\"}", 1.0),
        ("millrace_aggregator_agent_up{agent=\"gw-2\"}", 0.0),
        ("millrace_aggregator_log_up{log=\"embedded\"}", 1.0),
        (
            "millrace_aggregator_log_write_seconds_count{log=\"embedded\"}",
            1.0,
        ),
        (
            "millrace_aggregator_event_to_commit_seconds_count{kind=\"window\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric(&after, name), Some(want), "{name} in:\n{after}");
    }
    assert_eq!(
        metric(
            &before,
            "millrace_aggregator_batches_total{result=\"accepted\"}"
        ),
        Some(0.0)
    );
    // The shipped Grafana dashboard asks only for names that exist.
    let grafana: Value =
        serde_json::from_str(include_str!("../../config/grafana-dashboard.json")).unwrap();
    let mut asked = 0;
    for panel in grafana["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("millrace_aggregator_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    after.contains(&name),
                    "Grafana asks for {name}, not exported"
                );
                asked += 1;
            }
        }
    }
    assert!(
        asked >= 10,
        "{asked} aggregator metrics in the Grafana dashboard"
    );
    // Every sample line is `name{labels} value`, names in snake case.
    for line in after
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("millrace_aggregator_"), "{line}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
    }
    server.stop().await;
}

#[tokio::test]
async fn token_or_basic_auth_guards_every_dashboard_route() {
    let tmp = tempfile::tempdir().unwrap();
    let tables = "[dashboard]\ntoken = \"dash-token-0123456789\"\nusername = \"ops\"\npassword = \"ops-password-0123\"\n";
    let config = parse_config(&config_text(tmp.path(), "", tables));
    let server = Server::start(&config).await;
    for path in [
        "/",
        "/assets/app.js",
        "/api/v1/fleet",
        "/api/v1/series",
        "/api/v1/alerts",
        "/metrics",
    ] {
        let (status, _) = get_text(server.addr, path, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _) = get_text(
            server.addr,
            path,
            &[("authorization", "Bearer wrong-token-000000")],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _) = get_text(
            server.addr,
            path,
            &[("authorization", "Bearer dash-token-0123456789")],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}");
        // base64("ops:ops-password-0123")
        let (status, _) = get_text(
            server.addr,
            path,
            &[("authorization", "Basic b3BzOm9wcy1wYXNzd29yZC0wMTIz")],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // A token in a URL opens the page only; the page trades it for a session.
    let (status, _) = get_text(server.addr, "/?access_token=dash-token-0123456789", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get_text(
        server.addr,
        "/api/v1/fleet?access_token=dash-token-0123456789",
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "token in an API URL");
    let session = request(
        server.addr,
        Method::POST,
        "/api/v1/session",
        &[("authorization", "Bearer dash-token-0123456789")],
        Vec::new(),
    )
    .await;
    assert_eq!(session.status, StatusCode::NO_CONTENT);
    let cookie = session.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("millrace_session=")
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    for path in ["/api/v1/fleet", "/api/v1/events", "/metrics"] {
        let cookie = format!("theme=dark; {pair}");
        let response = response_head(server.addr, path, &[("cookie", &cookie)]).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{path} with the session cookie"
        );
    }
    let (status, _) = get_text(
        server.addr,
        "/api/v1/fleet",
        &[("cookie", "millrace_session=forged0123")],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "unknown session");
    // Probes and the agents' ingest keep their own rules.
    assert_eq!(healthz(server.addr).await.status, StatusCode::OK);
    let b = batch_of(
        1,
        vec![(1, scored_window("temp", T0, 80.0, Severity::Normal))],
    );
    assert_eq!(
        post_batch(server.addr, TOKEN_1, &b).await.status,
        StatusCode::OK
    );
    server.stop().await;
}

#[tokio::test]
async fn page_and_assets_are_embedded() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;
    let (status, page) = get_text(server.addr, "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("assets/uPlot.iife.min.js") && page.contains("id=\"fleet\""));
    let (status, js) = get_text(server.addr, "/assets/uPlot.iife.min.js", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(js.contains("uPlot"));
    let (status, _) = get_text(server.addr, "/assets/../Cargo.toml", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn event_stream_pushes_alerts_and_the_chosen_series_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(tmp.path(), "", ""));
    let server = Server::start(&config).await;

    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::builder()
                .uri("/api/v1/events?agent=gw-1&series=press-1/temp")
                .header("host", server.addr.to_string())
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    let b = batch_of(
        1,
        vec![
            (1, scored_window("other", T0, 80.0, Severity::Normal)),
            (2, scored_window("temp", T0, 81.0, Severity::Normal)),
            (3, alert("temp", T0 + 1_000, 130.0)),
        ],
    );
    post_batch(server.addr, TOKEN_1, &b).await;

    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(text.contains("event: alert") && text.contains("event: window")) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("alert and window events within 10 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect();
    let windows: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| *n == "window")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(windows.len(), 1, "only the chosen series' windows: {text}");
    assert_eq!(windows[0]["sensor"], "temp");
    assert_eq!(windows[0]["mean"], 81.0);
    let alert = events.iter().find(|(n, _)| *n == "alert").unwrap();
    assert_eq!(alert.1["value"], 130.0);
    // Shutdown ends the stream instead of waiting for the grace period.
    server.stop().await;
}

/// `GET path` with `headers` on its own connection; the response head only
/// (an event stream never ends).
async fn response_head(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request = Request::builder()
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap()
}

async fn open_events(addr: SocketAddr) -> hyper::Response<hyper::body::Incoming> {
    response_head(addr, "/api/v1/events", &[]).await
}

#[tokio::test]
async fn event_streams_are_capped_and_every_answer_carries_a_content_security_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let config = parse_config(&config_text(
        tmp.path(),
        "",
        "[dashboard]\nmax-event-streams = 1\n",
    ));
    let server = Server::start(&config).await;
    let first = open_events(server.addr).await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = open_events(server.addr).await;
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.headers().contains_key("retry-after"));
    // The slot comes back when the first stream goes away.
    drop(first);
    let mut third = open_events(server.addr).await;
    for _ in 0..100 {
        if third.status() == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        third = open_events(server.addr).await;
    }
    assert_eq!(third.status(), StatusCode::OK);

    for path in ["/", "/api/v1/fleet", "/metrics", "/assets/app.js"] {
        let reply = get(server.addr, path).await;
        let csp = reply.headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(reply.headers["x-content-type-options"], "nosniff", "{path}");
    }
    server.stop().await;
}
