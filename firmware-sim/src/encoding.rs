//! Engineering values to Modbus registers: data types, scale and word/byte order.
//!
//! A 32- or 64-bit value is first written as big-endian bytes (`A B C D`, or
//! `B0..B7`), then laid into consecutive 16-bit registers (high byte first on
//! the wire) according to a [`WordOrder`]:
//!
//! | order  | 32-bit registers | meaning                                    |
//! |--------|------------------|--------------------------------------------|
//! | `ABCD` | `AB CD`          | big-endian, straight                       |
//! | `CDAB` | `CD AB`          | word sequence reversed, bytes kept         |
//! | `BADC` | `BA DC`          | words in order, bytes swapped in each word |
//! | `DCBA` | `DC BA`          | all bytes reversed (little-endian)         |
//!
//! The same definition applies to 64-bit values word by word. 16-bit types
//! occupy one register and have no order.
//!
//! Integer types carry a `scale`: `raw = round(value / scale)`, saturating at
//! the type's range (a PLC's clamp, never a panic); NaN encodes as 0.
//! Values are `f64`, so 64-bit integers are exact up to 2^53 (a counter at
//! 100 Wh/s takes millennia to get there).
//!
//! What it is not: a decoder. The agent owns decoding; the tests here carry
//! their own independent decoder to check the round trip.

use serde::Deserialize;

/// Register data type of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DataType {
    /// Number of 16-bit registers (or bits, for `bool`) the type occupies.
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }

    /// Whether a word order applies (32- and 64-bit types).
    pub fn has_word_order(self) -> bool {
        self.width() > 1
    }

    pub fn is_float(self) -> bool {
        matches!(self, DataType::F32 | DataType::F64)
    }
}

/// Word/byte order of a multi-register value (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum WordOrder {
    #[default]
    #[serde(rename = "ABCD")]
    Abcd,
    #[serde(rename = "CDAB")]
    Cdab,
    #[serde(rename = "BADC")]
    Badc,
    #[serde(rename = "DCBA")]
    Dcba,
}

impl WordOrder {
    /// Reorders big-endian `bytes` (even length) into wire order.
    pub fn apply(self, bytes: &mut [u8]) {
        match self {
            WordOrder::Abcd => {}
            WordOrder::Dcba => bytes.reverse(),
            WordOrder::Badc => bytes.chunks_exact_mut(2).for_each(|w| w.swap(0, 1)),
            WordOrder::Cdab => {
                // Reverse the word sequence, keep bytes within each word.
                bytes.reverse();
                bytes.chunks_exact_mut(2).for_each(|w| w.swap(0, 1));
            }
        }
    }
}

/// Encodes an engineering `value` as registers of `ty` in `order`, after
/// dividing by `scale` (1 for none). `bool` yields one word, 1 when
/// `value >= 0.5`.
pub fn encode(value: f64, ty: DataType, order: WordOrder, scale: f64) -> Vec<u16> {
    let raw = if scale != 0.0 { value / scale } else { value };
    let integral = raw.round();
    let mut bytes: Vec<u8> = match ty {
        DataType::Bool => return vec![u16::from(value >= 0.5)],
        // `as` from f64 saturates at the target range and maps NaN to 0.
        DataType::U16 => return vec![integral as u16],
        DataType::I16 => return vec![integral as i16 as u16],
        DataType::U32 => (integral as u32).to_be_bytes().to_vec(),
        DataType::I32 => (integral as i32).to_be_bytes().to_vec(),
        DataType::U64 => (integral as u64).to_be_bytes().to_vec(),
        DataType::I64 => (integral as i64).to_be_bytes().to_vec(),
        DataType::F32 => (raw as f32).to_be_bytes().to_vec(),
        DataType::F64 => raw.to_be_bytes().to_vec(),
    };
    order.apply(&mut bytes);
    bytes
        .chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent decoder written from the definition: register words to
    /// wire bytes, then place each wire byte at its big-endian position.
    fn decode(words: &[u16], ty: DataType, order: WordOrder, scale: f64) -> f64 {
        let wire: Vec<u8> = words
            .iter()
            .flat_map(|w| [(w >> 8) as u8, *w as u8])
            .collect();
        let n = wire.len();
        // position[i] = index in big-endian bytes of wire byte i.
        let position = |i: usize| -> usize {
            match order {
                WordOrder::Abcd => i,
                WordOrder::Dcba => n - 1 - i,
                WordOrder::Badc => i ^ 1,
                WordOrder::Cdab => {
                    let word = i / 2;
                    (n / 2 - 1 - word) * 2 + (i % 2)
                }
            }
        };
        let mut be = vec![0u8; n];
        for (i, b) in wire.iter().enumerate() {
            be[position(i)] = *b;
        }
        let raw = match ty {
            DataType::Bool => return f64::from(words[0]),
            DataType::U16 => f64::from(words[0]),
            DataType::I16 => f64::from(words[0] as i16),
            DataType::U32 => f64::from(u32::from_be_bytes(be.try_into().unwrap())),
            DataType::I32 => f64::from(i32::from_be_bytes(be.try_into().unwrap())),
            DataType::U64 => u64::from_be_bytes(be.try_into().unwrap()) as f64,
            DataType::I64 => i64::from_be_bytes(be.try_into().unwrap()) as f64,
            DataType::F32 => f64::from(f32::from_be_bytes(be.try_into().unwrap())),
            DataType::F64 => f64::from_be_bytes(be.try_into().unwrap()),
        };
        raw * scale
    }

    const ORDERS: [WordOrder; 4] = [
        WordOrder::Abcd,
        WordOrder::Cdab,
        WordOrder::Badc,
        WordOrder::Dcba,
    ];

    #[test]
    fn documented_byte_layouts() {
        // 0x11223344 as u32 in each order.
        let v = f64::from(0x1122_3344u32);
        assert_eq!(
            encode(v, DataType::U32, WordOrder::Abcd, 1.0),
            [0x1122, 0x3344]
        );
        assert_eq!(
            encode(v, DataType::U32, WordOrder::Cdab, 1.0),
            [0x3344, 0x1122]
        );
        assert_eq!(
            encode(v, DataType::U32, WordOrder::Badc, 1.0),
            [0x2211, 0x4433]
        );
        assert_eq!(
            encode(v, DataType::U32, WordOrder::Dcba, 1.0),
            [0x4433, 0x2211]
        );
        // Below 2^53, so exactly representable as f64.
        let v = 0x0001_0203_0405_0607u64 as f64;
        assert_eq!(
            encode(v, DataType::U64, WordOrder::Cdab, 1.0),
            [0x0607, 0x0405, 0x0203, 0x0001]
        );
        assert_eq!(
            encode(v, DataType::U64, WordOrder::Dcba, 1.0),
            [0x0706, 0x0504, 0x0302, 0x0100]
        );
        assert_eq!(
            encode(v, DataType::U64, WordOrder::Badc, 1.0),
            [0x0100, 0x0302, 0x0504, 0x0706]
        );
        // 1.0f32 = 0x3F800000.
        assert_eq!(
            encode(1.0, DataType::F32, WordOrder::Cdab, 1.0),
            [0x0000, 0x3F80]
        );
    }

    #[test]
    fn round_trip_every_type_and_order() {
        let cases: &[(DataType, f64, f64)] = &[
            (DataType::U16, 1450.3, 0.1),
            (DataType::I16, -2.57, 0.01),
            (DataType::U32, 4_000_000_000.0, 1.0),
            (DataType::I32, -0.3004, 0.001),
            (DataType::U64, 123_456_789_012.0, 1.0),
            (DataType::I64, -98_765_432_101.0, 1.0),
            (DataType::F32, 80.123_45, 1.0),
            (DataType::F64, 42.123_456_789_012, 1.0),
        ];
        for &(ty, value, scale) in cases {
            let orders: &[WordOrder] = if ty.has_word_order() {
                &ORDERS
            } else {
                &[WordOrder::Abcd]
            };
            for &order in orders {
                let words = encode(value, ty, order, scale);
                assert_eq!(words.len(), usize::from(ty.width()), "{ty:?}");
                let back = decode(&words, ty, order, scale);
                let tolerance = if ty == DataType::F32 {
                    value.abs() * f64::from(f32::EPSILON)
                } else if ty.is_float() {
                    0.0
                } else {
                    scale / 2.0 + 1e-12
                };
                assert!(
                    (back - value).abs() <= tolerance,
                    "{ty:?} {order:?}: {value} -> {words:04x?} -> {back}"
                );
            }
        }
    }

    #[test]
    fn out_of_range_saturates_instead_of_panicking() {
        assert_eq!(encode(1e9, DataType::U16, WordOrder::Abcd, 1.0), [u16::MAX]);
        assert_eq!(encode(-5.0, DataType::U16, WordOrder::Abcd, 1.0), [0]);
        assert_eq!(encode(f64::NAN, DataType::I16, WordOrder::Abcd, 1.0), [0]);
        assert_eq!(
            encode(-1e30, DataType::I32, WordOrder::Abcd, 1.0),
            [0x8000, 0x0000]
        );
    }

    #[test]
    fn bool_thresholds_at_half() {
        assert_eq!(encode(1.0, DataType::Bool, WordOrder::Abcd, 1.0), [1]);
        assert_eq!(encode(0.49, DataType::Bool, WordOrder::Abcd, 1.0), [0]);
    }
}
