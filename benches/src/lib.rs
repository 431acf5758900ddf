//! Load generators and fixtures shared by the benchmarks.
//!
//! What it is: deterministic (seeded) synthetic plant traffic, built before a
//! benchmark starts so that only the code under test is timed.
//! What it is not: a simulator of devices or protocols (see `firmware-sim`).

pub mod process;

use millrace_protocol::{Quality, Reading, SeriesKey, Source, UnixMs};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// CPU time the calling thread has run so far (`/proc/thread-self/schedstat`,
/// nanoseconds). Benchmarks time with it rather than the wall clock, so a
/// figure is what the code costs even on a machine shared with other work
/// (other work still competes for caches, so figures stay pessimistic there).
///
/// # Panics
/// When the file cannot be read or parsed (not Linux, or no schedstat).
pub fn thread_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("read /proc/thread-self/schedstat");
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse::<u64>().ok())
        .expect("schedstat starts with the thread's CPU time in ns");
    Duration::from_nanos(ns)
}

/// `series` series polled every `period_ms` for `rounds` rounds, in arrival
/// order: round by round, the series of a round in a shuffled order, each
/// event time jittered by up to ±`jitter_ms` around the nominal poll time
/// (so event times arrive slightly out of order, within any sane lateness).
/// Values are a slow per-series sine plus uniform noise.
pub fn jittered_readings(
    series: usize,
    rounds: usize,
    period_ms: i64,
    jitter_ms: i64,
    seed: u64,
) -> Vec<Reading> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let keys: Vec<SeriesKey> = (0..series)
        .map(|i| SeriesKey::new(format!("plc-{:03}", i / 20), format!("reg-{:02}", i % 20)))
        .collect();
    // One shared unit, as the decoders and the Modbus plan hand it out (interned).
    let unit: std::sync::Arc<str> = "bar".into();
    let mut order: Vec<usize> = (0..series).collect();
    let mut readings = Vec::with_capacity(series * rounds);
    for round in 0..rounds {
        let nominal_ms = round as i64 * period_ms;
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for &s in &order {
            let time_ms: UnixMs = nominal_ms + rng.random_range(-jitter_ms..=jitter_ms);
            let phase = time_ms as f64 / 60_000.0 + s as f64;
            readings.push(Reading {
                series: keys[s].clone(),
                time_ms,
                value: 100.0 + 10.0 * phase.sin() + rng.random_range(-1.0..1.0),
                unit: std::sync::Arc::clone(&unit),
                source: Source::Modbus,
                quality: Quality::Good,
            });
        }
    }
    readings
}

/// Moves every reading `by_ms` later in event time (to replay a block again).
pub fn shift(readings: &mut [Reading], by_ms: i64) {
    for r in readings {
        r.time_ms += by_ms;
    }
}
