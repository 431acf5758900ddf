//! The aggregator's Prometheus metrics: names, help texts, and the text exposition.
//!
//! What it is: one [`PrometheusRecorder`] per [`Metrics`], used through
//! `metrics::with_local_recorder`, so two aggregators in one process (tests)
//! never share counters and no global recorder is claimed from an embedding
//! program. Events of the commit path are recorded as they happen
//! ([`Metrics::record_batch`]); the ingest API's own counters
//! ([`IngestStats`]) and the fleet gauges are copied in at scrape time.
//!
//! Every name has its unit (`_seconds`, `_records`) and counters end in `_total`:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `millrace_aggregator_batches_total` | counter | `result` (accepted, unauthorized, too_large, bad_request, unsupported, unprocessable, busy, log_error, state_error) |
//! | `millrace_aggregator_records_total` | counter | `agent`, `kind` (window, alert, dead-letter): records written to the log |
//! | `millrace_aggregator_duplicate_records_total` | counter | records acknowledged without a second write |
//! | `millrace_aggregator_readings_total` | counter | `agent`: readings summarised by committed windows |
//! | `millrace_aggregator_alerts_total` | counter | `agent`, `severity`, `kind` |
//! | `millrace_aggregator_dead_letters_total` | counter | `agent`, `reason` |
//! | `millrace_aggregator_log_write_seconds` | histogram | `log` (kafka, embedded): one batch's write until acknowledged |
//! | `millrace_aggregator_event_to_commit_seconds` | histogram | `kind`: record event time (window end, alert time) to committed |
//! | `millrace_aggregator_log_up` | gauge | `log`: 1 when the log writer is healthy |
//! | `millrace_aggregator_cluster_partitions_owned` | gauge | `[cluster]`: control partitions this aggregator owns and takes batches for |
//! | `millrace_aggregator_cluster_rebalances_total` | counter | `[cluster]`: assignments received from the consumer group |
//! | `millrace_aggregator_live_series` | gauge | series in the live state |
//! | `millrace_aggregator_live_series_over_limit_windows_total` | counter | windows of series beyond `max-series` |
//! | `millrace_aggregator_agents_online` | gauge | agents with a batch within `offline-after` |
//! | `millrace_aggregator_agent_up` | gauge | `agent` |
//! | `millrace_aggregator_agent_last_seen_timestamp_seconds` | gauge | `agent` |
//! | `millrace_aggregator_agent_readings_per_second` | gauge | `agent` |
//! | `millrace_aggregator_agent_seq_span_records` | gauge | `agent`: outbox floor to newest seq received |
//! | `millrace_aggregator_sse_clients` | gauge | open event streams |
//! | `millrace_aggregator_sse_lagged_events_total` | counter | events a slow event stream missed |
//! | `millrace_aggregator_log_segments_deleted_total` | counter | embedded log segments deleted by retention |
//! | `millrace_aggregator_log_deleted_bytes_total` | counter | their bytes |
//! | `millrace_aggregator_log_deleted_records_total` | counter | the records they held |

use super::live::{AgentView, LiveTotals, Observed};
use crate::ingest::IngestStats;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use millrace_protocol::{Envelope, Record, UnixMs};
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Latency buckets, seconds: from 1 ms to a minute (a backlog replays old records).
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// See the module docs.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = match builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
        {
            Ok(b) => b,
            // Only an empty bucket list is refused; ours is a constant.
            Err(error) => unreachable!("constant latency buckets refused: {error}"),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let metrics = Self { recorder, handle };
        metrics.with(describe_all);
        metrics
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// Records one committed batch: its new records, and how long the log write took.
    pub fn record_batch(
        &self,
        agent: &str,
        records: &[&Envelope],
        observed: &Observed,
        log: &'static str,
        log_write: Option<Duration>,
        now_ms: UnixMs,
    ) {
        self.with(|| {
            if let Some(elapsed) = log_write {
                histogram!("millrace_aggregator_log_write_seconds", "log" => log)
                    .record(elapsed.as_secs_f64());
            }
            for envelope in records {
                let kind = envelope.record.kind().as_str();
                counter!("millrace_aggregator_records_total", "agent" => agent.to_owned(), "kind" => kind)
                    .increment(1);
                let event_ms = match &envelope.record {
                    Record::Window(w) => {
                        counter!("millrace_aggregator_readings_total", "agent" => agent.to_owned())
                            .increment(w.count);
                        w.end_ms
                    }
                    Record::Alert(a) => {
                        counter!(
                            "millrace_aggregator_alerts_total",
                            "agent" => agent.to_owned(),
                            "severity" => a.score.severity.as_str(),
                            "kind" => match a.kind {
                                millrace_protocol::AlertKind::Window => "window",
                                millrace_protocol::AlertKind::Spike => "spike",
                            }
                        )
                        .increment(1);
                        a.time_ms
                    }
                    Record::DeadLetter(d) => {
                        counter!(
                            "millrace_aggregator_dead_letters_total",
                            "agent" => agent.to_owned(),
                            "reason" => d.reason.as_str()
                        )
                        .increment(1);
                        d.time_ms
                    }
                };
                let lag_ms = (now_ms - event_ms).max(0);
                histogram!("millrace_aggregator_event_to_commit_seconds", "kind" => kind)
                    .record(lag_ms as f64 / 1000.0);
            }
            if observed.series_over_limit > 0 {
                counter!("millrace_aggregator_live_series_over_limit_windows_total")
                    .increment(observed.series_over_limit);
            }
        });
    }

    pub fn sse_clients(&self, open: usize) {
        self.with(|| gauge!("millrace_aggregator_sse_clients").set(open as f64));
    }

    pub fn sse_lagged(&self, missed: u64) {
        self.with(|| counter!("millrace_aggregator_sse_lagged_events_total").increment(missed));
    }

    /// Copies in what the embedded log's retention deleted.
    pub fn log_retention(&self, stats: &crate::log::local::RetentionStats) {
        self.with(|| {
            counter!("millrace_aggregator_log_segments_deleted_total")
                .absolute(stats.segments_deleted.load(Ordering::Relaxed));
            counter!("millrace_aggregator_log_deleted_bytes_total")
                .absolute(stats.bytes_deleted.load(Ordering::Relaxed));
            counter!("millrace_aggregator_log_deleted_records_total")
                .absolute(stats.records_deleted.load(Ordering::Relaxed));
        });
    }

    /// `[cluster]`: the control partitions owned, the rebalances seen.
    pub fn cluster(&self, owned: usize, rebalances: u64) {
        self.with(|| {
            gauge!("millrace_aggregator_cluster_partitions_owned").set(owned as f64);
            counter!("millrace_aggregator_cluster_rebalances_total").absolute(rebalances);
        });
    }

    /// The text exposition, after copying in the scrape-time values.
    pub fn render(
        &self,
        stats: &IngestStats,
        fleet: &[AgentView],
        totals: LiveTotals,
        log: &'static str,
        log_up: bool,
    ) -> String {
        self.with(|| {
            for (result, value) in [
                ("accepted", &stats.batches_accepted),
                ("unauthorized", &stats.rejected_unauthorized),
                ("too_large", &stats.rejected_too_large),
                ("bad_request", &stats.rejected_bad_request),
                ("spoofed", &stats.rejected_spoofed),
                ("unsupported", &stats.rejected_unsupported),
                ("unprocessable", &stats.rejected_unprocessable),
                ("busy", &stats.rejected_busy),
                ("timeout", &stats.rejected_timeout),
                ("rate_limited", &stats.rejected_rate_limited),
                ("log_error", &stats.log_errors),
                ("state_error", &stats.state_errors),
                ("redirected", &stats.redirected),
                ("cluster_unavailable", &stats.cluster_unavailable),
            ] {
                counter!("millrace_aggregator_batches_total", "result" => result)
                    .absolute(value.load(Ordering::Relaxed));
            }
            counter!("millrace_aggregator_duplicate_records_total")
                .absolute(stats.records_duplicate.load(Ordering::Relaxed));
            counter!("millrace_aggregator_config_reloads_total", "result" => "ok")
                .absolute(stats.config_reloads.load(Ordering::Relaxed));
            counter!("millrace_aggregator_config_reloads_total", "result" => "error")
                .absolute(stats.config_reload_errors.load(Ordering::Relaxed));
            counter!("millrace_aggregator_spoofed_records_total")
                .absolute(stats.spoofed_records.load(Ordering::Relaxed));
            gauge!("millrace_aggregator_log_up", "log" => log).set(if log_up { 1.0 } else { 0.0 });
            gauge!("millrace_aggregator_live_series").set(totals.series as f64);
            gauge!("millrace_aggregator_agents_online")
                .set(fleet.iter().filter(|a| a.online).count() as f64);
            for agent in fleet {
                let id = agent.id.clone();
                gauge!("millrace_aggregator_agent_up", "agent" => id.clone())
                    .set(if agent.online { 1.0 } else { 0.0 });
                if let Some(seen) = agent.last_seen_ms {
                    gauge!("millrace_aggregator_agent_last_seen_timestamp_seconds", "agent" => id.clone())
                        .set(seen as f64 / 1000.0);
                }
                gauge!("millrace_aggregator_agent_readings_per_second", "agent" => id.clone())
                    .set(agent.readings_per_s);
                gauge!("millrace_aggregator_agent_seq_span_records", "agent" => id.clone())
                    .set(agent.seq_span_records as f64);
                if let Some(status) = &agent.status {
                    let s = &status.reported;
                    gauge!("millrace_aggregator_agent_outbox_records", "agent" => id.clone())
                        .set(s.outbox_records as f64);
                    gauge!("millrace_aggregator_agent_outbox_bytes", "agent" => id.clone())
                        .set(s.outbox_bytes as f64);
                    gauge!("millrace_aggregator_agent_outbox_oldest_age_seconds", "agent" => id.clone())
                        .set(s.outbox_oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
                    counter!("millrace_aggregator_agent_outbox_dropped_records_total", "agent" => id.clone())
                        .absolute(status.counted.outbox_dropped);
                    counter!("millrace_aggregator_agent_uplink_retries_total", "agent" => id.clone())
                        .absolute(status.counted.uplink_retries);
                    gauge!("millrace_aggregator_agent_status_age_seconds", "agent" => id)
                        .set(status.reported_ms_ago as f64 / 1000.0);
                }
            }
        });
        self.handle.run_upkeep();
        self.handle.render()
    }
}

fn describe_all() {
    describe_counter!(
        "millrace_aggregator_batches_total",
        "Ingest requests by result."
    );
    describe_counter!(
        "millrace_aggregator_log_segments_deleted_total",
        "Embedded log segments deleted by retention (age or size)."
    );
    describe_counter!(
        "millrace_aggregator_log_deleted_bytes_total",
        Unit::Bytes,
        "Bytes of embedded log segments deleted by retention."
    );
    describe_counter!(
        "millrace_aggregator_log_deleted_records_total",
        "Records in embedded log segments deleted by retention."
    );
    describe_counter!(
        "millrace_aggregator_records_total",
        "Records written to the log, by agent and kind (duplicates excluded)."
    );
    describe_counter!(
        "millrace_aggregator_duplicate_records_total",
        "Records already committed earlier, acknowledged without a second write."
    );
    describe_counter!(
        "millrace_aggregator_readings_total",
        "Readings summarised by the committed windows, by agent."
    );
    describe_counter!(
        "millrace_aggregator_alerts_total",
        "Alerts committed, by agent, severity and kind."
    );
    describe_counter!(
        "millrace_aggregator_dead_letters_total",
        "Dead letters committed, by agent and reason."
    );
    describe_histogram!(
        "millrace_aggregator_log_write_seconds",
        Unit::Seconds,
        "Time from handing a batch's records to the log until every one is acknowledged."
    );
    describe_histogram!(
        "millrace_aggregator_event_to_commit_seconds",
        Unit::Seconds,
        "Time from a record's event time (window end, alert time) until it is committed."
    );
    describe_gauge!(
        "millrace_aggregator_log_up",
        "1 when the log writer reports healthy."
    );
    describe_counter!(
        "millrace_aggregator_cluster_rebalances_total",
        "Assignments of control partitions this aggregator received from the consumer group."
    );
    describe_gauge!(
        "millrace_aggregator_cluster_partitions_owned",
        "Control partitions (of the cluster's control topic) this aggregator owns and takes batches for."
    );
    describe_gauge!(
        "millrace_aggregator_live_series",
        "Series held in the dashboard's live state."
    );
    describe_counter!(
        "millrace_aggregator_live_series_over_limit_windows_total",
        "Windows of series beyond the dashboard's max-series, committed but not shown."
    );
    describe_gauge!(
        "millrace_aggregator_agents_online",
        "Agents with a batch within offline-after."
    );
    describe_gauge!(
        "millrace_aggregator_agent_up",
        "1 when the agent sent a batch within offline-after."
    );
    describe_gauge!(
        "millrace_aggregator_agent_last_seen_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the agent's last committed batch."
    );
    describe_gauge!(
        "millrace_aggregator_agent_readings_per_second",
        "Readings per second over the last 30 s of event time, from window counts."
    );
    describe_gauge!(
        "millrace_aggregator_agent_seq_span_records",
        "Seqs from the agent's outbox floor to the newest seq received: an upper bound of records the agent still holds."
    );
    describe_gauge!(
        "millrace_aggregator_agent_outbox_records",
        "Records waiting in the agent's outbox, as it reported in its last batch."
    );
    describe_gauge!(
        "millrace_aggregator_agent_outbox_bytes",
        "Stored bytes waiting in the agent's outbox, as it reported in its last batch."
    );
    describe_gauge!(
        "millrace_aggregator_agent_outbox_oldest_age_seconds",
        "Age of the oldest record in the agent's outbox, as it reported in its last batch (0: empty)."
    );
    describe_counter!(
        "millrace_aggregator_agent_outbox_dropped_records_total",
        "Records the agent's outbox dropped (full or expired), as it reported, summed across its restarts."
    );
    describe_counter!(
        "millrace_aggregator_agent_uplink_retries_total",
        "Failed uplink sends, as the agent reported, summed across its restarts."
    );
    describe_gauge!(
        "millrace_aggregator_agent_status_age_seconds",
        "How old the agent's last status report is."
    );
    describe_gauge!(
        "millrace_aggregator_sse_clients",
        "Open dashboard event streams."
    );
    describe_counter!(
        "millrace_aggregator_sse_lagged_events_total",
        "Live events a slow event stream missed (the page then reloads its view)."
    );
}
