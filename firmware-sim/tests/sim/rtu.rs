//! The RTU slave over a socat pty pair, read by a tokio-modbus RTU client.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use millrace_sim::sim::{RunOptions, Simulation};
use millrace_sim::unix_now_ms;
use tokio_modbus::prelude::*;

use crate::util::{example_plant, require, Peer};

fn pty_pair(dir: &Path) -> (Peer, std::path::PathBuf, std::path::PathBuf) {
    let socat = require("socat", "socat");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let child = Command::new(socat)
        .arg("-d")
        .arg("-d")
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting socat");
    let peer = Peer { child };
    for _ in 0..250 {
        if a.exists() && b.exists() {
            return (peer, a, b);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("socat did not create {} and {}", a.display(), b.display());
}

#[tokio::test]
async fn rtu_slave_answers_over_a_pty_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (_socat, sim_end, client_end) = pty_pair(dir.path());
    let options = RunOptions {
        no_mqtt: true,
        rtu_devices: vec![("tank-4".to_owned(), sim_end)],
        ..RunOptions::default()
    };
    let sim = Simulation::start(example_plant(1), options).await.unwrap();
    let serial =
        tokio_serial::SerialStream::open(&tokio_serial::new(client_end.to_string_lossy(), 19_200))
            .unwrap();
    let mut ctx = rtu::attach_slave(serial, Slave(3));

    // The slave opens its end asynchronously; allow a few attempts.
    let mut words = None;
    let (mut before, mut after) = (0, 0);
    for _ in 0..20 {
        before = unix_now_ms();
        if let Ok(Ok(Ok(w))) =
            tokio::time::timeout(Duration::from_millis(500), ctx.read_holding_registers(0, 1)).await
        {
            after = unix_now_ms();
            words = Some(w);
            break;
        }
    }
    let words = words.expect("no answer from the RTU slave");
    let level = f64::from(words[0]) * 0.1;
    let first = before - before.rem_euclid(1000);
    let expected: Vec<f64> = (first..=after)
        .step_by(1000)
        .filter_map(|t| sim.value_at("tank-4/level", t))
        .collect();
    assert!(
        expected.iter().any(|e| (e - level).abs() <= 0.05 + 1e-9),
        "level {level}, expected one of {expected:?}"
    );
    assert_eq!(
        ctx.read_holding_registers(1, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );

    // Another slave id on the bus: the simulated slave stays silent.
    ctx.set_slave(Slave(4));
    let silent =
        tokio::time::timeout(Duration::from_millis(500), ctx.read_holding_registers(0, 1)).await;
    assert!(
        silent.is_err(),
        "slave 3 answered a request for slave 4: {silent:?}"
    );
    sim.shutdown().await.unwrap();
}
