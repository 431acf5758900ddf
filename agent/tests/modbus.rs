//! The Modbus source against a Modbus server that is not ours: pymodbus,
//! run by `scripts/modbus-peer.py` from the project's venv, over TCP on
//! 127.0.0.1 and over RTU on a socat pty pair.
//!
//! Setup: `python3 -m venv ~/.cache/millrace-venv && ~/.cache/millrace-venv/bin/pip
//! install 'pymodbus==3.*' pyserial` (or point `MILLRACE_VENV` at a venv),
//! and `apt-get install socat`. A missing peer fails the test.

mod peers;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use millrace_agent::ingest::modbus::{ModbusConfig, ModbusSource, ModbusStats};
use millrace_agent::ingest::{now_ms, IngestEvent};
use millrace_protocol::{DeadLetter, DeadLetterReason, Reading, Source};
use peers::{ModbusPeer, PtyPair};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The plant's `press-1` map, polled fast.
fn press_1(port: u16) -> String {
    format!(
        r#"
        [[devices]]
        name = "press-1"
        transport = "tcp"
        address = "127.0.0.1:{port}"
        unit-id = 1
        poll-interval = "100ms"
        timeout = "1s"
        backoff-max = "500ms"
        [[devices.registers]]
        sensor = "temperature"
        function = "holding"
        address = 0
        type = "f32"
        order = "ABCD"
        unit = "degC"
        [[devices.registers]]
        sensor = "pressure"
        function = "holding"
        address = 2
        type = "f32"
        order = "CDAB"
        unit = "bar"
        [[devices.registers]]
        sensor = "speed"
        function = "holding"
        address = 4
        type = "u16"
        scale = 0.1
        unit = "rpm"
        [[devices.registers]]
        sensor = "vibration"
        function = "input"
        address = 0
        type = "i16"
        scale = 0.01
        unit = "mm/s"
        [[devices.registers]]
        sensor = "running"
        function = "coil"
        address = 0
        type = "bool"
        "#
    )
}

/// The plant's `pump-2` map.
fn pump_2(port: u16) -> String {
    format!(
        r#"
        [[devices]]
        name = "pump-2"
        transport = "tcp"
        address = "127.0.0.1:{port}"
        poll-interval = "100ms"
        timeout = "1s"
        [[devices.registers]]
        sensor = "flow"
        function = "holding"
        address = 0
        type = "f64"
        order = "ABCD"
        unit = "m3/h"
        [[devices.registers]]
        sensor = "suction"
        function = "input"
        address = 10
        type = "i32"
        order = "BADC"
        scale = 0.001
        unit = "bar"
        [[devices.registers]]
        sensor = "energy"
        function = "holding"
        address = 20
        type = "u64"
        order = "DCBA"
        unit = "Wh"
        "#
    )
}

struct Running {
    rx: mpsc::Receiver<IngestEvent>,
    stats: Arc<ModbusStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(toml_text: &str) -> Self {
        let cfg: ModbusConfig = toml::from_str(toml_text).expect("test config parses");
        let source = ModbusSource::new(cfg).expect("test config is valid");
        let stats = source.stats();
        let (tx, rx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Self {
            rx,
            stats,
            shutdown,
            task,
        }
    }

    /// Events until `done` says enough, failing after `within`.
    async fn collect_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&[IngestEvent]) -> bool,
    ) -> Vec<IngestEvent> {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        while !done(&events) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(e)) => events.push(e),
                Ok(None) => panic!("the source stopped early"),
                Err(_) => panic!(
                    "condition not met within {within:?}; got {} events: {:#?}",
                    events.len(),
                    events.iter().rev().take(10).collect::<Vec<_>>()
                ),
            }
        }
        events
    }

    /// Everything produced during `span`.
    async fn collect_for(&mut self, span: Duration) -> Vec<(Instant, IngestEvent)> {
        let deadline = Instant::now() + span;
        let mut events = Vec::new();
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            events.push((Instant::now(), e));
        }
        events
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the source stops on shutdown")
            .expect("the source task does not panic");
    }
}

/// Waits until `cond` holds, failing after `within`.
async fn eventually(within: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn readings(events: &[IngestEvent]) -> Vec<&Reading> {
    events
        .iter()
        .filter_map(|e| match e {
            IngestEvent::Reading(r, _) => Some(r),
            _ => None,
        })
        .collect()
}

fn dead_letters(events: &[IngestEvent]) -> Vec<&DeadLetter> {
    events
        .iter()
        .filter_map(|e| match e {
            IngestEvent::DeadLetter(d) => Some(d),
            _ => None,
        })
        .collect()
}

fn has_reading(events: &[IngestEvent], device: &str, sensor: &str) -> bool {
    readings(events)
        .iter()
        .any(|r| &*r.series.device == device && &*r.series.sensor == sensor)
}

/// Longest silence between consecutive readings of a series (and from the
/// window's edges), in a timestamped capture.
fn longest_gap(
    events: &[(Instant, IngestEvent)],
    start: Instant,
    end: Instant,
    device: &str,
    sensor: &str,
) -> Duration {
    let mut last = start;
    let mut gap = Duration::ZERO;
    for (at, e) in events {
        if let IngestEvent::Reading(r, _) = e {
            if &*r.series.device == device && &*r.series.sensor == sensor {
                gap = gap.max(at.duration_since(last));
                last = *at;
            }
        }
    }
    gap.max(end.duration_since(last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_values_are_decoded_exactly() {
    let press = ModbusPeer::tcp("press-1");
    let pump = ModbusPeer::tcp("pump-2");
    let before_ms = now_ms();
    let mut source = Running::start(&format!("{}{}", press_1(press.port), pump_2(pump.port)));

    let wanted = [
        ("press-1", "temperature"),
        ("press-1", "pressure"),
        ("press-1", "speed"),
        ("press-1", "vibration"),
        ("press-1", "running"),
        ("pump-2", "flow"),
        ("pump-2", "suction"),
        ("pump-2", "energy"),
    ];
    let events = source
        .collect_until(Duration::from_secs(10), |ev| {
            wanted.iter().all(|(d, s)| has_reading(ev, d, s))
        })
        .await;
    let after_ms = now_ms();
    assert!(
        dead_letters(&events).is_empty(),
        "{:?}",
        dead_letters(&events)
    );

    let mut seen: BTreeMap<(String, String), &Reading> = BTreeMap::new();
    for r in readings(&events) {
        seen.insert(
            (r.series.device.to_string(), r.series.sensor.to_string()),
            r,
        );
    }
    // Fixture values of scripts/modbus-peer.py; value = raw × scale + offset.
    let expected: [(&str, &str, f64, &str); 8] = [
        ("press-1", "temperature", 80.5, "degC"),
        ("press-1", "pressure", 6.25, "bar"),
        ("press-1", "speed", 14503.0 * 0.1 + 0.0, "rpm"),
        ("press-1", "vibration", -37.0 * 0.01 + 0.0, "mm/s"),
        ("press-1", "running", 1.0, ""),
        ("pump-2", "flow", 42.125, "m3/h"),
        ("pump-2", "suction", -300.0 * 0.001 + 0.0, "bar"),
        ("pump-2", "energy", 123_456_789_012.0, "Wh"),
    ];
    for (device, sensor, value, unit) in expected {
        let r = seen[&(device.to_string(), sensor.to_string())];
        assert_eq!(r.value, value, "{device}/{sensor}");
        assert_eq!(&*r.unit, unit, "{device}/{sensor}");
        assert_eq!(r.source, Source::Modbus);
        assert!(
            (before_ms..=after_ms).contains(&r.time_ms),
            "{device}/{sensor} stamped {} outside [{before_ms}, {after_ms}]",
            r.time_ms
        );
    }
    let press_stats = source.stats.device("press-1").expect("press-1 stats");
    eventually(Duration::from_secs(5), || press_stats.polls() >= 1).await;
    assert!(press_stats.readings() >= 5);
    assert!(press_stats.connected());
    assert_eq!(press_stats.timeouts(), 0);
    assert_eq!(press_stats.transport_errors(), 0);
    assert_eq!(press_stats.exceptions_total(), 0);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exception_reply_is_a_counted_dead_letter_and_polling_goes_on() {
    let mut press = ModbusPeer::tcp("press-1");
    // Holding registers 2..=3 (pressure) answer exception 02, illegal data address.
    press.command("exception 3 2 3 2");
    let mut source = Running::start(&press_1(press.port));

    // The merged holding read (0..5) is rejected first...
    let events = source
        .collect_until(Duration::from_secs(10), |ev| !dead_letters(ev).is_empty())
        .await;
    let first = dead_letters(&events)[0].clone();
    assert_eq!(first.reason, DeadLetterReason::DeviceException);
    assert_eq!(first.source, Source::Modbus);
    assert_eq!(first.origin, "press-1");
    assert_eq!(first.input, vec![0x83, 0x02]);
    assert!(
        first.detail.contains("function=holding (03)"),
        "{}",
        first.detail
    );
    assert!(
        first.detail.contains("address=0 count=5"),
        "{}",
        first.detail
    );
    assert!(
        first.detail.contains("exception=IllegalDataAddress (02)"),
        "{}",
        first.detail
    );

    // ...then the source reads those registers one by one: temperature and
    // speed come back, pressure keeps being dead-lettered, the rest go on.
    let events = source
        .collect_until(Duration::from_secs(10), |ev| {
            has_reading(ev, "press-1", "temperature")
                && has_reading(ev, "press-1", "speed")
                && has_reading(ev, "press-1", "vibration")
                && dead_letters(ev)
                    .iter()
                    .filter(|d| d.detail.contains("address=2 count=2"))
                    .count()
                    >= 2
        })
        .await;
    assert!(!has_reading(&events, "press-1", "pressure"));
    let stats = source.stats.device("press-1").expect("press-1 stats");
    assert!(
        stats.exceptions(2) >= 3,
        "exceptions(2) = {}",
        stats.exceptions(2)
    );
    assert_eq!(stats.exceptions_total(), stats.exceptions(2));
    assert_eq!(stats.timeouts(), 0);
    assert_eq!(stats.transport_errors(), 0);
    assert!(stats.connected());

    // Once the device answers again, pressure is back.
    press.command("normal");
    let events = source
        .collect_until(Duration::from_secs(10), |ev| {
            has_reading(ev, "press-1", "pressure")
        })
        .await;
    let pressure = readings(&events)
        .into_iter()
        .find(|r| &*r.series.sensor == "pressure")
        .expect("pressure reading");
    assert_eq!(pressure.value, 6.25);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out_and_reconnects_while_another_device_keeps_producing() {
    let mut press = ModbusPeer::tcp("press-1");
    let pump = ModbusPeer::tcp("pump-2");
    let mut source = Running::start(&format!("{}{}", press_1(press.port), pump_2(pump.port)));
    source
        .collect_until(Duration::from_secs(10), |ev| {
            has_reading(ev, "press-1", "temperature") && has_reading(ev, "pump-2", "flow")
        })
        .await;

    // press-1 accepts requests but never answers.
    press.command("silent");
    let start = Instant::now();
    let span = Duration::from_secs(4);
    let events = source.collect_for(span).await;
    let end = Instant::now();
    let all_stats = Arc::clone(&source.stats);
    let stats = all_stats.device("press-1").expect("press-1 stats");
    let timeouts = stats.timeouts();
    assert!(timeouts >= 2, "press-1 timeouts = {timeouts}");
    assert!(stats.polls_skipped() >= 1, "a failing device backs off");
    // The first silent poll may still have delivered part of its reads; after
    // that, nothing from press-1.
    let late_press = events
        .iter()
        .filter(|(at, e)| {
            *at > start + Duration::from_secs(1)
                && matches!(e, IngestEvent::Reading(r, _) if &*r.series.device == "press-1")
        })
        .count();
    assert_eq!(late_press, 0, "a silent device produced readings");
    // pump-2 polls every 100 ms throughout; its longest silence stays far
    // below press-1's timeouts piling up.
    let gap = longest_gap(&events, start, end, "pump-2", "flow");
    assert!(
        gap < Duration::from_millis(1000),
        "pump-2 went quiet for {gap:?}"
    );
    let pump_stats = source.stats.device("pump-2").expect("pump-2 stats");
    assert_eq!(pump_stats.timeouts(), 0);
    assert_eq!(pump_stats.transport_errors(), 0);

    // Answering again: the connection is rebuilt and values flow.
    press.command("normal");
    let reconnects_before = stats.reconnects();
    let events = source
        .collect_until(Duration::from_secs(10), |ev| {
            has_reading(ev, "press-1", "temperature")
        })
        .await;
    let temp = readings(&events)
        .into_iter()
        .find(|r| &*r.series.device == "press-1" && &*r.series.sensor == "temperature")
        .expect("temperature");
    assert_eq!(temp.value, 80.5);
    assert!(
        stats.reconnects() >= 1,
        "reconnects = {}",
        stats.reconnects()
    );
    assert!(stats.reconnects() >= reconnects_before);
    assert!(stats.connected());
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_never_taken_for_a_later_request() {
    let mut press = ModbusPeer::tcp("press-1");
    let mut source = Running::start(&press_1(press.port));
    source
        .collect_until(Duration::from_secs(10), |ev| {
            has_reading(ev, "press-1", "temperature")
        })
        .await;
    let all_stats = Arc::clone(&source.stats);
    let stats = all_stats.device("press-1").expect("press-1 stats");
    let errors_before = stats.transport_errors();

    // Answers now come 1.5 s late, after the 1 s timeout.
    press.command("slow 1500");
    eventually(Duration::from_secs(10), || stats.timeouts() >= 2).await;
    press.command("normal");
    let events = source
        .collect_until(Duration::from_secs(10), |ev| {
            readings(ev)
                .iter()
                .filter(|r| &*r.series.sensor == "temperature")
                .count()
                >= 3
        })
        .await;
    // The late answers went to connections that were already dropped: none
    // was read as the reply to a later request (no transaction id mismatch),
    // and every value is the right one.
    assert_eq!(stats.transport_errors(), errors_before);
    assert!(stats.reconnects() >= 1);
    for r in readings(&events) {
        if &*r.series.sensor == "temperature" {
            assert_eq!(r.value, 80.5);
        }
    }
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_bus_keeps_polling_a_slave_while_another_is_absent() {
    let pty = PtyPair::new();
    // Only unit 3 (tank-4) answers on the line; unit 4 is absent.
    let _tank = ModbusPeer::rtu("tank-4", &pty.b, &[3]);
    let bus = |name: &str, unit: u8| {
        format!(
            r#"
            [[devices]]
            name = "{name}"
            transport = "rtu"
            path = "{}"
            baud-rate = 19200
            parity = "none"
            data-bits = 8
            stop-bits = 1
            unit-id = {unit}
            poll-interval = "100ms"
            timeout = "1s"
            backoff-max = "2s"
            [[devices.registers]]
            sensor = "level"
            function = "holding"
            address = 0
            type = "u16"
            scale = 0.1
            unit = "%"
            "#,
            pty.a.display()
        )
    };
    let mut source = Running::start(&format!("{}{}", bus("tank-4", 3), bus("tank-9", 4)));

    let events = source
        .collect_until(Duration::from_secs(15), |ev| {
            has_reading(ev, "tank-4", "level")
        })
        .await;
    let level = readings(&events)[0];
    assert_eq!(level.value, 553.0 * 0.1 + 0.0);
    assert_eq!(&*level.unit, "%");

    let all_stats = Arc::clone(&source.stats);
    let present = all_stats.device("tank-4").expect("tank-4 stats");
    let (timeouts_before, errors_before) = (present.timeouts(), present.transport_errors());
    let start = Instant::now();
    let events = source.collect_for(Duration::from_secs(5)).await;
    let end = Instant::now();
    assert!(!events.iter().any(|(_, e)| matches!(
        e,
        IngestEvent::Reading(r, _) if &*r.series.device == "tank-9" && &*r.series.sensor == "level"
    )));
    let tank_count = events
        .iter()
        .filter(|(_, e)| matches!(e, IngestEvent::Reading(r, _) if &*r.series.device == "tank-4"))
        .count();
    assert!(tank_count >= 5, "tank-4 readings in 5 s: {tank_count}");
    let gap = longest_gap(&events, start, end, "tank-4", "level");
    assert!(
        gap < Duration::from_millis(1500),
        "tank-4 went quiet for {gap:?}"
    );

    let absent = source.stats.device("tank-9").expect("tank-9 stats");
    assert!(
        absent.timeouts() >= 2,
        "tank-9 timeouts = {}",
        absent.timeouts()
    );
    assert!(!absent.connected());
    assert_eq!(absent.readings(), 0);
    // In steady state, tank-4 never times out behind tank-9 and never takes
    // a late frame for its own answer.
    assert_eq!(present.timeouts(), timeouts_before, "tank-4 timed out");
    assert_eq!(
        present.transport_errors(),
        errors_before,
        "tank-4 transport errors"
    );
    assert!(present.connected());
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_a_source_blocked_on_a_silent_device() {
    let mut press = ModbusPeer::tcp("press-1");
    press.command("silent");
    let config = press_1(press.port).replace("timeout = \"300ms\"", "timeout = \"5s\"");
    let mut source = Running::start(&config);
    // Let the first request go out and hang.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        source.rx.try_recv().is_err(),
        "a silent device produced something"
    );
    source.stop().await;
}

/// `readings` of one series.
fn series<'a>(events: &'a [IngestEvent], device: &str, sensor: &str) -> Vec<&'a Reading> {
    readings(events)
        .into_iter()
        .filter(|r| &*r.series.device == device && &*r.series.sensor == sensor)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_carries_several_unit_ids_on_one_connection_and_a_dead_unit_backs_off_alone() {
    // A Modbus TCP gateway in front of an RS-485 bus: press-1 is unit 1,
    // pump-2 unit 2, and unit 7 is dead (the gateway answers exception 0B).
    let mut gateway = ModbusPeer::units("tcp", &[(1, "press-1"), (2, "pump-2")], &[7]);
    let port = gateway.port;
    let dead = format!(
        r#"
        [[devices]]
        name = "dryer-7"
        transport = "tcp"
        address = "127.0.0.1:{port}"
        unit-id = 7
        poll-interval = "100ms"
        timeout = "1s"
        backoff-max = "400ms"
        [[devices.registers]]
        sensor = "level"
        function = "holding"
        address = 0
        type = "u16"
        "#
    );
    let pump = pump_2(port).replace(
        "transport = \"tcp\"",
        "transport = \"tcp\"\n        unit-id = 2",
    );
    let mut source = Running::start(&format!("{}{pump}{dead}", press_1(port)));
    let all_stats = Arc::clone(&source.stats);
    let dryer = all_stats.device("dryer-7").expect("dryer-7 stats");

    let wanted = [
        ("press-1", "temperature"),
        ("press-1", "pressure"),
        ("press-1", "running"),
        ("pump-2", "flow"),
        ("pump-2", "energy"),
    ];
    let events = source
        .collect_until(Duration::from_secs(15), |ev| {
            wanted.iter().all(|(d, s)| has_reading(ev, d, s)) && dryer.exceptions(0x0B) >= 3
        })
        .await;
    // Each unit answered with its own map, over the one connection.
    assert_eq!(series(&events, "press-1", "temperature")[0].value, 80.5);
    assert_eq!(series(&events, "press-1", "pressure")[0].value, 6.25);
    assert_eq!(series(&events, "pump-2", "flow")[0].value, 42.125);
    assert_eq!(
        series(&events, "pump-2", "energy")[0].value,
        123_456_789_012.0
    );
    // The dead unit is the gateway speaking, not bad data: counted, backed
    // off, never dead-lettered, and the link stays up for the others.
    assert!(
        dead_letters(&events).is_empty(),
        "{:?}",
        dead_letters(&events)
    );
    assert!(!has_reading(&events, "dryer-7", "level"));
    assert_eq!(dryer.readings(), 0);
    assert!(!dryer.connected());
    assert!(dryer.polls_skipped() >= 1, "a dead unit backs off");
    assert_eq!(dryer.exceptions_total(), dryer.exceptions(0x0B));
    for name in ["press-1", "pump-2"] {
        let stats = all_stats.device(name).expect("stats");
        assert_eq!(stats.timeouts(), 0, "{name}");
        assert_eq!(stats.transport_errors(), 0, "{name}");
        assert_eq!(stats.exceptions_total(), 0, "{name}");
        assert_eq!(stats.reconnects(), 0, "{name}");
        assert!(stats.connected(), "{name}");
    }
    assert_eq!(gateway.connections(), 1, "one connection for every unit");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp_reads_the_slaves_behind_a_serial_device_server() {
    // RTU frames (unit id, PDU, CRC) over one TCP connection, as a serial
    // device server in transparent mode forwards them to its RS-485 bus.
    let mut server = ModbusPeer::units("rtu-over-tcp", &[(3, "tank-4"), (4, "press-1")], &[]);
    let press = press_1(server.port).replace("transport = \"tcp\"", "transport = \"rtu-over-tcp\"");
    let press = press.replace("unit-id = 1", "unit-id = 4");
    let tank = format!(
        r#"
        [[devices]]
        name = "tank-4"
        transport = "rtu-over-tcp"
        address = "127.0.0.1:{}"
        unit-id = 3
        poll-interval = "100ms"
        timeout = "1s"
        [[devices.registers]]
        sensor = "level"
        function = "holding"
        address = 0
        type = "u16"
        scale = 0.1
        unit = "%"
        "#,
        server.port
    );
    let mut source = Running::start(&format!("{press}{tank}"));
    let events = source
        .collect_until(Duration::from_secs(15), |ev| {
            series(ev, "tank-4", "level").len() >= 3
                && series(ev, "press-1", "vibration").len() >= 3
                && has_reading(ev, "press-1", "running")
        })
        .await;
    assert!(
        dead_letters(&events).is_empty(),
        "{:?}",
        dead_letters(&events)
    );
    for r in series(&events, "tank-4", "level") {
        assert_eq!(r.value, 553.0 * 0.1 + 0.0);
    }
    for r in series(&events, "press-1", "temperature") {
        assert_eq!(r.value, 80.5);
    }
    for r in series(&events, "press-1", "pressure") {
        assert_eq!(r.value, 6.25);
    }
    for r in series(&events, "press-1", "vibration") {
        assert_eq!(r.value, -37.0 * 0.01 + 0.0);
    }
    for name in ["press-1", "tank-4"] {
        let stats = source.stats.device(name).expect("stats");
        assert_eq!(stats.timeouts(), 0, "{name}");
        assert_eq!(stats.transport_errors(), 0, "{name}");
        assert!(stats.connected(), "{name}");
    }
    assert_eq!(server.connections(), 1, "both slaves over one connection");
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_keeps_its_own_poll_interval_and_64_bit_values_beyond_2_pow_53_are_flagged() {
    let pump = ModbusPeer::tcp("pump-2");
    // The device polls every 100 ms; its odometer (a u64 at 2^60 + 1) only
    // every second.
    let config = format!(
        r#"{}
        [[devices.registers]]
        sensor = "odometer"
        function = "holding"
        address = 24
        type = "u64"
        poll-interval = "1s"
        "#,
        pump_2(pump.port)
    );
    let mut source = Running::start(&config);
    source
        .collect_until(Duration::from_secs(10), |ev| {
            has_reading(ev, "pump-2", "odometer")
        })
        .await;
    let start = Instant::now();
    let events = source
        .collect_until(Duration::from_secs(30), |ev| {
            series(ev, "pump-2", "flow").len() >= 20
        })
        .await;
    let elapsed = start.elapsed();
    let odometer = series(&events, "pump-2", "odometer");
    let most = elapsed.as_secs() + 1;
    assert!(
        odometer.len() as u64 <= most,
        "{} odometer reads in {elapsed:?} at a 1 s interval",
        odometer.len()
    );
    assert!(series(&events, "pump-2", "energy").len() >= 15);

    // 2^60 + 1 has no f64: the nearest one is kept, flagged, and counted.
    let r = odometer
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no odometer reading within {elapsed:?}"));
    assert_eq!(r.value, 1_152_921_504_606_846_976.0);
    assert_eq!(r.quality, millrace_protocol::Quality::Uncertain);
    let energy = series(&events, "pump-2", "energy")[0];
    assert_eq!(energy.quality, millrace_protocol::Quality::Good);
    let stats = source.stats.device("pump-2").expect("pump-2 stats");
    assert!(stats.inexact_readings() >= 2);
    assert!(stats.inexact_readings() < stats.readings() / 5);
    source.stop().await;
}
