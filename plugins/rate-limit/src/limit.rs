//! The decision for one request: which tier, which budget, and whether the
//! budget admits it, through the host's state so that every pooled
//! instance and every worker thread shares it.
//!
//! A rate (GCRA) is one `state.throttle` call per request, atomic in the
//! host. A window costs a `state.get` and a `state.counter-add` (see
//! [`crate::window`]).
//!
//! The host is behind the [`Host`] trait: the plugin passes the real
//! imports, the tests an in-memory store with a hand-driven clock.

use sluice_sdk::state::ThrottleResult;

use crate::config::{Config, Limit, Rate};
use crate::key::{Caller, Keyed, write_key};
use crate::window;

/// What a limit needs from the host (the WIT `state` and `clock` interfaces).
pub trait Host {
    /// `state.throttle`.
    fn throttle(&self, key: &str, interval_ns: u64, burst: u32, cost: u32) -> ThrottleResult;
    /// `state.counter-add`.
    fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64;
    /// `state.get`.
    fn get(&self, key: &str) -> Option<String>;
    /// `clock.unix-ms`: wall-clock milliseconds, so that window boundaries
    /// agree between gateways sharing a store.
    fn now_ms(&self) -> u64;
}

/// Whether a decision counts the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Count it against its budget (`on-request`).
    Take,
    /// Only look at the budget (`on-response`, for the `RateLimit-*` headers).
    Peek,
}

/// A budget's state, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// How many requests a full budget admits at once (`RateLimit-Limit`).
    pub limit: u64,
    /// How many more it admits now (`RateLimit-Remaining`).
    pub remaining: u64,
    /// Milliseconds until it is full again (`RateLimit-Reset`, in seconds).
    pub reset_ms: u64,
}

/// What happens to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No limit applies: an unlimited tier, or a missing key with `missing = "skip"`.
    Exempt,
    /// Admitted; hold it `delay_ms` first (pacing) when that is above 0.
    Admit {
        /// The budget after this request.
        quota: Quota,
        /// How long to hold the request before forwarding it.
        delay_ms: u32,
    },
    /// Refused: the budget is spent.
    Deny {
        /// The budget (nothing remaining).
        quota: Quota,
        /// When a request would be admitted again.
        retry_after_ms: u64,
    },
    /// Refused: a keyed header is missing and `missing = "deny"`.
    MissingKey,
}

/// Decides for the request `caller`, writing its key into `key` (a buffer
/// the caller keeps between requests).
pub fn decide<H: Host, C: Caller>(
    host: &H,
    config: &Config,
    caller: &C,
    key: &mut String,
    use_: Use,
) -> Decision {
    let requested = config
        .tier_header
        .as_deref()
        .and_then(|name| caller.header(name));
    let tier = config.tier(requested.as_deref());
    if tier.limit == Limit::Unlimited {
        return Decision::Exempt;
    }
    match write_key(key, config, tier, caller) {
        Keyed::Ready => {}
        Keyed::Skip => return Decision::Exempt,
        Keyed::Deny => return Decision::MissingKey,
    }
    match tier.limit {
        Limit::Rate(rate) => throttle(host, rate, key, use_),
        Limit::Window(limit) => window::apply(host, limit, key, use_),
        Limit::Unlimited => Decision::Exempt,
    }
}

/// GCRA through the host: one `state.throttle` call.
fn throttle<H: Host>(host: &H, rate: Rate, key: &str, use_: Use) -> Decision {
    let cost = match use_ {
        Use::Take => 1,
        Use::Peek => 0,
    };
    let result = host.throttle(key, rate.interval_ns, rate.burst, cost);
    let quota = Quota {
        limit: u64::from(rate.burst) + 1,
        remaining: result.remaining,
        reset_ms: result.reset_ms,
    };
    if result.allowed {
        Decision::Admit {
            quota,
            delay_ms: rate.delay_ms(result.ahead_ms),
        }
    } else {
        Decision::Deny {
            quota,
            retry_after_ms: result.retry_after_ms,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::*;
    use crate::key::tests::FakeCaller;

    /// The host's store semantics (GCRA as in the gateway, counters with
    /// expiry) on a hand-driven millisecond clock, counting calls.
    #[derive(Default)]
    pub(crate) struct FakeHost {
        pub(crate) now: Cell<u64>,
        /// Key → theoretical arrival time in nanoseconds.
        arrivals: RefCell<HashMap<String, u128>>,
        /// Key → (value, expires at ms).
        counters: RefCell<HashMap<String, (i64, u64)>>,
        pub(crate) calls: Cell<u32>,
    }

    fn ceil_ms(ns: u128) -> u64 {
        u64::try_from(ns.div_ceil(1_000_000)).unwrap()
    }

    impl FakeHost {
        pub(crate) fn new() -> FakeHost {
            let host = FakeHost::default();
            host.now.set(1_700_000_000_000);
            host
        }

        pub(crate) fn advance(&self, ms: u64) {
            self.now.set(self.now.get() + ms);
        }

        pub(crate) fn take_calls(&self) -> u32 {
            self.calls.replace(0)
        }
    }

    impl Host for FakeHost {
        fn throttle(&self, key: &str, interval_ns: u64, burst: u32, cost: u32) -> ThrottleResult {
            self.calls.set(self.calls.get() + 1);
            let now = u128::from(self.now.get()) * 1_000_000;
            let interval = u128::from(interval_ns);
            let window = interval * (u128::from(burst) + 1);
            let tat = self
                .arrivals
                .borrow()
                .get(key)
                .copied()
                .filter(|t| *t > now);
            let ahead = tat.unwrap_or(now) - now;
            let next = ahead + interval * u128::from(cost);
            let fits = |used: u128| u64::try_from((window - used) / interval).unwrap();
            if next <= window {
                if cost > 0 {
                    self.arrivals
                        .borrow_mut()
                        .insert(key.to_string(), now + next);
                }
                ThrottleResult {
                    allowed: true,
                    remaining: fits(next),
                    retry_after_ms: 0,
                    reset_ms: ceil_ms(next),
                    ahead_ms: ceil_ms(ahead),
                }
            } else {
                ThrottleResult {
                    allowed: false,
                    remaining: fits(ahead),
                    retry_after_ms: ceil_ms(next - window),
                    reset_ms: ceil_ms(ahead),
                    ahead_ms: 0,
                }
            }
        }

        fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64 {
            self.calls.set(self.calls.get() + 1);
            let now = self.now.get();
            let mut counters = self.counters.borrow_mut();
            let live = counters.get(key).copied().filter(|(_, at)| *at > now);
            let (value, expires) = match live {
                Some((value, expires)) => (value + delta, expires),
                None if ttl_ms > 0 => (delta, now + ttl_ms),
                None => (delta, u64::MAX),
            };
            counters.insert(key.to_string(), (value, expires));
            value
        }

        fn get(&self, key: &str) -> Option<String> {
            self.calls.set(self.calls.get() + 1);
            let now = self.now.get();
            let counters = self.counters.borrow();
            let (value, expires) = counters.get(key)?;
            (*expires > now).then(|| value.to_string())
        }

        fn now_ms(&self) -> u64 {
            self.now.get()
        }
    }

    pub(crate) fn config(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    pub(crate) fn take(host: &FakeHost, config: &Config, caller: &FakeCaller) -> Decision {
        decide(host, config, caller, &mut String::new(), Use::Take)
    }

    fn admitted(decision: Decision) -> bool {
        matches!(decision, Decision::Admit { .. })
    }

    #[test]
    fn burst_then_the_rate_nodelay() {
        let host = FakeHost::new();
        let config = config(r#"{"rate": "10r/s", "burst": 20, "nodelay": true}"#);
        let client = FakeCaller::from("10.0.0.1");
        for i in 0..21 {
            match take(&host, &config, &client) {
                Decision::Admit { quota, delay_ms } => {
                    assert_eq!(delay_ms, 0, "nodelay");
                    assert_eq!(quota.limit, 21);
                    assert_eq!(quota.remaining, 20 - i);
                }
                other => panic!("request {i}: {other:?}"),
            }
        }
        match take(&host, &config, &client) {
            Decision::Deny {
                quota,
                retry_after_ms,
            } => {
                assert_eq!(quota.remaining, 0);
                assert_eq!(quota.limit, 21);
                assert_eq!(retry_after_ms, 100);
                assert_eq!(quota.reset_ms, 2_100);
            }
            other => panic!("{other:?}"),
        }
        host.advance(100);
        assert!(admitted(take(&host, &config, &client)));
        assert!(!admitted(take(&host, &config, &client)));
        // Over 5 s with someone always knocking: 21 + 50.
        let host = FakeHost::new();
        let mut admitted_count = 0;
        for _ in 0..=5_000 {
            for _ in 0..3 {
                admitted_count += usize::from(admitted(take(&host, &config, &client)));
            }
            host.advance(1);
        }
        assert_eq!(admitted_count, 21 + 50);
    }

    #[test]
    fn without_nodelay_the_burst_is_paced() {
        let host = FakeHost::new();
        let config = config(r#"{"rate": "10r/s", "burst": 5}"#);
        let client = FakeCaller::from("10.0.0.1");
        let delays: Vec<Decision> = (0..7).map(|_| take(&host, &config, &client)).collect();
        for (i, decision) in delays.iter().take(6).enumerate() {
            match decision {
                Decision::Admit { delay_ms, .. } => assert_eq!(*delay_ms, 100 * i as u32),
                other => panic!("request {i}: {other:?}"),
            }
        }
        assert!(matches!(delays[6], Decision::Deny { .. }));
    }

    #[test]
    fn nginx_delay_lets_the_first_excess_through() {
        let host = FakeHost::new();
        let config = config(r#"{"rate": "10r/s", "burst": 5, "delay": 2}"#);
        let client = FakeCaller::from("10.0.0.1");
        let delays: Vec<u32> = (0..6)
            .map(|_| match take(&host, &config, &client) {
                Decision::Admit { delay_ms, .. } => delay_ms,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [0, 0, 0, 100, 200, 300]);
    }

    #[test]
    fn one_host_call_per_request_for_a_rate() {
        let host = FakeHost::new();
        let config = config(
            r#"{"rate": "10r/s", "burst": 1, "key": ["client-ip", "header:x-api-key", "route"]}"#,
        );
        let client = FakeCaller::from("10.0.0.1").with("x-api-key", "k");
        for _ in 0..5 {
            take(&host, &config, &client);
            assert_eq!(host.take_calls(), 1);
        }
    }

    #[test]
    fn peeking_does_not_spend() {
        let host = FakeHost::new();
        let config = config(r#"{"rate": "1r/s", "burst": 2}"#);
        let client = FakeCaller::from("10.0.0.1");
        let peek = |host: &FakeHost| decide(host, &config, &client, &mut String::new(), Use::Peek);
        assert!(matches!(
            peek(&host),
            Decision::Admit {
                quota: Quota {
                    remaining: 3,
                    limit: 3,
                    ..
                },
                ..
            }
        ));
        take(&host, &config, &client);
        for _ in 0..5 {
            assert!(matches!(
                peek(&host),
                Decision::Admit {
                    quota: Quota {
                        remaining: 2,
                        reset_ms: 1_000,
                        ..
                    },
                    ..
                }
            ));
        }
        assert!(admitted(take(&host, &config, &client)));
        assert!(admitted(take(&host, &config, &client)));
        assert!(!admitted(take(&host, &config, &client)));
    }

    #[test]
    fn tiers_have_their_own_rates_and_budgets() {
        let host = FakeHost::new();
        let config = config(
            r#"{"key": "header:x-api-key", "default_tier": "free",
                "tiers": {"free": {"rate": "1r/m", "burst": 1, "nodelay": true},
                          "pro": {"rate": "1r/m", "burst": 4, "nodelay": true},
                          "enterprise": "unlimited"}}"#,
        );
        let count = |caller: &FakeCaller| {
            (0..10)
                .filter(|_| admitted(take(&host, &config, caller)))
                .count()
        };
        let a = FakeCaller::from("10.0.0.1").with("x-api-key", "a");
        assert_eq!(count(&a), 2);
        assert_eq!(
            count(&a.clone().with("x-api-tier", "pro")),
            5,
            "pro has its own budget"
        );
        assert_eq!(
            count(&a.clone().with("x-api-tier", "gold")),
            0,
            "unknown: free, spent"
        );
        assert_eq!(
            count(&FakeCaller::from("10.0.0.1").with("x-api-key", "b")),
            2
        );
        let enterprise = a.with("x-api-tier", "Enterprise");
        host.take_calls();
        for _ in 0..50 {
            assert_eq!(take(&host, &config, &enterprise), Decision::Exempt);
        }
        assert_eq!(host.take_calls(), 0, "unlimited costs no host call");
    }

    #[test]
    fn missing_keys() {
        let host = FakeHost::new();
        let rule = |missing: &str| {
            config(&format!(
                r#"{{"rate": "1r/m", "key": "header:x-api-key", "missing": "{missing}"}}"#
            ))
        };
        let anonymous = FakeCaller::from("10.0.0.1");
        assert_eq!(take(&host, &rule("skip"), &anonymous), Decision::Exempt);
        assert_eq!(take(&host, &rule("deny"), &anonymous), Decision::MissingKey);
        let group = rule("group");
        assert!(admitted(take(&host, &group, &anonymous)));
        assert!(
            !admitted(take(&host, &group, &FakeCaller::from("10.0.0.2"))),
            "one budget for every request without the header"
        );
        let fallback = rule("client-ip");
        assert!(admitted(take(
            &host,
            &fallback,
            &FakeCaller::from("10.0.0.3")
        )));
        assert!(admitted(take(
            &host,
            &fallback,
            &FakeCaller::from("10.0.0.4")
        )));
        assert!(!admitted(take(
            &host,
            &fallback,
            &FakeCaller::from("10.0.0.4")
        )));
    }
}
