//! The `[dashboard]` table: access control and the bounds of the live state.
//!
//! ```toml
//! [dashboard]
//! enabled = true
//! # Optional access control; with neither set the dashboard is open.
//! token = "a-long-random-read-only-token"   # or MILLRACE_DASHBOARD_TOKEN
//! username = "ops"                           # HTTP basic auth, together with
//! password = "a-long-password"               # MILLRACE_DASHBOARD_PASSWORD
//! retain-windows = 720
//! retain-alerts = 1000
//! max-series = 10000
//! max-series-per-agent = 5000
//! offline-after = "30s"
//! history = "1h"
//! max-event-streams = 100
//! ```
//!
//! Closed by default: when the aggregator listens beyond loopback, the
//! dashboard refuses to start without a token or a user and password (or
//! `enabled = false`).

use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// `[dashboard]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawDashboard {
    /// Serve the page, `/api/v1/*` reads and `/metrics`. Default true.
    pub enabled: Option<bool>,
    /// Read-only bearer token (`Authorization: Bearer …` or `?access_token=`).
    /// `MILLRACE_DASHBOARD_TOKEN` in the environment wins.
    pub token: Option<String>,
    /// HTTP basic auth user; needs `password`.
    pub username: Option<String>,
    /// HTTP basic auth password; `MILLRACE_DASHBOARD_PASSWORD` wins.
    pub password: Option<String>,
    /// Windows kept per series for the chart. Default 720 (one hour of 5 s windows).
    pub retain_windows: Option<usize>,
    /// Alerts kept for the feed. Default 1000.
    pub retain_alerts: Option<usize>,
    /// Series tracked at most; windows of further series are counted, not kept.
    /// Default 10000.
    pub max_series: Option<usize>,
    /// Series tracked at most for one agent, so one gateway sending a flood
    /// of names cannot take the whole dashboard; further windows of that
    /// agent are counted, not kept (the log still has them). Default 5000,
    /// at most `max-series`.
    pub max_series_per_agent: Option<usize>,
    /// An agent with no batch for this long shows as offline. Default `30s`.
    #[serde(default, with = "humantime_serde::option")]
    pub offline_after: Option<Duration>,
    /// At start, windows and alerts appended to the log this recently are
    /// read back, so the charts and the alert feed survive a restart.
    /// `"0s"` starts empty. Default `1h`.
    #[serde(default, with = "humantime_serde::option")]
    pub history: Option<Duration>,
    /// Live event streams (browser tabs) served at once; more get `503`.
    /// Default 100.
    pub max_event_streams: Option<usize>,
}

/// Who may read the dashboard.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DashboardAuth {
    pub token: Option<String>,
    pub basic: Option<(String, String)>,
}

impl DashboardAuth {
    pub fn is_open(&self) -> bool {
        self.token.is_none() && self.basic.is_none()
    }
}

impl fmt::Debug for DashboardAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardAuth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "basic",
                &self.basic.as_ref().map(|(user, _)| (user, "<redacted>")),
            )
            .finish()
    }
}

/// The checked `[dashboard]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardConfig {
    pub enabled: bool,
    pub auth: DashboardAuth,
    pub retain_windows: usize,
    pub retain_alerts: usize,
    pub max_series: usize,
    pub max_series_per_agent: usize,
    pub offline_after: Duration,
    pub history: Duration,
    pub max_event_streams: usize,
}

pub const DEFAULT_HISTORY: Duration = Duration::from_secs(3600);
pub const DEFAULT_RETAIN_WINDOWS: usize = 720;
pub const DEFAULT_RETAIN_ALERTS: usize = 1000;
pub const DEFAULT_MAX_SERIES: usize = 10_000;
pub const DEFAULT_MAX_SERIES_PER_AGENT: usize = 5_000;
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EVENT_STREAMS: usize = 100;
pub const TOKEN_ENV: &str = "MILLRACE_DASHBOARD_TOKEN";
pub const PASSWORD_ENV: &str = "MILLRACE_DASHBOARD_PASSWORD";
const MIN_SECRET_LEN: usize = 12;

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            auth: DashboardAuth::default(),
            retain_windows: DEFAULT_RETAIN_WINDOWS,
            retain_alerts: DEFAULT_RETAIN_ALERTS,
            max_series: DEFAULT_MAX_SERIES,
            max_series_per_agent: DEFAULT_MAX_SERIES_PER_AGENT,
            offline_after: DEFAULT_OFFLINE_AFTER,
            history: DEFAULT_HISTORY,
            max_event_streams: DEFAULT_MAX_EVENT_STREAMS,
        }
    }
}

impl DashboardConfig {
    /// Checks `raw`; an error is `(key, message)` for the caller to place in its file.
    pub fn from_raw(
        raw: RawDashboard,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, (String, String)> {
        let err = |key: &str, message: &str| Err((format!("dashboard.{key}"), message.to_owned()));
        let token = env(TOKEN_ENV).or(raw.token);
        // The environment supplies the password of a configured user only.
        let password = match &raw.username {
            Some(_) => env(PASSWORD_ENV).or(raw.password),
            None => raw.password,
        };
        if let Some(token) = &token {
            if token.len() < MIN_SECRET_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return err(
                    "token",
                    "must be at least 12 printable ASCII characters without spaces",
                );
            }
        }
        let basic = match (raw.username, password) {
            (None, None) => None,
            (Some(user), Some(password)) => {
                if user.is_empty() || user.contains(':') {
                    return err("username", "must be non-empty and contain no `:`");
                }
                if password.len() < MIN_SECRET_LEN {
                    return err("password", "must be at least 12 characters");
                }
                Some((user, password))
            }
            (Some(_), None) => {
                return err(
                    "password",
                    "missing: set it with username, or in MILLRACE_DASHBOARD_PASSWORD",
                )
            }
            (None, Some(_)) => return err("username", "missing: a password needs a username"),
        };
        let retain_windows = raw.retain_windows.unwrap_or(DEFAULT_RETAIN_WINDOWS);
        if !(1..=100_000).contains(&retain_windows) {
            return err("retain-windows", "must be between 1 and 100000");
        }
        let retain_alerts = raw.retain_alerts.unwrap_or(DEFAULT_RETAIN_ALERTS);
        if !(1..=1_000_000).contains(&retain_alerts) {
            return err("retain-alerts", "must be between 1 and 1000000");
        }
        let max_series = raw.max_series.unwrap_or(DEFAULT_MAX_SERIES);
        if max_series == 0 {
            return err("max-series", "must be at least 1");
        }
        let max_series_per_agent = raw
            .max_series_per_agent
            .unwrap_or(DEFAULT_MAX_SERIES_PER_AGENT.min(max_series));
        if !(1..=max_series).contains(&max_series_per_agent) {
            return err("max-series-per-agent", "must be between 1 and max-series");
        }
        let offline_after = raw.offline_after.unwrap_or(DEFAULT_OFFLINE_AFTER);
        if offline_after < Duration::from_secs(1) {
            return err("offline-after", "must be at least 1s");
        }
        let history = raw.history.unwrap_or(DEFAULT_HISTORY);
        if history > Duration::from_secs(7 * 24 * 3600) {
            return err(
                "history",
                "at most 7d: it is read back at every start (retain-windows bounds what is kept)",
            );
        }
        let max_event_streams = raw.max_event_streams.unwrap_or(DEFAULT_MAX_EVENT_STREAMS);
        if !(1..=100_000).contains(&max_event_streams) {
            return err("max-event-streams", "must be between 1 and 100000");
        }
        Ok(Self {
            enabled: raw.enabled.unwrap_or(true),
            auth: DashboardAuth { token, basic },
            retain_windows,
            retain_alerts,
            max_series,
            max_series_per_agent,
            offline_after,
            history,
            max_event_streams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<DashboardConfig, (String, String)> {
        let raw: RawDashboard = toml::from_str(text).unwrap();
        DashboardConfig::from_raw(raw, |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn defaults_are_open_and_bounded() {
        let cfg = parse("", &[]).unwrap();
        assert_eq!(cfg, DashboardConfig::default());
        assert!(cfg.auth.is_open());
    }

    #[test]
    fn secrets_come_from_the_environment_and_are_not_printed() {
        let cfg = parse(
            "username = \"ops\"\ntoken = \"file-token-0123\"",
            &[
                (PASSWORD_ENV, "env-password-0123"),
                (TOKEN_ENV, "env-token-0123456"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.auth.token.as_deref(), Some("env-token-0123456"));
        assert_eq!(
            cfg.auth.basic,
            Some(("ops".to_owned(), "env-password-0123".to_owned()))
        );
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("env-password") && !printed.contains("env-token"));
    }

    #[test]
    fn bad_values_name_the_key() {
        assert_eq!(
            parse("token = \"short\"", &[]).unwrap_err().0,
            "dashboard.token"
        );
        assert_eq!(
            parse("username = \"ops\"", &[]).unwrap_err().0,
            "dashboard.password"
        );
        assert_eq!(
            parse("password = \"long-enough-password\"", &[])
                .unwrap_err()
                .0,
            "dashboard.username"
        );
        // A password in the environment without a configured user is not used.
        assert!(parse("", &[(PASSWORD_ENV, "env-password-0123")])
            .unwrap()
            .auth
            .is_open());
        assert_eq!(
            parse("retain-windows = 0", &[]).unwrap_err().0,
            "dashboard.retain-windows"
        );
        assert_eq!(
            parse("offline-after = \"10ms\"", &[]).unwrap_err().0,
            "dashboard.offline-after"
        );
    }
}
