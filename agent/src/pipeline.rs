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
use crate::ingest::{now_ms, IngestEvent};
use crate::window::{EngineOutput, WindowEngine};
use millrace_protocol::{Reading, Record, UnixMs};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often idle windows and silent series are checked by the wall clock.
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);
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
    width_ms: UnixMs,
    scratch: Vec<EngineOutput>,
    produced: Vec<Record>,
}

impl Analytics {
    pub fn new(engine: WindowEngine, scorer: Scorer, width: Duration) -> Self {
        Self {
            engine,
            scorer,
            width_ms: width.as_millis() as UnixMs,
            scratch: Vec::new(),
            produced: Vec::new(),
        }
    }

    pub fn engine(&self) -> &WindowEngine {
        &self.engine
    }

    /// Feeds one reading: the spike check first (an alert must not wait for
    /// the window), then the window engine.
    pub fn push(&mut self, reading: &Reading, now_ms: UnixMs) {
        if reading.value.is_finite() {
            let start = reading.time_ms - reading.time_ms.rem_euclid(self.width_ms);
            if let Some(alert) = self.scorer.check_reading(reading, start) {
                self.produced.push(Record::Alert(alert));
            }
        }
        self.engine.push(reading, now_ms, &mut self.scratch);
        self.collect();
    }

    pub fn dead_letter(&mut self, dl: millrace_protocol::DeadLetter) {
        self.produced.push(Record::DeadLetter(dl));
    }

    /// Closes windows by the wall clock (idle series) and evicts silent series.
    pub fn tick(&mut self, now_ms: UnixMs) {
        self.engine.tick(now_ms, &mut self.scratch);
        self.collect();
    }

    /// Emits every open window (shutdown).
    pub fn flush(&mut self) {
        self.engine.flush(&mut self.scratch);
        self.collect();
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
                    if let Some(alert) = self.scorer.score_window(&mut w) {
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

/// Runs the pipeline until `shutdown` is cancelled and the channel is drained.
pub async fn run(
    mut analytics: Analytics,
    mut rx: mpsc::Receiver<IngestEvent>,
    outputs: &mut [Box<dyn Output>],
    shutdown: CancellationToken,
) -> Analytics {
    let mut events = Vec::with_capacity(DRAIN_BATCH);
    let mut tick = tokio::time::interval(TICK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            n = rx.recv_many(&mut events, DRAIN_BATCH) => {
                if n == 0 {
                    break; // every source has ended
                }
                handle(&mut analytics, &mut events, now_ms());
            }
            _ = tick.tick() => analytics.tick(now_ms()),
        }
        publish(&mut analytics, outputs);
    }
    // Drain what the sources already handed over, then close every window.
    rx.close();
    while let Some(ev) = rx.recv().await {
        events.push(ev);
        if events.len() >= DRAIN_BATCH {
            handle(&mut analytics, &mut events, now_ms());
        }
    }
    handle(&mut analytics, &mut events, now_ms());
    analytics.flush();
    publish(&mut analytics, outputs);
    tracing::info!(
        windows = analytics.engine().stats().windows_emitted,
        "pipeline stopped; open windows flushed"
    );
    analytics
}

fn handle(analytics: &mut Analytics, events: &mut Vec<IngestEvent>, now_ms: UnixMs) {
    for ev in events.drain(..) {
        match ev {
            IngestEvent::Reading(r) => analytics.push(&r, now_ms),
            IngestEvent::DeadLetter(dl) => analytics.dead_letter(dl),
        }
    }
}

fn publish(analytics: &mut Analytics, outputs: &mut [Box<dyn Output>]) {
    if analytics.pending().is_empty() {
        return;
    }
    for out in outputs.iter_mut() {
        out.emit(analytics.pending());
    }
    analytics.take();
}
