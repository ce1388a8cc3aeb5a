//! Shared state behind the `state` host imports: counters,
//! compare-and-swap values with expiry, and GCRA rate limits, one store per
//! plugin name.
//!
//! Every instance of a plugin, on every worker thread, sees the same store
//! (it lives in the plugin's [`super::scope::PluginScope`]), so instances stay
//! interchangeable.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// One plugin's keys.
#[derive(Debug, Default)]
pub(crate) struct StateStore {
    entries: DashMap<Box<str>, Slot>,
}

#[derive(Debug)]
struct Slot {
    value: Value,
    expires: Option<Instant>,
}

#[derive(Debug, PartialEq)]
enum Value {
    Counter(i64),
    Text(Box<str>),
    /// A rate limit's theoretical arrival time (GCRA).
    Arrival(Instant),
}

/// What [`StateStore::throttle`] decided; see the WIT `state.throttle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Throttled {
    pub(crate) allowed: bool,
    pub(crate) remaining: u64,
    pub(crate) retry_after: Duration,
    pub(crate) reset: Duration,
    pub(crate) ahead: Duration,
}

/// A rate limit's parameters: one call per `interval`, `burst` beyond.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    pub(crate) interval: Duration,
    pub(crate) burst: u32,
}

impl Rate {
    /// GCRA on one key whose theoretical arrival time is `tat` (`None`: a
    /// fresh key). Returns the decision and, when calls were counted, the
    /// new arrival time.
    fn decide(self, now: Instant, tat: Option<Instant>, cost: u32) -> (Throttled, Option<Instant>) {
        let interval = self.interval.max(Duration::from_nanos(1));
        // How far ahead of now the arrival time may run: the burst plus the call itself.
        let window = interval.saturating_mul(self.burst.saturating_add(1));
        let tat = tat.filter(|t| *t > now).unwrap_or(now);
        let ahead = tat - now;
        let next = ahead.saturating_add(interval.saturating_mul(cost));
        let fits = |used: Duration| {
            let left = window.saturating_sub(used);
            u64::try_from(left.as_nanos() / interval.as_nanos()).unwrap_or(u64::MAX)
        };
        if next <= window {
            let counted = (cost > 0).then(|| now + next);
            let decision = Throttled {
                allowed: true,
                remaining: fits(next),
                retry_after: Duration::ZERO,
                reset: next,
                ahead,
            };
            (decision, counted)
        } else {
            let decision = Throttled {
                allowed: false,
                remaining: fits(ahead),
                retry_after: next - window,
                reset: ahead,
                ahead: Duration::ZERO,
            };
            (decision, None)
        }
    }
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }

    /// Whether the slot has not expired, reading the clock only when it can.
    fn live_now(&self) -> bool {
        self.expires.is_none_or(|at| at > Instant::now())
    }

    /// Adds `delta` to a live counter; anything else (text, a rate limit's
    /// arrival time, an expired value) becomes a fresh counter of `delta`
    /// expiring `ttl_ms` from now. Most counters never expire: the clock is
    /// read only for those that do.
    fn add(&mut self, delta: i64, ttl_ms: u64) -> i64 {
        if self.live_now()
            && let Value::Counter(n) = &mut self.value
        {
            *n = n.saturating_add(delta);
            return *n;
        }
        *self = Slot {
            value: Value::Counter(delta),
            expires: expiry(ttl_ms),
        };
        delta
    }
}

/// When a key stored now with `ttl_ms` expires; the clock is read only for
/// a key that does.
fn expiry(ttl_ms: u64) -> Option<Instant> {
    (ttl_ms > 0).then(|| Instant::now() + Duration::from_millis(ttl_ms))
}

impl StateStore {
    /// Drops expired entries; run now and then off the request path.
    pub(crate) fn sweep_expired(&self) {
        let now = Instant::now();
        self.entries.retain(|_, slot| slot.live(now));
    }

    /// Adds `delta` to counter `key`; see the WIT `state.counter-add`.
    /// A key holding text is replaced by a fresh counter.
    pub(crate) fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64 {
        // Fast path: the key exists; no allocation.
        if let Some(mut slot) = self.entries.get_mut(key) {
            return slot.add(delta, ttl_ms);
        }
        match self.entries.entry(Box::from(key)) {
            // Another caller created it between our two lookups.
            Entry::Occupied(mut occupied) => occupied.get_mut().add(delta, ttl_ms),
            Entry::Vacant(vacant) => {
                vacant.insert(Slot {
                    value: Value::Counter(delta),
                    expires: expiry(ttl_ms),
                });
                delta
            }
        }
    }

    /// The value at `key` as text (a counter reads as its decimal value).
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let slot = self.entries.get(key)?;
        if !slot.live_now() {
            return None;
        }
        match &slot.value {
            Value::Counter(n) => Some(n.to_string()),
            Value::Text(text) => Some(text.to_string()),
            Value::Arrival(_) => None,
        }
    }

    /// Stores `value` if the current value is `expected`; see the WIT
    /// `state.compare-and-swap`. On a mismatch returns the current value.
    pub(crate) fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
        ttl_ms: u64,
    ) -> Result<(), Option<String>> {
        let fresh = || Slot {
            value: Value::Text(Box::from(value)),
            expires: expiry(ttl_ms),
        };
        // The current value, if `expected` it is not; `Ok` when it is.
        let judge = |slot: &Slot| -> Result<(), Option<String>> {
            match (&slot.value, slot.live_now()) {
                (Value::Text(text), true) if Some(&**text) == expected => Ok(()),
                (Value::Text(text), true) => Err(Some(text.to_string())),
                (Value::Counter(n), true) => {
                    let current = n.to_string();
                    if Some(current.as_str()) == expected {
                        Ok(())
                    } else {
                        Err(Some(current))
                    }
                }
                _ if expected.is_none() => Ok(()),
                _ => Err(None),
            }
        };
        // Fast path: the key exists; no allocation unless the swap happens.
        if let Some(mut slot) = self.entries.get_mut(key) {
            judge(&slot)?;
            *slot = fresh();
            return Ok(());
        }
        match self.entries.entry(Box::from(key)) {
            Entry::Vacant(vacant) => match expected {
                None => {
                    vacant.insert(fresh());
                    Ok(())
                }
                Some(_) => Err(None),
            },
            Entry::Occupied(mut occupied) => {
                // Another caller created it between our two lookups.
                let slot = occupied.get_mut();
                judge(slot)?;
                *slot = fresh();
                Ok(())
            }
        }
    }

    /// Removes `key`.
    pub(crate) fn remove(&self, key: &str) {
        self.entries.remove(key);
    }

    /// Moves `key`'s rate-limit arrival time to `at` unless it is later
    /// already (a shared store reported what other instances admitted).
    pub(crate) fn raise_arrival(&self, key: &str, at: Instant) {
        let now = Instant::now();
        let raised = Slot {
            value: Value::Arrival(at),
            expires: Some(at),
        };
        if let Some(mut slot) = self.entries.get_mut(key) {
            let later = match slot.value {
                Value::Arrival(current) if slot.live(now) => current >= at,
                _ => false,
            };
            if !later {
                *slot = raised;
            }
            return;
        }
        if at > now {
            self.entries.entry(Box::from(key)).or_insert(raised);
        }
    }

    /// Applies the rate limit `rate` to `cost` calls on `key`, atomically;
    /// see the WIT `state.throttle`. The key expires when the limit is full
    /// again. A key holding a counter or text starts afresh.
    pub(crate) fn throttle(&self, key: &str, rate: Rate, cost: u32) -> Throttled {
        // The clock is read with the key locked: read before, it may be
        // older than the arrival time another thread set meanwhile (this one
        // waited for the lock, or was descheduled), and a call well under
        // the rate would be refused.
        let apply = |slot: &mut Slot| {
            let now = Instant::now();
            let tat = match slot.value {
                Value::Arrival(at) if slot.live(now) => Some(at),
                _ => None,
            };
            let (decision, counted) = rate.decide(now, tat, cost);
            if let Some(at) = counted {
                *slot = Slot {
                    value: Value::Arrival(at),
                    expires: Some(at),
                };
            }
            decision
        };
        // Fast path: the key exists; no allocation.
        if let Some(mut slot) = self.entries.get_mut(key) {
            return apply(&mut slot);
        }
        match self.entries.entry(Box::from(key)) {
            Entry::Occupied(mut occupied) => apply(occupied.get_mut()),
            Entry::Vacant(vacant) => {
                let (decision, counted) = rate.decide(Instant::now(), None, cost);
                if let Some(at) = counted {
                    vacant.insert(Slot {
                        value: Value::Arrival(at),
                        expires: Some(at),
                    });
                }
                decision
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_and_expire() {
        let store = StateStore::default();
        assert_eq!(store.counter_add("a", 2, 0), 2);
        assert_eq!(store.counter_add("a", 3, 0), 5);
        assert_eq!(store.counter_add("a", -1, 0), 4);
        assert_eq!(store.get("a").as_deref(), Some("4"));
        assert_eq!(store.counter_add("w", 1, 30), 1);
        assert_eq!(store.counter_add("w", 1, 30), 2);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(store.get("w"), None, "expired counters read as absent");
        assert_eq!(store.counter_add("w", 1, 30), 1, "a new window starts at 0");
    }

    #[test]
    fn a_shared_arrival_time_only_moves_forward() {
        let store = StateStore::default();
        let limit = rate(10, 0);
        let later = Instant::now() + Duration::from_secs(5);
        store.raise_arrival("k", later);
        let refused = store.throttle("k", limit, 1);
        assert!(!refused.allowed, "another instance used the budget");
        assert!(refused.retry_after > Duration::from_secs(4));
        // An earlier time reported later does not give the budget back.
        store.raise_arrival("k", Instant::now());
        assert!(!store.throttle("k", limit, 1).allowed);
        // A time in the past creates nothing.
        store.raise_arrival("fresh", Instant::now() - Duration::from_millis(1));
        assert!(store.throttle("fresh", limit, 1).allowed);
    }

    fn rate(per_second: u64, burst: u32) -> Rate {
        Rate {
            interval: Duration::from_nanos(1_000_000_000 / per_second),
            burst,
        }
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let limit = rate(10, 2);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Three at once: the call itself plus a burst of two.
        let (first, tat) = limit.decide(t0, None, 1);
        assert!(first.allowed);
        assert_eq!(
            (first.remaining, first.ahead, first.reset),
            (2, ms(0), ms(100))
        );
        let (second, tat) = limit.decide(t0, tat, 1);
        assert_eq!(
            (second.allowed, second.remaining, second.ahead),
            (true, 1, ms(100))
        );
        let (third, tat) = limit.decide(t0, tat, 1);
        assert_eq!(
            (third.allowed, third.remaining, third.ahead),
            (true, 0, ms(200))
        );
        assert_eq!(third.reset, ms(300));
        let (fourth, none) = limit.decide(t0, tat, 1);
        assert!(!fourth.allowed);
        assert_eq!(none, None, "a refused call is not counted");
        assert_eq!((fourth.retry_after, fourth.remaining), (ms(100), 0));
        // 100 ms later one more fits, and only one.
        let (later, tat) = limit.decide(t0 + ms(100), tat, 1);
        assert!(later.allowed);
        assert!(!limit.decide(t0 + ms(100), tat, 1).0.allowed);
        // After 300 ms idle the whole burst is back.
        let (idle, _) = limit.decide(t0 + ms(500), tat, 0);
        assert_eq!((idle.allowed, idle.remaining, idle.reset), (true, 3, ms(0)));
    }

    #[test]
    fn gcra_costs_and_peeks() {
        let limit = rate(1, 4);
        let t0 = Instant::now();
        let (big, tat) = limit.decide(t0, None, 5);
        assert!(big.allowed, "cost 5 fits a burst of 4 plus 1");
        assert_eq!(big.remaining, 0);
        let (peek, unchanged) = limit.decide(t0, tat, 0);
        assert_eq!((peek.allowed, peek.remaining, unchanged), (true, 0, None));
        let (too_much, _) = limit.decide(t0, None, 6);
        assert!(!too_much.allowed);
        assert_eq!(too_much.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn throttle_reads_the_clock_under_the_lock() {
        // Threads racing on one key far below its rate (one call per
        // nanosecond, 100 beyond): each call must see the arrival time
        // the previous one left, at a time no earlier than it. A clock read
        // before the lock is older than that time whenever the thread
        // waited for the lock or was descheduled, and refuses the call.
        let store = std::sync::Arc::new(StateStore::default());
        let limit = Rate {
            interval: Duration::from_nanos(1),
            burst: 100,
        };
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let until = Instant::now() + Duration::from_millis(200);
                    let mut refused = 0u32;
                    while Instant::now() < until {
                        for _ in 0..64 {
                            refused += u32::from(!store.throttle("hot", limit, 1).allowed);
                        }
                    }
                    refused
                })
            })
            .collect();
        let refused: u32 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!(refused, 0, "calls under the rate were refused");
    }

    #[test]
    fn throttle_keys_are_shared_and_expire() {
        let store = StateStore::default();
        let limit = Rate {
            interval: Duration::from_millis(20),
            burst: 1,
        };
        assert!(store.throttle("ip:1", limit, 1).allowed);
        assert!(store.throttle("ip:1", limit, 1).allowed);
        assert!(!store.throttle("ip:1", limit, 1).allowed);
        assert!(
            store.throttle("ip:2", limit, 1).allowed,
            "keys are separate"
        );
        assert_eq!(store.get("ip:1"), None, "a limit does not read as text");
        std::thread::sleep(Duration::from_millis(50));
        store.sweep_expired();
        assert!(
            store.entries.get("ip:1").is_none(),
            "a full limit's key is dropped"
        );
        assert_eq!(store.throttle("ip:1", limit, 1).remaining, 1);
    }

    #[test]
    fn compare_and_swap_checks_the_current_value() {
        let store = StateStore::default();
        assert_eq!(store.compare_and_swap("k", Some("x"), "1", 0), Err(None));
        assert_eq!(store.compare_and_swap("k", None, "1", 0), Ok(()));
        assert_eq!(
            store.compare_and_swap("k", None, "2", 0),
            Err(Some("1".to_string()))
        );
        assert_eq!(store.compare_and_swap("k", Some("1"), "2", 0), Ok(()));
        assert_eq!(store.get("k").as_deref(), Some("2"));
        store.remove("k");
        assert_eq!(store.get("k"), None);

        // A counter compares as its decimal value.
        store.counter_add("n", 7, 0);
        assert_eq!(
            store.compare_and_swap("n", Some("8"), "x", 0),
            Err(Some("7".to_string()))
        );
        assert_eq!(
            store.compare_and_swap("n", None, "x", 0),
            Err(Some("7".to_string()))
        );
        assert_eq!(store.compare_and_swap("n", Some("7"), "x", 0), Ok(()));
        assert_eq!(store.get("n").as_deref(), Some("x"));

        // An expired value counts as absent, and the new one's expiry holds.
        assert_eq!(store.compare_and_swap("t", None, "old", 1), Ok(()));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(store.get("t"), None);
        assert_eq!(store.compare_and_swap("t", Some("old"), "x", 0), Err(None));
        assert_eq!(store.compare_and_swap("t", None, "new", 0), Ok(()));
        assert_eq!(store.get("t").as_deref(), Some("new"));
    }
}
