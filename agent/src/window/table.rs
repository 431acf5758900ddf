//! The per-series hash table shared by the window engine and the scorer.
//!
//! The hot path looks up one series per reading among thousands. A plain
//! `HashMap<SeriesKey, _>` compares the stored key's two heap strings on every
//! hit, two cache misses per lookup. Here each slot also keeps the full hash
//! and, for the usual short names, an inline copy of `device 0xFF sensor`
//! (0xFF never occurs in UTF-8), so a hit is decided inside the slot itself.
//! Longer keys fall back to comparing the [`SeriesKey`].

use hashbrown::HashTable;
use millrace_protocol::SeriesKey;
use std::hash::BuildHasher;

/// Bytes of `device 0xFF sensor` kept inline in a slot.
const INLINE_KEY_BYTES: usize = 47;

#[derive(Debug)]
struct InlineKey {
    /// Length of `device 0xFF sensor`, or 0 when it does not fit inline.
    len: u8,
    bytes: [u8; INLINE_KEY_BYTES],
}

impl InlineKey {
    fn new(key: &SeriesKey) -> Self {
        let (d, s) = (key.device.as_bytes(), key.sensor.as_bytes());
        let mut bytes = [0u8; INLINE_KEY_BYTES];
        let total = d.len() + 1 + s.len();
        if total > INLINE_KEY_BYTES {
            return Self { len: 0, bytes };
        }
        bytes[..d.len()].copy_from_slice(d);
        bytes[d.len()] = 0xFF;
        bytes[d.len() + 1..total].copy_from_slice(s);
        Self {
            len: total as u8,
            bytes,
        }
    }

    /// `Some(equal)` when decidable inline, `None` when the key is too long.
    #[inline]
    fn matches(&self, key: &SeriesKey) -> Option<bool> {
        if self.len == 0 {
            return None;
        }
        let (d, s) = (key.device.as_bytes(), key.sensor.as_bytes());
        let len = usize::from(self.len);
        Some(
            d.len() + 1 + s.len() == len
                && self.bytes[..d.len()] == *d
                && self.bytes[d.len()] == 0xFF
                && self.bytes[d.len() + 1..len] == *s,
        )
    }
}

#[derive(Debug)]
#[repr(C)] // what a lookup reads (hash, inline key, then the value) comes first
struct Slot<V> {
    hash: u64,
    inline: InlineKey,
    value: V,
    key: SeriesKey,
}

impl<V> Slot<V> {
    #[inline]
    fn is(&self, hash: u64, key: &SeriesKey) -> bool {
        self.hash == hash && self.inline.matches(key).unwrap_or_else(|| self.key == *key)
    }
}

/// A map from [`SeriesKey`] to `V`, tuned for lookups by borrowed key.
#[derive(Debug)]
pub(crate) struct SeriesTable<V> {
    hasher: foldhash::fast::RandomState,
    table: HashTable<Slot<V>>,
}

impl<V> Default for SeriesTable<V> {
    fn default() -> Self {
        Self {
            hasher: foldhash::fast::RandomState::default(),
            table: HashTable::new(),
        }
    }
}

impl<V> SeriesTable<V> {
    #[inline]
    pub(crate) fn hash(&self, key: &SeriesKey) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, hash: u64, key: &SeriesKey) -> Option<&mut V> {
        self.table
            .find_mut(hash, |slot| slot.is(hash, key))
            .map(|slot| &mut slot.value)
    }

    /// Inserts a key known to be absent (look it up first) and returns its value.
    pub(crate) fn insert_new(&mut self, hash: u64, key: SeriesKey, value: V) -> &mut V {
        let slot = Slot {
            hash,
            inline: InlineKey::new(&key),
            value,
            key,
        };
        &mut self
            .table
            .insert_unique(hash, slot, |slot| slot.hash)
            .into_mut()
            .value
    }

    pub(crate) fn remove(&mut self, key: &SeriesKey) -> Option<V> {
        let hash = self.hash(key);
        let entry = self
            .table
            .find_entry(hash, |slot| slot.is(hash, key))
            .ok()?;
        Some(entry.remove().0.value)
    }

    /// Keeps the entries for which `keep` returns true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&SeriesKey, &mut V) -> bool) {
        self.table.retain(|slot| keep(&slot.key, &mut slot.value));
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&SeriesKey, &mut V)> {
        self.table
            .iter_mut()
            .map(|slot| (&slot.key, &mut slot.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_long_keys_are_found_and_distinguished() {
        let mut t = SeriesTable::default();
        let long = "x".repeat(60);
        let keys = [
            SeriesKey::new("ab", "c"),
            SeriesKey::new("a", "bc"),
            SeriesKey::new("", ""),
            SeriesKey::new(long.clone(), "s"),
            SeriesKey::new(long.clone(), "t"),
            SeriesKey::new("d".repeat(23), "s".repeat(23)),
        ];
        for (i, k) in keys.iter().enumerate() {
            let h = t.hash(k);
            assert!(t.get_mut(h, k).is_none());
            t.insert_new(h, k.clone(), i);
        }
        for (i, k) in keys.iter().enumerate() {
            let h = t.hash(k);
            assert_eq!(t.get_mut(h, k).copied(), Some(i), "{k}");
        }
        assert_eq!(t.remove(&keys[0]), Some(0));
        assert_eq!(t.remove(&keys[0]), None);
        assert_eq!(t.get_mut(t.hash(&keys[1]), &keys[1]).copied(), Some(1));
        t.retain(|k, _| *k.device != *long);
        assert_eq!(t.len(), 3);
    }
}
