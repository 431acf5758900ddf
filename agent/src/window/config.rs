//! Window engine configuration: the raw serde form with its defaults, and its checks.

use serde::Deserialize;
use std::time::Duration;

/// The `[window]` section of the agent configuration.
///
/// ```toml
/// [window]
/// width = "5s"
/// allowed-lateness = "2s"
/// idle-timeout = "5s"
/// max-series = 10000
/// series-ttl = "10m"
/// max-ahead = "10m"
/// max-behind = "7d"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct WindowConfig {
    /// Width of the tumbling windows. Windows are aligned to multiples of the
    /// width from the Unix epoch, so every gateway cuts the same windows.
    /// Whole milliseconds, at most one day, and a divisor of one day.
    #[serde(with = "humantime_serde")]
    pub width: Duration,
    /// How far behind the greatest event time seen for a series a reading may
    /// be and still count: the watermark is `max event time − allowed-lateness`.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Wall-clock time without an accepted reading after which a series' open
    /// windows are closed by `tick`, so an alert never waits for the next reading.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Cap on live series; a reading for a new series beyond it is dead-lettered
    /// with the reason `series-cap`.
    pub max_series: usize,
    /// Wall-clock time without any reading after which a series is evicted and
    /// its state freed.
    #[serde(with = "humantime_serde")]
    pub series_ttl: Duration,
    /// A reading stamped further than this after the gateway's clock is a
    /// `clock-skew` dead letter (a device clock running ahead, a bad RTC).
    #[serde(with = "humantime_serde")]
    pub max_ahead: Duration,
    /// A reading stamped further than this before the gateway's clock is a
    /// `clock-skew` dead letter. Keep it above the longest outage the
    /// devices buffer through.
    #[serde(with = "humantime_serde")]
    pub max_behind: Duration,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            width: Duration::from_secs(5),
            allowed_lateness: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_series: 10_000,
            series_ttl: Duration::from_secs(10 * 60),
            max_ahead: Duration::from_secs(10 * 60),
            max_behind: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A configuration value that cannot work; `key` is the kebab-case key name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: &'static str, reason: impl Into<String>) -> Self {
        Self {
            key,
            reason: reason.into(),
        }
    }
}

const DAY_MS: u128 = 86_400_000;

impl WindowConfig {
    /// Checks every key; the error names the first key that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let width_ms = whole_ms("width", self.width)?;
        if width_ms == 0 {
            return Err(ConfigError::new("width", "must be greater than zero"));
        }
        if width_ms > DAY_MS || DAY_MS % width_ms != 0 {
            return Err(ConfigError::new(
                "width",
                format!(
                    "must divide one day (86400000 ms) so window edges fall on the same \
                     wall-clock instants every day; got {width_ms} ms"
                ),
            ));
        }
        let lateness_ms = whole_ms("allowed-lateness", self.allowed_lateness)?;
        if lateness_ms > DAY_MS {
            return Err(ConfigError::new(
                "allowed-lateness",
                "must be at most one day",
            ));
        }
        let idle_ms = whole_ms("idle-timeout", self.idle_timeout)?;
        if idle_ms == 0 {
            return Err(ConfigError::new(
                "idle-timeout",
                "must be greater than zero",
            ));
        }
        if self.max_series == 0 {
            return Err(ConfigError::new("max-series", "must be at least 1"));
        }
        let ttl_ms = whole_ms("series-ttl", self.series_ttl)?;
        if ttl_ms < idle_ms || ttl_ms < width_ms + lateness_ms {
            return Err(ConfigError::new(
                "series-ttl",
                format!(
                    "must be at least idle-timeout ({idle_ms} ms) and width + allowed-lateness \
                     ({} ms), or series would be evicted with windows still open; got {ttl_ms} ms",
                    width_ms + lateness_ms
                ),
            ));
        }
        let ahead_ms = whole_ms("max-ahead", self.max_ahead)?;
        if ahead_ms < 1_000 {
            return Err(ConfigError::new(
                "max-ahead",
                "must be at least 1s: device and gateway clocks are never exactly equal",
            ));
        }
        let behind_ms = whole_ms("max-behind", self.max_behind)?;
        if behind_ms < width_ms + lateness_ms {
            return Err(ConfigError::new(
                "max-behind",
                format!(
                    "must be at least width + allowed-lateness ({} ms), or readings for open \
                     windows would be refused; got {behind_ms} ms",
                    width_ms + lateness_ms
                ),
            ));
        }
        Ok(())
    }

    /// Window width in milliseconds (valid after [`validate`](Self::validate)).
    pub fn width_ms(&self) -> i64 {
        duration_ms(self.width)
    }
}

fn whole_ms(key: &'static str, d: Duration) -> Result<u128, ConfigError> {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(ConfigError::new(
            key,
            "must be a whole number of milliseconds",
        ));
    }
    Ok(d.as_millis())
}

/// A duration in milliseconds, saturating at `i64::MAX`.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
