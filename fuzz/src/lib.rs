//! The bodies of the fuzz targets, one function per target, so the same code
//! runs under libFuzzer (`fuzz_targets/`, `scripts/fuzz.sh`, nightly) and in
//! the stable replay of the committed corpus (`tests/replay.rs`). Every
//! function must return for any input; a panic is a bug found.

use millrace_agent::ingest::decode::{DecodeLimits, Decoder, PayloadFormat, SubscriptionConfig};
use millrace_agent::ingest::{Delivery, IngestEvent};
use millrace_protocol::Batch;
use std::sync::OnceLock;

/// Target names, as directories under `corpus/` and `regressions/`.
pub const TARGETS: [&str; 6] = [
    "mqtt_payload",
    "sparkplug_payload",
    "wire_batch",
    "ingest_body",
    "modbus_decode",
    "store_codecs",
];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "mqtt_payload" => mqtt_payload(data),
        "sparkplug_payload" => sparkplug_payload(data),
        "wire_batch" => wire_batch(data),
        "ingest_body" => ingest_body(data),
        "modbus_decode" => modbus_decode(data),
        "store_codecs" => store_codecs(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

const FORMATS: [PayloadFormat; 4] = [
    PayloadFormat::Json,
    PayloadFormat::JsonMulti,
    PayloadFormat::JsonBatch,
    PayloadFormat::Number,
];

/// The MQTT payload decoder of every format, under the default limits: the
/// first byte picks the format, the second the topic; at most one dead
/// letter per message, holding at most `dead-letter-bytes` of it.
pub fn mqtt_payload(data: &[u8]) {
    static DECODERS: OnceLock<Vec<Decoder>> = OnceLock::new();
    let decoders = DECODERS.get_or_init(|| {
        FORMATS
            .iter()
            .map(|&format| {
                let mut sub = SubscriptionConfig::new("plant/#", format);
                if format == PayloadFormat::JsonMulti {
                    sub.sensor = Some("{field}".into());
                }
                Decoder::new(&[sub], 256 * 1024, "fuzz").expect("a valid rule")
            })
            .collect()
    });
    let [f, t, payload @ ..] = data else {
        return;
    };
    let topics = [
        "plant/press-1/temp",
        "plant/a",
        "plant/ü/∆/x",
        "other/topic",
        "plant//",
    ];
    let mut decoder = decoders[usize::from(*f) % FORMATS.len()].clone();
    let topic = topics[usize::from(*t) % topics.len()];
    let mut out = Vec::new();
    decoder.decode(
        topic,
        payload,
        1_700_000_000_000,
        Delivery::AtLeastOnce { redelivered: false },
        &mut out,
    );
    let limits = DecodeLimits::default();
    let dead: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            IngestEvent::DeadLetter(d) => Some(d),
            _ => None,
        })
        .collect();
    assert!(
        dead.len() <= 1,
        "{} dead letters for one message",
        dead.len()
    );
    for d in dead {
        assert!(d.input.len() <= limits.dead_letter_bytes);
    }
}

/// The Sparkplug B decoder of a node and device already born (the BIRTHs a
/// pysparkplug edge node published, from the seed corpus): the first byte
/// picks the message type, the rest is the payload. At most one dead letter
/// and one Rebirth request per message.
pub fn sparkplug_payload(data: &[u8]) {
    const TOPICS: [&str; 6] = [
        "spBv1.0/g1/NDATA/e1",
        "spBv1.0/g1/NBIRTH/e1",
        "spBv1.0/g1/DDATA/e1/d1",
        "spBv1.0/g1/DBIRTH/e1/d1",
        "spBv1.0/g1/NDEATH/e1",
        "spBv1.0/g1/DDEATH/e1/d1",
    ];
    static BORN: OnceLock<Decoder> = OnceLock::new();
    let born = BORN.get_or_init(|| {
        let mut sub = SubscriptionConfig::new("spBv1.0/#", PayloadFormat::SparkplugB);
        sub.commands = true;
        let mut decoder = Decoder::new(&[sub], 256 * 1024, "fuzz").expect("a valid rule");
        let mut out = Vec::new();
        for (topic, seed) in [
            (
                TOPICS[1],
                &include_bytes!("../corpus/sparkplug_payload/nbirth")[1..],
            ),
            (
                TOPICS[3],
                &include_bytes!("../corpus/sparkplug_payload/dbirth")[1..],
            ),
        ] {
            decoder.decode(topic, seed, 1_700_000_000_000, Delivery::Once, &mut out);
        }
        assert!(
            out.iter().all(|e| matches!(e, IngestEvent::Reading(..))),
            "the seed BIRTHs decode: {out:?}"
        );
        decoder
    });
    let [t, payload @ ..] = data else {
        return;
    };
    let mut decoder = born.clone();
    let mut out = Vec::new();
    decoder.decode(
        TOPICS[usize::from(*t) % TOPICS.len()],
        payload,
        1_700_000_000_000,
        Delivery::AtLeastOnce { redelivered: false },
        &mut out,
    );
    let dead = out
        .iter()
        .filter(|e| matches!(e, IngestEvent::DeadLetter(_)))
        .count();
    assert!(dead <= 1, "{dead} dead letters for one message");
    assert!(decoder.take_commands().len() <= 1);
}

/// The wire batch decoders; a binary batch that decodes re-encodes and
/// decodes to the same batch.
pub fn wire_batch(data: &[u8]) {
    let _ = Batch::decode_json(data);
    if let Ok(batch) = Batch::decode_binary(data) {
        let again =
            Batch::decode_binary(&batch.encode_binary()).expect("a decoded batch round-trips");
        assert_eq!(format!("{batch:?}"), format!("{again:?}"));
    }
}

/// The aggregator's request body decoding (content type and encoding from
/// the first byte, gzip bounded by a 1 MiB limit).
pub fn ingest_body(data: &[u8]) {
    use axum::http::{header, HeaderMap, HeaderValue};
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    let content_type = if selector & 1 == 0 {
        "application/x-millrace-batch"
    } else {
        "application/json"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let body = if selector & 2 != 0 {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        if selector & 4 != 0 {
            // A valid gzip stream around the bytes, so the decoders behind it are reached.
            use std::io::Write;
            let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(body).expect("in memory");
            z.finish().expect("in memory")
        } else {
            body.to_vec()
        }
    } else {
        body.to_vec()
    };
    let _ = millrace_aggregator::ingest::decode_body(&headers, bytes::Bytes::from(body), 1 << 20);
}

/// The Modbus register value decoder.
pub fn modbus_decode(data: &[u8]) {
    millrace_agent::fuzzing::modbus_decode(data);
}

/// The journal, outbox, baseline and mark codecs of the agent's store.
pub fn store_codecs(data: &[u8]) {
    millrace_agent::fuzzing::store_codecs(data);
}
