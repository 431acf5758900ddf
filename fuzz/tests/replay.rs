//! Replays every committed input of `corpus/<target>/` and
//! `regressions/<target>/` through its target: fast, on stable, in every
//! test run, so a crash once found and fixed stays fixed.

use std::path::Path;

#[test]
fn every_committed_input_runs_through_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut total = 0;
    for target in millrace_fuzz::TARGETS {
        let mut seen = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| millrace_fuzz::run(target, &data));
                assert!(outcome.is_ok(), "{target}: {} panics", path.display());
                seen += 1;
            }
        }
        assert!(seen > 0, "no corpus for {target}");
        total += seen;
    }
    eprintln!("replayed {total} inputs");
}

/// Writes the seed inputs of `corpus/` (run by hand after a format change:
/// `cargo test -p millrace-fuzz -- --ignored write_seed_corpus`).
#[test]
#[ignore = "writes the seed corpus"]
fn write_seed_corpus() {
    use millrace_protocol::*;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let json: [(&str, u8, &str); 6] = [
        (
            "json",
            0,
            r#"{"ts": 1700000000000, "value": 80.1, "unit": "degC"}"#,
        ),
        (
            "multi",
            1,
            r#"{"ts": 1700000000000, "humidity": 45.2, "ambient": 22.1, "state": "ok"}"#,
        ),
        (
            "batch",
            2,
            r#"[{"series": "boiler-3/temp", "ts": 1700000000000, "value": 1.5}, 42, {"value": "x"}]"#,
        ),
        ("number", 3, "80.25"),
        (
            "escaped",
            0,
            r#"{"ts": 1.7e12, "value": true, "unit": "\u00b0C"}"#,
        ),
        (
            "nested",
            1,
            r#"{"a": {"b": [1, 2, {"c": null}]}, "v": -0.0}"#,
        ),
    ];
    for (name, format, payload) in json {
        let mut data = vec![format, 0];
        data.extend_from_slice(payload.as_bytes());
        write("mqtt_payload", name, &data);
    }
    let series = SeriesKey::new("press-1", "temperature");
    let window = Window {
        agent: "gw-1".into(),
        series: series.clone(),
        start_ms: 1_700_000_000_000,
        end_ms: 1_700_000_005_000,
        count: 5,
        mean: 80.0,
        min: 79.0,
        max: 81.0,
        stddev: 0.5,
        first_event_ms: 1_700_000_000_000,
        last_event_ms: 1_700_000_004_000,
        unit: "degC".into(),
        score: None,
    };
    let dead = DeadLetter::new(
        Source::Mqtt,
        "plant/a/b",
        b"{bad".to_vec(),
        DeadLetterReason::Malformed,
        "invalid JSON",
        1_700_000_000_000,
    );
    let batch = Batch::new(
        "gw-1",
        vec![
            Envelope {
                seq: 1,
                record: Record::Window(window.clone()),
            },
            Envelope {
                seq: 2,
                record: Record::DeadLetter(dead),
            },
        ],
    );
    let binary = batch.encode_binary();
    write("wire_batch", "binary", &binary);
    write("wire_batch", "json", &serde_json::to_vec(&batch).unwrap());
    for (name, selector, body) in [
        ("binary", 0u8, binary.clone()),
        ("json", 1, serde_json::to_vec(&batch).unwrap()),
        ("binary-gzip", 6, binary.clone()),
    ] {
        let mut data = vec![selector];
        data.extend_from_slice(&body);
        write("ingest_body", name, &data);
    }
    for (name, data) in [
        ("f32", vec![7u8, 0, 0x42, 0xa0, 0x40, 0x00]),
        (
            "u64",
            vec![5, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("bool", vec![0, 0, 0, 1]),
        ("f64", vec![8, 3, 1, 2, 3, 4, 5, 6, 7, 8]),
    ] {
        write("modbus_decode", name, &data);
    }
    let mut record = vec![0u8];
    record.extend(postcard::to_stdvec(&Record::Window(window)).unwrap());
    write("store_codecs", "record", &record);
    let reading = Reading {
        series,
        time_ms: 1_700_000_000_000,
        value: 80.5,
        unit: "degC".into(),
        source: Source::Modbus,
        quality: Quality::Good,
    };
    let mut block = vec![1u8, 2, 0, 0, 0];
    for _ in 0..2 {
        block.extend(postcard::to_stdvec(&reading).unwrap());
    }
    write("store_codecs", "block", &block);
    write("store_codecs", "short", &[2, 1, 2, 3]);
}
