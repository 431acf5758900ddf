//! Saved anomaly baselines: the last window means of every series, so the
//! scorer resumes after a restart instead of warming up again.
//!
//! Layout: keyspace `baselines`, key = the postcard form of the series key
//! (as for the closed-up-to marks), value = the checksummed value header of
//! [`super::codec`] (saved-at time) and the postcard form of the series'
//! `(window mean, window variance)` pairs, oldest first.
//!
//! What it is not: part of the crash-safety chain. Baselines are saved every
//! so often and at shutdown, without a sync of their own (the journal's next
//! commit persists them); after a crash the scorer starts from the last save,
//! a little behind, which only shifts the baseline by the windows since. A
//! value that fails its checksum is counted, deleted and skipped.

use super::codec;
use super::{Result, StoreError};
use fjall::{Database, Keyspace};
use millrace_protocol::{SeriesKey, UnixMs};
use std::collections::HashSet;

/// One series' history as the scorer keeps it: `(mean, variance)` per window.
pub type History = Vec<(f64, f64)>;

/// See the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct Baselines {
    db: Database,
    ks: Keyspace,
}

impl std::fmt::Debug for Baselines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baselines").finish_non_exhaustive()
    }
}

/// What [`Baselines::load`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadedBaselines {
    /// Per series, with the time it was saved.
    pub series: Vec<(SeriesKey, UnixMs, History)>,
    /// Undecodable entries, deleted.
    pub corrupt: u64,
}

impl Baselines {
    pub(crate) fn new(db: Database, ks: Keyspace) -> Self {
        Self { db, ks }
    }

    /// Replaces what is saved with `series` in one write batch: series no
    /// longer held (evicted) are deleted.
    pub fn save(&self, series: &[(SeriesKey, History)], now_ms: UnixMs) -> Result<()> {
        let mut batch = self.db.batch();
        let mut kept = HashSet::with_capacity(series.len());
        for (key, history) in series {
            let k = codec::series_key(key)?;
            batch.insert(&self.ks, k.clone(), codec::encode_value(now_ms, history)?);
            kept.insert(k);
        }
        for guard in self.ks.iter() {
            let key = guard
                .key()
                .map_err(|e| StoreError::fjall("scanning baselines", e))?;
            if !kept.contains(key.as_ref()) {
                batch.remove(&self.ks, key.to_vec());
            }
        }
        batch
            .commit()
            .map_err(|e| StoreError::fjall("saving baselines", e))
    }

    /// Everything saved; undecodable entries are deleted and counted.
    pub fn load(&self) -> Result<LoadedBaselines> {
        let mut loaded = LoadedBaselines::default();
        let mut broken = Vec::new();
        for guard in self.ks.iter() {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| StoreError::fjall("scanning baselines", e))?;
            match (
                codec::decode_series_key(&key),
                codec::decode_value::<History>(&value),
            ) {
                (Ok(series), Ok((saved_ms, history))) => {
                    loaded.series.push((series, saved_ms, history));
                }
                _ => broken.push(key.to_vec()),
            }
        }
        loaded.corrupt = broken.len() as u64;
        if !broken.is_empty() {
            let mut batch = self.db.batch();
            for key in broken {
                batch.remove(&self.ks, key);
            }
            batch
                .commit()
                .map_err(|e| StoreError::fjall("deleting corrupt baselines", e))?;
        }
        Ok(loaded)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::store::{Store, StoreConfig};
    use millrace_protocol::SeriesKey;

    #[test]
    fn baselines_survive_a_reopen_and_evicted_series_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (SeriesKey::new("plc-1", "t"), SeriesKey::new("plc-1", "p"));
        {
            let (store, _) = Store::open(dir.path(), StoreConfig::default()).unwrap();
            store
                .baselines()
                .save(
                    &[
                        (a.clone(), vec![(1.0, 0.5)]),
                        (b.clone(), vec![(2.0, 0.1), (3.0, 0.2)]),
                    ],
                    1_000,
                )
                .unwrap();
            // b evicted since: the next save forgets it.
            store
                .baselines()
                .save(&[(a.clone(), vec![(1.0, 0.5), (1.5, 0.5)])], 2_000)
                .unwrap();
            store.sync().unwrap();
        }
        let (store, _) = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let loaded = store.baselines().load().unwrap();
        assert_eq!(loaded.corrupt, 0);
        assert_eq!(
            loaded.series,
            vec![(a, 2_000, vec![(1.0, 0.5), (1.5, 0.5)])]
        );
    }
}
