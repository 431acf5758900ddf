#![allow(clippy::unwrap_used)]
use super::*;
use crate::store::{Store, StoreConfig};
use millrace_protocol::{
    Alert, AlertKind, AnomalyScore, DeadLetter, DeadLetterReason, Severity, Source, Window,
};
use proptest::prelude::*;
use std::collections::VecDeque;
use std::path::Path;

pub(crate) fn bulk(id: u64, payload_bytes: usize) -> Record {
    Record::DeadLetter(DeadLetter::new(
        Source::Mqtt,
        format!("id-{id}"),
        vec![b'x'; payload_bytes],
        DeadLetterReason::Malformed,
        "test",
        0,
    ))
}

pub(crate) fn alert(id: u64) -> Record {
    Record::Alert(Alert {
        agent: "gw".into(),
        series: SeriesKey::new(format!("id-{id}"), "temp"),
        kind: AlertKind::Spike,
        time_ms: 0,
        window_start_ms: 0,
        value: 99.0,
        score: AnomalyScore {
            z: 6.0,
            baseline_mean: 1.0,
            baseline_stddev: 0.5,
            p_value: 1e-9,
            severity: Severity::Critical,
        },
        unit: "".into(),
    })
}

pub(crate) fn window(series: &SeriesKey, start_ms: UnixMs, end_ms: UnixMs) -> Record {
    Record::Window(Window {
        agent: "gw".into(),
        series: series.clone(),
        start_ms,
        end_ms,
        count: 1,
        mean: 1.0,
        min: 1.0,
        max: 1.0,
        stddev: 0.0,
        first_event_ms: start_ms,
        last_event_ms: start_ms,
        unit: "".into(),
        score: None,
    })
}

/// The id a test record carries (bulk: origin; alert: device).
pub(crate) fn id_of(record: &Record) -> u64 {
    let text = match record {
        Record::DeadLetter(d) => d.origin.clone(),
        Record::Alert(a) => a.series.device.to_string(),
        Record::Window(w) => w.series.device.to_string(),
    };
    text.trim_start_matches("id-")
        .parse()
        .expect("test record id")
}

fn stored_bytes(record: &Record) -> u64 {
    KEY_BYTES + codec::encode_record(0, record).unwrap().len() as u64
}

fn open(dir: &Path, config: OutboxConfig) -> Store {
    Store::open(
        dir,
        StoreConfig {
            outbox: config,
            ..StoreConfig::default()
        },
    )
    .unwrap()
    .0
}

fn drain(outbox: &Outbox, lane: Lane) -> Vec<Envelope> {
    outbox.peek(lane, usize::MAX, u64::MAX).unwrap()
}

#[test]
fn append_peek_ack_round_trip_with_lanes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OutboxConfig::default());
    let ob = store.outbox();
    let seqs = ob.append(vec![bulk(1, 10), alert(2), bulk(3, 10)]).unwrap();
    assert_eq!(seqs.len(), 3);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    let pri = drain(ob, Lane::Priority);
    let bul = drain(ob, Lane::Bulk);
    assert_eq!(
        pri.iter().map(|e| id_of(&e.record)).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(pri[0].seq, seqs[1]);
    assert_eq!(
        bul.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![seqs[0], seqs[2]]
    );

    let stats = ob.stats().unwrap();
    assert_eq!((stats.priority.records, stats.bulk.records), (1, 2));
    assert!(stats.bulk.oldest_age.is_some());

    assert_eq!(ob.floor().unwrap(), seqs[0]);
    let r = ob.ack(&[seqs[0], seqs[1], seqs[0] + 1000]).unwrap();
    assert_eq!(
        r,
        AckReport {
            acked: 2,
            unknown: 1
        }
    );
    assert_eq!(ob.floor().unwrap(), seqs[2]);
    ob.ack(&[seqs[2]]).unwrap();
    assert_eq!(
        ob.floor().unwrap(),
        seqs[2] + 1,
        "empty outbox: floor is next seq"
    );
    let stats = ob.stats().unwrap();
    assert_eq!((stats.records(), stats.bytes()), (0, 0));
    assert_eq!(stats.bulk.oldest_age, None);
}

#[test]
fn seq_is_never_reused_across_reopen_even_when_everything_was_acked() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for round in 0..3 {
        let store = open(dir.path(), OutboxConfig::default());
        let seqs = store
            .outbox()
            .append(vec![bulk(round, 5), alert(round)])
            .unwrap();
        assert!(seqs[0] > last, "round {round}: {} after {last}", seqs[0]);
        last = seqs[1];
        store.outbox().ack(&seqs).unwrap();
        assert!(store.outbox().floor().unwrap() > last);
    }
}

#[test]
fn drop_oldest_drops_bulk_before_priority_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        max_bytes: 64 * 1024,
        ..OutboxConfig::default()
    };
    let store = open(dir.path(), config);
    let ob = store.outbox();
    ob.append(vec![alert(1)]).unwrap();
    // Fill to just under the cap with bulk.
    let mut used = stored_bytes(&alert(1));
    let mut records = Vec::new();
    for id in 100.. {
        let r = bulk(id, 1000);
        if used + stored_bytes(&r) > 64 * 1024 {
            break;
        }
        used += stored_bytes(&r);
        records.push(r);
    }
    let fit = records.len() as u64;
    ob.append(records).unwrap();
    assert_eq!(ob.stats().unwrap().bulk.dropped_full, 0);

    ob.append(vec![bulk(999, 1000), bulk(1000, 1000)]).unwrap();
    let stats = ob.stats().unwrap();
    assert_eq!(stats.bulk.dropped_full, 2);
    assert_eq!(stats.priority.dropped_full, 0);
    assert!(stats.bytes() <= 64 * 1024);
    let ids: Vec<u64> = drain(ob, Lane::Bulk)
        .iter()
        .map(|e| id_of(&e.record))
        .collect();
    assert_eq!(
        ids.first(),
        Some(&102),
        "the two oldest bulk records went first"
    );
    assert_eq!(ids.last(), Some(&1000));
    assert_eq!(drain(ob, Lane::Priority).len(), 1);
    // Everything below the floor is acked or dropped.
    assert_eq!(ob.floor().unwrap(), drain(ob, Lane::Priority)[0].seq);

    // A batch bigger than all bulk records together also takes the alert.
    let big: Vec<Record> = (0..fit + 1).map(|i| bulk(5000 + i, 1000)).collect();
    ob.append(big).unwrap();
    let stats = ob.stats().unwrap();
    assert_eq!(stats.priority.dropped_full, 1);
    assert_eq!(stats.priority.records, 0);
}

#[test]
fn block_policy_refuses_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        max_bytes: 64 * 1024,
        when_full: WhenFull::Block,
        ..OutboxConfig::default()
    };
    let store = open(dir.path(), config);
    let ob = store.outbox();
    let mut n = 0;
    let err = loop {
        match ob.append(vec![bulk(n, 1000)]) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "block policy never refused");
    };
    assert!(matches!(err, StoreError::Full { .. }), "{err}");
    assert!(err.is_transient());
    let next = ob.next_seq();
    assert_eq!(drain(ob, Lane::Bulk).len() as u64, n);
    assert_eq!(ob.stats().unwrap().bulk.dropped_full, 0);
    // Draining makes room again; the refused append consumed no seq.
    let first = drain(ob, Lane::Bulk)[0].seq;
    ob.ack(&[first]).unwrap();
    assert_eq!(ob.append(vec![bulk(n, 1000)]).unwrap(), vec![next]);
}

#[test]
fn an_append_larger_than_the_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        OutboxConfig {
            max_bytes: 64 * 1024,
            ..OutboxConfig::default()
        },
    );
    let err = store.outbox().append(vec![bulk(1, 70 * 1024)]).unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert_eq!(store.outbox().stats().unwrap().records(), 0);
}

#[test]
fn records_expire_by_age_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OutboxConfig::default());
    let ob = store.outbox();
    ob.append(vec![bulk(1, 1), alert(2), bulk(3, 1)]).unwrap();
    assert_eq!(ob.expire(now_ms()).unwrap(), 0);
    let eight_days_ms = 8 * 86_400_000;
    assert_eq!(ob.expire(now_ms() + eight_days_ms).unwrap(), 3);
    let stats = ob.stats().unwrap();
    assert_eq!((stats.bulk.expired, stats.priority.expired), (2, 1));
    assert_eq!(stats.records(), 0);
    assert_eq!(ob.floor().unwrap(), ob.next_seq());
}

#[test]
fn peek_respects_limits_but_never_wedges_on_a_big_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OutboxConfig::default());
    let ob = store.outbox();
    let seqs = ob
        .append(vec![bulk(1, 5000), bulk(2, 10), bulk(3, 10), bulk(4, 10)])
        .unwrap();
    let first = ob.peek(Lane::Bulk, 10, 100).unwrap();
    assert_eq!(first.len(), 1, "an oversize record still comes out alone");
    let two = ob.peek_from(Lane::Bulk, seqs[1], 2, u64::MAX).unwrap();
    assert_eq!(
        two.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![seqs[1], seqs[2]]
    );
    assert!(ob.peek(Lane::Bulk, 0, u64::MAX).unwrap().is_empty());
    assert!(ob.peek(Lane::Priority, 10, u64::MAX).unwrap().is_empty());
}

#[test]
fn windows_advance_closed_marks_in_the_same_append() {
    let dir = tempfile::tempdir().unwrap();
    let series = SeriesKey::new("plc1", "temp");
    {
        let store = open(dir.path(), OutboxConfig::default());
        store
            .outbox()
            .append(vec![
                window(&series, 0, 5000),
                window(&series, 5000, 10_000),
            ])
            .unwrap();
        assert_eq!(store.journal().closed_up_to(&series), Some(10_000));
        // Marks never move back.
        store
            .outbox()
            .append(vec![window(&series, 0, 5000)])
            .unwrap();
        assert_eq!(store.journal().closed_up_to(&series), Some(10_000));
    }
    let store = open(dir.path(), OutboxConfig::default());
    assert_eq!(store.journal().closed_up_to(&series), Some(10_000));
}

#[derive(Debug, Clone)]
enum Op {
    /// (is_alert, payload bytes) per record.
    Append(Vec<(bool, usize)>),
    Peek(bool, usize),
    /// Ack the pending records at these positions of the merged pending list.
    Ack(Vec<prop::sample::Index>),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((prop::bool::weighted(0.25), 0usize..3000), 1..8).prop_map(Op::Append),
        2 => (any::<bool>(), 1usize..10).prop_map(|(p, n)| Op::Peek(p, n)),
        2 => prop::collection::vec(any::<prop::sample::Index>(), 0..6).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

/// The reference: a `VecDeque` per lane of (seq, id, stored bytes).
#[derive(Default)]
struct Model {
    lanes: [VecDeque<(u64, u64, u64)>; 2],
    dropped: [u64; 2],
}

impl Model {
    fn bytes(&self) -> u64 {
        self.lanes.iter().flatten().map(|e| e.2).sum()
    }

    fn pending(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.lanes.iter().flatten().map(|e| e.0).collect();
        all.sort_unstable();
        all
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn outbox_matches_a_vecdeque_model(ops in prop::collection::vec(op(), 1..40)) {
        let max_bytes = 64 * 1024;
        let config = OutboxConfig { max_bytes, ..OutboxConfig::default() };
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), config.clone());
        let mut model = Model::default();
        let mut next_id = 0u64;
        let mut last_seq = 0u64;
        for op in ops {
            match op {
                Op::Append(spec) => {
                    let records: Vec<Record> = spec.iter().map(|&(is_alert, size)| {
                        next_id += 1;
                        if is_alert { alert(next_id) } else { bulk(next_id, size) }
                    }).collect();
                    let incoming: u64 = records.iter().map(stored_bytes).sum();
                    let excess = (model.bytes() + incoming).saturating_sub(max_bytes);
                    let mut freed = 0;
                    for lane in [Lane::Bulk, Lane::Priority] {
                        while freed < excess {
                            let Some((_, _, b)) = model.lanes[lane.index()].pop_front() else { break };
                            freed += b;
                            model.dropped[lane.index()] += 1;
                        }
                    }
                    let seqs = store.outbox().append(records.clone()).unwrap();
                    for (seq, record) in seqs.iter().zip(&records) {
                        prop_assert!(*seq > last_seq, "seq {} not above {}", seq, last_seq);
                        last_seq = *seq;
                        model.lanes[Lane::of(record).index()].push_back((*seq, id_of(record), stored_bytes(record)));
                    }
                }
                Op::Peek(priority, n) => {
                    let lane = if priority { Lane::Priority } else { Lane::Bulk };
                    let got: Vec<(u64, u64)> = store.outbox().peek(lane, n, u64::MAX).unwrap()
                        .iter().map(|e| (e.seq, id_of(&e.record))).collect();
                    let want: Vec<(u64, u64)> = model.lanes[lane.index()].iter().take(n).map(|e| (e.0, e.1)).collect();
                    prop_assert_eq!(got, want);
                }
                Op::Ack(picks) => {
                    let pending = model.pending();
                    if pending.is_empty() { continue; }
                    let seqs: Vec<u64> = picks.iter().map(|i| pending[i.index(pending.len())]).collect();
                    store.outbox().ack(&seqs).unwrap();
                    for lane in &mut model.lanes {
                        lane.retain(|e| !seqs.contains(&e.0));
                    }
                }
                Op::Reopen => {
                    let dropped = store.outbox().stats().unwrap();
                    model.dropped[0] -= dropped.priority.dropped_full;
                    model.dropped[1] -= dropped.bulk.dropped_full;
                    drop(store);
                    store = open(dir.path(), config.clone());
                }
            }
            let stats = store.outbox().stats().unwrap();
            prop_assert_eq!(stats.priority.records, model.lanes[0].len() as u64);
            prop_assert_eq!(stats.bulk.records, model.lanes[1].len() as u64);
            prop_assert_eq!(stats.bytes(), model.bytes());
            prop_assert_eq!(stats.priority.dropped_full, model.dropped[0]);
            prop_assert_eq!(stats.bulk.dropped_full, model.dropped[1]);
            let floor = store.outbox().floor().unwrap();
            let want_floor = model.pending().first().copied().unwrap_or(store.outbox().next_seq());
            prop_assert_eq!(floor, want_floor);
            prop_assert!(store.outbox().next_seq() > last_seq);
        }
    }
}
