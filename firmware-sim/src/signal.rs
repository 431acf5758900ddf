//! Deterministic simulated signals with injected anomalies.
//!
//! A [`Signal`] is a *pure function* of `(seed, series, event time)`: the same
//! seed always yields the same reading for the same series at the same
//! millisecond, whichever process, thread or sampler asks. Tests use this to
//! recompute any value the simulator served or published, and
//! [`Signal::mean_over`] predicts the mean a sampler at a fixed period sees in
//! a window — what the agent's window engine must report.
//!
//! The value at time `t` (milliseconds since the simulation start `s`) is
//!
//! ```text
//! offset + amplitude · sin(2π t / period) + drift_per_hour · t / 1 h + N(0, noise_stddev) + anomalies
//! ```
//!
//! where the normal noise is drawn from a SplitMix64 hash of
//! `seed ^ fnv1a(series) ^ mix(t_ms)` through Box–Muller. No state is kept, so
//! nothing here allocates or locks on the read path.
//!
//! What it is not: a physical process model. There is no inertia or coupling
//! between series; anomalies are added on top of the clean signal exactly as
//! configured so a detector's output can be checked against them.
//!
//! ```
//! use std::time::Duration;
//! use millrace_sim::signal::{Anomaly, AnomalyKind, Signal};
//!
//! let start_ms = 1_700_000_000_000;
//! let signal = Signal {
//!     offset: 80.0,
//!     amplitude: 5.0,
//!     period: Duration::from_secs(60),
//!     noise_stddev: 0.2,
//!     drift_per_hour: 0.0,
//!     start_ms,
//!     anomalies: vec![Anomaly {
//!         kind: AnomalyKind::Dropout,
//!         from: Duration::from_secs(60),
//!         duration: Duration::from_secs(10),
//!         every: None,
//!     }],
//! };
//! let a = signal.value_at(7, "press-1/temperature", start_ms + 1_000);
//! assert_eq!(a, signal.value_at(7, "press-1/temperature", start_ms + 1_000));
//! assert_eq!(signal.value_at(7, "press-1/temperature", start_ms + 65_000), None);
//! ```

use std::f64::consts::TAU;
use std::time::Duration;

const MS_PER_HOUR: f64 = 3_600_000.0;

/// One simulated series: a sine with noise and linear drift, plus anomalies.
///
/// Times in anomalies are offsets from `start_ms`, the simulation start.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// Mean level of the clean signal, in the series' engineering unit.
    pub offset: f64,
    /// Sine amplitude (0 for a flat signal).
    pub amplitude: f64,
    /// Sine period; a zero period disables the sine term.
    pub period: Duration,
    /// Standard deviation of the Gaussian noise (0 for none).
    pub noise_stddev: f64,
    /// Linear drift per hour since the simulation start (a counter uses this:
    /// 100 Wh per second is `drift_per_hour = 360_000`).
    pub drift_per_hour: f64,
    /// Simulation start, Unix milliseconds; the phase, drift and anomaly
    /// times are measured from here.
    pub start_ms: i64,
    /// Injected anomalies, applied in the order: dropout, stuck, then the
    /// additive ones (spike, step).
    pub anomalies: Vec<Anomaly>,
}

/// An injected anomaly, active during `[from, from + duration)` after the
/// simulation start and, with `every`, again every `every` after that.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    /// Offset of the first occurrence from the simulation start.
    pub from: Duration,
    /// Length of one occurrence. For a spike this is one sample period of the
    /// source that reports the series, so exactly one sample carries it.
    pub duration: Duration,
    /// Repeat period; `None` for a single occurrence.
    pub every: Option<Duration>,
}

/// What an anomaly does to the signal while it is active.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnomalyKind {
    /// `+magnitude` on one sample.
    Spike { magnitude: f64 },
    /// `+magnitude` for the whole occurrence.
    Step { magnitude: f64 },
    /// The value is frozen at its value at the start of the occurrence.
    Stuck,
    /// No value at all.
    Dropout,
}

impl Anomaly {
    /// Start (ms since simulation start) of the occurrence active at
    /// `elapsed_ms`, if any.
    fn active_occurrence(&self, elapsed_ms: i64) -> Option<i64> {
        let from_ms = duration_ms(self.from);
        let length_ms = duration_ms(self.duration);
        if elapsed_ms < from_ms || length_ms == 0 {
            return None;
        }
        let since_first = elapsed_ms - from_ms;
        let occurrence_start = match self.every.map(duration_ms) {
            Some(every_ms) if every_ms > 0 => from_ms + since_first - since_first % every_ms,
            _ => from_ms,
        };
        (elapsed_ms < occurrence_start.saturating_add(length_ms)).then_some(occurrence_start)
    }
}

impl Signal {
    /// A flat signal with no noise, useful for constants such as a running coil.
    pub fn constant(value: f64, start_ms: i64) -> Self {
        Self {
            offset: value,
            amplitude: 0.0,
            period: Duration::ZERO,
            noise_stddev: 0.0,
            drift_per_hour: 0.0,
            start_ms,
            anomalies: Vec::new(),
        }
    }

    /// The reading of `series` at event time `t_ms` (Unix ms), or `None`
    /// while a dropout is active. Pure: depends only on the arguments.
    pub fn value_at(&self, seed: u64, series: &str, t_ms: i64) -> Option<f64> {
        let elapsed_ms = t_ms.saturating_sub(self.start_ms);
        if self
            .anomalies
            .iter()
            .any(|a| a.kind == AnomalyKind::Dropout && a.active_occurrence(elapsed_ms).is_some())
        {
            return None;
        }
        // A stuck value is the (non-stuck) value at the start of the occurrence.
        let frozen_at = self
            .anomalies
            .iter()
            .filter(|a| a.kind == AnomalyKind::Stuck)
            .filter_map(|a| a.active_occurrence(elapsed_ms))
            .min();
        let effective_ms = frozen_at.unwrap_or(elapsed_ms);
        let series_hash = fnv1a(series.as_bytes());
        Some(
            self.clean_value(seed, series_hash, effective_ms)
                + self.additive_anomalies(effective_ms),
        )
    }

    /// Mean of the readings a sampler with period `sample_period` produces
    /// over `[start_ms, end_ms)`, with samples at the multiples of the period
    /// since the Unix epoch (how the simulator's publishers and Modbus
    /// refresh clock tick). `None` when no sample falls in the range or all
    /// are dropped out.
    pub fn mean_over(
        &self,
        seed: u64,
        series: &str,
        start_ms: i64,
        end_ms: i64,
        sample_period: Duration,
    ) -> Option<f64> {
        let (count, sum) = self
            .samples(seed, series, start_ms, end_ms, sample_period)
            .fold((0u64, 0.0f64), |(n, s), (_, v)| (n + 1, s + v));
        (count > 0).then(|| sum / count as f64)
    }

    /// The `(t_ms, value)` samples of a sampler with period `sample_period`
    /// over `[start_ms, end_ms)`, skipping dropouts. A zero period yields
    /// nothing.
    pub fn samples<'a>(
        &'a self,
        seed: u64,
        series: &'a str,
        start_ms: i64,
        end_ms: i64,
        sample_period: Duration,
    ) -> impl Iterator<Item = (i64, f64)> + 'a {
        let period_ms = duration_ms(sample_period);
        let first = if period_ms > 0 {
            align_up(start_ms, period_ms)
        } else {
            end_ms
        };
        let step = period_ms.max(1);
        (first..end_ms)
            .step_by(usize::try_from(step).unwrap_or(usize::MAX))
            .filter_map(move |t| self.value_at(seed, series, t).map(|v| (t, v)))
    }

    fn clean_value(&self, seed: u64, series_hash: u64, elapsed_ms: i64) -> f64 {
        let period_ms = duration_ms(self.period);
        let sine = if period_ms > 0 && self.amplitude != 0.0 {
            self.amplitude * (TAU * elapsed_ms as f64 / period_ms as f64).sin()
        } else {
            0.0
        };
        let drift = self.drift_per_hour * elapsed_ms as f64 / MS_PER_HOUR;
        let noise = if self.noise_stddev > 0.0 {
            // Noise is keyed on absolute time so that two simulations with
            // different start times but the same seed still agree per instant.
            let t_abs = self.start_ms.saturating_add(elapsed_ms);
            self.noise_stddev * standard_normal(seed, series_hash, t_abs)
        } else {
            0.0
        };
        self.offset + sine + drift + noise
    }

    fn additive_anomalies(&self, elapsed_ms: i64) -> f64 {
        self.anomalies
            .iter()
            .filter_map(|a| match a.kind {
                AnomalyKind::Spike { magnitude } | AnomalyKind::Step { magnitude } => {
                    a.active_occurrence(elapsed_ms).map(|_| magnitude)
                }
                AnomalyKind::Stuck | AnomalyKind::Dropout => None,
            })
            .sum()
    }
}

/// Rounds `t_ms` up to the next multiple of `period_ms` (floor-based for negatives).
pub fn align_up(t_ms: i64, period_ms: i64) -> i64 {
    let down = align_down(t_ms, period_ms);
    if down == t_ms {
        t_ms
    } else {
        down.saturating_add(period_ms)
    }
}

/// Rounds `t_ms` down to a multiple of `period_ms`; a zero period returns `t_ms`.
pub fn align_down(t_ms: i64, period_ms: i64) -> i64 {
    if period_ms <= 0 {
        return t_ms;
    }
    t_ms - t_ms.rem_euclid(period_ms)
}

/// Milliseconds of a duration, saturating at `i64::MAX`.
pub fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// FNV-1a, 64 bit: a stable hash of the series name (std's hasher is not
/// guaranteed stable across releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// One SplitMix64 step: a strong 64-bit mixer.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A standard normal deviate keyed on `(seed, series, t_ms)` via Box–Muller.
fn standard_normal(seed: u64, series_hash: u64, t_ms: i64) -> f64 {
    let key = seed ^ series_hash ^ splitmix64(t_ms as u64);
    let a = splitmix64(key);
    let b = splitmix64(a);
    // u1 in (0, 1], u2 in [0, 1): 53 random bits each.
    let u1 = ((a >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// A small seeded generator for fault decisions (exception rate, malformed
/// payloads): SplitMix64 as a stream.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.state.wrapping_sub(0x9e37_79b9_7f4a_7c15))
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: i64 = 1_700_000_000_000;
    const SERIES: &str = "press-1/temperature";

    fn base() -> Signal {
        Signal {
            offset: 80.0,
            amplitude: 5.0,
            period: Duration::from_secs(60),
            noise_stddev: 0.2,
            drift_per_hour: 0.0,
            start_ms: START,
            anomalies: Vec::new(),
        }
    }

    fn quiet() -> Signal {
        Signal {
            amplitude: 0.0,
            noise_stddev: 0.0,
            ..base()
        }
    }

    fn anomaly(kind: AnomalyKind, from_s: u64, dur_ms: u64, every_s: Option<u64>) -> Anomaly {
        Anomaly {
            kind,
            from: Duration::from_secs(from_s),
            duration: Duration::from_millis(dur_ms),
            every: every_s.map(Duration::from_secs),
        }
    }

    #[test]
    fn same_inputs_give_same_value_across_instances() {
        let a = base();
        let b = base();
        for t in (START..START + 10_000).step_by(37) {
            assert_eq!(a.value_at(42, SERIES, t), b.value_at(42, SERIES, t));
        }
        // Evaluation order does not matter: no hidden state.
        let forward: Vec<_> = (0..100)
            .map(|i| a.value_at(42, SERIES, START + i * 100))
            .collect();
        let backward: Vec<_> = (0..100)
            .rev()
            .map(|i| a.value_at(42, SERIES, START + i * 100))
            .collect();
        assert_eq!(forward, backward.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn seed_and_series_change_the_noise() {
        let s = base();
        let t = START + 1234;
        assert_ne!(s.value_at(1, SERIES, t), s.value_at(2, SERIES, t));
        assert_ne!(
            s.value_at(1, SERIES, t),
            s.value_at(1, "press-1/pressure", t)
        );
    }

    #[test]
    fn value_matches_formula_without_noise() {
        let s = Signal {
            noise_stddev: 0.0,
            drift_per_hour: 36.0,
            ..base()
        };
        let t = START + 15_000; // quarter period: sin = 1
        let v = s.value_at(9, SERIES, t).unwrap();
        let expected = 80.0 + 5.0 + 36.0 * 15_000.0 / 3_600_000.0;
        assert!((v - expected).abs() < 1e-9, "{v} vs {expected}");
    }

    #[test]
    fn noise_has_the_configured_spread() {
        let s = Signal {
            amplitude: 0.0,
            ..base()
        };
        let n = 20_000;
        let values: Vec<f64> = (0..n)
            .map(|i| s.value_at(3, SERIES, START + i * 100).unwrap())
            .collect();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!((mean - 80.0).abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.2).abs() < 0.01, "stddev {}", var.sqrt());
    }

    #[test]
    fn spike_hits_one_sample_and_repeats() {
        let s = Signal {
            anomalies: vec![anomaly(
                AnomalyKind::Spike { magnitude: 40.0 },
                45,
                1000,
                Some(45),
            )],
            ..quiet()
        };
        let at = |sec: i64| s.value_at(1, SERIES, START + sec * 1000).unwrap();
        assert_eq!(at(44), 80.0);
        assert_eq!(at(45), 120.0);
        assert_eq!(at(46), 80.0);
        assert_eq!(at(90), 120.0);
        assert_eq!(at(135), 120.0);
        assert_eq!(at(0), 80.0);
        // Exactly one 1 s sample per occurrence.
        let hits = (0..180).filter(|&sec| at(sec) > 100.0).count();
        assert_eq!(hits, 3);
    }

    #[test]
    fn step_adds_during_interval_only() {
        let s = Signal {
            anomalies: vec![anomaly(
                AnomalyKind::Step { magnitude: 30.0 },
                120,
                30_000,
                None,
            )],
            ..quiet()
        };
        let at = |ms: i64| s.value_at(1, SERIES, START + ms).unwrap();
        assert_eq!(at(119_999), 80.0);
        assert_eq!(at(120_000), 110.0);
        assert_eq!(at(149_999), 110.0);
        assert_eq!(at(150_000), 80.0);
    }

    #[test]
    fn stuck_freezes_the_value_at_the_start() {
        let s = Signal {
            anomalies: vec![anomaly(AnomalyKind::Stuck, 200, 30_000, None)],
            ..base()
        };
        let frozen = s.value_at(5, SERIES, START + 200_000).unwrap();
        for ms in (200_000..230_000).step_by(777) {
            assert_eq!(s.value_at(5, SERIES, START + ms).unwrap(), frozen);
        }
        let after = s.value_at(5, SERIES, START + 230_000).unwrap();
        assert_ne!(after, frozen);
        assert_eq!(after, base().value_at(5, SERIES, START + 230_000).unwrap());
    }

    #[test]
    fn dropout_yields_none_during_interval() {
        let s = Signal {
            anomalies: vec![anomaly(AnomalyKind::Dropout, 60, 10_000, None)],
            ..base()
        };
        assert!(s.value_at(1, SERIES, START + 59_999).is_some());
        assert!(s.value_at(1, SERIES, START + 60_000).is_none());
        assert!(s.value_at(1, SERIES, START + 69_999).is_none());
        assert!(s.value_at(1, SERIES, START + 70_000).is_some());
    }

    #[test]
    fn mean_over_matches_a_manual_sampler() {
        let s = Signal {
            anomalies: vec![anomaly(AnomalyKind::Dropout, 2, 500, None)],
            ..base()
        };
        let (from, to) = (START + 1_000, START + 6_000);
        let period = Duration::from_millis(100);
        let manual: Vec<f64> = (from..to)
            .filter(|t| t % 100 == 0)
            .filter_map(|t| s.value_at(11, SERIES, t))
            .collect();
        assert_eq!(manual.len(), 45);
        let expected = manual.iter().sum::<f64>() / manual.len() as f64;
        let got = s.mean_over(11, SERIES, from, to, period).unwrap();
        assert!((got - expected).abs() < 1e-12);
        assert_eq!(s.mean_over(11, SERIES, from, from, period), None);
    }

    #[test]
    fn alignment_handles_negative_times() {
        assert_eq!(align_down(-1, 100), -100);
        assert_eq!(align_up(-1, 100), 0);
        assert_eq!(align_up(101, 100), 200);
        assert_eq!(align_down(5, 0), 5);
    }
}
