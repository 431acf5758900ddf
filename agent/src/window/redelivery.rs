//! The redelivery guard: keeps a reading that the window engine already
//! counted from being counted again when its MQTT message comes back.
//!
//! Why: MQTT QoS 1 is at-least-once. The agent acknowledges a message only
//! after its reading is journaled, so a `kill -9` (or a dropped connection)
//! between the journal commit and the `PUBACK` makes the broker send the
//! message again — after a restart, on top of the same reading replayed from
//! the journal. Without this guard the reading would count twice in its
//! window (`count` 11 instead of 10, a shifted mean).
//!
//! What it is: a bounded log of fingerprints — a 48-bit hash of series, event
//! time and the value's bits — of recent readings whose messages can come
//! back (MQTT QoS 1/2). Two horizons:
//!
//! - readings **replayed from the journal** after a restart are remembered
//!   as long as their windows can be open (`width + allowed-lateness +
//!   idle-timeout`): the broker redelivers their messages once the agent
//!   reconnects, and a redelivery after that finds its window closed (a
//!   `late` dead letter) anyway;
//! - **live** readings are remembered for [`LIVE_HORIZON_MS`]: a message is
//!   redelivered only if its sender never got the acknowledgement, i.e. it
//!   arrived shortly before a crash or a broken connection.
//!
//! Only a message marked as a redelivery (MQTT's DUP flag, which a sender
//! must set when it sends a message again) is looked up
//! ([`RedeliveryGuard::is_redelivery`]); a first delivery is only
//! remembered ([`RedeliveryGuard::remember`]). Remembering appends to a log
//! in arrival order (6 bytes, no hashing into a table), and the hash index
//! that lookups need is built when a redelivery first asks and kept while
//! redeliveries keep coming: a connection that breaks brings a burst of
//! them, a healthy one none. So the steady-state cost is a few nanoseconds
//! per reading, whatever the rate. A redelivery found in the log is counted
//! ([`RedeliveryStats::duplicates`]), not journaled again and not fed to the
//! window engine; its message is still acknowledged.
//!
//! What it is not: a general dedup of the plant's data. Modbus polls and QoS 0
//! messages are never redelivered and are not tracked. Two readings of one
//! series with the same event time and the same value *are* taken as one
//! when the second is marked as a redelivery; a reading whose payload has no
//! timestamp is stamped at ingest, so its redelivery gets a new event time and
//! cannot be recognised (publish timestamps to get exactly-once windows), and
//! a sender that resends without the DUP flag breaks the MQTT rules and gets
//! its reading counted twice. At most `capacity` fingerprints are kept;
//! beyond that the oldest are forgotten early and counted
//! ([`RedeliveryStats::forgotten_early`]).

use millrace_protocol::{Reading, UnixMs};
use std::collections::VecDeque;
use std::hash::BuildHasher;

/// Fingerprints kept at most: 6 B each in the log (plus about 10 B each in
/// the index while it exists), so 1.5 MiB at the cap. Past 26 000 QoS 1
/// readings per second the live horizon holds more; the oldest then go early
/// (counted).
pub const DEFAULT_CAPACITY: usize = 262_144;

/// How long a live reading is remembered: the journal commits within
/// `journal.commit-interval` (100 ms by default) and the acknowledgement
/// follows at once, so only a message whose connection broke about then comes
/// back, once its sender (or broker) has reconnected: within a few seconds,
/// up to the reconnect backoff. At high rates the capacity, not this, bounds
/// what is remembered (262 144 fingerprints: 26 s at 10 000 readings/s).
pub const LIVE_HORIZON_MS: i64 = 10_000;

/// An index not asked for this long is dropped (it is rebuilt on demand).
const INDEX_IDLE_MS: i64 = 10_000;

/// Counters for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedeliveryStats {
    /// Redelivered readings recognised and not counted again.
    pub duplicates: u64,
    /// Fingerprints dropped before their horizon because the guard was full.
    pub forgotten_early: u64,
    /// Fingerprints held now.
    pub tracked: usize,
}

/// A fingerprint as the log stores it: its 48 bits in 6 bytes
/// (a quarter less memory than a `u64` at the cap: 1.5 MiB instead of 2).
/// With 262,144 kept, a reading looked up by mistake matches one of them
/// with probability 262,144 / 2⁴⁸ ≈ 10⁻⁹.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed([u16; 3]);

impl Packed {
    fn pack(fp: u64) -> Self {
        debug_assert!(fp < 1 << 48);
        Self([fp as u16, (fp >> 16) as u16, (fp >> 32) as u16])
    }

    fn unpack(self) -> u64 {
        let [a, b, c] = self.0;
        u64::from(a) | u64::from(b) << 16 | u64::from(c) << 32
    }
}

/// Fingerprints in arrival order, grouped by the time they are forgotten.
#[derive(Debug, Default)]
struct Log {
    fingerprints: VecDeque<Packed>,
    /// `(forget at, how many)` runs over `fingerprints`, oldest first.
    runs: VecDeque<(UnixMs, usize)>,
}

impl Log {
    fn push(&mut self, until: UnixMs, fp: u64) {
        self.fingerprints.push_back(Packed::pack(fp));
        match self.runs.back_mut() {
            Some((u, n)) if *u == until => *n += 1,
            _ => self.runs.push_back((until, 1)),
        }
    }

    /// Removes the oldest fingerprint.
    fn pop(&mut self) -> Option<u64> {
        let fp = self.fingerprints.pop_front()?;
        if let Some((_, n)) = self.runs.front_mut() {
            *n -= 1;
            if *n == 0 {
                self.runs.pop_front();
            }
        }
        Some(fp.unpack())
    }

    /// Removes the fingerprints due by `now_ms`, handing each to `gone`.
    fn expire(&mut self, now_ms: UnixMs, mut gone: impl FnMut(u64)) {
        while let Some(&(until, n)) = self.runs.front() {
            if until > now_ms {
                break;
            }
            self.runs.pop_front();
            for fp in self.fingerprints.drain(..n) {
                gone(fp.unpack());
            }
        }
    }

    fn len(&self) -> usize {
        self.fingerprints.len()
    }
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct RedeliveryGuard {
    hasher: foldhash::fast::RandomState,
    live: Log,
    /// Readings replayed from the journal.
    replayed: Log,
    /// Every fingerprint of both logs (with its multiplicity), while
    /// redeliveries are being looked up; `None` otherwise.
    index: Option<hashbrown::HashMap<u64, u32, foldhash::fast::RandomState>>,
    index_asked_ms: UnixMs,
    replay_horizon_ms: i64,
    live_horizon_ms: i64,
    capacity: usize,
    stats: RedeliveryStats,
}

impl RedeliveryGuard {
    /// A guard remembering replayed readings for `replay_horizon_ms` and
    /// live ones for `live_horizon_ms` of wall-clock time, at most
    /// `capacity` of them (at least 1).
    pub fn new(replay_horizon_ms: i64, live_horizon_ms: i64, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            hasher: foldhash::fast::RandomState::default(),
            // The whole log at once: its pages are only touched (made
            // resident) as it fills, whereas growing it by doubling would
            // copy it at each step and leave the smaller buffers behind as
            // free heap: up to 1.5 times the log at its peak.
            live: Log {
                fingerprints: VecDeque::with_capacity(capacity),
                runs: VecDeque::new(),
            },
            replayed: Log::default(),
            index: None,
            index_asked_ms: 0,
            replay_horizon_ms: replay_horizon_ms.max(0),
            live_horizon_ms: live_horizon_ms.max(0),
            capacity,
            stats: RedeliveryStats::default(),
        }
    }

    /// The reading's 48-bit fingerprint (the hash's high bits).
    fn fingerprint(&self, reading: &Reading) -> u64 {
        self.hasher.hash_one((
            &*reading.series.device,
            &*reading.series.sensor,
            reading.time_ms,
            reading.value.to_bits(),
        )) >> 16
    }

    /// Remembers a first delivery of a reading whose message can come back,
    /// for the live horizon. No lookup: a first delivery is never a duplicate.
    pub fn remember(&mut self, reading: &Reading, now_ms: UnixMs) {
        self.expire(now_ms);
        let fp = self.fingerprint(reading);
        self.insert(fp, now_ms, false);
    }

    /// `true` when `reading`, from a message marked as sent again, was seen
    /// before (a redelivery, counted); otherwise remembers it for the live
    /// horizon and returns `false`.
    pub fn is_redelivery(&mut self, reading: &Reading, now_ms: UnixMs) -> bool {
        self.check(reading, now_ms, false)
    }

    /// Like [`is_redelivery`](Self::is_redelivery) for a reading replayed
    /// from the journal, remembered for the replay horizon: `true` when the
    /// journal holds it twice (rebuild it once).
    pub fn is_replayed_twice(&mut self, reading: &Reading, now_ms: UnixMs) -> bool {
        self.check(reading, now_ms, true)
    }

    fn check(&mut self, reading: &Reading, now_ms: UnixMs, replayed: bool) -> bool {
        // Expire first: a fingerprint past its horizon must not match.
        self.expire(now_ms);
        self.index_asked_ms = now_ms;
        let fp = self.fingerprint(reading);
        if self.index().contains_key(&fp) {
            self.stats.duplicates += 1;
            return true;
        }
        self.insert(fp, now_ms, replayed);
        false
    }

    /// The index over both logs, built if absent.
    fn index(&mut self) -> &mut hashbrown::HashMap<u64, u32, foldhash::fast::RandomState> {
        let (live, replayed) = (&self.live, &self.replayed);
        self.index.get_or_insert_with(|| {
            let mut index = hashbrown::HashMap::with_capacity_and_hasher(
                live.len() + replayed.len(),
                foldhash::fast::RandomState::default(),
            );
            for fp in live.fingerprints.iter().chain(&replayed.fingerprints) {
                *index.entry(fp.unpack()).or_insert(0) += 1;
            }
            index
        })
    }

    fn insert(&mut self, fp: u64, now_ms: UnixMs, replayed: bool) {
        while self.live.len() + self.replayed.len() >= self.capacity {
            // The oldest live reading goes first: replayed ones are the
            // likelier to come back.
            let oldest = self.live.pop().or_else(|| self.replayed.pop());
            match oldest {
                Some(old) => {
                    unindex(&mut self.index, old);
                    self.stats.forgotten_early += 1;
                }
                None => break,
            }
        }
        if let Some(index) = self.index.as_mut() {
            *index.entry(fp).or_insert(0) += 1;
        }
        if replayed {
            self.replayed
                .push(now_ms.saturating_add(self.replay_horizon_ms), fp);
        } else {
            self.live
                .push(now_ms.saturating_add(self.live_horizon_ms), fp);
        }
    }

    /// Forgets fingerprints past their horizon, and the index once
    /// redeliveries stopped asking.
    pub fn expire(&mut self, now_ms: UnixMs) {
        if self.index.is_some() && now_ms.saturating_sub(self.index_asked_ms) >= INDEX_IDLE_MS {
            self.index = None;
        }
        let index = &mut self.index;
        self.live.expire(now_ms, |fp| unindex(index, fp));
        self.replayed.expire(now_ms, |fp| unindex(index, fp));
    }

    pub fn stats(&self) -> RedeliveryStats {
        RedeliveryStats {
            tracked: self.live.len() + self.replayed.len(),
            ..self.stats
        }
    }
}

fn unindex(index: &mut Option<hashbrown::HashMap<u64, u32, foldhash::fast::RandomState>>, fp: u64) {
    if let Some(index) = index.as_mut() {
        if let hashbrown::hash_map::Entry::Occupied(mut e) = index.entry(fp) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use millrace_protocol::{Quality, SeriesKey, Source};

    fn reading(sensor: &str, time_ms: UnixMs, value: f64, source: Source) -> Reading {
        Reading {
            series: SeriesKey::new("kiln-1", sensor),
            time_ms,
            value,
            unit: "degC".into(),
            source,
            quality: Quality::Good,
        }
    }

    #[test]
    fn fingerprints_keep_their_48_bits_in_the_log() {
        for fp in [0, 1, 0xffff, 0x1_0000, 0xdead_beef_cafe, (1 << 48) - 1] {
            assert_eq!(Packed::pack(fp).unpack(), fp);
        }
        assert_eq!(std::mem::size_of::<Packed>(), 6);
        let g = RedeliveryGuard::new(1_000, 1_000, 4);
        for t in 0..1_000 {
            let fp = g.fingerprint(&reading("s", t, t as f64, Source::Mqtt));
            assert!(fp < 1 << 48, "{fp:#x}");
        }
    }

    #[test]
    fn a_redelivered_reading_is_recognised_once_seen() {
        let mut g = RedeliveryGuard::new(10_000, 10_000, 100);
        let r = reading("temp", 1_000, 20.5, Source::Mqtt);
        assert!(!g.is_redelivery(&r, 0));
        assert!(g.is_redelivery(&r, 10));
        assert!(g.is_redelivery(&r, 20));
        assert_eq!(g.stats().duplicates, 2);
        assert_eq!(g.stats().tracked, 1);
    }

    #[test]
    fn series_time_and_value_all_tell_readings_apart() {
        let mut g = RedeliveryGuard::new(10_000, 10_000, 100);
        for r in [
            reading("temp", 1_000, 20.5, Source::Mqtt),
            reading("pressure", 1_000, 20.5, Source::Mqtt),
            reading("temp", 1_001, 20.5, Source::Mqtt),
            reading("temp", 1_000, 20.500000000000004, Source::Mqtt),
            reading("temp", 1_000, -0.0, Source::Mqtt),
            reading("temp", 1_000, 0.0, Source::Mqtt),
        ] {
            assert!(!g.is_redelivery(&r, 0), "{r:?}");
        }
        assert_eq!(g.stats().duplicates, 0);
    }

    /// A first delivery is remembered without a lookup, and its redelivery
    /// is recognised; the index is dropped once redeliveries stop asking.
    #[test]
    fn remembered_first_deliveries_are_found_by_a_redelivery() {
        let mut g = RedeliveryGuard::new(10_000, 3_000, 100);
        let r = reading("temp", 1_000, 20.5, Source::Mqtt);
        g.remember(&r, 0);
        g.remember(&r, 1_000); // the same reading again, first delivery both times
        assert!(g.index.is_none(), "no index without a redelivery");
        assert!(g.is_redelivery(&r, 10));
        assert!(g.index.is_some());
        assert_eq!(g.stats().duplicates, 1);
        // Expiring one of the two copies keeps the other findable.
        g.expire(3_000);
        assert!(g.is_redelivery(&r, 3_000));
        g.expire(3_000 + INDEX_IDLE_MS);
        assert!(g.index.is_none(), "index dropped when idle");
        assert_eq!(g.stats().tracked, 0);
    }

    #[test]
    fn fingerprints_are_forgotten_after_the_horizon() {
        let mut g = RedeliveryGuard::new(5_000, 1_000, 100);
        let r = reading("temp", 1_000, 20.5, Source::Mqtt);
        let replayed = reading("temp", 900, 20.0, Source::Mqtt);
        assert!(!g.is_replayed_twice(&replayed, 0));
        assert!(!g.is_redelivery(&r, 0));
        assert!(g.is_redelivery(&r, 999));
        g.expire(1_000);
        assert_eq!(g.stats().tracked, 1);
        assert!(!g.is_redelivery(&r, 1_000));
        // A replayed reading is remembered for the longer horizon.
        assert!(g.is_redelivery(&replayed, 4_999));
        g.expire(5_000);
        assert!(!g.is_redelivery(&replayed, 5_000));
    }

    #[test]
    fn a_full_guard_forgets_the_oldest_and_counts_it() {
        let mut g = RedeliveryGuard::new(60_000, 60_000, 3);
        let rs: Vec<_> = (0..5)
            .map(|i| reading("temp", i * 100, 1.0, Source::Mqtt))
            .collect();
        for r in &rs {
            assert!(!g.is_redelivery(r, 0));
        }
        let s = g.stats();
        assert_eq!((s.tracked, s.forgotten_early), (3, 2));
        // The newest three are still known, the oldest two are not.
        assert!(g.is_redelivery(&rs[4], 1));
        assert!(g.is_redelivery(&rs[2], 1));
        assert!(!g.is_redelivery(&rs[0], 1));
    }

    #[test]
    fn a_reading_twice_in_the_journal_replays_once() {
        let mut g = RedeliveryGuard::new(10_000, 10_000, 100);
        let r = reading("temp", 1_000, 20.5, Source::Mqtt);
        assert!(!g.is_replayed_twice(&r, 0));
        assert!(g.is_replayed_twice(&r, 0));
        // …and its redelivery after the restart is recognised.
        assert!(g.is_redelivery(&r, 5));
    }
}
