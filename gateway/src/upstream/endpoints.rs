//! An upstream's endpoints as every worker shares them: live load, peak-EWMA
//! latency, health, and the snapshot of candidates a balancer picks from.
//!
//! An endpoint takes traffic when all three health sources agree:
//! - passive health (nginx's `max_fails` / `fail_timeout`), fed by the
//!   proxy's failed exchanges;
//! - active checks ([`super::checks`]), HAProxy's `rise` / `fall`;
//! - outlier ejection, asked for by a plugin (`health.eject`), Envoy's
//!   outlier detection.
//!
//! One [`EndpointSet`] exists per upstream definition, shared by all worker
//! threads (each worker keeps its own connection pool), so health, rotation
//! counters and selection counts are global to the process. A reload that
//! leaves an upstream's definition unchanged keeps its set, and with it all
//! of that state.

use std::collections::BTreeMap;
use std::hash::Hasher as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::EndpointConfig;

/// Upper bound on one rotation cycle; weights are scaled down past it.
const MAX_ROTATION: u64 = 10_000;

/// Time constant of the latency average's decay, as Finagle's and linkerd's
/// peak EWMA (10 s): an endpoint that stops getting samples looks faster as
/// time passes, so a balancer tries it again.
const EWMA_DECAY_NS: f64 = 10e9;

/// One endpoint: address, configuration and live state.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Index in the upstream's `endpoints` list (the WIT's endpoint id).
    pub(crate) id: u32,
    pub(crate) addr: SocketAddr,
    /// `addr` as text, as balancers and logs see it.
    pub(crate) address: Box<str>,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    pub(crate) labels: BTreeMap<String, String>,
    /// Requests sent and still waiting for their response head.
    in_flight: AtomicU32,
    /// Requests sent to this endpoint since the config was loaded.
    selected: AtomicU64,
    /// Peak EWMA of response-head latency in microseconds, as `f64` bits.
    ewma_us: AtomicU64,
    /// When `ewma_us` was last updated, in nanoseconds since the set's epoch.
    ewma_stamp_ns: AtomicU64,
    /// Failures counted in the current `fail_timeout` window.
    fails: AtomicU32,
    /// Start of the current failure window, ms since the set's epoch (+1; 0 = none).
    fail_window_ms: AtomicU64,
    /// Down until this time, ms since the set's epoch (0 = up).
    down_until_ms: AtomicU64,
    /// Times passive health marked the endpoint down.
    ejections: AtomicU64,
    /// Taken out by a plugin until this time, ms since the set's epoch (0 = never).
    ejected_until_ms: AtomicU64,
    /// Times a plugin ejected the endpoint.
    outlier_ejections: AtomicU64,
    /// Whether active checks find the endpoint down.
    check_down: AtomicBool,
    /// Why the last failed check failed, while the endpoint is down by checks.
    check_error: Mutex<Option<String>>,
    /// Times active checks changed their verdict (up to down or back).
    check_changes: AtomicU64,
}

impl Endpoint {
    fn new(id: u32, config: &EndpointConfig) -> Endpoint {
        let address = config.addr.to_string();
        Endpoint {
            id,
            addr: config.addr,
            address: address.into_boxed_str(),
            weight: config.weight.max(1),
            backup: config.backup,
            labels: config.labels.clone(),
            in_flight: AtomicU32::new(0),
            selected: AtomicU64::new(0),
            ewma_us: AtomicU64::new(0f64.to_bits()),
            ewma_stamp_ns: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            fail_window_ms: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            outlier_ejections: AtomicU64::new(0),
            check_down: AtomicBool::new(false),
            check_error: Mutex::new(None),
            check_changes: AtomicU64::new(0),
        }
    }

    /// Counts a request as sent to this endpoint, and in flight until the
    /// returned guard drops.
    pub(crate) fn begin(&self) -> InFlightRequest<'_> {
        self.selected.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightRequest(self)
    }

    /// Requests in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether every health source lets the endpoint take traffic at `now_ms`.
    fn is_up(&self, now_ms: u64) -> bool {
        !self.check_down.load(Ordering::Relaxed)
            && self.down_until_ms.load(Ordering::Relaxed) <= now_ms
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// When the endpoint comes back by itself (its passive down time or its
    /// ejection ends), if that is after `now_ms`.
    fn back_at(&self, now_ms: u64) -> Option<u64> {
        let until = self
            .down_until_ms
            .load(Ordering::Relaxed)
            .max(self.ejected_until_ms.load(Ordering::Relaxed));
        (until > now_ms).then_some(until)
    }

    /// The latency average at `now_ns`, decayed for the time without samples.
    fn latency_ewma_us(&self, now_ns: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp_ns.load(Ordering::Relaxed);
        ewma * decay(now_ns.saturating_sub(stamp))
    }
}

/// The weight `exp(-elapsed / τ)` an old average keeps after `elapsed_ns`.
fn decay(elapsed_ns: u64) -> f64 {
    // Precision loss is irrelevant at these magnitudes.
    #[allow(clippy::cast_precision_loss)]
    let elapsed = elapsed_ns as f64;
    (-elapsed / EWMA_DECAY_NS).exp()
}

/// A request counted in its endpoint's in-flight gauge.
#[derive(Debug)]
pub(crate) struct InFlightRequest<'a>(&'a Endpoint);

impl Drop for InFlightRequest<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one turn of the core's rotation found ([`EndpointSet::rotate`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rotated<'a> {
    /// The next endpoint that is usable.
    Usable(&'a Endpoint),
    /// No candidate is usable; this is the plain next one.
    NoneUsable(&'a Endpoint),
}

/// What a balancer sees of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CandidateView {
    pub(crate) id: u32,
    pub(crate) weight: u32,
    pub(crate) in_flight: u32,
    pub(crate) latency_ewma_us: u32,
    pub(crate) backup: bool,
}

/// The endpoints able to take traffic at one moment, by position, with
/// what balancers derive from them. Rebuilt when health changes; a pick
/// holds one snapshot, so positions stay valid for the whole call.
#[derive(Debug)]
pub(crate) struct CandidateSet {
    /// Endpoint ids by position.
    pub(crate) ids: Vec<u32>,
    /// Weights by position.
    pub(crate) weights: Vec<u32>,
    /// Position of each endpoint id, `u32::MAX` when it is not a candidate.
    positions: Vec<u32>,
    /// Identifies the set: upstream, ids, addresses, weights.
    pub(crate) fingerprint: u64,
    /// One cycle of smooth weighted round-robin over the positions.
    rotation: Vec<u32>,
    /// When the set may change by itself (a down endpoint's time is up), ms
    /// since the epoch; `u64::MAX` when nothing is pending.
    valid_until_ms: u64,
    /// How many endpoints, primaries and backups, are healthy.
    healthy: u32,
}

impl CandidateSet {
    /// How many candidates there are.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The position of endpoint `id`, if it is a candidate.
    pub(crate) fn position(&self, id: u32) -> Option<u32> {
        self.positions
            .get(usize::try_from(id).ok()?)
            .copied()
            .filter(|p| *p != u32::MAX)
    }
}

/// Passive health settings, `passive = { max_fails, fail_timeout }`
/// (nginx's `max_fails` and `fail_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Passive {
    /// Failures within `fail_timeout` that mark an endpoint down; 0 disables.
    pub(crate) max_fails: u32,
    /// The failure window, and how long an endpoint stays down.
    pub(crate) fail_timeout: Duration,
}

/// A circuit breaker's state, as a plugin reports it (`health.report`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

/// Whose breaker: the plugin's name, and the endpoint id (`None`: the whole upstream).
type CircuitKey = (Arc<str>, Option<u32>);

/// The last state a breaker plugin reported, and how often it opened.
#[derive(Debug, Clone, Copy)]
struct CircuitEntry {
    state: CircuitState,
    since: Instant,
    opened: u64,
}

/// One breaker's state, for `GET /upstreams`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct CircuitStatus {
    pub(crate) state: CircuitState,
    /// Milliseconds since the state was entered.
    pub(crate) for_ms: u64,
    /// Times the breaker opened since the config was loaded.
    pub(crate) opened: u64,
}

/// An upstream's endpoints, shared by every worker.
#[derive(Debug)]
pub(crate) struct EndpointSet {
    pub(crate) name: Arc<str>,
    pub(crate) endpoints: Vec<Endpoint>,
    passive: Passive,
    epoch: Instant,
    candidates: ArcSwap<CandidateSet>,
    /// The rotation counter behind the core's round-robin and `upstream.turn`.
    turn: AtomicU64,
    /// Breaker states reported by plugins, by (plugin, endpoint id or the
    /// whole upstream). Written only on transitions.
    circuits: Mutex<BTreeMap<CircuitKey, CircuitEntry>>,
    /// Requests waiting in the upstream's queue, on every worker.
    queued: AtomicUsize,
}

/// Counts a request among those waiting in an upstream's queue
/// ([`EndpointSet::queued`]) while it is held.
#[derive(Debug)]
pub(crate) struct QueuedCount<'a>(&'a EndpointSet);

impl Drop for QueuedCount<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint's live state, for `GET /upstreams`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EndpointStatus {
    pub(crate) id: u32,
    pub(crate) address: String,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    pub(crate) labels: BTreeMap<String, String>,
    /// `up`, or `down` when any health source holds it out.
    pub(crate) health: &'static str,
    /// Milliseconds left until passive health tries the endpoint again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) down_for_ms: Option<u64>,
    /// Milliseconds left of a plugin's ejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ejected_for_ms: Option<u64>,
    /// What active checks find (`up` or `down`), when they run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) check: Option<&'static str>,
    /// Why the last check failed, while checks hold the endpoint down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) check_error: Option<String>,
    /// Times active checks took the endpoint out or brought it back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) check_changes: Option<u64>,
    /// Breaker states reported for this endpoint, by plugin.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) circuits: BTreeMap<String, CircuitStatus>,
    /// Whether balancers are offered the endpoint now.
    pub(crate) candidate: bool,
    pub(crate) in_flight: u32,
    pub(crate) latency_ewma_us: u32,
    pub(crate) selected: u64,
    /// Times passive health marked the endpoint down.
    pub(crate) ejections: u64,
    /// Times a plugin ejected it (outlier detection).
    pub(crate) outlier_ejections: u64,
}

impl EndpointSet {
    /// The endpoints of upstream `name`, all up.
    pub(crate) fn new(name: &str, configs: &[EndpointConfig], passive: Passive) -> EndpointSet {
        let endpoints: Vec<Endpoint> = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Endpoint::new(u32::try_from(i).unwrap_or(u32::MAX), c))
            .collect();
        let name: Arc<str> = Arc::from(name);
        let candidates = ArcSwap::from_pointee(build_candidates(&name, &endpoints, 0));
        EndpointSet {
            name,
            endpoints,
            passive,
            epoch: Instant::now(),
            candidates,
            turn: AtomicU64::new(0),
            circuits: Mutex::new(BTreeMap::new()),
            queued: AtomicUsize::new(0),
        }
    }

    /// Milliseconds since the epoch, plus one so that 0 can mean "never".
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// `at` in nanoseconds since the epoch.
    fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The candidates now: healthy primaries; else healthy backups; else
    /// every primary.
    pub(crate) fn candidates(&self) -> Arc<CandidateSet> {
        let set = self.candidates.load_full();
        if set.valid_until_ms == u64::MAX {
            return set;
        }
        let now = self.now_ms();
        if now < set.valid_until_ms {
            return set;
        }
        self.rebuild(now)
    }

    fn rebuild(&self, now_ms: u64) -> Arc<CandidateSet> {
        let set = Arc::new(build_candidates(&self.name, &self.endpoints, now_ms));
        self.candidates.store(set.clone());
        set
    }

    /// How many endpoints are healthy now, primaries and backups (0: the
    /// balancers are in panic mode).
    pub(crate) fn healthy(&self) -> u32 {
        self.candidates().healthy
    }

    /// Counts a request as waiting in the upstream's queue until the
    /// returned guard drops.
    pub(crate) fn count_queued(&self) -> QueuedCount<'_> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        QueuedCount(self)
    }

    /// Requests waiting in the upstream's queue now, on every worker.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The next value of the upstream's rotation counter.
    pub(crate) fn next_turn(&self) -> u64 {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// The core's own pick: nginx's smooth weighted round-robin over the candidates.
    pub(crate) fn pick_weighted(&self) -> Option<&Endpoint> {
        let set = self.candidates();
        let len = u64::try_from(set.rotation.len()).ok().filter(|l| *l > 0)?;
        let turn = usize::try_from(self.next_turn() % len).ok()?;
        let position = usize::try_from(set.rotation[turn]).ok()?;
        self.endpoints.get(usize::try_from(set.ids[position]).ok()?)
    }

    /// The core's pick for a retry: the next endpoint in the rotation that
    /// is not in `tried`, or the plain next one when every candidate was tried.
    pub(crate) fn pick_weighted_untried(&self, tried: &[u32]) -> Option<&Endpoint> {
        self.pick_weighted_where(|id| !tried.contains(&id))
    }

    /// The next endpoint in the rotation that is `usable`, or the plain
    /// next one when no candidate is. Takes one turn of the rotation
    /// however far it looks, so the endpoints it passes over are not
    /// owed turns later.
    pub(crate) fn pick_weighted_where(&self, usable: impl Fn(u32) -> bool) -> Option<&Endpoint> {
        match self.rotate(usable)? {
            Rotated::Usable(endpoint) | Rotated::NoneUsable(endpoint) => Some(endpoint),
        }
    }

    /// Like [`pick_weighted_where`](Self::pick_weighted_where), telling a
    /// usable endpoint from the plain next one; `None` when there is no
    /// candidate at all.
    pub(crate) fn rotate(&self, usable: impl Fn(u32) -> bool) -> Option<Rotated<'_>> {
        let set = self.candidates();
        let len = u64::try_from(set.rotation.len()).ok().filter(|l| *l > 0)?;
        let start = self.next_turn();
        let found = (0..len).find_map(|step| {
            let turn = usize::try_from(start.wrapping_add(step) % len).ok()?;
            let id = *set.ids.get(usize::try_from(set.rotation[turn]).ok()?)?;
            usable(id).then_some(id)
        });
        let endpoint = |id: u32| self.endpoints.get(usize::try_from(id).ok()?);
        match found {
            Some(id) => endpoint(id).map(Rotated::Usable),
            None => {
                let turn = usize::try_from(start % len).ok()?;
                endpoint(set.ids[usize::try_from(set.rotation[turn]).ok()?])
                    .map(Rotated::NoneUsable)
            }
        }
    }

    /// The endpoint at `position` of `set`.
    pub(crate) fn at(&self, set: &CandidateSet, position: usize) -> Option<&Endpoint> {
        let id = *set.ids.get(position)?;
        self.endpoints.get(usize::try_from(id).ok()?)
    }

    /// The candidate at `position` of `set`, with its live load.
    pub(crate) fn view(&self, set: &CandidateSet, position: usize) -> Option<CandidateView> {
        let endpoint = self.at(set, position)?;
        Some(CandidateView {
            id: endpoint.id,
            weight: endpoint.weight,
            in_flight: endpoint.in_flight(),
            latency_ewma_us: to_u32(endpoint.latency_ewma_us(self.now_ns())),
            backup: endpoint.backup,
        })
    }

    /// Folds a response-head latency into the endpoint's peak EWMA: a slower
    /// sample replaces the average, a faster one is blended in by how long
    /// it has been since the last. Concurrent updates may lose a sample.
    /// `at` is when the sample ended (the caller has read the clock).
    pub(crate) fn observe_latency(&self, endpoint: &Endpoint, latency: Duration, at: Instant) {
        // Precision loss is irrelevant for latencies.
        #[allow(clippy::cast_precision_loss)]
        let sample = (latency.as_nanos() as f64 / 1000.0).max(1.0);
        let now = self.ns_at(at);
        let stamp = endpoint.ewma_stamp_ns.swap(now, Ordering::Relaxed);
        let old = f64::from_bits(endpoint.ewma_us.load(Ordering::Relaxed));
        let new = if sample > old {
            sample
        } else {
            let keep = decay(now.saturating_sub(stamp));
            old * keep + sample * (1.0 - keep)
        };
        endpoint.ewma_us.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Records a request the endpoint answered: its failure count restarts.
    pub(crate) fn succeeded(&self, endpoint: &Endpoint) {
        if endpoint.fails.load(Ordering::Relaxed) != 0 {
            endpoint.fails.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed request (connect failure or timeout, broken
    /// connection): `max_fails` of them within `fail_timeout` mark the
    /// endpoint down for `fail_timeout`, as nginx does.
    pub(crate) fn failed(&self, endpoint: &Endpoint) {
        let Passive {
            max_fails,
            fail_timeout,
        } = self.passive;
        if max_fails == 0 {
            return;
        }
        let window = u64::try_from(fail_timeout.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let started = endpoint.fail_window_ms.load(Ordering::Relaxed);
        let fails = if started == 0 || now.saturating_sub(started) >= window {
            endpoint.fail_window_ms.store(now, Ordering::Relaxed);
            endpoint.fails.store(1, Ordering::Relaxed);
            1
        } else {
            endpoint.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails < max_fails {
            return;
        }
        endpoint.fails.store(0, Ordering::Relaxed);
        endpoint.fail_window_ms.store(0, Ordering::Relaxed);
        let until = now.saturating_add(window);
        let previous = endpoint.down_until_ms.swap(until, Ordering::Relaxed);
        if previous <= now {
            endpoint.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                upstream = &*self.name,
                endpoint = &*endpoint.address,
                fails,
                down_for = ?fail_timeout,
                "endpoint marked down"
            );
        }
        self.rebuild(now);
    }

    /// Takes endpoint `id` out of the candidates for `duration`, unless more
    /// than `max_percent` of the endpoints would then be ejected (one may
    /// always be). Returns whether it was ejected.
    pub(crate) fn eject(&self, id: u32, duration: Duration, max_percent: u32) -> bool {
        let Some(endpoint) = usize::try_from(id).ok().and_then(|i| self.endpoints.get(i)) else {
            return false;
        };
        let now = self.now_ms();
        let ejected = |e: &Endpoint| e.ejected_until_ms.load(Ordering::Relaxed) > now;
        if !ejected(endpoint) {
            let others = self.endpoints.iter().filter(|e| ejected(e)).count();
            let total = self.endpoints.len();
            let allowed = u64::try_from(total).unwrap_or(u64::MAX) * u64::from(max_percent);
            let wanted = u64::try_from(others + 1).unwrap_or(u64::MAX) * 100;
            if others > 0 && wanted > allowed {
                tracing::info!(
                    upstream = &*self.name,
                    endpoint = &*endpoint.address,
                    ejected = others,
                    max_percent,
                    "ejection refused: too many endpoints ejected"
                );
                return false;
            }
            endpoint.outlier_ejections.fetch_add(1, Ordering::Relaxed);
        }
        let until = now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        endpoint.ejected_until_ms.store(until, Ordering::Relaxed);
        tracing::warn!(
            upstream = &*self.name,
            endpoint = &*endpoint.address,
            ejected_for = ?duration,
            "endpoint ejected"
        );
        self.rebuild(now);
        true
    }

    /// Ends endpoint `id`'s ejection now.
    pub(crate) fn readmit(&self, id: u32) {
        let Some(endpoint) = usize::try_from(id).ok().and_then(|i| self.endpoints.get(i)) else {
            return;
        };
        let now = self.now_ms();
        if endpoint.ejected_until_ms.swap(0, Ordering::Relaxed) > now {
            tracing::info!(
                upstream = &*self.name,
                endpoint = &*endpoint.address,
                "endpoint readmitted"
            );
            self.rebuild(now);
        }
    }

    /// Records an active check's verdict; returns whether the endpoint's
    /// check state changed.
    pub(crate) fn set_checked(&self, endpoint: &Endpoint, up: bool, error: Option<String>) -> bool {
        {
            let mut last = endpoint
                .check_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *last = if up { None } else { error };
        }
        let changed = endpoint.check_down.swap(!up, Ordering::Relaxed) == up;
        if changed {
            endpoint.check_changes.fetch_add(1, Ordering::Relaxed);
            self.rebuild(self.now_ms());
        }
        changed
    }

    /// Records the breaker state plugin `plugin` reports for the upstream
    /// (`endpoint` none) or one endpoint.
    pub(crate) fn report_circuit(
        &self,
        plugin: &Arc<str>,
        endpoint: Option<u32>,
        state: CircuitState,
    ) {
        let mut circuits = self
            .circuits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = circuits
            .entry((plugin.clone(), endpoint))
            .or_insert(CircuitEntry {
                state: CircuitState::Closed,
                since: Instant::now(),
                opened: 0,
            });
        if entry.state == state {
            return;
        }
        if state == CircuitState::Open {
            entry.opened += 1;
        }
        entry.state = state;
        entry.since = Instant::now();
        drop(circuits);
        let address = endpoint
            .and_then(|id| self.endpoints.get(usize::try_from(id).ok()?))
            .map(|e| &*e.address);
        tracing::warn!(
            upstream = &*self.name,
            endpoint = address,
            plugin = &**plugin,
            ?state,
            "circuit breaker changed state"
        );
    }

    /// Breaker states reported for endpoint `endpoint` (or the upstream), by plugin.
    pub(crate) fn circuits(&self, endpoint: Option<u32>) -> BTreeMap<String, CircuitStatus> {
        let circuits = self
            .circuits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        circuits
            .iter()
            .filter(|((_, e), _)| *e == endpoint)
            .map(|((plugin, _), entry)| {
                (
                    plugin.to_string(),
                    CircuitStatus {
                        state: entry.state,
                        for_ms: u64::try_from(entry.since.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                        opened: entry.opened,
                    },
                )
            })
            .collect()
    }

    /// Every endpoint's live state; `checked` says whether active checks run.
    pub(crate) fn status(&self, checked: bool) -> Vec<EndpointStatus> {
        let set = self.candidates();
        let now_ms = self.now_ms();
        let now_ns = self.now_ns();
        self.endpoints
            .iter()
            .map(|e| {
                let left = |until: u64| (until > now_ms).then(|| until - now_ms);
                let check_down = e.check_down.load(Ordering::Relaxed);
                EndpointStatus {
                    id: e.id,
                    address: e.address.to_string(),
                    weight: e.weight,
                    backup: e.backup,
                    labels: e.labels.clone(),
                    health: if e.is_up(now_ms) { "up" } else { "down" },
                    down_for_ms: left(e.down_until_ms.load(Ordering::Relaxed)),
                    ejected_for_ms: left(e.ejected_until_ms.load(Ordering::Relaxed)),
                    check: checked.then_some(if check_down { "down" } else { "up" }),
                    check_error: e
                        .check_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone(),
                    check_changes: checked.then(|| e.check_changes.load(Ordering::Relaxed)),
                    circuits: self.circuits(Some(e.id)),
                    candidate: set.position(e.id).is_some(),
                    in_flight: e.in_flight(),
                    latency_ewma_us: to_u32(e.latency_ewma_us(now_ns)),
                    selected: e.selected.load(Ordering::Relaxed),
                    ejections: e.ejections.load(Ordering::Relaxed),
                    outlier_ejections: e.outlier_ejections.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

impl Default for Passive {
    /// nginx's defaults: one failure takes an endpoint out for 10 s.
    fn default() -> Passive {
        Passive {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

fn to_u32(value: f64) -> u32 {
    // Saturating float-to-int conversion is what `as` does.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let value = value.round() as u32;
    value
}

/// The candidates among `endpoints` at `now_ms`.
fn build_candidates(name: &str, endpoints: &[Endpoint], now_ms: u64) -> CandidateSet {
    let up = |e: &&Endpoint| e.is_up(now_ms);
    let healthy = u32::try_from(endpoints.iter().filter(up).count()).unwrap_or(u32::MAX);
    let mut chosen: Vec<&Endpoint> = endpoints.iter().filter(|e| !e.backup).filter(up).collect();
    if chosen.is_empty() {
        chosen = endpoints.iter().filter(|e| e.backup).filter(up).collect();
    }
    if chosen.is_empty() {
        // Panic mode: with nothing healthy, trying every primary beats refusing.
        chosen = endpoints.iter().filter(|e| !e.backup).collect();
    }
    let valid_until_ms = endpoints
        .iter()
        .filter_map(|e| e.back_at(now_ms))
        .min()
        .unwrap_or(u64::MAX);
    let mut positions = vec![u32::MAX; endpoints.len()];
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(name.as_bytes());
    for (position, e) in chosen.iter().enumerate() {
        if let Some(slot) = positions.get_mut(usize::try_from(e.id).unwrap_or(usize::MAX)) {
            *slot = u32::try_from(position).unwrap_or(u32::MAX);
        }
        hasher.write_u32(e.id);
        hasher.write(e.address.as_bytes());
        hasher.write_u32(e.weight);
    }
    let weights: Vec<u32> = chosen.iter().map(|e| e.weight).collect();
    CandidateSet {
        ids: chosen.iter().map(|e| e.id).collect(),
        rotation: smooth_weighted_rotation(&weights),
        weights,
        positions,
        fingerprint: hasher.finish(),
        valid_until_ms,
        healthy,
    }
}

/// One full cycle of nginx's smooth weighted round-robin: position `i`
/// appears `weights[i]` times, spread out rather than in bursts.
/// Precomputed so a pick is one atomic increment.
fn smooth_weighted_rotation(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let scale = total.div_ceil(MAX_ROTATION).max(1);
    let weights: Vec<i64> = weights
        .iter()
        .map(|w| i64::try_from((u64::from(*w) / scale).max(1)).unwrap_or(1))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut rotation = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (slot, weight) in weights.iter().enumerate() {
            current[slot] += weight;
            if current[slot] > current[best] {
                best = slot;
            }
        }
        current[best] -= total;
        rotation.push(u32::try_from(best).unwrap_or(0));
    }
    rotation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16, weight: u32, backup: bool) -> EndpointConfig {
        EndpointConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            labels: BTreeMap::default(),
            backup,
        }
    }

    fn set(endpoints: &[EndpointConfig], max_fails: u32) -> EndpointSet {
        EndpointSet::new(
            "api",
            endpoints,
            Passive {
                max_fails,
                fail_timeout: Duration::from_secs(60),
            },
        )
    }

    #[test]
    fn rotation_is_smooth() {
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(
            smooth_weighted_rotation(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(smooth_weighted_rotation(&[1, 1]), vec![0, 1]);
    }

    #[test]
    fn backups_only_when_every_primary_is_down() {
        let set = set(
            &[
                endpoint(1, 1, false),
                endpoint(2, 1, false),
                endpoint(3, 1, true),
            ],
            2,
        );
        assert_eq!(set.candidates().ids, vec![0, 1]);
        let first = &set.endpoints[0];
        set.failed(first);
        assert_eq!(
            set.candidates().ids,
            vec![0, 1],
            "one failure of two allowed"
        );
        set.failed(first);
        assert_eq!(set.candidates().ids, vec![1]);
        assert_eq!(set.candidates().position(1), Some(0));
        assert_eq!(set.candidates().position(0), None);
        let second = &set.endpoints[1];
        set.failed(second);
        set.succeeded(second);
        set.failed(second);
        assert_eq!(
            set.candidates().ids,
            vec![1],
            "a success restarts the count"
        );
        set.failed(second);
        assert_eq!(set.candidates().ids, vec![2], "the backup takes over");
        set.failed(&set.endpoints[2]);
        set.failed(&set.endpoints[2]);
        assert_eq!(
            set.candidates().ids,
            vec![0, 1],
            "panic mode: every primary"
        );
        let status = set.status(false);
        assert_eq!(status[0].health, "down");
        assert_eq!(status[0].ejections, 1);
        assert!(status[0].candidate);
    }

    #[test]
    fn fingerprint_follows_membership() {
        let set = set(&[endpoint(1, 1, false), endpoint(2, 3, false)], 1);
        let before = set.candidates().fingerprint;
        assert_eq!(before, set.candidates().fingerprint);
        set.failed(&set.endpoints[1]);
        assert_ne!(before, set.candidates().fingerprint);
    }

    #[test]
    fn core_pick_skips_down_endpoints() {
        let set = set(&[endpoint(1, 1, false), endpoint(2, 1, false)], 1);
        set.failed(&set.endpoints[0]);
        for _ in 0..4 {
            assert_eq!(set.pick_weighted().map(|e| e.id), Some(1));
        }
    }

    #[test]
    fn ewma_takes_peaks_at_once_and_decays() {
        let set = set(&[endpoint(1, 1, false)], 1);
        let e = &set.endpoints[0];
        set.observe_latency(e, Duration::from_millis(10), Instant::now());
        let now = set.now_ns();
        let seen = e.latency_ewma_us(now);
        assert!((9_000.0..=10_001.0).contains(&seen), "{seen}");
        // Ten seconds without samples: down by a factor of e.
        let later = e.latency_ewma_us(now + 10_000_000_000);
        assert!((3_600.0..=3_700.0).contains(&later), "{later}");
    }
}
