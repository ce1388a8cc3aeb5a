//! At most N requests in any window of T: a sliding window counter, as
//! HAProxy's `http_req_rate` and Cloudflare's rate limiting.
//!
//! Time is cut into fixed windows of T (aligned on the Unix epoch, so every
//! gateway sharing a store agrees). Each has a counter in the host, under
//! `<key>|<window number>`, that expires when it stops mattering: at the
//! end of the next window. A request `elapsed` into window `n` sees
//!
//! ```text
//! estimate = previous × (T − elapsed) / T + current
//! ```
//!
//! the previous window's count weighted by how much of it the sliding
//! window still covers, as if its requests had been spread evenly. A
//! request is admitted when the estimate, itself included, is at most N.
//!
//! Cost: `state.get` for the previous window and `state.counter-add` for the
//! current one; a refusal takes its request back out with a second
//! `counter-add` unless `count_denied`.

use std::fmt::Write as _;

use crate::config::Window;
use crate::limit::{Decision, Host, Quota, Use};

/// One window's counts as a request sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Requests counted in the previous fixed window.
    pub previous: u64,
    /// Requests counted in the current one.
    pub current: u64,
    /// How far into the current window the request is.
    pub elapsed_ms: u64,
    /// The window's length.
    pub window_ms: u64,
}

impl Counts {
    /// The estimate, multiplied by the window's length (so it stays whole).
    fn scaled(&self) -> u128 {
        let window = u128::from(self.window_ms);
        let left = window - u128::from(self.elapsed_ms.min(self.window_ms));
        u128::from(self.previous) * left + u128::from(self.current) * window
    }

    /// Whether the estimate is at most `requests`.
    pub fn within(&self, requests: u32) -> bool {
        self.scaled() <= u128::from(requests) * u128::from(self.window_ms)
    }

    /// How many more requests would be admitted now.
    pub fn remaining(&self, requests: u32) -> u64 {
        let cap = u128::from(requests) * u128::from(self.window_ms);
        let left = cap.saturating_sub(self.scaled()) / u128::from(self.window_ms);
        u64::try_from(left).unwrap_or(u64::MAX)
    }

    /// Milliseconds until the estimate is back to 0: the end of the next
    /// window when this one has requests, of this one when only the
    /// previous one has.
    pub fn reset_ms(&self) -> u64 {
        let to_end = self.window_ms.saturating_sub(self.elapsed_ms);
        if self.current > 0 {
            to_end + self.window_ms
        } else if self.previous > 0 {
            to_end
        } else {
            0
        }
    }

    /// Milliseconds until one more request would be admitted, if no other
    /// arrives meanwhile: later in this window, as the previous one's
    /// weight fades, or else in the next one, where this one is the
    /// previous.
    pub fn retry_after_ms(&self, requests: u32) -> u64 {
        let window = u128::from(self.window_ms);
        let elapsed = u128::from(self.elapsed_ms.min(self.window_ms));
        let requests = u128::from(requests);
        let previous = u128::from(self.previous);
        let current = u128::from(self.current);
        // This window: previous × (T − e) ≤ (N − 1 − current) × T.
        if current < requests && previous > 0 {
            let room = (requests - 1 - current) * window;
            let at = window.saturating_sub(room / previous);
            if at < window {
                return to_ms(at.saturating_sub(elapsed));
            }
        }
        // The next window: current × (T − e) ≤ (N − 1) × T.
        let at = match current {
            0 => 0,
            _ => window.saturating_sub((requests.saturating_sub(1) * window) / current),
        };
        to_ms(window - elapsed + at)
    }
}

fn to_ms(ms: u128) -> u64 {
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Applies `limit` to the budget whose key is in `key` (left with the
/// current window's key appended).
pub fn apply<H: Host>(host: &H, limit: Window, key: &mut String, use_: Use) -> Decision {
    let window_ms = limit.window_ms;
    let now = host.now_ms();
    let number = now / window_ms;
    let elapsed_ms = now % window_ms;
    let base = key.len();
    let _ = write!(key, "|{}", number.wrapping_sub(1));
    let previous = count(host.get(key));
    key.truncate(base);
    let _ = write!(key, "|{number}");
    // The counter lives until the end of the next window, where it is the previous one.
    let ttl_ms = 2 * window_ms - elapsed_ms;
    let current = match use_ {
        Use::Take => u64::try_from(host.counter_add(key, 1, ttl_ms)).unwrap_or(0),
        Use::Peek => count(host.get(key)),
    };
    let mut counts = Counts {
        previous,
        current,
        elapsed_ms,
        window_ms,
    };
    let quota = |counts: &Counts| Quota {
        limit: u64::from(limit.requests),
        remaining: counts.remaining(limit.requests),
        reset_ms: counts.reset_ms(),
    };
    if use_ == Use::Peek || counts.within(limit.requests) {
        return Decision::Admit {
            quota: quota(&counts),
            delay_ms: 0,
        };
    }
    if !limit.count_denied {
        host.counter_add(key, -1, ttl_ms);
        counts.current = counts.current.saturating_sub(1);
    }
    Decision::Deny {
        quota: quota(&counts),
        retry_after_ms: counts.retry_after_ms(limit.requests),
    }
}

/// A counter's value as `state.get` returns it (absent: 0).
fn count(value: Option<String>) -> u64 {
    value.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::tests::FakeCaller;
    use crate::limit::tests::{FakeHost, config, take};

    fn counts(previous: u64, current: u64, elapsed_ms: u64) -> Counts {
        Counts {
            previous,
            current,
            elapsed_ms,
            window_ms: 10_000,
        }
    }

    #[test]
    fn the_estimate_weights_the_previous_window() {
        // 100 last window, 30% into this one: 70 of them still count.
        assert!(counts(100, 30, 3_000).within(100));
        assert!(!counts(100, 31, 3_000).within(100));
        assert_eq!(counts(100, 20, 3_000).remaining(100), 10);
        assert_eq!(counts(0, 0, 0).remaining(100), 100);
        assert_eq!(counts(0, 101, 0).remaining(100), 0);
        assert!(counts(100, 0, 0).within(100));
        assert!(!counts(100, 1, 0).within(100));
    }

    #[test]
    fn retry_after_within_this_window_or_the_next() {
        // 100 last window, 30 now at 3 s: the 31st fits once 69 of the 100
        // count, at 3.1 s.
        assert_eq!(counts(100, 30, 3_000).retry_after_ms(100), 100);
        // Nothing last window, 100 now at 2 s: in the next window, once 99 of
        // the 100 count, 100 ms into it.
        assert_eq!(counts(0, 100, 2_000).retry_after_ms(100), 8_000 + 100);
        // A window of one request.
        assert_eq!(counts(0, 1, 2_000).retry_after_ms(1), 8_000 + 10_000);
        assert_eq!(counts(1, 0, 2_000).retry_after_ms(1), 8_000);
    }

    #[test]
    fn reset() {
        assert_eq!(counts(0, 0, 2_000).reset_ms(), 0);
        assert_eq!(counts(5, 0, 2_000).reset_ms(), 8_000);
        assert_eq!(counts(5, 1, 2_000).reset_ms(), 18_000);
    }

    #[test]
    fn haproxy_s_100_in_10_seconds() {
        let host = FakeHost::new();
        // Start at a window's beginning.
        host.now.set(1_700_000_000_000);
        let config = config(r#"{"requests": 100, "window": "10s", "key": "client-ip"}"#);
        let client = FakeCaller::from("10.0.0.1");
        for i in 0..100 {
            match take(&host, &config, &client) {
                Decision::Admit { quota, delay_ms: 0 } => {
                    assert_eq!(quota.limit, 100);
                    assert_eq!(quota.remaining, 99 - i);
                }
                other => panic!("request {i}: {other:?}"),
            }
        }
        host.take_calls();
        match take(&host, &config, &client) {
            Decision::Deny {
                quota,
                retry_after_ms,
            } => {
                assert_eq!(quota.remaining, 0);
                assert_eq!(retry_after_ms, 10_100);
                assert_eq!(quota.reset_ms, 20_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(host.take_calls(), 3, "get, add, and take it back");
        let other = FakeCaller::from("10.0.0.2");
        assert!(matches!(
            take(&host, &config, &other),
            Decision::Admit { .. }
        ));
        // Half into the next window, half the previous count remains.
        host.advance(15_000);
        let admitted = (0..100)
            .filter(|_| matches!(take(&host, &config, &client), Decision::Admit { .. }))
            .count();
        assert_eq!(admitted, 50);
        // Two windows of silence: a whole budget again.
        host.advance(20_000);
        let admitted = (0..150)
            .filter(|_| matches!(take(&host, &config, &client), Decision::Admit { .. }))
            .count();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn count_denied_keeps_a_hammering_client_out() {
        let host = FakeHost::new();
        let config = config(r#"{"requests": 10, "window": "1s", "count_denied": true}"#);
        let client = FakeCaller::from("10.0.0.1");
        let admitted = (0..30)
            .filter(|_| matches!(take(&host, &config, &client), Decision::Admit { .. }))
            .count();
        assert_eq!(admitted, 10);
        // 30 counted: half a window later 15 of them still weigh.
        host.advance(1_500);
        assert!(matches!(
            take(&host, &config, &client),
            Decision::Deny { .. }
        ));
        let lenient = crate::limit::tests::config(r#"{"requests": 10, "window": "1s"}"#);
        let host = FakeHost::new();
        for _ in 0..30 {
            take(&host, &lenient, &client);
        }
        host.advance(1_500);
        assert!(matches!(
            take(&host, &lenient, &client),
            Decision::Admit { .. }
        ));
    }

    #[test]
    fn peeking_reads_without_counting() {
        let host = FakeHost::new();
        let config = config(r#"{"requests": 3, "window": "1s"}"#);
        let client = FakeCaller::from("10.0.0.1");
        let peek = || crate::limit::decide(&host, &config, &client, &mut String::new(), Use::Peek);
        take(&host, &config, &client);
        for _ in 0..5 {
            assert!(matches!(
                peek(),
                Decision::Admit {
                    quota: Quota {
                        remaining: 2,
                        limit: 3,
                        ..
                    },
                    ..
                }
            ));
        }
    }
}
