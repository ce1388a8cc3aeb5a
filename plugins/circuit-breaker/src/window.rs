//! The pure arithmetic of the sliding windows: how an outcome is
//! classified and stored, where it goes, and when the rates trip.
//!
//! The windows themselves live in the host's store (see [`crate::breaker`]);
//! this module only decides.

use std::fmt;

use crate::config::{Config, Window};

/// One outcome as a window stores it: failed, slow, both or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// An error (connect failure, timeout, ...) or a status in `failure_statuses`.
    pub failed: bool,
    /// Slower than `slow_call_duration` (tracked only while `slow_call_rate` is on).
    pub slow: bool,
}

impl Sample {
    /// Classifies an outcome: its status (none when `error`), whether the
    /// host reported an error, and its latency.
    pub fn classify(status: Option<u16>, error: bool, latency_us: u64, config: &Config) -> Sample {
        Sample {
            failed: error || status.is_some_and(|s| config.failure_statuses.contains(s)),
            slow: config.slow_call_rate > 0 && latency_us > config.slow_call_us,
        }
    }

    /// Whether the sample can raise a rate (a fast success cannot).
    pub fn is_bad(self) -> bool {
        self.failed || self.slow
    }

    /// The text a ring slot holds: `"0"` to `"3"` (bit 1 failed, bit 2 slow).
    pub fn code(self) -> &'static str {
        match (self.failed, self.slow) {
            (false, false) => "0",
            (true, false) => "1",
            (false, true) => "2",
            (true, true) => "3",
        }
    }

    /// Reads a ring slot; an empty (or unreadable) slot counts as neither.
    pub fn from_code(code: Option<&str>) -> Sample {
        let bits = code.and_then(|c| c.parse::<u8>().ok()).unwrap_or(0);
        Sample {
            failed: bits & 1 != 0,
            slow: bits & 2 != 0,
        }
    }
}

/// What a window holds: outcomes, and how many failed and were slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Outcomes in the window.
    pub calls: u64,
    /// Failed ones.
    pub failures: u64,
    /// Slow ones.
    pub slow: u64,
}

/// Why a breaker trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// This many failures in a row.
    ConsecutiveFailures(u64),
    /// The failure rate reached its threshold.
    FailureRate(Tally),
    /// The slow-call rate reached its threshold.
    SlowCallRate(Tally),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ConsecutiveFailures(n) => write!(f, "{n} consecutive failures"),
            Reason::FailureRate(t) => write!(
                f,
                "{} of {} calls failed ({}%)",
                t.failures,
                t.calls,
                percent(t.failures, t.calls)
            ),
            Reason::SlowCallRate(t) => write!(
                f,
                "{} of {} calls were slow ({}%)",
                t.slow,
                t.calls,
                percent(t.slow, t.calls)
            ),
        }
    }
}

/// `part` of `whole` in whole percent, rounded down.
fn percent(part: u64, whole: u64) -> u64 {
    part.saturating_mul(100).checked_div(whole).unwrap_or(0)
}

/// Whether `count` of `calls` reaches `threshold` percent (0 = off), as
/// resilience4j: a rate equal to the threshold trips.
fn reaches(count: u64, calls: u64, threshold: u32) -> bool {
    threshold > 0 && calls > 0 && count.saturating_mul(100) >= u64::from(threshold) * calls
}

/// Whether the rates over a closed breaker's window trip it: only once the
/// window holds `minimum_calls` outcomes.
pub fn rates_trip(tally: Tally, config: &Config) -> Option<Reason> {
    if tally.calls < u64::from(config.minimum_calls) {
        return None;
    }
    judge(tally, config)
}

/// Whether the rates over `tally` reach a threshold, whatever its size
/// (half-open judges its trial calls with this).
pub fn judge(tally: Tally, config: &Config) -> Option<Reason> {
    if reaches(tally.failures, tally.calls, config.failure_rate) {
        Some(Reason::FailureRate(tally))
    } else if reaches(tally.slow, tally.calls, config.slow_call_rate) {
        Some(Reason::SlowCallRate(tally))
    } else {
        None
    }
}

/// How many failures in a row re-open a half-open breaker: the configured
/// run, or every trial call when there are fewer trial calls than that.
pub fn trial_run_limit(config: &Config) -> u64 {
    u64::from(config.consecutive_failures.min(config.permitted_half_open))
}

/// The ring slot of the `seq`-th outcome (1-based) of a count-based window of `size`.
pub fn ring_slot(seq: u64, size: u32) -> u64 {
    seq.saturating_sub(1) % u64::from(size.max(1))
}

/// The outcomes a count-based window of `size` holds after `seq` outcomes.
pub fn ring_calls(seq: u64, size: u32) -> u64 {
    seq.min(u64::from(size))
}

/// A time-based window's buckets at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    /// The current bucket's number (time / width).
    pub current: u64,
    /// How long a bucket's counters live: long enough to stay in the window.
    pub ttl_ms: u64,
}

impl Buckets {
    /// The buckets of a window `window_ms` long (cut in [`Window::BUCKETS`]) at `now_ms`.
    pub fn at(now_ms: u64, window_ms: u64) -> Buckets {
        let width = (window_ms / Window::BUCKETS).max(1);
        Buckets {
            current: now_ms / width,
            ttl_ms: window_ms + width,
        }
    }

    /// The buckets that make up the window now: the current one and the
    /// nine before it (so the window spans 90–100 % of `window_duration`).
    pub fn in_window(self) -> impl Iterator<Item = u64> {
        let first = self.current.saturating_sub(Window::BUCKETS - 1);
        first..=self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    #[test]
    fn classification() {
        let config =
            config(r#"{"failure_statuses": ["5xx", "429"], "slow_call_duration": "50ms"}"#);
        let ok = Sample::classify(Some(200), false, 1_000, &config);
        assert_eq!(ok, Sample::default());
        assert!(!ok.is_bad());
        assert!(Sample::classify(Some(503), false, 1_000, &config).failed);
        assert!(Sample::classify(Some(429), false, 1_000, &config).failed);
        assert!(!Sample::classify(Some(404), false, 1_000, &config).failed);
        assert!(
            Sample::classify(None, true, 1_000, &config).failed,
            "errors always fail"
        );
        let slow = Sample::classify(Some(200), false, 50_001, &config);
        assert!(slow.slow && !slow.failed && slow.is_bad());
        assert!(!Sample::classify(Some(200), false, 50_000, &config).slow);
        let off = Config {
            slow_call_rate: 0,
            ..config
        };
        assert!(!Sample::classify(Some(200), false, 10_000_000, &off).slow);
    }

    #[test]
    fn codes_round_trip() {
        for failed in [false, true] {
            for slow in [false, true] {
                let sample = Sample { failed, slow };
                assert_eq!(Sample::from_code(Some(sample.code())), sample);
            }
        }
        assert_eq!(Sample::from_code(None), Sample::default());
        assert_eq!(Sample::from_code(Some("x")), Sample::default());
    }

    #[test]
    fn rates_wait_for_the_minimum_and_trip_at_the_threshold() {
        let config = config(r#"{"failure_rate": 50, "window": 10, "minimum_calls": 10}"#);
        let tally = |calls, failures| Tally {
            calls,
            failures,
            slow: 0,
        };
        assert_eq!(rates_trip(tally(9, 9), &config), None, "below the minimum");
        assert_eq!(rates_trip(tally(10, 4), &config), None);
        assert_eq!(
            rates_trip(tally(10, 5), &config),
            Some(Reason::FailureRate(tally(10, 5))),
            "equal to the threshold trips"
        );
        let off = Config {
            failure_rate: 0,
            ..config.clone()
        };
        assert_eq!(rates_trip(tally(10, 10), &off), None);
        assert_eq!(
            judge(tally(3, 2), &config),
            Some(Reason::FailureRate(tally(3, 2)))
        );
        assert_eq!(judge(tally(3, 1), &config), None);
    }

    #[test]
    fn slow_rate() {
        let config = config(r#"{"slow_call_rate": 50, "window": 4, "failure_rate": 0}"#);
        let tally = Tally {
            calls: 4,
            failures: 4,
            slow: 2,
        };
        assert_eq!(
            rates_trip(tally, &config),
            Some(Reason::SlowCallRate(tally))
        );
        assert_eq!(rates_trip(Tally { slow: 1, ..tally }, &config), None);
        assert_eq!(
            Reason::SlowCallRate(tally).to_string(),
            "2 of 4 calls were slow (50%)"
        );
    }

    #[test]
    fn trial_runs() {
        let run = |json: &str| trial_run_limit(&config(json));
        assert_eq!(
            run(r#"{"consecutive_failures": 5, "permitted_half_open": 3}"#),
            3
        );
        assert_eq!(
            run(r#"{"consecutive_failures": 5, "permitted_half_open": 10}"#),
            5
        );
        assert_eq!(run("{}"), 0, "off");
    }

    #[test]
    fn ring() {
        assert_eq!(ring_slot(1, 10), 0);
        assert_eq!(ring_slot(10, 10), 9);
        assert_eq!(ring_slot(11, 10), 0);
        assert_eq!(ring_calls(3, 10), 3);
        assert_eq!(ring_calls(30, 10), 10);
    }

    #[test]
    fn buckets() {
        let buckets = Buckets::at(60_500, 10_000);
        assert_eq!(buckets.current, 60);
        assert_eq!(buckets.ttl_ms, 11_000);
        assert_eq!(
            buckets.in_window().collect::<Vec<_>>(),
            (51..=60).collect::<Vec<_>>()
        );
        let early = Buckets::at(2_000, 10_000);
        assert_eq!(early.in_window().collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}
