//! The outbox: records bound for the aggregator, keyed by `seq`, in two lanes.
//! Format and invariants are in the [module docs of `store`](super).

use super::codec::{self, Corrupt};
use super::config::{OutboxConfig, WhenFull};
use super::journal::Marks;
use super::recovery::SeqLease;
use super::{Result, StoreError};
use crate::ingest::now_ms;
use fjall::{Database, Keyspace, PersistMode};
use millrace_protocol::{Envelope, Record, SeriesKey, UnixMs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How far `seq` is reserved ahead in the lease file per lease write.
const LEASE_STEP: u64 = 1 << 20;
/// Fixed per-record overhead counted against `max-bytes`: the 8-byte key.
const KEY_BYTES: u64 = 8;

/// Which queue a record waits in. Each lane is read oldest first; the uplink
/// drains `Priority` before `Bulk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Alerts: an operator wants them before the backlog.
    Priority,
    /// Windows and dead letters.
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Priority, Lane::Bulk];

    /// The lane a record belongs to.
    pub fn of(record: &Record) -> Lane {
        match record {
            Record::Alert(_) => Lane::Priority,
            Record::Window(_) | Record::DeadLetter(_) => Lane::Bulk,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Priority => "priority",
            Lane::Bulk => "bulk",
        }
    }

    pub(crate) fn keyspace_name(self) -> &'static str {
        match self {
            Lane::Priority => "outbox_priority",
            Lane::Bulk => "outbox_bulk",
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Priority => 0,
            Lane::Bulk => 1,
        }
    }
}

/// Depth and loss counters of one lane. Counters count since the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaneStats {
    pub records: u64,
    /// Key + stored value bytes, the unit of `max-bytes`.
    pub bytes: u64,
    /// Age of the oldest pending record (by append time), `None` when empty.
    pub oldest_age: Option<Duration>,
    /// Dropped by `when-full = "drop-oldest"`.
    pub dropped_full: u64,
    /// Expired by `max-age`.
    pub expired: u64,
    /// Undecodable entries found and deleted.
    pub corrupt: u64,
}

/// A snapshot of the outbox for metrics and `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub priority: LaneStats,
    pub bulk: LaneStats,
    /// The `seq` the next appended record gets.
    pub next_seq: u64,
    pub max_bytes: u64,
}

impl OutboxStats {
    pub fn lane(&self, lane: Lane) -> &LaneStats {
        match lane {
            Lane::Priority => &self.priority,
            Lane::Bulk => &self.bulk,
        }
    }

    pub fn records(&self) -> u64 {
        self.priority.records + self.bulk.records
    }

    pub fn bytes(&self) -> u64 {
        self.priority.bytes + self.bulk.bytes
    }
}

/// What an [`Outbox::ack`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckReport {
    /// Records deleted.
    pub acked: usize,
    /// Seqs not pending (acknowledged before, or dropped by policy).
    pub unknown: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct LaneState {
    records: u64,
    bytes: u64,
    /// Every key below this is known absent from the lane: scans start here
    /// instead of wading through the tombstones of acknowledged records.
    scan_from: u64,
    dropped_full: u64,
    expired: u64,
    corrupt: u64,
}

#[derive(Debug)]
pub(crate) struct OutboxState {
    next_seq: u64,
    lease: SeqLease,
    /// `<dir>/appended`: `next_seq` after the last append that returned,
    /// written without fsync (survives a process crash, may lag after power
    /// loss). At open, a database whose `next_seq` is below it lost appends.
    appended_mark: Option<std::fs::File>,
    lanes: [LaneState; 2],
}

struct Inner {
    db: Database,
    lanes: [Keyspace; 2],
    meta: Keyspace,
    marks: Arc<Marks>,
    config: OutboxConfig,
    state: Mutex<OutboxState>,
}

/// The outbox. Cheap to clone; all clones share one state. Blocking: call it
/// from `spawn_blocking` (see [`super::blocking`]).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// One entry found at the front of a lane.
struct FrontEntry {
    seq: u64,
    bytes: u64,
    /// `None` when the stored value is corrupt.
    appended_ms: Option<UnixMs>,
}

/// What the open-time scan of the outbox found.
#[derive(Debug, Default)]
pub(crate) struct OutboxScan {
    pub records: [u64; 2],
    pub corrupt: [u64; 2],
    pub next_seq: u64,
    pub meta_next_seq_unreadable: bool,
    pub meta_next_seq_missing: bool,
    pub meta_next_seq: u64,
}

pub(crate) const META_NEXT_SEQ: &[u8] = b"next_seq";

impl Outbox {
    /// Scans both lanes (deleting undecodable entries), and sets `next_seq`
    /// above every seq that may have been handed out: the persisted
    /// `next_seq`, the highest key present, and the lease.
    pub(crate) fn recover(
        db: Database,
        meta: Keyspace,
        marks: Arc<Marks>,
        config: OutboxConfig,
        mut lease: SeqLease,
        appended_mark: Option<std::fs::File>,
    ) -> Result<(Outbox, OutboxScan)> {
        let mut scan = OutboxScan::default();
        let mut lanes_state = [LaneState::default(); 2];
        let mut highest_key: Option<u64> = None;
        let mut lanes = Vec::with_capacity(2);
        for lane in Lane::ALL {
            let ks = db
                .keyspace(lane.keyspace_name(), super::recovery::keyspace_options)
                .map_err(|e| StoreError::fjall("opening an outbox lane", e))?;
            let st = &mut lanes_state[lane.index()];
            let mut broken: Vec<Vec<u8>> = Vec::new();
            let mut first: Option<u64> = None;
            for guard in ks.iter() {
                let (key, value) = guard
                    .into_inner()
                    .map_err(|e| StoreError::fjall("scanning the outbox", e))?;
                let seq = codec::decode_u64_key(&key);
                let valid = codec::decode_value::<Record>(&value).is_ok();
                match (seq, valid) {
                    (Ok(seq), true) => {
                        st.records += 1;
                        st.bytes += KEY_BYTES + value.len() as u64;
                        first.get_or_insert(seq);
                        highest_key = Some(highest_key.map_or(seq, |h| h.max(seq)));
                    }
                    (seq, _) => {
                        if let Ok(seq) = seq {
                            highest_key = Some(highest_key.map_or(seq, |h| h.max(seq)));
                        }
                        broken.push(key.to_vec());
                    }
                }
            }
            st.scan_from = first.unwrap_or(0);
            st.corrupt = broken.len() as u64;
            scan.records[lane.index()] = st.records;
            scan.corrupt[lane.index()] = st.corrupt;
            if !broken.is_empty() {
                tracing::warn!(
                    lane = lane.as_str(),
                    count = broken.len(),
                    "deleted undecodable outbox records"
                );
                let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
                for key in broken {
                    batch.remove(&ks, key);
                }
                batch
                    .commit()
                    .map_err(|e| StoreError::fjall("deleting corrupt outbox records", e))?;
            }
            lanes.push(ks);
        }
        let meta_next = match meta.get(META_NEXT_SEQ) {
            Ok(Some(v)) => match codec::decode_meta_u64(&v) {
                Ok(n) => n,
                Err(Corrupt) => {
                    scan.meta_next_seq_unreadable = true;
                    0
                }
            },
            Ok(None) => {
                scan.meta_next_seq_missing = true;
                0
            }
            Err(e) => return Err(StoreError::fjall("reading next_seq", e)),
        };
        let next_seq = meta_next
            .max(highest_key.map_or(0, |h| h.saturating_add(1)))
            .max(lease.end())
            .max(1);
        // Reserve ahead before anything is handed out.
        lease.extend_to(next_seq.saturating_add(LEASE_STEP))?;
        scan.next_seq = next_seq;
        scan.meta_next_seq = meta_next;
        let [priority, bulk]: [Keyspace; 2] = lanes
            .try_into()
            .map_err(|_| StoreError::Task("outbox lanes missing".into()))?;
        let outbox = Outbox {
            inner: Arc::new(Inner {
                db,
                lanes: [priority, bulk],
                meta,
                marks,
                config,
                state: Mutex::new(OutboxState {
                    next_seq,
                    lease,
                    appended_mark,
                    lanes: lanes_state,
                }),
            }),
        };
        Ok((outbox, scan))
    }

    fn state(&self) -> MutexGuard<'_, OutboxState> {
        // The state is plain counters updated after each commit; a panic
        // elsewhere cannot leave it half-written.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ks(&self, lane: Lane) -> &Keyspace {
        &self.inner.lanes[lane.index()]
    }

    /// Appends records (one durable commit for the group) and returns their
    /// seqs, in order. Windows among them advance their series' closed-up-to
    /// marks in the same commit.
    ///
    /// Errors: [`StoreError::Full`] with `when-full = "block"`,
    /// [`StoreError::TooLarge`], [`StoreError::DiskFull`] or another storage
    /// error; on error nothing was appended.
    pub fn append(&self, records: Vec<Record>) -> Result<Vec<u64>> {
        self.append_closing(records, &[])
    }

    /// [`Outbox::append`] plus explicit closed-up-to marks (for windows the
    /// engine closed without emitting a record), all in one commit.
    pub fn append_closing(
        &self,
        records: Vec<Record>,
        closed: &[(SeriesKey, UnixMs)],
    ) -> Result<Vec<u64>> {
        if records.is_empty() && closed.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut encoded = Vec::with_capacity(records.len());
        let mut incoming_bytes = 0u64;
        let mut marks: Vec<(SeriesKey, UnixMs)> = closed.to_vec();
        for record in &records {
            let value = codec::encode_record(now, record)?;
            incoming_bytes += KEY_BYTES + value.len() as u64;
            if let Record::Window(w) = record {
                marks.push((w.series.clone(), w.end_ms));
            }
            encoded.push((Lane::of(record), value));
        }
        let max_bytes = self.inner.config.max_bytes;
        if incoming_bytes > max_bytes {
            return Err(StoreError::TooLarge {
                bytes: incoming_bytes,
                max_bytes,
            });
        }

        let mut st = self.state();
        self.expire_locked(&mut st, now)?;

        let pending_bytes = st.lanes[0].bytes + st.lanes[1].bytes;
        let excess = (pending_bytes + incoming_bytes).saturating_sub(max_bytes);
        let mut victims: Vec<(Lane, Vec<FrontEntry>)> = Vec::new();
        if excess > 0 {
            match self.inner.config.when_full {
                WhenFull::Block => {
                    return Err(StoreError::Full {
                        pending_bytes,
                        incoming_bytes,
                        max_bytes,
                    })
                }
                WhenFull::DropOldest => {
                    let mut freed = 0u64;
                    for lane in [Lane::Bulk, Lane::Priority] {
                        if freed >= excess {
                            break;
                        }
                        let front = self.front(&st, lane, |_| true, excess - freed)?;
                        freed += front.iter().map(|e| e.bytes).sum::<u64>();
                        victims.push((lane, front));
                    }
                }
            }
        }

        let n = encoded.len() as u64;
        let first_seq = st.next_seq;
        let next_seq = first_seq.saturating_add(n);
        if next_seq > st.lease.end() {
            st.lease.extend_to(next_seq.saturating_add(LEASE_STEP))?;
        }

        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        for (lane, front) in &victims {
            for e in front {
                batch.remove(self.ks(*lane), codec::u64_key(e.seq));
            }
        }
        let mut added = [(0u64, 0u64); 2];
        let mut seqs = Vec::with_capacity(encoded.len());
        for (i, (lane, value)) in encoded.into_iter().enumerate() {
            let seq = first_seq + i as u64;
            added[lane.index()].0 += 1;
            added[lane.index()].1 += KEY_BYTES + value.len() as u64;
            batch.insert(self.ks(lane), codec::u64_key(seq), value);
            seqs.push(seq);
        }
        batch.insert(
            &self.inner.meta,
            META_NEXT_SEQ,
            codec::encode_meta_u64(next_seq).to_vec(),
        );
        let staged = self.inner.marks.stage(&mut batch, marks)?;
        batch
            .commit()
            .map_err(|e| StoreError::fjall("appending to the outbox", e))?;

        // Committed: update the in-memory view.
        self.inner.marks.apply(staged);
        st.next_seq = next_seq;
        if let Some(file) = &st.appended_mark {
            use std::os::unix::fs::FileExt;
            if let Err(e) = file.write_all_at(&codec::encode_meta_u64(next_seq), 0) {
                tracing::warn!(error = %e, "could not update the appended mark");
            }
        }
        for lane in Lane::ALL {
            let ls = &mut st.lanes[lane.index()];
            ls.records += added[lane.index()].0;
            ls.bytes += added[lane.index()].1;
        }
        for (lane, front) in victims {
            if front.is_empty() {
                continue;
            }
            let ls = &mut st.lanes[lane.index()];
            let (mut dropped, mut corrupt, mut bytes) = (0u64, 0u64, 0u64);
            for e in &front {
                bytes += e.bytes;
                if e.appended_ms.is_some() {
                    dropped += 1;
                } else {
                    corrupt += 1;
                }
            }
            ls.records = ls.records.saturating_sub(dropped + corrupt);
            ls.bytes = ls.bytes.saturating_sub(bytes);
            ls.dropped_full += dropped;
            ls.corrupt += corrupt;
            if let Some(last) = front.last() {
                ls.scan_from = ls.scan_from.max(last.seq + 1);
            }
            tracing::warn!(
                lane = lane.as_str(),
                dropped,
                corrupt,
                bytes,
                first_seq = front.first().map(|e| e.seq),
                last_seq = front.last().map(|e| e.seq),
                max_bytes,
                "outbox full: dropped oldest records"
            );
        }
        Ok(seqs)
    }

    /// Entries at the front of `lane`, oldest first, while `keep_going` holds
    /// for the entry's append time (corrupt entries always qualify), until
    /// `want_bytes` are collected.
    fn front(
        &self,
        st: &OutboxState,
        lane: Lane,
        keep_going: impl Fn(UnixMs) -> bool,
        want_bytes: u64,
    ) -> Result<Vec<FrontEntry>> {
        let mut out = Vec::new();
        let mut got = 0u64;
        let from = codec::u64_key(st.lanes[lane.index()].scan_from);
        for guard in self.ks(lane).range(from..) {
            if got >= want_bytes {
                break;
            }
            let (key, value) = guard
                .into_inner()
                .map_err(|e| StoreError::fjall("reading the outbox", e))?;
            let Ok(seq) = codec::decode_u64_key(&key) else {
                continue;
            };
            let appended_ms = codec::value_appended_ms(&value).ok();
            if let Some(ms) = appended_ms {
                if !keep_going(ms) {
                    break;
                }
            }
            let bytes = KEY_BYTES + value.len() as u64;
            got += bytes;
            out.push(FrontEntry {
                seq,
                bytes,
                appended_ms,
            });
        }
        Ok(out)
    }

    /// Deletes records older than `max-age` (by append time) as of `now_ms`;
    /// returns how many. `append` calls it too.
    pub fn expire(&self, now_ms: UnixMs) -> Result<u64> {
        let mut st = self.state();
        self.expire_locked(&mut st, now_ms)
    }

    fn expire_locked(&self, st: &mut OutboxState, now_ms: UnixMs) -> Result<u64> {
        let max_age_ms = i64::try_from(self.inner.config.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut total = 0u64;
        for lane in Lane::ALL {
            let front = self.front(st, lane, |ms| ms <= cutoff, u64::MAX)?;
            if front.is_empty() {
                continue;
            }
            // Losing this delete in a crash only means it is expired again.
            let mut batch = self.inner.db.batch().durability(Some(PersistMode::Buffer));
            for e in &front {
                batch.remove(self.ks(lane), codec::u64_key(e.seq));
            }
            batch
                .commit()
                .map_err(|e| StoreError::fjall("expiring outbox records", e))?;
            let ls = &mut st.lanes[lane.index()];
            let expired = front.iter().filter(|e| e.appended_ms.is_some()).count() as u64;
            let corrupt = front.len() as u64 - expired;
            let bytes: u64 = front.iter().map(|e| e.bytes).sum();
            ls.records = ls.records.saturating_sub(front.len() as u64);
            ls.bytes = ls.bytes.saturating_sub(bytes);
            ls.expired += expired;
            ls.corrupt += corrupt;
            if let Some(last) = front.last() {
                ls.scan_from = ls.scan_from.max(last.seq + 1);
            }
            total += expired;
            tracing::warn!(
                lane = lane.as_str(),
                expired,
                corrupt,
                bytes,
                max_age = ?self.inner.config.max_age,
                "outbox records expired by max-age"
            );
        }
        Ok(total)
    }

    /// Up to `max_records` of the oldest pending records of `lane`, in seq
    /// order, together at most `max_bytes` of stored value (but always at
    /// least one record if any is pending, so an oversize record cannot wedge
    /// the lane). Undecodable entries are deleted and counted, not returned.
    pub fn peek(&self, lane: Lane, max_records: usize, max_bytes: u64) -> Result<Vec<Envelope>> {
        self.peek_from(lane, 0, max_records, max_bytes)
    }

    /// [`Outbox::peek`] starting at `from_seq`: lets an uplink with a batch in
    /// flight read the next one.
    pub fn peek_from(
        &self,
        lane: Lane,
        from_seq: u64,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>> {
        let mut st = self.state();
        let scan_from = st.lanes[lane.index()].scan_from;
        let start = from_seq.max(scan_from);
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut broken: Vec<(u64, u64)> = Vec::new();
        let mut first_seen: Option<u64> = None;
        if max_records > 0 {
            for guard in self.ks(lane).range(codec::u64_key(start)..) {
                let (key, value) = guard
                    .into_inner()
                    .map_err(|e| StoreError::fjall("reading the outbox", e))?;
                let Ok(seq) = codec::decode_u64_key(&key) else {
                    continue;
                };
                first_seen.get_or_insert(seq);
                match codec::decode_value::<Record>(&value) {
                    Ok((_, record)) => {
                        let size = value.len() as u64;
                        if !out.is_empty() && bytes + size > max_bytes {
                            break;
                        }
                        bytes += size;
                        out.push(Envelope { seq, record });
                        if out.len() >= max_records {
                            break;
                        }
                    }
                    Err(Corrupt) => broken.push((seq, KEY_BYTES + value.len() as u64)),
                }
            }
        }
        // Keys below the first one found are absent (only valid when the scan
        // started at the lane's own lower bound).
        if start == scan_from && max_records > 0 {
            st.lanes[lane.index()].scan_from = first_seen.unwrap_or(st.next_seq).max(scan_from);
        }
        if !broken.is_empty() {
            self.delete_corrupt(&mut st, lane, &broken)?;
        }
        Ok(out)
    }

    fn delete_corrupt(
        &self,
        st: &mut OutboxState,
        lane: Lane,
        broken: &[(u64, u64)],
    ) -> Result<()> {
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::Buffer));
        for (seq, _) in broken {
            batch.remove(self.ks(lane), codec::u64_key(*seq));
        }
        batch
            .commit()
            .map_err(|e| StoreError::fjall("deleting corrupt outbox records", e))?;
        let ls = &mut st.lanes[lane.index()];
        ls.records = ls.records.saturating_sub(broken.len() as u64);
        ls.bytes = ls.bytes.saturating_sub(broken.iter().map(|(_, b)| b).sum());
        ls.corrupt += broken.len() as u64;
        tracing::error!(
            lane = lane.as_str(),
            count = broken.len(),
            "deleted undecodable outbox records"
        );
        Ok(())
    }

    /// Deletes the records the aggregator acknowledged. Unknown seqs (acked
    /// twice, or dropped meanwhile) are counted, not errors. Not fsynced: a
    /// lost ack re-sends a record the aggregator deduplicates.
    pub fn ack(&self, seqs: &[u64]) -> Result<AckReport> {
        let mut st = self.state();
        let mut report = AckReport::default();
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::Buffer));
        let mut removed = [(0u64, 0u64); 2];
        let mut unique = seqs.to_vec();
        unique.sort_unstable();
        unique.dedup();
        report.unknown += seqs.len() - unique.len();
        for seq in unique {
            let key = codec::u64_key(seq);
            let mut found = false;
            for lane in Lane::ALL {
                if seq < st.lanes[lane.index()].scan_from {
                    continue;
                }
                let size = self
                    .ks(lane)
                    .size_of(key)
                    .map_err(|e| StoreError::fjall("acknowledging outbox records", e))?;
                if let Some(size) = size {
                    batch.remove(self.ks(lane), key);
                    removed[lane.index()].0 += 1;
                    removed[lane.index()].1 += KEY_BYTES + u64::from(size);
                    found = true;
                    break;
                }
            }
            if found {
                report.acked += 1;
            } else {
                report.unknown += 1;
            }
        }
        batch
            .commit()
            .map_err(|e| StoreError::fjall("acknowledging outbox records", e))?;
        for lane in Lane::ALL {
            let ls = &mut st.lanes[lane.index()];
            ls.records = ls.records.saturating_sub(removed[lane.index()].0);
            ls.bytes = ls.bytes.saturating_sub(removed[lane.index()].1);
        }
        Ok(report)
    }

    /// The lowest seq still pending in any lane, or the next seq if none is:
    /// the `outbox_floor` of each batch sent.
    pub fn floor(&self) -> Result<u64> {
        let mut st = self.state();
        let mut floor = st.next_seq;
        for lane in Lane::ALL {
            if let Some(seq) = self.first_seq(&mut st, lane)? {
                floor = floor.min(seq);
            }
        }
        Ok(floor)
    }

    fn first_seq(&self, st: &mut OutboxState, lane: Lane) -> Result<Option<u64>> {
        let ls = &mut st.lanes[lane.index()];
        let first = match self.ks(lane).range(codec::u64_key(ls.scan_from)..).next() {
            Some(guard) => {
                let key = guard
                    .key()
                    .map_err(|e| StoreError::fjall("reading the outbox", e))?;
                codec::decode_u64_key(&key).ok()
            }
            None => None,
        };
        ls.scan_from = first.unwrap_or(st.next_seq).max(ls.scan_from);
        Ok(first)
    }

    /// Depth, age and loss counters per lane.
    pub fn stats(&self) -> Result<OutboxStats> {
        let st = self.state();
        let now = now_ms();
        let mut lanes = [LaneStats::default(); 2];
        for lane in Lane::ALL {
            let ls = &st.lanes[lane.index()];
            let oldest_age = match self.ks(lane).range(codec::u64_key(ls.scan_from)..).next() {
                Some(guard) => {
                    let value = guard
                        .value()
                        .map_err(|e| StoreError::fjall("reading the outbox", e))?;
                    codec::value_appended_ms(&value)
                        .ok()
                        .map(|ms| Duration::from_millis(now.saturating_sub(ms).max(0) as u64))
                }
                None => None,
            };
            lanes[lane.index()] = LaneStats {
                records: ls.records,
                bytes: ls.bytes,
                oldest_age,
                dropped_full: ls.dropped_full,
                expired: ls.expired,
                corrupt: ls.corrupt,
            };
        }
        let [priority, bulk] = lanes;
        Ok(OutboxStats {
            priority,
            bulk,
            next_seq: st.next_seq,
            max_bytes: self.inner.config.max_bytes,
        })
    }

    /// The seq the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.state().next_seq
    }
}

#[cfg(test)]
pub(crate) mod tests;
