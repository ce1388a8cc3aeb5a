//! The state machine, driven through the host: one [`Breaker`] per
//! upstream (or endpoint) per call, its state, windows and trial counters
//! all in the host's store, so every pooled instance and every worker
//! thread shares them.
//!
//! The host is behind the [`Host`] trait: the plugin passes the real
//! imports, the tests an in-memory store with a hand-driven clock.
//!
//! Keys, under `<config hash>|u|<upstream>` or
//! `<config hash>|e|<upstream>|<id>|<address>`:
//!
//! ```text
//! |s                  the state (see crate::circuit)
//! |x                  endpoint scope: ejections in a row (expires)
//! |q                  endpoint scope: an ejection was just refused (expires)
//! |<epoch>|n          closed: outcomes seen; half-open: trial outcomes seen
//! |<epoch>|f, |s      failed, slow outcomes in the window (or the trial)
//! |<epoch>|c          failures in a row
//! |<epoch>|r<i>       count-based window: ring slot i ("0".."3")
//! |<epoch>|t<b>n/f/s  time-based window: bucket b's counters (expire)
//! |<epoch>|p          half-open: permits handed out
//! ```
//!
//! An epoch's keys are removed one transition after it ends (see
//! `cleanup_before`), so at most two epochs' keys exist at a time.

use sluice_sdk::text::push_decimal;

use crate::circuit::{self, Phase, State};
use crate::config::{Config, Scope, Window};
use crate::window::{self, Buckets, Reason, Sample, Tally};

/// What a breaker needs from the host (see the WIT `state`, `clock`,
/// `health`, `metrics` and `log` interfaces).
pub trait Host {
    /// Wall-clock milliseconds.
    fn now_ms(&self) -> u64;
    /// `state.counter-add`.
    fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64;
    /// `state.get`.
    fn get(&self, key: &str) -> Option<String>;
    /// `state.compare-and-swap`.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
        ttl_ms: u64,
    ) -> Result<(), Option<String>>;
    /// `state.remove`.
    fn remove(&self, key: &str);
    /// `health.eject`.
    fn eject(&self, endpoint: u32, duration_ms: u64, max_percent: u32) -> bool;
    /// `health.report`.
    fn report(&self, endpoint: Option<u32>, phase: Phase);
    /// `metrics.counter-add` by one.
    fn count(&self, metric: &str);
    /// `log.write` at info.
    fn info(&self, message: &str);
}

/// What `on-request` does with a request to an upstream-scope breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Forward it.
    Admit,
    /// Refuse it; the client may retry after this many seconds.
    Reject {
        /// The `Retry-After` value.
        retry_after_secs: u64,
    },
}

/// A stored state and the exact text it was read from (what a
/// compare-and-swap must expect).
#[derive(Debug, Clone)]
struct Loaded {
    raw: Option<String>,
    state: State,
}

impl Loaded {
    fn new(raw: Option<String>) -> Loaded {
        let state = State::parse(raw.as_deref());
        Loaded { raw, state }
    }
}

/// How often a caller re-reads a state that others keep changing before it
/// gives up (and admits): transitions are rare, so this is never reached in
/// practice.
const MAX_RACES: usize = 4;

/// How long an endpoint-scope breaker waits after the host refused an
/// ejection (`max_ejection_percent`) before it asks again.
const EJECT_RETRY_MS: u64 = 1_000;

/// One breaker: an upstream's, or one endpoint's.
pub struct Breaker<'a, H: Host> {
    host: &'a H,
    config: &'a Config,
    /// The prefix of every key of this breaker.
    key: String,
    /// The upstream, for log lines.
    upstream: &'a str,
    /// Endpoint scope: the endpoint's id and address.
    endpoint: Option<(u32, &'a str)>,
}

impl<'a, H: Host> Breaker<'a, H> {
    /// The breaker of upstream `upstream`; `prefix` separates configs.
    pub fn upstream(host: &'a H, config: &'a Config, prefix: &str, upstream: &'a str) -> Self {
        Breaker {
            host,
            config,
            key: [prefix, "|u|", upstream].concat(),
            upstream,
            endpoint: None,
        }
    }

    /// The breaker of endpoint `id` (at `address`) of upstream `upstream`.
    pub fn endpoint(
        host: &'a H,
        config: &'a Config,
        prefix: &str,
        upstream: &'a str,
        id: u32,
        address: &'a str,
    ) -> Self {
        Breaker {
            host,
            config,
            key: {
                let mut key = [prefix, "|e|", upstream, "|"].concat();
                push_decimal(&mut key, u64::from(id));
                key.push('|');
                key.push_str(address);
                key
            },
            upstream,
            endpoint: Some((id, address)),
        }
    }

    /// Decides whether a request may go to the upstream: closed admits;
    /// open refuses until its wait is over, then turns half-open; half-open
    /// admits exactly `permitted_half_open` requests and refuses the rest.
    pub fn admit(&self) -> Admission {
        let mut current = self.load();
        for _ in 0..MAX_RACES {
            match current.state {
                State::Closed { .. } => return Admission::Admit,
                State::Open { until_ms, .. } => {
                    let now = self.host.now_ms();
                    if !circuit::wait_over(until_ms, now, self.config.longest_open_ms()) {
                        return Admission::Reject {
                            retry_after_secs: circuit::retry_after_secs(until_ms, now),
                        };
                    }
                    let next = current.state.to_half_open(now);
                    current = self.transition(&current, next, "the wait is over");
                }
                State::HalfOpen { epoch, since_ms } => {
                    let permit = self.host.counter_add(&self.epoch_key(epoch, "p"), 1, 0);
                    if permit <= i64::from(self.config.permitted_half_open) {
                        // The permit counts only if its trial is still on: a
                        // caller that read the state just before the trial
                        // ended must not add a call to the next period.
                        let now = self.load();
                        if now.raw == current.raw {
                            return Admission::Admit;
                        }
                        current = now;
                        continue;
                    }
                    let now = self.host.now_ms();
                    if !circuit::trial_stalled(since_ms, now, self.config.half_open_stall_ms()) {
                        return Admission::Reject {
                            retry_after_secs: 1,
                        };
                    }
                    let next = current.state.to_half_open(now);
                    current =
                        self.transition(&current, next, "trial calls never reported; new trial");
                }
            }
        }
        Admission::Admit
    }

    /// Learns one outcome: counts it in the closed window (and trips when a
    /// threshold is reached), or in the half-open trial (and closes or
    /// opens again once it is complete). Outcomes while open are ignored.
    pub fn record(&self, sample: Sample) {
        let current = self.load();
        match current.state {
            State::Closed { epoch } => self.record_closed(&current, epoch, sample),
            State::HalfOpen { epoch, .. } => self.record_trial(&current, epoch, sample),
            State::Open { until_ms, .. } => {
                // Upstream scope: trial calls are admitted by `admit`; an
                // outcome now is a straggler from before the trip.
                if self.config.scope == Scope::Upstream {
                    return;
                }
                // Endpoint scope: the host readmitted the endpoint when its
                // ejection ended; its next outcomes are the trial.
                let now = self.host.now_ms();
                if !circuit::wait_over(until_ms, now, self.config.longest_open_ms()) {
                    return;
                }
                let next = current.state.to_half_open(now);
                let current = self.transition(&current, next, "the ejection is over");
                if let State::HalfOpen { epoch, .. } = current.state {
                    self.record_trial(&current, epoch, sample);
                }
            }
        }
    }

    fn record_closed(&self, current: &Loaded, epoch: u64, sample: Sample) {
        let mut reason = None;
        if self.config.consecutive_failures > 0 {
            let key = self.epoch_key(epoch, "c");
            if sample.failed {
                let run = self.host.counter_add(&key, 1, 0);
                if run >= i64::from(self.config.consecutive_failures) {
                    reason = Some(Reason::ConsecutiveFailures(to_u64(run)));
                }
            } else {
                self.host.remove(&key);
            }
        }
        if self.config.rates_enabled() {
            let tally = match self.config.window {
                Window::Count(size) => self.record_ring(epoch, sample, size),
                Window::Time { ms } => self.record_buckets(epoch, sample, ms),
            };
            if reason.is_none() {
                reason = tally.and_then(|t| window::rates_trip(t, self.config));
            }
        }
        if let Some(reason) = reason {
            self.trip(current, reason);
        }
    }

    /// Puts `sample` in the count-based window's ring; the window's tally
    /// when it is worth judging (a bad sample, or the window just reached
    /// `minimum_calls`).
    fn record_ring(&self, epoch: u64, sample: Sample, size: u32) -> Option<Tally> {
        let seq = to_u64(self.host.counter_add(&self.epoch_key(epoch, "n"), 1, 0));
        let slot = self.epoch_key_numbered(epoch, 'r', window::ring_slot(seq, size), "");
        let old = self.swap_slot(&slot, sample);
        let failures = self.adjust(epoch, "f", sample.failed, old.failed);
        let slow = self.adjust(epoch, "s", sample.slow, old.slow);
        let reached_minimum = seq == u64::from(self.config.minimum_calls);
        if !sample.is_bad() && !reached_minimum {
            return None;
        }
        Some(Tally {
            calls: window::ring_calls(seq, size),
            failures: self.total(epoch, "f", failures, self.config.failure_rate > 0),
            slow: self.total(epoch, "s", slow, self.config.slow_call_rate > 0),
        })
    }

    /// Stores `sample` in ring slot `key`; returns what the slot held. The
    /// first try guesses the slot already holds the same (the common case
    /// once the window is full), so a steady stream costs one call.
    fn swap_slot(&self, key: &str, sample: Sample) -> Sample {
        let new = sample.code();
        let mut expected = Some(new.to_string());
        for _ in 0..MAX_RACES * 2 {
            match self.host.compare_and_swap(key, expected.as_deref(), new, 0) {
                Ok(()) => return Sample::from_code(expected.as_deref()),
                Err(current) => expected = current,
            }
        }
        // Nothing was stored, so nothing is to be adjusted.
        sample
    }

    /// Moves aggregate `name` by the change of one slot's bit; its new
    /// value when it moved.
    fn adjust(&self, epoch: u64, name: &str, new: bool, old: bool) -> Option<u64> {
        let delta = i64::from(new) - i64::from(old);
        (delta != 0).then(|| {
            to_u64(
                self.host
                    .counter_add(&self.epoch_key(epoch, name), delta, 0),
            )
        })
    }

    /// Aggregate `name`: `known` if the caller just moved it, else read
    /// (0 when `needed` is false: that rate is off).
    fn total(&self, epoch: u64, name: &str, known: Option<u64>, needed: bool) -> u64 {
        if !needed {
            return 0;
        }
        known.unwrap_or_else(|| self.read(&self.epoch_key(epoch, name)))
    }

    /// Counts `sample` in the current bucket of a time-based window; after a
    /// bad sample, the window's tally (summed over its buckets).
    fn record_buckets(&self, epoch: u64, sample: Sample, window_ms: u64) -> Option<Tally> {
        let buckets = Buckets::at(self.host.now_ms(), window_ms);
        let bucket = |b: u64, name: &str| self.epoch_key_numbered(epoch, 't', b, name);
        let now = buckets.current;
        self.host.counter_add(&bucket(now, "n"), 1, buckets.ttl_ms);
        if sample.failed {
            self.host.counter_add(&bucket(now, "f"), 1, buckets.ttl_ms);
        }
        if sample.slow {
            self.host.counter_add(&bucket(now, "s"), 1, buckets.ttl_ms);
        }
        if !sample.is_bad() {
            return None;
        }
        let sum = |name: &str| -> u64 {
            buckets
                .in_window()
                .map(|b| self.read(&bucket(b, name)))
                .sum()
        };
        let calls = sum("n");
        if calls < u64::from(self.config.minimum_calls) {
            return None;
        }
        Some(Tally {
            calls,
            failures: if self.config.failure_rate > 0 {
                sum("f")
            } else {
                0
            },
            slow: if self.config.slow_call_rate > 0 {
                sum("s")
            } else {
                0
            },
        })
    }

    /// Counts one trial outcome; the last of `permitted_half_open` decides.
    /// A run of failures as long as `consecutive_failures` (or as the
    /// trial) re-opens at once.
    fn record_trial(&self, current: &Loaded, epoch: u64, sample: Sample) {
        if sample.failed {
            self.host.counter_add(&self.epoch_key(epoch, "f"), 1, 0);
        }
        if sample.slow {
            self.host.counter_add(&self.epoch_key(epoch, "s"), 1, 0);
        }
        let run_limit = window::trial_run_limit(self.config);
        if run_limit > 0 {
            let key = self.epoch_key(epoch, "c");
            if sample.failed {
                let run = to_u64(self.host.counter_add(&key, 1, 0));
                if run >= run_limit {
                    self.trip(current, Reason::ConsecutiveFailures(run));
                    return;
                }
            } else {
                self.host.remove(&key);
            }
        }
        // Counted after the failures, so whoever sees the last one sees every
        // trial call's failure counted.
        let seen = to_u64(self.host.counter_add(&self.epoch_key(epoch, "n"), 1, 0));
        let permitted = u64::from(self.config.permitted_half_open);
        if seen != permitted {
            return;
        }
        let tally = Tally {
            calls: permitted,
            failures: self.total(epoch, "f", None, self.config.failure_rate > 0),
            slow: self.total(epoch, "s", None, self.config.slow_call_rate > 0),
        };
        match window::judge(tally, self.config) {
            Some(reason) => self.trip(current, reason),
            None => {
                let why = format!("{permitted} trial calls passed");
                self.transition(current, current.state.to_closed(), &why);
            }
        }
    }

    /// Opens the breaker (one caller wins). Endpoint scope ejects the
    /// endpoint for the base time × ejections in a row; when the host
    /// refuses (too many ejected), the breaker stays closed, or starts a
    /// new trial when it was half-open.
    fn trip(&self, current: &Loaded, reason: Reason) {
        let now = self.host.now_ms();
        let Some((id, _)) = self.endpoint else {
            let open = current
                .state
                .to_open(now.saturating_add(self.config.wait_ms));
            self.transition(current, open, &reason.to_string());
            return;
        };
        // After a refusal, wait a moment before asking again: a failing
        // endpoint that cannot be ejected would otherwise ask (and the host
        // log the refusal) on every failure.
        let refused_key = format!("{}|q", self.key);
        if self.host.get(&refused_key).is_some() {
            return;
        }
        let count_key = format!("{}|x", self.key);
        let previous = self.host.get(&count_key);
        let count = previous
            .as_deref()
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let duration = self.config.ejection_ms(count);
        let open = current.state.to_open(now.saturating_add(duration));
        let open_text = open.to_string();
        if self
            .host
            .compare_and_swap(&self.state_key(), current.raw.as_deref(), &open_text, 0)
            .is_err()
        {
            return;
        }
        if !self
            .host
            .eject(id, duration, self.config.max_ejection_percent)
        {
            let back = match current.state {
                State::HalfOpen { .. } => open.to_half_open(now),
                _ => State::Closed {
                    epoch: current.state.epoch(),
                },
            };
            let restored = self.host.compare_and_swap(
                &self.state_key(),
                Some(&open_text),
                &back.to_string(),
                0,
            );
            if restored.is_ok() && back.phase() == Phase::HalfOpen {
                // The new trial skips an epoch, so the old trial's counters
                // would be missed by the usual cleanup.
                self.cleanup(current.state.epoch());
            }
            // The host logs the refusal; a failing endpoint that cannot be
            // ejected would otherwise log once per failure here too.
            let _ = self
                .host
                .compare_and_swap(&refused_key, None, "1", EJECT_RETRY_MS);
            self.host.count("breaker_eject_refused");
            return;
        }
        // Forgotten once the endpoint has gone `max_ejection_time` without an ejection.
        let forget_ms = duration.saturating_add(self.config.max_ejection_ms);
        let _ = self.host.compare_and_swap(
            &count_key,
            previous.as_deref(),
            &count.to_string(),
            forget_ms,
        );
        self.cleanup_before(current.state);
        self.announce(
            open,
            &format!("{reason}; ejected for {duration}ms (ejection {count} in a row)"),
        );
    }

    /// Replaces `current` by `next` if nobody changed it meanwhile; the
    /// winner clears the old epoch's counters and reports. Returns the
    /// state now stored (`next`, or what someone else stored).
    fn transition(&self, current: &Loaded, next: State, why: &str) -> Loaded {
        let text = next.to_string();
        match self
            .host
            .compare_and_swap(&self.state_key(), current.raw.as_deref(), &text, 0)
        {
            Ok(()) => {
                self.cleanup_before(current.state);
                if next.phase() != current.state.phase() {
                    self.announce(next, why);
                }
                Loaded {
                    raw: Some(text),
                    state: next,
                }
            }
            Err(seen) => Loaded::new(seen),
        }
    }

    /// Reports a new phase to the host, counts it and logs why.
    fn announce(&self, state: State, why: &str) {
        let phase = state.phase();
        self.report(phase);
        let (metric, word) = match phase {
            Phase::Open => ("breaker_opened", "opened"),
            Phase::HalfOpen => ("breaker_half_opened", "half-open"),
            Phase::Closed => ("breaker_closed", "closed"),
        };
        self.host.count(metric);
        self.host
            .info(&format!("{}: circuit {word}: {why}", self.name()));
    }

    /// Tells the host the breaker's phase. The compare-and-swap and the
    /// report are two steps, so a caller delayed between them could report
    /// a phase that a later transition (reported first) already ended;
    /// reading the state back after each report, and reporting again until
    /// they agree, leaves the host with the phase the breaker really has.
    fn report(&self, phase: Phase) {
        let endpoint = self.endpoint.map(|(id, _)| id);
        let mut phase = phase;
        for _ in 0..MAX_RACES {
            self.host.report(endpoint, phase);
            let now = self.load().state.phase();
            if now == phase {
                return;
            }
            phase = now;
        }
    }

    /// On leaving `left`, removes the counters of the epoch before it. Not
    /// those of `left` itself: callers that read the state just before the
    /// transition may still be writing them, and would bring removed keys
    /// back for good. One transition later they are long done.
    fn cleanup_before(&self, left: State) {
        if let Some(previous) = left.epoch().checked_sub(1) {
            self.cleanup(previous);
        }
    }

    /// Removes every counter of `epoch`: a closed window's or a trial's.
    /// (Time-based buckets expire by themselves.)
    fn cleanup(&self, epoch: u64) {
        if let Window::Count(size) = self.config.window
            && self.config.rates_enabled()
        {
            let seen = self.read(&self.epoch_key(epoch, "n"));
            for slot in 0..window::ring_calls(seen, size) {
                self.host
                    .remove(&self.epoch_key_numbered(epoch, 'r', slot, ""));
            }
        }
        for name in ["n", "f", "s", "c", "p"] {
            self.host.remove(&self.epoch_key(epoch, name));
        }
    }

    fn load(&self) -> Loaded {
        Loaded::new(self.host.get(&self.state_key()))
    }

    /// A counter's value (0 when absent).
    fn read(&self, key: &str) -> u64 {
        self.host
            .get(key)
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(0, to_u64)
    }

    // Keys are built without `format!`: a breaker makes several per
    // request, and `core::fmt` was the largest share of the guests' own
    // time in the edge chain's profile.

    fn state_key(&self) -> String {
        [&self.key, "|s"].concat()
    }

    /// `<key>|<epoch>|<name>`.
    fn epoch_key(&self, epoch: u64, name: &str) -> String {
        let mut key = self.epoch_prefix(epoch, name.len());
        key.push_str(name);
        key
    }

    /// `<key>|<epoch>|<kind><number><name>`, as `…|r3` or `…|t17n`.
    fn epoch_key_numbered(&self, epoch: u64, kind: char, number: u64, name: &str) -> String {
        let mut key = self.epoch_prefix(epoch, 21 + name.len());
        key.push(kind);
        push_decimal(&mut key, number);
        key.push_str(name);
        key
    }

    /// `<key>|<epoch>|`, with room for `more` bytes.
    fn epoch_prefix(&self, epoch: u64, more: usize) -> String {
        let mut key = String::with_capacity(self.key.len() + 22 + more);
        key.push_str(&self.key);
        key.push('|');
        push_decimal(&mut key, epoch);
        key.push('|');
        key
    }

    /// What log lines call this breaker.
    fn name(&self) -> String {
        match self.endpoint {
            None => format!("upstream {:?}", self.upstream),
            Some((id, address)) => {
                format!("endpoint {address} (#{id}) of upstream {:?}", self.upstream)
            }
        }
    }
}

/// A counter's value as unsigned (a negative one, which the breaker never
/// makes, reads as 0).
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Value {
        Counter(i64),
        Text(String),
    }

    /// Something a test does in the middle of a breaker's call.
    type Hook = Box<dyn FnOnce(&FakeHost)>;

    /// The host's store semantics (expiry included) on a hand-driven clock,
    /// and a record of what the breaker told the host.
    #[derive(Default)]
    struct FakeHost {
        now: Cell<u64>,
        store: RefCell<HashMap<String, (Value, Option<u64>)>>,
        /// Endpoints ejected: id → until.
        ejected: RefCell<HashMap<u32, u64>>,
        /// How many endpoints the upstream has (for max_percent).
        endpoints: Cell<u32>,
        ejections: RefCell<Vec<(u32, u64)>>,
        reports: RefCell<Vec<(Option<u32>, Phase)>>,
        metrics: RefCell<HashMap<String, u64>>,
        calls: Cell<u64>,
        /// Runs once, just before the next half-open permit is taken.
        before_permit: RefCell<Option<Hook>>,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            let host = FakeHost::default();
            host.now.set(1_700_000_000_000);
            host.endpoints.set(3);
            host
        }

        fn advance(&self, ms: u64) {
            self.now.set(self.now.get() + ms);
        }

        fn live(&self, key: &str) -> Option<Value> {
            let now = self.now.get();
            let store = self.store.borrow();
            let (value, expires) = store.get(key)?;
            expires.is_none_or(|at| at > now).then(|| value.clone())
        }

        fn expiry(&self, ttl_ms: u64) -> Option<u64> {
            (ttl_ms > 0).then(|| self.now.get() + ttl_ms)
        }

        fn keys(&self) -> usize {
            let now = self.now.get();
            self.store
                .borrow()
                .values()
                .filter(|(_, e)| e.is_none_or(|at| at > now))
                .count()
        }

        fn metric(&self, name: &str) -> u64 {
            self.metrics.borrow().get(name).copied().unwrap_or(0)
        }

        fn last_report(&self) -> Option<(Option<u32>, Phase)> {
            self.reports.borrow().last().copied()
        }

        fn take_calls(&self) -> u64 {
            self.calls.replace(0)
        }
    }

    impl Host for FakeHost {
        fn now_ms(&self) -> u64 {
            self.now.get()
        }

        fn counter_add(&self, key: &str, delta: i64, ttl_ms: u64) -> i64 {
            self.calls.set(self.calls.get() + 1);
            if key.ends_with("|p") {
                let hook = self.before_permit.borrow_mut().take();
                if let Some(hook) = hook {
                    hook(self);
                }
            }
            let next = match self.live(key) {
                Some(Value::Counter(n)) => {
                    let expires = self.store.borrow()[key].1;
                    self.store
                        .borrow_mut()
                        .insert(key.to_string(), (Value::Counter(n + delta), expires));
                    return n + delta;
                }
                _ => delta,
            };
            let expires = self.expiry(ttl_ms);
            self.store
                .borrow_mut()
                .insert(key.to_string(), (Value::Counter(next), expires));
            next
        }

        fn get(&self, key: &str) -> Option<String> {
            self.calls.set(self.calls.get() + 1);
            self.live(key).map(|v| match v {
                Value::Counter(n) => n.to_string(),
                Value::Text(t) => t,
            })
        }

        fn compare_and_swap(
            &self,
            key: &str,
            expected: Option<&str>,
            value: &str,
            ttl_ms: u64,
        ) -> Result<(), Option<String>> {
            let current = self.get(key);
            if current.as_deref() != expected {
                return Err(current);
            }
            let expires = self.expiry(ttl_ms);
            self.store
                .borrow_mut()
                .insert(key.to_string(), (Value::Text(value.to_string()), expires));
            Ok(())
        }

        fn remove(&self, key: &str) {
            self.calls.set(self.calls.get() + 1);
            self.store.borrow_mut().remove(key);
        }

        fn eject(&self, endpoint: u32, duration_ms: u64, max_percent: u32) -> bool {
            let now = self.now.get();
            let mut ejected = self.ejected.borrow_mut();
            ejected.retain(|_, until| *until > now);
            let others = ejected.keys().filter(|id| **id != endpoint).count() as u64;
            if !ejected.contains_key(&endpoint)
                && others > 0
                && (others + 1) * 100 > u64::from(self.endpoints.get()) * u64::from(max_percent)
            {
                return false;
            }
            ejected.insert(endpoint, now + duration_ms);
            self.ejections.borrow_mut().push((endpoint, duration_ms));
            true
        }

        fn report(&self, endpoint: Option<u32>, phase: Phase) {
            self.reports.borrow_mut().push((endpoint, phase));
        }

        fn count(&self, metric: &str) {
            *self
                .metrics
                .borrow_mut()
                .entry(metric.to_string())
                .or_insert(0) += 1;
        }

        fn info(&self, _message: &str) {}
    }

    const FAIL: Sample = Sample {
        failed: true,
        slow: false,
    };
    const OK: Sample = Sample {
        failed: false,
        slow: false,
    };
    const SLOW: Sample = Sample {
        failed: false,
        slow: true,
    };

    fn config(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    fn state(host: &FakeHost, breaker: &Breaker<'_, FakeHost>) -> State {
        State::parse(host.get(&breaker.state_key()).as_deref())
    }

    #[test]
    fn consecutive_failures_trip_exactly_and_a_success_resets_the_run() {
        let host = FakeHost::new();
        let config = config(r#"{"consecutive_failures": 3, "wait_duration": "10s"}"#);
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        breaker.record(FAIL);
        breaker.record(FAIL);
        breaker.record(OK);
        breaker.record(FAIL);
        breaker.record(FAIL);
        assert_eq!(breaker.admit(), Admission::Admit);
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
        assert_eq!(host.last_report(), Some((None, Phase::Open)));
        assert_eq!(host.metric("breaker_opened"), 1);
        assert_eq!(
            breaker.admit(),
            Admission::Reject {
                retry_after_secs: 10
            }
        );
        host.advance(9_001);
        assert_eq!(
            breaker.admit(),
            Admission::Reject {
                retry_after_secs: 1
            }
        );
        // Stragglers while open change nothing.
        breaker.record(FAIL);
        breaker.record(OK);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
        assert_eq!(host.metric("breaker_opened"), 1);
    }

    #[test]
    fn half_open_admits_exactly_the_permitted_then_judges_them() {
        let host = FakeHost::new();
        let config = config(
            r#"{"consecutive_failures": 1, "failure_rate": 50, "permitted_half_open": 4, "wait_duration": "1s"}"#,
        );
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
        host.advance(1_000);
        let admitted = (0..10)
            .filter(|_| breaker.admit() == Admission::Admit)
            .count();
        assert_eq!(admitted, 4);
        assert_eq!(host.last_report(), Some((None, Phase::HalfOpen)));
        // consecutive_failures 1 → a single failed trial call re-opens.
        breaker.record(OK);
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
        assert_eq!(host.metric("breaker_opened"), 2);

        host.advance(1_000);
        for _ in 0..4 {
            assert_eq!(breaker.admit(), Admission::Admit);
        }
        assert_eq!(
            breaker.admit(),
            Admission::Reject {
                retry_after_secs: 1
            }
        );
        for _ in 0..4 {
            breaker.record(OK);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        assert_eq!(host.last_report(), Some((None, Phase::Closed)));
        assert_eq!(breaker.admit(), Admission::Admit);
    }

    /// Keys of `epoch` still in the store.
    fn epoch_keys(host: &FakeHost, epoch: u64) -> Vec<String> {
        let marker = format!("|{epoch}|");
        let now = host.now.get();
        let mut keys: Vec<String> = host
            .store
            .borrow()
            .iter()
            .filter(|(k, (_, e))| k.contains(&marker) && e.is_none_or(|at| at > now))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn an_epoch_is_cleared_one_transition_after_it_ends() {
        let host = FakeHost::new();
        let config = config(
            r#"{"failure_rate": 50, "window": 4, "permitted_half_open": 2, "wait_duration": "1s"}"#,
        );
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        for _ in 0..4 {
            breaker.record(FAIL);
        }
        assert_eq!(
            state(&host, &breaker),
            State::parse(Some("o:1:1700000001000"))
        );
        // Late writers of the closed window may still be at it: kept.
        assert_eq!(
            epoch_keys(&host, 0).len(),
            4 + 2,
            "{:?}",
            epoch_keys(&host, 0)
        );
        host.advance(1_000);
        assert_eq!(breaker.admit(), Admission::Admit);
        assert_eq!(epoch_keys(&host, 0), Vec::<String>::new());
        breaker.admit();
        breaker.record(OK);
        breaker.record(OK);
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        assert!(!epoch_keys(&host, 2).is_empty());
        // Many more cycles: nothing piles up.
        for _ in 0..50 {
            for _ in 0..4 {
                breaker.record(FAIL);
            }
            host.advance(1_000);
            breaker.admit();
            breaker.admit();
            breaker.record(OK);
            breaker.record(OK);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        assert!(host.keys() <= 1 + 6 + 5, "{:?}", host.store.borrow());
    }

    #[test]
    fn a_permit_taken_as_the_trial_ends_is_void() {
        let host = FakeHost::new();
        let config = config(
            r#"{"consecutive_failures": 1, "permitted_half_open": 3, "wait_duration": "1s"}"#,
        );
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        breaker.record(FAIL);
        host.advance(1_000);
        assert_eq!(breaker.admit(), Admission::Admit);
        // Another caller's failed trial call re-opens the breaker between
        // this caller's read of the state and its taking a permit.
        let reopened = State::Open {
            epoch: 3,
            until_ms: host.now.get() + 1_000,
        };
        let state_key = breaker.state_key();
        *host.before_permit.borrow_mut() = Some(Box::new(move |h: &FakeHost| {
            h.store
                .borrow_mut()
                .insert(state_key, (Value::Text(reopened.to_string()), None));
        }));
        assert_eq!(
            breaker.admit(),
            Admission::Reject {
                retry_after_secs: 1
            }
        );
        assert!(host.before_permit.borrow().is_none(), "the race happened");
    }

    #[test]
    fn half_open_rate_decides_when_every_trial_call_is_in() {
        let host = FakeHost::new();
        let config = config(
            r#"{"failure_rate": 50, "window": 4, "permitted_half_open": 4, "wait_duration": "1s"}"#,
        );
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        for _ in 0..4 {
            breaker.record(FAIL);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
        host.advance(1_000);
        for _ in 0..4 {
            breaker.admit();
        }
        breaker.record(FAIL);
        breaker.record(OK);
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::HalfOpen);
        breaker.record(OK);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open, "2 of 4 = 50%");
        host.advance(1_000);
        for _ in 0..4 {
            breaker.admit();
        }
        for sample in [FAIL, OK, OK, OK] {
            breaker.record(sample);
        }
        assert_eq!(
            state(&host, &breaker).phase(),
            Phase::Closed,
            "1 of 4 = 25%"
        );
    }

    #[test]
    fn a_stalled_trial_hands_out_new_permits() {
        let host = FakeHost::new();
        let config = config(
            r#"{"consecutive_failures": 1, "permitted_half_open": 2, "wait_duration": "1s", "slow_call_duration": "2s"}"#,
        );
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        breaker.record(FAIL);
        host.advance(1_000);
        assert_eq!(breaker.admit(), Admission::Admit);
        assert_eq!(breaker.admit(), Admission::Admit);
        host.advance(1_999);
        assert!(matches!(breaker.admit(), Admission::Reject { .. }));
        host.advance(1);
        assert_eq!(breaker.admit(), Admission::Admit, "two permits anew");
        assert_eq!(breaker.admit(), Admission::Admit);
        assert!(matches!(breaker.admit(), Admission::Reject { .. }));
        assert_eq!(
            host.metric("breaker_half_opened"),
            1,
            "still one half-open period"
        );
    }

    #[test]
    fn count_window_trips_on_the_rate_over_the_last_n() {
        let host = FakeHost::new();
        let config = config(r#"{"failure_rate": 50, "window": 10, "minimum_calls": 10}"#);
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        // 4 failures in the first 10: 40%.
        for i in 0..10 {
            breaker.record(if i % 3 == 0 { FAIL } else { OK });
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        // Ten more calls, all good: the old failures leave the window.
        for _ in 0..10 {
            breaker.record(OK);
        }
        let failures = breaker.read(&breaker.epoch_key(0, "f"));
        assert_eq!(failures, 0);
        // Now four failures replace four successes: 40%, then 50% trips.
        for _ in 0..4 {
            breaker.record(FAIL);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
    }

    #[test]
    fn reaching_the_minimum_is_judged_even_on_a_success() {
        let host = FakeHost::new();
        let config = config(r#"{"failure_rate": 50, "window": 10, "minimum_calls": 4}"#);
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        for sample in [FAIL, FAIL, FAIL] {
            breaker.record(sample);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        breaker.record(OK);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open, "3 of 4");
    }

    #[test]
    fn a_success_costs_few_host_calls() {
        let host = FakeHost::new();
        let config = config(r#"{"failure_rate": 50, "window": 5}"#);
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        for _ in 0..10 {
            breaker.record(OK);
        }
        host.take_calls();
        breaker.record(OK);
        // get state, counter_add, one compare-and-swap (its inner get is the fake's).
        assert_eq!(host.take_calls(), 3);
        breaker.admit();
        assert_eq!(host.take_calls(), 1, "closed: one get");
    }

    #[test]
    fn slow_calls_trip() {
        let host = FakeHost::new();
        let config = config(
            r#"{"slow_call_rate": 50, "slow_call_duration": "50ms", "failure_rate": 0, "window": 4}"#,
        );
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        for sample in [OK, SLOW, OK] {
            breaker.record(sample);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        breaker.record(SLOW);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
    }

    #[test]
    fn time_window_counts_only_recent_outcomes() {
        let host = FakeHost::new();
        let config =
            config(r#"{"failure_rate": 50, "window_duration": "10s", "minimum_calls": 4}"#);
        let breaker = Breaker::upstream(&host, &config, "p", "app");
        for _ in 0..3 {
            breaker.record(FAIL);
        }
        host.advance(11_000);
        breaker.record(FAIL);
        assert_eq!(
            state(&host, &breaker).phase(),
            Phase::Closed,
            "old ones expired"
        );
        for _ in 0..4 {
            breaker.record(OK);
        }
        host.advance(2_000);
        breaker.record(FAIL);
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed, "3 of 7");
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open, "4 of 8");
    }

    #[test]
    fn endpoint_scope_ejects_longer_each_time_and_forgets() {
        let host = FakeHost::new();
        let config = config(
            r#"{"scope": "endpoint", "consecutive_failures": 2, "failure_rate": 0, "slow_call_rate": 0,
                "wait_duration": "10s", "max_ejection_time": "25s", "permitted_half_open": 3}"#,
        );
        let breaker = Breaker::endpoint(&host, &config, "p", "app", 1, "127.0.0.1:1");
        assert_eq!(breaker.admit(), Admission::Admit);
        breaker.record(FAIL);
        breaker.record(FAIL);
        assert_eq!(host.ejections.borrow().as_slice(), &[(1, 10_000)]);
        assert_eq!(host.last_report(), Some((Some(1), Phase::Open)));
        // The host readmits after 10 s; the next outcome starts the trial.
        host.advance(10_000);
        breaker.record(FAIL);
        assert_eq!(state(&host, &breaker).phase(), Phase::HalfOpen);
        breaker.record(FAIL);
        assert_eq!(
            host.ejections.borrow().last(),
            Some(&(1, 20_000)),
            "second ejection in a row: twice as long"
        );
        host.advance(20_000);
        for _ in 0..2 {
            breaker.record(FAIL);
        }
        assert_eq!(host.ejections.borrow().last(), Some(&(1, 25_000)), "capped");
        host.advance(25_000);
        for _ in 0..3 {
            breaker.record(OK);
        }
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
        assert_eq!(host.last_report(), Some((Some(1), Phase::Closed)));
        // Not ejected for max_ejection_time: the count is forgotten.
        host.advance(25_000);
        breaker.record(FAIL);
        breaker.record(FAIL);
        assert_eq!(host.ejections.borrow().last(), Some(&(1, 10_000)));
    }

    #[test]
    fn a_refused_ejection_keeps_the_endpoint_closed() {
        let host = FakeHost::new();
        let config = config(
            r#"{"scope": "endpoint", "consecutive_failures": 1, "max_ejection_percent": 34}"#,
        );
        let first = Breaker::endpoint(&host, &config, "p", "app", 0, "127.0.0.1:1");
        let second = Breaker::endpoint(&host, &config, "p", "app", 1, "127.0.0.1:2");
        first.record(FAIL);
        assert_eq!(state(&host, &first).phase(), Phase::Open);
        second.record(FAIL);
        assert_eq!(state(&host, &second).phase(), Phase::Closed);
        assert_eq!(host.metric("breaker_eject_refused"), 1);
        assert_eq!(host.reports.borrow().as_slice(), &[(Some(0), Phase::Open)]);
        // It does not ask again on every failure...
        second.record(FAIL);
        assert_eq!(host.metric("breaker_eject_refused"), 1);
        // ...but after a moment.
        host.advance(1_000);
        second.record(FAIL);
        assert_eq!(host.metric("breaker_eject_refused"), 2);
        assert_eq!(state(&host, &second).phase(), Phase::Closed);
        // Once the first is back, the second can go.
        host.advance(60_000);
        second.record(FAIL);
        assert_eq!(state(&host, &second).phase(), Phase::Open);
    }

    #[test]
    fn endpoint_scope_outcomes_while_ejected_are_ignored() {
        let host = FakeHost::new();
        let config = config(
            r#"{"scope": "endpoint", "consecutive_failures": 1, "wait_duration": "1s", "permitted_half_open": 2}"#,
        );
        let breaker = Breaker::endpoint(&host, &config, "p", "app", 2, "127.0.0.1:3");
        breaker.record(FAIL);
        breaker.record(OK);
        breaker.record(OK);
        assert_eq!(state(&host, &breaker).phase(), Phase::Open);
        host.advance(1_000);
        breaker.record(OK);
        breaker.record(OK);
        assert_eq!(state(&host, &breaker).phase(), Phase::Closed);
    }

    #[test]
    fn configs_and_breakers_do_not_share_keys() {
        let host = FakeHost::new();
        let config = config(r#"{"consecutive_failures": 1}"#);
        Breaker::upstream(&host, &config, "p", "a").record(FAIL);
        let b = Breaker::upstream(&host, &config, "p", "b");
        assert_eq!(b.admit(), Admission::Admit);
        let other = Breaker::upstream(&host, &config, "q", "a");
        assert_eq!(other.admit(), Admission::Admit);
        let a = Breaker::upstream(&host, &config, "p", "a");
        assert!(matches!(a.admit(), Admission::Reject { .. }));
    }
}
