#![allow(clippy::unwrap_used)]
use super::*;
use crate::store::outbox::tests::window;
use crate::store::{JournalConfig, Store, StoreConfig};
use millrace_protocol::{Quality, Source};
use std::path::Path;
use std::time::Duration;

fn reading(series: &SeriesKey, time_ms: UnixMs, value: f64) -> Reading {
    Reading {
        series: series.clone(),
        time_ms,
        value,
        unit: "degC".into(),
        source: Source::Modbus,
        quality: Quality::Good,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreConfig::default()).unwrap().0
}

#[test]
fn commit_makes_appended_readings_durable_and_replayable_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesKey::new("plc1", "temp");
    let positions;
    {
        let store = open(dir.path());
        let j = store.journal();
        positions = (0..5)
            .map(|i| j.append(&reading(&s, 1000 + i, i as f64)).unwrap())
            .collect::<Vec<_>>();
        let ticket = j.commit().unwrap();
        assert!(positions.iter().all(|p| ticket.covers(*p)));
        // Appended but never committed: not covered, not replayed.
        let lost = j.append(&reading(&s, 9999, 9.0)).unwrap();
        assert!(!ticket.covers(lost));
        assert_eq!(j.stats().pending, 1);
        // Simulate a crash: the buffer is dropped with the store.
    }
    let store = open(dir.path());
    let replay = store.journal().replay().unwrap();
    let values: Vec<f64> = replay.readings.iter().map(|r| r.value).collect();
    assert_eq!(values, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    // New positions continue after the old ones.
    let next = store.journal().append(&reading(&s, 2000, 0.0)).unwrap();
    assert!(next > *positions.last().unwrap());
}

#[test]
fn replay_drops_readings_of_windows_already_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let a = SeriesKey::new("plc1", "temp");
    let b = SeriesKey::new("plc1", "pressure");
    {
        let store = open(dir.path());
        let j = store.journal();
        for t in [1000, 4999, 5000, 7000, 10_001] {
            j.append(&reading(&a, t, t as f64)).unwrap();
            j.append(&reading(&b, t, t as f64)).unwrap();
        }
        j.commit().unwrap();
        // Window [0, 5000) of `a` went out; `b` has none.
        store.outbox().append(vec![window(&a, 0, 5000)]).unwrap();
    }
    let store = open(dir.path());
    let replay = store.journal().replay().unwrap();
    assert_eq!(replay.skipped_closed, 2);
    let of_a: Vec<UnixMs> = replay
        .readings
        .iter()
        .filter(|r| r.series == a)
        .map(|r| r.time_ms)
        .collect();
    let of_b: Vec<UnixMs> = replay
        .readings
        .iter()
        .filter(|r| r.series == b)
        .map(|r| r.time_ms)
        .collect();
    assert_eq!(of_a, vec![5000, 7000, 10_001]);
    assert_eq!(of_b, vec![1000, 4999, 5000, 7000, 10_001]);
}

#[test]
fn explicit_marks_and_reclaim() {
    let dir = tempfile::tempdir().unwrap();
    let a = SeriesKey::new("plc1", "temp");
    let store = open(dir.path());
    let j = store.journal();
    // Two commits, two blocks: one of the closed window, one of the open one.
    for t in [100, 200] {
        j.append(&reading(&a, t, 0.0)).unwrap();
    }
    j.commit().unwrap();
    for t in [5100, 5200] {
        j.append(&reading(&a, t, 0.0)).unwrap();
    }
    j.commit().unwrap();
    j.mark_closed(&a, 5000).unwrap();
    j.mark_closed(&a, 0).unwrap(); // never moves back
    assert_eq!(j.closed_up_to(&a), Some(5000));
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!(
        r,
        ReclaimReport {
            closed: 2,
            expired: 0,
            corrupt: 0,
            remaining: 2
        }
    );
    assert_eq!(j.stats().entries, 2);
    // Entries past journal.max-age go even without a mark.
    let r = j.reclaim(now_ms() + 2 * 3_600_000).unwrap();
    assert_eq!((r.expired, r.remaining), (2, 0));
    drop(store);
    let store = open(dir.path());
    assert!(store.journal().replay().unwrap().readings.is_empty());
}

#[test]
fn commit_due_by_count_and_by_time_and_the_buffer_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        journal: JournalConfig {
            commit_interval: Duration::from_millis(30),
            commit_readings: 10,
            ..JournalConfig::default()
        },
        ..StoreConfig::default()
    };
    let (store, _) = Store::open(dir.path(), config).unwrap();
    let j = store.journal();
    let s = SeriesKey::new("d", "s");
    assert!(!j.commit_due());
    j.append(&reading(&s, 1, 1.0)).unwrap();
    assert!(!j.commit_due());
    std::thread::sleep(Duration::from_millis(40));
    assert!(j.commit_due(), "interval elapsed");
    j.commit().unwrap();
    assert!(!j.commit_due());
    for i in 0..10 {
        j.append(&reading(&s, i, 1.0)).unwrap();
    }
    assert!(j.commit_due(), "count reached");
    let mut refused = None;
    for i in 0..1000 {
        if let Err(e) = j.append(&reading(&s, i, 1.0)) {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(StoreError::JournalBacklog { cap: 80, .. })),
        "{refused:?}"
    );
    let ticket = j.commit().unwrap();
    assert_eq!(ticket.durable_before.0, 81);
    // An empty commit returns the same ticket.
    assert_eq!(j.commit().unwrap(), ticket);
}

/// A block is deleted whole: while one of its readings feeds an open window
/// it stays, and a replay skips the readings of closed windows in it.
#[test]
fn a_block_stays_until_every_reading_in_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (SeriesKey::new("plc1", "a"), SeriesKey::new("plc1", "b"));
    let store = open(dir.path());
    let j = store.journal();
    j.append(&reading(&a, 100, 1.0)).unwrap();
    j.append(&reading(&b, 100, 2.0)).unwrap();
    j.commit().unwrap();
    j.mark_closed(&a, 5000).unwrap();
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!((r.closed, r.remaining), (0, 2));
    let replay = j.replay().unwrap();
    assert_eq!(replay.skipped_closed, 1);
    assert_eq!(replay.readings.len(), 1);
    assert_eq!(replay.readings[0].series, b);
    j.mark_closed(&b, 5000).unwrap();
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!((r.closed, r.remaining), (2, 0));
    assert_eq!(j.stats().entries, 0);
}

/// Entries written one reading per value by earlier releases still replay
/// and reclaim beside the blocks written now.
#[test]
fn single_reading_entries_of_earlier_releases_replay_beside_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesKey::new("plc1", "temp");
    {
        let store = open(dir.path());
        let j = store.journal();
        let old = codec::encode_reading(now_ms(), &reading(&s, 100, 7.0)).unwrap();
        j.inner.ks.insert(codec::u64_key(0), old).unwrap();
    }
    let store = open(dir.path());
    let j = store.journal();
    let next = j.append(&reading(&s, 200, 8.0)).unwrap();
    assert_eq!(
        next,
        JournalPosition(1),
        "positions continue after the old entry"
    );
    j.commit().unwrap();
    drop(store);
    let store = open(dir.path());
    let values: Vec<f64> = store
        .journal()
        .replay()
        .unwrap()
        .readings
        .iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, vec![7.0, 8.0]);
    store.journal().mark_closed(&s, 5000).unwrap();
    let r = store.journal().reclaim(now_ms()).unwrap();
    assert_eq!((r.closed, r.remaining, r.corrupt), (2, 0, 0));
}

/// Blocks recovered from a previous run are found by a scan; once they are
/// gone, reclaim works from the spans of this run's blocks (reading only
/// those that may hold closed readings): the counts are the same either way.
#[test]
fn blocks_of_the_previous_run_and_of_this_one_are_reclaimed_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (SeriesKey::new("plc1", "a"), SeriesKey::new("plc1", "b"));
    {
        let store = open(dir.path());
        let j = store.journal();
        j.append(&reading(&a, 100, 1.0)).unwrap();
        j.commit().unwrap();
    }
    let store = open(dir.path());
    let j = store.journal();
    j.append(&reading(&a, 5100, 2.0)).unwrap();
    j.commit().unwrap();
    j.append(&reading(&b, 100, 3.0)).unwrap();
    j.commit().unwrap();
    j.mark_closed(&a, 5000).unwrap();
    // The recovered block (scan) goes; this run's blocks stay: `a`'s newer
    // than every mark, `b`'s without a mark.
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!((r.closed, r.remaining), (1, 2));
    j.mark_closed(&b, 5000).unwrap();
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!((r.closed, r.remaining), (1, 1));
    assert_eq!(j.stats().entries, 1);
    j.mark_closed(&a, 10_000).unwrap();
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!((r.closed, r.remaining), (1, 0));
    // Nothing is read twice or left behind.
    let r = j.reclaim(now_ms()).unwrap();
    assert_eq!(r, ReclaimReport::default());
    drop(store);
    let store = open(dir.path());
    assert!(store.journal().replay().unwrap().readings.is_empty());
    assert_eq!(store.journal().stats().entries, 0);
}
