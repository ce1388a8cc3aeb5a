//! Shared state behind the `state` host imports: counters and
//! compare-and-swap values with expiry, one store per plugin name.
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
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

fn expiry(now: Instant, ttl_ms: u64) -> Option<Instant> {
    (ttl_ms > 0).then(|| now + Duration::from_millis(ttl_ms))
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
        let now = Instant::now();
        // Fast path: the key exists; no allocation.
        if let Some(mut slot) = self.entries.get_mut(key) {
            let live = slot.live(now);
            match (&mut slot.value, live) {
                (Value::Counter(n), true) => {
                    *n = n.saturating_add(delta);
                    return *n;
                }
                _ => {
                    slot.value = Value::Counter(delta);
                    slot.expires = expiry(now, ttl_ms);
                    return delta;
                }
            }
        }
        match self.entries.entry(Box::from(key)) {
            Entry::Occupied(mut occupied) => {
                // Another caller created it between our two lookups.
                let slot = occupied.get_mut();
                let live = slot.live(now);
                match (&mut slot.value, live) {
                    (Value::Counter(n), true) => {
                        *n = n.saturating_add(delta);
                        *n
                    }
                    _ => {
                        *slot = Slot {
                            value: Value::Counter(delta),
                            expires: expiry(now, ttl_ms),
                        };
                        delta
                    }
                }
            }
            Entry::Vacant(vacant) => {
                vacant.insert(Slot {
                    value: Value::Counter(delta),
                    expires: expiry(now, ttl_ms),
                });
                delta
            }
        }
    }

    /// The value at `key` as text (a counter reads as its decimal value).
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let now = Instant::now();
        let slot = self.entries.get(key)?;
        if !slot.live(now) {
            return None;
        }
        Some(match &slot.value {
            Value::Counter(n) => n.to_string(),
            Value::Text(text) => text.to_string(),
        })
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
        let now = Instant::now();
        let fresh = || Slot {
            value: Value::Text(Box::from(value)),
            expires: expiry(now, ttl_ms),
        };
        match self.entries.entry(Box::from(key)) {
            Entry::Vacant(vacant) => match expected {
                None => {
                    vacant.insert(fresh());
                    Ok(())
                }
                Some(_) => Err(None),
            },
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                let current = slot.live(now).then(|| match &slot.value {
                    Value::Counter(n) => n.to_string(),
                    Value::Text(text) => text.to_string(),
                });
                if current.as_deref() == expected {
                    *slot = fresh();
                    Ok(())
                } else {
                    Err(current)
                }
            }
        }
    }

    /// Removes `key`.
    pub(crate) fn remove(&self, key: &str) {
        self.entries.remove(key);
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
    }
}
