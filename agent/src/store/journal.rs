//! The reading journal: readings that feed open windows, group-committed,
//! replayed after a crash, reclaimed once their windows are in the outbox.
//! Format and invariants are in the [module docs of `store`](super).

use super::codec::{self, Corrupt, JournalEntry};
use super::config::JournalConfig;
use super::{Result, StoreError};
use crate::ingest::now_ms;
use fjall::{Database, Keyspace, OwnedWriteBatch, PersistMode};
use millrace_protocol::{Reading, SeriesKey, UnixMs};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Deletes per reclaim write batch, so one reclaim never builds a huge batch.
const RECLAIM_BATCH: usize = 4096;

/// The position of one journaled reading; positions grow in append order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JournalPosition(pub u64);

/// Returned by [`Journal::commit`]: every reading whose position is below
/// `durable_before` is on disk. An MQTT QoS 1 message may be acknowledged once
/// the position of its reading is below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JournalTicket {
    pub durable_before: JournalPosition,
}

impl JournalTicket {
    pub fn covers(&self, position: JournalPosition) -> bool {
        position < self.durable_before
    }
}

/// What [`Journal::replay`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalReplay {
    /// Readings of windows not yet in the outbox, in journal (arrival) order.
    pub readings: Vec<Reading>,
    /// Readings skipped because their window is already in the outbox.
    pub skipped_closed: u64,
    /// Undecodable entries, deleted.
    pub corrupt: u64,
}

/// What [`Journal::reclaim`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Entries whose window is in the outbox.
    pub closed: u64,
    /// Entries older than `journal.max-age`.
    pub expired: u64,
    /// Undecodable entries.
    pub corrupt: u64,
    /// Entries left.
    pub remaining: u64,
}

/// Journal counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Committed entries not yet reclaimed (as of the last reclaim or commit).
    pub entries: u64,
    /// Appended, not yet committed.
    pub pending: usize,
    pub durable_before: u64,
    pub commits: u64,
    pub reclaimed: u64,
    pub expired: u64,
    pub corrupt: u64,
    /// Series with a closed-up-to mark.
    pub marks: usize,
}

/// Per-series closed-up-to marks: the end of the last window of the series
/// that is in the outbox. Shared by the outbox (which stages them in its
/// append batch) and the journal (which filters by them).
pub(crate) struct Marks {
    ks: Keyspace,
    map: Mutex<HashMap<SeriesKey, UnixMs>>,
}

impl Marks {
    /// Loads all marks, deleting undecodable ones (returns how many).
    pub(crate) fn load(db: &Database, ks: Keyspace) -> Result<(Marks, u64)> {
        let mut map = HashMap::new();
        let mut broken = Vec::new();
        for guard in ks.iter() {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| StoreError::fjall("scanning window marks", e))?;
            match (codec::decode_series_key(&key), codec::decode_mark(&value)) {
                (Ok(series), Ok(end_ms)) => {
                    map.insert(series, end_ms);
                }
                _ => broken.push(key.to_vec()),
            }
        }
        let corrupt = broken.len() as u64;
        if !broken.is_empty() {
            let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
            for key in broken {
                batch.remove(&ks, key);
            }
            batch
                .commit()
                .map_err(|e| StoreError::fjall("deleting corrupt window marks", e))?;
        }
        Ok((
            Marks {
                ks,
                map: Mutex::new(map),
            },
            corrupt,
        ))
    }

    fn map(&self) -> MutexGuard<'_, HashMap<SeriesKey, UnixMs>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, series: &SeriesKey) -> Option<UnixMs> {
        self.map().get(series).copied()
    }

    fn snapshot(&self) -> HashMap<SeriesKey, UnixMs> {
        self.map().clone()
    }

    /// Adds the marks that advance a series to `batch`; returns them, to be
    /// [`Marks::apply`]ed once the batch committed. Marks never move back.
    pub(crate) fn stage(
        &self,
        batch: &mut OwnedWriteBatch,
        updates: Vec<(SeriesKey, UnixMs)>,
    ) -> Result<Vec<(SeriesKey, UnixMs)>> {
        let map = self.map();
        let mut best: HashMap<SeriesKey, UnixMs> = HashMap::new();
        for (series, end_ms) in updates {
            let current = best
                .get(&series)
                .copied()
                .or_else(|| map.get(&series).copied());
            if current.is_none_or(|c| end_ms > c) {
                best.insert(series, end_ms);
            }
        }
        let mut staged = Vec::with_capacity(best.len());
        for (series, end_ms) in best {
            batch.insert(
                &self.ks,
                codec::series_key(&series)?,
                codec::encode_mark(end_ms).to_vec(),
            );
            staged.push((series, end_ms));
        }
        Ok(staged)
    }

    pub(crate) fn apply(&self, staged: Vec<(SeriesKey, UnixMs)>) {
        let mut map = self.map();
        for (series, end_ms) in staged {
            let e = map.entry(series).or_insert(end_ms);
            *e = (*e).max(end_ms);
        }
    }

    fn len(&self) -> usize {
        self.map().len()
    }
}

/// Readings appended since the last commit: one block in the making.
#[derive(Debug, Default)]
struct Pending {
    /// The readings, postcard-encoded back to back.
    body: Vec<u8>,
    count: u32,
    next_position: u64,
    oldest: Option<Instant>,
    /// The earliest event time among the buffered readings.
    min_time_ms: Option<UnixMs>,
}

#[derive(Debug, Default)]
struct Committed {
    durable_before: u64,
    /// Every position below this is known absent (reclaimed).
    scan_from: u64,
    entries: u64,
    commits: u64,
    reclaimed: u64,
    expired: u64,
    corrupt: u64,
    /// Per block committed by this process (by first position): what
    /// [`Journal::reclaim`] needs to keep it without reading it.
    spans: std::collections::BTreeMap<u64, BlockSpan>,
    /// Every entry at or above this position was committed by this process
    /// and has its span (the journal's end when it was opened).
    spans_from: u64,
}

/// A committed block's earliest event time, commit time and size.
#[derive(Debug, Clone, Copy)]
struct BlockSpan {
    min_time_ms: UnixMs,
    appended_ms: UnixMs,
    count: u32,
}

struct Inner {
    db: Database,
    ks: Keyspace,
    marks: Arc<Marks>,
    config: JournalConfig,
    buffer_cap: usize,
    pending: Mutex<Pending>,
    /// Held across a commit, so tickets are handed out in position order.
    committed: Mutex<Committed>,
}

/// The reading journal. Cheap to clone; all clones share one buffer.
/// `append` only buffers (no I/O); `commit`, `replay`, `reclaim` and
/// `mark_closed` block on the disk.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Journal {
    pub(crate) fn recover(
        db: Database,
        ks: Keyspace,
        marks: Arc<Marks>,
        config: JournalConfig,
        buffer_cap: usize,
    ) -> Result<(Journal, u64)> {
        let mut entries = 0u64;
        let mut first: Option<u64> = None;
        let mut last: Option<u64> = None;
        for guard in ks.iter() {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| StoreError::fjall("scanning the journal", e))?;
            let Ok(pos) = codec::decode_u64_key(&key) else {
                entries += 1;
                continue;
            };
            // A block covers `count` positions from its key; an undecodable
            // entry counts as one (replay deletes it).
            let count = match codec::decode_journal_entry(&value) {
                Ok((_, JournalEntry::Block { count, .. })) => u64::from(count).max(1),
                _ => 1,
            };
            first.get_or_insert(pos);
            last = Some(pos.saturating_add(count - 1));
            entries += count;
        }
        let next_position = last.map_or(0, |p| p.saturating_add(1));
        let journal = Journal {
            inner: Arc::new(Inner {
                db,
                ks,
                marks,
                config,
                buffer_cap,
                pending: Mutex::new(Pending {
                    next_position,
                    ..Pending::default()
                }),
                committed: Mutex::new(Committed {
                    durable_before: next_position,
                    scan_from: first.unwrap_or(next_position),
                    spans_from: next_position,
                    entries,
                    ..Committed::default()
                }),
            }),
        };
        Ok((journal, entries))
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn committed(&self) -> MutexGuard<'_, Committed> {
        self.inner
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Buffers a reading for the next [`Journal::commit`] (no I/O, no
    /// allocation once the block buffer has grown). Refuses with
    /// [`StoreError::JournalBacklog`] when the buffer is at its cap.
    pub fn append(&self, reading: &Reading) -> Result<JournalPosition> {
        let mut p = self.pending();
        if p.count as usize >= self.inner.buffer_cap {
            return Err(StoreError::JournalBacklog {
                pending: p.count as usize,
                cap: self.inner.buffer_cap,
            });
        }
        let body = std::mem::take(&mut p.body);
        p.body = match codec::push_block_reading(body, reading) {
            Ok(body) => body,
            Err(e) => {
                // Unreachable in practice: postcard writing a `Reading` (plain
                // fields, strings) into a `Vec` cannot fail. Were it to, the
                // block being built is gone: its count goes with it, so the
                // next commit writes a consistent (empty) block; the caller
                // counts and logs the error.
                p.count = 0;
                p.oldest = None;
                return Err(e.into());
            }
        };
        let position = p.next_position;
        p.next_position += 1;
        p.count += 1;
        p.oldest.get_or_insert_with(Instant::now);
        p.min_time_ms = Some(
            p.min_time_ms
                .map_or(reading.time_ms, |t| t.min(reading.time_ms)),
        );
        Ok(JournalPosition(position))
    }

    /// Drops the buffered readings as a failed [`Journal::commit`] does.
    #[cfg(test)]
    pub(crate) fn lose_pending(&self) {
        let mut p = self.pending();
        p.body.clear();
        p.count = 0;
        p.oldest = None;
        p.min_time_ms = None;
    }

    /// The longest a reading waits in the buffer (`commit-interval`).
    pub fn commit_interval(&self) -> std::time::Duration {
        self.inner.config.commit_interval
    }

    /// Whether the pipeline should commit now: `commit-readings` are pending,
    /// or the oldest pending reading waited `commit-interval`.
    pub fn commit_due(&self) -> bool {
        let p = self.pending();
        p.count as usize >= self.inner.config.commit_readings
            || p.oldest
                .is_some_and(|t| t.elapsed() >= self.inner.config.commit_interval)
    }

    /// Makes every buffered reading durable: one block, one write, one
    /// fsync. On error the buffered readings are lost and the previous
    /// ticket still holds: do not acknowledge their MQTT messages (they are
    /// sent again).
    pub fn commit(&self) -> Result<JournalTicket> {
        let mut c = self.committed();
        let (body, count, next_position, min_time_ms) = {
            let mut p = self.pending();
            p.oldest = None;
            let count = std::mem::take(&mut p.count);
            (
                std::mem::take(&mut p.body),
                count,
                p.next_position,
                p.min_time_ms.take(),
            )
        };
        if count == 0 {
            return Ok(JournalTicket {
                durable_before: JournalPosition(c.durable_before),
            });
        }
        let first = next_position - u64::from(count);
        let appended_ms = now_ms();
        let value = codec::encode_block(appended_ms, count, &body);
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&self.inner.ks, codec::u64_key(first), value);
        let committed = batch.commit();
        // Give the buffer back for the next block (its capacity is reused).
        {
            let mut p = self.pending();
            if p.body.is_empty() {
                let mut body = body;
                body.clear();
                p.body = body;
            }
        }
        // The span is kept even if the commit failed: the block may be in
        // the keyspace all the same, and reclaim finds it (or its absence)
        // through the span.
        if let Some(min_time_ms) = min_time_ms {
            c.spans.insert(
                first,
                BlockSpan {
                    min_time_ms,
                    appended_ms,
                    count,
                },
            );
        }
        committed.map_err(|e| StoreError::fjall("committing the journal", e))?;
        c.durable_before = next_position;
        c.entries += u64::from(count);
        c.commits += 1;
        Ok(JournalTicket {
            durable_before: JournalPosition(c.durable_before),
        })
    }

    /// The journaled readings whose windows are not yet in the outbox, in
    /// order, to rebuild the window engine after a restart. Call before the
    /// first `append`.
    pub fn replay(&self) -> Result<JournalReplay> {
        let mut c = self.committed();
        let marks = self.inner.marks.snapshot();
        let mut out = JournalReplay::default();
        let mut broken = Vec::new();
        for guard in self.inner.ks.range(codec::u64_key(c.scan_from)..) {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| StoreError::fjall("replaying the journal", e))?;
            let readings = match codec::decode_journal_entry(&value) {
                Ok((_, JournalEntry::Single(reading))) => Ok(vec![reading]),
                Ok((_, JournalEntry::Block { count, body })) => codec::block_readings(count, body),
                Err(e) => Err(e),
            };
            match readings {
                Ok(readings) => {
                    for reading in readings {
                        if marks
                            .get(&reading.series)
                            .is_some_and(|&mark| reading.time_ms < mark)
                        {
                            out.skipped_closed += 1;
                        } else {
                            out.readings.push(reading);
                        }
                    }
                }
                Err(Corrupt) => broken.push(key.to_vec()),
            }
        }
        out.corrupt = broken.len() as u64;
        if !broken.is_empty() {
            tracing::error!(count = broken.len(), "deleted undecodable journal entries");
            let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
            for key in broken {
                batch.remove(&self.inner.ks, key);
            }
            batch
                .commit()
                .map_err(|e| StoreError::fjall("deleting corrupt journal entries", e))?;
            c.entries = c.entries.saturating_sub(out.corrupt);
            c.corrupt += out.corrupt;
        }
        Ok(out)
    }

    /// Records durably that every window of `series` ending at or before
    /// `window_end_ms` is done (for windows closed without an outbox record;
    /// windows appended to the outbox are marked by the append itself).
    pub fn mark_closed(&self, series: &SeriesKey, window_end_ms: UnixMs) -> Result<()> {
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        let staged = self
            .inner
            .marks
            .stage(&mut batch, vec![(series.clone(), window_end_ms)])?;
        batch
            .commit()
            .map_err(|e| StoreError::fjall("writing a window mark", e))?;
        self.inner.marks.apply(staged);
        Ok(())
    }

    /// Every series' closed-up-to mark, to seed a restarted window engine so
    /// it never opens a window that was already emitted.
    pub fn closed_marks(&self) -> HashMap<SeriesKey, UnixMs> {
        self.inner.marks.snapshot()
    }

    /// The end of the last window of `series` known to be in the outbox.
    pub fn closed_up_to(&self, series: &SeriesKey) -> Option<UnixMs> {
        self.inner.marks.get(series)
    }

    /// Deletes journal entries whose window is in the outbox (`time_ms` below
    /// the series mark), entries journaled more than `journal.max-age` before
    /// `now_ms`, and undecodable ones. Call it after outbox appends, e.g. once
    /// a second; it reads the whole (small) journal.
    pub fn reclaim(&self, now_ms: UnixMs) -> Result<ReclaimReport> {
        let mut c = self.committed();
        let marks = self.inner.marks.snapshot();
        let max_age_ms = i64::try_from(self.inner.config.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut report = ReclaimReport::default();
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        let mut first_kept: Option<u64> = None;
        // A block none of whose readings is as old as the newest mark has
        // nothing closed: kept as it is, not decoded. At 20,000 readings/s
        // that is every block of the open windows (seconds of readings),
        // which each reclaim decoded and looked up reading by reading.
        let newest_mark = marks.values().copied().max().unwrap_or(UnixMs::MIN);
        let marks: hashbrown::HashMap<SeriesKey, UnixMs, foldhash::fast::RandomState> =
            marks.into_iter().collect();
        let keep_unread =
            |span: &BlockSpan| span.min_time_ms >= newest_mark && span.appended_ms > cutoff;
        // What to do with one stored entry, read and decoded.
        let mut judge = |key: &[u8], value: &[u8], report: &mut ReclaimReport| -> bool {
            let counted = codec::decode_journal_entry(value).and_then(|(appended_ms, entry)| {
                let (closed, all) = match entry {
                    JournalEntry::Single(r) => {
                        let closed = marks.get(&r.series).is_some_and(|&m| r.time_ms < m);
                        (u64::from(closed), 1)
                    }
                    JournalEntry::Block { count, body } => {
                        let mut closed = 0u64;
                        codec::block_views(count, body, |r| {
                            if marks.get(&r.series).is_some_and(|&m| r.time_ms < m) {
                                closed += 1;
                            }
                        })?;
                        (closed, u64::from(count))
                    }
                };
                Ok((appended_ms, closed, all))
            });
            match counted {
                Ok((_, closed, all)) if closed == all => report.closed += all,
                Ok((appended_ms, closed, all)) if appended_ms <= cutoff => {
                    report.closed += closed;
                    report.expired += all - closed;
                }
                Ok((_, _, all)) => {
                    // A block is deleted whole, once none of its readings
                    // feeds an open window.
                    report.remaining += all;
                    return false;
                }
                Err(Corrupt) => report.corrupt += 1,
            }
            doomed.push(key.to_vec());
            true
        };
        let scan_from = c.scan_from;
        c.spans = c.spans.split_off(&scan_from);
        if scan_from >= c.spans_from {
            // Every entry left was committed by this process: its span says
            // where it is, and only a block that may hold closed readings
            // is read (a point read); the open windows' blocks are not.
            let mut gone = Vec::new();
            for (&position, span) in &c.spans {
                if keep_unread(span) {
                    report.remaining += u64::from(span.count);
                    first_kept.get_or_insert(position);
                    continue;
                }
                let key = codec::u64_key(position);
                let value = self
                    .inner
                    .ks
                    .get(key)
                    .map_err(|e| StoreError::fjall("reclaiming the journal", e))?;
                match value {
                    // Its commit failed before the block was stored.
                    None => gone.push(position),
                    Some(value) => {
                        if judge(&key, &value, &mut report) {
                            gone.push(position);
                        } else {
                            first_kept.get_or_insert(position);
                        }
                    }
                }
            }
            for position in gone {
                c.spans.remove(&position);
            }
        } else {
            for guard in self.inner.ks.range(codec::u64_key(scan_from)..) {
                let (key, value) = guard
                    .into_inner()
                    .map_err(|e| StoreError::fjall("reclaiming the journal", e))?;
                let position = codec::decode_u64_key(&key).ok();
                if let Some(span) = position.and_then(|p| c.spans.get(&p)) {
                    if keep_unread(span) {
                        report.remaining += u64::from(span.count);
                        if first_kept.is_none() {
                            first_kept = position;
                        }
                        continue;
                    }
                }
                if judge(&key, &value, &mut report) {
                    if let Some(p) = position {
                        c.spans.remove(&p);
                    }
                } else if first_kept.is_none() {
                    first_kept = position;
                }
            }
        }
        // Deletes need no fsync: an entry that comes back after a crash is
        // filtered by the same mark, or reclaimed again.
        for chunk in doomed.chunks(RECLAIM_BATCH) {
            let mut batch = self.inner.db.batch().durability(Some(PersistMode::Buffer));
            for key in chunk {
                batch.remove(&self.inner.ks, key.clone());
            }
            batch
                .commit()
                .map_err(|e| StoreError::fjall("reclaiming the journal", e))?;
        }
        c.scan_from = first_kept.unwrap_or(c.durable_before).max(c.scan_from);
        c.entries = report.remaining;
        c.reclaimed += report.closed;
        c.expired += report.expired;
        c.corrupt += report.corrupt;
        if report.expired > 0 || report.corrupt > 0 {
            tracing::warn!(
                expired = report.expired,
                corrupt = report.corrupt,
                max_age = ?self.inner.config.max_age,
                "journal entries deleted without a closed window"
            );
        }
        Ok(report)
    }

    pub fn stats(&self) -> JournalStats {
        let pending = self.pending().count as usize;
        let c = self.committed();
        JournalStats {
            entries: c.entries,
            pending,
            durable_before: c.durable_before,
            commits: c.commits,
            reclaimed: c.reclaimed,
            expired: c.expired,
            corrupt: c.corrupt,
            marks: self.inner.marks.len(),
        }
    }
}

#[cfg(test)]
mod tests;
