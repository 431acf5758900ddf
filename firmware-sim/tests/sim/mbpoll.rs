//! `mbpoll`, a Modbus client that is not ours, reads the simulator's holding registers.

use std::process::Command;

use millrace_sim::config::SimConfig;
use millrace_sim::sim::{RunOptions, Simulation};

use crate::util::require;

const PLANT: &str = r#"
seed = 5
[[modbus-tcp]]
name = "bench-plc"
listen = "127.0.0.1:0"
unit-id = 1
[[modbus-tcp.points]]
sensor = "a"
table = "holding"
address = 0
type = "u32"
order = "CDAB"
signal = { offset = 305419896 }   # 0x12345678
[[modbus-tcp.points]]
sensor = "b"
table = "holding"
address = 2
type = "f32"
order = "ABCD"
signal = { offset = 1.0 }         # 0x3F800000
[[modbus-tcp.points]]
sensor = "c"
table = "holding"
address = 4
type = "u16"
scale = 0.1
signal = { offset = 1450.0 }      # 14500
[[modbus-tcp.points]]
sensor = "d"
table = "holding"
address = 5
type = "i16"
scale = 0.01
signal = { offset = -2.5 }        # -250
"#;

fn parse_mbpoll(stdout: &str) -> Vec<(u32, u16)> {
    stdout
        .lines()
        .filter_map(|line| {
            let (reference, value) = line.trim().strip_prefix('[')?.split_once("]:")?;
            // `65286 (-250)`: the raw unsigned word, then the signed reading.
            let value: i32 = value.split_whitespace().next()?.parse().ok()?;
            Some((reference.parse().ok()?, value.rem_euclid(65_536) as u16))
        })
        .collect()
}

#[tokio::test]
async fn mbpoll_reads_expected_raw_values() {
    let mbpoll = require("mbpoll", "mbpoll");
    let config = SimConfig::from_toml(PLANT, "mbpoll-plant.toml".as_ref()).unwrap();
    let sim = Simulation::start(config, RunOptions::default())
        .await
        .unwrap();
    let port = sim.modbus_addr("bench-plc").unwrap().port().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(mbpoll)
            .args([
                "-m",
                "tcp",
                "-p",
                &port,
                "-a",
                "1",
                "-r",
                "1",
                "-c",
                "6",
                "-t",
                "4",
                "-1",
                "127.0.0.1",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mbpoll failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let values = parse_mbpoll(&stdout);
    assert_eq!(
        values,
        vec![
            (1, 0x5678),
            (2, 0x1234),
            (3, 0x3F80),
            (4, 0x0000),
            (5, 14_500),
            (6, (-250i16) as u16)
        ],
        "mbpoll output:\n{stdout}"
    );
    sim.shutdown().await.unwrap();
}
