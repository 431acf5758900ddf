//! Shared helpers: an in-process aggregator on 127.0.0.1:0 and a minimal
//! HTTP/1 client (hyper), plus batch builders.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use millrace_aggregator::config::Config;
use millrace_aggregator::log::LogWriter;
use millrace_aggregator::Aggregator;
use millrace_protocol::{
    Batch, DeadLetter, DeadLetterReason, Envelope, Record, SeriesKey, Source, Window,
};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const TOKEN_1: &str = "gw-1-token-0123456789";
pub const TOKEN_2: &str = "gw-2-token-9876543210";

/// A config for agents gw-1 and gw-2 with `data_dir`, plus `extra` TOML
/// (top-level keys first, tables after).
pub fn config_text(data_dir: &Path, top: &str, tables: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
data-dir = "{}"
{top}

[[agents]]
id = "gw-1"
token = "{TOKEN_1}"

[[agents]]
id = "gw-2"
token = "{TOKEN_2}"

{tables}
"#,
        data_dir.display()
    )
}

pub fn parse_config(text: &str) -> Config {
    Config::parse(Path::new("test.toml"), text, |_| None).expect("test config is valid")
}

/// A running in-process aggregator.
pub struct Server {
    pub addr: SocketAddr,
    pub aggregator_stats: Arc<millrace_aggregator::ingest::Ingest>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(config: &Config) -> Self {
        Self::start_with(Aggregator::open(config).expect("aggregator opens")).await
    }

    pub async fn start_with_log(config: &Config, log: Arc<dyn LogWriter>) -> Self {
        Self::start_with(Aggregator::with_log(config, log).expect("aggregator opens")).await
    }

    async fn start_with(aggregator: Aggregator) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let ingest = aggregator.ingest().clone();
        let task = tokio::spawn(aggregator.serve(listener, shutdown.clone()));
        Self {
            addr,
            aggregator_stats: ingest,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: serde_json::Value,
}

pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Reply {
        status,
        headers,
        json,
    }
}

/// Posts a binary batch with `token`.
pub async fn post_batch(addr: SocketAddr, token: &str, batch: &Batch) -> Reply {
    let auth = format!("Bearer {token}");
    request(
        addr,
        Method::POST,
        "/api/v1/ingest",
        &[
            ("authorization", &auth),
            ("content-type", "application/x-millrace-batch"),
        ],
        batch.encode_binary(),
    )
    .await
}

pub async fn healthz(addr: SocketAddr) -> Reply {
    request(addr, Method::GET, "/healthz", &[], Vec::new()).await
}

pub fn window(agent: &str, sensor: &str, start_ms: i64, mean: f64) -> Record {
    Record::Window(Window {
        agent: agent.into(),
        series: SeriesKey::new("press-1", sensor),
        start_ms,
        end_ms: start_ms + 5_000,
        count: 10,
        mean,
        min: mean - 1.0,
        max: mean + 1.0,
        stddev: 0.5,
        first_event_ms: start_ms,
        last_event_ms: start_ms + 4_900,
        unit: "degC".into(),
        score: None,
    })
}

pub fn dead_letter(origin: &str) -> Record {
    Record::DeadLetter(DeadLetter::new(
        Source::Mqtt,
        origin,
        b"{oops".to_vec(),
        DeadLetterReason::Malformed,
        "expected value",
        1_700_000_000_000,
    ))
}

/// A batch of windows with the given seqs (ascending), floor at `floor`.
pub fn batch(agent: &str, seqs: &[u64], floor: u64) -> Batch {
    let records = seqs
        .iter()
        .map(|&seq| Envelope {
            seq,
            record: window(
                agent,
                "temp",
                1_700_000_000_000 + seq as i64 * 5_000,
                seq as f64,
            ),
        })
        .collect();
    let mut batch = Batch::new(agent, records);
    batch.outbox_floor = floor;
    batch
}
