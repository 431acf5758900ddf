use super::*;
use crate::window::{Admission, EngineOutput, WindowConfig, WindowEngine};
use millrace_protocol::{Quality, Source};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const AGENT: &str = "gw-test";

fn key() -> SeriesKey {
    SeriesKey::new("plc-1", "pressure")
}

fn window(start_ms: UnixMs, mean: f64, stddev: f64) -> Window {
    Window {
        agent: AGENT.into(),
        series: key(),
        start_ms,
        end_ms: start_ms + 5_000,
        count: 50,
        mean,
        min: mean - 3.0 * stddev,
        max: mean + 3.0 * stddev,
        stddev,
        first_event_ms: start_ms,
        last_event_ms: start_ms + 4_900,
        unit: "bar".into(),
        score: None,
    }
}

fn reading(time_ms: UnixMs, value: f64) -> Reading {
    Reading {
        series: key(),
        time_ms,
        value,
        unit: "bar".into(),
        source: Source::Mqtt,
        quality: Quality::Good,
    }
}

/// Sample stddev, the way the baseline computes it.
fn mean_and_sample_stddev(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Standard normal noise by Box–Muller, from a seeded generator.
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// What the pipeline does with one reading: push it, score every window it
/// closes, then spike-check it if accepted.
/// As the agent's pipeline does, a reading is spike-checked only when the
/// engine flags it outside the band the scorer set; `check_all` checks every
/// accepted reading instead, the reference the band must agree with.
struct Pipeline {
    engine: WindowEngine,
    scorer: Scorer,
    out: Vec<EngineOutput>,
    windows: Vec<Window>,
    alerts: Vec<Alert>,
    check_all: bool,
    accepted: u64,
    checked: u64,
}

impl Pipeline {
    fn new(cfg: AnomalyConfig) -> Self {
        Self {
            engine: WindowEngine::new(AGENT, WindowConfig::default()),
            scorer: Scorer::new(AGENT, cfg),
            out: Vec::new(),
            windows: Vec::new(),
            alerts: Vec::new(),
            check_all: false,
            accepted: 0,
            checked: 0,
        }
    }

    fn push(&mut self, r: &Reading) {
        let admission = self.engine.push(r, r.time_ms, &mut self.out);
        for o in self.out.drain(..) {
            if let EngineOutput::Window(mut w) = o {
                let (alert, band) = self.scorer.score_window_and_band(&mut w);
                self.engine.set_watch_band(&w.series, band);
                self.alerts.extend(alert);
                self.windows.push(w);
            }
        }
        if let Admission::Accepted {
            window_start_ms,
            watch,
        } = admission
        {
            self.accepted += 1;
            if !watch && !self.check_all {
                return;
            }
            self.checked += 1;
            self.alerts
                .extend(self.scorer.check_reading(r, window_start_ms));
        }
    }

    fn spikes(&self) -> Vec<&Alert> {
        self.alerts
            .iter()
            .filter(|a| a.kind == AlertKind::Spike)
            .collect()
    }
}

#[test]
fn no_score_during_warm_up() {
    let cfg = AnomalyConfig::default();
    let mut scorer = Scorer::new(AGENT, cfg.clone());
    for i in 0..cfg.warm_up as i64 {
        assert_eq!(
            scorer.check_reading(&reading(i * 5_000, 1e9), i * 5_000),
            None
        );
        let mut w = window(i * 5_000, 10.0 + (i % 2) as f64, 0.1);
        assert_eq!(scorer.score_window(&mut w), None);
        assert_eq!(w.score, None, "window {i} is still warm-up");
    }
    let mut w = window(100_000, 10.5, 0.1);
    scorer.score_window(&mut w);
    assert!(w.score.is_some(), "scored once warm-up windows have closed");
    assert_eq!(scorer.stats().windows_warming_up, cfg.warm_up as u64);
    assert_eq!(scorer.stats().windows_scored, 1);
}

#[test]
fn warning_and_critical_thresholds() {
    let history: Vec<f64> = (0..12)
        .map(|i| if i % 2 == 0 { 9.0 } else { 11.0 })
        .collect();
    let (mu, sigma) = mean_and_sample_stddev(&history);
    let mut totals = ScorerStats::default();
    // Each probe is scored by a scorer holding the same twelve windows.
    let mut probe = |z: f64| {
        let mut scorer = Scorer::new(AGENT, AnomalyConfig::default());
        for (i, m) in history.iter().enumerate() {
            scorer.score_window(&mut window(i as i64 * 5_000, *m, 0.5));
        }
        let mut w = window(100_000, mu + z * sigma, 0.5);
        let alert = scorer.score_window(&mut w);
        totals.window_alerts_warning += scorer.stats().window_alerts_warning;
        totals.window_alerts_critical += scorer.stats().window_alerts_critical;
        (w.score.unwrap(), alert)
    };

    let (s, alert) = probe(2.9);
    assert_eq!(s.severity, Severity::Normal);
    assert!(alert.is_none());
    assert!((s.z - 2.9).abs() < 1e-9);
    assert!((s.baseline_mean - mu).abs() < 1e-12);
    assert!((s.baseline_stddev - sigma).abs() < 1e-12);

    let (s, alert) = probe(-4.0);
    assert_eq!(s.severity, Severity::Warning);
    let alert = alert.unwrap();
    assert_eq!(
        (alert.kind, alert.score.severity),
        (AlertKind::Window, Severity::Warning)
    );
    assert_eq!((alert.time_ms, alert.window_start_ms), (100_000, 100_000));
    assert_eq!(&*alert.unit, "bar");
    assert!((alert.score.z + 4.0).abs() < 1e-9);

    let (s, alert) = probe(6.0);
    assert_eq!(s.severity, Severity::Critical);
    assert_eq!(alert.unwrap().score.severity, Severity::Critical);
    assert_eq!(totals.window_alerts_warning, 1);
    assert_eq!(totals.window_alerts_critical, 1);
}

#[test]
fn p_value_is_two_sided_normal() {
    let normal = Normal::standard();
    assert!((two_sided_p(&normal, 0.0) - 1.0).abs() < 1e-12);
    assert!((two_sided_p(&normal, 1.959_963_985) - 0.05).abs() < 1e-6);
    assert!((two_sided_p(&normal, -1.959_963_985) - 0.05).abs() < 1e-6);
    assert_eq!(two_sided_p(&normal, 1e6), 0.0);
}

#[test]
fn stuck_sensor_never_divides_by_zero_or_alarms() {
    for level in [42.0, 0.0, -3.5e6] {
        let mut scorer = Scorer::new(AGENT, AnomalyConfig::default());
        for i in 0..1_000i64 {
            let mut w = window(i * 5_000, level, 0.0);
            assert_eq!(
                scorer.score_window(&mut w),
                None,
                "level {level} window {i}"
            );
            if let Some(s) = w.score {
                assert!(s.z.is_finite() && s.p_value.is_finite(), "{s:?}");
                assert_eq!(s.z, 0.0);
                assert_eq!(s.severity, Severity::Normal);
            }
            assert_eq!(
                scorer.check_reading(&reading(i * 5_000, level), i * 5_000),
                None
            );
        }
        // Float noise far below the relative floor does not alarm either.
        let mut w = window(10_000_000, level + level.abs() * 1e-12 + 1e-12, 0.0);
        assert_eq!(scorer.score_window(&mut w), None);
        assert_eq!(w.score.unwrap().severity, Severity::Normal);
    }

    // A stuck sensor that really moves is reported once, not on every window after.
    let mut scorer = Scorer::new(AGENT, AnomalyConfig::default());
    let mut alerts = Vec::new();
    for i in 0..100i64 {
        let level = if i < 50 { 20.0 } else { 21.0 };
        alerts.extend(scorer.score_window(&mut window(i * 5_000, level, 0.0)));
    }
    assert!(alerts.len() <= 2, "alert storm: {alerts:?}");
    assert_eq!(alerts[0].score.severity, Severity::Critical);
    assert_eq!(alerts[0].window_start_ms, 50 * 5_000);
}

#[test]
fn spike_alert_fires_once_per_window_before_it_closes() {
    let mut p = Pipeline::new(AnomalyConfig::default());
    let mut rng = StdRng::seed_from_u64(7);
    // 2 minutes of 10 Hz readings, mean 100, noise σ = 1.
    let mut t = 0;
    while t < 120_000 {
        p.push(&reading(t, 100.0 + gaussian(&mut rng)));
        t += 100;
    }
    assert!(p.spikes().is_empty());
    let windows_before = p.windows.len();

    p.push(&reading(t, 110.0)); // 10σ above the baseline
    let spikes = p.spikes();
    assert_eq!(spikes.len(), 1, "raised at once, before the window closes");
    assert_eq!(p.windows.len(), windows_before, "its window is still open");
    let spike = spikes[0];
    assert_eq!(spike.score.severity, Severity::Critical);
    assert_eq!(
        (spike.time_ms, spike.window_start_ms, spike.value),
        (t, 120_000, 110.0)
    );
    assert!(
        spike.score.z > 5.0 && spike.score.p_value < 1e-6,
        "{:?}",
        spike.score
    );

    p.push(&reading(t + 100, 111.0));
    assert_eq!(
        p.spikes().len(),
        1,
        "at most one spike alert per series and window"
    );
    p.push(&reading(t + 5_000, 112.0)); // next window
    assert_eq!(p.spikes().len(), 2);
}

#[test]
fn ordinary_noise_raises_no_spike_over_ten_thousand_readings() {
    let mut p = Pipeline::new(AnomalyConfig::default());
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for i in 0..10_000i64 {
        p.push(&reading(
            1_700_000_000_000 + i * 100,
            55.0 + 2.0 * gaussian(&mut rng),
        ));
    }
    assert!(p.windows.len() >= 190);
    assert!(p.windows.iter().filter(|w| w.score.is_some()).count() > 180);
    assert_eq!(p.spikes().len(), 0, "{:?}", p.spikes());
    assert_eq!(p.scorer.stats().window_alerts_critical, 0);
}

#[test]
fn spike_alerts_can_be_turned_off() {
    let cfg = AnomalyConfig {
        spike_alerts: false,
        ..AnomalyConfig::default()
    };
    let mut scorer = Scorer::new(AGENT, cfg);
    for i in 0..12 {
        scorer.score_window(&mut window(i * 5_000, 10.0 + (i % 2) as f64, 1.0));
    }
    assert_eq!(scorer.check_reading(&reading(60_000, 1e6), 60_000), None);
}

/// A step of 10σ (σ = reading noise) in a noisy sine is critical in the first
/// window after the step.
///
/// Readings at 10 Hz (50 per window) with noise σ = 1 on a sine of amplitude 5
/// and period 10 minutes. The sine is what makes this meaningful: at its
/// steepest it moves the window means by ≈0.26 per window, so over the
/// one-minute history the trend alone inflates σ of the means to ≈0.95,
/// almost seven times the pure noise of a mean (1/√50 ≈ 0.14), and
/// extrapolating that trend one window ahead only reaches z ≈ 1.8, below the
/// warning level. The step is placed at the upward zero crossing (t = 10 min,
/// a window boundary), the worst case for detection: a 10σ step must still give
/// z ≈ 10/0.95 + 1.8 ≈ 12, well above critical, while the 20 windows of pure
/// sine before it raise nothing critical.
#[test]
fn step_of_ten_sigma_in_noisy_sine_is_critical_in_first_window_after_it() {
    const NOISE_SIGMA: f64 = 1.0;
    const AMPLITUDE: f64 = 5.0;
    const PERIOD_MS: f64 = 600_000.0;
    const STEP_AT_MS: i64 = 600_000;
    let mut p = Pipeline::new(AnomalyConfig::default());
    let mut rng = StdRng::seed_from_u64(42);
    for i in 0..(STEP_AT_MS / 100 + 50) {
        let t = i * 100;
        let phase = std::f64::consts::TAU * t as f64 / PERIOD_MS;
        let step = if t >= STEP_AT_MS {
            10.0 * NOISE_SIGMA
        } else {
            0.0
        };
        let v = 50.0 + AMPLITUDE * phase.sin() + NOISE_SIGMA * gaussian(&mut rng) + step;
        p.push(&reading(t, v));
    }
    p.push(&reading(STEP_AT_MS + 7_000, 60.0)); // watermark passes the step window
    let before: Vec<_> = p
        .windows
        .iter()
        .filter(|w| w.start_ms < STEP_AT_MS)
        .collect();
    assert!(before
        .iter()
        .all(|w| w.score.is_none_or(|s| s.severity != Severity::Critical)));
    assert!(
        before[before.len() - 12..]
            .iter()
            .all(|w| w.score.unwrap().z.abs() < 3.0),
        "the sine trend alone stays below warning"
    );
    let first_after = p.windows.iter().find(|w| w.start_ms == STEP_AT_MS).unwrap();
    let score = first_after.score.unwrap();
    assert_eq!(score.severity, Severity::Critical, "{score:?}");
    assert!(score.z > 8.0, "{score:?}");
    let window_alert = p
        .alerts
        .iter()
        .find(|a| a.kind == AlertKind::Window && a.window_start_ms == STEP_AT_MS)
        .unwrap();
    assert_eq!(window_alert.score.severity, Severity::Critical);
    // The spike check saw it within the window, well before it closed.
    let spike = p
        .spikes()
        .into_iter()
        .find(|a| a.window_start_ms == STEP_AT_MS)
        .unwrap();
    assert!(spike.time_ms < STEP_AT_MS + 5_000);
}

#[test]
fn forget_and_series_cap_bound_the_state() {
    let mut scorer = Scorer::new(AGENT, AnomalyConfig::default()).with_max_series(2);
    for device in ["a", "b", "c"] {
        let mut w = window(0, 1.0, 0.1);
        w.series = SeriesKey::new(device, "t");
        scorer.score_window(&mut w);
    }
    assert_eq!(scorer.live_series(), 2);
    assert_eq!(scorer.stats().series_rejected_cap, 1);
    scorer.forget(&SeriesKey::new("a", "t"));
    assert_eq!(scorer.live_series(), 1);
    assert_eq!(scorer.stats().live_series, 1);
    let mut w = window(0, 1.0, 0.1);
    w.series = SeriesKey::new("c", "t");
    scorer.score_window(&mut w);
    assert_eq!(scorer.live_series(), 2);
}

#[test]
fn config_parses_and_validate_names_the_key() {
    let cfg: AnomalyConfig = toml::from_str(
        r#"
        history = 24
        warm-up = 12
        warning-z = 2.5
        critical-z = 4.0
        sigma-floor = 0.01
        sigma-floor-relative = 0.0
        spike-alerts = false
        spike-min-severity = "warning"
        "#,
    )
    .unwrap();
    cfg.validate().unwrap();
    assert_eq!((cfg.history, cfg.warm_up), (24, 12));
    assert_eq!(cfg.spike_min_severity, Severity::Warning);
    assert!(toml::from_str::<AnomalyConfig>("warmup = 3").is_err());

    let bad = |f: fn(&mut AnomalyConfig)| {
        let mut c = AnomalyConfig::default();
        f(&mut c);
        c.validate().unwrap_err().key
    };
    AnomalyConfig::default().validate().unwrap();
    assert_eq!(bad(|c| c.history = 1), "history");
    assert_eq!(bad(|c| c.warm_up = 13), "warm-up");
    assert_eq!(bad(|c| c.warm_up = 1), "warm-up");
    assert_eq!(bad(|c| c.warning_z = f64::NAN), "warning-z");
    assert_eq!(bad(|c| c.critical_z = 2.0), "critical-z");
    assert_eq!(bad(|c| c.sigma_floor = 0.0), "sigma-floor");
    assert_eq!(
        bad(|c| c.sigma_floor_relative = -1.0),
        "sigma-floor-relative"
    );
    assert_eq!(
        bad(|c| c.spike_min_severity = Severity::Normal),
        "spike-min-severity"
    );
}

/// A scorer resumed from a snapshot scores the next window exactly as the
/// scorer that never stopped, with no second warm-up.
#[test]
fn a_restored_scorer_scores_like_the_one_that_never_stopped() {
    let cfg = AnomalyConfig::default();
    let mut running = Scorer::new(AGENT, cfg.clone());
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..20 {
        let mut w = window(i * 5_000, 100.0 + gaussian(&mut rng), 0.5);
        running.score_window(&mut w);
    }
    let snapshot = running.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].1.len(), cfg.history);

    let mut resumed = Scorer::new(AGENT, cfg.clone());
    assert!(resumed.restore(snapshot[0].0.clone(), &snapshot[0].1));
    // Already held: left alone.
    assert!(!resumed.restore(snapshot[0].0.clone(), &snapshot[0].1));
    let (mut a, mut b) = (window(100_000, 104.0, 0.5), window(100_000, 104.0, 0.5));
    let alert_a = running.score_window(&mut a);
    let alert_b = resumed.score_window(&mut b);
    assert!(b.score.is_some(), "scored at once, no warm-up");
    assert_eq!(a.score, b.score);
    assert_eq!(alert_a.is_some(), alert_b.is_some());
}

#[test]
fn restore_keeps_the_newest_history_and_drops_bad_entries() {
    let cfg = AnomalyConfig::default();
    let mut s = Scorer::new(AGENT, cfg.clone());
    let mut saved: Vec<(f64, f64)> = (0..30).map(|i| (f64::from(i), 0.25)).collect();
    saved.push((f64::NAN, 0.25));
    saved.push((1.0, f64::INFINITY));
    assert!(s.restore(key(), &saved));
    let back = s.snapshot();
    assert_eq!(back[0].1.len(), cfg.history);
    assert_eq!(back[0].1.last(), Some(&(29.0, 0.25)));
    // Nothing usable: not restored.
    let mut empty = Scorer::new(AGENT, cfg);
    assert!(!empty.restore(key(), &[(f64::NAN, 0.0)]));
    assert_eq!(empty.live_series(), 0);
}

/// The spike band lets the pipeline skip the scorer for readings that cannot
/// be spikes: over noisy streams with spikes, steps and a stuck stretch, the
/// alerts are exactly those of checking every accepted reading, and most
/// readings are not checked at all.
#[test]
fn the_spike_band_skips_only_readings_that_cannot_alert() {
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut banded = Pipeline::new(AnomalyConfig::default());
        let mut every = Pipeline::new(AnomalyConfig::default());
        every.check_all = true;
        let mut level = 100.0;
        for i in 0..4_000i64 {
            let t = 1_000_000 + i * 100 + rng.random_range(-300..=300);
            if rng.random_range(0..500) == 0 {
                level += rng.random_range(-20.0..20.0); // a step
            }
            let mut v = if (2_000..2_300).contains(&i) {
                level // stuck
            } else {
                level + gaussian(&mut rng)
            };
            if rng.random_range(0..200) == 0 {
                v += rng.random_range(-40.0..40.0); // a spike
            }
            let r = reading(t, v);
            banded.push(&r);
            every.push(&r);
        }
        let spikes = |p: &Pipeline| -> Vec<(UnixMs, u64)> {
            p.alerts
                .iter()
                .filter(|a| a.kind == AlertKind::Spike)
                .map(|a| (a.time_ms, a.value.to_bits()))
                .collect()
        };
        assert!(
            !spikes(&every).is_empty(),
            "seed {seed}: the stream has spikes"
        );
        assert_eq!(spikes(&banded), spikes(&every), "seed {seed}");
        assert_eq!(banded.alerts.len(), every.alerts.len(), "seed {seed}");
        assert_eq!(every.checked, every.accepted);
        assert!(
            banded.accepted > 3_000 && banded.checked * 10 < banded.accepted,
            "seed {seed}: {} of {} checked",
            banded.checked,
            banded.accepted
        );
    }
}
