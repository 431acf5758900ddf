//! `millrace-aggregator tail`: print the records of an embedded-log topic.
//!
//! What it is: a read-only consumer of the embedded log ([`crate::log::local`])
//! printing one JSON object per line:
//! `{"topic", "offset", "append_time_ms", "key", "headers": {..}, "value"}`,
//! where `value` is the record's JSON when it is JSON, a string otherwise.
//! It is safe to run next to the aggregator that writes the log.
//!
//! What it is not: a Kafka consumer; with Kafka configured, use any Kafka tool.

use crate::log::local::{LocalLogError, StoredRecord, TopicReader};
use serde_json::{json, Map, Value};
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Where `tail` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Beginning,
    /// The current end: only records appended from now on.
    End,
    Offset(u64),
}

#[derive(Debug, Clone)]
pub struct TailOptions {
    pub log_dir: PathBuf,
    pub topic: String,
    pub start: StartAt,
    /// Keep waiting for new records instead of stopping at the end.
    pub follow: bool,
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Log(#[from] LocalLogError),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// The JSON line printed for `record`.
pub fn record_json(topic: &str, record: &StoredRecord) -> Value {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(text(value))))
        .collect();
    let value = serde_json::from_slice::<Value>(&record.value)
        .unwrap_or_else(|_| Value::String(text(&record.value)));
    json!({
        "topic": topic,
        "offset": record.offset,
        "append_time_ms": record.append_time_ms,
        "key": text(&record.key),
        "headers": headers,
        "value": value,
    })
}

/// Prints records to `out` until the end (or forever with `follow`).
/// Returns the number printed; a closed output (broken pipe) ends quietly.
pub fn tail(options: &TailOptions, out: &mut impl Write) -> Result<u64, TailError> {
    let reader = TopicReader::open(&options.log_dir, &options.topic)?;
    let from = match options.start {
        StartAt::Beginning => 0,
        StartAt::End => reader.end_offset()?,
        StartAt::Offset(offset) => offset,
    };
    let mut cursor = reader.cursor(from)?;
    let mut printed = 0u64;
    loop {
        while let Some(record) = cursor.next_record()? {
            let line = record_json(&options.topic, &record);
            let written = serde_json::to_writer(&mut *out, &line)
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            match written {
                Ok(()) => printed += 1,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(printed),
                Err(e) => return Err(e.into()),
            }
        }
        match out.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(printed),
            Err(e) => return Err(e.into()),
        }
        if !options.follow {
            return Ok(printed);
        }
        std::thread::sleep(options.poll_interval);
    }
}
