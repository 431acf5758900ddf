//! The agent's own observability: Prometheus `/metrics` and `/healthz` over
//! HTTP, fed from the counters every part already keeps.
//!
//! Metric names follow Prometheus conventions (`millrace_` prefix, units in
//! names, `_total` for counters). Hot paths keep plain counters in their own
//! stats structs; this module copies them into the `metrics` registry once a
//! second (and on every scrape), so a reading costs no registry lookup. Events
//! that are rare (uplink batches, journal commits, append errors) are recorded
//! where they happen with the `metrics` macros.
//!
//! What it is not: no push gateway and no authentication. Keep `listen` on
//! loopback or a management network.

use crate::ingest::modbus::ModbusStats;
use crate::ingest::mqtt::MqttStats;
use crate::store::{Lane, Store};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use millrace_protocol::DeadLetterReason;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `[http]`: the agent's metrics and health endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpConfig {
    /// Address of `/metrics` and `/healthz` (loopback by default).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9481))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

/// The sources' and the store's counters, read by the exporter.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub mqtt: Vec<(&'static str, Arc<MqttStats>)>,
    pub modbus: Option<Arc<ModbusStats>>,
    pub opcua: crate::ingest::opcua::OpcUaCounters,
    pub store: Option<Arc<Store>>,
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    sources: Sources,
    heartbeat: crate::service::Heartbeat,
}

/// Installs the process-wide Prometheus recorder. Call once, before any
/// metric is recorded; a second call (tests) returns `None`.
pub fn install_recorder() -> Option<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .ok()?
        .install_recorder()
        .ok()
}

/// Copies the sources' and the store's counters into the registry.
pub fn export(sources: &Sources) {
    for (source, stats) in &sources.mqtt {
        let source = *source;
        metrics::counter!("millrace_readings_in_total", "source" => source)
            .absolute(stats.readings.load(Ordering::Relaxed));
        metrics::counter!("millrace_mqtt_messages_total", "source" => source)
            .absolute(stats.messages.load(Ordering::Relaxed));
        metrics::counter!("millrace_mqtt_reconnects_total", "source" => source)
            .absolute(stats.reconnects.load(Ordering::Relaxed));
        metrics::counter!("millrace_mqtt_acks_total", "source" => source)
            .absolute(stats.acks.load(Ordering::Relaxed));
        metrics::gauge!("millrace_mqtt_connected", "source" => source)
            .set(if stats.is_connected() { 1.0 } else { 0.0 });
        metrics::counter!("millrace_mqtt_acks_withheld_total", "source" => source)
            .absolute(stats.acks_withheld.load(Ordering::Relaxed));
        metrics::counter!("millrace_mqtt_connection_errors_total", "source" => source)
            .absolute(stats.connection_errors.load(Ordering::Relaxed));
        if source == "embedded-broker" {
            metrics::gauge!("millrace_mqtt_clients", "source" => source)
                .set(stats.clients.load(Ordering::Relaxed) as f64);
            metrics::counter!("millrace_mqtt_auth_failures_total", "source" => source)
                .absolute(stats.auth_failures.load(Ordering::Relaxed));
            metrics::counter!("millrace_mqtt_acl_denied_total", "source" => source)
                .absolute(stats.acl_denied.load(Ordering::Relaxed));
            metrics::counter!("millrace_mqtt_protocol_errors_total", "source" => source)
                .absolute(stats.protocol_errors.load(Ordering::Relaxed));
        }
        for reason in DeadLetterReason::ALL {
            let n = stats.dead_letters(reason);
            if n > 0 {
                metrics::counter!("millrace_decode_errors_total", "source" => source, "reason" => reason.as_str())
                    .absolute(n);
            }
        }
    }
    {
        use crate::ingest::decode::sparkplug::STATS as SPB;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("millrace_sparkplug_births_total").absolute(get(&SPB.births));
        metrics::counter!("millrace_sparkplug_deaths_total").absolute(get(&SPB.deaths));
        metrics::counter!("millrace_sparkplug_stale_deaths_total").absolute(get(&SPB.stale_deaths));
        metrics::counter!("millrace_sparkplug_seq_gaps_total").absolute(get(&SPB.seq_gaps));
        metrics::counter!("millrace_sparkplug_data_before_birth_total")
            .absolute(get(&SPB.data_before_birth));
        metrics::counter!("millrace_sparkplug_rebirth_requests_total")
            .absolute(get(&SPB.rebirth_requests));
        metrics::counter!("millrace_sparkplug_rebirths_not_sent_total")
            .absolute(get(&SPB.rebirths_not_sent));
        metrics::counter!("millrace_sparkplug_skipped_metrics_total")
            .absolute(get(&SPB.skipped_metrics));
    }
    if let Some(modbus) = &sources.modbus {
        let mut readings = 0;
        for d in modbus.devices() {
            readings += d.readings();
            let device = d.name().to_string();
            metrics::counter!("millrace_modbus_polls_total", "device" => device.clone())
                .absolute(d.polls());
            metrics::counter!("millrace_modbus_exceptions_total", "device" => device.clone())
                .absolute(d.exceptions_total());
            metrics::counter!("millrace_modbus_timeouts_total", "device" => device.clone())
                .absolute(d.timeouts());
            metrics::counter!("millrace_modbus_transport_errors_total", "device" => device.clone())
                .absolute(d.transport_errors());
            metrics::counter!("millrace_modbus_inexact_readings_total", "device" => device.clone())
                .absolute(d.inexact_readings());
            metrics::gauge!("millrace_modbus_connected", "device" => device)
                .set(if d.connected() { 1.0 } else { 0.0 });
        }
        metrics::counter!("millrace_readings_in_total", "source" => "modbus").absolute(readings);
    }
    for (server, stats) in &sources.opcua {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let server = server.clone();
        metrics::gauge!("millrace_opcua_connected", "server" => server.clone())
            .set(if stats.is_connected() { 1.0 } else { 0.0 });
        for (name, value) in [
            ("millrace_opcua_sessions_total", get(&stats.sessions)),
            (
                "millrace_opcua_connection_errors_total",
                get(&stats.connection_errors),
            ),
            ("millrace_opcua_values_total", get(&stats.values)),
            ("millrace_opcua_readings_total", get(&stats.readings)),
            (
                "millrace_opcua_non_numeric_values_total",
                get(&stats.non_numeric),
            ),
            (
                "millrace_opcua_bad_without_value_total",
                get(&stats.bad_without_value),
            ),
            (
                "millrace_opcua_dead_letters_total",
                get(&stats.dead_letters),
            ),
            ("millrace_opcua_dropped_values_total", get(&stats.dropped)),
            ("millrace_opcua_node_errors_total", get(&stats.node_errors)),
        ] {
            metrics::counter!(name, "server" => server.clone()).absolute(value);
        }
    }
    if let Some(store) = &sources.store {
        if let Ok(s) = store.outbox().stats() {
            for lane in Lane::ALL {
                let l = s.lane(lane);
                let name = lane.as_str();
                metrics::gauge!("millrace_outbox_records", "lane" => name).set(l.records as f64);
                metrics::gauge!("millrace_outbox_bytes", "lane" => name).set(l.bytes as f64);
                metrics::gauge!("millrace_outbox_oldest_age_seconds", "lane" => name)
                    .set(l.oldest_age.map_or(0.0, |d| d.as_secs_f64()));
                metrics::counter!("millrace_outbox_dropped_total", "lane" => name, "policy" => "drop-oldest")
                    .absolute(l.dropped_full);
                metrics::counter!("millrace_outbox_dropped_total", "lane" => name, "policy" => "max-age")
                    .absolute(l.expired);
            }
            metrics::gauge!("millrace_outbox_max_bytes").set(s.max_bytes as f64);
        }
        let j = store.journal().stats();
        metrics::gauge!("millrace_journal_entries").set(j.entries as f64);
        metrics::counter!("millrace_journal_commits_total").absolute(j.commits);
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown`, refreshing the source
/// counters once a second.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    sources: Sources,
    heartbeat: crate::service::Heartbeat,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        handle,
        sources: sources.clone(),
        heartbeat,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(state);
    let refresher = {
        let token = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => export(&sources),
                }
            }
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    let (result, ()) = tokio::join!(server, refresher);
    result
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    let sources = state.sources.clone();
    // Store stats read fjall: off the async threads.
    let _ = tokio::task::spawn_blocking(move || export(&sources)).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.handle.render(),
    )
}

/// 200 while the pipeline turns (heartbeat fresher than 5 s), else 503.
async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
    let age = state.heartbeat.age();
    if age <= Duration::from_secs(5) {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("pipeline stalled for {} ms\n", age.as_millis()),
        )
    }
}
