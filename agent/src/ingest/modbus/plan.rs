//! Read planning and value decoding: pure functions, no socket.
//!
//! [`plan_reads`] turns a device's register list into the fewest read
//! requests the protocol allows: registers are grouped by function, sorted by
//! address, and neighbours closer than `max_gap` unused registers are merged,
//! as long as a request stays within 125 registers (2000 bits for coils and
//! discrete inputs). [`decode`] turns the words of one register back into a
//! number, for every type and word order.
//!
//! Word orders follow the plant definition: take the value's big-endian bytes
//! (`A B C D` for 32 bits, `B0..B7` for 64 bits) and lay them into consecutive
//! registers, high byte first:
//! - `ABCD`: straight big-endian;
//! - `CDAB`: the 16-bit words in reverse order, bytes within a word kept;
//! - `BADC`: words in order, the two bytes of each word swapped;
//! - `DCBA`: all bytes reversed (little-endian).
//!
//! Each is its own inverse, so the same permutation encodes and decodes.

use serde::{Deserialize, Serialize};
use std::fmt;

use super::config::{RegisterConfig, MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ};

/// The Modbus data table a value lives in, and the read function for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Function {
    /// Read coils, function code 01.
    Coil,
    /// Read discrete inputs, function code 02.
    DiscreteInput,
    /// Read holding registers, function code 03.
    Holding,
    /// Read input registers, function code 04.
    Input,
}

impl Function {
    /// The read function code.
    pub fn code(self) -> u8 {
        match self {
            Function::Coil => 0x01,
            Function::DiscreteInput => 0x02,
            Function::Holding => 0x03,
            Function::Input => 0x04,
        }
    }

    /// Coils and discrete inputs address single bits.
    pub fn is_bit(self) -> bool {
        matches!(self, Function::Coil | Function::DiscreteInput)
    }

    /// Most items one request may read.
    pub fn max_per_read(self) -> u16 {
        if self.is_bit() {
            MAX_BITS_PER_READ
        } else {
            MAX_REGISTERS_PER_READ
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Function::Coil => "coil",
            Function::DiscreteInput => "discrete-input",
            Function::Holding => "holding",
            Function::Input => "input",
        }
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the register words of a value are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    /// Registers (or bits, for `bool` on a bit table) the value occupies.
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Word/byte order of 32- and 64-bit values (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// One planned request: `count` items of `function` from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRead {
    pub function: Function,
    pub start: u16,
    pub count: u16,
    /// Indices into the device's register list of the values this read serves.
    pub registers: Vec<usize>,
}

impl PlannedRead {
    /// One past the last item read (fits: `start + count <= 65536`).
    pub fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// Plans the reads of one device. Registers are assumed validated (their
/// span fits the address space). Reads come out ordered by function, then
/// address; every register is served by exactly one read.
pub fn plan_reads(registers: &[RegisterConfig], max_gap: u16) -> Vec<PlannedRead> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].function, registers[i].address));

    let mut reads: Vec<PlannedRead> = Vec::new();
    for i in order {
        let reg = &registers[i];
        let start = u32::from(reg.address);
        let end = start + u32::from(reg.data_type.width());
        if let Some(read) = reads.last_mut() {
            let same_function = read.function == reg.function;
            let near = start <= read.end() + u32::from(max_gap);
            let merged_end = end.max(read.end());
            let fits = merged_end - u32::from(read.start) <= u32::from(reg.function.max_per_read());
            if same_function && near && fits {
                read.count = u16::try_from(merged_end - u32::from(read.start))
                    .expect("a merged read is capped at 2000 items");
                read.registers.push(i);
                continue;
            }
        }
        reads.push(PlannedRead {
            function: reg.function,
            start: reg.address,
            count: reg.data_type.width(),
            registers: vec![i],
        });
    }
    reads
}

/// Splits a read into one read per register, for devices that reject reads
/// spanning unmapped addresses (exception 02 on a merged read).
pub fn split_read(read: &PlannedRead, registers: &[RegisterConfig]) -> Vec<PlannedRead> {
    read.registers
        .iter()
        .map(|&i| PlannedRead {
            function: read.function,
            start: registers[i].address,
            count: registers[i].data_type.width(),
            registers: vec![i],
        })
        .collect()
}

/// Why words could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{data_type} needs {needed} words, got {got}")]
pub struct DecodeError {
    pub data_type: DataType,
    pub needed: usize,
    pub got: usize,
}

/// Largest magnitude up to which an f64 holds every integer exactly: 2^53.
pub const F64_EXACT_INT: u64 = 1 << 53;

/// Decodes the raw (unscaled) value of a register from its words, first word
/// first. `bool` on a register is true when the word is non-zero.
pub fn decode(data_type: DataType, order: WordOrder, words: &[u16]) -> Result<f64, DecodeError> {
    decode_checked(data_type, order, words).map(|(value, _)| value)
}

/// [`decode`], and whether the value is exact: `false` for a 64-bit integer
/// beyond ±2^53, which an f64 can only approximate (the nearest f64 is
/// returned; the caller flags the reading instead of rounding silently).
pub fn decode_checked(
    data_type: DataType,
    order: WordOrder,
    words: &[u16],
) -> Result<(f64, bool), DecodeError> {
    let needed = usize::from(data_type.width());
    if words.len() < needed {
        return Err(DecodeError {
            data_type,
            needed,
            got: words.len(),
        });
    }
    let words = &words[..needed];
    Ok(match data_type {
        DataType::Bool => (f64::from(u8::from(words[0] != 0)), true),
        DataType::U16 => (f64::from(words[0]), true),
        DataType::I16 => (f64::from(words[0] as i16), true),
        DataType::U32 => (
            f64::from(u32::from_be_bytes(value_bytes::<4>(words, order))),
            true,
        ),
        DataType::I32 => (
            f64::from(i32::from_be_bytes(value_bytes::<4>(words, order))),
            true,
        ),
        DataType::F32 => (
            f64::from(f32::from_be_bytes(value_bytes::<4>(words, order))),
            true,
        ),
        DataType::U64 => {
            let v = u64::from_be_bytes(value_bytes::<8>(words, order));
            (v as f64, v <= F64_EXACT_INT)
        }
        DataType::I64 => {
            let v = i64::from_be_bytes(value_bytes::<8>(words, order));
            (v as f64, v.unsigned_abs() <= F64_EXACT_INT)
        }
        DataType::F64 => (f64::from_be_bytes(value_bytes::<8>(words, order)), true),
    })
}

/// The value's big-endian bytes from its register words (`N` = 4 or 8,
/// `words.len() == N / 2`).
fn value_bytes<const N: usize>(words: &[u16], order: WordOrder) -> [u8; N] {
    let mut wire = [0u8; N];
    for (chunk, word) in wire.chunks_exact_mut(2).zip(words) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    reorder(&mut wire, order);
    wire
}

/// Applies a word order to big-endian bytes (its own inverse).
pub fn reorder(bytes: &mut [u8], order: WordOrder) {
    match order {
        WordOrder::Abcd => {}
        WordOrder::Dcba => bytes.reverse(),
        WordOrder::Badc => bytes.chunks_exact_mut(2).for_each(|w| w.swap(0, 1)),
        WordOrder::Cdab => {
            // Reverse the sequence of 16-bit words: reverse all bytes, then
            // restore the byte order inside each word.
            bytes.reverse();
            bytes.chunks_exact_mut(2).for_each(|w| w.swap(0, 1));
        }
    }
}

/// Encodes a value's big-endian bytes into register words in the given
/// order: the inverse of [`decode`]'s layout, used by tests and fixtures.
pub fn encode_words(big_endian: &[u8], order: WordOrder) -> Vec<u16> {
    let mut bytes = big_endian.to_vec();
    reorder(&mut bytes, order);
    bytes
        .chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reg(function: Function, address: u16, data_type: DataType) -> RegisterConfig {
        RegisterConfig {
            sensor: format!("{function}-{address}"),
            function,
            address,
            data_type,
            order: None,
            scale: 1.0,
            offset: 0.0,
            unit: String::new(),
            poll_interval: None,
        }
    }

    fn spans(reads: &[PlannedRead]) -> Vec<(Function, u16, u16)> {
        reads
            .iter()
            .map(|r| (r.function, r.start, r.count))
            .collect()
    }

    #[test]
    fn press_1_plan() {
        use DataType::*;
        use Function::*;
        let regs = vec![
            reg(Holding, 0, F32),
            reg(Holding, 2, F32),
            reg(Holding, 4, U16),
            reg(Input, 0, I16),
            reg(Coil, 0, Bool),
        ];
        let reads = plan_reads(&regs, 8);
        assert_eq!(
            spans(&reads),
            vec![(Coil, 0, 1), (Holding, 0, 5), (Input, 0, 1)]
        );
        assert_eq!(reads[1].registers, vec![0, 1, 2]);
        assert_eq!(reads[0].registers, vec![4]);
    }

    #[test]
    fn gaps_merge_up_to_max_gap_only() {
        use DataType::*;
        use Function::*;
        // 0..2, gap of 3 (2,3,4), 5..6, gap of 4 (6..10), 10.
        let regs = vec![
            reg(Holding, 10, U16),
            reg(Holding, 0, U32),
            reg(Holding, 5, U16),
        ];
        assert_eq!(
            spans(&plan_reads(&regs, 3)),
            vec![(Holding, 0, 6), (Holding, 10, 1)]
        );
        assert_eq!(spans(&plan_reads(&regs, 4)), vec![(Holding, 0, 11)]);
        assert_eq!(
            spans(&plan_reads(&regs, 0)),
            vec![(Holding, 0, 2), (Holding, 5, 1), (Holding, 10, 1)]
        );
        // Contiguous registers merge even with max-gap 0.
        let contiguous = vec![reg(Input, 1, U16), reg(Input, 2, F64), reg(Input, 6, I16)];
        assert_eq!(spans(&plan_reads(&contiguous, 0)), vec![(Input, 1, 6)]);
    }

    #[test]
    fn reads_never_exceed_125_registers() {
        use DataType::*;
        use Function::*;
        // 40 f64 values back to back: 160 registers.
        let regs: Vec<_> = (0..40).map(|i| reg(Holding, i * 4, F64)).collect();
        let reads = plan_reads(&regs, 8);
        assert_eq!(spans(&reads), vec![(Holding, 0, 124), (Holding, 124, 36)]);
        assert!(reads.iter().all(|r| r.count <= 125));
        // A value is never split across two reads.
        let regs: Vec<_> = (0..63).map(|i| reg(Holding, i * 2, U32)).collect();
        let reads = plan_reads(&regs, 0);
        assert_eq!(spans(&reads), vec![(Holding, 0, 124), (Holding, 124, 2)]);
        // Exactly 125.
        let mut regs: Vec<_> = (0..124).map(|i| reg(Input, i, U16)).collect();
        regs.push(reg(Input, 124, U16));
        assert_eq!(spans(&plan_reads(&regs, 0)), vec![(Input, 0, 125)]);
    }

    #[test]
    fn bit_reads_cap_at_2000() {
        use DataType::*;
        use Function::*;
        let regs: Vec<_> = (0..2001).map(|i| reg(DiscreteInput, i, Bool)).collect();
        let reads = plan_reads(&regs, 0);
        assert_eq!(
            spans(&reads),
            vec![(DiscreteInput, 0, 2000), (DiscreteInput, 2000, 1)]
        );
    }

    #[test]
    fn overlapping_and_top_of_range_registers() {
        use DataType::*;
        use Function::*;
        let regs = vec![
            reg(Holding, 65_532, U64),
            reg(Holding, 65_532, U16),
            reg(Holding, 65_535, I16),
        ];
        let reads = plan_reads(&regs, 0);
        assert_eq!(spans(&reads), vec![(Holding, 65_532, 4)]);
        assert_eq!(reads[0].end(), 65_536);
        assert_eq!(reads[0].registers.len(), 3);
    }

    #[test]
    fn functions_never_share_a_read() {
        use DataType::*;
        use Function::*;
        let regs = vec![reg(Holding, 0, U16), reg(Input, 1, U16), reg(Coil, 2, Bool)];
        assert_eq!(plan_reads(&regs, 100).len(), 3);
    }

    #[test]
    fn split_gives_one_read_per_register() {
        use DataType::*;
        use Function::*;
        let regs = vec![
            reg(Holding, 0, F32),
            reg(Holding, 2, F32),
            reg(Holding, 4, U16),
        ];
        let read = &plan_reads(&regs, 8)[0];
        assert_eq!(
            spans(&split_read(read, &regs)),
            vec![(Holding, 0, 2), (Holding, 2, 2), (Holding, 4, 1)]
        );
    }

    const ORDERS: [WordOrder; 4] = [
        WordOrder::Abcd,
        WordOrder::Cdab,
        WordOrder::Badc,
        WordOrder::Dcba,
    ];

    #[test]
    fn sixteen_bit_types() {
        let d = |t, w| decode(t, WordOrder::Abcd, &[w]).unwrap();
        assert_eq!(d(DataType::U16, 0xFFFF), 65_535.0);
        assert_eq!(d(DataType::I16, 0xFFFF), -1.0);
        assert_eq!(d(DataType::I16, 0x8000), -32_768.0);
        assert_eq!(d(DataType::I16, 0x00FA), 250.0);
        assert_eq!(d(DataType::I16, 0xFF06), -250.0);
        assert_eq!(d(DataType::Bool, 0), 0.0);
        assert_eq!(d(DataType::Bool, 0x0100), 1.0);
    }

    /// Words for value bytes A B C D = 0x11 0x22 0x33 0x44, per the plant table.
    #[test]
    fn thirty_two_bit_orders_against_hand_computed_words() {
        let cases = [
            (WordOrder::Abcd, [0x1122, 0x3344]),
            (WordOrder::Cdab, [0x3344, 0x1122]),
            (WordOrder::Badc, [0x2211, 0x4433]),
            (WordOrder::Dcba, [0x4433, 0x2211]),
        ];
        for (order, words) in cases {
            assert_eq!(
                decode(DataType::U32, order, &words).unwrap(),
                f64::from(0x1122_3344u32),
                "{order:?}"
            );
            assert_eq!(encode_words(&0x1122_3344u32.to_be_bytes(), order), words);
        }
    }

    /// Words for B0..B7 = 01 23 45 67 89 AB CD EF.
    #[test]
    fn sixty_four_bit_orders_against_hand_computed_words() {
        let cases = [
            (WordOrder::Abcd, [0x0123, 0x4567, 0x89AB, 0xCDEF]),
            (WordOrder::Cdab, [0xCDEF, 0x89AB, 0x4567, 0x0123]),
            (WordOrder::Badc, [0x2301, 0x6745, 0xAB89, 0xEFCD]),
            (WordOrder::Dcba, [0xEFCD, 0xAB89, 0x6745, 0x2301]),
        ];
        let value = 0x0123_4567_89AB_CDEFu64;
        for (order, words) in cases {
            assert_eq!(
                decode(DataType::U64, order, &words).unwrap(),
                value as f64,
                "{order:?}"
            );
            assert_eq!(
                decode(DataType::I64, order, &words).unwrap(),
                value as i64 as f64
            );
            assert_eq!(encode_words(&value.to_be_bytes(), order), words);
        }
    }

    #[test]
    fn signed_negative_values() {
        // -2 as i32 = FF FF FF FE.
        let i32_cases = [
            (WordOrder::Abcd, [0xFFFF, 0xFFFE]),
            (WordOrder::Cdab, [0xFFFE, 0xFFFF]),
            (WordOrder::Badc, [0xFFFF, 0xFEFF]),
            (WordOrder::Dcba, [0xFEFF, 0xFFFF]),
        ];
        for (order, words) in i32_cases {
            assert_eq!(
                decode(DataType::I32, order, &words).unwrap(),
                -2.0,
                "{order:?}"
            );
        }
        // -300 as i32 = FF FF FE D4 (suction −0.3 bar × 1000, BADC).
        assert_eq!(
            decode(DataType::I32, WordOrder::Badc, &[0xFFFF, 0xD4FE]).unwrap(),
            -300.0
        );
        // i64::MIN = 80 00 .. 00, and -1.
        assert_eq!(
            decode(DataType::I64, WordOrder::Abcd, &[0x8000, 0, 0, 0]).unwrap(),
            i64::MIN as f64
        );
        assert_eq!(
            decode(DataType::I64, WordOrder::Dcba, &[0, 0, 0, 0x0080]).unwrap(),
            i64::MIN as f64
        );
        for order in ORDERS {
            assert_eq!(decode(DataType::I64, order, &[0xFFFF; 4]).unwrap(), -1.0);
            assert_eq!(
                decode(DataType::U32, order, &[0xFFFF; 2]).unwrap(),
                f64::from(u32::MAX)
            );
        }
        // -123456789 as i64 = FF FF FF FF F8 A4 32 EB.
        assert_eq!(
            decode(
                DataType::I64,
                WordOrder::Cdab,
                &[0x32EB, 0xF8A4, 0xFFFF, 0xFFFF]
            )
            .unwrap(),
            -123_456_789.0
        );
    }

    #[test]
    fn f32_values_and_specials() {
        // 80.0f32 = 42 A0 00 00; -2.5 = C0 20 00 00.
        assert_eq!(
            decode(DataType::F32, WordOrder::Abcd, &[0x42A0, 0x0000]).unwrap(),
            80.0
        );
        assert_eq!(
            decode(DataType::F32, WordOrder::Cdab, &[0x0000, 0x42A0]).unwrap(),
            80.0
        );
        assert_eq!(
            decode(DataType::F32, WordOrder::Badc, &[0xA042, 0x0000]).unwrap(),
            80.0
        );
        assert_eq!(
            decode(DataType::F32, WordOrder::Dcba, &[0x0000, 0xA042]).unwrap(),
            80.0
        );
        assert_eq!(
            decode(DataType::F32, WordOrder::Abcd, &[0xC020, 0x0000]).unwrap(),
            -2.5
        );
        // 6.25 = 40 C8 00 00 as pressure (CDAB).
        assert_eq!(
            decode(DataType::F32, WordOrder::Cdab, &[0x0000, 0x40C8]).unwrap(),
            6.25
        );
        // Specials: +inf 7F800000, -inf FF800000, NaN 7FC00000, -0 80000000,
        // smallest subnormal 00000001.
        let d = |w: [u16; 2]| decode(DataType::F32, WordOrder::Abcd, &w).unwrap();
        assert_eq!(d([0x7F80, 0]), f64::INFINITY);
        assert_eq!(d([0xFF80, 0]), f64::NEG_INFINITY);
        assert!(d([0x7FC0, 0]).is_nan());
        let neg_zero = d([0x8000, 0]);
        assert!(neg_zero == 0.0 && neg_zero.is_sign_negative());
        assert_eq!(d([0, 1]), f64::from(f32::from_bits(1)));
        assert_eq!(
            decode(DataType::F32, WordOrder::Dcba, &[0x0100, 0x0000]).unwrap(),
            f64::from(f32::from_bits(1))
        );
        // 0.1f32 = 3D CC CC CD: widened exactly, not rounded to 0.1f64.
        assert_eq!(
            decode(DataType::F32, WordOrder::Abcd, &[0x3DCC, 0xCCCD]).unwrap(),
            f64::from(0.1f32)
        );
    }

    #[test]
    fn f64_values_and_specials() {
        // 42.0 = 40 45 00 00 00 00 00 00.
        let cases = [
            (WordOrder::Abcd, [0x4045, 0, 0, 0]),
            (WordOrder::Cdab, [0, 0, 0, 0x4045]),
            (WordOrder::Badc, [0x4540, 0, 0, 0]),
            (WordOrder::Dcba, [0, 0, 0, 0x4540]),
        ];
        for (order, words) in cases {
            assert_eq!(
                decode(DataType::F64, order, &words).unwrap(),
                42.0,
                "{order:?}"
            );
        }
        // -0.1 = BF B9 99 99 99 99 99 9A.
        assert_eq!(
            decode(
                DataType::F64,
                WordOrder::Abcd,
                &[0xBFB9, 0x9999, 0x9999, 0x999A]
            )
            .unwrap(),
            -0.1
        );
        assert_eq!(
            decode(
                DataType::F64,
                WordOrder::Dcba,
                &[0x9A99, 0x9999, 0x9999, 0xB9BF]
            )
            .unwrap(),
            -0.1
        );
        let d = |w: [u16; 4]| decode(DataType::F64, WordOrder::Abcd, &w).unwrap();
        assert_eq!(d([0x7FF0, 0, 0, 0]), f64::INFINITY);
        assert_eq!(d([0xFFF0, 0, 0, 0]), f64::NEG_INFINITY);
        assert!(d([0x7FF8, 0, 0, 0]).is_nan());
        assert_eq!(d([0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF]), f64::MAX);
        assert_eq!(d([0, 0, 0, 1]), f64::from_bits(1));
    }

    #[test]
    fn every_type_and_order_round_trips() {
        let values: [(DataType, Vec<u8>, f64); 6] = [
            (DataType::U32, 4_000_000_000u32.to_be_bytes().to_vec(), 4e9),
            (
                DataType::I32,
                (-123_456i32).to_be_bytes().to_vec(),
                -123_456.0,
            ),
            (DataType::F32, (-1.5f32).to_be_bytes().to_vec(), -1.5),
            (
                DataType::U64,
                9_007_199_254_740_993u64.to_be_bytes().to_vec(),
                9_007_199_254_740_992.0,
            ),
            (
                DataType::I64,
                (-9_000_000_000i64).to_be_bytes().to_vec(),
                -9e9,
            ),
            (
                DataType::F64,
                std::f64::consts::PI.to_be_bytes().to_vec(),
                std::f64::consts::PI,
            ),
        ];
        for (t, bytes, expected) in values {
            for order in ORDERS {
                let words = encode_words(&bytes, order);
                assert_eq!(words.len(), usize::from(t.width()));
                assert_eq!(decode(t, order, &words).unwrap(), expected, "{t} {order:?}");
            }
        }
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        let e = decode(DataType::F64, WordOrder::Abcd, &[1, 2, 3]).unwrap_err();
        assert_eq!(e.to_string(), "f64 needs 4 words, got 3");
        assert!(decode(DataType::U16, WordOrder::Abcd, &[]).is_err());
    }

    #[test]
    fn sixty_four_bit_integers_beyond_2_pow_53_are_flagged_not_rounded_silently() {
        let words = |v: u64| encode_words(&v.to_be_bytes(), WordOrder::Abcd);
        let exact = |t, w: &[u16]| decode_checked(t, WordOrder::Abcd, w).unwrap();
        assert_eq!(
            exact(DataType::U64, &words(F64_EXACT_INT)),
            (9_007_199_254_740_992.0, true)
        );
        let (v, ok) = exact(DataType::U64, &words(F64_EXACT_INT + 1));
        assert!(!ok);
        assert_eq!(v, 9_007_199_254_740_992.0, "the nearest f64");
        assert!(!exact(DataType::U64, &words(u64::MAX)).1);
        let neg = |v: i64| encode_words(&v.to_be_bytes(), WordOrder::Abcd);
        assert_eq!(
            exact(DataType::I64, &neg(-(1 << 53))),
            (-9_007_199_254_740_992.0, true)
        );
        assert!(!exact(DataType::I64, &neg(-(1 << 53) - 1)).1);
        assert!(!exact(DataType::I64, &neg(i64::MIN)).1);
        // Every narrower type is always exact.
        assert!(exact(DataType::U32, &[0xFFFF, 0xFFFF]).1);
        assert!(exact(DataType::F64, &[0x7FF0, 0, 0, 0]).1);
    }
}
