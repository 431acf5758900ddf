//! The pipeline: drains the ingest channel into the window engine and the
//! anomaly scorer, and hands every produced record to the outputs.
//!
//! This is the thin `select!` loop around the synchronous analytics
//! ([`WindowEngine`], [`Scorer`]); all event-time rules live there. Order of
//! records handed to the outputs: a spike alert as soon as its reading
//! arrives; for each closed window, its alert (if any) before the window.
//!
//! Shutdown: when the token is cancelled the sources stop; the pipeline drains
//! what is already in the channel, flushes every open window, hands the
//! records to the outputs and returns.

use crate::anomaly::Scorer;
use crate::ingest::DurableAck;
use crate::ingest::{now_ms, Delivery, IngestEvent};
use crate::store::{Store, StoreError};
use crate::window::{
    redelivery, Admission, EngineOutput, RedeliveryGuard, SteadyClock, WindowEngine,
};
use millrace_protocol::{DeadLetterReason, Reading, Record, SeriesKey, UnixMs};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// How often the journal's group commit is checked (and so the latency bound
/// of an MQTT acknowledgement beyond `journal.commit-interval`).
pub const TICK_INTERVAL: Duration = Duration::from_millis(50);
/// Events taken from the channel per wake-up.
const DRAIN_BATCH: usize = 1024;

/// Where produced records go (the tap, the outbox).
pub trait Output: Send {
    /// Takes the records produced by one step of the pipeline, in order.
    fn emit(&mut self, records: &[Record]);
}

impl Output for crate::tap::Tap {
    fn emit(&mut self, records: &[Record]) {
        self.write(records);
    }
}

/// Window engine + scorer, and the records they produced in the current step.
#[derive(Debug)]
pub struct Analytics {
    engine: WindowEngine,
    scorer: Scorer,
    /// Keeps an MQTT reading that comes back (QoS 1 redelivery) from
    /// counting twice.
    redelivery: RedeliveryGuard,
    /// The redelivery guard's horizons run on this, so a stepped wall clock
    /// neither forgets every reading at once nor keeps them forever.
    clock: SteadyClock,
    scratch: Vec<EngineOutput>,
    produced: Vec<Record>,
}

impl Analytics {
    pub fn new(engine: WindowEngine, scorer: Scorer) -> Self {
        let redelivery = RedeliveryGuard::new(
            engine.open_horizon_ms(),
            redelivery::LIVE_HORIZON_MS,
            redelivery::DEFAULT_CAPACITY,
        );
        Self {
            engine,
            scorer,
            redelivery,
            clock: SteadyClock::default(),
            scratch: Vec::new(),
            produced: Vec::new(),
        }
    }

    pub fn engine(&self) -> &WindowEngine {
        &self.engine
    }

    pub fn redelivery_stats(&self) -> crate::window::RedeliveryStats {
        self.redelivery.stats()
    }

    /// Feeds one reading to the window engine and, if it was accepted, to the
    /// spike check (an alert must not wait for the window to close; a late or
    /// invalid reading is a dead letter, not an alert).
    pub fn push(&mut self, reading: &Reading, now_ms: UnixMs) {
        let admission = self.engine.push(reading, now_ms, &mut self.scratch);
        // Only a reading outside its series' spike band can be a spike: the
        // others skip the scorer's lookup.
        if let Admission::Accepted {
            window_start_ms,
            watch: true,
        } = admission
        {
            if let Some(alert) = self.scorer.check_reading(reading, window_start_ms) {
                self.produced.push(Record::Alert(alert));
            }
        }
        self.collect();
    }

    /// Brings the window state of the readings among `events` (the next
    /// few to be handled) into the cache; see [`WindowEngine::warm`].
    #[inline]
    pub fn warm<'e>(&self, events: impl Iterator<Item = &'e IngestEvent> + Clone) {
        let readings = events.filter_map(|ev| match ev {
            IngestEvent::Reading(r, _) => Some(r),
            _ => None,
        });
        let closing = self.engine.warm(readings.clone());
        if closing != 0 {
            // And the scorer's history of the series whose window closes.
            self.scorer.warm(
                readings
                    .enumerate()
                    .filter(|(i, _)| closing & (1 << i) != 0)
                    .map(|(_, r)| r),
            );
        }
    }

    /// `true` when `reading` is one the agent already counted, delivered
    /// again by its sender: the caller drops it (it is counted here) rather
    /// than journaling and pushing it a second time. A reading whose message
    /// can come back is remembered for that; one that cannot costs nothing.
    pub fn is_redelivery(&mut self, reading: &Reading, delivery: Delivery, now_ms: UnixMs) -> bool {
        let Delivery::AtLeastOnce { redelivered } = delivery else {
            return false;
        };
        let now_ms = self.clock.observe(now_ms);
        match redelivered {
            false => {
                self.redelivery.remember(reading, now_ms);
                false
            }
            true => {
                let again = self.redelivery.is_redelivery(reading, now_ms);
                if again {
                    let n = self.redelivery.stats().duplicates;
                    if n.is_power_of_two() {
                        tracing::info!(series = %reading.series, time_ms = reading.time_ms, redelivered = n, "reading delivered again by its sender; counted once");
                    }
                }
                again
            }
        }
    }

    /// Feeds a reading recovered from the journal after a restart: into the
    /// window engine only (its spike alert, if any, was raised before). It is
    /// remembered, so the broker's redelivery of its message does not count
    /// it again; a reading the journal holds twice counts once.
    pub fn replay(&mut self, reading: &Reading, now_ms: UnixMs) {
        if self
            .redelivery
            .is_replayed_twice(reading, self.clock.observe(now_ms))
        {
            return;
        }
        self.engine.push(reading, now_ms, &mut self.scratch);
        self.collect();
    }

    /// Resumes the scorer's baselines saved by a previous run; those saved
    /// more than [`BASELINE_MAX_AGE`] before `now_ms` are not used (the plant
    /// may have changed since). Returns how many series were restored.
    pub fn restore_baselines(
        &mut self,
        saved: crate::store::LoadedBaselines,
        now_ms: UnixMs,
    ) -> usize {
        let max_age_ms = BASELINE_MAX_AGE.as_millis() as i64;
        let mut restored = 0;
        for (series, saved_ms, history) in saved.series {
            if now_ms.saturating_sub(saved_ms) <= max_age_ms
                && self.scorer.restore(series, &history)
            {
                restored += 1;
            }
        }
        restored
    }

    /// Seeds the engine with the closed-up-to marks of a previous run.
    pub fn restore_closed(&mut self, marks: impl IntoIterator<Item = (SeriesKey, UnixMs)>) {
        self.engine.restore_closed(marks);
    }

    pub fn dead_letter(&mut self, dl: millrace_protocol::DeadLetter) {
        self.produced.push(Record::DeadLetter(dl));
    }

    /// Closes windows by the wall clock (idle series) and evicts silent series.
    pub fn tick(&mut self, now_ms: UnixMs) {
        self.redelivery.expire(self.clock.observe(now_ms));
        self.engine.tick(now_ms, &mut self.scratch);
        self.collect();
    }

    /// Emits every open window (shutdown).
    pub fn flush(&mut self) {
        self.engine.flush(&mut self.scratch);
        self.collect();
    }

    /// Copies the engine's and the scorer's counters into the metrics registry.
    pub fn export_metrics(&self) {
        let w = self.engine.stats();
        metrics::counter!("millrace_readings_accepted_total").absolute(w.readings_accepted);
        metrics::counter!("millrace_late_readings_total").absolute(w.readings_late);
        for (reason, n) in [
            (DeadLetterReason::Late, w.readings_late),
            (DeadLetterReason::NotANumber, w.readings_nan),
            (DeadLetterReason::Infinite, w.readings_infinite),
            (DeadLetterReason::SeriesCap, w.series_rejected_cap),
            (DeadLetterReason::Malformed, w.readings_time_out_of_range),
            (DeadLetterReason::ClockSkew, w.readings_clock_skew),
        ] {
            metrics::counter!("millrace_window_dead_letters_total", "reason" => reason.as_str())
                .absolute(n);
        }
        metrics::counter!("millrace_windows_emitted_total").absolute(w.windows_emitted);
        metrics::counter!("millrace_windows_idle_closed_total").absolute(w.windows_idle_closed);
        metrics::counter!("millrace_series_evicted_total").absolute(w.series_evicted_ttl);
        metrics::counter!("millrace_clock_jumps_total").absolute(w.clock_jumps);
        metrics::gauge!("millrace_live_series").set(w.live_series as f64);
        let r = self.redelivery.stats();
        metrics::counter!("millrace_redelivered_readings_total").absolute(r.duplicates);
        metrics::counter!("millrace_redelivery_guard_forgotten_total").absolute(r.forgotten_early);
        let s = self.scorer.stats();
        metrics::counter!("millrace_windows_scored_total").absolute(s.windows_scored);
        metrics::counter!("millrace_alerts_total", "kind" => "window", "severity" => "warning")
            .absolute(s.window_alerts_warning);
        metrics::counter!("millrace_alerts_total", "kind" => "window", "severity" => "critical")
            .absolute(s.window_alerts_critical);
        metrics::counter!("millrace_alerts_total", "kind" => "spike", "severity" => "any")
            .absolute(s.spike_alerts);
    }

    /// Records produced since the last call.
    pub fn take(&mut self) -> std::vec::Drain<'_, Record> {
        self.produced.drain(..)
    }

    pub fn pending(&self) -> &[Record] {
        &self.produced
    }

    fn collect(&mut self) {
        for out in self.scratch.drain(..) {
            match out {
                EngineOutput::Window(mut w) => {
                    let (alert, band) = self.scorer.score_window_and_band(&mut w);
                    self.engine.set_watch_band(&w.series, band);
                    if let Some(alert) = alert {
                        self.produced.push(Record::Alert(alert));
                    }
                    self.produced.push(Record::Window(w));
                }
                EngineOutput::DeadLetter(dl) => self.produced.push(Record::DeadLetter(dl)),
                EngineOutput::SeriesEvicted(series) => self.scorer.forget(&series),
            }
        }
    }
}

/// The durable side of the pipeline: the journal that makes readings
/// survive a crash before their MQTT messages are acknowledged, and the
/// outbox that holds records until the aggregator acknowledged them.
#[derive(Debug)]
pub struct Durability {
    store: Arc<Store>,
    /// Records go to the outbox (an uplink is configured). Without an uplink
    /// only the windows' closed-up-to marks are stored.
    outbox: bool,
    wake_uplink: Arc<Notify>,
    pending_acks: Vec<DurableAck>,
    /// A reading could not be appended to the journal since the acks were
    /// last released: the next release withholds them instead, so the
    /// messages come again rather than being acknowledged unjournaled.
    unjournaled: bool,
    last_reclaim: Instant,
    last_baseline_save: Instant,
    store_failures: u32,
    /// The store refuses writes until it is reopened
    /// ([`StoreError::needs_reopen`]): the pipeline stops at once, without
    /// flushing, and the agent exits to be restarted.
    broken: bool,
    /// Beaten while a blocked append waits: waiting by policy is not a stall.
    heartbeat: crate::service::Heartbeat,
    /// Since when produced records wait for the next group commit
    /// ([`Durability::defer`]); the acks wait with them.
    deferred_since: Option<Instant>,
}

/// Produced records that may wait for the next group commit at most.
const MAX_DEFERRED_RECORDS: usize = 1024;

impl Durability {
    pub fn new(store: Arc<Store>, outbox: bool, wake_uplink: Arc<Notify>) -> Self {
        Self {
            store,
            outbox,
            wake_uplink,
            pending_acks: Vec::new(),
            unjournaled: false,
            last_reclaim: Instant::now(),
            last_baseline_save: Instant::now(),
            store_failures: 0,
            broken: false,
            heartbeat: crate::service::Heartbeat::default(),
            deferred_since: None,
        }
    }

    /// Whether `records` (windows, dead letters; not yet stored) may wait for
    /// the journal's next group commit instead of being stored now. Storing
    /// them means committing the journal first (a window must never be on
    /// disk before a reading it counts) and then the outbox: two `fsync`s. A
    /// steady stream closes a few windows on nearly every read, so storing
    /// them at once made the group commit per read instead of per
    /// `commit-interval`. They wait at most that interval (and at most
    /// [`MAX_DEFERRED_RECORDS`]); alerts and shutdown never wait. The acks of
    /// the messages behind them wait too (a dead letter is only in the
    /// outbox), so nothing is acknowledged before it is stored.
    fn defer(&mut self, records: &[Record], shutdown: &CancellationToken) -> bool {
        let journal = self.store.journal();
        if shutdown.is_cancelled()
            || records.len() >= MAX_DEFERRED_RECORDS
            || journal.commit_due()
            || records.iter().any(|r| matches!(r, Record::Alert(_)))
        {
            return false;
        }
        let since = *self.deferred_since.get_or_insert_with(Instant::now);
        since.elapsed() < journal.commit_interval()
    }

    fn journal(&mut self, reading: &Reading) {
        let journal = self.store.journal();
        match journal.append(reading) {
            Ok(_) => {}
            Err(StoreError::JournalBacklog { .. }) => {
                // Commit what is buffered, then take this one.
                self.commit();
                if let Err(error) = self.store.journal().append(reading) {
                    self.append_failed(&error);
                }
            }
            Err(error) => self.append_failed(&error),
        }
    }

    fn append_failed(&mut self, error: &StoreError) {
        metrics::counter!("millrace_journal_errors_total").increment(1);
        tracing::error!(%error, "journal append failed; the reading counts in memory, its message stays unacknowledged and will be redelivered");
        self.unjournaled = true;
        self.check_broken(error);
    }

    /// Notes a store that refuses writes until reopened (logged once).
    fn check_broken(&mut self, error: &StoreError) {
        if error.needs_reopen() && !self.broken {
            self.broken = true;
            metrics::counter!("millrace_store_failures_total").increment(1);
            tracing::error!(%error, "the store refuses writes until it is reopened (a full disk or a failed write); stopping ingest without acknowledging what is not durable");
        }
    }

    /// `true` once the store must be reopened: see [`run`].
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Drops the pending markers: their messages stay unacknowledged and
    /// come back (redelivery) after the source reconnects.
    fn withhold_acks(&mut self) {
        self.pending_acks.clear();
    }

    /// Acknowledges the messages behind the pending markers, now durable,
    /// unless a reading of them missed the journal.
    fn release_acks(&mut self) {
        if self.deferred_since.is_some() {
            // Records waiting for the group commit may hold these messages'
            // dead letters: released once they are stored.
            return;
        }
        if std::mem::take(&mut self.unjournaled) {
            // Dropping the markers withholds the acks.
            self.pending_acks.clear();
        } else {
            self.pending_acks.drain(..).for_each(DurableAck::complete);
        }
    }

    /// Commits the journal if due, then releases the acks it covers.
    fn maybe_commit(&mut self) {
        let journal = self.store.journal();
        if journal.commit_due() {
            self.commit();
        } else if !self.pending_acks.is_empty() && journal.stats().pending == 0 {
            // Nothing buffered: the inputs behind these markers are durable already.
            self.release_acks();
        }
    }

    fn commit(&mut self) {
        if self.commit_journal() {
            self.release_acks();
        }
    }

    /// Commits the journal; on failure withholds the pending acks. The acks
    /// of a successful commit stay pending: the caller releases them.
    fn commit_journal(&mut self) -> bool {
        let started = Instant::now();
        let store = Arc::clone(&self.store);
        match tokio::task::block_in_place(|| store.journal().commit()) {
            Ok(_) => {
                metrics::histogram!("millrace_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                true
            }
            Err(error) => {
                metrics::counter!("millrace_journal_errors_total").increment(1);
                if !self.broken {
                    tracing::error!(%error, "journal commit failed; the messages stay unacknowledged and will be redelivered");
                }
                self.check_broken(&error);
                self.withhold_acks();
                false
            }
        }
    }

    /// Makes `records` durable in the outbox (or stores their windows' marks).
    /// Retries until it succeeds or `shutdown` is cancelled and `give_up`
    /// attempts passed: while it retries, the pipeline takes no input, so
    /// the sources back off (MQTT stops acknowledging, the broker holds data).
    /// A store that must be reopened fails at once (no retry can succeed).
    async fn persist(&mut self, records: &[Record], shutdown: &CancellationToken) -> bool {
        let mut attempts = 0u32;
        loop {
            self.heartbeat.beat();
            let store = Arc::clone(&self.store);
            let result = if self.outbox {
                tokio::task::block_in_place(|| store.outbox().append(records.to_vec())).map(|_| ())
            } else {
                let marks: Vec<(SeriesKey, UnixMs)> = records
                    .iter()
                    .filter_map(|r| match r {
                        Record::Window(w) => Some((w.series.clone(), w.end_ms)),
                        _ => None,
                    })
                    .collect();
                if marks.is_empty() {
                    return true;
                }
                tokio::task::block_in_place(|| store.outbox().append_closing(Vec::new(), &marks))
                    .map(|_| ())
            };
            match result {
                Ok(()) => {
                    if self.store_failures > 0 {
                        tracing::info!(
                            after_failures = self.store_failures,
                            "outbox writable again"
                        );
                        self.store_failures = 0;
                    }
                    if self.outbox {
                        self.wake_uplink.notify_one();
                    }
                    return true;
                }
                Err(error) => {
                    attempts += 1;
                    self.store_failures += 1;
                    metrics::counter!("millrace_outbox_append_errors_total").increment(1);
                    self.check_broken(&error);
                    if self.broken {
                        return false;
                    }
                    if self.store_failures.is_power_of_two() {
                        tracing::error!(%error, failures = self.store_failures, "outbox append failed; ingest paused until it succeeds");
                    }
                    if shutdown.is_cancelled() && attempts >= 3 {
                        tracing::error!(records = records.len(), "stopping with records that could not be stored; they were not acknowledged to their sources");
                        return false;
                    }
                    let wait = Duration::from_millis(100u64 << attempts.min(6));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled(), if attempts < 3 => {}
                    }
                }
            }
        }
    }

    /// Saves the scorer's baselines if due (`force`: now, at shutdown). A
    /// failure is logged and counted; the scorer then warms up after a
    /// restart, nothing else is lost.
    fn save_baselines(&mut self, analytics: &mut Analytics, force: bool) {
        if !force && self.last_baseline_save.elapsed() < BASELINE_SAVE_INTERVAL {
            return;
        }
        self.last_baseline_save = Instant::now();
        let snapshot = analytics.scorer.snapshot();
        let store = Arc::clone(&self.store);
        let now = now_ms();
        match tokio::task::block_in_place(|| store.baselines().save(&snapshot, now)) {
            Ok(()) => {
                metrics::gauge!("millrace_saved_baselines").set(snapshot.len() as f64);
            }
            Err(error) => {
                metrics::counter!("millrace_baseline_save_errors_total").increment(1);
                tracing::warn!(%error, series = snapshot.len(), "saving anomaly baselines failed");
                self.check_broken(&error);
            }
        }
    }

    fn reclaim(&mut self) {
        if self.last_reclaim.elapsed() < RECLAIM_INTERVAL {
            return;
        }
        self.last_reclaim = Instant::now();
        let store = Arc::clone(&self.store);
        let now = now_ms();
        if let Err(error) = tokio::task::block_in_place(|| {
            store.journal().reclaim(now)?;
            store.outbox().expire(now)
        }) {
            tracing::warn!(%error, "journal reclaim / outbox expiry failed");
            self.check_broken(&error);
        }
    }
}

/// How often journal space is reclaimed and expired outbox records dropped.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(2);
/// How often the scorer's baselines are saved (and at shutdown).
const BASELINE_SAVE_INTERVAL: Duration = Duration::from_secs(60);
/// Saved baselines older than this are not restored at start.
pub const BASELINE_MAX_AGE: Duration = Duration::from_secs(3600);

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown: the channel drained, every open window flushed and stored.
    Drained,
    /// The store refuses writes until it is reopened (a full disk, a failed
    /// write): the pipeline stopped at once. Nothing was acknowledged that
    /// is not durable; open windows were not flushed (the journal rebuilds
    /// them when the agent starts again).
    StoreBroken,
}

/// Runs the pipeline until `shutdown` is cancelled and the channel is
/// drained, or until the store must be reopened.
pub async fn run(
    mut analytics: Analytics,
    mut rx: mpsc::Receiver<IngestEvent>,
    outputs: &mut [Box<dyn Output>],
    mut durability: Option<Durability>,
    heartbeat: crate::service::Heartbeat,
    shutdown: CancellationToken,
) -> (Analytics, Ended) {
    let mut events = Vec::with_capacity(DRAIN_BATCH);
    let mut tick = tokio::time::interval(TICK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_engine_tick = Instant::now();
    if let Some(d) = durability.as_mut() {
        d.heartbeat = heartbeat.clone();
    }
    loop {
        heartbeat.beat();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            n = rx.recv_many(&mut events, DRAIN_BATCH) => {
                if n == 0 {
                    break; // every source has ended
                }
                handle(&mut analytics, durability.as_mut(), &mut events, now_ms());
            }
            _ = tick.tick() => {
                if last_engine_tick.elapsed() >= ENGINE_TICK_INTERVAL {
                    last_engine_tick = Instant::now();
                    analytics.tick(now_ms());
                    analytics.export_metrics();
                }
                if let Some(d) = durability.as_mut() {
                    d.reclaim();
                    d.save_baselines(&mut analytics, false);
                }
            }
        }
        publish(&mut analytics, outputs, durability.as_mut(), &shutdown).await;
        if durability.as_ref().is_some_and(Durability::is_broken) {
            analytics.export_metrics();
            return (analytics, Ended::StoreBroken);
        }
    }
    // Drain what the sources already handed over, then close every window.
    rx.close();
    while let Some(ev) = rx.recv().await {
        events.push(ev);
        if events.len() >= DRAIN_BATCH {
            handle(&mut analytics, durability.as_mut(), &mut events, now_ms());
        }
    }
    handle(&mut analytics, durability.as_mut(), &mut events, now_ms());
    analytics.flush();
    publish(&mut analytics, outputs, durability.as_mut(), &shutdown).await;
    if let Some(d) = durability.as_mut() {
        d.save_baselines(&mut analytics, true);
        d.commit();
        let store = Arc::clone(&d.store);
        if let Err(error) = tokio::task::block_in_place(|| store.sync()) {
            tracing::error!(%error, "final store sync failed");
        }
    }
    tracing::info!(
        windows = analytics.engine().stats().windows_emitted,
        "pipeline stopped; open windows flushed"
    );
    (analytics, Ended::Drained)
}

/// How often idle windows and silent series are checked by the wall clock.
const ENGINE_TICK_INTERVAL: Duration = Duration::from_millis(250);

fn handle(
    analytics: &mut Analytics,
    mut durability: Option<&mut Durability>,
    events: &mut Vec<IngestEvent>,
    now_ms: UnixMs,
) {
    let mut events = events.drain(..);
    let mut warm_in = 0;
    loop {
        if warm_in == 0 {
            // The next few readings' series into the cache together (their
            // misses overlap), rather than one miss per reading in turn.
            analytics.warm(events.as_slice().iter().take(WindowEngine::WARM_AHEAD));
            warm_in = WindowEngine::WARM_AHEAD;
        }
        warm_in -= 1;
        let Some(ev) = events.next() else {
            break;
        };
        match ev {
            IngestEvent::Reading(r, delivery) => {
                let again = analytics.is_redelivery(&r, delivery, now_ms);
                // A redelivered reading is journaled again but not counted
                // again: if its first journal commit failed (its message was
                // withheld for that), this copy makes it durable before the
                // message is acknowledged; a journal holding it twice
                // replays it once.
                if let Some(d) = durability.as_deref_mut() {
                    d.journal(&r);
                }
                if !again {
                    analytics.push(&r, now_ms);
                }
            }
            IngestEvent::DeadLetter(dl) => analytics.dead_letter(dl),
            IngestEvent::Durable(ack) => match durability.as_deref_mut() {
                Some(d) => d.pending_acks.push(ack),
                None => ack.complete(),
            },
        }
    }
}

async fn publish(
    analytics: &mut Analytics,
    outputs: &mut [Box<dyn Output>],
    durability: Option<&mut Durability>,
    shutdown: &CancellationToken,
) {
    let mut durability = durability;
    if !analytics.pending().is_empty() {
        // Durable first: a record counts as produced once it is in the outbox.
        if let Some(d) = durability.as_deref_mut() {
            // The readings behind these records go first: a window (with
            // its closed-up-to mark) or an alert must never be on disk while
            // a reading it counts is not, or a crash would have the device
            // resend that reading into a window already closed.
            // The acks of the messages behind them wait for the records
            // too: a dead letter is only in the outbox.
            if d.defer(analytics.pending(), shutdown) {
                return;
            }
            d.deferred_since = None;
            if d.store.journal().stats().pending > 0 {
                d.commit_journal();
            }
            if !d.persist(analytics.pending(), shutdown).await {
                d.withhold_acks();
            }
            if d.broken {
                // Not stored, so not produced: the restarted agent rebuilds
                // these records from the journal and the redelivered messages.
                analytics.take();
                return;
            }
        }
        for out in outputs.iter_mut() {
            out.emit(analytics.pending());
        }
        analytics.take();
    }
    if let Some(d) = durability {
        d.maybe_commit();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::anomaly::AnomalyConfig;
    use crate::window::WindowConfig;
    use millrace_protocol::{DeadLetter, Quality, Source, Window};

    const FIRST: Delivery = Delivery::AtLeastOnce { redelivered: false };
    const REDELIVERED: Delivery = Delivery::AtLeastOnce { redelivered: true };

    fn analytics() -> Analytics {
        let cfg = WindowConfig {
            width: Duration::from_secs(1),
            allowed_lateness: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            ..WindowConfig::default()
        };
        Analytics::new(
            WindowEngine::new("gw", cfg),
            Scorer::new("gw", AnomalyConfig::default()),
        )
    }

    fn reading(time_ms: UnixMs, source: Source) -> Reading {
        Reading {
            series: SeriesKey::new("kiln-1", "temp"),
            time_ms,
            value: 20.0 + (time_ms % 1_000) as f64 / 100.0,
            unit: "degC".into(),
            source,
            quality: Quality::Good,
        }
    }

    /// A store in a fresh directory and the pipeline's durable side over it
    /// (with an outbox); the directory lives as long as the first value.
    fn durable() -> (tempfile::TempDir, Arc<crate::store::Store>, Durability) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            crate::store::Store::open(dir.path(), crate::store::StoreConfig::default()).unwrap();
        let store = Arc::new(store);
        let d = Durability::new(Arc::clone(&store), true, Arc::new(Notify::new()));
        (dir, store, d)
    }

    fn windows(a: &mut Analytics) -> Vec<Window> {
        a.take()
            .filter_map(|r| match r {
                Record::Window(w) => Some(w),
                _ => None,
            })
            .collect()
    }

    /// After `kill -9` between the journal commit and the PUBACK: the journal
    /// replays readings 0–400 ms, then the broker redelivers 300–400 ms and
    /// goes on with 500 ms onwards. Every reading counts once.
    #[test]
    fn readings_replayed_from_the_journal_and_redelivered_count_once() {
        let mut a = analytics();
        let now = 1_000_000;
        for t in (0..500).step_by(100) {
            a.replay(&reading(t, Source::Mqtt), now);
        }
        let mut delivered = 0;
        for t in (300..1_000).step_by(100) {
            let r = reading(t, Source::Mqtt);
            if !a.is_redelivery(&r, REDELIVERED, now + 10) {
                a.push(&r, now + 10);
                delivered += 1;
            }
        }
        assert_eq!(delivered, 5);
        assert_eq!(a.redelivery_stats().duplicates, 2);
        a.flush();
        let ws = windows(&mut a);
        assert_eq!(ws.len(), 1);
        assert_eq!(ws[0].count, 10);
        assert_eq!(ws[0].first_event_ms, 0);
        assert_eq!(ws[0].last_event_ms, 900);
    }

    #[test]
    fn the_journal_holding_a_reading_twice_rebuilds_it_once() {
        let mut a = analytics();
        for _ in 0..2 {
            a.replay(&reading(100, Source::Mqtt), 0);
        }
        a.flush();
        assert_eq!(windows(&mut a)[0].count, 1);
    }

    /// The same Modbus value at the same time is a second poll, not a
    /// redelivery: both count.
    #[test]
    fn modbus_readings_are_never_taken_for_redeliveries() {
        let mut a = analytics();
        for _ in 0..2 {
            let r = reading(100, Source::Modbus);
            assert!(!a.is_redelivery(&r, Delivery::Once, 0));
            a.push(&r, 0);
        }
        a.flush();
        assert_eq!(windows(&mut a)[0].count, 2);
    }

    #[test]
    fn a_redelivery_after_the_horizon_is_a_late_reading_not_a_second_count() {
        let mut a = analytics();
        let r = reading(100, Source::Mqtt);
        assert!(!a.is_redelivery(&r, FIRST, 0));
        a.push(&r, 0);
        assert!(a.is_redelivery(&r, REDELIVERED, 9_999));
        // The window closes by the idle timeout; the guard forgets a live
        // reading after its horizon.
        a.tick(2_100);
        assert_eq!(windows(&mut a).len(), 1);
        let horizon = redelivery::LIVE_HORIZON_MS;
        a.tick(horizon);
        assert!(!a.is_redelivery(&r, REDELIVERED, horizon));
        a.push(&r, horizon);
        let late: Vec<_> = a.take().collect();
        assert!(
            matches!(&late[..], [Record::DeadLetter(dl)] if dl.reason == DeadLetterReason::Late),
            "{late:?}"
        );
    }

    #[test]
    fn baselines_older_than_the_max_age_are_not_restored() {
        let mut a = analytics();
        let hour = BASELINE_MAX_AGE.as_millis() as i64;
        let saved = crate::store::LoadedBaselines {
            series: vec![
                (
                    SeriesKey::new("kiln-1", "fresh"),
                    10_000_000,
                    vec![(1.0, 0.1); 12],
                ),
                (
                    SeriesKey::new("kiln-1", "stale"),
                    10_000_000 - hour - 1,
                    vec![(1.0, 0.1); 12],
                ),
            ],
            corrupt: 0,
        };
        assert_eq!(a.restore_baselines(saved, 10_000_000), 1);
    }

    /// A journal commit fails: the reading's message is not acknowledged, the
    /// sender delivers it again (DUP), and that copy is journaled before the
    /// ack goes out, though it counts only once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivery_after_a_failed_journal_commit_is_journaled_before_its_ack() {
        let (_dir, store, mut d) = durable();
        let mut a = analytics();
        let r = reading(100, Source::Mqtt);
        let (ack, first_acked) = DurableAck::new();
        let mut events = vec![
            IngestEvent::Reading(r.clone(), FIRST),
            IngestEvent::Durable(ack),
        ];
        handle(&mut a, Some(&mut d), &mut events, 1_000);
        // The commit fails: the buffered reading is gone, the ack withheld.
        store.journal().lose_pending();
        d.pending_acks.clear();
        assert!(first_acked.await.is_err(), "not acknowledged");

        let (ack, again_acked) = DurableAck::new();
        let mut events = vec![
            IngestEvent::Reading(r.clone(), REDELIVERED),
            IngestEvent::Durable(ack),
        ];
        handle(&mut a, Some(&mut d), &mut events, 1_500);
        assert_eq!(store.journal().stats().pending, 1, "the copy is journaled");
        d.commit();
        again_acked.await.unwrap();
        let replayed = store.journal().replay().unwrap();
        assert_eq!(replayed.readings, vec![r], "durable now");
        a.flush();
        assert_eq!(windows(&mut a)[0].count, 1, "counted once");
    }

    /// A window waits for the journal's group commit and is then written to
    /// the outbox only after the journal holds the readings it counts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_window_never_reaches_the_outbox_before_its_readings_are_journaled() {
        let (_dir, store, mut d) = durable();
        let mut a = analytics();
        let shutdown = CancellationToken::new();
        // 100 ms and then 2 s: the second moves the watermark past [0, 1 s).
        let mut events = vec![
            IngestEvent::Reading(reading(100, Source::Mqtt), FIRST),
            IngestEvent::Reading(reading(2_000, Source::Mqtt), FIRST),
        ];
        handle(&mut a, Some(&mut d), &mut events, 10_000);
        assert!(!store.journal().commit_due(), "no group commit due yet");
        assert_eq!(store.journal().stats().pending, 2);
        publish(&mut a, &mut [], Some(&mut d), &shutdown).await;
        let outbox = || store.outbox().stats().unwrap().bulk.records;
        assert_eq!(outbox(), 0, "the window waits for the group commit");
        assert_eq!(a.pending().len(), 1);
        // The pipeline publishes on every input and every 50 ms tick.
        let deadline = Instant::now() + Duration::from_secs(10);
        while outbox() == 0 {
            assert!(
                Instant::now() < deadline,
                "the window is stored within commit-interval"
            );
            assert_eq!(
                store.journal().stats().pending,
                2,
                "nothing committed meanwhile"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            publish(&mut a, &mut [], Some(&mut d), &shutdown).await;
        }
        assert_eq!(outbox(), 1, "the window");
        assert_eq!(
            store.journal().stats().pending,
            0,
            "its readings were committed first"
        );
        assert!(a.pending().is_empty());
    }

    /// A dead letter waiting for the group commit holds its message's ack:
    /// the ack comes once the dead letter is in the outbox, here at once on
    /// shutdown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_dead_letter_holds_its_ack_until_it_is_stored() {
        let (_dir, store, mut d) = durable();
        let mut a = analytics();
        let shutdown = CancellationToken::new();
        let r = reading(100, Source::Mqtt);
        let (ack, mut acked) = DurableAck::new();
        let mut events = vec![
            IngestEvent::DeadLetter(DeadLetter::for_reading(
                &r,
                DeadLetterReason::Malformed,
                100,
            )),
            IngestEvent::Durable(ack),
        ];
        handle(&mut a, Some(&mut d), &mut events, 10_000);
        publish(&mut a, &mut [], Some(&mut d), &shutdown).await;
        let outbox = || store.outbox().stats().unwrap().bulk.records;
        assert_eq!(outbox(), 0, "the dead letter waits for the group commit");
        assert!(acked.try_recv().is_err(), "and so does its ack");
        shutdown.cancel();
        publish(&mut a, &mut [], Some(&mut d), &shutdown).await;
        assert_eq!(outbox(), 1, "stored at shutdown");
        acked.await.expect("acknowledged once stored");
    }
}
