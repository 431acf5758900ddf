//! Anomaly scorer configuration: the raw serde form with its defaults, and its checks.

use millrace_protocol::Severity;
use serde::Deserialize;

pub use crate::window::ConfigError;

/// The `[anomaly]` section of the agent configuration.
///
/// ```toml
/// [anomaly]
/// history = 12
/// warm-up = 6
/// warning-z = 3.0
/// critical-z = 5.0
/// sigma-floor = 1e-9
/// sigma-floor-relative = 1e-3
/// spike-alerts = true
/// spike-min-severity = "critical"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AnomalyConfig {
    /// N: the baseline is the mean and stddev of the last N closed window
    /// means of the series (12 × 5 s windows = one minute).
    pub history: usize,
    /// Windows a series must have closed before any score is given.
    pub warm_up: usize,
    /// |z| at or above this is a warning.
    pub warning_z: f64,
    /// |z| at or above this is critical.
    pub critical_z: f64,
    /// Absolute lower bound on the σ used to divide, in the series' unit.
    pub sigma_floor: f64,
    /// Lower bound on σ relative to the baseline mean: `sigma-floor-relative × |μ|`.
    /// The floor used is the larger of the two; it keeps a stuck sensor or a
    /// perfectly constant series from dividing by zero or alarming on float noise.
    pub sigma_floor_relative: f64,
    /// Check every reading against the baseline and raise a spike alert before
    /// its window closes (at most one per series and window).
    pub spike_alerts: bool,
    /// Lowest severity that raises a spike alert: `"critical"` (default) or `"warning"`.
    pub spike_min_severity: Severity,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            history: 12,
            warm_up: 6,
            warning_z: 3.0,
            critical_z: 5.0,
            sigma_floor: 1e-9,
            sigma_floor_relative: 1e-3,
            spike_alerts: true,
            spike_min_severity: Severity::Critical,
        }
    }
}

/// Longest history accepted; the baseline is recomputed over it on every window.
const MAX_HISTORY: usize = 1_000;

impl AnomalyConfig {
    /// Checks every key; the error names the first key that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(2..=MAX_HISTORY).contains(&self.history) {
            return Err(ConfigError::new(
                "history",
                format!("must be between 2 and {MAX_HISTORY} windows"),
            ));
        }
        if self.warm_up < 2 || self.warm_up > self.history {
            return Err(ConfigError::new(
                "warm-up",
                format!(
                    "must be at least 2 (a stddev needs two windows) and at most history ({})",
                    self.history
                ),
            ));
        }
        if !(self.warning_z.is_finite() && self.warning_z > 0.0) {
            return Err(ConfigError::new("warning-z", "must be a finite number > 0"));
        }
        if !(self.critical_z.is_finite() && self.critical_z > self.warning_z) {
            return Err(ConfigError::new(
                "critical-z",
                format!(
                    "must be finite and greater than warning-z ({})",
                    self.warning_z
                ),
            ));
        }
        if !(self.sigma_floor.is_finite() && self.sigma_floor > 0.0) {
            return Err(ConfigError::new(
                "sigma-floor",
                "must be a finite number > 0",
            ));
        }
        if !(self.sigma_floor_relative.is_finite() && self.sigma_floor_relative >= 0.0) {
            return Err(ConfigError::new(
                "sigma-floor-relative",
                "must be a finite number >= 0",
            ));
        }
        if self.spike_min_severity == Severity::Normal {
            return Err(ConfigError::new(
                "spike-min-severity",
                "must be \"warning\" or \"critical\"",
            ));
        }
        Ok(())
    }
}
