//! The live state behind the dashboard: what the aggregator has committed
//! lately, per agent and per series, in bounded memory.
//!
//! What it is: a plain synchronous struct fed with each batch's *newly
//! committed* records ([`LiveState::observe`]) — records the dedup step
//! recognised as already committed never reach it, so nothing is counted
//! twice. It keeps, per series, the last `retain-windows` windows in
//! event-time order (a late backlog window is inserted in place, the oldest
//! is dropped when full); the last `retain-alerts` alerts, newest first;
//! per agent the last batch's wall-clock time, its `outbox_floor`, the
//! highest seq received, a readings-per-second rate derived from window
//! counts, and the agent's own status from its last batch (outbox depth and
//! oldest age, records dropped, uplink retries).
//!
//! What it is not: a store. The log (Kafka or the embedded log) is the
//! record: at start the windows and alerts of the last `history` are read
//! back from it ([`LiveState::restore`]), so the charts and the alert feed
//! survive a restart; agents show offline until they send again. Memory is about 90 bytes per retained
//! window: `max-series × retain-windows × 90 B` at most (10 000 × 720 ≈ 650 MB;
//! lower `retain-windows` for very large fleets).
//!
//! An agent's status is as of its last batch: while its uplink is down the
//! aggregator hears nothing, so the fleet row shows the last report and how
//! old it is; the first batch after the outage reports the backlog, and the
//! following ones show it draining. Agents that predate the status (wire
//! version 1) have none; for them [`AgentView::seq_span_records`] (seqs from
//! the outbox floor to the newest seq received) bounds what they still hold.

use millrace_protocol::{
    AgentStatus, Alert, AlertKind, DeadLetterReason, Envelope, Record, SeriesKey, Severity, UnixMs,
    Window,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Event time over which an agent's readings per second are averaged.
pub const RATE_SPAN_MS: i64 = 30_000;
/// Alert marks kept per series (spike alerts have no window of their own).
const ALERT_MARKS_PER_SERIES: usize = 64;

/// Bounds of the live state, from `[dashboard]`.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    pub retain_windows: usize,
    pub retain_alerts: usize,
    pub max_series: usize,
    pub max_series_per_agent: usize,
    pub offline_after: Duration,
}

/// An agent and one of its series: two gateways may both have a `press-1/temperature`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesId {
    pub agent: String,
    pub series: SeriesKey,
}

/// One retained window, as the chart draws it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WindowPoint {
    pub start_ms: UnixMs,
    pub end_ms: UnixMs,
    pub count: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub stddev: f64,
    /// The anomaly baseline when the window was scored; `None` while warming up.
    pub score: Option<PointScore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PointScore {
    pub z: f64,
    pub baseline_mean: f64,
    pub baseline_stddev: f64,
    pub severity: Severity,
}

impl From<&Window> for WindowPoint {
    fn from(w: &Window) -> Self {
        Self {
            start_ms: w.start_ms,
            end_ms: w.end_ms,
            count: w.count,
            mean: w.mean,
            min: w.min,
            max: w.max,
            stddev: w.stddev,
            score: w.score.map(|s| PointScore {
                z: s.z,
                baseline_mean: s.baseline_mean,
                baseline_stddev: s.baseline_stddev,
                severity: s.severity,
            }),
        }
    }
}

/// An alert mark on a series' chart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AlertMark {
    pub id: u64,
    pub time_ms: UnixMs,
    pub value: f64,
    pub kind: AlertKind,
    pub severity: Severity,
    pub z: f64,
}

/// One alert of the feed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEntry {
    /// Increases by one per alert received, across agents.
    pub id: u64,
    /// Wall-clock time the aggregator committed it.
    pub received_ms: UnixMs,
    pub seq: u64,
    #[serde(flatten)]
    pub alert: Alert,
}

#[derive(Debug)]
struct SeriesLive {
    unit: String,
    windows: VecDeque<WindowPoint>,
    marks: VecDeque<AlertMark>,
    windows_total: u64,
}

#[derive(Debug, Default)]
struct AgentLive {
    first_seen_ms: Option<UnixMs>,
    last_batch_ms: Option<UnixMs>,
    batches: u64,
    records: u64,
    windows: u64,
    alerts: u64,
    dead_letters: u64,
    highest_seq: Option<u64>,
    outbox_floor: u64,
    /// Window end (event time, ms) → (readings in windows ending then,
    /// earliest start of those windows).
    readings_by_end: BTreeMap<UnixMs, (u64, UnixMs)>,
    series: usize,
    /// The status of the agent's last batch, and when it arrived.
    status: Option<(AgentStatus, UnixMs)>,
    /// The agent's retry and drop counters summed across its restarts.
    counted: ReportedCounts,
}

/// Counters an agent reports since *its* start, summed across its restarts
/// (a counter that went down, or a smaller uptime, is a restart), so they
/// can be exported as counters that only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReportedCounts {
    pub uplink_retries: u64,
    pub outbox_dropped: u64,
}

impl ReportedCounts {
    fn add(&mut self, last: Option<&AgentStatus>, now: &AgentStatus) {
        let restarted = last.is_some_and(|l| now.uptime_s < l.uptime_s);
        let delta = |last: Option<u64>, now: u64| match last {
            Some(last) if !restarted && now >= last => now - last,
            _ => now,
        };
        self.uplink_retries += delta(
            last.map(|l| l.uplink_retries_total),
            now.uplink_retries_total,
        );
        self.outbox_dropped += delta(
            last.map(|l| l.outbox_dropped_total),
            now.outbox_dropped_total,
        );
    }
}

impl AgentLive {
    /// Readings per second over the event time covered by the windows that
    /// ended in the last [`RATE_SPAN_MS`] (less for a newly seen agent).
    fn readings_per_second(&self) -> f64 {
        let Some((&latest_end, _)) = self.readings_by_end.last_key_value() else {
            return 0.0;
        };
        let from = latest_end - RATE_SPAN_MS;
        let (readings, earliest_start) = self
            .readings_by_end
            .range(from + 1..)
            .fold((0u64, latest_end), |(n, start), (_, (count, s))| {
                (n + count, start.min(*s))
            });
        let covered_ms = latest_end - earliest_start.max(from);
        if covered_ms <= 0 {
            return 0.0;
        }
        readings as f64 / (covered_ms as f64 / 1000.0)
    }
}

/// What one observed batch changed, for the live event stream and the metrics.
#[derive(Debug, Default)]
pub struct Observed {
    pub windows: Vec<(Arc<SeriesId>, WindowPoint)>,
    pub alerts: Vec<AlertEntry>,
    pub dead_letters: Vec<DeadLetterReason>,
    /// Windows of series beyond `max-series`: counted, not kept.
    pub series_over_limit: u64,
}

/// The fleet row of one agent.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentView {
    pub id: String,
    /// A batch arrived within `offline-after`.
    pub online: bool,
    /// Wall-clock time of the agent's last committed batch.
    pub last_seen_ms: Option<UnixMs>,
    pub since_last_seen_ms: Option<i64>,
    /// Readings per second over the last 30 s of event time (less for a
    /// newly seen agent), from window counts.
    pub readings_per_s: f64,
    pub series: usize,
    pub batches: u64,
    pub records: u64,
    pub windows: u64,
    pub alerts: u64,
    pub dead_letters: u64,
    pub highest_seq: Option<u64>,
    pub outbox_floor: u64,
    /// Seqs from the outbox floor to the newest seq received: at most this
    /// many records are still held by the agent.
    pub seq_span_records: u64,
    /// What the agent reported about itself in its last batch (`None` until
    /// it sent one with a status).
    pub status: Option<StatusView>,
}

/// An agent's own report of its outbox and uplink, from its last batch.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusView {
    #[serde(flatten)]
    pub reported: AgentStatus,
    /// How long ago the report arrived: the figures are that old.
    pub reported_ms_ago: i64,
    /// Outbox bytes as a share of its cap, 0–1.
    pub outbox_fill: f64,
    /// Retries and drops summed across the agent's restarts since the
    /// aggregator started (what `/metrics` exports as `_total`).
    pub counted: ReportedCounts,
}

/// One row of the series list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeriesSummary {
    pub agent: String,
    pub device: String,
    pub sensor: String,
    /// `agent/device/sensor`.
    pub id: String,
    pub unit: String,
    pub windows_retained: usize,
    pub last: Option<WindowPoint>,
    /// The newest alert mark of the series.
    pub last_alert: Option<AlertMark>,
}

/// Filters of the series list.
#[derive(Debug, Clone, Default)]
pub struct SeriesFilter {
    /// Case-insensitive substring of `agent/device/sensor`.
    pub query: Option<String>,
    pub agent: Option<String>,
    /// Only series with an alert mark at or above this severity.
    pub min_alert_severity: Option<Severity>,
    pub offset: usize,
    pub limit: usize,
}

/// One series' retained windows and alert marks in a time range.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeriesWindows {
    pub agent: String,
    pub device: String,
    pub sensor: String,
    pub unit: String,
    pub windows: Vec<WindowPoint>,
    pub alerts: Vec<AlertMark>,
}

/// Counts the dashboard reports about itself.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LiveTotals {
    pub series: usize,
    pub windows_retained: usize,
    pub alerts_retained: usize,
    pub series_over_limit: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct LiveState {
    limits: LiveLimits,
    configured_agents: Vec<String>,
    agents: HashMap<String, AgentLive>,
    series: HashMap<Arc<SeriesId>, SeriesLive>,
    alerts: VecDeque<AlertEntry>,
    next_alert_id: u64,
    windows_retained: usize,
    series_over_limit: u64,
}

impl LiveState {
    pub fn new(limits: LiveLimits, configured_agents: Vec<String>) -> Self {
        Self {
            limits,
            configured_agents,
            agents: HashMap::new(),
            series: HashMap::new(),
            alerts: VecDeque::new(),
            next_alert_id: 1,
            windows_retained: 0,
            series_over_limit: 0,
        }
    }

    /// Takes in the newly committed `records` of one batch from `agent`,
    /// received at wall-clock `now_ms`.
    pub fn observe(
        &mut self,
        agent: &str,
        outbox_floor: u64,
        status: Option<&AgentStatus>,
        records: &[&Envelope],
        now_ms: UnixMs,
    ) -> Observed {
        let mut observed = Observed::default();
        let mut new_series = 0;
        {
            let a = self.agents.entry(agent.to_owned()).or_default();
            if let Some(status) = status {
                a.counted.add(a.status.as_ref().map(|(s, _)| s), status);
                a.status = Some((status.clone(), now_ms));
            }
            a.first_seen_ms.get_or_insert(now_ms);
            a.last_batch_ms = Some(now_ms);
            a.batches += 1;
            a.records += records.len() as u64;
            a.outbox_floor = a.outbox_floor.max(outbox_floor);
            if let Some(max) = records.iter().map(|e| e.seq).max() {
                a.highest_seq = Some(a.highest_seq.map_or(max, |h| h.max(max)));
            }
        }
        for envelope in records {
            match &envelope.record {
                Record::Window(w) => {
                    if let Some(point) = self.add_window(agent, w, &mut new_series) {
                        observed.windows.push(point);
                    } else {
                        observed.series_over_limit += 1;
                    }
                }
                Record::Alert(alert) => {
                    let entry = self.add_alert(envelope.seq, alert, now_ms);
                    observed.alerts.push(entry);
                }
                Record::DeadLetter(d) => observed.dead_letters.push(d.reason),
            }
        }
        self.series_over_limit += observed.series_over_limit;
        let a = self.agents.entry(agent.to_owned()).or_default();
        a.series += new_series;
        a.windows += observed.windows.len() as u64 + observed.series_over_limit;
        a.alerts += observed.alerts.len() as u64;
        a.dead_letters += observed.dead_letters.len() as u64;
        observed
    }

    /// Takes in one window or alert read back from the log at start-up,
    /// appended at `appended_ms`. The agent's row learns its series and
    /// counts, not its liveness: it stays offline until its next batch.
    pub fn restore(&mut self, agent: &str, seq: u64, record: &Record, appended_ms: UnixMs) {
        let mut new_series = 0;
        match record {
            Record::Window(w) => {
                if self.add_window(agent, w, &mut new_series).is_none() {
                    self.series_over_limit += 1;
                }
            }
            Record::Alert(alert) => {
                self.add_alert(seq, alert, appended_ms);
            }
            Record::DeadLetter(_) => return,
        }
        let a = self.agents.entry(agent.to_owned()).or_default();
        a.series += new_series;
        a.highest_seq = Some(a.highest_seq.map_or(seq, |h| h.max(seq)));
        match record {
            Record::Window(_) => a.windows += 1,
            Record::Alert(_) => a.alerts += 1,
            Record::DeadLetter(_) => {}
        }
    }

    fn add_window(
        &mut self,
        agent: &str,
        w: &Window,
        new_series: &mut usize,
    ) -> Option<(Arc<SeriesId>, WindowPoint)> {
        let a = self.agents.entry(agent.to_owned()).or_default();
        let entry = a.readings_by_end.entry(w.end_ms).or_insert((0, w.start_ms));
        entry.0 += w.count;
        entry.1 = entry.1.min(w.start_ms);
        if let Some((&latest, _)) = a.readings_by_end.last_key_value() {
            let keep_from = latest - RATE_SPAN_MS;
            while a
                .readings_by_end
                .first_key_value()
                .is_some_and(|(&end, _)| end <= keep_from)
            {
                a.readings_by_end.pop_first();
            }
        }

        let lookup = SeriesId {
            agent: agent.to_owned(),
            series: w.series.clone(),
        };
        let (id, live) = match self.series.get_key_value(&lookup) {
            Some((id, _)) => {
                let id = id.clone();
                let live = self.series.get_mut(&id)?;
                (id, live)
            }
            None => {
                if self.series.len() >= self.limits.max_series
                    || a.series + *new_series >= self.limits.max_series_per_agent
                {
                    return None;
                }
                *new_series += 1;
                let id = Arc::new(lookup);
                let live = self.series.entry(id.clone()).or_insert_with(|| SeriesLive {
                    unit: w.unit.to_string(),
                    windows: VecDeque::new(),
                    marks: VecDeque::new(),
                    windows_total: 0,
                });
                (id, live)
            }
        };
        let point = WindowPoint::from(w);
        live.windows_total += 1;
        if !w.unit.is_empty() && *live.unit != *w.unit {
            live.unit = w.unit.to_string();
        }
        let before = live.windows.len();
        insert_in_order(&mut live.windows, point, self.limits.retain_windows);
        self.windows_retained = self.windows_retained + live.windows.len() - before;
        Some((id, point))
    }

    fn add_alert(&mut self, seq: u64, alert: &Alert, now_ms: UnixMs) -> AlertEntry {
        let entry = AlertEntry {
            id: self.next_alert_id,
            received_ms: now_ms,
            seq,
            alert: alert.clone(),
        };
        self.next_alert_id += 1;
        self.alerts.push_front(entry.clone());
        self.alerts.truncate(self.limits.retain_alerts);
        let id = SeriesId {
            agent: alert.agent.to_string(),
            series: alert.series.clone(),
        };
        if let Some(live) = self.series.get_mut(&id) {
            let mark = AlertMark {
                id: entry.id,
                time_ms: alert.time_ms,
                value: alert.value,
                kind: alert.kind,
                severity: alert.score.severity,
                z: alert.score.z,
            };
            let at = live.marks.partition_point(|m| m.time_ms <= mark.time_ms);
            live.marks.insert(at, mark);
            if live.marks.len() > ALERT_MARKS_PER_SERIES {
                live.marks.pop_front();
            }
        }
        entry
    }

    /// The fleet: every configured agent (offline until its first batch) and
    /// any other agent seen, sorted by id.
    pub fn fleet(&self, now_ms: UnixMs) -> Vec<AgentView> {
        let mut ids: Vec<&str> = self.configured_agents.iter().map(String::as_str).collect();
        ids.extend(
            self.agents
                .keys()
                .map(String::as_str)
                .filter(|id| !self.configured_agents.iter().any(|c| c == id)),
        );
        ids.sort_unstable();
        let offline_after_ms = self.limits.offline_after.as_millis() as i64;
        let empty = AgentLive::default();
        ids.into_iter()
            .map(|id| {
                let a = self.agents.get(id).unwrap_or(&empty);
                let since = a.last_batch_ms.map(|t| (now_ms - t).max(0));
                AgentView {
                    id: id.to_owned(),
                    online: since.is_some_and(|s| s < offline_after_ms),
                    last_seen_ms: a.last_batch_ms,
                    since_last_seen_ms: since,
                    readings_per_s: a.readings_per_second(),
                    series: a.series,
                    batches: a.batches,
                    records: a.records,
                    windows: a.windows,
                    alerts: a.alerts,
                    dead_letters: a.dead_letters,
                    highest_seq: a.highest_seq,
                    outbox_floor: a.outbox_floor,
                    seq_span_records: a
                        .highest_seq
                        .map_or(0, |h| (h + 1).saturating_sub(a.outbox_floor)),
                    status: a.status.as_ref().map(|(s, at)| StatusView {
                        reported: s.clone(),
                        reported_ms_ago: (now_ms - at).max(0),
                        outbox_fill: if s.outbox_max_bytes == 0 {
                            0.0
                        } else {
                            (s.outbox_bytes as f64 / s.outbox_max_bytes as f64).min(1.0)
                        },
                        counted: a.counted,
                    }),
                }
            })
            .collect()
    }

    /// Series matching `filter`: alerting series first (newest alert first),
    /// then by name. Returns the total number of matches and one page.
    pub fn series_list(&self, filter: &SeriesFilter) -> (usize, Vec<SeriesSummary>) {
        let query = filter.query.as_ref().map(|q| q.trim().to_lowercase());
        let mut matches: Vec<(&Arc<SeriesId>, &SeriesLive)> = self
            .series
            .iter()
            .filter(|(id, _)| filter.agent.as_ref().is_none_or(|a| &id.agent == a))
            .filter(|(id, _)| match &query {
                None => true,
                Some(q) if q.is_empty() => true,
                Some(q) => {
                    contains_lowercase(&id.agent, q)
                        || contains_lowercase(&id.series.device, q)
                        || contains_lowercase(&id.series.sensor, q)
                        || contains_lowercase(&format!("{}/{}", id.agent, id.series), q)
                }
            })
            .filter(|(_, live)| {
                filter
                    .min_alert_severity
                    .is_none_or(|min| live.marks.iter().any(|m| m.severity >= min))
            })
            .collect();
        let total = matches.len();
        matches.sort_by(|(a_id, a), (b_id, b)| {
            let a_alert = a.marks.back().map(|m| m.time_ms);
            let b_alert = b.marks.back().map(|m| m.time_ms);
            b_alert.cmp(&a_alert).then_with(|| a_id.cmp(b_id))
        });
        let page = matches
            .into_iter()
            .skip(filter.offset)
            .take(filter.limit)
            .map(|(id, live)| SeriesSummary {
                agent: id.agent.clone(),
                device: id.series.device.to_string(),
                sensor: id.series.sensor.to_string(),
                id: format!("{}/{}", id.agent, id.series),
                unit: live.unit.clone(),
                windows_retained: live.windows.len(),
                last: live.windows.back().copied(),
                last_alert: live.marks.back().copied(),
            })
            .collect();
        (total, page)
    }

    /// Windows of one series with `start_ms` in `[from_ms, to_ms)`, and its
    /// alert marks in the same range; `None` for an unknown series.
    pub fn series_windows(
        &self,
        id: &SeriesId,
        from_ms: UnixMs,
        to_ms: UnixMs,
    ) -> Option<SeriesWindows> {
        let live = self.series.get(id)?;
        let from = live.windows.partition_point(|w| w.start_ms < from_ms);
        let to = live.windows.partition_point(|w| w.start_ms < to_ms);
        Some(SeriesWindows {
            agent: id.agent.clone(),
            device: id.series.device.to_string(),
            sensor: id.series.sensor.to_string(),
            unit: live.unit.clone(),
            windows: live.windows.range(from..to.max(from)).copied().collect(),
            alerts: live
                .marks
                .iter()
                .filter(|m| m.time_ms >= from_ms && m.time_ms < to_ms)
                .copied()
                .collect(),
        })
    }

    /// The newest alerts first, optionally of one agent/series and at least
    /// `min_severity`, with `id` below `before_id` (for paging).
    pub fn alerts(&self, filter: &dyn Fn(&AlertEntry) -> bool, limit: usize) -> Vec<AlertEntry> {
        self.alerts
            .iter()
            .filter(|a| filter(a))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn totals(&self) -> LiveTotals {
        LiveTotals {
            series: self.series.len(),
            windows_retained: self.windows_retained,
            alerts_retained: self.alerts.len(),
            series_over_limit: self.series_over_limit,
        }
    }
}

fn contains_lowercase(haystack: &str, needle_lower: &str) -> bool {
    if haystack.is_ascii() {
        haystack
            .as_bytes()
            .windows(needle_lower.len().max(1))
            .any(|w| w.eq_ignore_ascii_case(needle_lower.as_bytes()))
            || needle_lower.is_empty()
    } else {
        haystack.to_lowercase().contains(needle_lower)
    }
}

/// Inserts `point` by `start_ms` (replacing a window with the same start),
/// keeping at most `cap` newest.
fn insert_in_order(windows: &mut VecDeque<WindowPoint>, point: WindowPoint, cap: usize) {
    match windows.back() {
        None => windows.push_back(point),
        Some(last) if last.start_ms < point.start_ms => windows.push_back(point),
        Some(_) => {
            let at = windows.partition_point(|w| w.start_ms < point.start_ms);
            match windows.get_mut(at) {
                Some(w) if w.start_ms == point.start_ms => *w = point,
                _ => {
                    if windows.len() >= cap && at == 0 {
                        // Older than everything retained in a full buffer.
                        return;
                    }
                    windows.insert(at, point);
                }
            }
        }
    }
    while windows.len() > cap {
        windows.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_protocol::{AnomalyScore, Record};

    fn limits() -> LiveLimits {
        LiveLimits {
            retain_windows: 4,
            retain_alerts: 3,
            max_series: 2,
            max_series_per_agent: 2,
            offline_after: Duration::from_secs(30),
        }
    }

    fn window(sensor: &str, start_ms: i64, mean: f64) -> Record {
        Record::Window(Window {
            agent: "gw-1".into(),
            series: SeriesKey::new("press-1", sensor),
            start_ms,
            end_ms: start_ms + 5000,
            count: 50,
            mean,
            min: mean - 1.0,
            max: mean + 1.0,
            stddev: 0.5,
            first_event_ms: start_ms,
            last_event_ms: start_ms + 4900,
            unit: "degC".into(),
            score: Some(AnomalyScore {
                z: 0.1,
                baseline_mean: mean,
                baseline_stddev: 0.3,
                p_value: 0.9,
                severity: Severity::Normal,
            }),
        })
    }

    fn alert(sensor: &str, time_ms: i64, severity: Severity) -> Record {
        Record::Alert(Alert {
            agent: "gw-1".into(),
            series: SeriesKey::new("press-1", sensor),
            kind: AlertKind::Spike,
            time_ms,
            window_start_ms: time_ms - time_ms % 5000,
            value: 99.0,
            score: AnomalyScore {
                z: 9.0,
                baseline_mean: 80.0,
                baseline_stddev: 1.0,
                p_value: 1e-9,
                severity,
            },
            unit: "degC".into(),
        })
    }

    fn observe(state: &mut LiveState, seq0: u64, records: Vec<Record>) -> Observed {
        let envelopes: Vec<Envelope> = records
            .into_iter()
            .enumerate()
            .map(|(i, record)| Envelope {
                seq: seq0 + i as u64,
                record,
            })
            .collect();
        let refs: Vec<&Envelope> = envelopes.iter().collect();
        state.observe("gw-1", seq0, None, &refs, 1_000_000)
    }

    #[test]
    fn windows_stay_in_event_time_order_and_bounded() {
        let mut state = LiveState::new(limits(), vec!["gw-1".into()]);
        let starts = [10_000, 20_000, 5_000, 15_000, 25_000, 0, 20_000];
        for (i, start) in starts.iter().enumerate() {
            observe(
                &mut state,
                i as u64,
                vec![window("t", *start, *start as f64)],
            );
        }
        let id = SeriesId {
            agent: "gw-1".into(),
            series: SeriesKey::new("press-1", "t"),
        };
        let got = state.series_windows(&id, 0, i64::MAX).unwrap();
        let got: Vec<i64> = got.windows.iter().map(|w| w.start_ms).collect();
        assert_eq!(got, vec![10_000, 15_000, 20_000, 25_000]);
        assert_eq!(state.totals().windows_retained, 4);
        let ranged = state.series_windows(&id, 15_000, 25_000).unwrap();
        assert_eq!(ranged.windows.len(), 2);
    }

    #[test]
    fn series_beyond_the_limit_are_counted_not_kept() {
        let mut state = LiveState::new(limits(), vec![]);
        let observed = observe(
            &mut state,
            0,
            vec![
                window("a", 0, 1.0),
                window("b", 0, 1.0),
                window("c", 0, 1.0),
            ],
        );
        assert_eq!(observed.windows.len(), 2);
        assert_eq!(observed.series_over_limit, 1);
        assert_eq!(state.totals().series, 2);
        assert_eq!(state.fleet(1_000_000)[0].windows, 3);
    }

    #[test]
    fn one_agent_cannot_take_every_series_slot() {
        let mut state = LiveState::new(
            LiveLimits {
                max_series: 3,
                max_series_per_agent: 2,
                ..limits()
            },
            vec![],
        );
        let observed = observe(
            &mut state,
            0,
            vec![
                window("a", 0, 1.0),
                window("b", 0, 1.0),
                window("c", 0, 1.0),
            ],
        );
        assert_eq!((observed.windows.len(), observed.series_over_limit), (2, 1));
        // Known series of that agent still update; a new one stays out.
        let observed = observe(
            &mut state,
            3,
            vec![window("a", 5_000, 1.0), window("d", 0, 1.0)],
        );
        assert_eq!((observed.windows.len(), observed.series_over_limit), (1, 1));
        // Another agent still gets the slot that is left.
        let envelope = Envelope {
            seq: 1,
            record: window("a", 0, 1.0),
        };
        let observed = state.observe("gw-2", 1, None, &[&envelope], 1_000_000);
        assert_eq!(observed.windows.len(), 1);
        assert_eq!(state.totals().series, 3);
    }

    #[test]
    fn alerts_newest_first_bounded_and_marked_on_their_series() {
        let mut state = LiveState::new(limits(), vec![]);
        observe(&mut state, 0, vec![window("t", 0, 1.0)]);
        for i in 0..5 {
            observe(
                &mut state,
                10 + i,
                vec![alert("t", 1000 + i as i64, Severity::Critical)],
            );
        }
        let alerts = state.alerts(&|_| true, 10);
        let ids: Vec<u64> = alerts.iter().map(|a| a.id).collect();
        assert_eq!(ids, vec![5, 4, 3]);
        let (total, page) = state.series_list(&SeriesFilter {
            min_alert_severity: Some(Severity::Critical),
            limit: 10,
            ..Default::default()
        });
        assert_eq!(total, 1);
        assert_eq!(page[0].last_alert.unwrap().time_ms, 1004);
    }

    #[test]
    fn fleet_rate_and_seq_span() {
        let mut state = LiveState::new(limits(), vec!["gw-0".into(), "gw-1".into()]);
        // 7 windows of 50 readings ending every 5 s: the last 30 s hold 6 of them.
        for i in 0..7 {
            observe(&mut state, 100 + i, vec![window("t", i as i64 * 5000, 1.0)]);
        }
        let fleet = state.fleet(1_010_000);
        assert_eq!(fleet.len(), 2);
        assert!(!fleet[0].online && fleet[0].last_seen_ms.is_none());
        let gw1 = &fleet[1];
        assert!(gw1.online);
        assert_eq!(gw1.since_last_seen_ms, Some(10_000));
        assert_eq!(gw1.readings_per_s, 6.0 * 50.0 / 30.0);
        assert_eq!(gw1.highest_seq, Some(106));
        assert_eq!(gw1.outbox_floor, 106);
        assert_eq!(gw1.seq_span_records, 1);
        assert!(!state.fleet(1_000_000 + 31_000)[1].online);

        // A newly seen agent: the rate is over the event time covered so far.
        let mut fresh = LiveState::new(limits(), vec![]);
        for i in 0..2 {
            observe(&mut fresh, i, vec![window("t", i as i64 * 5000, 1.0)]);
        }
        assert_eq!(fresh.fleet(1_000_000)[0].readings_per_s, 100.0 / 10.0);
    }

    #[test]
    fn fleet_shows_the_status_of_the_last_batch() {
        let mut state = LiveState::new(limits(), vec!["gw-1".into()]);
        observe(&mut state, 1, vec![window("t", 0, 1.0)]);
        assert_eq!(state.fleet(1_000_000)[0].status, None);
        let status = |records, oldest| AgentStatus {
            agent_version: "0.1.0".into(),
            uptime_s: 60,
            outbox_records: records,
            outbox_bytes: records * 100,
            outbox_max_bytes: 1_000_000,
            outbox_oldest_age_ms: oldest,
            outbox_dropped_total: 0,
            uplink_retries_total: 4,
            uplink_failures: 4,
        };
        // The first batch after an outage reports the backlog…
        let backlog = status(2_500, Some(40_000));
        state.observe("gw-1", 2, Some(&backlog), &[], 1_000_000);
        let view = state.fleet(1_003_000)[0].status.clone().unwrap();
        assert_eq!(view.reported, backlog);
        assert_eq!(view.reported_ms_ago, 3_000);
        assert_eq!(view.outbox_fill, 0.25);
        // …a batch without a status (an older agent) keeps the last report…
        state.observe("gw-1", 3, None, &[], 1_004_000);
        assert_eq!(
            state.fleet(1_004_000)[0].status.as_ref().unwrap().reported,
            backlog
        );
        // …and the next ones show it draining.
        let drained = AgentStatus {
            uplink_retries_total: 6,
            ..status(3, Some(20))
        };
        state.observe("gw-1", 4, Some(&drained), &[], 1_005_000);
        let view = state.fleet(1_005_000)[0].status.clone().unwrap();
        assert_eq!(view.reported, drained);
        assert_eq!(view.counted.uplink_retries, 6);
        // The agent restarts (uptime and counters start again): the counts
        // exported as `_total` keep growing.
        let restarted = AgentStatus {
            uptime_s: 2,
            uplink_retries_total: 1,
            outbox_dropped_total: 5,
            ..status(10, Some(1_000))
        };
        state.observe("gw-1", 5, Some(&restarted), &[], 1_006_000);
        let counted = state.fleet(1_006_000)[0].status.clone().unwrap().counted;
        assert_eq!(
            counted,
            ReportedCounts {
                uplink_retries: 7,
                outbox_dropped: 5
            }
        );
    }

    #[test]
    fn search_is_case_insensitive_and_paged() {
        let mut limits = limits();
        limits.max_series = 100;
        limits.max_series_per_agent = 100;
        let mut state = LiveState::new(limits, vec![]);
        let records = (0..30)
            .map(|i| window(&format!("Temp-{i:02}"), 0, 1.0))
            .collect();
        observe(&mut state, 0, records);
        let filter = SeriesFilter {
            query: Some("temp-1".into()),
            offset: 2,
            limit: 5,
            ..Default::default()
        };
        let (total, page) = state.series_list(&filter);
        assert_eq!(total, 10);
        let names: Vec<&str> = page.iter().map(|s| &*s.sensor).collect();
        assert_eq!(
            names,
            vec!["Temp-12", "Temp-13", "Temp-14", "Temp-15", "Temp-16"]
        );
    }
}
