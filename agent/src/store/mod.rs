//! The agent's crash-safe store: the outbox of records bound for the
//! aggregator, and the journal of readings that feed open windows.
//!
//! What it is: one [fjall](https://docs.rs/fjall) database under the agent's
//! state directory with two parts that share write batches:
//!
//! - [`Outbox`]: every [`Record`](millrace_protocol::Record) bound for the
//!   aggregator is appended with its `seq` before it counts as produced and is
//!   deleted only when the aggregator acknowledges that `seq`. Two lanes, each
//!   read oldest first: [`Lane::Priority`] (alerts) goes ahead of
//!   [`Lane::Bulk`] (windows, dead letters). Bounded by bytes and age, with an
//!   explicit [`WhenFull`] policy; every drop is counted and logged.
//! - [`Journal`]: readings that feed open windows, group-committed (one fsync
//!   per [`Journal::commit`]), replayed after a crash to rebuild the window
//!   engine, with per-series *closed-up-to* marks so a rebuilt engine never
//!   emits a window twice.
//!
//! What it is not: not a general queue (one reader, the uplink), not a
//! replicated log, and not async. The API is synchronous and blocks on fsync;
//! async callers use [`blocking`] (a `spawn_blocking` wrapper). It does not
//! decide what to do on errors: `append` on a full disk returns
//! [`StoreError::DiskFull`] and the caller chooses (stop ingest, retry later).
//!
//! ```
//! use millrace_agent::store::{Lane, Store, StoreConfig};
//! use millrace_protocol::{DeadLetter, DeadLetterReason, Record, Source};
//! # let dir = tempfile::tempdir().unwrap();
//! let (store, report) = Store::open(dir.path(), StoreConfig::default()).unwrap();
//! assert!(report.quarantined.is_none());
//! let dl = DeadLetter::new(Source::Mqtt, "plant/x", b"{".to_vec(), DeadLetterReason::Malformed, "eof", 0);
//! let seqs = store.outbox().append(vec![Record::DeadLetter(dl)]).unwrap();
//! let batch = store.outbox().peek(Lane::Bulk, 100, 1 << 20).unwrap();
//! assert_eq!(batch[0].seq, seqs[0]);
//! store.outbox().ack(&seqs).unwrap();
//! assert_eq!(store.outbox().floor().unwrap(), seqs[0] + 1);
//! ```
//!
//! # On-disk format
//!
//! ```text
//! <dir>/db/                      fjall database (format of fjall 3)
//! <dir>/seq-lease                u64 BE + crc32 LE: no seq at or above it was ever handed out
//! <dir>/opening                  count of opens that started and did not finish
//! <dir>/appended                 u64 BE + crc32 LE: next_seq after the last append that returned (no fsync)
//! <dir>/quarantine/<ms>-<why>/   broken databases moved aside (newest 3 kept)
//! ```
//!
//! Keyspaces of `<dir>/db`:
//!
//! | keyspace          | key                          | value                                   |
//! |-------------------|------------------------------|-----------------------------------------|
//! | `outbox_priority` | `seq` u64 big-endian         | stored value of a `Record` (alerts)     |
//! | `outbox_bulk`     | `seq` u64 big-endian         | stored value of a `Record` (the rest)   |
//! | `journal`         | first position u64 big-endian | journal block: the readings of one commit |
//! | `journal_closed`  | postcard(`SeriesKey`)        | `window_end_ms` i64 BE + crc32 LE       |
//! | `meta`            | `next_seq`                   | u64 BE + crc32 LE                       |
//! | `baselines`       | postcard(`SeriesKey`)        | stored value of the scorer's history (see [`Baselines`]) |
//!
//! Big-endian keys make fjall's byte order the numeric order, so every lane
//! and the journal iterate oldest first. A *stored value* is
//! `version (1 byte, = 1) | crc32 LE of the rest (4) | appended_ms i64 BE (8) | postcard(body)`;
//! the checksum lets a flipped bit that fjall's own block checksums did not
//! catch (a bad memtable recovery, a bug) surface as a counted, skipped entry
//! instead of a wrong record.
//!
//! A *journal block* holds every reading of one [`Journal::commit`], so a
//! group commit is one key, one write and one fsync whatever its size:
//! `version (= 2) | crc32 LE of the rest | appended_ms i64 BE | count u32 LE |
//! postcard(Reading)…` (the readings back to back). Its key is the position of
//! its first reading; it covers `count` positions. A block is deleted whole,
//! once every reading in it belongs to a closed window (or it is older than
//! `journal.max-age`). Entries of version 1 (one reading each, written by
//! earlier releases) are still replayed and reclaimed.
//!
//! # Invariants
//!
//! - **Durable on return.** When [`Outbox::append`] returns `Ok(seqs)`, the
//!   records, the new `next_seq`, and the closed-up-to marks of the windows
//!   among them are on disk in one fjall write batch, synced with
//!   `fsync` (`PersistMode::SyncAll`). When [`Journal::commit`] returns a
//!   ticket, every reading appended before it is on disk likewise.
//! - **A crash loses nothing that returned.** A crash (kill -9, power loss)
//!   at any point loses at most the batch being written, which never returned
//!   `Ok`. Acknowledgements are written without fsync: a lost ack only means
//!   the record is sent again, and the aggregator deduplicates by `seq`.
//! - **Nothing is duplicated.** A record lives under one `seq` key; acks
//!   delete by `seq`; `seq` is never reused: it only grows within a process,
//!   `next_seq` is written in the same batch as the records, and the
//!   `seq-lease` file (written and fsynced *before* any seq below its value is
//!   handed out) survives a quarantined database. Gaps in `seq` are normal
//!   (after a restart `next_seq` resumes at the lease).
//! - **`floor`.** Every `seq` below [`Outbox::floor`] is acknowledged or
//!   dropped by policy, never sent again.
//! - **Windows are emitted once.** Appending a `Record::Window` advances the
//!   closed-up-to mark of its series to `end_ms` in the same batch. Replay
//!   drops journaled readings with `time_ms < mark`: windows are aligned, so
//!   those are exactly the readings of windows already in the outbox.
//! - **Recovery never wedges.** If the database cannot be opened or scanned
//!   because its files are damaged (torn tail, flipped bits, a missing or
//!   truncated file), or three opens in a row did not finish (a panic or
//!   abort inside the storage engine), the database directory is moved to
//!   `quarantine/` and a fresh one is started; undecodable single entries are
//!   deleted and counted. Both appear in the [`RecoveryReport`]. fjall itself
//!   treats a corrupt journal batch as a torn tail and drops it and all later
//!   batches without an error; the `appended` mark detects that after the
//!   fact and reports it as [`RecoveryReport::lost_appends`]. Errors of the
//!   environment (permissions, a full disk, the lock held by another
//!   process) are returned instead: quarantining would not fix them.
//!
//! # Errors and a full disk
//!
//! No operation panics on bad data or a failing disk. A failed write returns
//! [`StoreError::DiskFull`] or [`StoreError::Storage`]; fjall then refuses
//! further writes ([`StoreError::Poisoned`]) because it cannot know what
//! reached the disk ([`StoreError::needs_reopen`]). The caller stops ingest,
//! and reopens the store (drop it, [`Store::open`] again) once space is free:
//! reopening recovers everything that was acknowledged as durable. Opening
//! on a full disk fails with an error for which [`StoreError::is_disk_full`]
//! holds; the agent waits and tries again.
//!
//! # Not tested here
//!
//! Power loss (only process kills are tested: data in the page cache survives
//! those), a disk that lies about fsync, and corruption of fjall's sorted table
//! files (the tests write too little to flush one; the scan at open reads
//! every entry, so a bad block fails the scan and quarantines the database).

mod baselines;
pub(crate) mod codec;
mod config;
mod journal;
mod outbox;
mod recovery;

pub use baselines::{Baselines, History, LoadedBaselines};
pub use config::{
    parse_byte_size, ConfigError, JournalConfig, OutboxConfig, StoreConfig, WhenFull,
};
pub use journal::{
    Journal, JournalPosition, JournalReplay, JournalStats, JournalTicket, ReclaimReport,
};
pub use outbox::{AckReport, Lane, LaneStats, Outbox, OutboxStats};
pub use recovery::{Quarantine, RecoveryReport};

use std::path::{Path, PathBuf};

/// Errors of the store. [`StoreError::is_transient`] says whether trying again
/// later (after freeing space, after the uplink drained) can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `when-full = "block"` and the records do not fit: stop ingest and retry
    /// after the uplink drained the outbox.
    #[error("outbox full: {pending_bytes} bytes pending + {incoming_bytes} incoming exceed max-bytes = {max_bytes}")]
    Full {
        pending_bytes: u64,
        incoming_bytes: u64,
        max_bytes: u64,
    },
    /// One append is larger than the whole outbox: split it.
    #[error("append of {bytes} bytes is larger than outbox.max-bytes = {max_bytes}")]
    TooLarge { bytes: u64, max_bytes: u64 },
    /// The journal holds this many uncommitted readings; call `commit`.
    #[error("journal holds {pending} uncommitted readings (cap {cap}); commit first")]
    JournalBacklog { pending: usize, cap: usize },
    /// The disk (or the file size limit) is full. Writes fail until the store
    /// is reopened after space was freed.
    #[error("disk full while {op}: {source}")]
    DiskFull {
        op: &'static str,
        #[source]
        source: fjall::Error,
    },
    /// An earlier write failed; fjall refuses writes until the store is reopened.
    #[error("store refuses writes after an earlier write failure; reopen it")]
    Poisoned,
    /// Another process has the database open.
    #[error("store {path} is locked by another process")]
    Locked { path: PathBuf },
    /// Any other storage engine failure.
    #[error("storage error while {op}: {source}")]
    Storage {
        op: &'static str,
        #[source]
        source: fjall::Error,
    },
    /// A file of the store outside the database (lease, markers, quarantine).
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record could not be serialised (never expected for protocol records).
    #[error("record could not be encoded: {0}")]
    Encode(#[from] postcard::Error),
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The blocking task running a store call panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

/// Store result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Whether the same call can succeed later without a code or config change.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Full { .. }
                | StoreError::JournalBacklog { .. }
                | StoreError::DiskFull { .. }
                | StoreError::Poisoned
                | StoreError::Locked { .. }
                | StoreError::Io { .. }
        )
    }

    /// Whether the store refuses every write until it is reopened: fjall
    /// poisons its database on any failed journal write (a full disk among
    /// them), because it cannot know what reached the disk. The agent then
    /// stops and is restarted by its service manager, which reopens the
    /// store (see the runtime's module docs).
    pub fn needs_reopen(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull { .. } | StoreError::Poisoned | StoreError::Storage { .. }
        )
    }

    /// Whether this is the file system being full (of the database or of a
    /// file beside it): opening the store can succeed once space is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Io { source, .. } => is_disk_full(source),
            StoreError::Storage { source, .. } => io_error_of(source).is_some_and(is_disk_full),
            _ => false,
        }
    }

    /// Wraps a fjall error, classifying a full disk and a poisoned database.
    pub(crate) fn fjall(op: &'static str, source: fjall::Error) -> Self {
        match &source {
            fjall::Error::Poisoned => StoreError::Poisoned,
            _ if io_error_of(&source).is_some_and(is_disk_full) => {
                StoreError::DiskFull { op, source }
            }
            _ => StoreError::Storage { op, source },
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub(crate) fn io_error_of(e: &fjall::Error) -> Option<&std::io::Error> {
    match e {
        fjall::Error::Io(io) => Some(io),
        fjall::Error::Storage(fjall::LsmError::Io(io)) => Some(io),
        _ => None,
    }
}

pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
    )
}

/// The outbox and the journal in one fjall database, so one write batch can
/// cover both (records and closed-up-to marks). Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: fjall::Database,
    outbox: Outbox,
    journal: Journal,
    baselines: Baselines,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovering from damage as the
    /// module docs describe. Fails only on invalid config or on errors of the
    /// environment (permissions, full disk, lock held).
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<(Store, RecoveryReport)> {
        config.validate()?;
        let dir = dir.as_ref().to_owned();
        let opened = recovery::open(&dir, &config)?;
        let store = Store {
            db: opened.db,
            outbox: opened.outbox,
            journal: opened.journal,
            baselines: opened.baselines,
            dir,
        };
        Ok((store, opened.report))
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The scorer's saved baselines.
    pub fn baselines(&self) -> &Baselines {
        &self.baselines
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Syncs everything written so far (acks, reclaims) to disk: call on shutdown.
    pub fn sync(&self) -> Result<()> {
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| StoreError::fjall("syncing on shutdown", e))
    }

    /// Bytes the database occupies on disk (tables and journals).
    pub fn disk_bytes(&self) -> Result<u64> {
        self.db
            .disk_space()
            .map_err(|e| StoreError::fjall("measuring disk space", e))
    }
}

/// Runs a blocking store call on tokio's blocking pool:
/// `store::blocking({ let o = outbox.clone(); move || o.append(records) }).await`.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}
