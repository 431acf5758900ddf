//! The dashboard's routes: JSON reads under `/api/v1/`, the event stream,
//! `/metrics`, the page. See the table in [the module docs](super).

use super::auth;
use super::live::{AlertEntry, SeriesFilter, SeriesId};
use super::{assets, now_ms, Dashboard, LiveEvent};
use crate::ingest::Ingest;
use crate::log::Health;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use millrace_protocol::{SeriesKey, Severity, UnixMs};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

pub const FLEET_PATH: &str = "/api/v1/fleet";
pub const SERIES_PATH: &str = "/api/v1/series";
pub const SERIES_WINDOWS_PATH: &str = "/api/v1/series/windows";
pub const ALERTS_PATH: &str = "/api/v1/alerts";
pub const EVENTS_PATH: &str = "/api/v1/events";
pub const METRICS_PATH: &str = "/metrics";
pub const SESSION_PATH: &str = "/api/v1/session";

/// Largest page of the series list and the alert feed.
pub const MAX_PAGE: usize = 500;
/// How often an event stream carries the fleet table.
pub const FLEET_EVENT_INTERVAL: Duration = Duration::from_secs(2);
/// Largest chart range.
const MAX_RANGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App {
    pub dashboard: Arc<Dashboard>,
    pub ingest: Arc<Ingest>,
    /// Ends the event streams on shutdown, so graceful shutdown is not held
    /// up by browsers that keep them open.
    pub shutdown: CancellationToken,
}

/// The dashboard's routes, behind its access control.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{name}", get(assets::asset))
        .route(FLEET_PATH, get(fleet))
        .route(SERIES_PATH, get(series_list))
        .route(SERIES_WINDOWS_PATH, get(series_windows))
        .route(ALERTS_PATH, get(alerts))
        .route(EVENTS_PATH, get(events))
        .route(METRICS_PATH, get(metrics))
        .route(SESSION_PATH, axum::routing::post(session))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_auth))
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

/// What a browser may do with the dashboard's answers: load scripts, styles
/// and data from this origin only, never frame it, never sniff types.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn require_auth(State(app): State<App>, request: Request, next: Next) -> Response {
    let auth = app.dashboard.auth();
    match auth::check(
        &auth,
        app.dashboard.sessions(),
        request.headers(),
        request.uri(),
    ) {
        Ok(()) => next.run(request).await,
        Err(error) => {
            tracing::info!(path = %request.uri().path(), %error, "dashboard request refused");
            auth::refuse(&auth, error)
        }
    }
}

/// Trades the credentials of this request (it passed the access control)
/// for a session cookie: `HttpOnly`, `SameSite=Strict`, `Secure` behind TLS.
async fn session(State(app): State<App>, request: Request) -> Response {
    let id = match app.dashboard.sessions().create() {
        Ok(id) => id,
        Err(error) => {
            tracing::error!(%error, "cannot create a dashboard session");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    let secure = if request.uri().scheme_str() == Some("https")
        || request
            .extensions()
            .get::<crate::tls::PeerCertificate>()
            .is_some()
    {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        auth::SESSION_COOKIE,
        auth::SESSION_TTL.as_secs()
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// A `400` with a reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadQuery(String);

impl IntoResponse for BadQuery {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": self.0 })),
        )
            .into_response()
    }
}

#[derive(Debug, Serialize)]
struct FleetBody {
    now_ms: UnixMs,
    offline_after_ms: u64,
    agents: Vec<super::live::AgentView>,
    totals: super::live::LiveTotals,
}

fn fleet_body(dashboard: &Dashboard) -> FleetBody {
    let now = now_ms();
    let live = dashboard.live();
    FleetBody {
        now_ms: now,
        offline_after_ms: dashboard.config().offline_after.as_millis() as u64,
        agents: live.fleet(now),
        totals: live.totals(),
    }
}

async fn fleet(State(app): State<App>) -> Json<FleetBody> {
    Json(fleet_body(&app.dashboard))
}

#[derive(Debug, Deserialize)]
struct SeriesQuery {
    q: Option<String>,
    agent: Option<String>,
    /// `warning` or `critical`: only series with such an alert retained.
    alerting: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct SeriesListBody {
    total: usize,
    offset: usize,
    limit: usize,
    series: Vec<super::live::SeriesSummary>,
}

fn parse_severity(text: Option<&str>) -> Result<Option<Severity>, BadQuery> {
    match text.map(str::trim) {
        None | Some("") => Ok(None),
        Some("normal") => Ok(Some(Severity::Normal)),
        Some("warning") => Ok(Some(Severity::Warning)),
        Some("critical") => Ok(Some(Severity::Critical)),
        Some(other) => Err(BadQuery(format!(
            "unknown severity `{other}`: use normal, warning or critical"
        ))),
    }
}

fn page_limit(limit: Option<usize>, default: usize) -> usize {
    limit.unwrap_or(default).clamp(1, MAX_PAGE)
}

async fn series_list(
    State(app): State<App>,
    Query(query): Query<SeriesQuery>,
) -> Result<Json<SeriesListBody>, BadQuery> {
    let limit = page_limit(query.limit, 50);
    let filter = SeriesFilter {
        query: query.q,
        agent: query.agent.filter(|a| !a.is_empty()),
        min_alert_severity: parse_severity(query.alerting.as_deref())?,
        offset: query.offset,
        limit,
    };
    let (total, series) = app.dashboard.live().series_list(&filter);
    Ok(Json(SeriesListBody {
        total,
        offset: filter.offset,
        limit,
        series,
    }))
}

#[derive(Debug, Deserialize)]
struct WindowsQuery {
    agent: String,
    /// `device/sensor`.
    series: String,
    from_ms: Option<UnixMs>,
    to_ms: Option<UnixMs>,
    /// Instead of `from_ms`: this far back from now, e.g. `15m`, `1h`.
    range: Option<String>,
}

fn series_key(text: &str) -> Result<SeriesKey, BadQuery> {
    text.split_once('/')
        .filter(|(d, s)| !d.is_empty() && !s.is_empty())
        .map(|(d, s)| SeriesKey::new(d, s))
        .ok_or_else(|| BadQuery(format!("series `{text}` is not `device/sensor`")))
}

async fn series_windows(
    State(app): State<App>,
    Query(query): Query<WindowsQuery>,
) -> Result<Response, BadQuery> {
    let id = SeriesId {
        agent: query.agent,
        series: series_key(&query.series)?,
    };
    let to_ms = query.to_ms.unwrap_or(UnixMs::MAX);
    let from_ms = match (query.from_ms, query.range.as_deref()) {
        (Some(from), _) => from,
        (None, Some(range)) => {
            let range = humantime_serde::re::humantime::parse_duration(range)
                .map_err(|e| BadQuery(format!("range `{range}`: {e}")))?;
            if range > MAX_RANGE {
                return Err(BadQuery("range is longer than 7 days".into()));
            }
            now_ms() - range.as_millis() as UnixMs
        }
        (None, None) => UnixMs::MIN,
    };
    let found = app.dashboard.live().series_windows(&id, from_ms, to_ms);
    Ok(match found {
        Some(body) => Json(body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no live series {}/{}", id.agent, id.series)
            })),
        )
            .into_response(),
    })
}

#[derive(Debug, Deserialize)]
struct AlertsQuery {
    limit: Option<usize>,
    agent: Option<String>,
    /// `device/sensor`.
    series: Option<String>,
    /// At least this severity.
    severity: Option<String>,
    /// Only alerts older than this id (the next page).
    before_id: Option<u64>,
}

#[derive(Debug, Serialize)]
struct AlertsBody {
    alerts: Vec<AlertEntry>,
}

async fn alerts(
    State(app): State<App>,
    Query(query): Query<AlertsQuery>,
) -> Result<Json<AlertsBody>, BadQuery> {
    let limit = page_limit(query.limit, 100);
    let min = parse_severity(query.severity.as_deref())?;
    let series = query.series.as_deref().map(series_key).transpose()?;
    let agent = query.agent.filter(|a| !a.is_empty());
    let filter = |a: &AlertEntry| {
        agent.as_ref().is_none_or(|x| *a.alert.agent == **x)
            && series.as_ref().is_none_or(|s| &a.alert.series == s)
            && min.is_none_or(|m| a.alert.score.severity >= m)
            && query.before_id.is_none_or(|b| a.id < b)
    };
    let alerts = app.dashboard.live().alerts(&filter, limit);
    Ok(Json(AlertsBody { alerts }))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// With `series`: also send this series' windows.
    agent: Option<String>,
    series: Option<String>,
}

#[derive(Serialize)]
struct WindowEvent<'a> {
    agent: &'a str,
    device: &'a str,
    sensor: &'a str,
    #[serde(flatten)]
    point: &'a super::live::WindowPoint,
}

/// Counts an open stream; closes the count when the stream is dropped.
struct StreamGuard(Arc<Dashboard>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.stream_closed();
    }
}

struct StreamState {
    _guard: StreamGuard,
    app: App,
    rx: tokio::sync::broadcast::Receiver<Arc<LiveEvent>>,
    fleet_tick: tokio::time::Interval,
    chart: Option<SeriesId>,
}

async fn events(
    State(app): State<App>,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, Response> {
    let chart = match (query.agent, query.series) {
        (Some(agent), Some(series)) if !agent.is_empty() && !series.is_empty() => Some(SeriesId {
            agent,
            series: series_key(&series).map_err(IntoResponse::into_response)?,
        }),
        _ => None,
    };
    if !app.dashboard.stream_opened() {
        tracing::warn!(
            max = app.dashboard.config().max_event_streams,
            "event stream refused: max-event-streams are open"
        );
        let mut busy = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": "too many live event streams open" })),
        )
            .into_response();
        busy.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return Err(busy);
    }
    let mut fleet_tick = tokio::time::interval(FLEET_EVENT_INTERVAL);
    fleet_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        _guard: StreamGuard(app.dashboard.clone()),
        rx: app.dashboard.subscribe(),
        app,
        fleet_tick,
        chart,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        let event = next_event(&mut s).await?;
        Some((Ok(event), s))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The next event for one stream; `None` ends it (shutdown).
async fn next_event(s: &mut StreamState) -> Option<Event> {
    loop {
        tokio::select! {
            biased;
            () = s.app.shutdown.cancelled() => return None,
            received = s.rx.recv() => match received {
                Ok(event) => match event.as_ref() {
                    LiveEvent::Alert(alert) => return json_event("alert", alert),
                    LiveEvent::Window { id, point } => {
                        if s.chart.as_ref() == Some(id.as_ref()) {
                            let body = WindowEvent {
                                agent: &id.agent,
                                device: &id.series.device,
                                sensor: &id.series.sensor,
                                point,
                            };
                            return json_event("window", &body);
                        }
                    }
                },
                Err(RecvError::Lagged(missed)) => {
                    s.app.dashboard.metrics().sse_lagged(missed);
                    tracing::debug!(missed, "event stream fell behind; asking the page to reload");
                    return json_event("resync", &serde_json::json!({ "missed": missed }));
                }
                Err(RecvError::Closed) => return None,
            },
            _ = s.fleet_tick.tick() => return json_event("fleet", &fleet_body(&s.app.dashboard)),
        }
    }
}

fn json_event(name: &str, body: &impl Serialize) -> Option<Event> {
    match Event::default().event(name).json_data(body) {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::warn!(%error, event = name, "event not serialisable; stream closed");
            None
        }
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let log = app.ingest.log();
    let log_up = matches!(log.health().await, Health::Healthy);
    let text = {
        let now = now_ms();
        let (fleet, totals) = {
            let live = app.dashboard.live();
            (live.fleet(now), live.totals())
        };
        if let Some(retention) = log.retention() {
            app.dashboard.metrics().log_retention(retention);
        }
        if let Some(cluster) = app.ingest.cluster() {
            app.dashboard
                .metrics()
                .cluster(cluster.owned_partitions().len(), cluster.rebalances());
        }
        app.dashboard
            .metrics()
            .render(app.ingest.stats(), &fleet, totals, log.kind(), log_up)
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
