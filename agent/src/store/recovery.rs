//! Opening the store after any kind of stop: the seq lease, the unfinished-open
//! counter, and quarantining a database that cannot be opened or scanned.

use super::codec;
use super::config::StoreConfig;
use super::journal::{Journal, Marks};
use super::outbox::Outbox;
use super::{io_error_of, Result, StoreError};
use crate::ingest::now_ms;
use fjall::{Database, KeyspaceCreateOptions};
use std::fs;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

const DB_DIR: &str = "db";
const LEASE_FILE: &str = "seq-lease";
const OPENING_FILE: &str = "opening";
const APPENDED_FILE: &str = "appended";
const QUARANTINE_DIR: &str = "quarantine";
/// Opens that started and did not finish, in a row, before the database is
/// quarantined without trying again (a panic or abort inside the engine).
const MAX_UNFINISHED_OPENS: u32 = 3;
/// Quarantined databases kept for inspection; older ones are deleted.
const QUARANTINES_KEPT: usize = 3;
/// fjall journal budget (its minimum): bounds the disk used beyond `max-bytes`.
const FJALL_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;
/// Background threads for flushes and compactions. One keeps up with the
/// journal at 100 000 readings/s; with more, fjall's first worker hands every
/// compaction on to the others and spins doing so (measured: 10 % of the
/// agent's CPU in a burst, for nothing).
const FJALL_WORKERS: usize = 1;
/// Block cache: the store is written far more than read, and what it reads
/// it mostly reads once (the journal's blocks when they are reclaimed, the
/// outbox's records on their way to the aggregator). 512 KiB rather than
/// 2 MiB: under load the reclaim's reads filled the larger cache with blocks
/// deleted right after, 1.1–1.7 MiB more peak RSS for no saved read
/// (BENCHMARKS.md, "Ingest under load").
const FJALL_CACHE_BYTES: u64 = 512 * 1024;
/// Memtable of each keyspace but the journal (fjall's default is 64 MiB):
/// written records sit in memory until their keyspace's memtable reaches
/// this size and is flushed to a disk segment. The outbox takes the windows:
/// a device replaying an outage's buffer closes them by the hundred
/// thousand in seconds, and the uplink's acks add as many tombstones, so
/// with 4 MiB the memtables (active and sealed, skiplist overhead included)
/// held about 10 MB of heap and the agent peaked at 29–32 MiB RSS; with
/// 1 MiB 22–24, at the cost of more segments for the drain to read (10.5 →
/// 16–18 CPU-µs per forwarded record; BENCHMARKS.md, "Ingest under load").
/// At 1,000 series (200 windows/s) it flushes about every 25 s. Applies to
/// keyspaces created with it (a new state directory); fjall keeps the size
/// an existing keyspace was created with.
const FJALL_MEMTABLE_BYTES: u64 = 1024 * 1024;

/// Memtable of the journal keyspace: its blocks are deleted within seconds
/// of being written, and it takes most of the writes, so a small memtable
/// keeps memory flat at 100 000 readings/s (it flushes several times a
/// second then, mostly tombstones and short-lived blocks). 768 KiB rather
/// than 1 MiB: about 1 MiB less peak RSS through an external broker at the
/// same CPU; 512 KiB saves a little more memory but costs about 6 % more CPU
/// at 20,000 readings/s in flushes (BENCHMARKS.md, "Ingest under load").
const FJALL_JOURNAL_MEMTABLE_BYTES: u64 = 768 * 1024;

/// The options every keyspace of the store is created with.
pub(crate) fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(FJALL_MEMTABLE_BYTES)
}

/// The journal keyspace: a small memtable, and no compression at any level
/// (its blocks are deleted long before compression would pay off).
fn journal_keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .max_memtable_size(FJALL_JOURNAL_MEMTABLE_BYTES)
        .data_block_compression_policy(fjall::config::CompressionPolicy::all(
            fjall::CompressionType::None,
        ))
}

/// A database moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Where the broken database now lives.
    pub path: PathBuf,
    /// Why it was moved (the error that stopped the open or the scan).
    pub reason: String,
}

/// What opening the store found and repaired. Log it and count it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Set when the database was unusable and a fresh one was started: its
    /// pending records and journal are in `quarantine.path`, not replayed.
    pub quarantined: Option<Quarantine>,
    /// Opens before this one that started and did not finish.
    pub unfinished_opens: u32,
    /// Pending outbox records found, per lane.
    pub priority_records: u64,
    pub bulk_records: u64,
    /// Undecodable outbox records deleted.
    pub corrupt_records: u64,
    /// Journal entries found (replay may skip some as already closed).
    pub journal_entries: u64,
    /// Undecodable window marks deleted.
    pub corrupt_marks: u64,
    /// The lease file was missing or unreadable (a fresh store has none).
    pub lease_unreadable: bool,
    /// The persisted `next_seq` was unreadable (the keys and the lease still bound it).
    pub next_seq_unreadable: bool,
    /// The database opened but its state is gone (no `next_seq`) although
    /// the lease shows records were appended before: a file of the database
    /// was deleted or replaced. Its pending records are lost.
    pub state_lost: bool,
    /// Seqs handed out by appends that returned, which the database no
    /// longer has (its journal lost a tail to damage: fjall drops everything
    /// after a corrupt journal batch). Up to this many records are lost.
    /// Detected after process crashes; after a power loss the mark may lag.
    pub lost_appends: u64,
    /// Both the database and the lease were lost: `next_seq` restarted from
    /// the clock (`now_ms << 20`), above any seq a counter could have reached.
    pub seq_from_clock: bool,
    /// The seq the next appended record gets.
    pub next_seq: u64,
}

/// `<dir>/seq-lease`: no seq at or above `end` was ever handed out. Written
/// (fsync, rename, fsync of the directory) before a seq at or above the old
/// value is used.
#[derive(Debug)]
pub(crate) struct SeqLease {
    path: PathBuf,
    end: u64,
}

impl SeqLease {
    /// Reads the lease; `None` when missing or unreadable.
    fn read(dir: &Path) -> (SeqLease, bool) {
        let path = dir.join(LEASE_FILE);
        let end = fs::read(&path)
            .ok()
            .and_then(|bytes| codec::decode_meta_u64(&bytes).ok());
        (
            SeqLease {
                path,
                end: end.unwrap_or(0),
            },
            end.is_some(),
        )
    }

    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    pub(crate) fn extend_to(&mut self, end: u64) -> Result<()> {
        if end <= self.end {
            return Ok(());
        }
        write_durably(&self.path, &codec::encode_meta_u64(end))?;
        self.end = end;
        Ok(())
    }
}

/// Write to a temporary file, fsync, rename over `path`, fsync the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| StoreError::io(&p, e)
    };
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
    }
    Ok(())
}

pub(crate) struct Opened {
    pub db: Database,
    pub outbox: Outbox,
    pub journal: Journal,
    pub baselines: super::Baselines,
    pub report: RecoveryReport,
}

/// Why one open attempt failed.
enum Failure {
    /// The files are damaged: quarantine and start fresh.
    Damaged(String),
    /// The environment is at fault: report, do not touch the files.
    Fatal(StoreError),
}

pub(crate) fn open(dir: &Path, config: &StoreConfig) -> Result<Opened> {
    fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let opening_path = dir.join(OPENING_FILE);
    let unfinished_opens = fs::read_to_string(&opening_path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    write_durably(&opening_path, (unfinished_opens + 1).to_string().as_bytes())?;

    let mut report = RecoveryReport {
        unfinished_opens,
        ..RecoveryReport::default()
    };
    let db_path = dir.join(DB_DIR);
    let result = if unfinished_opens >= MAX_UNFINISHED_OPENS && db_path.exists() {
        Err(Failure::Damaged(format!(
            "{unfinished_opens} opens in a row did not finish"
        )))
    } else {
        attempt(dir, config, &mut report)
    };
    let opened = match result {
        Ok(opened) => opened,
        Err(Failure::Fatal(e)) => {
            // Not the files' fault: leave the counter as it was.
            write_durably(&opening_path, unfinished_opens.to_string().as_bytes())?;
            return Err(e);
        }
        Err(Failure::Damaged(reason)) => {
            let path = quarantine(dir, &reason)?;
            tracing::error!(path = %path.display(), %reason, "store database damaged: moved aside, starting fresh");
            report = RecoveryReport {
                quarantined: Some(Quarantine { path, reason }),
                unfinished_opens,
                ..RecoveryReport::default()
            };
            match attempt(dir, config, &mut report) {
                Ok(opened) => opened,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Damaged(reason)) => {
                    return Err(StoreError::Io {
                        path: db_path,
                        source: std::io::Error::other(format!(
                            "a fresh database failed too: {reason}"
                        )),
                    })
                }
            }
        }
    };
    fs::remove_file(&opening_path).map_err(|e| StoreError::io(&opening_path, e))?;
    tracing::info!(
        next_seq = opened.report.next_seq,
        priority = opened.report.priority_records,
        bulk = opened.report.bulk_records,
        journal = opened.report.journal_entries,
        corrupt = opened.report.corrupt_records,
        quarantined = opened.report.quarantined.is_some(),
        state_lost = opened.report.state_lost,
        "store opened"
    );
    Ok(opened)
}

fn attempt(
    dir: &Path,
    config: &StoreConfig,
    report: &mut RecoveryReport,
) -> Result<Opened, Failure> {
    // A panic inside the engine on damaged files must not become a crash
    // loop. (With `panic = "abort"` the unfinished-open counter covers it.)
    match catch_unwind(AssertUnwindSafe(|| open_and_scan(dir, config, report))) {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(e)) => Err(classify(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            Err(Failure::Damaged(format!("storage engine panicked: {msg}")))
        }
    }
}

fn open_and_scan(dir: &Path, config: &StoreConfig, report: &mut RecoveryReport) -> Result<Opened> {
    let db_path = dir.join(DB_DIR);
    let fresh = !db_path.exists();
    let db = Database::builder(&db_path)
        .max_journaling_size(FJALL_JOURNAL_BYTES)
        .cache_size(FJALL_CACHE_BYTES)
        .worker_threads(FJALL_WORKERS)
        // fjall compresses write-ahead entries over 4 KiB (journal blocks):
        // CPU on the hot path to save disk bytes that are deleted in seconds.
        .journal_compression(fjall::CompressionType::None)
        .manual_journal_persist(true)
        .open()
        .map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked {
                path: db_path.clone(),
            },
            e => StoreError::fjall("opening the database", e),
        })?;
    let keyspace = |name: &'static str| {
        db.keyspace(name, keyspace_options)
            .map_err(|e| StoreError::fjall("opening a keyspace", e))
    };
    let meta = keyspace("meta")?;
    let baselines = super::Baselines::new(db.clone(), keyspace("baselines")?);
    let (marks, corrupt_marks) = Marks::load(&db, keyspace("journal_closed")?)?;
    let marks = std::sync::Arc::new(marks);
    let (lease, lease_ok) = SeqLease::read(dir);
    report.lease_unreadable = !lease_ok && !fresh;
    let lost_everything = !lease_ok && report.quarantined.is_some();
    let mut lease = lease;
    if lost_everything {
        // Neither the database nor the lease bounds the seqs already sent.
        let from_clock = u64::try_from(now_ms()).unwrap_or(0).saturating_mul(1 << 20);
        lease.extend_to(from_clock)?;
        report.seq_from_clock = true;
    }
    let appended_path = dir.join(APPENDED_FILE);
    let appended_before = fs::read(&appended_path)
        .ok()
        .and_then(|b| codec::decode_meta_u64(&b).ok());
    let appended_mark = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&appended_path)
        .map_err(|e| StoreError::io(&appended_path, e))?;
    let (outbox, scan) = Outbox::recover(
        db.clone(),
        meta,
        marks.clone(),
        config.outbox.clone(),
        lease,
        Some(appended_mark),
    )?;
    if report.quarantined.is_none() {
        report.lost_appends = appended_before.map_or(0, |a| a.saturating_sub(scan.meta_next_seq));
        if report.lost_appends > 0 {
            tracing::error!(
                lost_appends = report.lost_appends,
                "store database lost the tail of its journal: appended records are gone"
            );
        }
    }
    let (journal, journal_entries) = Journal::recover(
        db.clone(),
        db.keyspace("journal", journal_keyspace_options)
            .map_err(|e| StoreError::fjall("opening a keyspace", e))?,
        marks,
        config.journal.clone(),
        config.journal_buffer_cap(),
    )?;
    report.priority_records = scan.records[0];
    report.bulk_records = scan.records[1];
    report.corrupt_records = scan.corrupt[0] + scan.corrupt[1];
    report.next_seq_unreadable = scan.meta_next_seq_unreadable;
    report.state_lost = scan.meta_next_seq_missing && lease_ok && report.quarantined.is_none();
    if report.state_lost {
        tracing::error!(path = %db_path.display(), "store database lost its state: pending records are gone");
    }
    report.next_seq = scan.next_seq;
    report.journal_entries = journal_entries;
    report.corrupt_marks = corrupt_marks;
    Ok(Opened {
        db,
        outbox,
        journal,
        baselines,
        report: report.clone(),
    })
}

/// Damaged files versus a hostile environment.
fn classify(e: StoreError) -> Failure {
    use std::io::ErrorKind;
    let damaged = match &e {
        StoreError::Storage { source, .. } => match io_error_of(source) {
            Some(io) => matches!(
                io.kind(),
                ErrorKind::InvalidData | ErrorKind::UnexpectedEof | ErrorKind::NotFound
            ),
            None => !matches!(source, fjall::Error::Locked | fjall::Error::Poisoned),
        },
        _ => false,
    };
    if damaged {
        Failure::Damaged(e.to_string())
    } else {
        Failure::Fatal(e)
    }
}

/// Moves `<dir>/db` to `<dir>/quarantine/<now_ms>-<reason>/` and prunes old quarantines.
fn quarantine(dir: &Path, reason: &str) -> Result<PathBuf> {
    let qdir = dir.join(QUARANTINE_DIR);
    fs::create_dir_all(&qdir).map_err(|e| StoreError::io(&qdir, e))?;
    let slug: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let mut target = qdir.join(format!("{}-{}", now_ms(), slug.trim_matches('-')));
    let mut n = 1;
    while target.exists() {
        target = qdir.join(format!("{}-{}-{n}", now_ms(), slug.trim_matches('-')));
        n += 1;
    }
    let db_path = dir.join(DB_DIR);
    if db_path.exists() {
        fs::rename(&db_path, &target).map_err(|e| StoreError::io(&db_path, e))?;
    } else {
        fs::create_dir_all(&target).map_err(|e| StoreError::io(&target, e))?;
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))?;
    prune_quarantine(&qdir);
    Ok(target)
}

fn prune_quarantine(qdir: &Path) {
    let Ok(entries) = fs::read_dir(qdir) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // Names start with the time in ms, which sorts as text for 13-digit times.
    dirs.sort();
    let excess = dirs.len().saturating_sub(QUARANTINES_KEPT);
    for old in dirs.into_iter().take(excess) {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "could not delete an old quarantined store");
        }
    }
}
