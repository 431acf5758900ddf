//! A clock for the engine's timers that a stepped wall clock cannot fool.
//!
//! Idle close, series TTL and the redelivery horizon measure how much time
//! has passed. Measured on the raw wall clock, an NTP step of an hour closes
//! every open window at once, and an RTC that comes back at 1970 stops every
//! timer for 56 years. [`SteadyClock`] is fed the wall clock on every call and
//! advances by the difference between two observations, except that a step
//! back does not move it and a step forward of more than [`MAX_STEP_MS`]
//! counts as a jump, not as time that passed: the timers carry on from where
//! they were, at the pace of the new wall clock.
//!
//! The engine observes the wall clock many times a second (every reading and
//! a tick every 250 ms), so a real gap of more than a minute only happens
//! when the process was stopped; its timers then resume rather than fire all
//! at once, which is the behaviour a stopped process should have anyway.

use millrace_protocol::UnixMs;

/// A forward step larger than this between two observations is a clock jump.
pub const MAX_STEP_MS: i64 = 60_000;

/// Monotonic milliseconds derived from wall-clock observations.
#[derive(Debug, Clone, Default)]
pub struct SteadyClock {
    /// The last wall-clock value observed; `None` before the first.
    last_wall_ms: Option<UnixMs>,
    steady_ms: i64,
    /// Steps back and jumps forward seen, for `/metrics`.
    jumps: u64,
}

impl SteadyClock {
    /// Observes the wall clock and returns the steady time. The first
    /// observation starts the steady clock at that wall-clock value.
    #[inline]
    pub fn observe(&mut self, wall_ms: UnixMs) -> i64 {
        let Some(last) = self.last_wall_ms else {
            self.last_wall_ms = Some(wall_ms);
            self.steady_ms = wall_ms;
            return wall_ms;
        };
        if wall_ms == last {
            return self.steady_ms;
        }
        let step = wall_ms.saturating_sub(last);
        self.last_wall_ms = Some(wall_ms);
        if (0..=MAX_STEP_MS).contains(&step) {
            self.steady_ms = self.steady_ms.saturating_add(step);
        } else {
            self.jumped(step, wall_ms);
        }
        self.steady_ms
    }

    /// A step the timers do not follow: counted and logged. Kept out of
    /// [`observe`](Self::observe), which runs for every reading and is
    /// inlined there.
    #[cold]
    #[inline(never)]
    fn jumped(&mut self, step: i64, wall_ms: UnixMs) {
        self.jumps += 1;
        tracing::warn!(
            step_ms = step,
            wall_ms,
            "the gateway clock jumped; window and redelivery timers carry on from where they were"
        );
    }

    /// The steady time of the last observation.
    pub fn steady_ms(&self) -> i64 {
        self.steady_ms
    }

    /// Clock jumps seen (a step back, or forward by more than [`MAX_STEP_MS`]).
    pub fn jumps(&self) -> u64 {
        self.jumps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_wall_clock_while_it_runs_normally() {
        let mut c = SteadyClock::default();
        assert_eq!(c.observe(1_000), 1_000);
        assert_eq!(c.observe(1_250), 1_250);
        assert_eq!(c.observe(61_250), 61_250);
        assert_eq!(c.jumps(), 0);
    }

    #[test]
    fn a_step_back_or_a_jump_forward_does_not_move_it() {
        let mut c = SteadyClock::default();
        c.observe(1_700_000_000_000);
        c.observe(1_700_000_001_000);
        // RTC reset to 1970: the timers hold, then advance with the new clock.
        assert_eq!(c.observe(5_000), 1_700_000_001_000);
        assert_eq!(c.observe(6_000), 1_700_000_002_000);
        // NTP steps an hour forward.
        assert_eq!(c.observe(6_000 + 3_600_000), 1_700_000_002_000);
        assert_eq!(c.observe(7_000 + 3_600_000), 1_700_000_003_000);
        assert_eq!(c.jumps(), 2);
    }
}
