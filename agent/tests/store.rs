//! Crash and damage tests of the agent store: a child process appending in a
//! loop is killed with SIGKILL at random moments; files of the database are
//! truncated, flipped and deleted; a full disk (a 4 MiB tmpfs) is hit.

#![allow(clippy::unwrap_used)]

use millrace_agent::store::{Lane, OutboxConfig, RecoveryReport, Store, StoreConfig, StoreError};
use millrace_protocol::{
    Alert, AlertKind, AnomalyScore, DeadLetter, DeadLetterReason, Quality, Reading, Record,
    SeriesKey, Severity, Source,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD_DIR_ENV: &str = "MILLRACE_STORE_CRASH_CHILD_DIR";
const CHILD_ROUND_ENV: &str = "MILLRACE_STORE_CRASH_CHILD_ROUND";

fn record(id: u64, payload_bytes: usize) -> Record {
    if id % 5 == 0 {
        Record::Alert(Alert {
            agent: "gw".into(),
            series: SeriesKey::new(format!("id-{id}"), "temp"),
            kind: AlertKind::Spike,
            time_ms: 0,
            window_start_ms: 0,
            value: 1.0,
            score: AnomalyScore {
                z: 5.5,
                baseline_mean: 0.0,
                baseline_stddev: 0.2,
                p_value: 1e-8,
                severity: Severity::Critical,
            },
            unit: "".into(),
        })
    } else {
        Record::DeadLetter(DeadLetter::new(
            Source::Mqtt,
            format!("id-{id}"),
            vec![b'p'; payload_bytes],
            DeadLetterReason::Malformed,
            "crash test",
            0,
        ))
    }
}

fn id_of(record: &Record) -> u64 {
    let text = match record {
        Record::DeadLetter(d) => d.origin.as_str(),
        Record::Alert(a) => &*a.series.device,
        Record::Window(w) => &w.series.device,
    };
    text.trim_start_matches("id-")
        .parse()
        .expect("test record id")
}

fn reading(id: u64) -> Reading {
    Reading {
        series: SeriesKey::new("plc", "temp"),
        time_ms: id as i64,
        value: id as f64,
        unit: "".into(),
        source: Source::Modbus,
        quality: Quality::Good,
    }
}

/// Every pending record: id -> seqs it is stored under.
fn contents(store: &Store) -> BTreeMap<u64, Vec<u64>> {
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for lane in Lane::ALL {
        for e in store.outbox().peek(lane, usize::MAX, u64::MAX).unwrap() {
            out.entry(id_of(&e.record)).or_default().push(e.seq);
        }
    }
    out
}

/// Small xorshift: the tests need varied kill moments, not good randomness.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Rng(u64::from(nanos) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The child side of `appended_records_survive_sigkill`: appends, acks and
/// commits in a loop, reporting each call that returned on stdout, until killed.
#[test]
#[ignore = "the child process of appended_records_survive_sigkill, which runs it"]
fn crash_child() {
    let dir = std::env::var(CHILD_DIR_ENV)
        .unwrap_or_else(|_| panic!("{CHILD_DIR_ENV} is set by appended_records_survive_sigkill"));
    let round: u64 = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
    let (store, _) = Store::open(&dir, StoreConfig::default()).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "@@ open {}", store.outbox().next_seq()).unwrap();
    let mut rng = Rng::seeded();
    for i in 0.. {
        let base = round * 1_000_000 + i * 10;
        let n = 1 + rng.below(4);
        let records: Vec<Record> = (0..n).map(|k| record(base + k, 200)).collect();
        let seqs = store.outbox().append(records).unwrap();
        let pairs: Vec<String> = seqs
            .iter()
            .enumerate()
            .map(|(k, seq)| format!("{}:{seq}", base + k as u64))
            .collect();
        writeln!(out, "@@ appended {}", pairs.join(" ")).unwrap();

        store.journal().append(&reading(base)).unwrap();
        store.journal().commit().unwrap();
        writeln!(out, "@@ journaled {base}").unwrap();

        if i % 4 == 3 {
            let oldest = store.outbox().peek(Lane::Bulk, 2, u64::MAX).unwrap();
            let seqs: Vec<u64> = oldest.iter().map(|e| e.seq).collect();
            let list: Vec<String> = seqs.iter().map(u64::to_string).collect();
            writeln!(out, "@@ acking {}", list.join(" ")).unwrap();
            out.flush().unwrap();
            store.outbox().ack(&seqs).unwrap();
            writeln!(out, "@@ acked {}", list.join(" ")).unwrap();
        }
        out.flush().unwrap();
    }
}

#[derive(Default)]
struct Reported {
    /// id -> seq, for every append that returned.
    appended: BTreeMap<u64, u64>,
    journaled: BTreeSet<u64>,
    /// Acks that may or may not have happened (killed in between).
    acking: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    max_seq: u64,
}

fn parse_child_output(text: &str, into: &mut Reported) {
    // Only complete lines: the kill may cut the last one.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    // The test harness prints its own lines too.
    // The harness prints "test crash_child ... " before the first line.
    for line in complete
        .lines()
        .filter_map(|l| l.split_once("@@ ").map(|(_, rest)| rest))
    {
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        let nums = || rest.split_whitespace();
        match tag {
            "open" => {}
            "appended" => {
                for pair in nums() {
                    let (id, seq) = pair.split_once(':').unwrap();
                    let seq: u64 = seq.parse().unwrap();
                    into.appended.insert(id.parse().unwrap(), seq);
                    into.max_seq = into.max_seq.max(seq);
                }
            }
            "journaled" => {
                into.journaled.insert(rest.parse().unwrap());
            }
            "acking" => into
                .acking
                .extend(nums().map(|s| s.parse::<u64>().unwrap())),
            "acked" => into.acked.extend(nums().map(|s| s.parse::<u64>().unwrap())),
            other => panic!("unexpected child output line {other:?}"),
        }
    }
}

#[test]
fn appended_records_survive_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::seeded();
    let mut reported = Reported::default();
    let rounds = 8;
    for round in 1..=rounds {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("re-executing the test binary as the crash child");
        let stdout = child.stdout.take().unwrap();
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("@@ open") {
                    let _ = opened_tx.send(());
                }
                text.push_str(&line);
                line.clear();
            }
            text
        });
        // Kill at a random moment after the child opened the store.
        let opened = opened_rx.recv_timeout(Duration::from_secs(60));
        if opened.is_ok() {
            std::thread::sleep(Duration::from_millis(20 + rng.below(500)));
        }
        child.kill().expect("SIGKILL the child");
        child.wait().unwrap();
        let text = reader.join().unwrap();
        assert!(
            opened.is_ok(),
            "round {round}: the child did not open the store in 60 s; it wrote {} bytes",
            text.len()
        );
        parse_child_output(&text, &mut reported);

        let (store, report) = Store::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(
            report.quarantined, None,
            "a kill must not damage the store: {report:?}"
        );
        assert_eq!(
            (report.corrupt_records, report.lost_appends),
            (0, 0),
            "{report:?}"
        );
        let found = contents(&store);
        for (id, seqs) in &found {
            assert_eq!(seqs.len(), 1, "record {id} stored twice: {seqs:?}");
            assert_eq!(
                reported.appended.get(id).copied().unwrap_or(seqs[0]),
                seqs[0],
                "record {id} under another seq"
            );
        }
        for (id, seq) in &reported.appended {
            if reported.acked.contains(seq) {
                assert!(
                    !found.contains_key(id),
                    "acked record {id} (seq {seq}) came back"
                );
            } else if !reported.acking.contains(seq) {
                assert!(
                    found.contains_key(id),
                    "record {id} (seq {seq}) was appended and is lost"
                );
            }
        }
        assert!(
            store.outbox().next_seq() > reported.max_seq,
            "next seq {} would reuse {}",
            store.outbox().next_seq(),
            reported.max_seq
        );
        let replay = store.journal().replay().unwrap();
        let mut replayed = BTreeMap::new();
        for r in &replay.readings {
            *replayed.entry(r.time_ms as u64).or_insert(0) += 1;
        }
        for id in &reported.journaled {
            assert_eq!(
                replayed.get(id),
                Some(&1),
                "journaled reading {id} not replayed once"
            );
        }
        assert!(replayed.values().all(|&n| n == 1));
    }
    eprintln!(
        "{rounds} kills: {} records appended, {} acked, {} readings journaled",
        reported.appended.len(),
        reported.acked.len(),
        reported.journaled.len()
    );
    assert!(
        reported.appended.len() > 20,
        "the children appended too little to test anything: {}",
        reported.appended.len()
    );
}

/// Writes 60 records in 12 appends and 30 journaled readings; returns id -> seq.
fn populate(dir: &Path) -> BTreeMap<u64, u64> {
    let (store, _) = Store::open(dir, StoreConfig::default()).unwrap();
    let mut written = BTreeMap::new();
    for batch in 0..12u64 {
        let ids: Vec<u64> = (0..5).map(|k| batch * 5 + k).collect();
        let seqs = store
            .outbox()
            .append(ids.iter().map(|&id| record(id, 300)).collect())
            .unwrap();
        written.extend(ids.into_iter().zip(seqs));
        for k in 0..3 {
            store.journal().append(&reading(batch * 5 + k)).unwrap();
        }
        store.journal().commit().unwrap();
    }
    written
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "lock") {
                out.push(path);
            }
        }
    }
    out
}

/// The most recently written non-empty file of the database.
fn newest_file(dir: &Path) -> PathBuf {
    files_under(&dir.join("db"))
        .into_iter()
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("the database has files")
}

/// Length of a file without its trailing zero bytes (fjall preallocates
/// journal files): the damage must hit data.
fn data_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// The biggest file: with this little data, the fjall journal holding the records.
fn biggest_file(dir: &Path) -> PathBuf {
    files_under(&dir.join("db"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("the database has files")
}

/// Opens after damage and checks what every damaged store must satisfy:
/// it opens, nothing comes back wrong or twice, what is missing is explained
/// by the report (or by a torn tail, which the engine discards silently),
/// and a new append works with a seq above all old ones.
fn reopen_after_damage(dir: &Path, written: &BTreeMap<u64, u64>) -> (RecoveryReport, usize) {
    let (store, report) = Store::open(dir, StoreConfig::default())
        .unwrap_or_else(|e| panic!("a damaged store must open: {e}"));
    let found = contents(&store);
    for (id, seqs) in &found {
        assert_eq!(seqs.len(), 1);
        assert_eq!(
            written.get(id),
            Some(&seqs[0]),
            "record {id} came back wrong"
        );
    }
    let lost = written.len() - found.len();
    let max_old = written.values().max().copied().unwrap();
    let seqs = store.outbox().append(vec![record(10_000, 10)]).unwrap();
    assert!(
        seqs[0] > max_old,
        "seq {} reused (old max {max_old})",
        seqs[0]
    );
    store.journal().append(&reading(10_000)).unwrap();
    store.journal().commit().unwrap();
    drop(store);
    // And it stays healthy.
    let (_, again) = Store::open(dir, StoreConfig::default()).unwrap();
    assert_eq!(again.quarantined, None, "damage reported twice: {again:?}");
    (report, lost)
}

#[test]
fn truncated_newest_file_opens_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let written = populate(dir.path());
    let victim = newest_file(dir.path());
    let len = data_len(&victim);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let (report, lost) = reopen_after_damage(dir.path(), &written);
    eprintln!(
        "truncate {} from {len} to {}: lost {lost}, {report:?}",
        victim.display(),
        len / 2
    );
    assert!(
        lost as u64 <= report.lost_appends || report.quarantined.is_some(),
        "records lost without a report: lost {lost}, {report:?}"
    );
}

#[test]
fn flipped_bytes_open_and_are_quarantined_or_counted() {
    let dir = tempfile::tempdir().unwrap();
    let written = populate(dir.path());
    let victim = biggest_file(dir.path());
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = (data_len(&victim) / 3) as usize;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, &bytes).unwrap();
    let (report, lost) = reopen_after_damage(dir.path(), &written);
    eprintln!("flip {}: lost {lost}, {report:?}", victim.display());
    assert!(
        report.quarantined.is_some()
            || report.corrupt_records > 0
            || lost as u64 <= report.lost_appends,
        "records lost without a report: lost {lost}, {report:?}"
    );
}

#[test]
fn deleted_file_opens_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let written = populate(dir.path());
    let victim = biggest_file(dir.path());
    std::fs::remove_file(&victim).unwrap();
    let (report, lost) = reopen_after_damage(dir.path(), &written);
    eprintln!("delete {}: lost {lost}, {report:?}", victim.display());
    assert!(
        lost == 0
            || report.quarantined.is_some()
            || report.state_lost
            || lost as u64 <= report.lost_appends,
        "records lost without a report: lost {lost}, {report:?}"
    );
}

#[test]
fn every_file_emptied_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let written = populate(dir.path());
    for f in files_under(&dir.path().join("db")) {
        std::fs::write(&f, b"").unwrap();
    }
    let (report, lost) = reopen_after_damage(dir.path(), &written);
    let q = report
        .quarantined
        .expect("an emptied database is quarantined");
    assert!(q.path.starts_with(dir.path().join("quarantine")), "{q:?}");
    assert!(q.path.join("db").exists() || !files_under(&q.path).is_empty());
    assert_eq!(lost, written.len());
}

#[test]
fn losing_database_and_lease_restarts_seq_from_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let written = populate(dir.path());
    for f in files_under(&dir.path().join("db")) {
        std::fs::write(&f, b"garbage").unwrap();
    }
    std::fs::remove_file(dir.path().join("seq-lease")).unwrap();
    let (report, _) = reopen_after_damage(dir.path(), &written);
    assert!(
        report.quarantined.is_some() && report.seq_from_clock,
        "{report:?}"
    );
}

#[test]
fn repeatedly_unfinished_opens_quarantine_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let written = populate(dir.path());
    // As if three opens in a row had aborted inside the engine.
    std::fs::write(dir.path().join("opening"), b"3").unwrap();
    let (report, lost) = reopen_after_damage(dir.path(), &written);
    assert_eq!(report.unfinished_opens, 3);
    let q = report
        .quarantined
        .expect("quarantined after 3 unfinished opens");
    assert!(q.reason.contains("did not finish"), "{q:?}");
    assert_eq!(lost, written.len());
    // Two unfinished opens are tolerated.
    std::fs::write(dir.path().join("opening"), b"2").unwrap();
    let (_, report) = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!((report.unfinished_opens, report.quarantined), (2, None));
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount(8)");
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed ({status}): this test needs root (CAP_SYS_ADMIN) to simulate a full disk"
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_is_an_error_not_a_panic() {
    let fs = Tmpfs::mount("4m");
    let dir = fs.dir.path().join("store");
    let config = StoreConfig {
        outbox: OutboxConfig {
            max_bytes: 1 << 30,
            ..OutboxConfig::default()
        },
        ..StoreConfig::default()
    };
    let (store, _) = Store::open(&dir, config.clone()).expect("opening on an empty 4 MiB tmpfs");
    let mut appended = BTreeMap::new();
    let mut error = None;
    for id in 0..10_000u64 {
        match store.outbox().append(vec![record(id * 10 + 1, 20_000)]) {
            Ok(seqs) => {
                appended.insert(id * 10 + 1, seqs[0]);
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("4 MiB filled up without an error");
    eprintln!("after {} appends: {error}", appended.len());
    // The write that hits the limit may be a background flush of the engine:
    // then the append sees the database already refusing writes.
    assert!(
        matches!(error, StoreError::DiskFull { .. } | StoreError::Poisoned),
        "{error:?}"
    );
    assert!(error.is_transient());
    // Later writes fail cleanly too, until the store is reopened.
    let again = store.outbox().append(vec![record(1, 10)]).unwrap_err();
    assert!(
        matches!(again, StoreError::Poisoned | StoreError::DiskFull { .. }),
        "{again:?}"
    );
    drop(store);
    // Reopening on the still-full disk either fails with an error or opens;
    // it never panics, and what was acknowledged as durable is there.
    match Store::open(&dir, config) {
        Ok((store, report)) => {
            assert_eq!(
                report.quarantined, None,
                "a full disk is not damage: {report:?}"
            );
            let found = contents(&store);
            for (id, seq) in &appended {
                assert_eq!(found.get(id), Some(&vec![*seq]), "record {id} lost");
            }
        }
        Err(e) => {
            eprintln!("reopen on a full disk: {e}");
            assert!(e.is_transient(), "{e:?}");
        }
    }
}
