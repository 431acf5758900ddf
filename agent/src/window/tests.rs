use super::*;
use millrace_protocol::{Quality, Source};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

const AGENT: &str = "gw-test";

fn reading(device: &str, time_ms: UnixMs, value: f64) -> Reading {
    Reading {
        series: SeriesKey::new(device, "temp"),
        time_ms,
        value,
        unit: "degC".into(),
        source: Source::Modbus,
        quality: Quality::Good,
    }
}

fn engine_ms(width_ms: u64, lateness_ms: u64) -> WindowEngine {
    let cfg = WindowConfig {
        width: Duration::from_millis(width_ms),
        allowed_lateness: Duration::from_millis(lateness_ms),
        ..WindowConfig::default()
    };
    cfg.validate().unwrap();
    WindowEngine::new(AGENT, cfg)
}

/// Ticks from `from` to `to` (wall clock) in 30 s steps, as the pipeline's
/// timer would: one step of more than a minute is a clock jump.
fn tick_through(engine: &mut WindowEngine, from: UnixMs, to: UnixMs, out: &mut Vec<EngineOutput>) {
    let mut now = from;
    while now < to {
        now = (now + 30_000).min(to);
        engine.tick(now, out);
    }
}

fn windows(out: &[EngineOutput]) -> Vec<&Window> {
    out.iter()
        .filter_map(|o| match o {
            EngineOutput::Window(w) => Some(w),
            _ => None,
        })
        .collect()
}

fn dead_reasons(out: &[EngineOutput]) -> Vec<DeadLetterReason> {
    out.iter()
        .filter_map(|o| match o {
            EngineOutput::DeadLetter(d) => Some(d.reason),
            _ => None,
        })
        .collect()
}

#[test]
fn alignment_is_epoch_based_and_floors_negative_times() {
    let w = 5_000;
    assert_eq!(window_start_ms(0, w), Some(0));
    assert_eq!(window_start_ms(4_999, w), Some(0));
    assert_eq!(window_start_ms(5_000, w), Some(5_000));
    assert_eq!(
        window_start_ms(1_700_000_003_217, w),
        Some(1_700_000_000_000)
    );
    assert_eq!(window_start_ms(-1, w), Some(-5_000));
    assert_eq!(window_start_ms(-5_000, w), Some(-5_000));
    assert_eq!(window_start_ms(-5_001, w), Some(-10_000));
    assert_eq!(window_start_ms(i64::MIN, w), None, "start below i64::MIN");
    assert_eq!(window_start_ms(i64::MAX, w), None, "end above i64::MAX");
    assert_eq!(window_start_ms(10, 0), None);

    let mut engine = engine_ms(5_000, 0);
    let mut out = Vec::new();
    engine.push(&reading("a", -7_000, 1.0), 0, &mut out);
    engine.push(&reading("a", -5_001, 3.0), 0, &mut out);
    engine.push(&reading("a", 0, 9.0), 0, &mut out);
    let ws = windows(&out);
    assert_eq!(ws.len(), 1);
    assert_eq!((ws[0].start_ms, ws[0].end_ms), (-10_000, -5_000));
    assert_eq!((ws[0].count, ws[0].mean), (2, 2.0));
}

#[test]
fn out_of_order_reading_within_lateness_is_accepted() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    for t in [1_000, 4_000, 6_000] {
        engine.push(&reading("a", t, t as f64), t, &mut out);
    }
    // Watermark is 4 000: t = 2 000 is behind it, but its window [0, 5 000) is open.
    let admission = engine.push(&reading("a", 2_000, 2_000.0), 6_100, &mut out);
    assert_eq!(
        admission,
        Admission::Accepted {
            window_start_ms: 0,
            watch: true
        }
    );
    assert!(out.is_empty(), "nothing closed yet: {out:?}");
    // Watermark 4 999 < 5 000: still open.
    engine.push(&reading("a", 6_999, 0.0), 7_000, &mut out);
    assert!(out.is_empty());
    // Watermark 5 000 >= end: closed, with the out-of-order reading in it.
    engine.push(&reading("a", 7_000, 0.0), 7_000, &mut out);
    let ws = windows(&out);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].count, 3);
    assert_eq!((ws[0].first_event_ms, ws[0].last_event_ms), (1_000, 4_000));
    assert_eq!(engine.stats().readings_accepted, 6);
    assert_eq!(engine.stats().readings_late, 0);
}

#[test]
fn reading_for_a_closed_window_is_dead_lettered_late_and_never_reemits() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    engine.push(&reading("a", 1_000, 1.0), 1_000, &mut out);
    engine.push(&reading("a", 7_500, 2.0), 7_500, &mut out);
    assert_eq!(windows(&out).len(), 1);
    out.clear();

    let admission = engine.push(&reading("a", 4_999, 5.0), 7_600, &mut out);
    assert_eq!(admission, Admission::Rejected(DeadLetterReason::Late));
    assert_eq!(dead_reasons(&out), vec![DeadLetterReason::Late]);
    let EngineOutput::DeadLetter(dl) = &out[0] else {
        unreachable!()
    };
    assert_eq!(dl.origin, "a/temp");
    assert_eq!(dl.time_ms, 7_600, "dead letter carries the wall clock");
    assert_eq!(engine.stats().readings_late, 1);

    out.clear();
    engine.flush(&mut out);
    let ws = windows(&out);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].start_ms, 5_000, "only the open window is flushed");
}

#[test]
fn idle_series_windows_close_by_wall_clock() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    engine.push(&reading("a", 1_000, 1.0), 100_000, &mut out);
    engine.push(&reading("a", 5_500, 2.0), 100_000, &mut out);
    engine.tick(105_000, &mut out);
    assert!(out.is_empty(), "exactly idle-timeout is not yet idle");
    engine.tick(105_001, &mut out);
    let ws = windows(&out);
    assert_eq!(
        ws.iter().map(|w| w.start_ms).collect::<Vec<_>>(),
        vec![0, 5_000],
        "all open windows close, in start order"
    );
    assert_eq!(engine.stats().windows_idle_closed, 2);
    assert_eq!(engine.live_series(), 1, "idle is not evicted");

    out.clear();
    let late = engine.push(&reading("a", 9_999, 3.0), 106_000, &mut out);
    assert_eq!(late, Admission::Rejected(DeadLetterReason::Late));
    let next = engine.push(&reading("a", 10_000, 3.0), 106_000, &mut out);
    assert_eq!(
        next,
        Admission::Accepted {
            window_start_ms: 10_000,
            watch: true
        }
    );
    engine.tick(106_500, &mut out);
    assert_eq!(
        windows(&out).len(),
        0,
        "the new reading reset the idle clock"
    );
}

#[test]
fn late_readings_do_not_hold_idle_windows_open() {
    let mut engine = engine_ms(5_000, 0);
    let mut out = Vec::new();
    engine.push(&reading("a", 1_000, 1.0), 0, &mut out);
    engine.push(&reading("a", 5_000, 1.0), 0, &mut out);
    assert_eq!(windows(&out).len(), 1);
    for now in (1_000..=9_000).step_by(1_000) {
        engine.push(&reading("a", 10, 1.0), now, &mut out);
    }
    engine.tick(9_000, &mut out);
    assert_eq!(windows(&out).len(), 2, "late readings are not activity");
}

#[test]
fn every_window_is_emitted_exactly_once_across_push_tick_and_flush() {
    let mut engine = engine_ms(1_000, 500);
    let mut out = Vec::new();
    let mut now = 0;
    for i in 0..200i64 {
        now += 137;
        let t = i * 97 - (i % 7) * 300;
        engine.push(
            &reading(["a", "b", "c"][(i % 3) as usize], t, i as f64),
            now,
            &mut out,
        );
        if i % 41 == 0 {
            now += 10_000;
            engine.tick(now, &mut out); // idle-closes everything open
        }
    }
    engine.flush(&mut out);
    engine.flush(&mut out);
    tick_through(&mut engine, now, now + 1_000_000, &mut out);

    let mut seen = std::collections::HashSet::new();
    for w in windows(&out) {
        assert!(
            seen.insert((w.series.clone(), w.start_ms)),
            "window {}@{} emitted twice",
            w.series,
            w.start_ms
        );
    }
    let s = engine.stats();
    let counted: u64 = windows(&out).iter().map(|w| w.count).sum();
    assert_eq!(counted, s.readings_accepted);
    assert_eq!(s.readings_accepted + s.readings_late, 200);
    assert_eq!(s.windows_emitted, windows(&out).len() as u64);
    assert_eq!(s.series_evicted_ttl, 3);
    assert_eq!(engine.live_series(), 0);
}

#[test]
fn series_cap_dead_letters_new_series_and_frees_up_after_ttl() {
    let cfg = WindowConfig {
        max_series: 2,
        ..WindowConfig::default()
    };
    let ttl_ms = config::duration_ms(cfg.series_ttl);
    let mut engine = WindowEngine::new(AGENT, cfg);
    let mut out = Vec::new();
    engine.push(&reading("a", 0, 1.0), 0, &mut out);
    engine.push(&reading("b", 0, 1.0), 0, &mut out);
    let c = engine.push(&reading("c", 0, 1.0), 0, &mut out);
    assert_eq!(c, Admission::Rejected(DeadLetterReason::SeriesCap));
    assert_eq!(dead_reasons(&out), vec![DeadLetterReason::SeriesCap]);
    assert_eq!(engine.stats().series_rejected_cap, 1);
    assert_eq!(engine.live_series(), 2);
    assert_eq!(engine.stats().live_series, 2);
    // Existing series keep working at the cap.
    assert!(matches!(
        engine.push(&reading("a", 1, 1.0), 1_000, &mut out),
        Admission::Accepted { .. }
    ));

    out.clear();
    tick_through(&mut engine, 1_000, ttl_ms, &mut out);
    assert!(!out
        .iter()
        .any(|o| matches!(o, EngineOutput::SeriesEvicted(_))));
    engine.tick(ttl_ms + 1, &mut out);
    // "b" (last seen at 0) is evicted; its open window is emitted first.
    let evicted: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            EngineOutput::SeriesEvicted(k) => Some(&*k.device),
            _ => None,
        })
        .collect();
    assert_eq!(evicted, vec!["b"]);
    let pos_window = out
        .iter()
        .position(|o| matches!(o, EngineOutput::Window(w) if &*w.series.device == "b"))
        .unwrap();
    let pos_evict = out
        .iter()
        .position(|o| matches!(o, EngineOutput::SeriesEvicted(_)))
        .unwrap();
    assert!(pos_window < pos_evict);
    assert_eq!(engine.stats().series_evicted_ttl, 1);
    assert_eq!(engine.stats().live_series, 1);
    assert!(matches!(
        engine.push(&reading("c", 0, 1.0), ttl_ms + 2, &mut out),
        Admission::Accepted { .. }
    ));
}

#[test]
fn nan_and_infinite_values_are_dead_lettered_without_creating_series() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    engine.push(&reading("a", 0, f64::NAN), 0, &mut out);
    engine.push(&reading("b", 0, f64::INFINITY), 0, &mut out);
    engine.push(&reading("c", 0, f64::NEG_INFINITY), 0, &mut out);
    assert_eq!(
        dead_reasons(&out),
        vec![
            DeadLetterReason::NotANumber,
            DeadLetterReason::Infinite,
            DeadLetterReason::Infinite
        ]
    );
    let s = engine.stats();
    assert_eq!(
        (s.readings_nan, s.readings_infinite, s.readings_accepted),
        (1, 2, 0)
    );
    assert_eq!(engine.live_series(), 0);
    let EngineOutput::DeadLetter(dl) = &out[0] else {
        unreachable!()
    };
    assert!(dl.detail.contains("NaN"), "{}", dl.detail);
}

#[test]
fn unrepresentable_event_time_is_malformed() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    let a = engine.push(&reading("a", i64::MAX, 1.0), 0, &mut out);
    assert_eq!(a, Admission::Rejected(DeadLetterReason::Malformed));
    assert_eq!(engine.stats().readings_time_out_of_range, 1);
    assert_eq!(engine.live_series(), 0);
}

#[test]
fn welford_window_matches_known_values() {
    let mut engine = engine_ms(5_000, 0);
    let mut out = Vec::new();
    // Population stddev of 2,4,4,4,5,5,7,9 is exactly 2; arrival is out of order.
    let values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
    let times = [300, 100, 4_900, 200, 1_000, 50, 2_000, 3_000];
    for (t, v) in times.iter().zip(values) {
        engine.push(&reading("a", 1_000_000 + t, v), 1_000_000, &mut out);
    }
    engine.flush(&mut out);
    let w = windows(&out)[0].clone();
    assert_eq!(&*w.agent, AGENT);
    assert_eq!(&*w.unit, "degC");
    assert_eq!(w.score, None);
    assert_eq!((w.start_ms, w.end_ms), (1_000_000, 1_005_000));
    assert_eq!((w.count, w.min, w.max), (8, 2.0, 9.0));
    assert!((w.mean - 5.0).abs() < 1e-12);
    assert!((w.stddev - 2.0).abs() < 1e-12);
    assert_eq!((w.first_event_ms, w.last_event_ms), (1_000_050, 1_004_900));
}

#[test]
fn config_parses_kebab_case_durations_and_rejects_unknown_keys() {
    let cfg: WindowConfig = toml::from_str(
        r#"
        width = "10s"
        allowed-lateness = "500ms"
        idle-timeout = "3s"
        max-series = 50
        series-ttl = "1h"
        "#,
    )
    .unwrap();
    assert_eq!(cfg.width, Duration::from_secs(10));
    assert_eq!(cfg.allowed_lateness, Duration::from_millis(500));
    assert_eq!(cfg.max_series, 50);
    cfg.validate().unwrap();

    let partial: WindowConfig = toml::from_str("width = \"1s\"").unwrap();
    assert_eq!(partial.idle_timeout, WindowConfig::default().idle_timeout);

    let err = toml::from_str::<WindowConfig>("widht = \"1s\"").unwrap_err();
    assert!(err.to_string().contains("widht"), "{err}");
}

#[test]
fn validate_names_the_offending_key() {
    let bad = |f: fn(&mut WindowConfig)| {
        let mut c = WindowConfig::default();
        f(&mut c);
        c.validate().unwrap_err().key
    };
    WindowConfig::default().validate().unwrap();
    assert_eq!(bad(|c| c.width = Duration::ZERO), "width");
    assert_eq!(bad(|c| c.width = Duration::from_secs(7)), "width");
    assert_eq!(bad(|c| c.width = Duration::from_micros(1_500)), "width");
    assert_eq!(
        bad(|c| c.allowed_lateness = Duration::from_secs(200_000)),
        "allowed-lateness"
    );
    assert_eq!(bad(|c| c.idle_timeout = Duration::ZERO), "idle-timeout");
    assert_eq!(bad(|c| c.max_series = 0), "max-series");
    assert_eq!(bad(|c| c.series_ttl = Duration::from_secs(4)), "series-ttl");
    let msg = WindowConfig {
        width: Duration::from_secs(7),
        ..WindowConfig::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(msg.starts_with("`width`:"), "{msg}");
}

// ---------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------

/// Reference aggregate of one window by the two-pass method.
#[derive(Debug, Default)]
struct Naive {
    values: Vec<f64>,
    times: Vec<UnixMs>,
}

impl Naive {
    fn check(&self, w: &Window) -> Result<(), TestCaseError> {
        let n = self.values.len() as f64;
        let mean = self.values.iter().sum::<f64>() / n;
        let var = self
            .values
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f64>()
            / n;
        let stddev = var.sqrt();
        let min = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self
            .values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        prop_assert_eq!(w.count, self.values.len() as u64);
        prop_assert_eq!(w.min, min);
        prop_assert_eq!(w.max, max);
        prop_assert_eq!(w.first_event_ms, *self.times.iter().min().unwrap());
        prop_assert_eq!(w.last_event_ms, *self.times.iter().max().unwrap());
        prop_assert!(close(w.mean, mean), "mean {} vs two-pass {}", w.mean, mean);
        prop_assert!(
            close(w.stddev, stddev),
            "stddev {} vs two-pass {}",
            w.stddev,
            stddev
        );
        Ok(())
    }
}

/// Within 1e-9 relative (and exactly equal for zero).
fn close(got: f64, want: f64) -> bool {
    got == want || (got - want).abs() <= 1e-9 * want.abs()
}

const DEVICES: [&str; 6] = ["d0", "d1", "d2", "d3", "d4", "d5"];

/// (series, clock advance, jitter, value in thousandths)
type Step = (usize, i64, i64, i32);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0..DEVICES.len(),
            0i64..1_500,
            -7_000i64..=500,
            -1_000_000i32..=1_000_000,
        ),
        1..400,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Out-of-order streams over several series, some readings within the
    /// lateness and some beyond it: the emitted windows equal a two-pass
    /// computation over the readings a naive watermark model accepts, the late
    /// dead letters are exactly the ones it rejects, and every reading is
    /// accounted for once.
    #[test]
    fn windows_match_a_naive_two_pass_model(
        steps in steps(),
        width_ms in prop::sample::select(vec![1_000u64, 2_000, 5_000]),
        lateness_ms in prop::sample::select(vec![0u64, 500, 2_000]),
        start_ms in -20_000i64..20_000,
    ) {
        let mut engine = engine_ms(width_ms, lateness_ms);
        let (w, l) = (width_ms as i64, lateness_ms as i64);
        let mut out = Vec::new();
        let mut model: BTreeMap<(usize, UnixMs), Naive> = BTreeMap::new();
        let mut max_event: HashMap<usize, UnixMs> = HashMap::new();
        let mut expected_late = Vec::new();
        let mut clock = start_ms;
        for &(s, advance, jitter, milli) in &steps {
            clock += advance;
            let t = clock + jitter;
            let v = f64::from(milli) / 1_000.0;
            let start = t.div_euclid(w) * w;
            let late = max_event.get(&s).is_some_and(|&m| start + w <= m - l);
            if late {
                expected_late.push(format!("{}/temp value={} time_ms={}", DEVICES[s], v, t));
            } else {
                let m = max_event.entry(s).or_insert(t);
                *m = (*m).max(t);
                let agg = model.entry((s, start)).or_default();
                agg.values.push(v);
                agg.times.push(t);
            }
            engine.push(&reading(DEVICES[s], t, v), 0, &mut out);
        }
        engine.flush(&mut out);

        let mut got_late = Vec::new();
        let mut last_start: HashMap<&SeriesKey, UnixMs> = HashMap::new();
        let mut got: BTreeMap<(usize, UnixMs), &Window> = BTreeMap::new();
        for o in &out {
            match o {
                EngineOutput::Window(win) => {
                    if let Some(prev) = last_start.insert(&win.series, win.start_ms) {
                        prop_assert!(prev < win.start_ms, "series {} out of start order", win.series);
                    }
                    let s = DEVICES.iter().position(|d| *d == &*win.series.device).unwrap();
                    prop_assert!(got.insert((s, win.start_ms), win).is_none(), "emitted twice");
                    prop_assert_eq!(win.end_ms - win.start_ms, w);
                }
                EngineOutput::DeadLetter(dl) => {
                    prop_assert_eq!(dl.reason, DeadLetterReason::Late);
                    got_late.push(format!("{} {}", dl.origin, dl.detail));
                }
                EngineOutput::SeriesEvicted(k) => prop_assert!(false, "unexpected eviction of {}", k),
            }
        }
        prop_assert_eq!(got_late, expected_late);
        prop_assert_eq!(got.len(), model.len());
        for (key, naive) in &model {
            let win = got.get(key);
            prop_assert!(win.is_some(), "window {:?} missing", key);
            naive.check(win.unwrap())?;
        }
        let s = engine.stats();
        prop_assert_eq!(s.readings_accepted + s.readings_late, steps.len() as u64);
        prop_assert_eq!(s.windows_emitted, got.len() as u64);
    }

    /// With wall-clock ticks (idle closes) mixed in, windows are still emitted
    /// once each, in start order, and hold exactly the readings the engine
    /// reported as accepted into them.
    #[test]
    fn idle_closes_keep_windows_exactly_once_and_complete(
        steps in steps(),
        ticks in prop::collection::vec((any::<bool>(), 0i64..8_000), 400),
    ) {
        // TTL far beyond the run: eviction would legitimately let a window reappear.
        let cfg = WindowConfig {
            width: Duration::from_secs(2),
            allowed_lateness: Duration::from_secs(1),
            series_ttl: Duration::from_secs(86_400),
            ..WindowConfig::default()
        };
        let mut engine = WindowEngine::new(AGENT, cfg);
        let mut out = Vec::new();
        let mut accepted: BTreeMap<(String, UnixMs), Naive> = BTreeMap::new();
        let (mut clock, mut now) = (0i64, 0i64);
        let mut dead = 0u64;
        for (&(s, advance, jitter, milli), &(tick, wall)) in steps.iter().zip(&ticks) {
            clock += advance;
            now += advance;
            let t = clock + jitter;
            let v = f64::from(milli) / 1_000.0;
            match engine.push(&reading(DEVICES[s], t, v), now, &mut out) {
                Admission::Accepted {
                    window_start_ms, ..
                } => {
                    let agg = accepted.entry((DEVICES[s].to_string(), window_start_ms)).or_default();
                    agg.values.push(v);
                    agg.times.push(t);
                }
                Admission::Rejected(reason) => {
                    prop_assert_eq!(reason, DeadLetterReason::Late);
                    dead += 1;
                }
            }
            if tick {
                engine.tick(now + wall, &mut out);
                prop_assert_eq!(engine.overdue(), 0, "a tick left an idle series open");
            }
        }
        engine.flush(&mut out);

        let mut last_start: HashMap<&SeriesKey, UnixMs> = HashMap::new();
        let mut got = BTreeMap::new();
        for win in windows(&out) {
            if let Some(prev) = last_start.insert(&win.series, win.start_ms) {
                prop_assert!(prev < win.start_ms, "series {} out of start order", win.series);
            }
            prop_assert!(got.insert((win.series.device.to_string(), win.start_ms), win).is_none(), "emitted twice");
        }
        prop_assert_eq!(got.len(), accepted.len());
        for (key, naive) in &accepted {
            let win = got.get(key);
            prop_assert!(win.is_some(), "window {:?} missing", key);
            naive.check(win.unwrap())?;
        }
        prop_assert_eq!(dead_reasons(&out).len() as u64, dead);
        let s = engine.stats();
        prop_assert_eq!(s.readings_accepted + s.readings_late, steps.len() as u64);
    }
}

#[test]
fn restored_marks_make_emitted_windows_late() {
    let mut e = WindowEngine::new("gw", WindowConfig::default());
    let series = SeriesKey::new("d", "s");
    // Windows up to 10_000 were emitted before a restart.
    e.restore_closed([(series.clone(), 10_000)]);
    let mut out = Vec::new();
    let r = |t: i64| Reading {
        series: series.clone(),
        time_ms: t,
        value: 1.0,
        unit: "".into(),
        source: millrace_protocol::Source::Mqtt,
        quality: millrace_protocol::Quality::Good,
    };
    assert_eq!(
        e.push(&r(9_999), 0, &mut out),
        Admission::Rejected(DeadLetterReason::Late)
    );
    assert!(matches!(
        e.push(&r(10_000), 0, &mut out),
        Admission::Accepted { .. }
    ));
}

#[test]
fn a_series_evicted_by_ttl_resumes_from_its_watermark() {
    let cfg = WindowConfig {
        series_ttl: std::time::Duration::from_secs(60),
        ..WindowConfig::default()
    };
    let mut e = WindowEngine::new("gw", cfg);
    let series = SeriesKey::new("d", "s");
    let r = |t: i64| Reading {
        series: series.clone(),
        time_ms: t,
        value: 1.0,
        unit: "".into(),
        source: millrace_protocol::Source::Mqtt,
        quality: millrace_protocol::Quality::Good,
    };
    let mut out = Vec::new();
    e.push(&r(1_000), 0, &mut out);
    tick_through(&mut e, 0, 61_001, &mut out);
    assert_eq!(e.live_series(), 0);
    let windows = out
        .iter()
        .filter(|o| matches!(o, EngineOutput::Window(_)))
        .count();
    assert_eq!(windows, 1);
    // A straggler for the emitted window comes back after eviction: late, not a second window.
    assert_eq!(
        e.push(&r(1_500), 61_002, &mut out),
        Admission::Rejected(DeadLetterReason::Late)
    );
}

#[test]
fn readings_stamped_far_from_the_gateway_clock_are_clock_skew() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    let now = 1_700_000_000_000;
    let ahead = 10 * 60_000;
    let behind = 7 * 86_400_000;
    for t in [
        now + ahead + 1,
        now - behind - 1,
        3_786_912_000_000, /* 2090 */
    ] {
        let a = engine.push(&reading("a", t, 1.0), now, &mut out);
        assert_eq!(a, Admission::Rejected(DeadLetterReason::ClockSkew), "{t}");
    }
    assert_eq!(
        engine.live_series(),
        0,
        "a skewed reading creates no series"
    );
    assert_eq!(engine.stats().readings_clock_skew, 3);
    assert_eq!(dead_reasons(&out), vec![DeadLetterReason::ClockSkew; 3]);
    // Inside the bounds, and the far-future one did not move the watermark:
    // a reading of now is not late.
    for t in [now + ahead, now - behind, now] {
        let a = engine.push(&reading(&t.to_string(), t, 1.0), now, &mut out);
        assert!(matches!(a, Admission::Accepted { .. }), "{t}: {a:?}");
    }
    assert!(matches!(
        engine.push(&reading("a", now, 1.0), now, &mut out),
        Admission::Accepted { .. }
    ));
}

#[test]
fn the_skew_bounds_are_configurable_and_checked() {
    let cfg = WindowConfig {
        max_ahead: Duration::from_secs(1),
        max_behind: Duration::from_secs(60),
        ..WindowConfig::default()
    };
    cfg.validate().unwrap();
    let mut engine = WindowEngine::new(AGENT, cfg);
    let mut out = Vec::new();
    let a = engine.push(&reading("a", 100_000 + 1_001, 1.0), 100_000, &mut out);
    assert_eq!(a, Admission::Rejected(DeadLetterReason::ClockSkew));
    let a = engine.push(&reading("a", 100_000 - 60_001, 1.0), 100_000, &mut out);
    assert_eq!(a, Admission::Rejected(DeadLetterReason::ClockSkew));

    let bad = WindowConfig {
        max_ahead: Duration::ZERO,
        ..WindowConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().key, "max-ahead");
    let bad = WindowConfig {
        max_behind: Duration::from_secs(6),
        ..WindowConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().key, "max-behind");
}

#[test]
fn an_ntp_step_forward_does_not_close_every_window_at_once() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    let now = 1_700_000_000_000;
    engine.push(&reading("a", now, 1.0), now, &mut out);
    engine.push(&reading("b", now, 1.0), now, &mut out);
    // The clock steps an hour ahead: the open windows stay open...
    let stepped = now + 3_600_000;
    engine.tick(stepped, &mut out);
    assert!(windows(&out).is_empty(), "{out:?}");
    assert_eq!(engine.stats().clock_jumps, 1);
    // ...until the idle timeout has passed on the new clock.
    engine.tick(stepped + 5_001, &mut out);
    assert_eq!(windows(&out).len(), 2);
}

#[test]
fn an_rtc_reset_to_1970_does_not_stall_the_windows() {
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    let now = 1_700_000_000_000;
    engine.push(&reading("a", now, 1.0), now, &mut out);
    // The clock comes back at the epoch; the idle timer keeps running at its
    // pace rather than waiting 53 years for the old time to come round.
    engine.tick(1_000, &mut out);
    assert!(windows(&out).is_empty());
    engine.tick(6_001, &mut out);
    assert_eq!(windows(&out).len(), 1, "{out:?}");
    assert_eq!(engine.stats().clock_jumps, 1);
}

/// `warm` changes nothing and flags the readings that go on to close a
/// window of their series (the scorer's hint); unknown series are skipped.
#[test]
fn warm_flags_the_readings_that_close_a_window() {
    let mut e = engine_ms(1_000, 500);
    let mut out = Vec::new();
    let (a, b) = (reading("a", 100, 1.0), reading("b", 100, 2.0));
    e.push(&a, 200, &mut out);
    e.push(&b, 200, &mut out);
    let next = [
        reading("a", 900, 1.0),     // same window
        reading("b", 1_600, 2.0),   // closes [0, 1000) (1600 - 500 >= 1000)
        reading("new", 5_000, 3.0), // no series yet
        reading("a", 1_400, 1.0),   // a later window, within the lateness
    ];
    // The same `Arc`s as pushed: the alias lookup is what warm uses.
    let next: Vec<Reading> = next
        .into_iter()
        .map(|mut r| {
            if *r.series.device == *"a" {
                r.series = a.series.clone();
            } else if *r.series.device == *"b" {
                r.series = b.series.clone();
            }
            r
        })
        .collect();
    assert_eq!(e.warm(next.iter()), 0b0010);
    let before = e.stats();
    assert_eq!(e.warm(next.iter()), 0b0010, "warm changed nothing");
    assert_eq!(e.stats(), before);
    for r in &next {
        e.push(r, 1_700, &mut out);
    }
    let closed: Vec<&str> = windows(&out).iter().map(|w| &*w.series.device).collect();
    assert_eq!(closed, ["b"], "the flagged reading closed its window");
}

#[test]
fn ticks_between_deadlines_skip_nothing_that_is_due() {
    // Idle timeout 5 s (default), TTL 10 min.
    let mut engine = engine_ms(5_000, 2_000);
    let mut out = Vec::new();
    // A tick of an empty engine sees no deadline at all; the first reading
    // after it still gets its window idle-closed on time.
    engine.tick(0, &mut out);
    engine.push(&reading("a", 1_000, 1.0), 1_000, &mut out);
    engine.tick(6_000, &mut out);
    assert!(
        windows(&out).is_empty(),
        "exactly idle-timeout is not yet idle"
    );
    engine.tick(6_001, &mut out);
    assert_eq!(
        windows(&out).len(),
        1,
        "idle-closed right after the timeout"
    );

    // "b" stops at 20 s while "a" keeps reporting every second: b's window
    // closes at the first tick past its own deadline, whatever a does.
    out.clear();
    for now in (10_000..=40_000i64).step_by(250) {
        if now % 1_000 == 0 {
            engine.push(&reading("a", now, 1.0), now, &mut out);
            if now <= 20_000 {
                engine.push(&reading("b", now, 1.0), now, &mut out);
            }
        }
        engine.tick(now, &mut out);
        assert_eq!(engine.overdue(), 0, "a tick at {now} left a series due");
        let b_idle = windows(&out)
            .iter()
            .filter(|w| &*w.series.device == "b" && w.start_ms == 20_000)
            .count();
        assert_eq!(
            b_idle,
            usize::from(now > 25_000),
            "b's last window at {now}"
        );
    }
}

#[test]
fn a_series_entry_is_four_cache_lines_laid_out_by_use() {
    use std::mem::{offset_of, size_of};
    assert_eq!(table::entry_size::<SeriesState>(), 256);
    let mut t = table::SeriesTable::default();
    t.insert_new(SeriesKey::new("plc-1", "t"), SeriesState::new(0));
    let base = t.first_value_offset().unwrap();
    assert_eq!(base, 8, "after the slot's tag and generation");
    // The cache lines a field spans, counted from the entry's start.
    let lines =
        |offset: usize, size: usize| ((base + offset) / 64, (base + offset + size - 1) / 64);
    let i64_size = size_of::<i64>();
    let open = size_of::<Option<(UnixMs, Acc)>>();
    assert_eq!(open, 64, "an open window, its tag included, fills one line");
    // What every reading reads: the first two lines.
    for offset in [
        offset_of!(SeriesState, watermark_ms),
        offset_of!(SeriesState, max_event_ms),
        offset_of!(SeriesState, last_accepted_ms),
        offset_of!(SeriesState, last_seen_ms),
        offset_of!(SeriesState, first_start_ms),
    ] {
        assert_eq!(lines(offset, i64_size), (0, 0));
    }
    assert_eq!(lines(offset_of!(SeriesState, watch), 16), (0, 0));
    assert_eq!(lines(offset_of!(SeriesState, latest), open), (1, 1));
    // What a closing window reads besides: the next two.
    assert_eq!(lines(offset_of!(SeriesState, previous), open), (2, 2));
    assert_eq!(lines(offset_of!(SeriesState, unit), 16), (3, 3));
}
