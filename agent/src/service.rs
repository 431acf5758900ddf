//! systemd integration: `READY=1` once the pipeline runs, `WATCHDOG=1` pings
//! driven by the pipeline's own heartbeat, `STOPPING=1` on shutdown.
//!
//! The watchdog pings only while the pipeline loop is alive: the loop stamps
//! a [`Heartbeat`] on every turn (at least every 50 ms, its tick), and the
//! pinger skips a ping when the last stamp is older than half the watchdog
//! interval. A wedged pipeline therefore stops pinging and systemd restarts
//! the agent (`WatchdogSec=` with `Restart=always`). Outside systemd (no
//! `NOTIFY_SOCKET`) every call here does nothing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The pipeline's liveness stamp (wall-clock Unix ms of its last turn).
#[derive(Debug, Clone, Default)]
pub struct Heartbeat(Arc<AtomicI64>);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(crate::ingest::now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let last = self.0.load(Ordering::Relaxed);
        let age_ms = crate::ingest::now_ms().saturating_sub(last).max(0);
        Duration::from_millis(age_ms as u64)
    }
}

/// Tells systemd the agent is up (`Type=notify`).
pub fn ready(status: &str) {
    if let Err(error) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]) {
        tracing::warn!(%error, "sd_notify READY failed");
    }
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Pings the systemd watchdog while `heartbeat` is fresh, until `shutdown`.
/// Returns at once when no watchdog is configured.
pub async fn watchdog(heartbeat: Heartbeat, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = interval / 2;
    tracing::info!(
        watchdog_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut warned = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        if should_ping(&heartbeat, period) {
            warned = false;
            if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                tracing::warn!(%error, "sd_notify WATCHDOG failed");
            }
        } else if !warned {
            warned = true;
            tracing::error!(
                stalled_ms = heartbeat.age().as_millis() as u64,
                "pipeline stalled; withholding watchdog pings"
            );
        }
    }
}

fn should_ping(heartbeat: &Heartbeat, period: Duration) -> bool {
    heartbeat.age() <= period
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_heartbeat_withholds_the_ping() {
        let hb = Heartbeat::default();
        assert!(!should_ping(&hb, Duration::from_secs(5)), "never beaten");
        hb.beat();
        assert!(should_ping(&hb, Duration::from_secs(5)));
        hb.0.store(crate::ingest::now_ms() - 10_000, Ordering::Relaxed);
        assert!(!should_ping(&hb, Duration::from_secs(5)));
    }
}
