//! What the redelivery guard costs per MQTT QoS 1 reading in the steady
//! state: remembering each first delivery (fingerprint, append to the log)
//! and the expiry, at a steady 10 000 readings per second (1 000 series at
//! 10 Hz), so the guard holds a live horizon's worth (10 s, about 100 000
//! fingerprints) throughout. A second case looks every reading up as a
//! redelivery (the burst after a connection broke), which builds and keeps
//! the index.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace_agent::window::redelivery::{self, RedeliveryGuard};
use millrace_benches::{jittered_readings, shift, thread_cpu_time};
use millrace_protocol::Source;
use std::hint::black_box;
use std::time::Duration;

const SERIES: usize = 1_000;
const PERIOD_MS: i64 = 100;
const ROUNDS: usize = 100; // 10 s of traffic per block

fn redelivery_guard(c: &mut Criterion) {
    let mut block = jittered_readings(SERIES, ROUNDS, PERIOD_MS, 30, 7);
    for r in &mut block {
        r.source = Source::Mqtt;
    }
    let block_ms = PERIOD_MS * ROUNDS as i64;
    let mut guard = RedeliveryGuard::new(
        12_000,
        redelivery::LIVE_HORIZON_MS,
        redelivery::DEFAULT_CAPACITY,
    );
    // Wall clock: 10 readings per ms of simulated time.
    let mut now_ms = 0i64;
    let mut run =
        |guard: &mut RedeliveryGuard, block: &[millrace_protocol::Reading], redelivered: bool| {
            let mut again = 0u64;
            for (i, r) in block.iter().enumerate() {
                if i % 10 == 0 {
                    now_ms += 1;
                }
                if redelivered {
                    again += u64::from(guard.is_redelivery(r, now_ms));
                } else {
                    guard.remember(r, now_ms);
                }
            }
            black_box(again)
        };
    // Warm up to the steady state.
    run(&mut guard, &block, false);
    shift(&mut block, block_ms);
    let steady = guard.stats().tracked;
    assert!(
        (95_000..=105_000).contains(&steady),
        "a live horizon of 10 000 readings/s holds about 100 000: {steady}"
    );

    let mut group = c.benchmark_group("redelivery_guard");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(block.len() as u64));
    for (name, redelivered) in [
        ("mqtt_10k_readings_per_s_first_deliveries", false),
        ("mqtt_10k_readings_per_s_all_marked_redelivered", true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let started = thread_cpu_time();
                    run(&mut guard, &block, redelivered);
                    timed += thread_cpu_time() - started;
                    shift(&mut block, block_ms);
                }
                timed
            })
        });
    }
    group.finish();
    assert_eq!(guard.stats().duplicates, 0, "no false redeliveries");
    assert_eq!(guard.stats().forgotten_early, 0);
}

criterion_group!(benches, redelivery_guard);
criterion_main!(benches);
