//! A breaker's state as the host's store holds it, and the pure rules of
//! its transitions.
//!
//! The state is one text value per breaker, replaced only by
//! compare-and-swap, so of several instances (or worker threads) that see
//! the same reason to trip, open or close, exactly one makes the transition:
//!
//! ```text
//! c:<epoch>              closed
//! o:<epoch>:<until_ms>   open until then (wall-clock ms)
//! h:<epoch>:<since_ms>   half-open since then
//! ```
//!
//! Every transition takes the next epoch. Counters of an epoch
//! (the closed window, the half-open trial) are keyed by it, so a
//! transition starts them afresh without racing late writers of the old
//! epoch, and the value never returns to an earlier text (no ABA).

use std::fmt;

/// A breaker's phase, as reported to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are refused (upstream scope) or the endpoint is ejected.
    Open,
    /// Trial calls decide whether to close or open again.
    HalfOpen,
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Closed; `epoch` keys its window.
    Closed {
        /// The epoch.
        epoch: u64,
    },
    /// Open until `until_ms` (wall-clock milliseconds).
    Open {
        /// The epoch.
        epoch: u64,
        /// When the wait ends.
        until_ms: u64,
    },
    /// Half-open since `since_ms`; `epoch` keys its trial counters.
    HalfOpen {
        /// The epoch.
        epoch: u64,
        /// When it became half-open.
        since_ms: u64,
    },
}

impl State {
    /// The state a stored value encodes; a breaker never stored (or an
    /// unreadable value) is closed, epoch 0.
    pub fn parse(text: Option<&str>) -> State {
        let closed = State::Closed { epoch: 0 };
        let Some(text) = text else {
            return closed;
        };
        let mut parts = text.split(':');
        let tag = parts.next();
        let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
        let state = match tag {
            Some("c") => number().map(|epoch| State::Closed { epoch }),
            Some("o") => number()
                .zip(number())
                .map(|(epoch, until_ms)| State::Open { epoch, until_ms }),
            Some("h") => number()
                .zip(number())
                .map(|(epoch, since_ms)| State::HalfOpen { epoch, since_ms }),
            _ => None,
        };
        state.unwrap_or(closed)
    }

    /// The epoch.
    pub fn epoch(self) -> u64 {
        match self {
            State::Closed { epoch } | State::Open { epoch, .. } | State::HalfOpen { epoch, .. } => {
                epoch
            }
        }
    }

    /// The phase.
    pub fn phase(self) -> Phase {
        match self {
            State::Closed { .. } => Phase::Closed,
            State::Open { .. } => Phase::Open,
            State::HalfOpen { .. } => Phase::HalfOpen,
        }
    }

    /// The next state: open until `until_ms`.
    pub fn to_open(self, until_ms: u64) -> State {
        State::Open {
            epoch: self.epoch() + 1,
            until_ms,
        }
    }

    /// The next state: half-open from `now_ms`.
    pub fn to_half_open(self, now_ms: u64) -> State {
        State::HalfOpen {
            epoch: self.epoch() + 1,
            since_ms: now_ms,
        }
    }

    /// The next state: closed, with a fresh window.
    pub fn to_closed(self) -> State {
        State::Closed {
            epoch: self.epoch() + 1,
        }
    }
}

impl fmt::Display for State {
    /// The stored text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Closed { epoch } => write!(f, "c:{epoch}"),
            State::Open { epoch, until_ms } => write!(f, "o:{epoch}:{until_ms}"),
            State::HalfOpen { epoch, since_ms } => write!(f, "h:{epoch}:{since_ms}"),
        }
    }
}

/// Whether an open breaker's wait is over at `now_ms`: the deadline has
/// passed, or it lies further ahead than any wait (`longest_ms`), which
/// means the wall clock went back.
pub fn wait_over(until_ms: u64, now_ms: u64, longest_ms: u64) -> bool {
    now_ms >= until_ms || until_ms - now_ms > longest_ms
}

/// The `Retry-After` value while open: the seconds left, rounded up, at least 1.
pub fn retry_after_secs(until_ms: u64, now_ms: u64) -> u64 {
    until_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
}

/// Whether a half-open breaker whose permits are used up has waited too
/// long for its trial calls to report (`stall_ms`), or the clock went back.
pub fn trial_stalled(since_ms: u64, now_ms: u64, stall_ms: u64) -> bool {
    now_ms < since_ms || now_ms - since_ms >= stall_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for state in [
            State::Closed { epoch: 0 },
            State::Closed { epoch: 7 },
            State::Open {
                epoch: 8,
                until_ms: 1_700_000_000_123,
            },
            State::HalfOpen {
                epoch: 9,
                since_ms: 1_700_000_000_456,
            },
        ] {
            assert_eq!(State::parse(Some(&state.to_string())), state);
        }
        assert_eq!(State::parse(None), State::Closed { epoch: 0 });
        for bad in ["", "x:1", "c:", "o:1", "h:1:x", "c:-1"] {
            assert_eq!(State::parse(Some(bad)), State::Closed { epoch: 0 }, "{bad}");
        }
    }

    #[test]
    fn transitions_take_the_next_epoch() {
        let closed = State::Closed { epoch: 4 };
        let open = closed.to_open(1_000);
        assert_eq!(
            open,
            State::Open {
                epoch: 5,
                until_ms: 1_000
            }
        );
        assert_eq!(open.phase(), Phase::Open);
        let half = open.to_half_open(1_000);
        assert_eq!(half.epoch(), 6);
        assert_eq!(half.phase(), Phase::HalfOpen);
        assert_eq!(half.to_closed(), State::Closed { epoch: 7 });
        assert_ne!(half.to_closed().to_string(), closed.to_string());
    }

    #[test]
    fn waits() {
        assert!(!wait_over(10_000, 9_999, 60_000));
        assert!(wait_over(10_000, 10_000, 60_000));
        assert!(wait_over(100_000, 10_000, 60_000), "the clock went back");
        assert_eq!(retry_after_secs(10_000, 9_999), 1);
        assert_eq!(retry_after_secs(10_000, 8_999), 2);
        assert_eq!(retry_after_secs(10_000, 9_000), 1);
        assert_eq!(retry_after_secs(10_000, 10_000), 1);
        assert_eq!(retry_after_secs(70_000, 10_000), 60);
        assert!(!trial_stalled(1_000, 1_500, 1_000));
        assert!(trial_stalled(1_000, 2_000, 1_000));
        assert!(trial_stalled(1_000, 500, 1_000));
    }
}
