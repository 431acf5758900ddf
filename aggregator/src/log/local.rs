//! The embedded local log: a durable, append-only log per topic on disk,
//! used when no Kafka brokers are configured so a plant (or a demo) needs no
//! broker.
//!
//! What it is: Kafka's storage model in miniature. Each topic is a directory
//! of segment files; every record gets the next offset of its topic;
//! appends of one batch are fsync'd before they are acknowledged; a reader
//! ([`TopicReader`], used by `millrace-aggregator tail`) walks the segments
//! from any offset and can follow the end.
//!
//! What it is not: there is one partition per topic, no compaction, no
//! offset index (a read from offset N scans its segment from the start;
//! segments are bounded by `segment-size`), and only one writing process per
//! directory — the aggregator that owns `data-dir`.
//!
//! # Retention
//!
//! As in Kafka, whole closed segments are deleted from the start of a topic
//! ([`Retention`]): by age, once every record of a segment is older than
//! `retention-age` (the bound used is the append time of the next segment's
//! first record, so a segment is never deleted early), and by size, oldest
//! first while the topic holds more than `retention-size`. The active
//! (newest) segment is never deleted, so the records the dedup
//! reconciliation reads back at start-up (those after its last saved mark,
//! written just before a crash) are always kept. Retention runs when the log
//! opens, when a segment rolls, and at most once a minute while records are
//! written; every deletion is logged and counted ([`RetentionStats`]).
//! Readers follow it: a cursor whose segment went away moves on to the oldest
//! segment that is left, so `tail --from-beginning` starts at the oldest kept
//! record.
//!
//! # On-disk format
//!
//! ```text
//! <log dir>/<topic>/<base offset, 20 digits>.seg     e.g. 00000000000000000000.seg
//!
//! segment = frame*
//! frame   = body_len: u32 LE | crc32: u32 LE (CRC-32/ISO-HDLC of body) | body
//! body    = offset: u64 LE | append_time_ms: i64 LE
//!         | key_len: u32 LE | key
//!         | header_count: u32 LE | (name_len: u32 LE | name | value_len: u32 LE | value)*
//!         | value_len: u32 LE | value
//! ```
//!
//! # Invariants
//!
//! - A segment's file name is the offset of its first record; within a topic
//!   offsets are contiguous: each frame's offset is the previous one plus one,
//!   across segment boundaries.
//! - All records of one batch for one topic go to one segment: a new segment
//!   is started before a batch when the active one has reached
//!   `segment-size` (so a segment may exceed it by up to one batch). A new
//!   segment file is fsync'd together with its directory before use.
//! - A batch is acknowledged only after `fdatasync` of every segment it
//!   touched. If any part of a batch fails, every topic it touched is
//!   truncated back to its length before the batch; if that rollback fails
//!   the log refuses further writes until restart (start-up recovery then
//!   restores a clean tail).
//! - Only the last segment of a topic can have a torn tail (a crash during
//!   an append). On open, the last segment is scanned and cut at the first
//!   frame that is incomplete, fails its CRC, does not decode, or carries an
//!   unexpected offset; the cut is logged and reported in [`RecoveryReport`]
//!   and never stops start-up. Earlier segments were fsync'd before the next
//!   one was created and are not rescanned; a corrupt frame there is an error
//!   for readers.
//! - A record whose batch was rolled back may be seen by a reader that
//!   follows the end concurrently; the same record is written again when the
//!   agent resends the batch.

use super::{header, CommittedRecord, LogRecord, WriteReceipt, HEADER_AGENT, HEADER_SEQ};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FRAME_HEADER_LEN: usize = 8;
const SEGMENT_SUFFIX: &str = ".seg";
/// The largest frame body accepted; a length field above it is corruption.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Why the embedded log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalLogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt record at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("a failed write could not be rolled back; the log accepts no writes until restart")]
    Poisoned,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LocalLogError + '_ {
    move |source| LocalLogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A record as stored, with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub append_time_ms: i64,
    pub key: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
}

/// A torn tail cut off while opening the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub topic: String,
    pub segment: PathBuf,
    /// Length of the segment after the cut.
    pub at_byte: u64,
    pub dropped_bytes: u64,
    pub reason: String,
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub truncations: Vec<Truncation>,
    /// Next offset per topic.
    pub next_offsets: BTreeMap<String, u64>,
}

/// How long and how much of each topic the log keeps (per topic, like
/// Kafka's `retention.ms` / `retention.bytes`). `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

/// What retention deleted since start.
#[derive(Debug, Default)]
pub struct RetentionStats {
    pub segments_deleted: AtomicU64,
    pub bytes_deleted: AtomicU64,
    /// Records in the deleted segments.
    pub records_deleted: AtomicU64,
}

/// How often retention is checked while records are written.
const RETENTION_CHECK_INTERVAL_MS: i64 = 60_000;

// ---------------------------------------------------------------- framing

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), LocalLogError> {
    let len = u32::try_from(bytes.len()).map_err(|_| LocalLogError::TooLarge(bytes.len()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn encode_frame(
    out: &mut Vec<u8>,
    offset: u64,
    append_time_ms: i64,
    record: &LogRecord,
) -> Result<(), LocalLogError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&append_time_ms.to_le_bytes());
    put_bytes(out, &record.key)?;
    let count = u32::try_from(record.headers.len())
        .map_err(|_| LocalLogError::TooLarge(record.headers.len()))?;
    out.extend_from_slice(&count.to_le_bytes());
    for (name, value) in &record.headers {
        put_bytes(out, name.as_bytes())?;
        put_bytes(out, value)?;
    }
    put_bytes(out, &record.value)?;
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    if body_len > MAX_RECORD_BYTES {
        out.truncate(start);
        return Err(LocalLogError::TooLarge(body_len));
    }
    let crc = crc32fast::hash(&out[start + FRAME_HEADER_LEN..]);
    // body_len <= MAX_RECORD_BYTES < u32::MAX, checked just above.
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

struct BodyCursor<'a>(&'a [u8]);

impl<'a> BodyCursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("body ends {} bytes early", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn decode_body(body: &[u8]) -> Result<StoredRecord, String> {
    let mut c = BodyCursor(body);
    let offset = c.u64()?;
    let append_time_ms = c.u64()? as i64;
    let key = c.bytes()?.to_vec();
    let count = c.u32()?;
    let mut headers = Vec::new();
    for _ in 0..count {
        let name = std::str::from_utf8(c.bytes()?)
            .map_err(|_| "header name is not UTF-8".to_owned())?
            .to_owned();
        headers.push((name, c.bytes()?.to_vec()));
    }
    let value = c.bytes()?.to_vec();
    if !c.0.is_empty() {
        return Err(format!("{} trailing bytes in body", c.0.len()));
    }
    Ok(StoredRecord {
        offset,
        append_time_ms,
        key,
        headers,
        value,
    })
}

enum Frame {
    Record {
        record: StoredRecord,
        len: u64,
    },
    /// Clean end of file at a frame boundary.
    End,
    /// The file ends inside a frame: a torn write, or one still in progress.
    Incomplete(String),
    /// The frame is all there but wrong.
    Corrupt(String),
}

/// Reads as much of `buf` as the file holds; returns the count read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn read_frame(reader: &mut impl Read) -> io::Result<Frame> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    let n = read_up_to(reader, &mut head)?;
    if n == 0 {
        return Ok(Frame::End);
    }
    if n < FRAME_HEADER_LEN {
        return Ok(Frame::Incomplete(format!(
            "frame header cut after {n} bytes"
        )));
    }
    let body_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let expected_crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if body_len > MAX_RECORD_BYTES {
        return Ok(Frame::Corrupt(format!(
            "implausible body length {body_len}"
        )));
    }
    let mut body = vec![0u8; body_len];
    let n = read_up_to(reader, &mut body)?;
    if n < body_len {
        return Ok(Frame::Incomplete(format!(
            "frame body cut after {n} of {body_len} bytes"
        )));
    }
    let actual_crc = crc32fast::hash(&body);
    if actual_crc != expected_crc {
        return Ok(Frame::Corrupt(format!(
            "checksum mismatch: frame says {expected_crc:#010x}, body is {actual_crc:#010x}"
        )));
    }
    match decode_body(&body) {
        Ok(record) => Ok(Frame::Record {
            record,
            len: (FRAME_HEADER_LEN + body_len) as u64,
        }),
        Err(reason) => Ok(Frame::Corrupt(reason)),
    }
}

// ---------------------------------------------------------------- segments

fn segment_path(topic_dir: &Path, base: u64) -> PathBuf {
    topic_dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// Base offsets of the segments in `topic_dir`, ascending. Other files are ignored.
fn list_segments(topic_dir: &Path) -> Result<Vec<u64>, LocalLogError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(topic_dir).map_err(io_err(topic_dir))? {
        let entry = entry.map_err(io_err(topic_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) {
            if stem.len() == 20 {
                if let Ok(base) = stem.parse::<u64>() {
                    bases.push(base);
                }
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn sync_dir(dir: &Path) -> Result<(), LocalLogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Scans a whole segment; returns the frames' end (the clean length), the
/// next offset, and why scanning stopped early, if it did.
fn scan_segment(path: &Path, base: u64) -> Result<(u64, u64, Option<String>), LocalLogError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let mut good_len = 0u64;
    let mut next_offset = base;
    loop {
        match read_frame(&mut reader).map_err(io_err(path))? {
            Frame::End => return Ok((good_len, next_offset, None)),
            Frame::Incomplete(reason) | Frame::Corrupt(reason) => {
                return Ok((good_len, next_offset, Some(reason)))
            }
            Frame::Record { record, len } => {
                if record.offset != next_offset {
                    let reason =
                        format!("offset {} where {next_offset} was expected", record.offset);
                    return Ok((good_len, next_offset, Some(reason)));
                }
                good_len += len;
                next_offset += 1;
            }
        }
    }
}

#[derive(Debug)]
struct TopicLog {
    dir: PathBuf,
    active_path: PathBuf,
    active: File,
    active_len: u64,
    next_offset: u64,
}

impl TopicLog {
    fn open(log_dir: &Path, topic: &str) -> Result<(Self, Option<Truncation>), LocalLogError> {
        let dir = log_dir.join(topic);
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            sync_dir(log_dir)?;
        }
        let bases = list_segments(&dir)?;
        let Some(&base) = bases.last() else {
            let path = segment_path(&dir, 0);
            let active = create_segment(&dir, &path)?;
            return Ok((
                Self {
                    dir,
                    active_path: path,
                    active,
                    active_len: 0,
                    next_offset: 0,
                },
                None,
            ));
        };
        let path = segment_path(&dir, base);
        let (good_len, next_offset, stopped) = scan_segment(&path, base)?;
        let active = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let file_len = active.metadata().map_err(io_err(&path))?.len();
        let mut truncation = None;
        if file_len > good_len {
            let reason = stopped.unwrap_or_else(|| "trailing bytes".into());
            active.set_len(good_len).map_err(io_err(&path))?;
            active.sync_all().map_err(io_err(&path))?;
            tracing::warn!(
                topic,
                segment = %path.display(),
                at_byte = good_len,
                dropped_bytes = file_len - good_len,
                %reason,
                "embedded log: truncated a torn tail"
            );
            truncation = Some(Truncation {
                topic: topic.to_owned(),
                segment: path.clone(),
                at_byte: good_len,
                dropped_bytes: file_len - good_len,
                reason,
            });
        }
        Ok((
            Self {
                dir,
                active_path: path,
                active,
                active_len: good_len,
                next_offset,
            },
            truncation,
        ))
    }

    fn roll(&mut self) -> Result<(), LocalLogError> {
        let path = segment_path(&self.dir, self.next_offset);
        let file = create_segment(&self.dir, &path)?;
        self.active = file;
        self.active_path = path;
        self.active_len = 0;
        Ok(())
    }
}

fn create_segment(dir: &Path, path: &Path) -> Result<File, LocalLogError> {
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// The writable log: one [`TopicLog`] per configured topic.
#[derive(Debug)]
pub struct LocalLog {
    dir: PathBuf,
    segment_bytes: u64,
    topics: BTreeMap<String, TopicLog>,
    poisoned: bool,
    /// The error of the last append, until one succeeds (`/healthz`).
    failing: Option<String>,
    retention: Retention,
    retention_stats: Arc<RetentionStats>,
    /// Wall clock of the last retention check.
    retention_checked_ms: i64,
}

impl LocalLog {
    /// Opens (creating if needed) the log in `dir` for `topics`, cutting torn tails.
    pub fn open(
        dir: &Path,
        topics: &[&str],
        segment_bytes: u64,
    ) -> Result<(Self, RecoveryReport), LocalLogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut report = RecoveryReport::default();
        let mut logs = BTreeMap::new();
        for &topic in topics {
            let (log, truncation) = TopicLog::open(dir, topic)?;
            report
                .next_offsets
                .insert(topic.to_owned(), log.next_offset);
            report.truncations.extend(truncation);
            logs.insert(topic.to_owned(), log);
        }
        Ok((
            Self {
                dir: dir.to_owned(),
                segment_bytes,
                topics: logs,
                poisoned: false,
                failing: None,
                retention: Retention::default(),
                retention_stats: Arc::default(),
                retention_checked_ms: i64::MIN,
            },
            report,
        ))
    }

    /// Applies `retention` from now on, starting with a check at once.
    pub fn with_retention(mut self, retention: Retention) -> Result<Self, LocalLogError> {
        self.retention = retention;
        self.enforce_retention(now_ms())?;
        Ok(self)
    }

    /// Counters of what retention deleted.
    pub fn retention_stats(&self) -> Arc<RetentionStats> {
        Arc::clone(&self.retention_stats)
    }

    /// Deletes the closed segments that fall out of the retention limits,
    /// oldest first, never a topic's active segment. Returns the number of
    /// segments deleted.
    pub fn enforce_retention(&mut self, now_ms: i64) -> Result<u64, LocalLogError> {
        self.retention_checked_ms = now_ms;
        if self.retention == Retention::default() {
            return Ok(0);
        }
        let mut deleted = 0;
        for (topic, log) in &self.topics {
            deleted += enforce_topic_retention(
                topic,
                &log.dir,
                self.retention,
                now_ms,
                &self.retention_stats,
            )?;
        }
        Ok(deleted)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Why the last append failed (a full disk, say), until one succeeds.
    pub fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    /// The offset the next record of `topic` will get.
    pub fn next_offset(&self, topic: &str) -> Option<u64> {
        self.topics.get(topic).map(|t| t.next_offset)
    }

    /// Appends `records` (in order per topic) and fsyncs; all or nothing.
    pub fn append(&mut self, records: &[LogRecord]) -> Result<WriteReceipt, LocalLogError> {
        if self.poisoned {
            return Err(LocalLogError::Poisoned);
        }
        let mut by_topic: BTreeMap<&str, Vec<&LogRecord>> = BTreeMap::new();
        for record in records {
            if !self.topics.contains_key(&record.topic) {
                return Err(LocalLogError::UnknownTopic(record.topic.clone()));
            }
            by_topic.entry(&record.topic).or_default().push(record);
        }
        let append_time_ms = now_ms();
        // (topic, length and next offset before this batch) for rollback.
        let mut touched: Vec<(&str, u64, u64)> = Vec::with_capacity(by_topic.len());
        let mut receipt = WriteReceipt::default();
        let mut result = Ok(());
        let mut rolled = false;
        for (topic, records) in &by_topic {
            let Some(log) = self.topics.get_mut(*topic) else {
                continue;
            };
            if log.active_len >= self.segment_bytes {
                if let Err(e) = log.roll() {
                    result = Err(e);
                    break;
                }
                rolled = true;
            }
            touched.push((topic, log.active_len, log.next_offset));
            if let Err(e) = write_topic(log, records, append_time_ms) {
                result = Err(e);
                break;
            }
            receipt
                .next_offsets
                .insert((*topic).to_owned(), log.next_offset);
        }
        if result.is_ok()
            && (rolled
                || append_time_ms
                    >= self
                        .retention_checked_ms
                        .saturating_add(RETENTION_CHECK_INTERVAL_MS))
        {
            // Retention is housekeeping: a failure is logged, the batch stands.
            if let Err(error) = self.enforce_retention(append_time_ms) {
                tracing::warn!(%error, "embedded log: retention check failed; will retry");
            }
        }
        if let Err(error) = result {
            for (topic, len, next_offset) in touched {
                let Some(log) = self.topics.get_mut(topic) else {
                    continue;
                };
                let rollback = log.active.set_len(len).and_then(|()| log.active.sync_all());
                match rollback {
                    Ok(()) => {
                        log.active_len = len;
                        log.next_offset = next_offset;
                    }
                    Err(rollback_error) => {
                        tracing::error!(
                            topic,
                            segment = %log.active_path.display(),
                            error = %rollback_error,
                            "embedded log: rollback failed; refusing writes until restart"
                        );
                        self.poisoned = true;
                    }
                }
            }
            self.failing = Some(error.to_string());
            return Err(error);
        }
        self.failing = None;
        Ok(receipt)
    }
}

fn write_topic(
    log: &mut TopicLog,
    records: &[&LogRecord],
    append_time_ms: i64,
) -> Result<(), LocalLogError> {
    let mut buf = Vec::new();
    for (i, record) in records.iter().enumerate() {
        encode_frame(&mut buf, log.next_offset + i as u64, append_time_ms, record)?;
    }
    log.active
        .write_all(&buf)
        .and_then(|()| log.active.sync_data())
        .map_err(io_err(&log.active_path))?;
    log.active_len += buf.len() as u64;
    log.next_offset += records.len() as u64;
    Ok(())
}

/// Retention for one topic directory; see the [module docs](self#retention).
fn enforce_topic_retention(
    topic: &str,
    dir: &Path,
    retention: Retention,
    now_ms: i64,
    stats: &RetentionStats,
) -> Result<u64, LocalLogError> {
    let bases = list_segments(dir)?;
    if bases.len() < 2 {
        return Ok(0);
    }
    let mut sizes = Vec::with_capacity(bases.len());
    for &base in &bases {
        let path = segment_path(dir, base);
        sizes.push(fs::metadata(&path).map_err(io_err(&path))?.len());
    }
    let mut total: u64 = sizes.iter().sum();
    let cutoff_ms = retention
        .max_age
        .map(|age| now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)));
    let mut deleted = 0u64;
    // Every segment but the active (last) one may go, oldest first.
    for i in 0..bases.len() - 1 {
        let over_size = retention.max_bytes.is_some_and(|max| total > max);
        let too_old = match cutoff_ms {
            // Every record of segment i was appended no later than the first
            // record of segment i + 1.
            Some(cutoff) => first_append_time(dir, bases[i + 1])?.is_some_and(|t| t < cutoff),
            None => false,
        };
        if !over_size && !too_old {
            break;
        }
        let path = segment_path(dir, bases[i]);
        let records = bases[i + 1] - bases[i];
        fs::remove_file(&path).map_err(io_err(&path))?;
        total -= sizes[i];
        deleted += 1;
        stats.segments_deleted.fetch_add(1, Ordering::Relaxed);
        stats.bytes_deleted.fetch_add(sizes[i], Ordering::Relaxed);
        stats.records_deleted.fetch_add(records, Ordering::Relaxed);
        tracing::info!(
            topic,
            segment = %path.display(),
            bytes = sizes[i],
            records,
            reason = if too_old { "retention-age" } else { "retention-size" },
            "embedded log: segment deleted by retention"
        );
    }
    if deleted > 0 {
        sync_dir(dir)?;
    }
    Ok(deleted)
}

/// The append time of the first record of segment `base`; `None` when it has
/// none yet.
fn first_append_time(dir: &Path, base: u64) -> Result<Option<i64>, LocalLogError> {
    let path = segment_path(dir, base);
    let file = File::open(&path).map_err(io_err(&path))?;
    match read_frame(&mut BufReader::new(file)).map_err(io_err(&path))? {
        Frame::Record { record, .. } => Ok(Some(record.append_time_ms)),
        Frame::End | Frame::Incomplete(_) => Ok(None),
        Frame::Corrupt(reason) => Err(LocalLogError::Corrupt {
            path,
            position: 0,
            reason,
        }),
    }
}

// ---------------------------------------------------------------- reading

/// Reads one topic of a log directory; never writes (safe next to a running writer).
#[derive(Debug, Clone)]
pub struct TopicReader {
    dir: PathBuf,
}

impl TopicReader {
    pub fn open(log_dir: &Path, topic: &str) -> Result<Self, LocalLogError> {
        let dir = log_dir.join(topic);
        if !dir.is_dir() {
            return Err(LocalLogError::Io {
                path: dir,
                source: io::Error::new(io::ErrorKind::NotFound, "no such topic in this log"),
            });
        }
        Ok(Self { dir })
    }

    /// The offset the next appended record will get (first offset if empty).
    pub fn end_offset(&self) -> Result<u64, LocalLogError> {
        let bases = list_segments(&self.dir)?;
        let Some(&base) = bases.last() else {
            return Ok(0);
        };
        let (_, next, _) = scan_segment(&segment_path(&self.dir, base), base)?;
        Ok(next)
    }

    /// A cursor at the first record with offset `>= from`.
    pub fn cursor(&self, from: u64) -> Result<Cursor, LocalLogError> {
        let bases = list_segments(&self.dir)?;
        let base = bases
            .iter()
            .rev()
            .find(|&&b| b <= from)
            .or(bases.first())
            .copied()
            .unwrap_or(0);
        let mut cursor = Cursor {
            dir: self.dir.clone(),
            base,
            reader: None,
            position: 0,
            from,
        };
        cursor.open_segment()?;
        Ok(cursor)
    }
}

/// Walks a topic forward; [`Cursor::next`] returns `None` at the current end
/// and can be called again later to follow new records.
#[derive(Debug)]
pub struct Cursor {
    dir: PathBuf,
    base: u64,
    reader: Option<BufReader<File>>,
    position: u64,
    from: u64,
}

impl Cursor {
    fn open_segment(&mut self) -> Result<(), LocalLogError> {
        let path = segment_path(&self.dir, self.base);
        match File::open(&path) {
            Ok(file) => {
                self.reader = Some(BufReader::new(file));
                self.position = 0;
                Ok(())
            }
            // An empty topic has no segment until the writer creates one;
            // a segment retention deleted gives way to the oldest one left
            // after it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.reader = None;
                self.position = 0;
                if let Some(next) = list_segments(&self.dir)?
                    .into_iter()
                    .find(|&b| b > self.base)
                {
                    self.base = next;
                    return self.open_segment();
                }
                Ok(())
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The next record, or `None` at the current end of the topic.
    pub fn next_record(&mut self) -> Result<Option<StoredRecord>, LocalLogError> {
        loop {
            if self.reader.is_none() {
                self.open_segment()?;
                if self.reader.is_none() {
                    return Ok(None);
                }
            }
            let path = segment_path(&self.dir, self.base);
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            let frame = read_frame(reader).map_err(io_err(&path))?;
            match frame {
                Frame::Record { record, len } => {
                    self.position += len;
                    if record.offset >= self.from {
                        return Ok(Some(record));
                    }
                }
                Frame::End | Frame::Incomplete(_) => {
                    // Rewind to the frame start: it may be completed later.
                    reader
                        .seek(SeekFrom::Start(self.position))
                        .map_err(io_err(&path))?;
                    let next_base = list_segments(&self.dir)?
                        .into_iter()
                        .find(|&b| b > self.base);
                    match next_base {
                        Some(next) => {
                            self.base = next;
                            self.open_segment()?;
                        }
                        None => return Ok(None),
                    }
                }
                Frame::Corrupt(reason) => {
                    return Err(LocalLogError::Corrupt {
                        path,
                        position: self.position,
                        reason,
                    })
                }
            }
        }
    }
}

/// A cursor at the first segment that can hold records appended at or after
/// `since_ms`: the last one whose first record is older (or the oldest).
fn cursor_since(dir: &Path, since_ms: i64) -> Result<Cursor, LocalLogError> {
    let bases = list_segments(dir)?;
    let mut start = bases.first().copied().unwrap_or(0);
    for &base in &bases {
        match first_append_time(dir, base)? {
            Some(t) if t <= since_ms => start = base,
            _ => break,
        }
    }
    let mut cursor = Cursor {
        dir: dir.to_owned(),
        base: start,
        reader: None,
        position: 0,
        from: start,
    };
    cursor.open_segment()?;
    Ok(cursor)
}

/// Visits the windows, then the alerts, appended at or after `since_ms`.
pub(crate) fn recent(
    log_dir: &Path,
    topics: &crate::config::Topics,
    since_ms: i64,
    visit: &mut dyn FnMut(super::RecentRecord),
) -> Result<u64, LocalLogError> {
    let mut visited = 0;
    for topic in [&topics.windows, &topics.alerts] {
        let dir = log_dir.join(topic);
        if !dir.is_dir() {
            continue;
        }
        let mut cursor = cursor_since(&dir, since_ms)?;
        while let Some(stored) = cursor.next_record()? {
            if stored.append_time_ms < since_ms {
                continue;
            }
            if let Some(record) = super::RecentRecord::decode(
                topics,
                topic,
                &stored.headers,
                stored.append_time_ms,
                &stored.value,
            ) {
                visit(record);
                visited += 1;
            }
        }
    }
    Ok(visited)
}

/// Visits the `agent`/`seq` of every record at or after `from[topic]`.
pub(crate) fn committed_since(
    log_dir: &Path,
    topics: &[String],
    from: &BTreeMap<String, u64>,
    visit: &mut dyn FnMut(CommittedRecord),
) -> Result<(), LocalLogError> {
    for topic in topics {
        let reader = TopicReader::open(log_dir, topic)?;
        let mut cursor = reader.cursor(from.get(topic).copied().unwrap_or(0))?;
        while let Some(record) = cursor.next_record()? {
            let agent =
                header(&record.headers, HEADER_AGENT).and_then(|a| std::str::from_utf8(a).ok());
            let seq = header(&record.headers, HEADER_SEQ)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(agent), Some(seq)) = (agent, seq) {
                visit(CommittedRecord {
                    topic: topic.clone(),
                    offset: record.offset,
                    agent: agent.to_owned(),
                    seq,
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- async writer

/// The [`super::LogWriter`] over a [`LocalLog`]: appends run on the blocking
/// pool, one batch at a time.
#[derive(Debug, Clone)]
pub struct LocalLogWriter {
    log: std::sync::Arc<std::sync::Mutex<LocalLog>>,
    dir: PathBuf,
    topics: Vec<String>,
    topic_names: crate::config::Topics,
    retention_stats: Arc<RetentionStats>,
}

impl LocalLogWriter {
    pub fn open(
        dir: &Path,
        topics: &crate::config::Topics,
        segment_bytes: u64,
        retention: Retention,
    ) -> Result<(Self, RecoveryReport), LocalLogError> {
        let names = topics.all();
        let (log, report) = LocalLog::open(dir, &names, segment_bytes)?;
        let log = log.with_retention(retention)?;
        Ok((
            Self {
                retention_stats: log.retention_stats(),
                log: std::sync::Arc::new(std::sync::Mutex::new(log)),
                dir: dir.to_owned(),
                topics: names.iter().map(|t| (*t).to_owned()).collect(),
                topic_names: topics.clone(),
            },
            report,
        ))
    }
}

impl super::LogWriter for LocalLogWriter {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn write(
        &self,
        records: Vec<LogRecord>,
    ) -> futures::future::BoxFuture<'_, Result<WriteReceipt, super::LogError>> {
        let log = self.log.clone();
        Box::pin(async move {
            let joined = tokio::task::spawn_blocking(move || {
                // A panic while holding the lock leaves the log state in
                // doubt; treat it like a failed rollback.
                let mut log = log.lock().map_err(|_| LocalLogError::Poisoned)?;
                log.append(&records)
            })
            .await;
            match joined {
                Ok(result) => result.map_err(super::LogError::from),
                Err(e) => Err(super::LogError::Task(e.to_string())),
            }
        })
    }

    fn recent(
        &self,
        since_ms: i64,
        visit: &mut dyn FnMut(super::RecentRecord),
    ) -> Result<u64, super::LogError> {
        recent(&self.dir, &self.topic_names, since_ms, visit).map_err(super::LogError::from)
    }

    fn retention(&self) -> Option<&RetentionStats> {
        Some(&self.retention_stats)
    }

    fn health(&self) -> futures::future::BoxFuture<'_, super::Health> {
        Box::pin(async move {
            match self.log.lock() {
                Ok(log) if log.is_poisoned() => {
                    super::Health::Unhealthy(LocalLogError::Poisoned.to_string())
                }
                Ok(log) => match log.failing() {
                    Some(error) => super::Health::Unhealthy(format!(
                        "the last write failed ({error}); agents keep their records and resend"
                    )),
                    None => super::Health::Healthy,
                },
                Err(_) => super::Health::Unhealthy(LocalLogError::Poisoned.to_string()),
            }
        })
    }

    fn committed_since(
        &self,
        from: &BTreeMap<String, u64>,
        visit: &mut dyn FnMut(CommittedRecord),
    ) -> Result<(), super::LogError> {
        committed_since(&self.dir, &self.topics, from, visit).map_err(super::LogError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, n: u64) -> LogRecord {
        LogRecord {
            topic: topic.into(),
            key: format!("press-1/temp-{n}").into_bytes(),
            value: format!("{{\"n\":{n}}}").into_bytes(),
            headers: vec![
                ("agent".into(), b"gw-1".to_vec()),
                ("seq".into(), n.to_string().into_bytes()),
            ],
        }
    }

    fn read_all(dir: &Path, topic: &str) -> Vec<StoredRecord> {
        let mut cursor = TopicReader::open(dir, topic).unwrap().cursor(0).unwrap();
        let mut out = Vec::new();
        while let Some(r) = cursor.next_record().unwrap() {
            out.push(r);
        }
        out
    }

    fn only_segment(dir: &Path, topic: &str) -> PathBuf {
        let bases = list_segments(&dir.join(topic)).unwrap();
        assert_eq!(bases.len(), 1);
        segment_path(&dir.join(topic), bases[0])
    }

    #[test]
    fn append_read_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, report) = LocalLog::open(tmp.path(), &["w", "a"], 1 << 20).unwrap();
        assert!(report.truncations.is_empty());
        let receipt = log
            .append(&[record("w", 0), record("a", 1), record("w", 2)])
            .unwrap();
        assert_eq!(receipt.next_offsets.get("w"), Some(&2));
        assert_eq!(receipt.next_offsets.get("a"), Some(&1));
        log.append(&[record("w", 3)]).unwrap();
        drop(log);

        let (mut log, report) = LocalLog::open(tmp.path(), &["w", "a"], 1 << 20).unwrap();
        assert!(report.truncations.is_empty());
        assert_eq!(log.next_offset("w"), Some(3));
        log.append(&[record("w", 4)]).unwrap();

        let got = read_all(tmp.path(), "w");
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![0, 1, 2, 3]);
        assert_eq!(got[1].value, record("w", 2).value);
        assert_eq!(got[3].headers, record("w", 4).headers);
        assert_eq!(got[0].key, b"press-1/temp-0");
        assert_eq!(read_all(tmp.path(), "a").len(), 1);
        assert!(matches!(
            log.append(&[record("nope", 9)]),
            Err(LocalLogError::UnknownTopic(_))
        ));
    }

    #[test]
    fn segments_roll_and_offsets_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        for batch in 0..40u64 {
            let recs: Vec<_> = (0..5).map(|i| record("w", batch * 5 + i)).collect();
            log.append(&recs).unwrap();
        }
        drop(log);
        let bases = list_segments(&tmp.path().join("w")).unwrap();
        assert!(bases.len() > 2, "expected several segments, got {bases:?}");
        let got = read_all(tmp.path(), "w");
        assert_eq!(got.len(), 200);
        assert!(got.iter().enumerate().all(|(i, r)| r.offset == i as u64));
        // A cursor from the middle starts in the right segment.
        let reader = TopicReader::open(tmp.path(), "w").unwrap();
        let mut cursor = reader.cursor(bases[1] + 1).unwrap();
        assert_eq!(cursor.next_record().unwrap().unwrap().offset, bases[1] + 1);
        assert_eq!(reader.end_offset().unwrap(), 200);
        let (log, report) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        assert!(report.truncations.is_empty());
        assert_eq!(log.next_offset("w"), Some(200));
    }

    #[test]
    fn torn_tail_mid_record_is_truncated_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        log.append(&[record("w", 0), record("w", 1)]).unwrap();
        log.append(&[record("w", 2)]).unwrap();
        drop(log);
        let path = only_segment(tmp.path(), "w");
        let full = fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 7).unwrap();
        drop(file);

        let (mut log, report) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        assert_eq!(report.truncations.len(), 1, "{report:?}");
        let cut = &report.truncations[0];
        assert!(cut.reason.contains("cut"), "{cut:?}");
        assert_eq!(log.next_offset("w"), Some(2));
        log.append(&[record("w", 3)]).unwrap();
        let got = read_all(tmp.path(), "w");
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(got[2].value, record("w", 3).value);
        // Opening again finds nothing more to cut.
        drop(log);
        let (_, report) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        assert!(report.truncations.is_empty());
    }

    #[test]
    fn flipped_bit_cuts_the_log_at_that_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        for n in 0..3 {
            log.append(&[record("w", n)]).unwrap();
        }
        drop(log);
        let path = only_segment(tmp.path(), "w");
        let mut bytes = fs::read(&path).unwrap();
        let frame_len = bytes.len() / 3;
        // Flip one bit in the value of the second record.
        let target = 2 * frame_len - 3;
        bytes[target] ^= 0x10;
        fs::write(&path, &bytes).unwrap();

        // A reader reports the corruption instead of returning bad data.
        let mut cursor = TopicReader::open(tmp.path(), "w")
            .unwrap()
            .cursor(0)
            .unwrap();
        assert_eq!(cursor.next_record().unwrap().unwrap().offset, 0);
        assert!(matches!(
            cursor.next_record(),
            Err(LocalLogError::Corrupt { .. })
        ));

        let (log, report) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        assert_eq!(report.truncations.len(), 1);
        assert!(
            report.truncations[0].reason.contains("checksum"),
            "{report:?}"
        );
        assert_eq!(report.truncations[0].at_byte, frame_len as u64);
        assert_eq!(log.next_offset("w"), Some(1));
        assert_eq!(read_all(tmp.path(), "w").len(), 1);
    }

    #[test]
    fn garbage_length_field_does_not_allocate_or_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        log.append(&[record("w", 0)]).unwrap();
        drop(log);
        let path = only_segment(tmp.path(), "w");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 5])
            .unwrap();
        drop(file);
        let (log, report) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        assert_eq!(report.truncations[0].dropped_bytes, 9);
        assert_eq!(log.next_offset("w"), Some(1));
    }

    #[test]
    fn cursor_follows_new_records() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        let reader = TopicReader::open(tmp.path(), "w").unwrap();
        let mut cursor = reader.cursor(reader.end_offset().unwrap()).unwrap();
        assert!(cursor.next_record().unwrap().is_none());
        let mut seen = 0u64;
        for n in 0..60 {
            log.append(&[record("w", n)]).unwrap();
            while let Some(r) = cursor.next_record().unwrap() {
                assert_eq!(r.offset, seen);
                seen += 1;
            }
        }
        assert_eq!(seen, 60);
    }

    #[test]
    fn committed_since_reports_agent_and_seq_from_an_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 1 << 20).unwrap();
        log.append(&[record("w", 10), record("w", 11), record("w", 12)])
            .unwrap();
        let mut seen = Vec::new();
        let from = BTreeMap::from([("w".to_owned(), 1)]);
        committed_since(tmp.path(), &["w".to_owned()], &from, &mut |r| {
            seen.push(r.seq)
        })
        .unwrap();
        assert_eq!(seen, vec![11, 12]);
    }

    fn segment_count(dir: &Path, topic: &str) -> usize {
        list_segments(&dir.join(topic)).unwrap().len()
    }

    fn topic_bytes(dir: &Path, topic: &str) -> u64 {
        list_segments(&dir.join(topic))
            .unwrap()
            .into_iter()
            .map(|b| {
                fs::metadata(segment_path(&dir.join(topic), b))
                    .unwrap()
                    .len()
            })
            .sum()
    }

    #[test]
    fn retention_by_size_keeps_the_newest_records_and_the_active_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        let retention = Retention {
            max_age: None,
            max_bytes: Some(3 * 4096),
        };
        let mut log = log.with_retention(retention).unwrap();
        for n in 0..2_000 {
            log.append(&[record("w", n)]).unwrap();
        }
        let stats = log.retention_stats();
        let deleted = stats.segments_deleted.load(Ordering::Relaxed);
        assert!(deleted > 10, "segments rolled and were deleted: {deleted}");
        // A topic exceeds the limit by less than one segment (plus one batch).
        assert!(topic_bytes(tmp.path(), "w") <= 4 * 4096 + 200);
        let kept = read_all(tmp.path(), "w");
        let first = kept.first().unwrap().offset;
        assert_eq!(first, stats.records_deleted.load(Ordering::Relaxed));
        // The kept records are contiguous up to the last one written.
        for (i, r) in kept.iter().enumerate() {
            assert_eq!(r.offset, first + i as u64);
        }
        assert_eq!(kept.last().unwrap().offset, 1_999);
        assert_eq!(log.next_offset("w"), Some(2_000));
    }

    #[test]
    fn retention_by_age_uses_the_next_segments_first_append_time() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        let retention = Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_bytes: None,
        };
        let mut log = log.with_retention(retention).unwrap();
        for n in 0..300 {
            log.append(&[record("w", n)]).unwrap();
        }
        let segments = segment_count(tmp.path(), "w");
        assert!(segments >= 3, "{segments} segments");
        // Nothing is an hour old yet.
        assert_eq!(log.enforce_retention(now_ms()).unwrap(), 0);
        // Two hours later every closed segment is past the age; the active one stays.
        let later = now_ms() + 2 * 3600 * 1000;
        assert_eq!(log.enforce_retention(later).unwrap(), segments as u64 - 1);
        assert_eq!(segment_count(tmp.path(), "w"), 1);
        let kept = read_all(tmp.path(), "w");
        assert_eq!(kept.last().unwrap().offset, 299);
        // Writing goes on at the next offset.
        log.append(&[record("w", 300)]).unwrap();
        assert_eq!(read_all(tmp.path(), "w").last().unwrap().offset, 300);
    }

    #[test]
    fn reopened_log_applies_retention_at_once_and_keeps_offsets() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
            for n in 0..500 {
                log.append(&[record("w", n)]).unwrap();
            }
        }
        let before = segment_count(tmp.path(), "w");
        let (log, report) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        assert_eq!(report.next_offsets["w"], 500);
        let log = log
            .with_retention(Retention {
                max_age: None,
                max_bytes: Some(4096),
            })
            .unwrap();
        assert_eq!(
            log.retention_stats()
                .segments_deleted
                .load(Ordering::Relaxed),
            before as u64 - 1
        );
        assert_eq!(log.next_offset("w"), Some(500));
    }

    #[test]
    fn a_cursor_moves_past_segments_deleted_under_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LocalLog::open(tmp.path(), &["w"], 4096).unwrap();
        for n in 0..300 {
            log.append(&[record("w", n)]).unwrap();
        }
        // A reader positioned at the start, not yet opened on a file that
        // then goes away, and one that is halfway through the first segment.
        let reader = TopicReader::open(tmp.path(), "w").unwrap();
        let mut fresh = reader.cursor(0).unwrap();
        let mut midway = reader.cursor(0).unwrap();
        assert_eq!(midway.next_record().unwrap().unwrap().offset, 0);
        fresh.reader = None;
        let later = now_ms() + 2 * 3600 * 1000;
        log.retention = Retention {
            max_age: Some(Duration::from_secs(60)),
            max_bytes: None,
        };
        assert!(log.enforce_retention(later).unwrap() > 0);
        let oldest = read_all(tmp.path(), "w")[0].offset;
        assert!(oldest > 0);
        // The fresh cursor starts at the oldest kept record.
        assert_eq!(fresh.next_record().unwrap().unwrap().offset, oldest);
        // The one already reading finishes its (unlinked) segment, then goes on
        // to the oldest segment left: every offset it sees increases.
        let mut last = 0;
        while let Some(r) = midway.next_record().unwrap() {
            assert!(r.offset > last);
            last = r.offset;
        }
        assert_eq!(last, 299);
    }
}
