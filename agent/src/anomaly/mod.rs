//! The anomaly scorer: a moving baseline per series, window scores and spike alerts.
//!
//! What it is: plain synchronous code. For each series it keeps the last N
//! closed window means (and window variances). A closed window is scored
//! against the baseline built from the windows *before* it:
//!
//! - μ = mean of the last N window means, σ = their sample stddev (n − 1);
//! - z = (mean − μ) / max(σ, floor), with floor = max(`sigma-floor`,
//!   `sigma-floor-relative` × |μ|), so a stuck sensor or a constant series
//!   never divides by zero and never alarms on float noise;
//! - a two-sided p-value of |z| under a standard normal (`statrs`);
//! - `Warning` when |z| ≥ `warning-z`, `Critical` when |z| ≥ `critical-z`.
//!
//! No score is given until `warm-up` windows of the series have closed.
//!
//! **Spike check.** [`Scorer::check_reading`] tests a single reading against
//! the same baseline as soon as it is accepted, so an operator sees a fault
//! within about a second instead of at the end of the window. A single reading
//! is noisier than a window mean, so its spread is
//! `sqrt(σ² + mean within-window variance over the history)`: ordinary noise
//! of the series stays far below the threshold. A spike alert needs
//! |z| ≥ the threshold of `spike-min-severity` (`critical-z` by default:
//! at 5σ, Gaussian noise trips it about once in 1.7 million readings), and
//! at most one spike alert is raised per series and window.
//!
//! What it is not: no storage, no I/O, no learning beyond the moving window;
//! it does not decide where alerts go (the pipeline sends them ahead of the
//! backlog). State is bounded: only series the window engine holds, capped at
//! the same `max-series`; call [`Scorer::forget`] when the engine evicts a series.

mod config;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use config::{AnomalyConfig, ConfigError};

use crate::window::table::SeriesTable;
use crate::window::WatchBand;
use millrace_protocol::{
    Alert, AlertKind, AnomalyScore, Reading, SeriesKey, Severity, UnixMs, Window,
};
use statrs::distribution::{ContinuousCDF, Normal};
use std::collections::VecDeque;
use std::sync::Arc;

/// Scorer counters, for `/metrics` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScorerStats {
    /// Windows that received a score (after warm-up).
    pub windows_scored: u64,
    /// Windows seen during warm-up (no score).
    pub windows_warming_up: u64,
    pub window_alerts_warning: u64,
    pub window_alerts_critical: u64,
    pub spike_alerts: u64,
    /// Windows of a new series refused because `max-series` series are held.
    pub series_rejected_cap: u64,
    /// Series currently held.
    pub live_series: u64,
}

/// The baseline of one series, recomputed whenever a window is added.
#[derive(Debug, Clone, Copy, Default)]
struct Baseline {
    /// μ: mean of the window means.
    mean: f64,
    /// σ: sample stddev of the window means.
    stddev: f64,
    /// What z divides by: max(σ, floor).
    divisor: f64,
    /// Spread for a single reading: sqrt(σ² + mean window variance).
    spike_spread: f64,
    /// What a spike z divides by: max(spike_spread, floor).
    spike_divisor: f64,
    /// |reading − μ| at or above this is a spike (spike threshold × spike_divisor).
    spike_band: f64,
}

#[derive(Debug)]
struct SeriesHistory {
    /// (window mean, window population variance), oldest first, at most `history`.
    windows: VecDeque<(f64, f64)>,
    /// Valid once `windows.len() >= warm_up`.
    baseline: Option<Baseline>,
    /// Window start of the last spike alert, to raise at most one per window.
    last_spike_window_ms: Option<UnixMs>,
}

/// Moving-stddev anomaly scorer. See the [module docs](self).
#[derive(Debug)]
pub struct Scorer {
    agent: Arc<str>,
    cfg: AnomalyConfig,
    max_series: usize,
    /// |z| threshold for spike alerts.
    spike_z: f64,
    normal: Normal,
    series: SeriesTable<SeriesHistory>,
    stats: ScorerStats,
}

/// Default series cap, the same as the window engine's default `max-series`.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

impl Scorer {
    /// A new scorer for `agent`, holding at most [`DEFAULT_MAX_SERIES`] series;
    /// use [`with_max_series`](Self::with_max_series) to match the window
    /// engine's `max-series`. The config should have passed
    /// [`AnomalyConfig::validate`]; out-of-range values are clamped, not panicked on.
    pub fn new(agent: impl Into<Arc<str>>, cfg: AnomalyConfig) -> Self {
        let mut cfg = cfg;
        cfg.history = cfg.history.max(2);
        cfg.warm_up = cfg.warm_up.clamp(2, cfg.history);
        let spike_z = match cfg.spike_min_severity {
            Severity::Warning => cfg.warning_z,
            Severity::Normal | Severity::Critical => cfg.critical_z,
        };
        Self {
            agent: agent.into(),
            cfg,
            max_series: DEFAULT_MAX_SERIES,
            spike_z,
            normal: Normal::standard(),
            series: SeriesTable::default(),
            stats: ScorerStats::default(),
        }
    }

    /// Caps the number of series held (at least one).
    pub fn with_max_series(mut self, max_series: usize) -> Self {
        self.max_series = max_series.max(1);
        self
    }

    pub fn stats(&self) -> &ScorerStats {
        &self.stats
    }

    pub fn live_series(&self) -> usize {
        self.series.len()
    }

    /// Every series' window history, `(mean, variance)` oldest first: what
    /// [`restore`](Self::restore) takes after a restart.
    pub fn snapshot(&mut self) -> Vec<(SeriesKey, Vec<(f64, f64)>)> {
        self.series
            .iter_mut()
            .map(|(key, h)| (key.clone(), h.windows.iter().copied().collect()))
            .collect()
    }

    /// Resumes a series from a saved history (the newest `history` windows
    /// of it), so it is scored from its first window after a restart when
    /// the saved history covers the warm-up. Non-finite entries are dropped;
    /// a series already held, or one beyond the series cap, is left alone.
    /// Returns whether the series was restored.
    pub fn restore(&mut self, series: SeriesKey, windows: &[(f64, f64)]) -> bool {
        if self.series.get_mut(&series).is_some() || self.series.len() >= self.max_series {
            return false;
        }
        let valid: Vec<(f64, f64)> = windows
            .iter()
            .copied()
            .filter(|(m, v)| m.is_finite() && v.is_finite() && *v >= 0.0)
            .collect();
        let kept: VecDeque<(f64, f64)> = valid[valid.len().saturating_sub(self.cfg.history)..]
            .iter()
            .copied()
            .collect();
        if kept.is_empty() {
            return false;
        }
        let baseline = baseline(&self.cfg, self.spike_z, &kept);
        self.series.insert_new(
            series,
            SeriesHistory {
                windows: kept,
                baseline,
                last_spike_window_ms: None,
            },
        );
        self.stats.live_series = self.series.len() as u64;
        true
    }

    /// Drops the history of a series (call it when the window engine evicts it).
    pub fn forget(&mut self, series: &SeriesKey) {
        self.series.remove(series);
        self.stats.live_series = self.series.len() as u64;
    }

    /// Scores a closed window against the baseline of the windows before it,
    /// sets `w.score` (`None` during warm-up), then adds the window to the
    /// history. Returns a window alert when |z| ≥ `warning-z`.
    pub fn score_window(&mut self, w: &mut Window) -> Option<Alert> {
        self.score_window_and_band(w).0
    }

    /// [`score_window`](Self::score_window), plus the series' spike band
    /// after it: the readings [`check_reading`](Self::check_reading) can
    /// raise an alert for lie outside it, so the window engine can flag
    /// them ([`WatchBand`]) and the others skip the check.
    pub fn score_window_and_band(&mut self, w: &mut Window) -> (Option<Alert>, WatchBand) {
        w.score = None;
        if w.count == 0 || !w.mean.is_finite() {
            let band = self
                .series
                .get_mut(&w.series)
                .map_or(WatchBand::Nothing, |h| spike_band(&self.cfg, h.baseline));
            return (None, band);
        }
        let history = match self.series.get_mut(&w.series) {
            Some(history) => history,
            None => {
                if self.series.len() >= self.max_series {
                    self.stats.series_rejected_cap += 1;
                    return (None, WatchBand::Nothing);
                }
                self.stats.live_series += 1;
                let history = SeriesHistory {
                    windows: VecDeque::with_capacity(self.cfg.history),
                    baseline: None,
                    last_spike_window_ms: None,
                };
                self.series.insert_new(w.series.clone(), history)
            }
        };

        let score = history.baseline.map(|b| {
            let z = (w.mean - b.mean) / b.divisor;
            AnomalyScore {
                z,
                baseline_mean: b.mean,
                baseline_stddev: b.stddev,
                p_value: two_sided_p(&self.normal, z),
                severity: severity(&self.cfg, z),
            }
        });

        if history.windows.len() == self.cfg.history {
            history.windows.pop_front();
        }
        let variance = if w.stddev.is_finite() {
            w.stddev * w.stddev
        } else {
            0.0
        };
        history.windows.push_back((w.mean, variance));
        history.baseline = baseline(&self.cfg, self.spike_z, &history.windows);
        let band = spike_band(&self.cfg, history.baseline);

        let Some(score) = score else {
            self.stats.windows_warming_up += 1;
            return (None, band);
        };
        self.stats.windows_scored += 1;
        w.score = Some(score);
        match score.severity {
            Severity::Normal => return (None, band),
            Severity::Warning => self.stats.window_alerts_warning += 1,
            Severity::Critical => self.stats.window_alerts_critical += 1,
        }
        tracing::debug!(
            series = %w.series,
            window_start_ms = w.start_ms,
            z = score.z,
            severity = score.severity.as_str(),
            "window anomaly"
        );
        let alert = Alert {
            agent: self.agent.clone(),
            series: w.series.clone(),
            kind: AlertKind::Window,
            time_ms: w.start_ms,
            window_start_ms: w.start_ms,
            value: w.mean,
            score,
            unit: w.unit.clone(),
        };
        (Some(alert), band)
    }

    /// Brings the history of the series of `readings` into the cache: pass
    /// those whose window closes next (the hint
    /// [`WindowEngine::warm`](crate::window::WindowEngine::warm) returns), so
    /// the scoring of their windows finds them there. Changes nothing.
    #[inline]
    pub fn warm<'r>(&self, readings: impl Iterator<Item = &'r Reading> + Clone) {
        let sum = self
            .series
            .warm(readings.map(|r| (&r.series, ())), |(), h| {
                let latest = h.windows.back().map_or(0, |(m, _)| m.to_bits());
                h.baseline
                    .map_or(0, |b| b.mean.to_bits())
                    .wrapping_add(latest)
            });
        std::hint::black_box(sum);
    }

    /// The spike check of one accepted reading (in the window starting at
    /// `window_start_ms`) against the current baseline of its series. Returns
    /// a spike alert at most once per series and window; nothing during
    /// warm-up, for unknown series, or when `spike-alerts` is off.
    #[inline]
    pub fn check_reading(&mut self, r: &Reading, window_start_ms: UnixMs) -> Option<Alert> {
        if !self.cfg.spike_alerts {
            return None;
        }
        let history = self.series.get_mut(&r.series)?;
        let b = history.baseline?;
        if !r.value.is_finite() || (r.value - b.mean).abs() < b.spike_band {
            return None;
        }
        if history.last_spike_window_ms == Some(window_start_ms) {
            return None;
        }
        history.last_spike_window_ms = Some(window_start_ms);
        let z = (r.value - b.mean) / b.spike_divisor;
        let score = AnomalyScore {
            z,
            baseline_mean: b.mean,
            baseline_stddev: b.spike_spread,
            p_value: two_sided_p(&self.normal, z),
            severity: severity(&self.cfg, z),
        };
        self.stats.spike_alerts += 1;
        tracing::debug!(
            series = %r.series,
            time_ms = r.time_ms,
            z,
            "spike"
        );
        Some(Alert {
            agent: self.agent.clone(),
            series: r.series.clone(),
            kind: AlertKind::Spike,
            time_ms: r.time_ms,
            window_start_ms,
            value: r.value,
            score,
            unit: r.unit.clone(),
        })
    }
}

/// The readings `check_reading` looks at past its band test: none without a
/// baseline or with spike alerts off.
fn spike_band(cfg: &AnomalyConfig, baseline: Option<Baseline>) -> WatchBand {
    match baseline {
        Some(b) if cfg.spike_alerts => WatchBand::Outside {
            center: b.mean,
            half_width: b.spike_band,
        },
        _ => WatchBand::Nothing,
    }
}

fn severity(cfg: &AnomalyConfig, z: f64) -> Severity {
    let magnitude = z.abs();
    if magnitude >= cfg.critical_z {
        Severity::Critical
    } else if magnitude >= cfg.warning_z {
        Severity::Warning
    } else {
        Severity::Normal
    }
}

fn two_sided_p(normal: &Normal, z: f64) -> f64 {
    (2.0 * normal.sf(z.abs())).clamp(0.0, 1.0)
}

/// μ, σ and the spike band over the history, once it holds `warm-up` windows.
fn baseline(cfg: &AnomalyConfig, spike_z: f64, windows: &VecDeque<(f64, f64)>) -> Option<Baseline> {
    let n = windows.len();
    if n < cfg.warm_up || n < 2 {
        return None;
    }
    let nf = n as f64;
    let mean = windows.iter().map(|&(m, _)| m).sum::<f64>() / nf;
    let sum_sq = windows
        .iter()
        .map(|&(m, _)| (m - mean) * (m - mean))
        .sum::<f64>();
    let stddev = (sum_sq / (nf - 1.0)).sqrt();
    let mean_variance = windows.iter().map(|&(_, v)| v).sum::<f64>() / nf;
    let spike_spread = (stddev * stddev + mean_variance).sqrt();
    let floor = cfg.sigma_floor.max(cfg.sigma_floor_relative * mean.abs());
    let spike_divisor = spike_spread.max(floor);
    Some(Baseline {
        mean,
        stddev,
        divisor: stddev.max(floor),
        spike_spread,
        spike_divisor,
        spike_band: spike_z * spike_divisor,
    })
}
