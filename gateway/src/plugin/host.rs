//! Per-instance store data and the host side of every WIT import: the
//! request, response, upstream and candidates resources, shared state, clock,
//! random, log, metrics, geo and health.
//!
//! The request a hook sees is not copied into the guest: the chain moves the
//! request head into the instance's store for the call ([`Ctx::request`]) and
//! takes it back after, and each getter copies only the field asked for.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::sluice::policy::{
    clock, geo, health, hooks, log, metrics, random, state, types,
};
use super::engine::EPOCH_TICK;
use super::geo::GeoDatabase;
use super::scope::PluginScope;
use super::shared_state::{RedisStore, StateError};
use super::state::{Rate, StateStore};
use super::{OnError, PluginSpec};
use crate::upstream::{CandidateSet, CircuitState, Directory, EndpointSet, Passive};

/// The longest hold `request.delay` may ask for.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(60);

/// A call still running at this many epoch ticks is a long call: it runs
/// on only while it holds one of its plugin's permits
/// ([`PluginScope::long_calls`]), in turns of [`TURN_TICKS`]. A tick counts
/// only when the guest is running as it passes (time spent yielded does
/// not), so a call of a few microseconds is almost never long, and a call
/// that spins is long within about two ticks (2 ms).
pub(crate) const LONG_CALL_TICKS: u32 = 2;

/// How many ticks a long call runs with a permit before it gives it back to
/// the plugin's long calls waiting in line (if any) and lines up again: a
/// turn of 10 ms, the default deadline. Shorter turns hand the permit, and
/// with it the spinning, from thread to thread more often, which costs the
/// gateway's other requests: beside a flood of looping calls, the other
/// route of `tests/tests/hostile_plugins.rs` kept 70-80% of what it keeps
/// beside ordinary traffic with calls holding their permit to the end,
/// 45-71% with 2 ms turns and 32-72% with turns of one tick (two busy
/// cores). Longer turns make a call that only just became long (or a plugin
/// with a long deadline) wait longer for its turn.
const TURN_TICKS: u32 = (TURN.as_micros() / EPOCH_TICK.as_micros()) as u32;
/// A long call's turn (see [`TURN_TICKS`]).
const TURN: Duration = Duration::from_millis(10);

/// Whole epoch ticks in `budget` (in integers a constant divides: `arm`
/// runs on every call).
fn ticks_in(budget: Duration) -> u32 {
    const TICK_US: u64 = EPOCH_TICK.as_micros() as u64;
    let micros = budget
        .as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(budget.subsec_micros()));
    u32::try_from(micros / TICK_US).unwrap_or(u32::MAX)
}

/// A hook call made more host calls than its plugin's `max_host_calls`: the
/// host stops the call there (as a trap would) and discards the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("made more than {0} host calls in one call")]
pub(crate) struct HostCallLimit(pub(crate) u32);

/// A request head lent to a hook call.
#[derive(Debug)]
pub(crate) struct RequestState {
    /// Method, URI, headers and extensions, as they will be forwarded.
    pub(crate) parts: http::request::Parts,
    /// The TCP peer.
    pub(crate) client_ip: IpAddr,
    /// Whether the client connected over TLS.
    pub(crate) https: bool,
    /// The route that matched.
    pub(crate) route: Arc<str>,
    /// The upstream the request goes to, after steering so far.
    pub(crate) upstream: Arc<EndpointSet>,
    /// The endpoint the balancer picked, once it has.
    pub(crate) endpoint: Option<SocketAddr>,
    /// Every upstream of the config serving the request, for `health.healthy`.
    pub(crate) directory: Directory,
    /// How long to hold the request before forwarding (`request.delay`).
    pub(crate) delay: Duration,
}

impl RequestState {
    /// An empty request, standing in for one a failed call could not give back.
    pub(crate) fn placeholder() -> RequestState {
        RequestState {
            parts: http::Request::new(()).into_parts().0,
            client_ip: IpAddr::from([0, 0, 0, 0]),
            https: false,
            route: Arc::from(""),
            upstream: Arc::new(EndpointSet::new("", &[], Passive::default())),
            endpoint: None,
            directory: Arc::from([]),
            delay: Duration::ZERO,
        }
    }

    /// A copy of the head without extensions, for hooks that run after the
    /// original went upstream.
    pub(crate) fn copy_head(&self) -> RequestState {
        RequestState {
            parts: copy_parts(&self.parts),
            client_ip: self.client_ip,
            https: self.https,
            route: self.route.clone(),
            upstream: self.upstream.clone(),
            endpoint: self.endpoint,
            directory: self.directory.clone(),
            delay: self.delay,
        }
    }
}

/// A copy of a request head without its extensions (which cannot be cloned).
pub(crate) fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut copy = http::Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// Type of the `request` resource: the data lives in [`Ctx::request`].
pub struct RequestHandle;
/// Type of the `response` resource: the data lives in [`Ctx::response`].
pub struct ResponseHandle;
/// Type of the `upstream` resource: the data lives in [`Ctx::upstream`].
pub struct UpstreamHandle;
/// Type of the `candidates` resource: the data lives in [`Ctx::candidates`].
pub struct CandidatesHandle;

/// What a store holds: WASI (with nothing granted), limits, the plugin's
/// scope, and the values lent to the current call.
pub(crate) struct Ctx {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub(crate) scope: Arc<PluginScope>,
    /// When the current call must end, once it has run for
    /// `deadline_ticks` (see [`Ctx::out_of_time`]).
    deadline: Instant,
    /// Whole epoch ticks in the current call's budget.
    deadline_ticks: u32,
    /// Epoch ticks the current call has run through (see [`LONG_CALL_TICKS`]).
    ticks: u32,
    /// Ticks a long call has run in its current turn (see [`TURN_TICKS`]).
    turn: u32,
    /// A long call's permit for its current turn, put here by the wait that
    /// got it; given back at the start of its next turn and when the call
    /// ends ([`Ctx::end_call`], or the store is dropped).
    long_permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// How much more time waiting on the shared state backend may still add
    /// to `deadline` in the current call: at most one `[state] timeout` per
    /// call, so a plugin looping on state calls is still stopped.
    state_grace: Duration,
    /// The plugin's `max_host_calls`: most host calls one call may make.
    max_host_calls: u32,
    /// Host calls the current call may still make.
    host_calls_left: u32,
    pub(crate) request: Option<RequestState>,
    pub(crate) response: Option<http::response::Parts>,
    pub(crate) upstream: Option<Arc<EndpointSet>>,
    pub(crate) candidates: Option<Arc<CandidateSet>>,
    /// The config's upstreams, lent to `on-outcome` (other hooks read the request's).
    pub(crate) directory: Option<Directory>,
    /// The `[geo] database`, when the manifest names one.
    geo: Option<Arc<GeoDatabase>>,
    /// The hooks the guest said it does nothing in (`hooks.skip`); read
    /// after the first instance's `init`.
    pub(crate) skipped: SkippedHooks,
    /// The shared (Redis) store behind `state`, when the plugin uses one.
    shared: Option<Arc<RedisStore>>,
    /// What a failed shared-state call means: answer from in-process state
    /// (open) or fail the call (closed).
    on_error: OnError,
}

impl Ctx {
    /// Store data for a new instance of the plugin `spec` describes, in
    /// `scope`: memory capped at `spec.memory_bytes`, `geo.lookup` answered
    /// from `spec.geo`, `state` kept in `spec.state` or in process.
    pub(crate) fn new(scope: Arc<PluginScope>, spec: &PluginSpec) -> Ctx {
        // No preopened directories, no environment, no arguments, no stdin;
        // stdout/stderr discarded; no sockets of any kind.
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(spec.memory_bytes)
            .table_elements(100_000)
            .instances(64)
            .tables(64)
            .memories(16)
            .trap_on_grow_failure(true)
            .build();
        Ctx {
            wasi,
            table: ResourceTable::new(),
            limits,
            scope,
            deadline: Instant::now(),
            deadline_ticks: 0,
            ticks: 0,
            turn: 0,
            long_permit: Arc::default(),
            state_grace: Duration::ZERO,
            max_host_calls: spec.max_host_calls,
            host_calls_left: spec.max_host_calls,
            request: None,
            response: None,
            upstream: None,
            candidates: None,
            directory: None,
            geo: spec.geo.clone(),
            skipped: SkippedHooks::default(),
            shared: spec.state.clone(),
            on_error: spec.on_error,
        }
    }

    /// Starts a call that may run for `budget` from `now` and make
    /// `max_host_calls` host calls. Returns the latest the call can end:
    /// its deadline plus what waiting on shared state may add to it.
    pub(crate) fn arm(&mut self, now: Instant, budget: Duration) -> Instant {
        self.end_call();
        let deadline = now + budget;
        self.deadline = deadline;
        self.deadline_ticks = ticks_in(budget);
        self.state_grace = self
            .shared
            .as_ref()
            .map_or(Duration::ZERO, |shared| shared.timeout());
        self.host_calls_left = self.max_host_calls;
        deadline + self.state_grace
    }

    /// Ends the current call's claim on its plugin's threads: the permit of
    /// a long call goes back.
    pub(crate) fn end_call(&mut self) {
        self.turn = 0;
        if std::mem::take(&mut self.ticks) >= LONG_CALL_TICKS {
            self.long_permit
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
        }
    }

    /// Whether the call must stop, asked at each epoch tick it runs
    /// through: its deadline (wall-clock time) has passed *and* it has been
    /// running for its budget. A tick counts only when the guest is running
    /// as it passes: time the OS keeps the thread off the CPU (an
    /// oversubscribed host, a CPU-throttled container) or the call spends
    /// yielded to other requests passes without a tick, and would otherwise
    /// fail a call of a few microseconds that the thread stopped inside.
    /// A call that spins sees every tick, and stops within one of its
    /// deadline as before. A budget under one tick stops at the first tick
    /// past the deadline.
    pub(crate) fn out_of_time(&mut self) -> bool {
        self.ticks = self.ticks.saturating_add(1);
        self.ticks > self.deadline_ticks && Instant::now() >= self.deadline
    }

    /// What the call does at an epoch tick, its deadline not yet reached:
    /// yield to other requests on its thread. A long call (see
    /// [`LONG_CALL_TICKS`]) runs in turns of [`TURN_TICKS`], each with one
    /// of its plugin's permits: at the start of a turn it gives back the
    /// permit of its last turn and takes one for the next, waiting (without
    /// running) in line behind the plugin's other long calls. They take
    /// turns on at most the permits' share of the cores. The deadline keeps
    /// running while a call waits; [`super::bounded`] stops the wait there.
    pub(crate) fn pause(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // tokio's yield_now puts the task at the back of the queue; a plain
        // wake would run it again at once and starve the rest.
        let yield_now = || Box::pin(tokio::task::yield_now());
        if self.ticks < LONG_CALL_TICKS {
            return yield_now();
        }
        if self.ticks > LONG_CALL_TICKS && self.turn < TURN_TICKS {
            self.turn += 1;
            return yield_now();
        }
        self.turn = 1;
        let permits = self.scope.long_calls.clone();
        let mut slot = self
            .long_permit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Given back first: a long call already waiting gets it (the
        // semaphore is fair, so the `try_acquire` below cannot take it back).
        slot.take();
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            *slot = Some(permit);
            return yield_now();
        }
        drop(slot);
        let slot = self.long_permit.clone();
        Box::pin(async move {
            // The semaphore is never closed, so this waits for a permit.
            if let Ok(permit) = permits.acquire_owned().await {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(permit);
            }
        })
    }

    /// Counts one host call; fails the call (and with it the guest's hook
    /// call) once it exceeds `max_host_calls`. Each cheap import is bounded
    /// by the deadline too, but only in time: a call looping on `log` or
    /// `metrics` would otherwise do host work (and write log lines) for its
    /// whole deadline on every request.
    fn charge(&mut self) -> wasmtime::Result<()> {
        match self.host_calls_left.checked_sub(1) {
            Some(left) => {
                self.host_calls_left = left;
                Ok(())
            }
            None => Err(wasmtime::Error::new(HostCallLimit(self.max_host_calls))),
        }
    }

    /// The store's resource limiter.
    pub(crate) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    fn request(&mut self) -> wasmtime::Result<&mut RequestState> {
        self.charge()?;
        self.request
            .as_mut()
            .ok_or_else(|| wasmtime::format_err!("the request is not available in this hook"))
    }

    fn response(&mut self) -> wasmtime::Result<&mut http::response::Parts> {
        self.charge()?;
        self.response
            .as_mut()
            .ok_or_else(|| wasmtime::format_err!("the response is not available in this hook"))
    }

    fn upstream(&mut self) -> wasmtime::Result<&EndpointSet> {
        self.charge()?;
        self.upstream
            .as_deref()
            .ok_or_else(|| wasmtime::format_err!("the upstream is not available in this hook"))
    }

    /// The upstream the current call is about: the one lent to it, or the request's.
    fn current_upstream(&self) -> Option<&EndpointSet> {
        self.upstream
            .as_deref()
            .or_else(|| self.request.as_ref().map(|r| &*r.upstream))
            .filter(|u| !u.endpoints.is_empty())
    }

    fn candidates(&mut self) -> wasmtime::Result<(&EndpointSet, &CandidateSet)> {
        self.charge()?;
        let set = self.candidates.as_deref().ok_or_else(|| {
            wasmtime::format_err!("the candidates are not available in this hook")
        })?;
        let upstream = self
            .upstream
            .as_deref()
            .ok_or_else(|| wasmtime::format_err!("the upstream is not available in this hook"))?;
        Ok((upstream, set))
    }
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Headers whose framing or connection meaning the gateway owns; a policy
/// changing them could desynchronise a message from its body.
fn managed_header(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    name == CONTENT_LENGTH
        || name == TRANSFER_ENCODING
        || name == CONNECTION
        || name == UPGRADE
        || name == TE
        || name == TRAILER
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name {name:?}"))?;
    if managed_header(&name) {
        return Err(format!("header {name} is managed by the gateway"));
    }
    let value =
        HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
    Ok((name, value))
}

fn set_header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), String> {
    let (name, value) = header_pair(name, value)?;
    headers.insert(name, value);
    Ok(())
}

fn append_header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), String> {
    let (name, value) = header_pair(name, value)?;
    headers.append(name, value);
    Ok(())
}

fn remove_header(headers: &mut HeaderMap, name: &str) {
    if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
        && !managed_header(&name)
    {
        headers.remove(name);
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn header_names(headers: &HeaderMap) -> Vec<String> {
    headers.keys().map(|k| k.as_str().to_string()).collect()
}

impl types::Host for Ctx {}

impl types::HostRequest for Ctx {
    fn method(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request()?.parts.method.as_str().to_string())
    }

    fn path(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request()?.parts.uri.path().to_string())
    }

    fn query(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.request()?.parts.uri.query().map(str::to_string))
    }

    fn host(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        let parts = &self.request()?.parts;
        Ok(crate::route::request_host(&parts.uri, &parts.headers).into_owned())
    }

    fn scheme(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        let https = self.request()?.https;
        Ok(if https { "https" } else { "http" }.to_string())
    }

    fn client_ip(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request()?.client_ip.to_string())
    }

    fn route(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request()?.route.to_string())
    }

    fn upstream(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request()?.upstream.name.to_string())
    }

    fn endpoint(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.request()?.endpoint.map(|a| a.to_string()))
    }

    fn header(
        &mut self,
        _: Resource<RequestHandle>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(header(&self.request()?.parts.headers, &name))
    }

    fn header_all(
        &mut self,
        _: Resource<RequestHandle>,
        name: String,
    ) -> wasmtime::Result<Vec<String>> {
        Ok(self
            .request()?
            .parts
            .headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect())
    }

    fn header_names(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<Vec<String>> {
        Ok(header_names(&self.request()?.parts.headers))
    }

    fn set_header(
        &mut self,
        _: Resource<RequestHandle>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(set_header(
            &mut self.request()?.parts.headers,
            &name,
            &value,
        ))
    }

    fn append_header(
        &mut self,
        _: Resource<RequestHandle>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(append_header(
            &mut self.request()?.parts.headers,
            &name,
            &value,
        ))
    }

    fn remove_header(&mut self, _: Resource<RequestHandle>, name: String) -> wasmtime::Result<()> {
        remove_header(&mut self.request()?.parts.headers, &name);
        Ok(())
    }

    fn delay(&mut self, _: Resource<RequestHandle>, ms: u32) -> wasmtime::Result<()> {
        let request = self.request()?;
        let hold = Duration::from_millis(u64::from(ms)).min(MAX_DELAY);
        request.delay = request.delay.max(hold);
        Ok(())
    }

    fn drop(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<()> {
        // The host only lends borrows; there is nothing owned to free.
        Ok(())
    }
}

impl types::HostResponse for Ctx {
    fn status(&mut self, _: Resource<ResponseHandle>) -> wasmtime::Result<u16> {
        Ok(self.response()?.status.as_u16())
    }

    fn header(
        &mut self,
        _: Resource<ResponseHandle>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(header(&self.response()?.headers, &name))
    }

    fn header_names(&mut self, _: Resource<ResponseHandle>) -> wasmtime::Result<Vec<String>> {
        Ok(header_names(&self.response()?.headers))
    }

    fn set_header(
        &mut self,
        _: Resource<ResponseHandle>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(set_header(&mut self.response()?.headers, &name, &value))
    }

    fn append_header(
        &mut self,
        _: Resource<ResponseHandle>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        Ok(append_header(&mut self.response()?.headers, &name, &value))
    }

    fn remove_header(&mut self, _: Resource<ResponseHandle>, name: String) -> wasmtime::Result<()> {
        remove_header(&mut self.response()?.headers, &name);
        Ok(())
    }

    fn drop(&mut self, _: Resource<ResponseHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl types::HostUpstream for Ctx {
    fn name(&mut self, _: Resource<UpstreamHandle>) -> wasmtime::Result<String> {
        Ok(self.upstream()?.name.to_string())
    }

    fn size(&mut self, _: Resource<UpstreamHandle>) -> wasmtime::Result<u32> {
        Ok(u32::try_from(self.upstream()?.endpoints.len()).unwrap_or(u32::MAX))
    }

    fn address(
        &mut self,
        _: Resource<UpstreamHandle>,
        id: u32,
    ) -> wasmtime::Result<Option<String>> {
        let upstream = self.upstream()?;
        Ok(usize::try_from(id)
            .ok()
            .and_then(|i| upstream.endpoints.get(i))
            .map(|e| e.address.to_string()))
    }

    fn label(
        &mut self,
        _: Resource<UpstreamHandle>,
        id: u32,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        let upstream = self.upstream()?;
        Ok(usize::try_from(id)
            .ok()
            .and_then(|i| upstream.endpoints.get(i))
            .and_then(|e| e.labels.get(&key).cloned()))
    }

    fn turn(&mut self, _: Resource<UpstreamHandle>) -> wasmtime::Result<u64> {
        Ok(self.upstream()?.next_turn())
    }

    fn drop(&mut self, _: Resource<UpstreamHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl types::HostCandidates for Ctx {
    fn len(&mut self, _: Resource<CandidatesHandle>) -> wasmtime::Result<u32> {
        Ok(u32::try_from(self.candidates()?.1.len()).unwrap_or(u32::MAX))
    }

    fn fingerprint(&mut self, _: Resource<CandidatesHandle>) -> wasmtime::Result<u64> {
        Ok(self.candidates()?.1.fingerprint)
    }

    fn get(
        &mut self,
        _: Resource<CandidatesHandle>,
        position: u32,
    ) -> wasmtime::Result<Option<types::Candidate>> {
        let (endpoints, set) = self.candidates()?;
        Ok(usize::try_from(position)
            .ok()
            .and_then(|p| endpoints.view(set, p))
            .map(|c| types::Candidate {
                id: c.id,
                weight: c.weight,
                in_flight: c.in_flight,
                latency_ewma_us: c.latency_ewma_us,
                backup: c.backup,
            }))
    }

    fn position(
        &mut self,
        _: Resource<CandidatesHandle>,
        id: u32,
    ) -> wasmtime::Result<Option<u32>> {
        Ok(self.candidates()?.1.position(id))
    }

    fn ids(&mut self, _: Resource<CandidatesHandle>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.candidates()?.1.ids.clone())
    }

    fn weights(&mut self, _: Resource<CandidatesHandle>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.candidates()?.1.weights.clone())
    }

    fn in_flight(&mut self, _: Resource<CandidatesHandle>) -> wasmtime::Result<Vec<u32>> {
        let (endpoints, set) = self.candidates()?;
        Ok((0..set.len())
            .map(|p| endpoints.at(set, p).map_or(0, |e| e.in_flight()))
            .collect())
    }

    fn drop(&mut self, _: Resource<CandidatesHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl Ctx {
    /// Settles a shared-state call that took `waited`: the plugin's deadline
    /// moves on by that time (it bounds the plugin's own work; `[state]
    /// timeout` bounds Redis), up to one `timeout` per call in all. A
    /// failure follows `on_error`: "open" answers from in-process state,
    /// "closed" fails the call, and with it the request.
    fn settle_shared<T>(
        &mut self,
        waited: Duration,
        result: Result<T, StateError>,
        local: impl FnOnce(&StateStore) -> T,
    ) -> wasmtime::Result<T> {
        let grant = waited.min(self.state_grace);
        self.state_grace -= grant;
        self.deadline += grant;
        match result {
            Ok(value) => Ok(value),
            Err(error) => match (self.on_error, &self.shared) {
                (OnError::Open, Some(shared)) => {
                    shared.count_fallback();
                    Ok(local(&self.scope.state))
                }
                _ => Err(wasmtime::Error::new(error)),
            },
        }
    }
}

// The Redis round trips are boxed: wasmtime boxes every async host call's
// future, and with the Redis future inline each call (Redis configured or not)
// would allocate and copy ~1 KiB; boxed, the in-memory path stays small.
impl state::Host for Ctx {
    async fn counter_add(&mut self, key: String, delta: i64, ttl_ms: u64) -> wasmtime::Result<i64> {
        self.charge()?;
        let Some(shared) = self.shared.clone() else {
            return Ok(self.scope.state.counter_add(&key, delta, ttl_ms));
        };
        let started = Instant::now();
        let result = Box::pin(shared.counter_add(&self.scope.name, &key, delta, ttl_ms)).await;
        self.settle_shared(started.elapsed(), result, |local| {
            local.counter_add(&key, delta, ttl_ms)
        })
    }

    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.charge()?;
        let Some(shared) = self.shared.clone() else {
            return Ok(self.scope.state.get(&key));
        };
        let started = Instant::now();
        let result = Box::pin(shared.get(&self.scope.name, &key)).await;
        self.settle_shared(started.elapsed(), result, |local| local.get(&key))
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<String>,
        value: String,
        ttl_ms: u64,
    ) -> wasmtime::Result<Result<(), Option<String>>> {
        self.charge()?;
        let Some(shared) = self.shared.clone() else {
            return Ok(self.scope.state.compare_and_swap(
                &key,
                expected.as_deref(),
                &value,
                ttl_ms,
            ));
        };
        let started = Instant::now();
        let result = Box::pin(shared.compare_and_swap(
            &self.scope.name,
            &key,
            expected.as_deref(),
            &value,
            ttl_ms,
        ))
        .await;
        self.settle_shared(started.elapsed(), result, |local| {
            local.compare_and_swap(&key, expected.as_deref(), &value, ttl_ms)
        })
    }

    async fn remove(&mut self, key: String) -> wasmtime::Result<()> {
        self.charge()?;
        let Some(shared) = self.shared.clone() else {
            self.scope.state.remove(&key);
            return Ok(());
        };
        let started = Instant::now();
        let result = Box::pin(shared.remove(&self.scope.name, &key)).await;
        self.settle_shared(started.elapsed(), result, |local| local.remove(&key))
    }

    async fn throttle(
        &mut self,
        key: String,
        interval_ns: u64,
        burst: u32,
        cost: u32,
    ) -> wasmtime::Result<state::ThrottleResult> {
        self.charge()?;
        let rate = Rate {
            interval: Duration::from_nanos(interval_ns),
            burst,
        };
        let decision = match self.shared.clone() {
            None => self.scope.state.throttle(&key, rate, cost),
            Some(shared) => {
                let started = Instant::now();
                let result = Box::pin(shared.throttle(&self.scope, &key, rate, cost)).await;
                self.settle_shared(started.elapsed(), result, |local| {
                    local.throttle(&key, rate, cost)
                })?
            }
        };
        Ok(state::ThrottleResult {
            allowed: decision.allowed,
            remaining: decision.remaining,
            retry_after_ms: ceil_ms(decision.retry_after),
            reset_ms: ceil_ms(decision.reset),
            ahead_ms: ceil_ms(decision.ahead),
        })
    }
}

/// `duration` in whole milliseconds, rounded up.
fn ceil_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The origin of `clock.monotonic-ns`.
static MONOTONIC_ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

impl clock::Host for Ctx {
    fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        self.charge()?;
        Ok(u64::try_from(MONOTONIC_ORIGIN.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn unix_ms(&mut self) -> wasmtime::Result<u64> {
        self.charge()?;
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }
}

impl random::Host for Ctx {
    fn next_u64(&mut self) -> wasmtime::Result<u64> {
        self.charge()?;
        Ok(fastrand::u64(..))
    }
}

/// Longest log message kept; longer ones are cut, so a plugin cannot flood the log with one call.
const MAX_LOG_MESSAGE: usize = 4096;

impl log::Host for Ctx {
    fn write(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.charge()?;
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE {
            let mut end = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let plugin = &*self.scope.name;
        match level {
            log::Level::Trace => tracing::trace!(target: "sluice::plugin", plugin, "{message}"),
            log::Level::Debug => tracing::debug!(target: "sluice::plugin", plugin, "{message}"),
            log::Level::Info => tracing::info!(target: "sluice::plugin", plugin, "{message}"),
            log::Level::Warn => tracing::warn!(target: "sluice::plugin", plugin, "{message}"),
            log::Level::Error => tracing::error!(target: "sluice::plugin", plugin, "{message}"),
        }
        Ok(())
    }
}

impl metrics::Host for Ctx {
    fn counter_add(&mut self, name: String, delta: u64) -> wasmtime::Result<()> {
        self.charge()?;
        self.scope.metrics.counter_add(&name, delta);
        Ok(())
    }

    fn gauge_set(&mut self, name: String, value: i64) -> wasmtime::Result<()> {
        self.charge()?;
        self.scope.metrics.gauge_set(&name, value);
        Ok(())
    }
}

/// Hooks a plugin version skips: a bit per [`hooks::Hook`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SkippedHooks(u8);

impl SkippedHooks {
    fn bit(hook: hooks::Hook) -> u8 {
        match hook {
            hooks::Hook::OnRequest => 1,
            hooks::Hook::OnResponse => 2,
            hooks::Hook::OnOutcome => 4,
        }
    }

    /// Whether `hook` is skipped.
    pub(crate) fn contains(self, hook: hooks::Hook) -> bool {
        self.0 & SkippedHooks::bit(hook) != 0
    }
}

impl hooks::Host for Ctx {
    fn skip(&mut self, hook: hooks::Hook) -> wasmtime::Result<()> {
        self.charge()?;
        self.skipped.0 |= SkippedHooks::bit(hook);
        Ok(())
    }
}

impl geo::Host for Ctx {
    fn lookup(&mut self, ip: String) -> wasmtime::Result<geo::Location> {
        self.charge()?;
        let place = match (&self.geo, ip.trim().parse::<IpAddr>()) {
            (Some(database), Ok(ip)) => database.lookup(ip),
            _ => super::geo::Place::default(),
        };
        Ok(geo::Location {
            country: place.country,
            continent: place.continent,
        })
    }
}

impl health::Host for Ctx {
    fn healthy(&mut self, upstream: String) -> wasmtime::Result<Option<u32>> {
        self.charge()?;
        let directory = self
            .request
            .as_ref()
            .map(|r| &r.directory)
            .or(self.directory.as_ref());
        Ok(directory
            .and_then(|d| d.iter().find(|u| *u.name == *upstream))
            .map(|u| u.healthy()))
    }

    fn eject(&mut self, id: u32, duration_ms: u64, max_percent: u32) -> wasmtime::Result<bool> {
        self.charge()?;
        Ok(self.current_upstream().is_some_and(|u| {
            u.eject(
                id,
                std::time::Duration::from_millis(duration_ms),
                max_percent,
            )
        }))
    }

    fn readmit(&mut self, id: u32) -> wasmtime::Result<()> {
        self.charge()?;
        if let Some(upstream) = self.current_upstream() {
            upstream.readmit(id);
        }
        Ok(())
    }

    fn report(&mut self, endpoint: Option<u32>, state: health::Circuit) -> wasmtime::Result<()> {
        self.charge()?;
        let state = match state {
            health::Circuit::Closed => CircuitState::Closed,
            health::Circuit::Open => CircuitState::Open,
            health::Circuit::HalfOpen => CircuitState::HalfOpen,
        };
        if let Some(upstream) = self.current_upstream() {
            upstream.report_circuit(&self.scope.name, endpoint, state);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_counts_whole_ticks() {
        assert_eq!(ticks_in(Duration::from_millis(10)), 10);
        assert_eq!(ticks_in(Duration::from_micros(2_999)), 2);
        assert_eq!(ticks_in(Duration::from_micros(500)), 0);
        assert_eq!(ticks_in(Duration::from_secs(1)), 1_000);
        assert_eq!(ticks_in(Duration::MAX), u32::MAX);
    }
}
