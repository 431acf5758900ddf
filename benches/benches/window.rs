//! Readings per second through the window engine and the anomaly scorer, as
//! the agent pipeline drives them: every reading pushed, every emitted window
//! scored (its spike band handed back to the engine), every accepted reading
//! the engine flags outside that band spike-checked, `tick` once per poll round.
//!
//! 10 000 series, pre-built readings in time order with ±300 ms event-time
//! jitter, polled at 1 Hz (5 readings per window) and at 10 Hz (50 per
//! window), through the engine and scorer together and through the engine
//! alone. The engine and scorer are warmed up (baselines past warm-up, so
//! windows are really scored) and then fed the same block again and again,
//! shifted forward in time outside the timed section.
//!
//! As in the pipeline, the series of every next 16 readings are warmed
//! together ([`WindowEngine::warm`]) before they are pushed; `NOWARM=1`
//! measures the same without, for comparison.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use millrace_agent::anomaly::{AnomalyConfig, Scorer};
use millrace_agent::window::{Admission, EngineOutput, WindowConfig, WindowEngine};
use millrace_benches::{jittered_readings, shift, thread_cpu_time};
use millrace_protocol::Reading;
use std::hint::black_box;
use std::time::Duration;

const SERIES: usize = 10_000;
const JITTER_MS: i64 = 300;

struct Pipeline {
    /// Score windows and spike-check readings (false: the window engine alone).
    score: bool,
    warm: bool,
    engine: WindowEngine,
    scorer: Scorer,
    out: Vec<EngineOutput>,
    alerts: u64,
    windows: u64,
}

impl Pipeline {
    fn new(score: bool) -> Self {
        let window_cfg = WindowConfig::default();
        let max_series = window_cfg.max_series;
        Self {
            score,
            warm: std::env::var_os("NOWARM").is_none(),
            engine: WindowEngine::new("bench-gw", window_cfg),
            scorer: Scorer::new("bench-gw", AnomalyConfig::default()).with_max_series(max_series),
            out: Vec::with_capacity(4 * SERIES),
            alerts: 0,
            windows: 0,
        }
    }

    /// Feeds a block; `tick` whenever the (simulated) wall clock enters a new second.
    fn run(&mut self, readings: &[Reading]) {
        let mut last_tick_s = i64::MIN;
        let mut now_ms = i64::MIN;
        for (i, r) in readings.iter().enumerate() {
            // As the agent's pipeline: the series of the next few readings
            // are brought into the cache together.
            if self.warm && i % WindowEngine::WARM_AHEAD == 0 {
                let next = readings[i..].iter().take(WindowEngine::WARM_AHEAD);
                let closing = self.engine.warm(next.clone());
                if self.score && closing != 0 {
                    self.scorer.warm(
                        next.enumerate()
                            .filter(|(i, _)| closing & (1 << i) != 0)
                            .map(|(_, r)| r),
                    );
                }
            }
            // Wall clock: monotonic, arrival just after the latest event time.
            now_ms = now_ms.max(r.time_ms + JITTER_MS);
            let admission = self.engine.push(r, now_ms, &mut self.out);
            self.drain();
            // As the agent's pipeline: only readings outside the series'
            // spike band (flagged `watch` by the engine) are spike-checked.
            if let (
                true,
                Admission::Accepted {
                    window_start_ms,
                    watch: true,
                },
            ) = (self.score, admission)
            {
                self.alerts += u64::from(self.scorer.check_reading(r, window_start_ms).is_some());
            }
            let now_s = now_ms.div_euclid(1_000);
            if now_s != last_tick_s {
                last_tick_s = now_s;
                self.engine.tick(now_ms, &mut self.out);
                self.drain();
            }
        }
    }

    fn drain(&mut self) {
        for o in self.out.drain(..) {
            match o {
                EngineOutput::Window(mut w) => {
                    self.windows += 1;
                    if self.score {
                        let (alert, band) = self.scorer.score_window_and_band(&mut w);
                        self.engine.set_watch_band(&w.series, band);
                        self.alerts += u64::from(alert.is_some());
                    }
                    black_box(&w);
                }
                EngineOutput::SeriesEvicted(k) => self.scorer.forget(&k),
                EngineOutput::DeadLetter(d) => {
                    black_box(&d);
                }
            }
        }
    }
}

fn window_engine_and_scorer(c: &mut Criterion) {
    let mut group = c.benchmark_group("window_engine_and_scorer");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(20));
    let cases = [
        ("engine+scorer", true, "1Hz", 1_000i64, 10usize),
        ("engine+scorer", true, "10Hz", 100, 50),
        ("engine", false, "1Hz", 1_000, 10),
        ("engine", false, "10Hz", 100, 50),
    ];
    for (what, score, label, period_ms, rounds) in cases {
        let mut block = jittered_readings(SERIES, rounds, period_ms, JITTER_MS, 42);
        let block_ms = period_ms * rounds as i64;
        let mut pipeline = Pipeline::new(score);
        // Warm up: past the scorer's warm-up of 6 windows for every series.
        let warm_passes = (8 * 5_000 / block_ms).max(1);
        for _ in 0..warm_passes {
            pipeline.run(&block);
            shift(&mut block, block_ms);
        }
        assert!(
            !score || pipeline.scorer.stats().windows_scored > 0,
            "baselines warmed up"
        );

        group.throughput(Throughput::Elements(block.len() as u64));
        group.bench_function(BenchmarkId::new(format!("{what}/10k_series"), label), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let started = thread_cpu_time();
                    pipeline.run(&block);
                    timed += thread_cpu_time() - started;
                    shift(&mut block, block_ms);
                }
                timed
            })
        });
        let s = pipeline.engine.stats();
        eprintln!(
            "{what} {label}: accepted={} late={} windows={} scored={} alerts={} live_series={}",
            s.readings_accepted,
            s.readings_late,
            pipeline.windows,
            pipeline.scorer.stats().windows_scored,
            pipeline.alerts,
            pipeline.engine.live_series(),
        );
    }
    group.finish();
}

criterion_group!(benches, window_engine_and_scorer);
criterion_main!(benches);
