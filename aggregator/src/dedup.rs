//! Durable per-agent dedup state: which `seq` of each agent are committed.
//!
//! What it is: for every configured agent, a [`SeqSet`] of committed
//! sequence numbers (a floor plus intervals, so it stays small however out
//! of order batches arrive), saved as `<data-dir>/dedup/<agent>.json` by
//! write-to-temp, fsync, rename, fsync-directory before a batch is answered
//! `200`. Every agent has its own async lock; the ingest API holds it from
//! the dedup check until the state is saved, so two copies of one batch
//! racing each other are written once.
//!
//! # Write order and what a crash can do
//!
//! The log is written first, the dedup state second. A crash between the two
//! leaves records in the log that the state does not list:
//!
//! - embedded log: the state file also keeps, per topic, the log offset it
//!   covers (`log-marks`). At start-up every record after those marks is read
//!   back and its (`agent`, `seq`) added to the set before serving, so the
//!   resent batch is recognised: exactly once.
//! - Kafka: the state file keeps, per partition, the writer's frontier as of
//!   the save (`log-marks`, [`MarkScope::Global`]): below it every record of
//!   every agent is in some saved state. At start-up each partition is read
//!   from the newest saved frontier to its end, and what is found is added
//!   the same way: exactly once, unless the brokers cannot be reached at
//!   start-up (see [`crate::log::kafka`]).
//!
//! # A save that fails
//!
//! When a save fails the batch is answered `503` and the agent sends it
//! again. The in-memory set already lists the batch's seqs (its log write
//! succeeded), so the resend is a duplicate, but the state stays *unsaved*:
//! every commit, a duplicate one included, saves it until a save succeeds.
//! The receipts of the unsaved writes are kept until then, so in Kafka mode
//! the frontier never passes a write no saved state lists.
//!
//! What it is not: it does not decide what a batch contains or check
//! tokens; it only answers "was this seq committed?" and remembers answers.

use crate::log::{CommittedRecord, LogError, LogWriter, MarkScope, WriteReceipt};
use crate::seqset::{SeqSet, SeqSetRepr};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Mutex;

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    #[error("dedup state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dedup state {path} is unreadable ({reason}); move it away to start afresh, which may re-accept batches already committed")]
    Corrupt { path: PathBuf, reason: String },
    #[error("reading the log back to reconcile the dedup state: {0}")]
    Log(#[from] LogError),
    #[error("dedup state task failed: {0}")]
    Task(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StateFile {
    version: u32,
    agent: String,
    committed: SeqSetRepr,
    /// Per mark key, where reconciliation may start (see the module docs:
    /// embedded log per topic and agent, Kafka per partition and global).
    #[serde(default)]
    log_marks: BTreeMap<String, u64>,
}

/// The dedup state of one agent.
#[derive(Debug)]
pub struct AgentDedup {
    agent: String,
    path: PathBuf,
    committed: SeqSet,
    log_marks: BTreeMap<String, u64>,
    /// Receipts of the writes the saved state does not list yet; non-empty
    /// (or `unsaved`) means the next commit must save, whatever it adds.
    holds: Vec<WriteReceipt>,
    unsaved: bool,
}

impl AgentDedup {
    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn is_committed(&self, seq: u64) -> bool {
        self.committed.contains(seq)
    }

    pub fn committed(&self) -> &SeqSet {
        &self.committed
    }

    /// Records `seqs` as committed (their log write was acknowledged, ending
    /// at `receipt`) and raises the floor to `outbox_floor`. Returns whether
    /// the state must be saved: it changed, or an earlier save failed.
    pub fn commit(
        &mut self,
        seqs: impl IntoIterator<Item = u64>,
        outbox_floor: u64,
        receipt: WriteReceipt,
    ) -> bool {
        let before = (self.committed.clone(), self.log_marks.clone());
        for seq in seqs {
            self.committed.insert(seq);
        }
        self.committed.raise_floor(outbox_floor);
        for (topic, &next) in &receipt.next_offsets {
            let mark = self.log_marks.entry(topic.clone()).or_insert(0);
            *mark = (*mark).max(next);
        }
        if before != (self.committed.clone(), self.log_marks.clone()) {
            self.unsaved = true;
            self.holds.push(receipt);
        }
        self.unsaved
    }

    /// Adds what `other` lists (another aggregator's commits of this agent).
    pub fn merge(&mut self, other: &SeqSet) {
        self.committed.union(other);
    }

    /// Per log position key, where a read back for this agent may start.
    pub fn log_marks(&self) -> &BTreeMap<String, u64> {
        &self.log_marks
    }

    /// The state was saved elsewhere (the cluster's control topic): the
    /// receipts of the writes it lists are released.
    pub fn mark_saved(&mut self) {
        self.unsaved = false;
        self.holds.clear();
    }

    /// Whether the saved state lags the one in memory (a save failed).
    pub fn is_unsaved(&self) -> bool {
        self.unsaved
    }

    /// Saves the state durably (temp file, fsync, rename, fsync directory);
    /// then the receipts of the writes it lists are released.
    pub async fn persist(&mut self) -> Result<(), DedupError> {
        let bytes = self.encode();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| DedupError::Task(e.to_string()))??;
        self.unsaved = false;
        self.holds.clear();
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let file = StateFile {
            version: STATE_VERSION,
            agent: self.agent.clone(),
            committed: self.committed.to_repr(),
            log_marks: self.log_marks.clone(),
        };
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_vec_pretty(&file).unwrap_or_default()
    }

    fn persist_blocking(&self) -> Result<(), DedupError> {
        write_atomically(&self.path, &self.encode())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DedupError> {
    let io = |source| DedupError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// The dedup state of every configured agent.
#[derive(Debug)]
pub struct DedupStore {
    agents: HashMap<String, Arc<Mutex<AgentDedup>>>,
}

/// What [`DedupStore::open`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DedupRecovery {
    pub agents_loaded: usize,
    /// Records found in the log but missing from the saved state (a crash
    /// between the log write and the state save), now marked committed.
    pub reconciled_records: usize,
}

impl DedupStore {
    /// Empty states for `agents`, kept in memory only: in a cluster the
    /// states live in the control topic ([`crate::cluster`]).
    pub fn in_memory<'a>(agents: impl IntoIterator<Item = &'a str>) -> Self {
        let agents = agents
            .into_iter()
            .map(|agent| {
                let state = AgentDedup {
                    agent: agent.to_owned(),
                    path: PathBuf::new(),
                    committed: SeqSet::new(),
                    log_marks: BTreeMap::new(),
                    holds: Vec::new(),
                    unsaved: false,
                };
                (agent.to_owned(), Arc::new(Mutex::new(state)))
            })
            .collect();
        Self { agents }
    }

    /// Loads the state of `agents` from `dir` (creating it) and reconciles it
    /// with what `log` holds beyond the saved marks. Blocking; call before serving.
    pub fn open<'a>(
        dir: &Path,
        agents: impl IntoIterator<Item = &'a str>,
        log: &dyn LogWriter,
    ) -> Result<(Self, DedupRecovery), DedupError> {
        fs::create_dir_all(dir).map_err(|source| DedupError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut recovery = DedupRecovery::default();
        let mut states: HashMap<String, AgentDedup> = HashMap::new();
        for agent in agents {
            let path = dir.join(format!("{agent}.json"));
            let state = match fs::read(&path) {
                Ok(bytes) => {
                    let file: StateFile =
                        serde_json::from_slice(&bytes).map_err(|e| DedupError::Corrupt {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    if file.version != STATE_VERSION || file.agent != agent {
                        return Err(DedupError::Corrupt {
                            path,
                            reason: format!(
                                "version {} for agent `{}`, expected version {STATE_VERSION} for `{agent}`",
                                file.version, file.agent
                            ),
                        });
                    }
                    recovery.agents_loaded += 1;
                    AgentDedup {
                        agent: agent.to_owned(),
                        path,
                        committed: SeqSet::from_repr(&file.committed),
                        log_marks: file.log_marks,
                        holds: Vec::new(),
                        unsaved: false,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentDedup {
                    agent: agent.to_owned(),
                    path,
                    committed: SeqSet::new(),
                    log_marks: BTreeMap::new(),
                    holds: Vec::new(),
                    unsaved: false,
                },
                Err(source) => return Err(DedupError::Io { path, source }),
            };
            states.insert(agent.to_owned(), state);
        }

        let scope = log.mark_scope();
        let marked: BTreeSet<String> = states
            .values()
            .flat_map(|s| s.log_marks.keys().cloned())
            .collect();
        // Per agent: read each topic from the lowest mark of all agents (a
        // topic some agent has no mark for is read from the start). Global:
        // every saved mark holds for all agents, so the newest one wins.
        let from: BTreeMap<String, u64> = marked
            .into_iter()
            .filter_map(|key| {
                let marks = states.values().map(|s| s.log_marks.get(&key).copied());
                let start = match scope {
                    MarkScope::PerAgent => marks.collect::<Option<Vec<u64>>>()?.into_iter().min(),
                    MarkScope::Global => marks.flatten().max(),
                }?;
                Some((key, start))
            })
            .collect();
        let mut scanned_end: BTreeMap<String, u64> = BTreeMap::new();
        log.committed_since(&from, &mut |record: CommittedRecord| {
            let end = scanned_end.entry(record.topic.clone()).or_insert(0);
            *end = (*end).max(record.offset + 1);
            let Some(state) = states.get_mut(&record.agent) else {
                return;
            };
            let mark = match scope {
                MarkScope::PerAgent => state.log_marks.get(&record.topic).copied().unwrap_or(0),
                MarkScope::Global => 0,
            };
            if record.offset >= mark && state.committed.insert(record.seq) {
                recovery.reconciled_records += 1;
            }
        })?;
        // Every agent's set now covers the log up to the scanned end: move
        // the marks there, so the next start-up reads only what is new.
        for state in states.values_mut() {
            let mut moved = false;
            for (topic, &end) in &scanned_end {
                let mark = state.log_marks.entry(topic.clone()).or_insert(0);
                if end > *mark {
                    *mark = end;
                    moved = true;
                }
            }
            if moved {
                state.persist_blocking()?;
            }
        }
        if recovery.reconciled_records > 0 {
            tracing::warn!(
                records = recovery.reconciled_records,
                log = log.kind(),
                "dedup state was behind the log (crash after a log write); reconciled"
            );
        }
        let agents = states
            .into_iter()
            .map(|(id, state)| (id, Arc::new(Mutex::new(state))))
            .collect();
        Ok((Self { agents }, recovery))
    }

    /// The state of `agent`, if it is configured.
    pub fn agent(&self, agent: &str) -> Option<Arc<Mutex<AgentDedup>>> {
        self.agents.get(agent).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Topics;
    use crate::log::local::LocalLogWriter;
    use crate::log::LogRecord;
    use millrace_protocol::{DeadLetter, DeadLetterReason, Envelope, Record, Source};

    fn envelope(seq: u64) -> Envelope {
        Envelope {
            seq,
            record: Record::DeadLetter(DeadLetter::new(
                Source::Mqtt,
                "plant/x",
                b"x".to_vec(),
                DeadLetterReason::Malformed,
                "",
                0,
            )),
        }
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let topics = Topics::default();
        let (log, _) = LocalLogWriter::open(
            &tmp.path().join("log"),
            &topics,
            1 << 20,
            Default::default(),
        )
        .unwrap();
        let dir = tmp.path().join("dedup");
        let (store, _) = DedupStore::open(&dir, ["gw-1"], &log).unwrap();
        {
            let state = store.agent("gw-1").unwrap();
            let mut state = state.lock().await;
            assert!(state.commit([5, 6, 9], 5, WriteReceipt::default()));
            state.persist().await.unwrap();
        }
        drop(store);
        let (store, recovery) = DedupStore::open(&dir, ["gw-1", "gw-2"], &log).unwrap();
        assert_eq!(recovery.agents_loaded, 1);
        let state = store.agent("gw-1").unwrap();
        let state = state.lock().await;
        assert!(state.is_committed(4) && state.is_committed(6) && state.is_committed(9));
        assert!(!state.is_committed(7));
        assert!(store.agent("gw-3").is_none());
    }

    #[tokio::test]
    async fn a_failed_save_is_retried_by_the_next_commit_and_holds_its_receipt() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = LocalLogWriter::open(
            &tmp.path().join("log"),
            &Topics::default(),
            1 << 20,
            Default::default(),
        )
        .unwrap();
        let dir = tmp.path().join("dedup");
        let (store, _) = DedupStore::open(&dir, ["gw-1"], &log).unwrap();
        let state = store.agent("gw-1").unwrap();
        let mut state = state.lock().await;
        // A directory where the temp file goes: the save fails.
        let blocker = dir.join("gw-1.json.tmp");
        fs::create_dir(&blocker).unwrap();
        let held = std::sync::Arc::new(());
        let receipt = WriteReceipt {
            next_offsets: Default::default(),
            hold: crate::log::ReceiptHold::new(std::sync::Arc::clone(&held)),
        };
        assert!(state.commit([1, 2], 1, receipt));
        assert!(state.persist().await.is_err());
        assert!(state.is_unsaved());
        assert_eq!(
            std::sync::Arc::strong_count(&held),
            2,
            "the write's receipt is held until a save lists it"
        );
        // The resend adds nothing, yet must save.
        assert!(state.commit([1, 2], 1, WriteReceipt::default()));
        fs::remove_dir(&blocker).unwrap();
        state.persist().await.unwrap();
        assert!(!state.is_unsaved());
        assert_eq!(
            std::sync::Arc::strong_count(&held),
            1,
            "released once saved"
        );
        assert!(!state.commit([1, 2], 1, WriteReceipt::default()));
        drop(state);
        drop(store);
        // Saved on disk, not only in memory.
        let file: StateFile =
            serde_json::from_slice(&fs::read(dir.join("gw-1.json")).unwrap()).unwrap();
        let saved = SeqSet::from_repr(&file.committed);
        assert!(saved.contains(1) && saved.contains(2));
    }

    #[tokio::test]
    async fn records_written_after_the_last_save_are_reconciled() {
        let tmp = tempfile::tempdir().unwrap();
        let topics = Topics::default();
        let (log, _) = LocalLogWriter::open(
            &tmp.path().join("log"),
            &topics,
            1 << 20,
            Default::default(),
        )
        .unwrap();
        let dir = tmp.path().join("dedup");
        let (store, _) = DedupStore::open(&dir, ["gw-1"], &log).unwrap();
        let write = |seqs: &[u64]| {
            seqs.iter()
                .map(|&s| LogRecord::from_envelope(&topics, "gw-1", 1, &envelope(s)).unwrap())
                .collect::<Vec<_>>()
        };
        // Batch 1: logged and saved.
        let receipt = log.write(write(&[1, 2])).await.unwrap();
        {
            let state = store.agent("gw-1").unwrap();
            let mut state = state.lock().await;
            state.commit([1, 2], 1, receipt);
            state.persist().await.unwrap();
        }
        // Batch 2: logged, then "crash" before the state is saved.
        log.write(write(&[3, 4])).await.unwrap();
        drop(store);

        let (store, recovery) = DedupStore::open(&dir, ["gw-1"], &log).unwrap();
        assert_eq!(recovery.reconciled_records, 2);
        let state = store.agent("gw-1").unwrap();
        assert!(state.lock().await.is_committed(4));
        drop(store);
        // Saved during reconciliation: nothing left to do next time.
        let (_, recovery) = DedupStore::open(&dir, ["gw-1"], &log).unwrap();
        assert_eq!(recovery.reconciled_records, 0);
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (log, _) = LocalLogWriter::open(
            &tmp.path().join("log"),
            &Topics::default(),
            1 << 20,
            Default::default(),
        )
        .unwrap();
        let dir = tmp.path().join("dedup");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("gw-1.json"), b"{not json").unwrap();
        let err = DedupStore::open(&dir, ["gw-1"], &log)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gw-1.json"), "{err}");
    }
}
