//! Store configuration: the `[outbox]` and `[journal]` tables of the agent
//! config. Defaults live here, in one place; `validate` names the bad key.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// What an append does when the outbox byte cap would be exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Delete the oldest bulk records (windows, dead letters) first, then the
    /// oldest alerts, until the new records fit. Every drop is counted.
    #[default]
    DropOldest,
    /// Refuse the append with [`StoreError::Full`](super::StoreError::Full):
    /// the pipeline stops ingest, so the MQTT source stops acknowledging and
    /// the broker holds the data.
    Block,
}

impl WhenFull {
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::DropOldest => "drop-oldest",
            WhenFull::Block => "block",
        }
    }
}

/// `[outbox]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct OutboxConfig {
    /// Cap on the pending records, counted as key + stored value bytes
    /// (`"256MiB"`). The files on disk are larger by the fjall journal and
    /// compaction overhead.
    #[serde(deserialize_with = "de_byte_size")]
    pub max_bytes: u64,
    /// Records older than this (by append time) are expired and counted (`"7d"`).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Overflow policy when `max-bytes` is reached.
    pub when_full: WhenFull,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            when_full: WhenFull::DropOldest,
        }
    }
}

/// `[journal]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct JournalConfig {
    /// The pipeline commits at least this often while readings are pending (`"100ms"`).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// ... or as soon as this many readings are pending (`1000`).
    pub commit_readings: usize,
    /// Journaled readings older than this (by journal time) are deleted by
    /// `reclaim` even if no window mark covers them (`"1h"`): a window lives
    /// for its width plus the allowed lateness or the idle timeout, so an entry
    /// this old can only belong to a series the window engine refused (series
    /// cap) or forgot (TTL).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(100),
            commit_readings: 1000,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// `[outbox]` and `[journal]` together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StoreConfig {
    pub outbox: OutboxConfig,
    pub journal: JournalConfig,
}

/// A config value out of range; `key` is the dotted TOML key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{key}`: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl StoreConfig {
    /// Uncommitted readings the journal buffers before `append` refuses more
    /// (a bounded buffer; the pipeline commits long before).
    pub(crate) fn journal_buffer_cap(&self) -> usize {
        self.journal.commit_readings.saturating_mul(8).max(64)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.outbox.max_bytes < 64 * 1024 {
            return bad("outbox.max-bytes", "must be at least 64KiB");
        }
        if self.outbox.max_age.is_zero() {
            return bad("outbox.max-age", "must be greater than zero");
        }
        if self.journal.commit_interval.is_zero() {
            return bad("journal.commit-interval", "must be greater than zero");
        }
        if self.journal.commit_readings == 0 {
            return bad("journal.commit-readings", "must be at least 1");
        }
        if self.journal.max_age < Duration::from_secs(60) {
            return bad(
                "journal.max-age",
                "must be at least 1m (windows must be able to close first)",
            );
        }
        Ok(())
    }
}

/// Parses `"256MiB"`, `"64 kB"`, `"1GiB"`, `"1048576"`. Binary (KiB, MiB, GiB)
/// and decimal (kB, MB, GB) units; a bare number is bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size like \"256MiB\""))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}` (use B, KiB, MiB, GiB, kB, MB, GB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
}

fn de_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bytes(n) => Ok(n),
        Raw::Text(t) => parse_byte_size(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_byte_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_byte_size("64 kB").unwrap(), 64_000);
        assert_eq!(parse_byte_size("17").unwrap(), 17);
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("MiB").is_err());
        assert!(parse_byte_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn toml_with_defaults_and_unknown_keys() {
        let cfg: StoreConfig = toml::from_str(
            "[outbox]\nmax-bytes = \"1MiB\"\nwhen-full = \"block\"\n[journal]\ncommit-interval = \"50ms\"\n",
        )
        .unwrap();
        assert_eq!(cfg.outbox.max_bytes, 1 << 20);
        assert_eq!(cfg.outbox.when_full, WhenFull::Block);
        assert_eq!(cfg.outbox.max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(cfg.journal.commit_interval, Duration::from_millis(50));
        assert_eq!(cfg.journal.commit_readings, 1000);
        cfg.validate().unwrap();

        let err = toml::from_str::<StoreConfig>("[outbox]\nmax-byte = 5\n").unwrap_err();
        assert!(err.to_string().contains("max-byte"), "{err}");
    }

    #[test]
    fn validate_names_the_key() {
        let mut cfg = StoreConfig::default();
        cfg.journal.commit_readings = 0;
        assert_eq!(cfg.validate().unwrap_err().key, "journal.commit-readings");
        let mut cfg = StoreConfig::default();
        cfg.outbox.max_bytes = 10;
        assert_eq!(cfg.validate().unwrap_err().key, "outbox.max-bytes");
    }
}
