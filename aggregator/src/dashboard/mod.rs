//! The live fleet dashboard: the page, its JSON API, the event stream and `/metrics`.
//!
//! What it is: a read-only view of what the aggregator committed lately.
//! [`Dashboard`] is the ingest path's [`CommitObserver`]: each committed
//! batch's new records update the bounded [`live::LiveState`], are counted in
//! [`metrics::Metrics`], and are published to the open event streams.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page (fleet, series search and chart, alert feed); assets under `/assets/`, embedded in the binary |
//! | `GET /api/v1/fleet` | every agent: online, last seen, readings/s, seq span, counts |
//! | `GET /api/v1/series?q=&agent=&alerting=warning\|critical&offset=&limit=` | series search, alerting first, at most 500 a page |
//! | `GET /api/v1/series/windows?agent=&series=device/sensor&range=15m` (or `from_ms=&to_ms=`) | one series' windows (mean, min/max, baseline ±σ) and alert marks |
//! | `GET /api/v1/alerts?limit=&agent=&series=&severity=&before_id=` | alert feed, newest first |
//! | `GET /api/v1/events?agent=&series=` | server-sent events: `alert` (all), `window` (of the chosen series only), `fleet` every 2 s, `resync` after a gap |
//! | `GET /metrics` | Prometheus text format |
//!
//! Access: open unless `[dashboard] token` or `username`/`password` is set;
//! then every route above needs `Authorization: Bearer <token>` (or
//! `?access_token=`) or HTTP basic auth. `/healthz` and the ingest API keep
//! their own rules.
//!
//! What it is not: a store or a query engine over history (read the log for
//! that), and it writes nothing: there are no routes that change state.

pub mod api;
pub mod assets;
pub mod auth;
pub mod config;
pub mod live;
pub mod metrics;

use crate::ingest::CommitObserver;
use config::{DashboardAuth, DashboardConfig};
use live::{AlertEntry, LiveLimits, LiveState, SeriesId, WindowPoint};
use millrace_protocol::{Batch, Envelope, UnixMs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;

/// Events buffered per stream; a stream further behind gets `resync`.
pub const EVENT_BUFFER: usize = 4096;

/// A change pushed to the open event streams.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    Window {
        id: Arc<SeriesId>,
        point: WindowPoint,
    },
    Alert(AlertEntry),
}

/// See the module docs.
#[derive(Debug)]
pub struct Dashboard {
    config: DashboardConfig,
    live: Mutex<LiveState>,
    events: broadcast::Sender<Arc<LiveEvent>>,
    metrics: metrics::Metrics,
    log_kind: &'static str,
    sse_clients: AtomicUsize,
    sessions: auth::Sessions,
    /// The credentials in force: `config.auth` until a reload replaces them.
    auth: std::sync::RwLock<Arc<DashboardAuth>>,
}

impl Dashboard {
    pub fn new(config: DashboardConfig, agents: Vec<String>, log_kind: &'static str) -> Self {
        let limits = LiveLimits {
            retain_windows: config.retain_windows,
            retain_alerts: config.retain_alerts,
            max_series: config.max_series,
            max_series_per_agent: config.max_series_per_agent,
            offline_after: config.offline_after,
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let auth = std::sync::RwLock::new(Arc::new(config.auth.clone()));
        Self {
            auth,
            config,
            live: Mutex::new(LiveState::new(limits, agents)),
            events,
            metrics: metrics::Metrics::new(),
            log_kind,
            sse_clients: AtomicUsize::new(0),
            sessions: auth::Sessions::default(),
        }
    }

    /// The browser sessions (see [`auth`]).
    pub fn sessions(&self) -> &auth::Sessions {
        &self.sessions
    }

    pub fn config(&self) -> &DashboardConfig {
        &self.config
    }

    /// Who may read the dashboard now.
    pub fn auth(&self) -> Arc<DashboardAuth> {
        Arc::clone(&self.auth.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Takes the credentials of a re-read config (SIGHUP). When they
    /// changed, every browser session ends: a session opened with a retired
    /// password or token must not outlive it. Returns whether they changed.
    pub fn set_auth(&self, auth: DashboardAuth) -> bool {
        let mut current = self.auth.write().unwrap_or_else(|e| e.into_inner());
        if **current == auth {
            return false;
        }
        *current = Arc::new(auth);
        drop(current);
        self.sessions.clear();
        true
    }

    /// The live state. A panic while it was held cannot leave it torn (each
    /// update is a few inserts), so a poisoned lock is taken over.
    pub fn live(&self) -> MutexGuard<'_, LiveState> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.events.subscribe()
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Counts a new event stream in; `false` (and not counted) when
    /// `max-event-streams` are open already.
    fn stream_opened(&self) -> bool {
        let cap = self.config.max_event_streams;
        let admitted = self
            .sse_clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            });
        match admitted {
            Ok(before) => {
                self.metrics.sse_clients(before + 1);
                true
            }
            Err(_) => false,
        }
    }

    fn stream_closed(&self) {
        let open = self
            .sse_clients
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.metrics.sse_clients(open);
    }
}

impl CommitObserver for Dashboard {
    fn committed(&self, batch: &Batch, new: &[&Envelope], log_write: Option<Duration>) {
        let now = now_ms();
        let observed = self.live().observe(
            &batch.agent,
            batch.outbox_floor,
            batch.status.as_ref(),
            new,
            now,
        );
        self.metrics
            .record_batch(&batch.agent, new, &observed, self.log_kind, log_write, now);
        if self.events.receiver_count() == 0 {
            return;
        }
        // Alerts first: they are what an operator waits for.
        for alert in observed.alerts {
            let _ = self.events.send(Arc::new(LiveEvent::Alert(alert)));
        }
        for (id, point) in observed.windows {
            let _ = self.events.send(Arc::new(LiveEvent::Window { id, point }));
        }
    }
}

/// Wall-clock Unix time in milliseconds.
pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as UnixMs)
}
