//! What a plugin keeps across instances and versions, by plugin name: its
//! shared state, the metrics it reports, and the host's call statistics.
//!
//! A live swap or a reload of a plugin with the same name keeps all three, so
//! a rate limit does not reset and counters do not jump back when a policy is
//! replaced.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use dashmap::DashMap;
use thread_local::ThreadLocal;
use tokio::sync::Semaphore;

use super::state::StateStore;

/// Every plugin's scope, by name. Touched when a plugin loads and by the
/// sweeper, never on the request path.
static SCOPES: LazyLock<DashMap<String, Arc<PluginScope>>> = LazyLock::new(DashMap::new);

/// One plugin name's state, metrics and statistics.
#[derive(Debug)]
pub(crate) struct PluginScope {
    pub(crate) name: Arc<str>,
    pub(crate) state: StateStore,
    pub(crate) metrics: GuestMetrics,
    pub(crate) stats: CallStats,
    /// Threads the plugin's long calls may run on at once: a long call (see
    /// [`super::host::LONG_CALL_TICKS`]) runs only while it holds one of
    /// these permits, and waits in line for one (its deadline running).
    pub(crate) long_calls: Arc<Semaphore>,
}

/// How many of a plugin's long calls may run at once: half the cores, at
/// least one. Calls that loop until their deadline then take at most half
/// the machine, however many requests trigger them, and the gateway's other
/// requests keep the other half; a well-behaved call ends long before it
/// needs a permit.
fn long_call_permits() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The scope of the plugin called `name`, created on first use.
pub(crate) fn scope_for(name: &str) -> Arc<PluginScope> {
    if let Some(scope) = SCOPES.get(name) {
        return scope.clone();
    }
    SCOPES
        .entry(name.to_string())
        .or_insert_with(|| {
            Arc::new(PluginScope {
                name: Arc::from(name),
                state: StateStore::default(),
                metrics: GuestMetrics::default(),
                stats: CallStats::default(),
                long_calls: Arc::new(Semaphore::new(long_call_permits())),
            })
        })
        .clone()
}

/// Drops expired state entries of every plugin.
pub(crate) fn sweep_expired() {
    for scope in SCOPES.iter() {
        scope.state.sweep_expired();
    }
}

/// Counters and gauges a plugin reports through the `metrics` import.
#[derive(Debug, Default)]
pub(crate) struct GuestMetrics {
    counters: DashMap<Box<str>, AtomicU64>,
    gauges: DashMap<Box<str>, AtomicI64>,
}

/// Most distinct metric names one plugin may create; more are dropped, so a
/// plugin cannot grow the gateway's memory through metric names.
const MAX_METRIC_NAMES: usize = 256;

impl GuestMetrics {
    /// Adds to counter `name`.
    pub(crate) fn counter_add(&self, name: &str, delta: u64) {
        if let Some(counter) = self.counters.get(name) {
            counter.fetch_add(delta, Ordering::Relaxed);
            return;
        }
        if self.counters.len() >= MAX_METRIC_NAMES {
            return;
        }
        self.counters
            .entry(metric_name(name))
            .or_default()
            .fetch_add(delta, Ordering::Relaxed);
    }

    /// Sets gauge `name`.
    pub(crate) fn gauge_set(&self, name: &str, value: i64) {
        if let Some(gauge) = self.gauges.get(name) {
            gauge.store(value, Ordering::Relaxed);
            return;
        }
        if self.gauges.len() >= MAX_METRIC_NAMES {
            return;
        }
        self.gauges
            .entry(metric_name(name))
            .or_default()
            .store(value, Ordering::Relaxed);
    }

    /// Every counter's value, by name.
    pub(crate) fn counters(&self) -> BTreeMap<String, u64> {
        self.counters
            .iter()
            .map(|e| (e.key().to_string(), e.value().load(Ordering::Relaxed)))
            .collect()
    }

    /// Every gauge's value, by name.
    pub(crate) fn gauges(&self) -> BTreeMap<String, i64> {
        self.gauges
            .iter()
            .map(|e| (e.key().to_string(), e.value().load(Ordering::Relaxed)))
            .collect()
    }
}

/// A metric name as exported: letters, digits and `_`, other characters become `_`.
fn metric_name(name: &str) -> Box<str> {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// How a plugin's calls went, counted by the host.
///
/// Each thread counts in a shard of its own, summed when read: the request
/// path never writes a cache line another worker writes (five policy calls
/// a request would otherwise bounce a plugin's counters between the cores
/// on every call).
#[derive(Debug, Default)]
pub(crate) struct CallStats {
    shards: ThreadLocal<Shard>,
}

/// One thread's counts. Only its thread writes them, so an increment is a
/// plain load and store; readers on other threads see each value whole.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    calls: AtomicU64,
    errors: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    host_call_limits: AtomicU64,
    instances: AtomicU64,
    /// Call latency: bucket `i` counts calls under 2^i microseconds (the last one the rest).
    latency: [AtomicU64; LATENCY_BUCKETS],
    /// Total call time, in nanoseconds.
    latency_sum_ns: AtomicU64,
}

/// Adds `n` to a counter only this thread writes.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

const LATENCY_BUCKETS: usize = 20;

/// Why a call failed, for the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The guest returned something the host refused (bad status, unknown upstream, ...).
    Invalid,
    /// The guest trapped (panic, unreachable, out of memory, ...).
    Trap,
    /// The call ran past its deadline.
    Deadline,
    /// The call made more host calls than the plugin's `max_host_calls`.
    HostCalls,
    /// A shared-state call failed (Redis down or slow) and the plugin's
    /// `on_error` is "closed".
    State,
}

impl CallStats {
    /// Records one call and how long it took.
    pub(crate) fn record(&self, elapsed: Duration, failure: Option<Failure>) {
        let shard = self.shards.get_or_default();
        bump(&shard.calls, 1);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - micros.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        bump(&shard.latency[bucket], 1);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        bump(&shard.latency_sum_ns, nanos);
        let Some(failure) = failure else {
            return;
        };
        bump(&shard.errors, 1);
        match failure {
            Failure::Invalid | Failure::State => {}
            Failure::Trap => bump(&shard.traps, 1),
            Failure::Deadline => bump(&shard.timeouts, 1),
            Failure::HostCalls => bump(&shard.host_call_limits, 1),
        }
    }

    /// Counts a new instance.
    pub(crate) fn instantiated(&self) {
        bump(&self.shards.get_or_default().instances, 1);
    }

    /// `field` summed over the threads' shards.
    fn sum(&self, field: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|shard| field(shard).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// The latency histogram, summed over the threads' shards.
    fn latency(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.sum(|shard| &shard.latency[i]))
    }

    /// A consistent-enough copy of the counters.
    pub(crate) fn snapshot(&self) -> CallStatsSnapshot {
        let buckets = self.latency();
        let total: u64 = buckets.iter().sum();
        let rank = total - total / 100;
        let mut seen = 0;
        let mut p99_us = 0;
        for (i, count) in buckets.iter().enumerate() {
            seen += count;
            if total > 0 && seen >= rank {
                p99_us = 1u64 << i;
                break;
            }
        }
        CallStatsSnapshot {
            calls: self.sum(|s| &s.calls),
            errors: self.sum(|s| &s.errors),
            traps: self.sum(|s| &s.traps),
            timeouts: self.sum(|s| &s.timeouts),
            host_call_limits: self.sum(|s| &s.host_call_limits),
            instances: self.sum(|s| &s.instances),
            p99_us,
        }
    }

    /// The counters with the whole latency histogram, for `/metrics`.
    pub(crate) fn totals(&self) -> CallTotals {
        let last = LATENCY_BUCKETS - 1;
        let bounds = (0..LATENCY_BUCKETS).map(|i| {
            if i == last {
                f64::INFINITY
            } else {
                (1u64 << i) as f64 / 1e6
            }
        });
        let latency: Vec<(f64, u64)> = bounds.zip(self.latency()).collect();
        CallTotals {
            calls: latency.iter().map(|&(_, n)| n).sum(),
            errors: self.sum(|s| &s.errors),
            traps: self.sum(|s| &s.traps),
            timeouts: self.sum(|s| &s.timeouts),
            host_call_limits: self.sum(|s| &s.host_call_limits),
            latency_sum_s: self.sum(|s| &s.latency_sum_ns) as f64 / 1e9,
            latency,
        }
    }
}

/// A plugin's call counters and cumulative latency buckets at one moment.
#[derive(Debug, Clone)]
pub(crate) struct CallTotals {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) traps: u64,
    pub(crate) timeouts: u64,
    pub(crate) host_call_limits: u64,
    /// Total call time, in seconds.
    pub(crate) latency_sum_s: f64,
    /// `(upper bound in seconds, calls)` per bucket; the last bound is +Inf.
    pub(crate) latency: Vec<(f64, u64)>,
}

/// Call statistics of one plugin at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct CallStatsSnapshot {
    /// Hook calls made.
    pub calls: u64,
    /// Calls that failed, for any reason.
    pub errors: u64,
    /// Calls that trapped (panic, unreachable, out of memory).
    pub traps: u64,
    /// Calls stopped at their deadline.
    pub timeouts: u64,
    /// Calls stopped for making more host calls than `max_host_calls`.
    pub host_call_limits: u64,
    /// Instances created (the first, replacements after traps, and growth under concurrency).
    pub instances: u64,
    /// Upper bound of the 99th percentile call latency, in microseconds (a power of two).
    pub p99_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_per_plugin_name() {
        let a = scope_for("scope-test-a");
        let b = scope_for("scope-test-b");
        a.state.counter_add("n", 1, 0);
        assert_eq!(b.state.get("n"), None);
        assert_eq!(
            scope_for("scope-test-a").state.get("n").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn metric_names_are_sanitised_and_bounded() {
        let metrics = GuestMetrics::default();
        metrics.counter_add("blocked requests", 2);
        metrics.counter_add("blocked requests", 1);
        assert_eq!(metrics.counters().get("blocked_requests"), Some(&3));
        for i in 0..(MAX_METRIC_NAMES + 10) {
            metrics.counter_add(&format!("m{i}"), 1);
        }
        assert_eq!(metrics.counters().len(), MAX_METRIC_NAMES);
    }

    #[test]
    fn stats_count_failures_and_estimate_p99() {
        let stats = CallStats::default();
        for _ in 0..99 {
            stats.record(Duration::from_micros(3), None);
        }
        stats.record(Duration::from_millis(5), Some(Failure::Deadline));
        let snap = stats.snapshot();
        assert_eq!((snap.calls, snap.errors, snap.timeouts), (100, 1, 1));
        assert_eq!((snap.traps, snap.host_call_limits), (0, 0));
        assert_eq!(snap.p99_us, 4, "99 of 100 calls were under 4 µs");
    }
}
