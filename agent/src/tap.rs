//! The tap: every window, alert and dead letter the agent produces, written as
//! one JSON object per line, for operators (`--tap -`) and for tests.
//!
//! Each line carries a `type` field (`window`, `alert`, `dead-letter`) and the
//! record's own fields, e.g.
//! `{"type":"window","agent":"gw-1","series":{"device":"press-1","sensor":"temperature"},...}`.
//! It is not a durable store: the outbox is. A tap that cannot be written (a
//! closed pipe, a full disk) is reported once and then disabled; it never
//! stops the pipeline.

use millrace_protocol::{Alert, DeadLetter, Record, Window};
use serde::Serialize;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::Path;

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum TapLine<'a> {
    Window(&'a Window),
    Alert(&'a Alert),
    DeadLetter(&'a DeadLetter),
}

impl<'a> From<&'a Record> for TapLine<'a> {
    fn from(r: &'a Record) -> Self {
        match r {
            Record::Window(w) => TapLine::Window(w),
            Record::Alert(a) => TapLine::Alert(a),
            Record::DeadLetter(d) => TapLine::DeadLetter(d),
        }
    }
}

/// A JSON-lines writer for records.
pub struct Tap {
    out: Option<BufWriter<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("open", &self.out.is_some())
            .finish()
    }
}

impl Tap {
    /// Opens a tap: `-` is standard output, anything else a file (appended to).
    pub fn open(path: &Path) -> io::Result<Self> {
        let w: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            Box::new(OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(Self::from_writer(w))
    }

    pub fn from_writer(w: Box<dyn Write + Send>) -> Self {
        Self {
            out: Some(BufWriter::new(w)),
        }
    }

    /// Writes the records and flushes, so a reader sees whole lines promptly.
    pub fn write(&mut self, records: &[Record]) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let result = records
            .iter()
            .try_for_each(|r| {
                serde_json::to_writer(&mut *out, &TapLine::from(r)).map_err(io::Error::from)?;
                out.write_all(b"\n")
            })
            .and_then(|()| out.flush());
        if let Err(error) = result {
            tracing::warn!(%error, "tap write failed; tap disabled");
            self.out = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_protocol::{DeadLetterReason, Source};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn dl() -> Record {
        Record::DeadLetter(DeadLetter::new(
            Source::Mqtt,
            "plant/x",
            b"{bad".to_vec(),
            DeadLetterReason::Malformed,
            "eof",
            5,
        ))
    }

    #[test]
    fn one_tagged_json_object_per_line() {
        let buf = Shared::default();
        let mut tap = Tap::from_writer(Box::new(buf.clone()));
        tap.write(&[dl(), dl()]);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["type"], "dead-letter");
        assert_eq!(v["reason"], "malformed");
        assert_eq!(v["input"], "{bad");
    }

    #[test]
    fn a_broken_tap_is_disabled_not_fatal() {
        let mut tap = Tap::from_writer(Box::new(Broken));
        tap.write(&[dl()]);
        tap.write(&[dl()]);
        assert!(tap.out.is_none());
    }
}
