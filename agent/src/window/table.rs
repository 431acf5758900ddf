//! The per-series table shared by the window engine and the scorer.
//!
//! The hot path looks up one series per reading among thousands. Hashing a
//! [`SeriesKey`] means reading its names, cache misses per reading before
//! the table is even probed. But the key of a reading is almost always the
//! very allocation of the previous reading's key of that series: a
//! connection's decoder interns each series once, the Modbus plan builds its
//! keys once. So a lookup first hashes the key's *address* (no name is read)
//! into `by_ptr`, which maps an address to the series' slot; only a key not
//! seen before is hashed by its text into `by_name` and then remembered.
//!
//! - An alias holds a clone of the key it was made from, so its allocation
//!   cannot be freed and reused by another key while it exists.
//! - An alias names a slot and that slot's generation: when a series is
//!   removed its slot's generation moves on, and aliases to it simply stop
//!   matching (they are replaced or dropped, never followed).
//! - Aliases are bounded: past `4 × series` (at least 4 096), all are
//!   dropped at once and rebuilt by the next readings. Readings that bring
//!   fresh strings every time (journal replay) cost a text hash, as before.
//! - The aliases are one flat open-addressing array of 16-byte cells
//!   (address, slot, generation; linear probing, at most ¾ full), not a
//!   general hash table: with 10 000 series neither fits in the core's
//!   cache, and a general table keeps its control bytes apart from its
//!   entries, two cache misses per lookup where the flat array has one.
//!   The keys the cells point into are pinned in a plain `Vec` beside it,
//!   never read on a lookup.
//!
//! Series live in a slab (`Vec`) of cache-line-aligned entries, the fields a
//! reading touches first, so per-reading work touches the alias cell and the
//! series' own state, and iteration (`tick`) walks memory in order.

use hashbrown::HashTable;
use millrace_protocol::SeriesKey;
use std::hash::BuildHasher;

/// Aliases kept at least, whatever the number of series.
const MIN_ALIAS_CAP: usize = 4_096;

#[derive(Debug)]
#[repr(C)] // the value right after the generation: one cache line for a lookup's hit
struct Live<V> {
    value: V,
    name_hash: u64,
    key: SeriesKey,
}

/// One slot of the slab. Whether it is live is told by the tag in its first
/// word, beside the generation: an `Option<Live>` would keep that in the
/// key's pointer, at the entry's end, one more cache line per lookup.
#[derive(Debug)]
#[repr(C, align(64))]
struct Entry<V>(Slot<V>);

/// `generation` moves on each time the slot is freed, so old aliases stop
/// matching.
#[derive(Debug)]
#[repr(u32)] // tag, then generation, then the value: the first word says it all
enum Slot<V> {
    Free { generation: u32 },
    Live { generation: u32, live: Live<V> },
}

impl<V> Entry<V> {
    fn new(live: Live<V>) -> Self {
        Self(Slot::Live {
            generation: 0,
            live,
        })
    }

    #[inline]
    fn generation(&self) -> u32 {
        match self.0 {
            Slot::Free { generation } | Slot::Live { generation, .. } => generation,
        }
    }

    #[inline]
    fn live(&self) -> Option<&Live<V>> {
        match &self.0 {
            Slot::Live { live, .. } => Some(live),
            Slot::Free { .. } => None,
        }
    }

    #[inline]
    fn live_mut(&mut self) -> Option<&mut Live<V>> {
        match &mut self.0 {
            Slot::Live { live, .. } => Some(live),
            Slot::Free { .. } => None,
        }
    }

    /// Fills a free slot (a live one is overwritten), keeping its generation.
    fn fill(&mut self, live: Live<V>) {
        let generation = self.generation();
        self.0 = Slot::Live { generation, live };
    }

    /// Frees the slot, moving its generation on; `None` if it was free.
    fn take(&mut self) -> Option<Live<V>> {
        let generation = self.generation();
        match std::mem::replace(
            &mut self.0,
            Slot::Free {
                generation: generation.wrapping_add(1),
            },
        ) {
            Slot::Live { live, .. } => Some(live),
            Slot::Free { .. } => {
                self.0 = Slot::Free { generation };
                None
            }
        }
    }
}

/// Bytes one series takes in the slab, its entry's alignment included.
#[cfg(test)]
pub(crate) const fn entry_size<V>() -> usize {
    std::mem::size_of::<Entry<V>>()
}

/// One alias: a key's address and the slot (and its generation) it names.
/// `addr == 0` marks an empty cell (a key's names are never at 0).
#[derive(Debug, Clone, Copy, Default)]
struct AliasCell {
    addr: usize,
    slot: u32,
    generation: u32,
}

#[inline]
fn address(key: &SeriesKey) -> usize {
    key.as_ptr() as usize
}

/// Key address → slot: linear probing over a power-of-two array, cleared
/// (never shrunk) at the alias cap. See the [module docs](self).
#[derive(Debug, Default)]
struct Aliases {
    cells: Vec<AliasCell>,
    /// Keeps every key a cell points at alive (and its address unused by
    /// other keys) while the cell exists.
    pins: Vec<SeriesKey>,
}

impl Aliases {
    fn len(&self) -> usize {
        self.pins.len()
    }

    /// The first cell to probe for `addr` (multiplicative hashing: the
    /// addresses are the allocator's, not a sender's, so no keyed hash).
    #[inline]
    fn home(&self, addr: usize) -> usize {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let h = (addr as u64).wrapping_mul(K);
        let bits = self.cells.len().trailing_zeros();
        (h >> (64 - bits)) as usize
    }

    #[inline]
    fn get(&self, addr: usize) -> Option<AliasCell> {
        self.position(addr).map(|i| self.cells[i])
    }

    /// Points `key`'s address at `slot`, replacing a stale alias of it;
    /// `cap` bounds the aliases held (all dropped when reached).
    fn set(&mut self, key: &SeriesKey, slot: u32, generation: u32, cap: usize) {
        let addr = address(key);
        if let Some(i) = self.position(addr) {
            self.cells[i].slot = slot;
            self.cells[i].generation = generation;
            return;
        }
        if self.len() >= cap {
            self.clear();
        }
        if 4 * (self.len() + 1) > 3 * self.cells.len() {
            self.grow();
        }
        self.pins.push(key.clone());
        self.place(AliasCell {
            addr,
            slot,
            generation,
        });
    }

    /// The cell holding `addr`, if any.
    #[inline]
    fn position(&self, addr: usize) -> Option<usize> {
        if self.cells.is_empty() {
            return None;
        }
        let mask = self.cells.len() - 1;
        let mut i = self.home(addr);
        loop {
            let cell = &self.cells[i];
            if cell.addr == addr {
                return Some(i);
            }
            if cell.addr == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Puts a cell known to be absent into the first empty cell of its run.
    fn place(&mut self, cell: AliasCell) {
        let mask = self.cells.len() - 1;
        let mut i = self.home(cell.addr);
        while self.cells[i].addr != 0 {
            i = (i + 1) & mask;
        }
        self.cells[i] = cell;
    }

    fn grow(&mut self) {
        let size = (self.cells.len() * 2).max(64);
        let old = std::mem::replace(&mut self.cells, vec![AliasCell::default(); size]);
        for cell in old.into_iter().filter(|c| c.addr != 0) {
            self.place(cell);
        }
    }

    fn clear(&mut self) {
        self.cells.fill(AliasCell::default());
        self.pins.clear();
    }
}

/// A map from [`SeriesKey`] to `V`, tuned for lookups by a key whose strings
/// were seen before. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct SeriesTable<V> {
    hasher: foldhash::fast::RandomState,
    entries: Vec<Entry<V>>,
    /// Free slots in `entries`.
    free: Vec<u32>,
    /// Slot of each series, hashed by the text of its key.
    by_name: HashTable<u32>,
    /// Slot of each key address seen.
    by_ptr: Aliases,
    len: usize,
}

impl<V> Default for SeriesTable<V> {
    fn default() -> Self {
        Self {
            hasher: foldhash::fast::RandomState::default(),
            entries: Vec::new(),
            free: Vec::new(),
            by_name: HashTable::new(),
            by_ptr: Aliases::default(),
            len: 0,
        }
    }
}

impl<V> SeriesTable<V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The slot of `key`, through its alias or (then remembered) its text.
    #[inline]
    fn find(&mut self, key: &SeriesKey) -> Option<usize> {
        if let Some(alias) = self.by_ptr.get(address(key)) {
            let slot = alias.slot as usize;
            if self.entries[slot].generation() == alias.generation {
                return Some(slot);
            }
        }
        self.find_by_name(key)
    }

    #[cold]
    #[inline(never)]
    fn find_by_name(&mut self, key: &SeriesKey) -> Option<usize> {
        let name_hash = self.hasher.hash_one(key);
        let entries = &self.entries;
        let slot = *self.by_name.find(name_hash, |&slot| {
            entries[slot as usize]
                .live()
                .is_some_and(|live| live.key == *key)
        })?;
        self.remember(key, slot);
        Some(slot as usize)
    }

    /// Records `key`'s address as an alias of `slot` (replacing a stale one).
    fn remember(&mut self, key: &SeriesKey, slot: u32) {
        let generation = self.entries[slot as usize].generation();
        let cap = (4 * self.len).max(MIN_ALIAS_CAP);
        self.by_ptr.set(key, slot, generation, cap);
    }

    /// Loads what the lookups of `items`' keys (a few, about to be looked
    /// up) will read: first every key's alias cell, then the entry each
    /// names, with `touch` reading the parts of the value the caller will
    /// use (it gets the item's `T` too). These are independent loads, so the
    /// processor overlaps their cache misses; looked up one after the other,
    /// each would wait for its own (at 10 000 series, the table is larger
    /// than the core's cache).
    ///
    /// Reads only: a key not aliased yet is skipped (its lookup hashes its
    /// text, as before). The returned value is meaningless; hand it to
    /// [`std::hint::black_box`] so the loads are not optimised away.
    #[inline]
    pub(crate) fn warm<'k, T: Copy>(
        &self,
        items: impl Iterator<Item = (&'k SeriesKey, T)> + Clone,
        mut touch: impl FnMut(T, &V) -> u64,
    ) -> u64 {
        if self.by_ptr.cells.is_empty() {
            return 0;
        }
        let mut sum = 0u64;
        for (key, _) in items.clone() {
            let cell = &self.by_ptr.cells[self.by_ptr.home(address(key))];
            sum = sum.wrapping_add(u64::from(cell.slot));
        }
        for (key, item) in items {
            let Some(alias) = self.by_ptr.get(address(key)) else {
                continue;
            };
            if let Some(entry) = self.entries.get(alias.slot as usize) {
                if let Some(live) = entry.live() {
                    sum = sum.wrapping_add(touch(item, &live.value));
                }
            }
        }
        sum
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, key: &SeriesKey) -> Option<&mut V> {
        let slot = self.find(key)?;
        self.entries[slot].live_mut().map(|live| &mut live.value)
    }

    /// Inserts a key known to be absent (look it up first) and returns its value.
    pub(crate) fn insert_new(&mut self, key: SeriesKey, value: V) -> &mut V {
        let name_hash = self.hasher.hash_one(&key);
        let live = Live {
            value,
            name_hash,
            key: key.clone(),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.entries[slot as usize].fill(live);
                slot
            }
            None => {
                let slot = u32::try_from(self.entries.len()).expect("fewer than 2^32 series");
                self.entries.push(Entry::new(live));
                slot
            }
        };
        let entries = &self.entries;
        self.by_name.insert_unique(name_hash, slot, |&s| {
            entries[s as usize].live().map_or(0, |live| live.name_hash)
        });
        self.len += 1;
        self.remember(&key, slot);
        &mut self.entries[slot as usize]
            .live_mut()
            .expect("just inserted")
            .value
    }

    /// Frees `slot`: out of `by_name`, its generation moved on, back on the free list.
    fn free_slot(&mut self, slot: usize) -> Option<Live<V>> {
        let entry = &mut self.entries[slot];
        let live = entry.take()?;
        if let Ok(found) = self
            .by_name
            .find_entry(live.name_hash, |&s| s as usize == slot)
        {
            found.remove();
        }
        self.free.push(slot as u32);
        self.len -= 1;
        Some(live)
    }

    pub(crate) fn remove(&mut self, key: &SeriesKey) -> Option<V> {
        let slot = self.find(key)?;
        self.free_slot(slot).map(|live| live.value)
    }

    /// Keeps the entries for which `keep` returns true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&SeriesKey, &mut V) -> bool) {
        for slot in 0..self.entries.len() {
            let Some(live) = self.entries[slot].live_mut() else {
                continue;
            };
            if !keep(&live.key, &mut live.value) {
                self.free_slot(slot);
            }
        }
    }

    /// Where the first entry's value sits, in bytes from the entry's start.
    #[cfg(test)]
    pub(crate) fn first_value_offset(&self) -> Option<usize> {
        let entry = self.entries.first()?;
        let value = &entry.live()?.value;
        Some((value as *const V as usize) - (entry as *const Entry<V> as usize))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&SeriesKey, &mut V)> {
        self.entries
            .iter_mut()
            .filter_map(|e| e.live_mut().map(|live| (&live.key, &mut live.value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// The same names in fresh allocations: equal keys, different pointers.
    fn fresh(key: &SeriesKey) -> SeriesKey {
        SeriesKey::new(key.device.to_string(), key.sensor.to_string())
    }

    #[test]
    fn keys_are_found_by_text_whatever_their_allocation() {
        let mut t = SeriesTable::default();
        let long = "x".repeat(60);
        let keys = [
            SeriesKey::new("ab", "c"),
            SeriesKey::new("a", "bc"),
            SeriesKey::new("", ""),
            SeriesKey::new(long.clone(), "s"),
            SeriesKey::new(long.clone(), "t"),
        ];
        for (i, k) in keys.iter().enumerate() {
            assert!(t.get_mut(k).is_none());
            t.insert_new(k.clone(), i);
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(t.get_mut(k).copied(), Some(i), "{k}");
            assert_eq!(t.get_mut(&fresh(k)).copied(), Some(i), "{k} in new strings");
        }
        assert_eq!(t.remove(&fresh(&keys[0])), Some(0));
        assert_eq!(t.remove(&keys[0]), None);
        assert!(
            t.get_mut(&keys[0]).is_none(),
            "no alias outlives its series"
        );
        assert_eq!(t.get_mut(&keys[1]).copied(), Some(1));
        t.retain(|k, _| *k.device != *long);
        assert_eq!(t.len(), 2);
        assert!(t.get_mut(&keys[3]).is_none());
    }

    #[test]
    fn a_reused_slot_is_not_reached_through_an_old_alias() {
        let mut t = SeriesTable::default();
        let a = SeriesKey::new("plc-1", "a");
        let b = SeriesKey::new("plc-1", "b");
        t.insert_new(a.clone(), "a");
        assert_eq!(t.remove(&a), Some("a"));
        // `b` takes the freed slot; `a`'s alias still names that slot.
        t.insert_new(b.clone(), "b");
        assert!(t.get_mut(&a).is_none());
        assert_eq!(t.get_mut(&b).copied(), Some("b"));
        t.insert_new(a.clone(), "a again");
        assert_eq!(t.get_mut(&a).copied(), Some("a again"));
        assert_eq!(t.get_mut(&fresh(&b)).copied(), Some("b"));
    }

    #[test]
    fn aliases_stay_bounded_when_every_lookup_brings_new_strings() {
        let mut t = SeriesTable::default();
        let key = SeriesKey::new("plc-1", "temp");
        t.insert_new(key.clone(), 0u32);
        for _ in 0..3 * MIN_ALIAS_CAP {
            *t.get_mut(&fresh(&key)).expect("found by text") += 1;
        }
        assert!(
            t.by_ptr.len() <= MIN_ALIAS_CAP,
            "{} aliases",
            t.by_ptr.len()
        );
        assert_eq!(t.get_mut(&key).copied(), Some(3 * MIN_ALIAS_CAP as u32));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Look up series `n`, through the shared allocation or a fresh one.
        Get(u8, bool),
        Insert(u8, bool),
        Remove(u8, bool),
        /// Keeps the series whose number is not divisible by this.
        Retain(u8),
        /// Warms the lookups of a few series (changes nothing).
        Warm(u8, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..24, any::<bool>()).prop_map(|(n, f)| Op::Get(n, f)),
            3 => (0u8..24, any::<bool>()).prop_map(|(n, f)| Op::Insert(n, f)),
            2 => (0u8..24, any::<bool>()).prop_map(|(n, f)| Op::Remove(n, f)),
            1 => (2u8..5).prop_map(Op::Retain),
            2 => (0u8..24, any::<bool>()).prop_map(|(n, f)| Op::Warm(n, f)),
        ]
    }

    proptest! {
        /// Whatever the sequence of operations and allocations, the table
        /// answers as a `HashMap` keyed by text does.
        #[test]
        fn behaves_as_a_map_keyed_by_text(ops in proptest::collection::vec(op(), 1..300)) {
            let shared: Vec<SeriesKey> = (0..24)
                .map(|n| SeriesKey::new(format!("plc-{}", n % 3), format!("reg-{n}")))
                .collect();
            let key = |n: u8, fresh_alloc: bool| {
                let k = &shared[usize::from(n)];
                if fresh_alloc { fresh(k) } else { k.clone() }
            };
            let mut t = SeriesTable::default();
            let mut model: HashMap<SeriesKey, u32> = HashMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                let i = i as u32;
                match op {
                    Op::Get(n, f) => {
                        let k = key(n, f);
                        prop_assert_eq!(t.get_mut(&k).copied(), model.get(&k).copied());
                    }
                    Op::Insert(n, f) => {
                        let k = key(n, f);
                        if t.get_mut(&k).is_none() {
                            t.insert_new(k.clone(), i);
                            model.insert(k, i);
                        }
                    }
                    Op::Remove(n, f) => {
                        let k = key(n, f);
                        prop_assert_eq!(t.remove(&k), model.remove(&k));
                    }
                    Op::Retain(d) => {
                        let keep = |k: &SeriesKey| {
                            k.sensor[4..].parse::<u8>().map_or(true, |n| n % d != 0)
                        };
                        t.retain(|k, _| keep(k));
                        model.retain(|k, _| keep(k));
                    }
                    Op::Warm(n, f) => {
                        // Present, absent, removed and freshly allocated
                        // keys alike: read only, never a panic.
                        let keys: Vec<SeriesKey> = (n..n.saturating_add(4).min(24))
                            .map(|m| key(m, f))
                            .collect();
                        std::hint::black_box(t.warm(keys.iter().map(|k| (k, ())), |(), v| u64::from(*v)));
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
            let mut seen: Vec<(SeriesKey, u32)> = t.iter_mut().map(|(k, v)| (k.clone(), *v)).collect();
            let mut expected: Vec<(SeriesKey, u32)> = model.into_iter().collect();
            seen.sort_by(|a, b| a.0.cmp(&b.0));
            expected.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(seen, expected);
        }
    }
}
