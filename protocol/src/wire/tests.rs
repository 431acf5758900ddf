use super::*;
use crate::records::*;
use proptest::prelude::*;

fn finite() -> impl Strategy<Value = f64> {
    -1e12f64..1e12f64
}

fn series() -> impl Strategy<Value = SeriesKey> {
    ("[a-z0-9_-]{1,12}", "[a-z0-9_./-]{1,16}").prop_map(|(d, s)| SeriesKey::new(d, s))
}

fn score() -> impl Strategy<Value = AnomalyScore> {
    (finite(), finite(), 0.0f64..1e6, 0.0f64..=1.0, 0usize..3).prop_map(|(z, m, s, p, sev)| {
        AnomalyScore {
            z,
            baseline_mean: m,
            baseline_stddev: s,
            p_value: p,
            severity: [Severity::Normal, Severity::Warning, Severity::Critical][sev],
        }
    })
}

fn window() -> impl Strategy<Value = Window> {
    (
        "[a-z0-9-]{1,8}",
        series(),
        -1_000_000i64..4_000_000_000_000,
        1u64..100_000,
        (finite(), finite(), finite(), 0.0f64..1e6),
        proptest::option::of(score()),
        "[a-zA-Z%]{0,5}",
    )
        .prop_map(
            |(agent, series, start, count, (mean, min, max, sd), score, unit)| Window {
                agent: agent.into(),
                series,
                start_ms: start,
                end_ms: start + 5000,
                count,
                mean,
                min,
                max,
                stddev: sd,
                first_event_ms: start,
                last_event_ms: start + 4999,
                unit: unit.into(),
                score,
            },
        )
}

fn alert() -> impl Strategy<Value = Alert> {
    (
        "[a-z0-9-]{1,8}",
        series(),
        any::<bool>(),
        any::<i64>(),
        finite(),
        score(),
    )
        .prop_map(|(agent, series, spike, t, value, score)| Alert {
            agent: agent.into(),
            series,
            kind: if spike {
                AlertKind::Spike
            } else {
                AlertKind::Window
            },
            time_ms: t,
            window_start_ms: t - t.rem_euclid(5000),
            value,
            score,
            unit: "bar".into(),
        })
}

fn dead_letter() -> impl Strategy<Value = DeadLetter> {
    (
        proptest::collection::vec(any::<u8>(), 0..64),
        0usize..DeadLetterReason::ALL.len(),
        "[ -~]{0,20}",
        any::<i64>(),
    )
        .prop_map(|(input, r, detail, t)| {
            DeadLetter::new(
                Source::Mqtt,
                "a/b",
                input,
                DeadLetterReason::ALL[r],
                detail,
                t,
            )
        })
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        window().prop_map(Record::Window),
        alert().prop_map(Record::Alert),
        dead_letter().prop_map(Record::DeadLetter),
    ]
}

fn status() -> impl Strategy<Value = AgentStatus> {
    (
        "[0-9.a-z-]{0,12}",
        any::<u64>(),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        proptest::option::of(any::<u64>()),
        (any::<u64>(), any::<u64>(), any::<u32>()),
    )
        .prop_map(
            |(
                agent_version,
                uptime_s,
                (records, bytes, max),
                oldest,
                (dropped, retries, failures),
            )| {
                AgentStatus {
                    agent_version,
                    uptime_s,
                    outbox_records: records,
                    outbox_bytes: bytes,
                    outbox_max_bytes: max,
                    outbox_oldest_age_ms: oldest,
                    outbox_dropped_total: dropped,
                    uplink_retries_total: retries,
                    uplink_failures: failures,
                }
            },
        )
}

/// A batch of either wire version; version 1 never has a status.
fn batch() -> impl Strategy<Value = Batch> {
    (
        "[a-z0-9-]{1,12}",
        any::<u32>(),
        proptest::collection::vec((1u64..1000, record()), 0..20),
        MIN_WIRE_VERSION..=WIRE_VERSION,
        proptest::option::of(status()),
    )
        .prop_map(|(agent, base, recs, version, status)| {
            let mut seq = u64::from(base);
            let records = recs
                .into_iter()
                .map(|(step, record)| {
                    seq += step;
                    Envelope { seq, record }
                })
                .collect();
            let mut batch = Batch::new(agent, records);
            batch.version = version;
            if version >= 2 {
                batch.status = status;
            }
            batch
        })
}

proptest! {
    #[test]
    fn binary_round_trip(b in batch()) {
        let bytes = b.encode_binary();
        prop_assert_eq!(Batch::decode_binary(&bytes).unwrap(), b);
    }

    #[test]
    fn json_round_trip(b in batch()) {
        let bytes = b.encode_json();
        let back = Batch::decode_json(&bytes).unwrap();
        // JSON floats round-trip exactly with serde_json's shortest representation.
        prop_assert_eq!(back, b);
    }

    #[test]
    fn truncated_binary_is_an_error(b in batch(), cut in 0usize..10_000) {
        let bytes = b.encode_binary();
        let cut = cut % bytes.len().max(1);
        prop_assert!(Batch::decode_binary(&bytes[..cut]).is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Batch::decode_binary(&bytes);
        let _ = Batch::decode_json(&bytes);
        // Valid header, random body: must still be an error or a valid batch.
        let mut framed = b"MLRC\x01".to_vec();
        framed.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        framed.extend_from_slice(&bytes);
        if let Ok(b) = Batch::decode_binary(&framed) {
            prop_assert!(b.validate().is_ok());
        }
    }

    #[test]
    fn flipped_bit_is_detected(b in batch(), pos in any::<usize>(), bit in 0u8..8) {
        let mut bytes = b.encode_binary();
        let pos = pos % bytes.len();
        bytes[pos] ^= 1 << bit;
        prop_assert!(Batch::decode_binary(&bytes).is_err());
    }
}

#[test]
fn out_of_order_seq_is_rejected() {
    let dl = || {
        Record::DeadLetter(DeadLetter::new(
            Source::Modbus,
            "plc1",
            vec![],
            DeadLetterReason::DeviceException,
            "0x02",
            0,
        ))
    };
    let b = Batch::new(
        "gw",
        vec![
            Envelope {
                seq: 5,
                record: dl(),
            },
            Envelope {
                seq: 5,
                record: dl(),
            },
        ],
    );
    assert_eq!(
        Batch::decode_binary(&b.encode_binary()),
        Err(WireError::SeqOrder {
            index: 1,
            prev: 5,
            seq: 5
        })
    );
    assert!(matches!(
        Batch::decode_json(&b.encode_json()),
        Err(WireError::SeqOrder { .. })
    ));
}

#[test]
fn wrong_version_and_magic_are_named() {
    let b = Batch::new("gw", vec![]);
    let mut bytes = b.encode_binary();
    bytes[4] = 9;
    assert_eq!(
        Batch::decode_binary(&bytes),
        Err(WireError::UnsupportedVersion(9))
    );
    bytes[0] = b'X';
    assert_eq!(Batch::decode_binary(&bytes), Err(WireError::BadMagic));
    assert_eq!(Batch::decode_binary(b"MLR"), Err(WireError::Truncated(3)));
}

/// Version 1 bytes as an agent before [`AgentStatus`] wrote them (header,
/// CRC and postcard body built by hand): still read, without a status.
#[test]
fn version_1_batches_are_still_read() {
    #[derive(serde::Serialize)]
    struct V1<'a> {
        agent: &'a str,
        outbox_floor: u64,
        records: &'a [Envelope],
    }
    let records = vec![Envelope {
        seq: 42,
        record: Record::DeadLetter(DeadLetter::new(
            Source::Modbus,
            "plc1",
            vec![1, 2],
            DeadLetterReason::DeviceException,
            "0x02",
            7,
        )),
    }];
    let body = postcard::to_stdvec(&V1 {
        agent: "gw-old",
        outbox_floor: 40,
        records: &records,
    })
    .unwrap();
    let mut bytes = b"MLRC".to_vec();
    bytes.push(1);
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let batch = Batch::decode_binary(&bytes).unwrap();
    assert_eq!(batch.version, 1);
    assert_eq!(batch.agent, "gw-old");
    assert_eq!(batch.outbox_floor, 40);
    assert_eq!(batch.records, records);
    assert_eq!(batch.status, None);
    // And written back in the same layout, byte for byte.
    assert_eq!(batch.encode_binary(), bytes);

    let json = r#"{"version":1,"agent":"gw-old","outbox_floor":0,"records":[]}"#;
    assert_eq!(Batch::decode_json(json.as_bytes()).unwrap().status, None);
}

#[test]
fn new_batches_carry_the_agent_status() {
    let status = AgentStatus {
        agent_version: "0.1.0".into(),
        uptime_s: 3600,
        outbox_records: 1200,
        outbox_bytes: 96_000,
        outbox_max_bytes: 1 << 30,
        outbox_oldest_age_ms: Some(31_000),
        outbox_dropped_total: 0,
        uplink_retries_total: 17,
        uplink_failures: 0,
    };
    let b = Batch::new("gw", vec![]).with_status(status.clone());
    assert_eq!(b.version, WIRE_VERSION);
    let bytes = b.encode_binary();
    assert_eq!(bytes[4], 2);
    assert_eq!(
        Batch::decode_binary(&bytes).unwrap().status,
        Some(status.clone())
    );
    let json: serde_json::Value = serde_json::from_slice(&b.encode_json()).unwrap();
    assert_eq!(json["status"]["outbox_oldest_age_ms"], 31_000);
    assert_eq!(json["status"]["uplink_retries_total"], 17);
    // A version 1 batch cannot claim a status.
    let mut old = b;
    old.version = 1;
    assert!(matches!(
        Batch::decode_json(&old.encode_json()),
        Err(WireError::Body(_))
    ));
}

#[test]
fn dead_letter_json_keeps_text_readable() {
    let dl = DeadLetter::new(
        Source::Mqtt,
        "t",
        b"{\"v\":oops}".to_vec(),
        DeadLetterReason::Malformed,
        "x",
        1,
    );
    let json = serde_json::to_string(&dl).unwrap();
    assert!(json.contains(r#""input":"{\"v\":oops}""#), "{json}");
    let bin = DeadLetter::new(
        Source::Mqtt,
        "t",
        vec![0xff, 0],
        DeadLetterReason::Malformed,
        "x",
        1,
    );
    let back: DeadLetter = serde_json::from_str(&serde_json::to_string(&bin).unwrap()).unwrap();
    assert_eq!(back, bin);
}

#[test]
fn dead_letter_for_nan_reading_is_json() {
    let r = Reading {
        series: SeriesKey::new("d", "s"),
        time_ms: 10,
        value: f64::NAN,
        unit: "".into(),
        source: Source::Mqtt,
        quality: Quality::Good,
    };
    let dl = DeadLetter::for_reading(&r, DeadLetterReason::NotANumber, 20);
    assert!(dl.detail.contains("NaN"));
    assert!(serde_json::from_slice::<serde_json::Value>(&dl.input).is_ok());
}
