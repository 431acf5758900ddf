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
//! What it is: a bounded set of fingerprints — a 64-bit hash of series, event
//! time and the value's bits — of recent MQTT readings. A reading whose
//! fingerprint is in the set is a redelivery: it is counted
//! ([`RedeliveryStats::duplicates`]), not journaled again and not fed to the
//! window engine; its message is still acknowledged. Two horizons:
//!
//! - readings **replayed from the journal** after a restart are remembered
//!   as long as their windows can be open (`width + allowed-lateness +
//!   idle-timeout`): the broker redelivers their messages once the agent
//!   reconnects, and a redelivery after that finds its window closed (a
//!   `late` dead letter) anyway;
//! - **live** readings are remembered for [`LIVE_HORIZON_MS`]: a message is
//!   redelivered only if the broker never got its `PUBACK`, i.e. it arrived
//!   shortly before a crash or a broken connection.
//!
//! What it is not: a general dedup of the plant's data. Modbus polls are never
//! redelivered and are not tracked. Two MQTT readings of one series with the
//! same event time and the same value *are* taken as one; a reading whose
//! payload has no timestamp is stamped at ingest, so its redelivery gets a new
//! event time and cannot be recognised (publish timestamps to get exactly-once
//! windows). At most `capacity` fingerprints are kept; beyond that the oldest
//! are forgotten early and counted ([`RedeliveryStats::forgotten_early`]).

use millrace_protocol::{Reading, Source, UnixMs};
use std::collections::VecDeque;
use std::hash::BuildHasher;

/// Fingerprints kept at most: 16 B each in a queue plus about 10 B in the
/// set, so about 6.5 MiB at the cap. 10 000 MQTT readings per second need
/// 30 000 for the live horizon, plus one journal's worth after a restart.
pub const DEFAULT_CAPACITY: usize = 262_144;

/// How long a live reading is remembered: the journal commits within
/// `journal.commit-interval` (100 ms by default) and the `PUBACK` follows at
/// once, so only a connection that broke within this long of the delivery
/// can bring the message back.
pub const LIVE_HORIZON_MS: i64 = 3_000;

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

/// See the [module docs](self).
#[derive(Debug)]
pub struct RedeliveryGuard {
    hasher: foldhash::fast::RandomState,
    seen: hashbrown::HashSet<u64, foldhash::fast::RandomState>,
    /// `(forget at, fingerprint)` of live readings, by `forget at`.
    live: VecDeque<(UnixMs, u64)>,
    /// The same for readings replayed from the journal.
    replayed: VecDeque<(UnixMs, u64)>,
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
        Self {
            hasher: foldhash::fast::RandomState::default(),
            seen: hashbrown::HashSet::default(),
            live: VecDeque::new(),
            replayed: VecDeque::new(),
            replay_horizon_ms: replay_horizon_ms.max(0),
            live_horizon_ms: live_horizon_ms.max(0),
            capacity: capacity.max(1),
            stats: RedeliveryStats::default(),
        }
    }

    /// Only MQTT readings can come back; everything else passes untracked.
    fn tracks(reading: &Reading) -> bool {
        reading.source == Source::Mqtt
    }

    fn fingerprint(&self, reading: &Reading) -> u64 {
        self.hasher.hash_one((
            reading.series.device.as_str(),
            reading.series.sensor.as_str(),
            reading.time_ms,
            reading.value.to_bits(),
        ))
    }

    /// `true` when the live `reading` was seen before (a redelivery,
    /// counted); otherwise remembers it for the live horizon and returns
    /// `false`.
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
        if !Self::tracks(reading) {
            return false;
        }
        // Expire first: a fingerprint past its horizon must not match.
        self.expire(now_ms);
        let fp = self.fingerprint(reading);
        if self.seen.contains(&fp) {
            self.stats.duplicates += 1;
            return true;
        }
        while self.live.len() + self.replayed.len() >= self.capacity {
            // The oldest live reading goes first: replayed ones are the
            // likelier to come back.
            let oldest = match self.live.pop_front() {
                Some(entry) => Some(entry),
                None => self.replayed.pop_front(),
            };
            if let Some((_, old)) = oldest {
                self.seen.remove(&old);
                self.stats.forgotten_early += 1;
            }
        }
        self.seen.insert(fp);
        let (queue, horizon) = if replayed {
            (&mut self.replayed, self.replay_horizon_ms)
        } else {
            (&mut self.live, self.live_horizon_ms)
        };
        queue.push_back((now_ms.saturating_add(horizon), fp));
        false
    }

    /// Forgets fingerprints past their horizon.
    pub fn expire(&mut self, now_ms: UnixMs) {
        for queue in [&mut self.live, &mut self.replayed] {
            while let Some(&(until, fp)) = queue.front() {
                if until > now_ms {
                    break;
                }
                queue.pop_front();
                self.seen.remove(&fp);
            }
        }
    }

    pub fn stats(&self) -> RedeliveryStats {
        RedeliveryStats {
            tracked: self.live.len() + self.replayed.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use millrace_protocol::{Quality, SeriesKey};

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

    #[test]
    fn modbus_readings_are_not_tracked() {
        let mut g = RedeliveryGuard::new(10_000, 10_000, 100);
        let r = reading("temp", 1_000, 20.5, Source::Modbus);
        assert!(!g.is_redelivery(&r, 0));
        assert!(!g.is_redelivery(&r, 0));
        assert_eq!(g.stats(), RedeliveryStats::default());
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
