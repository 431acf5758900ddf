//! The simulator's Modbus TCP servers read by a tokio-modbus client.

use std::time::{Duration, Instant};

use millrace_sim::sim::{RunOptions, Simulation};
use millrace_sim::unix_now_ms;
use tokio_modbus::prelude::*;

use crate::util::{decode, example_plant};

fn options() -> RunOptions {
    RunOptions {
        no_mqtt: true,
        no_rtu: true,
        ..RunOptions::default()
    }
}

/// Sample instants a read between `before` and `after` may have used (1 s refresh).
fn candidates(before: i64, after: i64) -> Vec<i64> {
    let first = before - before.rem_euclid(1000);
    (first..=after).step_by(1000).collect()
}

/// Asserts that `decoded` is the value of `series` at one of the candidate instants.
fn assert_matches(
    sim: &Simulation,
    series: &str,
    decoded: f64,
    tolerance: f64,
    before: i64,
    after: i64,
) {
    let expected: Vec<f64> = candidates(before, after)
        .into_iter()
        .filter_map(|t| sim.value_at(series, t))
        .collect();
    assert!(
        expected.iter().any(|e| (e - decoded).abs() <= tolerance),
        "{series}: read {decoded}, expected one of {expected:?} (±{tolerance})"
    );
}

#[tokio::test]
async fn press_and_pump_registers_match_the_signals() {
    let sim = Simulation::start(example_plant(1), options())
        .await
        .unwrap();
    let press = sim.modbus_addr("press-1").unwrap();
    let pump = sim.modbus_addr("pump-2").unwrap();

    let mut ctx = tcp::connect_slave(press, Slave(1)).await.unwrap();
    let before = unix_now_ms();
    let holding = ctx.read_holding_registers(0, 5).await.unwrap().unwrap();
    let input = ctx.read_input_registers(0, 1).await.unwrap().unwrap();
    let coils = ctx.read_coils(0, 1).await.unwrap().unwrap();
    let after = unix_now_ms();
    assert_matches(
        &sim,
        "press-1/temperature",
        decode::f32(&holding[0..2], "ABCD"),
        1e-4,
        before,
        after,
    );
    assert_matches(
        &sim,
        "press-1/pressure",
        decode::f32(&holding[2..4], "CDAB"),
        1e-5,
        before,
        after,
    );
    assert_matches(
        &sim,
        "press-1/speed",
        f64::from(holding[4]) * 0.1,
        0.05 + 1e-9,
        before,
        after,
    );
    assert_matches(
        &sim,
        "press-1/vibration",
        f64::from(input[0] as i16) * 0.01,
        0.005 + 1e-9,
        before,
        after,
    );
    assert_eq!(coils, vec![true]);
    // Plausibility, independent of value_at: the documented plant levels.
    let temperature = decode::f32(&holding[0..2], "ABCD");
    assert!(
        (70.0..90.0).contains(&temperature) || temperature > 110.0,
        "temperature {temperature}"
    );
    assert!((1400.0..1500.0).contains(&(f64::from(holding[4]) * 0.1)));

    let mut ctx = tcp::connect_slave(pump, Slave(1)).await.unwrap();
    let before = unix_now_ms();
    let flow = ctx.read_holding_registers(0, 4).await.unwrap().unwrap();
    let suction = ctx.read_input_registers(10, 2).await.unwrap().unwrap();
    let energy = ctx.read_holding_registers(20, 4).await.unwrap().unwrap();
    let after = unix_now_ms();
    assert_matches(
        &sim,
        "pump-2/flow",
        decode::f64(&flow, "ABCD"),
        1e-12,
        before,
        after,
    );
    assert_matches(
        &sim,
        "pump-2/suction",
        f64::from(decode::i32(&suction, "BADC")) * 0.001,
        0.0005 + 1e-12,
        before,
        after,
    );
    // The energy counter grows 100 Wh per second since the start (and is 0 before it).
    let wh = decode::u64(&energy, "DCBA") as f64;
    let sample_times = candidates(before, after);
    assert!(
        sample_times
            .iter()
            .any(|t| (wh - (100.0 * (t - sim.start_ms()) as f64 / 1000.0).max(0.0)).abs() <= 0.5),
        "energy {wh} Wh at start {} and sample times {sample_times:?}",
        sim.start_ms()
    );
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_addresses_and_writes_are_exceptions() {
    let sim = Simulation::start(example_plant(1), options())
        .await
        .unwrap();
    let mut ctx = tcp::connect_slave(sim.modbus_addr("press-1").unwrap(), Slave(1))
        .await
        .unwrap();
    assert_eq!(
        ctx.read_holding_registers(100, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    // 0..=4 is mapped, 5 is not: the whole read is refused.
    assert_eq!(
        ctx.read_holding_registers(0, 6).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        ctx.read_input_registers(1, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        ctx.read_discrete_inputs(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        ctx.write_single_register(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert_eq!(
        ctx.write_single_coil(0, false).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    // Another unit id behind this address.
    ctx.set_slave(Slave(9));
    assert_eq!(
        ctx.read_holding_registers(0, 1).await.unwrap(),
        Err(ExceptionCode::GatewayTargetDevice)
    );
    // The connection is still usable after exceptions.
    ctx.set_slave(Slave(1));
    assert!(ctx.read_holding_registers(4, 1).await.unwrap().is_ok());
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn fault_injection() {
    let mut plant = example_plant(1);
    plant.modbus_tcp[0].faults.exception_rate = 1.0;
    plant.modbus_tcp[1].faults.slow_response = Duration::from_millis(300);
    plant.modbus_tcp[1].faults.disconnect_every = Some(Duration::from_millis(800));
    let sim = Simulation::start(plant, options()).await.unwrap();

    let mut press = tcp::connect_slave(sim.modbus_addr("press-1").unwrap(), Slave(1))
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            press.read_holding_registers(0, 2).await.unwrap(),
            Err(ExceptionCode::ServerDeviceFailure)
        );
    }

    let mut pump = tcp::connect_slave(sim.modbus_addr("pump-2").unwrap(), Slave(1))
        .await
        .unwrap();
    let asked = Instant::now();
    assert!(pump.read_holding_registers(0, 4).await.unwrap().is_ok());
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "slow-response not applied"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after_expiry =
        tokio::time::timeout(Duration::from_secs(5), pump.read_holding_registers(0, 4))
            .await
            .unwrap();
    assert!(
        after_expiry.is_err(),
        "connection should have been dropped: {after_expiry:?}"
    );
    // A new connection works again.
    let mut pump = tcp::connect_slave(sim.modbus_addr("pump-2").unwrap(), Slave(1))
        .await
        .unwrap();
    assert!(pump.read_holding_registers(0, 4).await.unwrap().is_ok());
    sim.shutdown().await.unwrap();
}
