//! `max_concurrent = "auto"`: learn the account's concurrency limit from the upstream's answers.
//!
//! The limit starts at 1. A request records its *level* when admitted: how many requests of
//! the class were in flight with it (itself included). The highest level that completed
//! without a 429 is the *accepted* level. After [`RAISE_AFTER`] completions in a row with the
//! class saturated (others were queued for a slot when it ended: demand above the limit) and
//! no 429, and once the current limit has itself been reached without a 429, the limit rises
//! by one: the next request at the new level is a probe. A 429 sets the limit to the
//! level below the throttled request (never below 1). A 429 above the accepted level answered
//! a probe: the caller resends at once, and the next probe waits twice as long. A 429 at or
//! below the accepted level means the account is busier than we knew (another app, or the
//! account's limit fell): the accepted level falls with the limit, and the class pauses as for
//! any 429.
//!
//! The upstream refuses whichever request arrives over its limit, not necessarily the one
//! above the accepted level: while a probe is in flight, a 429 to any request of the class is
//! the probe's answer (resent at once, the limit lowered), and a request admitted before a 429
//! (the probe included) cannot confirm a level when it completes.

use std::sync::Mutex;

/// Saturated completions in a row before the limit rises by one.
pub const RAISE_AFTER: u32 = 5;
/// The longest run asked for before a probe, after probes kept failing.
pub const MAX_RAISE_AFTER: u32 = 160;
/// A learned limit never rises above this.
pub const CEILING: usize = 64;

/// What a 429 meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// It answered a probe above the accepted level: resend at once, no pause.
    Probe,
    /// At or below the accepted level: pause the class as for any 429.
    Accepted,
}

#[derive(Debug)]
struct State {
    accepted: usize,
    /// Requests in flight admitted above the accepted level.
    probes: usize,
    /// Counts 429s: a request admitted in an earlier epoch confirms nothing.
    epoch: u64,
    run: u32,
    raise_after: u32,
    /// The limit has moved from its start because of the upstream's answers.
    adjusted: bool,
}

/// One auto class's learning state. The caller holds the limit itself and applies the changes
/// this returns, under this lock (so two changes never interleave).
#[derive(Debug)]
pub struct Learning {
    state: Mutex<State>,
}

impl Default for Learning {
    fn default() -> Self {
        Learning {
            state: Mutex::new(State {
                accepted: 1,
                probes: 0,
                epoch: 0,
                run: 0,
                raise_after: RAISE_AFTER,
                adjusted: false,
            }),
        }
    }
}

/// What a request of a learning class was admitted as.
#[derive(Debug, Clone, Copy, Default)]
pub struct Admitted {
    probe: bool,
    epoch: u64,
}

impl Learning {
    /// A request was admitted at `level`.
    pub fn admitted(&self, level: usize) -> Admitted {
        let Ok(mut state) = self.state.lock() else {
            return Admitted::default();
        };
        let probe = level > state.accepted;
        if probe {
            state.probes += 1;
        }
        Admitted {
            probe,
            epoch: state.epoch,
        }
    }

    /// A request admitted as `admitted` ended (completed or throttled).
    pub fn ended(&self, admitted: Admitted) {
        if admitted.probe {
            if let Ok(mut state) = self.state.lock() {
                state.probes = state.probes.saturating_sub(1);
            }
        }
    }

    /// A request at `level` completed without a 429. `apply` gets the new limit when it rises.
    /// `queued`: others were waiting for a slot of the class.
    pub fn completed(&self, level: usize, admitted: Admitted, limit: usize, queued: bool, apply: impl FnOnce(usize)) {
        let Ok(mut state) = self.state.lock() else { return };
        if level > state.accepted && admitted.epoch == state.epoch {
            state.accepted = level;
            // A probe that worked: the next one need not wait longer than usual.
            state.raise_after = RAISE_AFTER;
        }
        if queued {
            state.run += 1;
            if state.run >= state.raise_after && limit < CEILING && state.accepted >= limit {
                state.run = 0;
                state.adjusted = true;
                apply(limit + 1);
            }
        } else {
            state.run = 0;
        }
    }

    /// The upstream answered 429 to a request at `level`. `apply` gets the lower limit, if any.
    pub fn throttled(&self, level: usize, limit: usize, apply: impl FnOnce(usize)) -> Throttle {
        let Ok(mut state) = self.state.lock() else {
            return Throttle::Accepted;
        };
        state.run = 0;
        state.epoch += 1;
        if state.probes > 0 && level <= state.accepted {
            // The probe in flight took the place this request had: the probe's answer.
            let lower = state.accepted.max(1);
            if lower < limit {
                state.adjusted = true;
                apply(lower);
            }
            state.raise_after = (state.raise_after * 2).min(MAX_RAISE_AFTER);
            return Throttle::Probe;
        }
        let lower = level.saturating_sub(1).max(1);
        if lower < limit {
            state.adjusted = true;
            apply(lower);
        }
        if level > state.accepted {
            state.raise_after = (state.raise_after * 2).min(MAX_RAISE_AFTER);
            Throttle::Probe
        } else {
            state.accepted = state.accepted.min(lower);
            Throttle::Accepted
        }
    }

    /// Another replica (shared mode) set the limit: take it as the accepted level too.
    pub fn adopt(&self, limit: usize) {
        if let Ok(mut state) = self.state.lock() {
            state.accepted = state.accepted.min(limit).max(1);
            state.adjusted = true;
        }
    }

    pub fn adjusted(&self) -> bool {
        self.state.lock().map(|s| s.adjusted).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a learning state with a fixed account limit: `rounds` of `limit` requests at once.
    fn complete_round(learning: &Learning, limit: &mut usize) {
        for level in 1..=*limit {
            let current = *limit;
            learning.completed(level, Admitted::default(), current, true, |new| *limit = new);
        }
    }

    #[test]
    fn the_limit_rises_one_at_a_time_after_saturated_runs() {
        let learning = Learning::default();
        let mut limit = 1;
        for _ in 0..RAISE_AFTER - 1 {
            complete_round(&learning, &mut limit);
        }
        assert_eq!(limit, 1);
        complete_round(&learning, &mut limit);
        assert_eq!(limit, 2);
        // Not before the new level has been seen to work.
        for _ in 0..RAISE_AFTER {
            learning.completed(1, Admitted::default(), limit, true, |new| limit = new);
        }
        assert_eq!(limit, 2, "raised past a level no request has confirmed");
        learning.completed(2, Admitted::default(), limit, true, |new| limit = new);
        for _ in 0..RAISE_AFTER {
            learning.completed(2, Admitted::default(), limit, true, |new| limit = new);
        }
        assert_eq!(limit, 3);
        assert!(learning.adjusted());
    }

    #[test]
    fn unsaturated_completions_do_not_raise() {
        let learning = Learning::default();
        let mut limit = 2;
        for _ in 0..100 {
            learning.completed(1, Admitted::default(), limit, false, |new| limit = new);
        }
        assert_eq!(limit, 2);
    }

    #[test]
    fn a_failed_probe_lowers_and_doubles_the_wait_for_the_next() {
        let learning = Learning::default();
        let mut limit = 2;
        assert_eq!(learning.throttled(2, limit, |new| limit = new), Throttle::Probe);
        assert_eq!(limit, 1);
        for _ in 0..RAISE_AFTER {
            learning.completed(1, Admitted::default(), limit, true, |new| limit = new);
        }
        assert_eq!(limit, 1, "the next probe waits twice as long");
        for _ in 0..RAISE_AFTER {
            learning.completed(1, Admitted::default(), limit, true, |new| limit = new);
        }
        assert_eq!(limit, 2);
    }

    #[test]
    fn a_429_at_the_accepted_level_lowers_it_and_means_pause() {
        let learning = Learning::default();
        for level in [1, 2, 3] {
            learning.completed(level, Admitted::default(), 3, false, |_| {});
        }
        let mut limit = 3;
        // The account now allows one: the second and third in flight are refused.
        assert_eq!(learning.throttled(3, limit, |new| limit = new), Throttle::Accepted);
        assert_eq!(limit, 2);
        assert_eq!(learning.throttled(2, limit, |new| limit = new), Throttle::Accepted);
        assert_eq!(limit, 1);
        // At 1 the limit cannot fall further; a 429 there is someone else on the account.
        assert_eq!(learning.throttled(1, limit, |new| limit = new), Throttle::Accepted);
        assert_eq!(limit, 1);
    }

    #[test]
    fn a_429_while_a_probe_is_in_flight_is_the_probes_answer() {
        let learning = Learning::default();
        let mut limit = 2;
        let first = learning.admitted(1);
        let probe = learning.admitted(2);
        // The upstream took the probe and refused the request at the accepted level.
        assert_eq!(learning.throttled(1, limit, |new| limit = new), Throttle::Probe);
        assert_eq!(limit, 1);
        learning.ended(first);
        // The probe completes, but after a 429: it confirms nothing.
        learning.completed(2, probe, limit, true, |new| limit = new);
        learning.ended(probe);
        let next = learning.admitted(2);
        assert!(next.probe, "level 2 is still above the accepted level");
    }
}
