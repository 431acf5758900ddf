//! The window engine: per-series tumbling event-time windows with watermarks.
//!
//! What it is: plain synchronous code that turns [`Reading`]s into closed
//! [`Window`]s (count, Welford mean and population stddev, min, max,
//! first/last event time) and counted [`DeadLetter`]s. The caller injects the
//! wall clock (`now_ms`) on every call, so tests drive it with a fake clock.
//!
//! What it is not: there is no task, no channel, no I/O and no scoring here;
//! the pipeline feeds it, calls [`WindowEngine::tick`] on a timer, scores the
//! emitted windows with the anomaly scorer and journals what it must.
//!
//! # Semantics
//!
//! - **Alignment.** A reading at event time `t` belongs to the window
//!   `[start, start + width)` with `start = floor(t / width) * width`, aligned
//!   to the Unix epoch (also for negative times: `-1 ms` is in `[-width, 0)`).
//! - **Watermark, per series.** `watermark = max(greatest event time seen −
//!   allowed lateness, idle-close advances)`. It never goes back.
//! - **Emission.** A window is emitted exactly once, when `watermark >= end`,
//!   and the windows of a series are emitted in start order.
//! - **Late rule.** A reading is `Late` exactly when its window has already
//!   been closed, i.e. `end <= watermark`. A reading behind the watermark
//!   (`t < watermark`) whose window is still open (`end > watermark`) is
//!   accepted: it still changes a window nobody has seen yet. Late readings are
//!   dead-lettered with the reason `late`, never silently dropped.
//! - **Bad values.** NaN → `not-a-number`, ±Inf → `infinite`. Such readings do
//!   not touch series state (they neither create a series nor keep it alive).
//!   An event time whose window cannot be represented in `i64` milliseconds is
//!   dead-lettered as `malformed`.
//! - **Clock sanity.** A reading stamped more than `max-ahead` (default
//!   10 min) after the gateway's clock, or more than `max-behind` (default
//!   7 days) before it, is dead-lettered as `clock-skew` and touches no series
//!   state: one device with a clock in 2090 cannot push its series' watermark
//!   decades ahead and make every later reading `late`.
//! - **Series cap.** A reading for a new series while `max-series` series are
//!   live is dead-lettered with the reason `series-cap`.
//! - **Idle close.** When no reading has been *accepted* for a series for more
//!   than `idle-timeout` of gateway time, [`WindowEngine::tick`] closes all
//!   its open windows and advances its watermark to the end of the last one, so
//!   readings for them arriving later are `Late`.
//! - **TTL.** A series that has received no reading at all (accepted or late)
//!   for `series-ttl` is evicted by `tick`: its open windows (if any) are
//!   emitted first, then its state is freed and [`EngineOutput::SeriesEvicted`]
//!   tells the scorer to forget it. After eviction the series starts afresh.
//! - **Gateway time.** Idle close and TTL run on a [`SteadyClock`] fed the
//!   wall clock: a step back (an RTC reset to 1970) or forward by more than a
//!   minute (an NTP step) is a jump the timers do not see, so a stepped clock
//!   neither closes every window at once nor stalls them. Counted in
//!   [`WindowStats::clock_jumps`].
//! - **Shutdown.** [`WindowEngine::flush`] emits every open window and advances
//!   each watermark past them, so nothing is emitted twice if readings follow.
//!
//! ```
//! use millrace_agent::window::{EngineOutput, WindowConfig, WindowEngine};
//! use millrace_protocol::{Reading, SeriesKey, Source, Quality};
//!
//! let mut engine = WindowEngine::new("gw-1", WindowConfig::default());
//! let mut out = Vec::new();
//! let key = SeriesKey::new("plc-1", "temp");
//! for (t, v) in [(1_000, 20.0), (3_000, 22.0), (9_000, 21.0)] {
//!     let r = Reading { series: key.clone(), time_ms: t, value: v, unit: "degC".into(),
//!                       source: Source::Modbus, quality: Quality::Good };
//!     engine.push(&r, t, &mut out);
//! }
//! // The watermark is 9 000 − 2 000 = 7 000 ≥ 5 000: window [0, 5 000) is closed.
//! let EngineOutput::Window(w) = &out[0] else { panic!() };
//! assert_eq!((w.start_ms, w.end_ms, w.count, w.mean, w.stddev), (0, 5_000, 2, 21.0, 1.0));
//! ```

pub mod clock;
mod config;
pub mod redelivery;
pub(crate) mod table;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use clock::SteadyClock;
pub use config::{ConfigError, WindowConfig};
pub use redelivery::{RedeliveryGuard, RedeliveryStats};

use config::duration_ms;
use millrace_protocol::{DeadLetter, DeadLetterReason, Reading, SeriesKey, UnixMs, Window};
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use table::SeriesTable;

/// What the engine hands back to the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOutput {
    /// A closed window, unscored (`score: None`).
    Window(Window),
    /// A reading that was not accepted, with the reason.
    DeadLetter(DeadLetter),
    /// A series was evicted by TTL; per-series state elsewhere (the scorer)
    /// should be dropped with it.
    SeriesEvicted(SeriesKey),
}

/// What became of one pushed reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The reading now counts in the open window starting at `window_start_ms`.
    /// `watch`: it lies outside its series' [`WatchBand`], so the caller
    /// should look at it further (the anomaly scorer's spike check).
    Accepted {
        window_start_ms: UnixMs,
        watch: bool,
    },
    /// The reading was dead-lettered with this reason.
    Rejected(DeadLetterReason),
}

/// Which accepted readings of a series [`Admission::Accepted`] flags with
/// `watch`, as set by the caller ([`WindowEngine::set_watch_band`]): the
/// anomaly scorer's spike band, so that the spike check, which needs the
/// scorer's own per-series state, runs only for the rare readings that can
/// be spikes instead of once per reading. Checked on the series state the
/// reading touches anyway, so it costs no extra memory access.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WatchBand {
    /// Flag every reading (the default for a new series: nothing is known).
    Everything,
    /// Flag none.
    Nothing,
    /// Flag a reading `v` with `|v − center| ≥ half_width`.
    Outside { center: f64, half_width: f64 },
}

impl WatchBand {
    /// `(center, half_width)` such that a reading is flagged exactly when
    /// `!(|v − center| < half_width)`.
    fn bounds(self) -> (f64, f64) {
        match self {
            Self::Everything => (0.0, f64::NEG_INFINITY),
            Self::Nothing => (0.0, f64::INFINITY),
            Self::Outside { center, half_width } if center.is_finite() && !half_width.is_nan() => {
                (center, half_width)
            }
            Self::Outside { .. } => (0.0, f64::NEG_INFINITY),
        }
    }
}

/// Engine counters, for `/metrics` and tests. Every pushed reading lands in
/// exactly one of the `readings_*` counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowStats {
    pub readings_accepted: u64,
    pub readings_late: u64,
    pub readings_nan: u64,
    pub readings_infinite: u64,
    /// Event time whose window is not representable (dead letter `malformed`).
    pub readings_time_out_of_range: u64,
    /// Readings for a new series refused by the live-series cap.
    pub series_rejected_cap: u64,
    /// Readings stamped too far ahead of or behind the gateway clock.
    pub readings_clock_skew: u64,
    /// Steps of the wall clock the timers did not follow.
    pub clock_jumps: u64,
    /// Windows emitted, whatever closed them.
    pub windows_emitted: u64,
    /// Of those, windows closed by the idle timeout.
    pub windows_idle_closed: u64,
    /// Of those, windows closed by `flush` or by TTL eviction.
    pub windows_flushed: u64,
    pub series_evicted_ttl: u64,
    /// Series currently held.
    pub live_series: u64,
}

/// Running aggregate of one open window (Welford for mean and variance).
#[derive(Debug, Clone, Copy)]
struct Acc {
    /// Never zero, which lets `Option<(UnixMs, Acc)>` use it as its tag:
    /// an open window takes one cache line, not a line and a word. 32 bits
    /// convert to `f64` in one instruction (64 take several); a window
    /// would need 4.3 billion readings to reach the cap, where it stays.
    count: NonZeroU32,
    mean: f64,
    /// Sum of squared deviations from the running mean.
    m2: f64,
    min: f64,
    max: f64,
    first_event_ms: UnixMs,
    last_event_ms: UnixMs,
}

impl Acc {
    fn new(time_ms: UnixMs, value: f64) -> Self {
        Self {
            count: NonZeroU32::MIN,
            mean: value,
            m2: 0.0,
            min: value,
            max: value,
            first_event_ms: time_ms,
            last_event_ms: time_ms,
        }
    }

    #[inline]
    fn add(&mut self, time_ms: UnixMs, value: f64) {
        self.count = self.count.saturating_add(1);
        let delta = value - self.mean;
        self.mean += delta / f64::from(self.count.get());
        self.m2 += delta * (value - self.mean);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.first_event_ms = self.first_event_ms.min(time_ms);
        self.last_event_ms = self.last_event_ms.max(time_ms);
    }

    fn population_stddev(&self) -> f64 {
        // m2 can come out a hair below zero only through rounding of equal values.
        (self.m2.max(0.0) / f64::from(self.count.get())).sqrt()
    }
}

/// State of one live series.
///
/// The open windows are `latest` (the one with the greatest start, where
/// nearly every reading lands), `previous` (the one before it, still open
/// for the allowed lateness after `latest` opened) and, rarely, older ones
/// that out-of-order readings reopen, in `older` by start. The first two are
/// inline; `older`'s buffer is boxed and kept once made, so opening a window
/// allocates nothing.
///
/// Laid out by cache line, with the table's entry around it (its
/// generation before, the key after; 256 bytes, checked by a test): the
/// first line holds the watermark, the timers, the spike band and the start
/// of the earliest open window, so whether a reading closes a window is
/// known from it; the second holds `latest`, the third `previous`, the
/// fourth the unit, `older` and the key. A reading that closes nothing (at
/// 1 Hz four in five, at 10 Hz 49 in 50) touches the first two lines only,
/// so the series that readings visit at random stay in the core's cache.
#[derive(Debug)]
#[repr(C)] // by cache line, see above
struct SeriesState {
    /// Everything with `end <= watermark_ms` is closed. `i64::MIN` before the first reading.
    watermark_ms: UnixMs,
    max_event_ms: UnixMs,
    /// Steady time of the last accepted reading (idle close).
    last_accepted_ms: i64,
    /// Steady time of the last reading of any kind (TTL).
    last_seen_ms: i64,
    /// The [`WatchBand`] as `(center, half_width)`.
    watch: (f64, f64),
    /// Start of the earliest open window; `UnixMs::MAX` (never a window
    /// start) when none is open.
    first_start_ms: UnixMs,
    /// The open window with the greatest start: `(start_ms, aggregate)`.
    latest: Option<(UnixMs, Acc)>,
    /// The open window before `latest`, if any.
    previous: Option<(UnixMs, Acc)>,
    /// Unit of the reading that opened the latest window, carried by the windows.
    unit: Arc<str>,
    /// Open windows older than `previous`, by start (only with `previous`).
    older: Option<Box<VecDeque<(UnixMs, Acc)>>>,
}

impl SeriesState {
    fn new(steady_ms: i64) -> Self {
        Self {
            watermark_ms: UnixMs::MIN,
            max_event_ms: UnixMs::MIN,
            last_accepted_ms: steady_ms,
            last_seen_ms: steady_ms,
            watch: WatchBand::Everything.bounds(),
            first_start_ms: UnixMs::MAX,
            latest: None,
            previous: None,
            unit: Arc::from(""),
            older: None,
        }
    }

    fn has_open(&self) -> bool {
        self.latest.is_some()
    }

    /// Start of the earliest open window.
    #[inline]
    fn first_open_start(&self) -> Option<UnixMs> {
        (self.first_start_ms != UnixMs::MAX).then_some(self.first_start_ms)
    }

    /// Whether a watermark at `watermark_ms` closes the earliest open window.
    #[inline]
    fn closes_at(&self, watermark_ms: UnixMs, width_ms: i64) -> bool {
        self.first_start_ms.saturating_add(width_ms) <= watermark_ms
    }

    /// Removes the earliest open window.
    #[inline]
    fn pop_first_open(&mut self) -> Option<(UnixMs, Acc)> {
        let first = match self.older.as_mut().and_then(|older| older.pop_front()) {
            Some(oldest) => Some(oldest),
            None => self.previous.take().or_else(|| self.latest.take()),
        };
        self.first_start_ms = self
            .older
            .as_ref()
            .and_then(|older| older.front())
            .or(self.previous.as_ref())
            .or(self.latest.as_ref())
            .map_or(UnixMs::MAX, |&(start, _)| start);
        first
    }

    #[inline]
    fn add(&mut self, start: UnixMs, time_ms: UnixMs, value: f64, unit: &Arc<str>) {
        match &mut self.latest {
            Some((latest, acc)) if *latest == start => acc.add(time_ms, value),
            Some((latest, _)) if *latest > start => self.add_before_latest(start, time_ms, value),
            _ => {
                // A newer window opens: the current latest (if any) becomes
                // the previous one, the previous one older. Every older window
                // starts before them: the order holds.
                if let Some(prev) = self.latest.replace((start, Acc::new(time_ms, value))) {
                    if let Some(before) = self.previous.replace(prev) {
                        self.older_mut().push_back(before);
                    }
                }
                self.first_start_ms = self.first_start_ms.min(start);
                // Compared once per window rather than once per reading.
                if !Arc::ptr_eq(&self.unit, unit) && self.unit != *unit {
                    self.unit = Arc::clone(unit);
                }
            }
        }
    }

    /// A reading for a window that starts before `latest`.
    fn add_before_latest(&mut self, start: UnixMs, time_ms: UnixMs, value: f64) {
        match &mut self.previous {
            Some((previous, acc)) if *previous == start => acc.add(time_ms, value),
            Some((previous, _)) if *previous > start => {
                let older = self.older_mut();
                match older.binary_search_by_key(&start, |&(s, _)| s) {
                    Ok(i) => older[i].1.add(time_ms, value),
                    Err(i) => older.insert(i, (start, Acc::new(time_ms, value))),
                }
            }
            _ => {
                // Between `previous` (if any) and `latest`: the new previous.
                if let Some(before) = self.previous.replace((start, Acc::new(time_ms, value))) {
                    self.older_mut().push_back(before);
                }
            }
        }
        self.first_start_ms = self.first_start_ms.min(start);
    }

    /// `older`, made on first use and kept.
    fn older_mut(&mut self) -> &mut VecDeque<(UnixMs, Acc)> {
        self.older.get_or_insert_with(Box::default)
    }
}

/// Per-series tumbling windows over event time. See the [module docs](self).
#[derive(Debug)]
pub struct WindowEngine {
    agent: Arc<str>,
    width_ms: i64,
    lateness_ms: i64,
    idle_timeout_ms: i64,
    series_ttl_ms: i64,
    max_ahead_ms: i64,
    max_behind_ms: i64,
    max_series: usize,
    clock: SteadyClock,
    series: SeriesTable<SeriesState>,
    /// Watermarks of series that are not live (restored after a restart, or
    /// kept at TTL eviction): a series that comes back resumes from its
    /// watermark, so a window is never opened again once emitted.
    floors: FloorMap,
    /// Steady time up to which no held series can be idle or past its TTL,
    /// so [`WindowEngine::tick`] has nothing to do: the earliest deadline the
    /// last scan saw, lowered whenever a reading could start an earlier one.
    /// A deadline only moves later as readings arrive, so this is a lower
    /// bound until the next scan, and a tick before it skips the scan of
    /// every series (at 1 Hz per series and a 250 ms tick, most of them).
    quiet_until_ms: i64,
    stats: WindowStats,
}

type FloorMap = std::collections::HashMap<SeriesKey, UnixMs, foldhash::fast::RandomState>;

/// The start of the window containing `time_ms`: `floor(time_ms / width_ms) * width_ms`,
/// correct for negative times. `None` when `width_ms <= 0` or when the window
/// (start or end) does not fit in `i64`.
pub fn window_start_ms(time_ms: UnixMs, width_ms: i64) -> Option<UnixMs> {
    if width_ms <= 0 {
        return None;
    }
    let start = time_ms.checked_sub(time_ms.rem_euclid(width_ms))?;
    start.checked_add(width_ms)?;
    Some(start)
}

impl WindowEngine {
    /// A new engine for `agent`. The config should have passed
    /// [`WindowConfig::validate`]; a zero width is raised to 1 ms and a zero
    /// cap to one series rather than panicking.
    pub fn new(agent: impl Into<Arc<str>>, cfg: WindowConfig) -> Self {
        Self {
            agent: agent.into(),
            width_ms: duration_ms(cfg.width).max(1),
            lateness_ms: duration_ms(cfg.allowed_lateness),
            idle_timeout_ms: duration_ms(cfg.idle_timeout),
            series_ttl_ms: duration_ms(cfg.series_ttl),
            max_ahead_ms: duration_ms(cfg.max_ahead),
            max_behind_ms: duration_ms(cfg.max_behind),
            max_series: cfg.max_series.max(1),
            clock: SteadyClock::default(),
            series: SeriesTable::default(),
            floors: FloorMap::default(),
            quiet_until_ms: i64::MIN,
            stats: WindowStats::default(),
        }
    }

    /// Seeds closed-up-to marks (the end of the last emitted window per
    /// series, e.g. from the store after a restart): readings of those series
    /// in windows ending at or before the mark are `late`.
    pub fn restore_closed(&mut self, marks: impl IntoIterator<Item = (SeriesKey, UnixMs)>) {
        for (series, end_ms) in marks {
            match self.series.get_mut(&series) {
                Some(state) => state.watermark_ms = state.watermark_ms.max(end_ms),
                None => {
                    let floor = self.floors.entry(series).or_insert(end_ms);
                    *floor = (*floor).max(end_ms);
                }
            }
        }
    }

    /// Window width in milliseconds.
    pub fn width_ms(&self) -> i64 {
        self.width_ms
    }

    /// The longest a window stays open after one of its readings arrived,
    /// while readings keep flowing or the series goes quiet:
    /// `width + allowed-lateness + idle-timeout`. A reading redelivered later
    /// than this finds its window closed.
    pub fn open_horizon_ms(&self) -> i64 {
        self.width_ms
            .saturating_add(self.lateness_ms)
            .saturating_add(self.idle_timeout_ms)
    }

    /// Counters since start.
    pub fn stats(&self) -> &WindowStats {
        &self.stats
    }

    /// Number of series currently held.
    pub fn live_series(&self) -> usize {
        self.series.len()
    }

    /// Readings [`warm`](Self::warm) looks ahead at once: enough misses in
    /// flight to hide most of their latency, few enough that what they load
    /// is still in the cache when the readings are pushed.
    pub const WARM_AHEAD: usize = 16;

    /// Brings the state of the series of `readings` (up to
    /// [`WARM_AHEAD`](Self::WARM_AHEAD), about to be pushed) into the cache,
    /// so their lookups' cache misses overlap instead of one per push in
    /// turn. Changes nothing; pushing without it gives the same results.
    ///
    /// Returns which of them (bit `i` for the `i`-th) look set to close a
    /// window of their series, whose scoring comes next: a hint for
    /// [`Scorer::warm`](crate::anomaly::Scorer::warm), not a promise.
    #[inline]
    pub fn warm<'r>(&self, readings: impl Iterator<Item = &'r Reading> + Clone) -> u32 {
        const _: () = assert!(WindowEngine::WARM_AHEAD <= u32::BITS as usize);
        let (width_ms, lateness_ms) = (self.width_ms, self.lateness_ms);
        let mut closing = 0u32;
        let items = readings
            .take(Self::WARM_AHEAD)
            .enumerate()
            .map(|(i, r)| (&r.series, (i, r.time_ms)));
        let agent = &self.agent;
        let sum = self.series.warm(items, |(i, time_ms), state| {
            // The first line says whether the reading closes a window
            // (branch-free: which readings do is not predictable).
            let closes = (time_ms > state.max_event_ms)
                & state.closes_at(time_ms.saturating_sub(lateness_ms), width_ms);
            closing |= u32::from(closes) << i;
            // The second holds the latest window, where the reading lands;
            // only a closing reading needs the window it closes (the third
            // line) and the unit and key that window carries (the fourth).
            let start = |w: &Option<(UnixMs, Acc)>| w.as_ref().map_or(0, |(s, _)| *s);
            let closed = std::hint::select_unpredictable(closes, &state.previous, &state.latest);
            let unit = std::hint::select_unpredictable(closes, &state.unit, agent);
            (state.watermark_ms as u64)
                .wrapping_add(start(&state.latest) as u64)
                .wrapping_add(start(closed) as u64)
                .wrapping_add(unit.len() as u64)
        });
        std::hint::black_box(sum);
        closing
    }

    /// Feeds one reading at wall-clock `now_ms`. Windows it closes and a dead
    /// letter for it, if refused, are appended to `out`.
    pub fn push(
        &mut self,
        reading: &Reading,
        now_ms: UnixMs,
        out: &mut Vec<EngineOutput>,
    ) -> Admission {
        let value = reading.value;
        if !value.is_finite() {
            let reason = if value.is_nan() {
                self.stats.readings_nan += 1;
                DeadLetterReason::NotANumber
            } else {
                self.stats.readings_infinite += 1;
                DeadLetterReason::Infinite
            };
            return reject(reading, reason, now_ms, out);
        }
        let t = reading.time_ms;
        let Some(start) = window_start_ms(t, self.width_ms) else {
            self.stats.readings_time_out_of_range += 1;
            return reject(reading, DeadLetterReason::Malformed, now_ms, out);
        };
        if t > now_ms.saturating_add(self.max_ahead_ms)
            || t < now_ms.saturating_sub(self.max_behind_ms)
        {
            self.stats.readings_clock_skew += 1;
            let skewed = self.stats.readings_clock_skew;
            if skewed.is_power_of_two() {
                tracing::warn!(
                    series = %reading.series,
                    event_time_ms = t,
                    gateway_time_ms = now_ms,
                    skewed,
                    "reading stamped too far from the gateway clock, dead-lettered as clock-skew"
                );
            }
            return reject(reading, DeadLetterReason::ClockSkew, now_ms, out);
        }
        let steady_ms = self.observe_clock(now_ms);
        // A series whose windows were all closed (idle, flushed), or a new
        // one, gets its idle deadline (or TTL) from this reading: the last
        // scan did not count it. A series with open windows only moves its
        // deadlines later.
        let quiet_until_ms = self
            .quiet_until_ms
            .min(steady_ms.saturating_add(self.idle_timeout_ms.min(self.series_ttl_ms)));
        if let Some(state) = self.series.get_mut(&reading.series) {
            if !state.has_open() {
                self.quiet_until_ms = quiet_until_ms;
            }
            return admit(
                &self.agent,
                self.width_ms,
                self.lateness_ms,
                &mut self.stats,
                state,
                reading,
                start,
                now_ms,
                steady_ms,
                out,
            );
        }
        if self.series.len() >= self.max_series {
            self.stats.series_rejected_cap += 1;
            let rejected = self.stats.series_rejected_cap;
            if rejected.is_power_of_two() {
                tracing::warn!(
                    series = %reading.series,
                    max_series = self.max_series,
                    rejected,
                    "series cap reached, new series dead-lettered"
                );
            }
            return reject(reading, DeadLetterReason::SeriesCap, now_ms, out);
        }
        self.stats.live_series += 1;
        self.quiet_until_ms = quiet_until_ms;
        let floor = self.floors.remove(&reading.series);
        let state = self
            .series
            .insert_new(reading.series.clone(), SeriesState::new(steady_ms));
        if let Some(floor) = floor {
            state.watermark_ms = floor;
        }
        admit(
            &self.agent,
            self.width_ms,
            self.lateness_ms,
            &mut self.stats,
            state,
            reading,
            start,
            now_ms,
            steady_ms,
            out,
        )
    }

    /// Sets which accepted readings of `series` are flagged `watch` from now
    /// on (a series not held is left alone; a new series flags everything).
    pub fn set_watch_band(&mut self, series: &SeriesKey, band: WatchBand) {
        if let Some(state) = self.series.get_mut(series) {
            state.watch = band.bounds();
        }
    }

    /// Steady time for the timers at wall clock `now_ms`.
    #[inline]
    fn observe_clock(&mut self, now_ms: UnixMs) -> i64 {
        let steady = self.clock.observe(now_ms);
        self.stats.clock_jumps = self.clock.jumps();
        steady
    }

    /// Wall-clock housekeeping, to be called on a timer (every second or so):
    /// closes the open windows of idle series and evicts series past their TTL.
    /// Scans the series only once one of them can be due (`quiet_until_ms`).
    pub fn tick(&mut self, now_ms: UnixMs, out: &mut Vec<EngineOutput>) {
        let now_ms = self.observe_clock(now_ms);
        if now_ms <= self.quiet_until_ms {
            return;
        }
        let agent = &self.agent;
        let width_ms = self.width_ms;
        let idle_timeout_ms = self.idle_timeout_ms;
        let series_ttl_ms = self.series_ttl_ms;
        let mut idle_closed = 0u64;
        let mut flushed = 0u64;
        let mut evicted = 0u64;
        let floors = &mut self.floors;
        let max_floors = self.max_series.saturating_mul(4);
        let mut quiet_until_ms = i64::MAX;
        self.series.retain(|key, state| {
            if now_ms.saturating_sub(state.last_seen_ms) > series_ttl_ms {
                flushed += close_all(agent, key, state, width_ms, out);
                // Remember where it stopped, so a straggler cannot reopen an
                // emitted window (bounded: beyond the cap, the oldest
                // knowledge is simply not kept).
                if floors.len() < max_floors {
                    floors.insert(key.clone(), state.watermark_ms);
                }
                out.push(EngineOutput::SeriesEvicted(key.clone()));
                evicted += 1;
                return false;
            }
            if state.has_open() && now_ms.saturating_sub(state.last_accepted_ms) > idle_timeout_ms {
                idle_closed += close_all(agent, key, state, width_ms, out);
            }
            let mut deadline = state.last_seen_ms.saturating_add(series_ttl_ms);
            if state.has_open() {
                deadline = deadline.min(state.last_accepted_ms.saturating_add(idle_timeout_ms));
            }
            quiet_until_ms = quiet_until_ms.min(deadline);
            true
        });
        self.quiet_until_ms = quiet_until_ms;
        self.stats.windows_idle_closed += idle_closed;
        self.stats.windows_flushed += flushed;
        self.stats.windows_emitted += idle_closed + flushed;
        self.stats.series_evicted_ttl += evicted;
        self.stats.live_series = self.series.len() as u64;
        if idle_closed > 0 {
            tracing::debug!(windows = idle_closed, "idle series: open windows closed");
        }
        if evicted > 0 {
            tracing::info!(
                series = evicted,
                windows = flushed,
                live_series = self.series.len(),
                "silent series evicted after ttl"
            );
        }
    }

    /// Shutdown: emits every open window of every series (in start order per
    /// series) and advances each watermark past them.
    pub fn flush(&mut self, out: &mut Vec<EngineOutput>) {
        let mut flushed = 0u64;
        for (key, state) in self.series.iter_mut() {
            flushed += close_all(&self.agent, key, state, self.width_ms, out);
        }
        self.stats.windows_flushed += flushed;
        self.stats.windows_emitted += flushed;
        tracing::debug!(windows = flushed, "window engine flushed");
    }
}

#[cfg(test)]
impl WindowEngine {
    /// Held series that a scan at the last observed time would handle: an
    /// open window idle past the timeout, or silent past the TTL.
    fn overdue(&mut self) -> usize {
        let now_ms = self.clock.steady_ms();
        let (idle_ms, ttl_ms) = (self.idle_timeout_ms, self.series_ttl_ms);
        self.series
            .iter_mut()
            .filter(|(_, s)| {
                now_ms.saturating_sub(s.last_seen_ms) > ttl_ms
                    || (s.has_open() && now_ms.saturating_sub(s.last_accepted_ms) > idle_ms)
            })
            .count()
    }
}

/// Accepts `reading` into `state`, or dead-letters it as late; closes what
/// the advanced watermark passes.
#[allow(clippy::too_many_arguments)]
#[inline]
fn admit(
    agent: &Arc<str>,
    width_ms: i64,
    lateness_ms: i64,
    stats: &mut WindowStats,
    state: &mut SeriesState,
    reading: &Reading,
    start: UnixMs,
    now_ms: UnixMs,
    steady_ms: i64,
    out: &mut Vec<EngineOutput>,
) -> Admission {
    state.last_seen_ms = steady_ms;
    if start + width_ms <= state.watermark_ms {
        stats.readings_late += 1;
        return reject(reading, DeadLetterReason::Late, now_ms, out);
    }

    let (t, value) = (reading.time_ms, reading.value);
    state.last_accepted_ms = steady_ms;
    state.add(start, t, value, &reading.unit);
    stats.readings_accepted += 1;

    if t > state.max_event_ms {
        state.max_event_ms = t;
        let candidate = t.saturating_sub(lateness_ms);
        if candidate > state.watermark_ms {
            state.watermark_ms = candidate;
            if state.closes_at(candidate, width_ms) {
                stats.windows_emitted +=
                    close_through(agent, &reading.series, state, width_ms, candidate, out);
            }
        }
    }
    let (center, half_width) = state.watch;
    Admission::Accepted {
        window_start_ms: start,
        watch: !((value - center).abs() < half_width),
    }
}

fn reject(
    reading: &Reading,
    reason: DeadLetterReason,
    now_ms: UnixMs,
    out: &mut Vec<EngineOutput>,
) -> Admission {
    out.push(EngineOutput::DeadLetter(DeadLetter::for_reading(
        reading, reason, now_ms,
    )));
    Admission::Rejected(reason)
}

/// Emits, in start order, the open windows with `end <= watermark_ms`.
fn close_through(
    agent: &Arc<str>,
    key: &SeriesKey,
    state: &mut SeriesState,
    width_ms: i64,
    watermark_ms: UnixMs,
    out: &mut Vec<EngineOutput>,
) -> u64 {
    let mut emitted = 0;
    while let Some(first) = state.first_open_start() {
        if first + width_ms > watermark_ms {
            break;
        }
        let Some((start, acc)) = state.pop_first_open() else {
            break;
        };
        out.push(EngineOutput::Window(to_window(
            agent,
            key,
            &state.unit,
            start,
            width_ms,
            &acc,
        )));
        emitted += 1;
    }
    emitted
}

/// Emits all open windows and advances the watermark to the end of the last one.
fn close_all(
    agent: &Arc<str>,
    key: &SeriesKey,
    state: &mut SeriesState,
    width_ms: i64,
    out: &mut Vec<EngineOutput>,
) -> u64 {
    let Some((last_start, _)) = state.latest else {
        return 0;
    };
    let watermark_ms = (last_start + width_ms).max(state.watermark_ms);
    state.watermark_ms = watermark_ms;
    close_through(agent, key, state, width_ms, watermark_ms, out)
}

fn to_window(
    agent: &Arc<str>,
    key: &SeriesKey,
    unit: &Arc<str>,
    start_ms: UnixMs,
    width_ms: i64,
    acc: &Acc,
) -> Window {
    Window {
        agent: Arc::clone(agent),
        series: key.clone(),
        start_ms,
        end_ms: start_ms + width_ms,
        count: u64::from(acc.count.get()),
        mean: acc.mean,
        min: acc.min,
        max: acc.max,
        stddev: acc.population_stddev(),
        first_event_ms: acc.first_event_ms,
        last_event_ms: acc.last_event_ms,
        unit: Arc::clone(unit),
        score: None,
    }
}
