//! Policy plugins: WIT-defined Wasm components the gateway runs per request.
//!
//! A [`Plugin`] is one loaded version of a `[plugin.NAME]`: its compiled
//! component, an `InstancePre` with every host import linked, which hooks it
//! exports, and a pool of ready instances. A hook call takes an instance from
//! the pool (or makes one), lends it the request, runs with a wall-clock
//! deadline and a memory cap, and returns the instance to the pool — unless
//! the call trapped or ran out of time, in which case the instance is thrown
//! away and the caller applies the plugin's `on_error`.
//!
//! [`chain`] runs a route's policies in request order; [`engine`] owns the
//! one `Engine`, its epoch ticker and the compiled-component cache; [`host`]
//! implements the imports; [`scope`] and [`state`] keep what outlives an
//! instance, in process or, with `[state] backend = "redis"`, in
//! [`shared_state`].

mod bindings;
pub(crate) mod builtin;
pub(crate) mod chain;
mod continents;
pub(crate) mod engine;
pub(crate) mod geo;
pub(crate) mod host;
pub(crate) mod scope;
pub(crate) mod shared_state;
mod state;

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use sha2::{Digest as _, Sha256};
use thread_local::ThreadLocal;
use wasmtime::component::{InstancePre, Resource};
use wasmtime::{Store, UpdateDeadline};

use crate::upstream::{CandidateSet, Directory, EndpointSet};
use bindings::exports::sluice::policy::{
    balance, configure, outcome_hook, request_hook, response_hook,
};
use bindings::sluice::policy::hooks;
pub(crate) use bindings::sluice::policy::types::{Action, ErrorKind, Outcome, Reply};
use host::{
    CandidatesHandle, Ctx, RequestHandle, RequestState, ResponseHandle, SkippedHooks,
    UpstreamHandle,
};
pub use scope::CallStatsSnapshot;
pub(crate) use scope::CallTotals;
use scope::{Failure, PluginScope};

/// What the host knows about one loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginReport {
    /// The `[plugin.NAME]` name (or the builtin's name when used directly as a balancer).
    pub name: String,
    /// `builtin:NAME` or the component's path.
    pub source: String,
    /// SHA-256 of the component, hex.
    pub version: String,
    /// The host's call statistics.
    pub stats: CallStatsSnapshot,
    /// Counters the plugin reported through the `metrics` import.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Gauges the plugin reported through the `metrics` import.
    pub gauges: std::collections::BTreeMap<String, i64>,
    /// The hooks the gateway calls, by their WIT names (`on-request`,
    /// `on-response`, `on-outcome`, `pick`): exported and not skipped by `init`.
    pub hooks: Vec<&'static str>,
}

/// Where a plugin's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// Embedded in the binary: `builtin:NAME`.
    Builtin(String),
    /// A `.wasm` file.
    File(PathBuf),
    /// A component uploaded through the admin API (`PUT /plugins/{name}`).
    Upload,
}

impl Source {
    /// The component's bytes.
    pub(crate) fn read(&self) -> Result<std::borrow::Cow<'static, [u8]>, PluginError> {
        match self {
            Source::Builtin(name) => builtin::bytes(name).map(std::borrow::Cow::Borrowed),
            Source::File(path) => std::fs::read(path)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| PluginError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Source::Upload => Err(PluginError::Read {
                path: "upload".to_string(),
                reason: "an uploaded component is kept only in memory".to_string(),
            }),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Builtin(name) => write!(f, "builtin:{name}"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Upload => f.write_str("upload"),
        }
    }
}

/// `max_host_calls` when the manifest does not set it: far above what a
/// policy needs (the first-party ones make a few host calls a call, plus one
/// per endpoint when `consistent-hash` or `sticky-cookie` rebuilds its
/// table), far below what a call looping on a cheap import makes before a
/// 10 ms deadline (hundreds of thousands).
pub(crate) const DEFAULT_MAX_HOST_CALLS: u32 = 10_000;

/// What a failed call means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnError {
    /// Skip the policy and go on as if it had said "continue".
    Open,
    /// Answer 503.
    Closed,
}

/// A plugin as the manifest describes it, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PluginSpec {
    pub(crate) name: String,
    pub(crate) source: Source,
    /// The `config` table as JSON.
    pub(crate) config: String,
    pub(crate) on_error: OnError,
    pub(crate) deadline: Duration,
    pub(crate) memory_bytes: usize,
    /// Most host calls (imports of `sluice:policy`) one hook call may make.
    pub(crate) max_host_calls: u32,
    /// Keep instances between calls (the default) or make one per call.
    pub(crate) reuse_instances: bool,
    /// Most idle instances kept ready, per thread.
    pub(crate) pool_size: usize,
    /// The manifest's `[geo] database`, answering `geo.lookup`.
    pub(crate) geo: Option<Arc<geo::GeoDatabase>>,
    /// The shared store behind `state` (`[state] backend = "redis"`), unless
    /// the plugin keeps its state in process.
    pub(crate) state: Option<Arc<shared_state::RedisStore>>,
}

/// Why a plugin could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PluginError {
    /// The wasmtime engine could not start.
    #[error("the Wasm engine could not start: {0}")]
    Engine(String),
    /// The source could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file named.
        path: String,
        /// What the OS said.
        reason: String,
    },
    /// No builtin plugin has that name.
    #[error("there is no builtin plugin \"{name}\" (available: {available})")]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
        /// The names that exist.
        available: String,
    },
    /// The bytes are not a valid component.
    #[error("not a valid Wasm component: {0}")]
    Compile(String),
    /// The component imports something the gateway does not provide.
    #[error("the component does not fit the sluice:policy@0.1.0 host: {0}")]
    Link(String),
    /// The component exports none of the hooks.
    #[error(
        "the component exports no sluice:policy@0.1.0 hook (request-hook, response-hook, outcome-hook or balance)"
    )]
    NoHooks,
    /// Instantiation failed (memory cap too low, a start function trapped, ...).
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    /// `init` refused the configuration.
    #[error("init refused the config: {0}")]
    Init(String),
}

/// A hook call that did not produce a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HookError {
    /// The guest trapped; its instance was discarded.
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past the plugin's deadline; its instance was discarded.
    #[error("ran past its {0:?} deadline")]
    Deadline(Duration),
    /// The call made more host calls than `max_host_calls`; its instance
    /// was discarded.
    #[error("{0}")]
    HostCalls(host::HostCallLimit),
    /// A shared-state call failed (`[state]` backend down or slow); the
    /// instance was discarded.
    #[error("shared state: {0}")]
    State(shared_state::StateError),
    /// The guest answered something the host cannot use.
    #[error("{0}")]
    Invalid(String),
    /// No instance could be made.
    #[error("{0}")]
    Instantiate(String),
}

/// Which hooks a component exports, as export indices resolved once per version.
#[derive(Clone)]
struct Exports {
    configure: Option<configure::GuestIndices>,
    request: Option<request_hook::GuestIndices>,
    response: Option<response_hook::GuestIndices>,
    outcome: Option<outcome_hook::GuestIndices>,
    balance: Option<balance::GuestIndices>,
}

/// A plugin version's idle instances. Each thread keeps its own, and
/// reuses the one it gave back last: a call then runs on the instance whose
/// memory is warmest in this core's caches, and an instance never moves
/// between worker threads. (A shared first-in first-out queue rotated every
/// call through all the instances that concurrency had made, and handed
/// them from one core to the other.)
struct InstancePool {
    /// This thread's idle instances, the most recently used last.
    local: ThreadLocal<RefCell<Vec<Instance>>>,
    /// Instances made off the worker threads (the first, at load), for the
    /// first thread that has none of its own.
    spare: ArrayQueue<Instance>,
    /// Most idle instances one thread keeps (`pool_size`); it drops the surplus.
    per_thread: usize,
}

impl InstancePool {
    fn new(per_thread: usize) -> InstancePool {
        InstancePool {
            local: ThreadLocal::new(),
            spare: ArrayQueue::new(1),
            per_thread: per_thread.max(1),
        }
    }

    /// An idle instance: this thread's last, else a spare.
    fn take(&self) -> Option<Instance> {
        self.local
            .get()
            .and_then(|local| local.borrow_mut().pop())
            .or_else(|| self.spare.pop())
    }

    /// Keeps `instance` for this thread's next call, unless the thread
    /// keeps `per_thread` already.
    fn give_back(&self, instance: Instance) {
        let mut local = self.local.get_or_default().borrow_mut();
        if local.len() < self.per_thread {
            local.push(instance);
        }
    }

    /// Keeps an instance made off the worker threads; a second is dropped.
    fn add_spare(&self, instance: Instance) {
        let _ = self.spare.push(instance);
    }
}

/// One live instance: its store and typed exports.
struct Instance {
    store: Store<Ctx>,
    request: Option<request_hook::Guest>,
    response: Option<response_hook::Guest>,
    outcome: Option<outcome_hook::Guest>,
    balance: Option<balance::Guest>,
}

/// One loaded version of a plugin.
pub(crate) struct Plugin {
    pub(crate) name: Arc<str>,
    pub(crate) spec: PluginSpec,
    /// SHA-256 of the component, hex.
    pub(crate) version: String,
    engine: wasmtime::Engine,
    pre: InstancePre<Ctx>,
    exports: Exports,
    /// The hooks the first instance's `init` skipped; set once it has run.
    skipped: OnceLock<SkippedHooks>,
    pool: InstancePool,
    scope: Arc<PluginScope>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("source", &self.spec.source)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// Reads, compiles (or loads from the cache), links and instantiates the
    /// plugin, running `init` with its config. Blocks: compiling can take
    /// seconds, so call it off the runtime threads.
    pub(crate) fn load(spec: PluginSpec) -> Result<Arc<Plugin>, PluginError> {
        let runtime = engine::runtime()?;
        let bytes = spec.source.read()?;
        Plugin::from_bytes(spec, &bytes, runtime)
    }

    /// Compiles, links and instantiates an uploaded component, running
    /// `init` with the spec's config. Blocks, as [`Plugin::load`].
    pub(crate) fn from_upload(spec: PluginSpec, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let runtime = engine::runtime()?;
        Plugin::from_bytes(spec, bytes, runtime)
    }

    /// A new version of `running`'s component with `spec` (new config):
    /// nothing is compiled again; a first instance runs `init`. Blocks, as
    /// [`Plugin::load`].
    pub(crate) fn rebuild(running: &Plugin, spec: PluginSpec) -> Result<Arc<Plugin>, PluginError> {
        let plugin = Arc::new(Plugin {
            name: running.name.clone(),
            scope: running.scope.clone(),
            pool: InstancePool::new(spec.pool_size),
            spec,
            version: running.version.clone(),
            engine: running.engine.clone(),
            pre: running.pre.clone(),
            exports: running.exports.clone(),
            skipped: OnceLock::new(),
        });
        plugin.first_instance()?;
        Ok(plugin)
    }

    /// Makes the first instance, proving the plugin runs and accepts its
    /// config, and pools it.
    fn first_instance(&self) -> Result<(), PluginError> {
        // On a thread of its own: the epoch callback yields with tokio's
        // `yield_now`, which on a runtime thread (a test or a caller that
        // loads a config inside `block_on`) defers its wake to a scheduler
        // that `pollster` is blocking. A thread without a runtime wakes at once.
        let made = std::thread::scope(|scope| {
            scope
                .spawn(|| pollster::block_on(self.instantiate()))
                .join()
        })
        .map_err(|_| PluginError::Instantiate("instantiation panicked".to_string()))?;
        let mut first = made.map_err(|e| match e {
            InstantiateError::Init(message) => PluginError::Init(message),
            InstantiateError::Other(message) => PluginError::Instantiate(message),
        })?;
        let skipped = first.store.data().skipped;
        let _ = self.skipped.set(skipped);
        if skipped != SkippedHooks::default() {
            tracing::info!(plugin = %self.name, hooks = ?self.hooks(), "the plugin skips the hooks its config leaves idle");
        }
        // Made off the worker threads: whichever thread first needs an
        // instance takes it. A long `init` may hold a long-call permit:
        // it goes back now, not at the instance's first call.
        first.store.data_mut().end_call();
        self.pool.add_spare(first);
        Ok(())
    }

    pub(crate) fn from_bytes(
        spec: PluginSpec,
        bytes: &[u8],
        runtime: &engine::Runtime,
    ) -> Result<Arc<Plugin>, PluginError> {
        let version = sha256_hex(bytes);
        let component = runtime
            .compile(bytes, &version)
            .map_err(PluginError::Compile)?;
        let pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Link(format!("{e:#}")))?;
        let exports = Exports {
            configure: configure::GuestIndices::new(&pre).ok(),
            request: request_hook::GuestIndices::new(&pre).ok(),
            response: response_hook::GuestIndices::new(&pre).ok(),
            outcome: outcome_hook::GuestIndices::new(&pre).ok(),
            balance: balance::GuestIndices::new(&pre).ok(),
        };
        if exports.request.is_none()
            && exports.response.is_none()
            && exports.outcome.is_none()
            && exports.balance.is_none()
        {
            return Err(PluginError::NoHooks);
        }
        let plugin = Arc::new(Plugin {
            name: Arc::from(spec.name.as_str()),
            scope: scope::scope_for(&spec.name),
            pool: InstancePool::new(spec.pool_size),
            spec,
            version,
            engine: runtime.engine.clone(),
            pre,
            exports,
            skipped: OnceLock::new(),
        });
        plugin.first_instance()?;
        Ok(plugin)
    }

    /// Whether the plugin exports a hook a route's `policies` can run
    /// (skipped or not: a policy that skips every hook is valid, and idle).
    pub(crate) fn has_policy_hooks(&self) -> bool {
        let e = &self.exports;
        e.request.is_some() || e.response.is_some() || e.outcome.is_some()
    }

    fn skips(&self, hook: hooks::Hook) -> bool {
        self.skipped.get().is_some_and(|s| s.contains(hook))
    }

    /// Whether the gateway calls the plugin's `on-request`: exported and not skipped.
    pub(crate) fn has_request_hook(&self) -> bool {
        self.exports.request.is_some() && !self.skips(hooks::Hook::OnRequest)
    }

    /// Whether the gateway calls the plugin's `on-response`: exported and not skipped.
    pub(crate) fn has_response_hook(&self) -> bool {
        self.exports.response.is_some() && !self.skips(hooks::Hook::OnResponse)
    }

    /// Whether the gateway calls the plugin's `on-outcome`: exported and not skipped.
    pub(crate) fn has_outcome_hook(&self) -> bool {
        self.exports.outcome.is_some() && !self.skips(hooks::Hook::OnOutcome)
    }

    /// The hooks the gateway calls, by their WIT names.
    pub(crate) fn hooks(&self) -> Vec<&'static str> {
        [
            (self.has_request_hook(), "on-request"),
            (self.has_response_hook(), "on-response"),
            (self.has_outcome_hook(), "on-outcome"),
            (self.is_balancer(), "pick"),
        ]
        .into_iter()
        .filter_map(|(called, name)| called.then_some(name))
        .collect()
    }

    /// Whether the plugin exports `pick` (it can be an upstream's balancer).
    pub(crate) fn is_balancer(&self) -> bool {
        self.exports.balance.is_some()
    }

    /// The host's call counters and latency histogram, for `/metrics`.
    pub(crate) fn call_totals(&self) -> CallTotals {
        self.scope.stats.totals()
    }

    /// Source, version, the host's call statistics and the plugin's own metrics.
    pub(crate) fn report(&self) -> PluginReport {
        PluginReport {
            name: self.name.to_string(),
            source: self.spec.source.to_string(),
            version: self.version.clone(),
            stats: self.scope.stats.snapshot(),
            counters: self.scope.metrics.counters(),
            gauges: self.scope.metrics.gauges(),
            hooks: self.hooks(),
        }
    }

    /// A new instance with `init` run.
    async fn instantiate(&self) -> Result<Instance, InstantiateError> {
        let mut store = Store::new(&self.engine, Ctx::new(self.scope.clone(), &self.spec));
        store.limiter(Ctx::limiter);
        // Each epoch tick past the deadline check: trap once the time is
        // spent; while it remains, yield to other requests on this thread
        // (and, for a long call, hold one of the plugin's long-call permits).
        store.epoch_deadline_callback(|mut ctx| {
            engine::note_guest_running();
            let ctx = ctx.data_mut();
            if ctx.out_of_time() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::YieldCustom(1, ctx.pause()))
            }
        });
        let other = |e: wasmtime::Error| InstantiateError::Other(format!("{e:#}"));
        // Instantiation runs start functions and, for Python and JavaScript
        // guests, their runtimes' setup: give it its own, roomier budget.
        let (_, latest) = arm(&mut store, self.spec.deadline.max(INSTANTIATE_BUDGET));
        let instance = bounded(latest, self.pre.instantiate_async(&mut store))
            .await
            .map_err(other)?;
        let e = &self.exports;
        let mut loaded = Instance {
            request: e
                .request
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()
                .map_err(other)?,
            response: e
                .response
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()
                .map_err(other)?,
            outcome: e
                .outcome
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()
                .map_err(other)?,
            balance: e
                .balance
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()
                .map_err(other)?,
            store,
        };
        if let Some(indices) = &e.configure {
            let configure = indices.load(&mut loaded.store, &instance).map_err(other)?;
            let (_, latest) = arm(
                &mut loaded.store,
                self.spec.deadline.max(INSTANTIATE_BUDGET),
            );
            bounded(
                latest,
                configure.call_init(&mut loaded.store, &self.spec.config),
            )
            .await
            .map_err(other)?
            .map_err(InstantiateError::Init)?;
        } else if self.spec.config != "{}" {
            return Err(InstantiateError::Init(
                "the component takes no config (it does not export `configure`)".into(),
            ));
        }
        self.scope.stats.instantiated();
        Ok(loaded)
    }

    /// Makes and drops one instance (for the instantiation benchmark).
    pub(crate) async fn instantiate_for_bench(&self) -> Result<(), String> {
        self.instantiate().await.map(drop).map_err(|e| match e {
            InstantiateError::Init(m) | InstantiateError::Other(m) => m,
        })
    }

    /// An instance for one call: a pooled one, or a new one.
    async fn acquire(&self) -> Result<Instance, HookError> {
        if self.spec.reuse_instances
            && let Some(instance) = self.pool.take()
        {
            return Ok(instance);
        }
        // Boxed: a new instance is rare, and its future (~2.5 KiB) would
        // otherwise sit in every hook call's.
        Box::pin(self.instantiate()).await.map_err(|e| {
            let message = match e {
                InstantiateError::Init(m) => format!("init failed: {m}"),
                InstantiateError::Other(m) => m,
            };
            self.scope.stats.record(Duration::ZERO, Some(Failure::Trap));
            HookError::Instantiate(message)
        })
    }

    fn release(&self, mut instance: Instance) {
        if self.spec.reuse_instances {
            let ctx = instance.store.data_mut();
            ctx.end_call();
            ctx.request = None;
            ctx.response = None;
            ctx.upstream = None;
            ctx.candidates = None;
            ctx.directory = None;
            self.pool.give_back(instance);
        }
    }

    /// Starts the clock for one call; returns when it started and the
    /// latest it may end (see [`bounded`]).
    fn arm(&self, instance: &mut Instance) -> (Instant, Instant) {
        arm(&mut instance.store, self.spec.deadline)
    }

    /// Records a finished call; classifies a failure. The caller discards
    /// the instance on `Err`.
    fn settle<T>(&self, started: Instant, result: wasmtime::Result<T>) -> Result<T, HookError> {
        let elapsed = started.elapsed();
        match result {
            Ok(value) => {
                self.scope.stats.record(elapsed, None);
                Ok(value)
            }
            Err(error) => {
                if let Some(state) = error.downcast_ref::<shared_state::StateError>() {
                    self.scope.stats.record(elapsed, Some(Failure::State));
                    return Err(HookError::State(state.clone()));
                }
                if let Some(limit) = error.downcast_ref::<host::HostCallLimit>() {
                    self.scope.stats.record(elapsed, Some(Failure::HostCalls));
                    return Err(HookError::HostCalls(*limit));
                }
                let deadline = matches!(
                    error.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt)
                );
                if deadline {
                    self.scope.stats.record(elapsed, Some(Failure::Deadline));
                    Err(HookError::Deadline(self.spec.deadline))
                } else {
                    self.scope.stats.record(elapsed, Some(Failure::Trap));
                    Err(HookError::Trap(format!("{error:#}")))
                }
            }
        }
    }

    /// Counts a call whose answer the host refused.
    fn refuse(&self, message: String) -> HookError {
        self.scope
            .stats
            .record(Duration::ZERO, Some(Failure::Invalid));
        HookError::Invalid(message)
    }

    /// Runs `on-request`. The request is lent to the guest and given back.
    pub(crate) async fn on_request(
        &self,
        req: RequestState,
    ) -> (RequestState, Result<Action, HookError>) {
        let mut instance = match self.acquire().await {
            Ok(instance) => instance,
            Err(e) => return (req, Err(e)),
        };
        let Some(hook) = instance.request.clone() else {
            self.release(instance);
            return (req, Ok(Action::Continue));
        };
        instance.store.data_mut().request = Some(req);
        let (started, latest) = self.arm(&mut instance);
        let called = bounded(
            latest,
            Box::pin(hook.call_on_request(&mut instance.store, Resource::new_borrow(0))),
        )
        .await;
        let req = take_request(&mut instance);
        match self.settle(started, called) {
            Ok(action) => {
                self.release(instance);
                (req, Ok(action))
            }
            Err(e) => (req, Err(e)),
        }
    }

    /// Runs `on-response` with the request as forwarded and the response head.
    pub(crate) async fn on_response(
        &self,
        req: RequestState,
        resp: http::response::Parts,
    ) -> (RequestState, http::response::Parts, Result<(), HookError>) {
        let mut instance = match self.acquire().await {
            Ok(instance) => instance,
            Err(e) => return (req, resp, Err(e)),
        };
        let Some(hook) = instance.response.clone() else {
            self.release(instance);
            return (req, resp, Ok(()));
        };
        let ctx = instance.store.data_mut();
        ctx.request = Some(req);
        ctx.response = Some(resp);
        let (started, latest) = self.arm(&mut instance);
        let called = bounded(
            latest,
            Box::pin(hook.call_on_response(
                &mut instance.store,
                Resource::<RequestHandle>::new_borrow(0),
                Resource::<ResponseHandle>::new_borrow(0),
            )),
        )
        .await;
        let req = take_request(&mut instance);
        let resp = take_response(&mut instance);
        match self.settle(started, called) {
            Ok(()) => {
                self.release(instance);
                (req, resp, Ok(()))
            }
            Err(e) => (req, resp, Err(e)),
        }
    }

    /// Runs `on-outcome` for an exchange with `upstream`, one of `directory`.
    pub(crate) async fn on_outcome(
        &self,
        upstream: &Arc<EndpointSet>,
        directory: &Directory,
        outcome: &Outcome,
    ) -> Result<(), HookError> {
        let mut instance = self.acquire().await?;
        let Some(hook) = instance.outcome.clone() else {
            self.release(instance);
            return Ok(());
        };
        let ctx = instance.store.data_mut();
        ctx.upstream = Some(upstream.clone());
        ctx.directory = Some(directory.clone());
        let (started, latest) = self.arm(&mut instance);
        let called = bounded(
            latest,
            Box::pin(hook.call_on_outcome(&mut instance.store, outcome)),
        )
        .await;
        self.settle(started, called)?;
        self.release(instance);
        Ok(())
    }

    /// Runs `pick` over `candidates` of `upstream`; the answer is a position in it.
    pub(crate) async fn pick(
        &self,
        req: RequestState,
        upstream: &Arc<EndpointSet>,
        candidates: &Arc<CandidateSet>,
    ) -> (RequestState, Result<Option<usize>, HookError>) {
        let mut instance = match self.acquire().await {
            Ok(instance) => instance,
            Err(e) => return (req, Err(e)),
        };
        let Some(hook) = instance.balance.clone() else {
            self.release(instance);
            return (req, Err(self.refuse("the plugin is not a balancer".into())));
        };
        let ctx = instance.store.data_mut();
        ctx.request = Some(req);
        ctx.upstream = Some(upstream.clone());
        ctx.candidates = Some(candidates.clone());
        let (started, latest) = self.arm(&mut instance);
        let called = bounded(
            latest,
            Box::pin(hook.call_pick(
                &mut instance.store,
                Resource::<RequestHandle>::new_borrow(0),
                Resource::<UpstreamHandle>::new_borrow(0),
                Resource::<CandidatesHandle>::new_borrow(0),
            )),
        )
        .await;
        let req = take_request(&mut instance);
        match self.settle(started, called) {
            Ok(None) => {
                self.release(instance);
                (req, Ok(None))
            }
            Ok(Some(position)) => {
                self.release(instance);
                match usize::try_from(position)
                    .ok()
                    .filter(|p| *p < candidates.len())
                {
                    Some(p) => (req, Ok(Some(p))),
                    None => (
                        req,
                        Err(self.refuse(format!(
                            "pick returned position {position} of {} candidates",
                            candidates.len()
                        ))),
                    ),
                }
            }
            Err(e) => (req, Err(e)),
        }
    }

    /// The plugin's `on_error` for a failed call.
    pub(crate) fn on_error(&self) -> OnError {
        self.spec.on_error
    }

    /// Reports a refused answer (bad reply, unknown upstream) from a hook.
    pub(crate) fn refused(&self, message: String) -> HookError {
        self.refuse(message)
    }
}

/// Sets the store's deadline `budget` from now and checks it from the next
/// epoch tick; returns now and the latest the call may end (the deadline
/// plus what waiting on shared state may add to it).
fn arm(store: &mut Store<Ctx>, budget: Duration) -> (Instant, Instant) {
    let now = Instant::now();
    let latest = store.data_mut().arm(now, budget);
    store.set_epoch_deadline(1);
    engine::note_guest_running();
    (now, latest)
}

/// Runs one guest call that must end by `latest`. The epoch check stops a
/// guest running its own code at its deadline (once it has run that long,
/// see [`Ctx::out_of_time`]), but a guest waiting in the
/// host (a WASI sleep or poll, `std::thread::sleep` in Rust, or a long call
/// waiting for its turn) runs no code to check, so a timer ends the wait at
/// `latest` instead, as a deadline; the
/// call's future is dropped, which unwinds the guest, and the caller
/// discards the instance. The timer is made only once the call first waits:
/// a call that completes in one go (nearly all of them) never pays for it.
/// Without a tokio runtime (the first instance is made under `pollster`)
/// there is no timer and only the epoch check applies.
async fn bounded<T>(
    latest: Instant,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let mut call = std::pin::pin!(call);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut runtime = true;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = call.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        if timer.is_none() && runtime {
            runtime = tokio::runtime::Handle::try_current().is_ok();
            if runtime {
                timer = Some(Box::pin(tokio::time::sleep_until(latest.into())));
            }
        }
        match timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(wasmtime::Trap::Interrupt.into())),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Instantiation budget, at least: a Python guest's first instance takes
/// about a millisecond, and a cold start on a busy machine much more.
const INSTANTIATE_BUDGET: Duration = Duration::from_secs(5);

enum InstantiateError {
    Init(String),
    Other(String),
}

/// Takes the lent request back out of a store; the host put it there, so it is present.
fn take_request(instance: &mut Instance) -> RequestState {
    instance
        .store
        .data_mut()
        .request
        .take()
        .unwrap_or_else(RequestState::placeholder)
}

fn take_response(instance: &mut Instance) -> http::response::Parts {
    instance
        .store
        .data_mut()
        .response
        .take()
        .unwrap_or_else(|| http::Response::new(()).into_parts().0)
}

/// SHA-256 of `bytes`, lower-case hex: a component's version.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
