//! A compact set of committed `seq` numbers for one agent.
//!
//! What it is: a floor plus a sorted set of disjoint, non-adjacent half-open
//! intervals `[start, end)`. Every `seq` below the floor is a member; above
//! it, membership is interval membership. An agent that sends its batches in
//! order keeps the set at "floor + nothing" or a single interval, whatever
//! the volume; out-of-order batches (alerts overtaking the backlog) add a few
//! intervals that merge away as the gaps fill or the agent's `outbox_floor`
//! moves past them.
//!
//! What it is not: it does no I/O. Durability is the job of
//! [`crate::dedup`], which serialises [`SeqSetRepr`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The set of committed sequence numbers of one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqSet {
    /// Every `seq < floor` is a member.
    floor: u64,
    /// `start -> end` (exclusive); invariants: `floor < start < end`, and
    /// intervals neither overlap nor touch (`end` of one `<` `start` of the next).
    ranges: BTreeMap<u64, u64>,
}

/// The serialised form: `{"floor": 10, "ranges": [[12, 15], [20, 21]]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqSetRepr {
    pub floor: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl SeqSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `seq` below this is a member.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The number of intervals above the floor (a measure of fragmentation).
    pub fn interval_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn contains(&self, seq: u64) -> bool {
        if seq < self.floor {
            return true;
        }
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| seq < end)
    }

    /// Adds `seq`; returns `false` when it was already a member.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        // `seq == u64::MAX` cannot be represented as `[seq, seq + 1)`; the
        // sequence space is never that large in practice, and a member that
        // cannot be recorded must still not be silently reported as new twice.
        let Some(end) = seq.checked_add(1) else {
            return false;
        };
        let mut start = seq;
        let mut end = end;
        // Merge with the interval ending exactly at `seq`.
        if let Some((&prev_start, &prev_end)) = self.ranges.range(..seq).next_back() {
            if prev_end == seq {
                self.ranges.remove(&prev_start);
                start = prev_start;
            }
        }
        // Merge with the interval starting exactly after `seq`.
        if let Some(next_end) = self.ranges.remove(&end) {
            end = next_end;
        }
        if start == self.floor {
            self.floor = end;
        } else {
            self.ranges.insert(start, end);
        }
        true
    }

    /// Raises the floor to `floor` (never lowers it): every `seq` below it
    /// becomes a member, and intervals at or below it collapse into it.
    pub fn raise_floor(&mut self, floor: u64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        // Drop every interval that starts at or below the new floor; one may
        // reach above it and then extends the floor.
        let below: Vec<(u64, u64)> = self.ranges.range(..=floor).map(|(&s, &e)| (s, e)).collect();
        for (start, end) in below {
            self.ranges.remove(&start);
            self.floor = self.floor.max(end);
        }
    }

    /// Adds every member of `other` (its floor and its intervals).
    pub fn union(&mut self, other: &SeqSet) {
        self.raise_floor(other.floor);
        for (&start, &end) in &other.ranges {
            self.add_interval(start, end);
        }
    }

    /// Adds `[start, end)`, in any order relative to the intervals held.
    fn add_interval(&mut self, start: u64, end: u64) {
        if end <= self.floor {
            return;
        }
        if start <= self.floor {
            self.raise_floor(end);
            return;
        }
        let (mut start, mut end) = (start, end);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                self.ranges.remove(&s);
                start = s;
                end = end.max(e);
            }
        }
        let covered: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in covered {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    pub fn to_repr(&self) -> SeqSetRepr {
        SeqSetRepr {
            floor: self.floor,
            ranges: self.ranges.iter().map(|(&s, &e)| (s, e)).collect(),
        }
    }

    /// Rebuilds a set from its serialised form, normalising it (overlapping,
    /// touching, empty or below-floor intervals are merged or dropped), so a
    /// hand-edited or older state file can never break the invariants.
    pub fn from_repr(repr: &SeqSetRepr) -> Self {
        let mut set = SeqSet {
            floor: repr.floor,
            ranges: BTreeMap::new(),
        };
        let mut ranges = repr.ranges.clone();
        ranges.sort_unstable();
        for (start, end) in ranges {
            if end <= start {
                continue;
            }
            set.insert_range(start, end);
        }
        set
    }

    fn insert_range(&mut self, start: u64, end: u64) {
        // Ranges arrive sorted by start, so only the last interval (or the
        // floor) can overlap or touch this one.
        if start <= self.floor {
            self.raise_floor(end);
            return;
        }
        if let Some(last_end) = self.ranges.values_mut().next_back() {
            if start <= *last_end {
                *last_end = (*last_end).max(end);
                return;
            }
        }
        self.ranges.insert(start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// A union holds exactly the members of both sets.
        #[test]
        fn union_is_the_set_union(
            a in proptest::collection::vec(0u64..200, 0..60),
            b in proptest::collection::vec(0u64..200, 0..60),
            fa in 0u64..40,
            fb in 0u64..40,
        ) {
            let build = |seqs: &[u64], floor: u64| {
                let mut set = SeqSet::new();
                seqs.iter().for_each(|&s| { set.insert(s); });
                set.raise_floor(floor);
                set
            };
            let (mut x, y) = (build(&a, fa), build(&b, fb));
            x.union(&y);
            for seq in 0..260 {
                let want = a.contains(&seq) || b.contains(&seq) || seq < fa || seq < fb;
                prop_assert_eq!(x.contains(seq), want, "seq {}", seq);
            }
            prop_assert_eq!(SeqSet::from_repr(&x.to_repr()), x);
        }
    }

    #[test]
    fn in_order_inserts_stay_a_single_floor() {
        let mut set = SeqSet::new();
        for seq in 0..1000 {
            assert!(set.insert(seq));
        }
        assert_eq!(set.floor(), 1000);
        assert_eq!(set.interval_count(), 0);
        assert!(!set.insert(500));
    }

    #[test]
    fn gaps_fill_and_merge() {
        let mut set = SeqSet::new();
        set.raise_floor(10);
        assert!(set.insert(12));
        assert!(set.insert(14));
        assert_eq!(set.interval_count(), 2);
        assert!(set.insert(13));
        assert_eq!(set.interval_count(), 1);
        assert!(set.insert(10));
        assert!(set.insert(11));
        assert_eq!(set.floor(), 15);
        assert_eq!(set.interval_count(), 0);
    }

    #[test]
    fn floor_collapses_straddling_interval() {
        let mut set = SeqSet::new();
        set.insert(5);
        set.insert(6);
        set.insert(9);
        set.raise_floor(6);
        assert_eq!(set.floor(), 7);
        assert_eq!(set.to_repr().ranges, vec![(9, 10)]);
        set.raise_floor(3); // never lowers
        assert_eq!(set.floor(), 7);
    }

    #[test]
    fn max_seq_is_not_reported_new_twice() {
        let mut set = SeqSet::new();
        set.insert(u64::MAX);
        assert!(!set.insert(u64::MAX));
    }

    #[test]
    fn repr_normalises_messy_input() {
        let repr = SeqSetRepr {
            floor: 5,
            ranges: vec![(20, 25), (3, 7), (8, 8), (24, 30), (7, 9)],
        };
        let set = SeqSet::from_repr(&repr);
        assert_eq!(
            set.to_repr(),
            SeqSetRepr {
                floor: 9,
                ranges: vec![(20, 30)]
            }
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        RaiseFloor(u64),
        Roundtrip,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..200).prop_map(Op::Insert),
            1 => (0u64..200).prop_map(Op::RaiseFloor),
            1 => Just(Op::Roundtrip),
        ]
    }

    fn check_invariants(set: &SeqSet) {
        let mut prev_end = set.floor;
        for (&start, &end) in &set.ranges {
            assert!(
                start > prev_end,
                "interval {start}..{end} touches {prev_end}"
            );
            assert!(end > start);
            prev_end = end;
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec(op(), 0..300)) {
            let mut set = SeqSet::new();
            let mut model: BTreeSet<u64> = BTreeSet::new();
            let mut model_floor = 0u64;
            for op in ops {
                match op {
                    Op::Insert(seq) => {
                        let model_new = seq >= model_floor && model.insert(seq);
                        prop_assert_eq!(set.insert(seq), model_new);
                    }
                    Op::RaiseFloor(floor) => {
                        model_floor = model_floor.max(floor);
                        set.raise_floor(floor);
                    }
                    Op::Roundtrip => {
                        set = SeqSet::from_repr(&set.to_repr());
                    }
                }
                check_invariants(&set);
                for seq in 0..210 {
                    let expected = seq < model_floor || model.contains(&seq);
                    prop_assert_eq!(set.contains(seq), expected, "seq {}", seq);
                }
            }
        }
    }
}
