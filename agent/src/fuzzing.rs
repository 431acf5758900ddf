//! Entry points for the fuzz targets of `fuzz/`: the agent's decoders of
//! untrusted or on-disk bytes, reachable from outside the crate. Not an API.

use crate::ingest::modbus::{decode, DataType, WordOrder};
use crate::store::codec::{self, JournalEntry};
use millrace_protocol::{Reading, Record};

/// Every store decoder on `data` as stored, then on `data` framed with a
/// valid header and checksum so the body decoders are reached too. Must
/// never panic: a corrupt entry is counted and quarantined, not a crash.
pub fn store_codecs(data: &[u8]) {
    decode_stored(data);
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let framed = match selector % 3 {
        0 => frame(codec::VALUE_VERSION, rest, None),
        1 => {
            let (count, body) = rest.split_at(rest.len().min(4));
            let mut n = [0u8; 4];
            n[..count.len()].copy_from_slice(count);
            frame(
                codec::BLOCK_VERSION,
                body,
                Some(u32::from_le_bytes(n) % 4096),
            )
        }
        _ => frame(codec::VALUE_VERSION, rest, None),
    };
    decode_stored(&framed);
    // A value that decodes re-encodes to itself.
    if let Ok((ms, record)) = codec::decode_value::<Record>(&framed) {
        let again = codec::encode_record(ms, &record).expect("a decoded record encodes");
        let (ms2, record2) = codec::decode_value::<Record>(&again).expect("round trip");
        assert_eq!(ms, ms2);
        assert_eq!(format!("{record:?}"), format!("{record2:?}"));
    }
}

fn decode_stored(data: &[u8]) {
    if let Ok((_, JournalEntry::Block { count, body })) = codec::decode_journal_entry(data) {
        let _ = codec::block_readings(count, body);
        let _ = codec::block_views(count, body, |_| {});
    }
    let _ = codec::decode_value::<Record>(data);
    let _ = codec::decode_value::<Reading>(data);
    let _ = codec::decode_value::<crate::store::History>(data);
    let _ = codec::value_appended_ms(data);
    let _ = codec::decode_mark(data);
    let _ = codec::decode_series_key(data);
    let _ = codec::decode_meta_u64(data);
    let _ = codec::decode_u64_key(data);
}

/// `body` behind a header of `version` with a correct checksum.
fn frame(version: u8, body: &[u8], count: Option<u32>) -> Vec<u8> {
    let mut out = vec![version, 0, 0, 0, 0];
    out.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
    if let Some(count) = count {
        out.extend_from_slice(&count.to_le_bytes());
    }
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The Modbus register value decoder: data type and word order from the
/// first two bytes, the registers from the rest.
pub fn modbus_decode(data: &[u8]) {
    const TYPES: [DataType; 9] = [
        DataType::Bool,
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
    ];
    const ORDERS: [WordOrder; 4] = [
        WordOrder::Abcd,
        WordOrder::Cdab,
        WordOrder::Badc,
        WordOrder::Dcba,
    ];
    let [t, o, rest @ ..] = data else {
        return;
    };
    let words: Vec<u16> = rest
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    let data_type = TYPES[usize::from(*t) % TYPES.len()];
    let order = ORDERS[usize::from(*o) % ORDERS.len()];
    if let Ok(v) = decode(data_type, order, &words) {
        // Integer types of one or two registers are exact.
        if matches!(
            data_type,
            DataType::U16 | DataType::I16 | DataType::U32 | DataType::I32
        ) {
            assert!(
                v.is_finite() && v.fract() == 0.0,
                "{data_type:?} {words:?} → {v}"
            );
        }
    }
}
