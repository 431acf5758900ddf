//! Key and value encodings of the store (see the layout in the module docs of
//! [`crate::store`]). Decoding never panics: a value that fails its checksum or
//! does not decode is reported as [`Corrupt`] and the caller counts and skips it.

use millrace_protocol::{Reading, Record, SeriesKey, UnixMs};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Version byte at the start of every stored value.
pub(crate) const VALUE_VERSION: u8 = 1;
/// `version (1) | crc32 LE (4) | appended_ms BE (8)`, then the postcard body.
pub(crate) const VALUE_HEADER_LEN: usize = 1 + 4 + 8;

/// A stored value that cannot be trusted: bad version, bad checksum, or an
/// undecodable body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// Big-endian `u64` key: byte order equals numeric order, so fjall iterates
/// in `seq` (or journal position) order.
pub(crate) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(crate) fn decode_u64_key(key: &[u8]) -> Result<u64, Corrupt> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| Corrupt)?;
    Ok(u64::from_be_bytes(bytes))
}

/// `version | crc32(appended_ms ++ body) | appended_ms | postcard(body)`.
pub(crate) fn encode_value<T: Serialize>(
    appended_ms: UnixMs,
    body: &T,
) -> Result<Vec<u8>, postcard::Error> {
    let mut out = vec![0u8; VALUE_HEADER_LEN];
    out[0] = VALUE_VERSION;
    out[5..VALUE_HEADER_LEN].copy_from_slice(&appended_ms.to_be_bytes());
    let mut out = postcard::to_extend(body, out)?;
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks version and checksum and returns the append time, without decoding
/// the body.
pub(crate) fn value_appended_ms(value: &[u8]) -> Result<UnixMs, Corrupt> {
    if value.len() < VALUE_HEADER_LEN || value[0] != VALUE_VERSION {
        return Err(Corrupt);
    }
    let expected = u32::from_le_bytes([value[1], value[2], value[3], value[4]]);
    if crc32fast::hash(&value[5..]) != expected {
        return Err(Corrupt);
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&value[5..VALUE_HEADER_LEN]);
    Ok(UnixMs::from_be_bytes(ms))
}

pub(crate) fn decode_value<T: DeserializeOwned>(value: &[u8]) -> Result<(UnixMs, T), Corrupt> {
    let appended_ms = value_appended_ms(value)?;
    let body = postcard::from_bytes(&value[VALUE_HEADER_LEN..]).map_err(|_| Corrupt)?;
    Ok((appended_ms, body))
}

pub(crate) fn encode_record(
    appended_ms: UnixMs,
    record: &Record,
) -> Result<Vec<u8>, postcard::Error> {
    encode_value(appended_ms, record)
}

#[cfg(test)]
pub(crate) fn encode_reading(
    appended_ms: UnixMs,
    reading: &Reading,
) -> Result<Vec<u8>, postcard::Error> {
    encode_value(appended_ms, reading)
}

/// Version byte of a journal block: many readings in one stored value.
pub(crate) const BLOCK_VERSION: u8 = 2;
/// `version (1) | crc32 LE (4) | appended_ms BE (8) | count u32 LE (4)`.
pub(crate) const BLOCK_HEADER_LEN: usize = VALUE_HEADER_LEN + 4;

/// Appends one reading to a block body (postcard, readings back to back).
pub(crate) fn push_block_reading(
    body: Vec<u8>,
    reading: &Reading,
) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(reading, body)
}

/// `version 2 | crc32(rest) | appended_ms | count | body`.
pub(crate) fn encode_block(appended_ms: UnixMs, count: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK_HEADER_LEN + body.len());
    out.push(BLOCK_VERSION);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&appended_ms.to_be_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A journal entry as stored: one reading (version 1, written by earlier
/// releases) or a block of readings (version 2).
#[derive(Debug)]
pub(crate) enum JournalEntry<'a> {
    Single(Reading),
    Block { count: u32, body: &'a [u8] },
}

/// Checks a journal value and returns its append time and readings.
pub(crate) fn decode_journal_entry(value: &[u8]) -> Result<(UnixMs, JournalEntry<'_>), Corrupt> {
    match value.first() {
        Some(&VALUE_VERSION) => {
            let (ms, reading) = decode_value::<Reading>(value)?;
            Ok((ms, JournalEntry::Single(reading)))
        }
        Some(&BLOCK_VERSION) if value.len() >= BLOCK_HEADER_LEN => {
            let expected = u32::from_le_bytes([value[1], value[2], value[3], value[4]]);
            if crc32fast::hash(&value[5..]) != expected {
                return Err(Corrupt);
            }
            let mut ms = [0u8; 8];
            ms.copy_from_slice(&value[5..VALUE_HEADER_LEN]);
            let mut count = [0u8; 4];
            count.copy_from_slice(&value[VALUE_HEADER_LEN..BLOCK_HEADER_LEN]);
            Ok((
                UnixMs::from_be_bytes(ms),
                JournalEntry::Block {
                    count: u32::from_le_bytes(count),
                    body: &value[BLOCK_HEADER_LEN..],
                },
            ))
        }
        _ => Err(Corrupt),
    }
}

/// A reading of a block, borrowed from it (no allocation): the fields of
/// [`Reading`] in its postcard order.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ReadingView<'a> {
    #[serde(borrow)]
    pub series: SeriesView<'a>,
    pub time_ms: UnixMs,
    #[allow(dead_code)]
    pub value: f64,
    #[allow(dead_code)]
    pub unit: &'a str,
    #[allow(dead_code)]
    pub source: millrace_protocol::Source,
    #[allow(dead_code)]
    pub quality: millrace_protocol::Quality,
}

/// A series key borrowed from a block; hashes like [`SeriesKey`], so maps
/// keyed by `SeriesKey` can be probed with it.
#[derive(Debug, Hash, serde::Deserialize)]
pub(crate) struct SeriesView<'a> {
    pub device: &'a str,
    pub sensor: &'a str,
}

impl hashbrown::Equivalent<SeriesKey> for SeriesView<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        *key.device == *self.device && *key.sensor == *self.sensor
    }
}

/// Walks the `count` readings of a block body; `Err` if it does not decode.
pub(crate) fn block_views(
    count: u32,
    mut body: &[u8],
    mut each: impl FnMut(ReadingView<'_>),
) -> Result<(), Corrupt> {
    for _ in 0..count {
        let (view, rest) =
            postcard::take_from_bytes::<ReadingView<'_>>(body).map_err(|_| Corrupt)?;
        each(view);
        body = rest;
    }
    if body.is_empty() {
        Ok(())
    } else {
        Err(Corrupt)
    }
}

/// The readings of a block, owned (replay).
pub(crate) fn block_readings(count: u32, mut body: &[u8]) -> Result<Vec<Reading>, Corrupt> {
    // The count comes from disk: every reading takes at least one byte, so
    // the body bounds what is worth reserving.
    let mut out = Vec::with_capacity((count as usize).min(body.len()));
    for _ in 0..count {
        let (reading, rest) = postcard::take_from_bytes::<Reading>(body).map_err(|_| Corrupt)?;
        out.push(reading);
        body = rest;
    }
    if body.is_empty() {
        Ok(out)
    } else {
        Err(Corrupt)
    }
}

/// Key of a closed-up-to mark: the postcard form of the series key
/// (length-prefixed strings, so no separator can collide).
pub(crate) fn series_key(series: &SeriesKey) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(series)
}

pub(crate) fn decode_series_key(key: &[u8]) -> Result<SeriesKey, Corrupt> {
    postcard::from_bytes(key).map_err(|_| Corrupt)
}

/// Value of a closed-up-to mark: `window_end_ms` big-endian, then its crc32 LE.
pub(crate) fn encode_mark(window_end_ms: UnixMs) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&window_end_ms.to_be_bytes());
    let crc = crc32fast::hash(&out[..8]);
    out[8..].copy_from_slice(&crc.to_le_bytes());
    out
}

pub(crate) fn decode_mark(value: &[u8]) -> Result<UnixMs, Corrupt> {
    let bytes: [u8; 12] = value.try_into().map_err(|_| Corrupt)?;
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if crc32fast::hash(&bytes[..8]) != crc {
        return Err(Corrupt);
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&bytes[..8]);
    Ok(UnixMs::from_be_bytes(ms))
}

/// A `u64` meta value: big-endian, then its crc32 LE.
pub(crate) fn encode_meta_u64(n: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&n.to_be_bytes());
    let crc = crc32fast::hash(&out[..8]);
    out[8..].copy_from_slice(&crc.to_le_bytes());
    out
}

pub(crate) fn decode_meta_u64(value: &[u8]) -> Result<u64, Corrupt> {
    // Same layout as a mark, reinterpreted as unsigned.
    decode_mark(value).map(|v| v as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use millrace_protocol::{DeadLetter, DeadLetterReason, Source};

    fn record() -> Record {
        Record::DeadLetter(DeadLetter::new(
            Source::Mqtt,
            "plant/a",
            vec![0, 159, 146, 150],
            DeadLetterReason::Malformed,
            "bad",
            1,
        ))
    }

    #[test]
    fn value_round_trips() {
        let v = encode_record(1_700_000_000_123, &record()).unwrap();
        let (ms, back): (UnixMs, Record) = decode_value(&v).unwrap();
        assert_eq!(ms, 1_700_000_000_123);
        assert_eq!(back, record());
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let v = encode_record(42, &record()).unwrap();
        for byte in 0..v.len() {
            for bit in 0..8 {
                let mut bad = v.clone();
                bad[byte] ^= 1 << bit;
                assert_eq!(
                    decode_value::<Record>(&bad).map(|_| ()),
                    Err(Corrupt),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncated_values_are_corrupt_not_panics() {
        let v = encode_record(42, &record()).unwrap();
        for len in 0..v.len() {
            assert_eq!(decode_value::<Record>(&v[..len]).map(|_| ()), Err(Corrupt));
        }
    }

    #[test]
    fn keys_sort_numerically() {
        let mut keys: Vec<[u8; 8]> = [300u64, 2, 1 << 40, 255, 256]
            .iter()
            .map(|n| u64_key(*n))
            .collect();
        keys.sort();
        let back: Vec<u64> = keys.iter().map(|k| decode_u64_key(k).unwrap()).collect();
        assert_eq!(back, vec![2, 255, 256, 300, 1 << 40]);
        assert_eq!(decode_u64_key(&[1, 2, 3]), Err(Corrupt));
    }

    #[test]
    fn marks_and_meta_round_trip_and_detect_damage() {
        assert_eq!(decode_mark(&encode_mark(-5_000)).unwrap(), -5_000);
        assert_eq!(
            decode_meta_u64(&encode_meta_u64(u64::MAX - 1)).unwrap(),
            u64::MAX - 1
        );
        let mut bad = encode_mark(10_000);
        bad[3] ^= 0x10;
        assert_eq!(decode_mark(&bad), Err(Corrupt));
        let s = SeriesKey::new("plc/1", "temp");
        assert_eq!(decode_series_key(&series_key(&s).unwrap()).unwrap(), s);
    }
}
