//! The one wasmtime [`Engine`] of the process, its epoch ticker, the
//! [`Linker`] with every host import, and the on-disk cache of compiled
//! components.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::PluginError;
use super::bindings::Gateway as GatewayWorld;
use super::host::Ctx;

/// How often the epoch advances. A call's deadline is checked (and a long
/// call yields to other requests on its thread) once per tick: a call that
/// runs past its deadline stops within a tick of it. Each tick wakes the
/// ticker thread; at 250 µs that cost ~4% of the CPU of a gateway running
/// plugins under load, at 1 ms a quarter of that.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);
/// How often expired shared-state entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Longest the ticker rests when no guest code has run for a whole tick.
/// A call that starts wakes it at once; this bounds only how late a call
/// whose thread the OS held off the CPU for over a tick is checked again.
const IDLE_REST: Duration = Duration::from_millis(10);

/// Whether guest code has run since the ticker last looked.
static GUEST_RAN: AtomicBool = AtomicBool::new(false);
/// The ticker thread calls wake from its rest: the first engine's (in the
/// gateway, the only one, `runtime()`'s). A second engine (the benches'
/// pooling one) has its own ticker, which shares the flag and is never
/// woken, so it may rest up to [`IDLE_REST`] while its calls run: their
/// deadlines are checked that much later.
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();

/// Notes that guest code is running, so the epoch keeps advancing every
/// [`EPOCH_TICK`] (and wakes the ticker if it rests). Called when a call
/// is armed and at each epoch check a running call makes. An idle gateway's
/// ticker wakes every [`IDLE_REST`] instead of every tick (at the former
/// 250 µs tick that cost ~5% of a core doing nothing).
pub(crate) fn note_guest_running() {
    // A load first: under load the flag is already set, and reading a line
    // nobody writes costs nothing.
    if !GUEST_RAN.load(Ordering::Relaxed) {
        GUEST_RAN.store(true, Ordering::Relaxed);
        if let Some(ticker) = TICKER.get() {
            ticker.unpark();
        }
    }
}

/// The engine, linker and cache shared by every plugin.
pub(crate) struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<Ctx>,
    cache: Option<PathBuf>,
    /// Hex digest of the engine's compatibility hash and wasmtime's version.
    engine_key: String,
}

/// The environment variable that makes compiled guest code visible to
/// `perf`: `SLUICE_WASM_PROFILER=perfmap` writes `/tmp/perf-<pid>.map`, so
/// `perf report` names the guest functions (the builtin plugins keep their
/// function names for this).
pub(crate) const PROFILER_ENV: &str = "SLUICE_WASM_PROFILER";

/// The profiler [`PROFILER_ENV`] asks for: none when unset or empty.
fn profiler_from_env() -> wasmtime::Result<wasmtime::ProfilingStrategy> {
    match std::env::var(PROFILER_ENV).as_deref() {
        Err(_) | Ok("") | Ok("none") => Ok(wasmtime::ProfilingStrategy::None),
        Ok("perfmap") => Ok(wasmtime::ProfilingStrategy::PerfMap),
        Ok(other) => Err(wasmtime::format_err!(
            "{PROFILER_ENV}={other:?}: unknown profiler (perfmap or none)"
        )),
    }
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The process's plugin runtime, created (with its ticker thread) on first use.
pub(crate) fn runtime() -> Result<&'static Runtime, PluginError> {
    RUNTIME
        .get_or_init(|| Runtime::new(false).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| PluginError::Engine(e.clone()))
}

impl Runtime {
    /// An engine with its linker and ticker. `pooling` switches to wasmtime's
    /// pooling instance allocator; the gateway keeps instances for many
    /// requests, so it uses the on-demand allocator (see BENCHMARKS.md).
    pub(crate) fn new(pooling: bool) -> wasmtime::Result<Runtime> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Plain calls, no component-model-async machinery: ~0.2 µs per call
        // instead of ~0.5 µs (see FACTS.md).
        config.concurrency_support(false);
        config.profiler(profiler_from_env()?);
        if pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::new();
            pool.total_component_instances(1_000)
                .total_core_instances(4_000)
                .total_memories(4_000)
                .total_tables(4_000)
                .max_memory_size(64 << 20);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        GatewayWorld::add_to_linker::<Ctx, HasSelf<Ctx>>(&mut linker, |ctx| ctx)?;

        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());

        let ticker = engine.weak();
        let thread = std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                let mut swept = Instant::now();
                loop {
                    if !GUEST_RAN.swap(false, Ordering::Relaxed) {
                        // Nothing ran for a whole tick: rest until a call
                        // starts. Then a full tick still passes before the
                        // epoch moves, so a call never sees a short one.
                        std::thread::park_timeout(IDLE_REST);
                    }
                    std::thread::sleep(EPOCH_TICK);
                    let Some(engine) = ticker.upgrade() else {
                        return;
                    };
                    engine.increment_epoch();
                    if swept.elapsed() >= SWEEP_EVERY {
                        swept = Instant::now();
                        super::scope::sweep_expired();
                    }
                }
            })
            .map_err(|e| wasmtime::format_err!("cannot start the epoch thread: {e}"))?;
        // The first engine's ticker is the one calls wake (see `TICKER`).
        let _ = TICKER.set(thread.thread().clone());

        Ok(Runtime {
            engine,
            linker,
            cache: cache_dir(),
            engine_key,
        })
    }

    /// Compiles `bytes` into a component, or loads the compiled artifact
    /// cached under its content hash. Slow on a miss (tens of milliseconds for
    /// a Rust guest, seconds for Python or JavaScript): call off the runtime
    /// threads.
    pub(crate) fn compile(&self, bytes: &[u8], digest: &str) -> Result<Component, String> {
        let cached = self
            .cache
            .as_ref()
            .map(|dir| dir.join(format!("{digest}-{}.cwasm", self.engine_key)));
        if let Some(path) = &cached
            && let Some(component) = self.load_cached(path)
        {
            return Ok(component);
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
        if let Some(path) = &cached
            && let Err(error) = store_cached(&component, path)
        {
            tracing::debug!(%error, path = %path.display(), "cannot cache a compiled plugin");
        }
        Ok(component)
    }

    /// A cached artifact, if present and intact. Artifacts end with the
    /// SHA-256 of what precedes it, so a torn or corrupted file is recompiled,
    /// never loaded.
    fn load_cached(&self, path: &Path) -> Option<Component> {
        let mut bytes = std::fs::read(path).ok()?;
        let body_len = bytes.len().checked_sub(32)?;
        let trailer = bytes.split_off(body_len);
        if Sha256::digest(&bytes).as_slice() != trailer.as_slice() {
            tracing::warn!(path = %path.display(), "ignoring a corrupted plugin cache entry");
            return None;
        }
        deserialize(&self.engine, &bytes)
    }
}

/// Loads an artifact this engine produced.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, bytes: &[u8]) -> Option<Component> {
    // SAFETY: `Component::deserialize` requires bytes produced by
    // `Component::serialize` of a compatible engine. The file name carries the
    // engine's compatibility hash, the content is checked against its SHA-256
    // trailer written by `store_cached`, and wasmtime itself re-checks the
    // header and engine settings before using it.
    unsafe { Component::deserialize(engine, bytes) }.ok()
}

fn store_cached(component: &Component, path: &Path) -> std::io::Result<()> {
    let mut bytes = component.serialize().map_err(std::io::Error::other)?;
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)
}

/// `SLUICE_CACHE_DIR`, else `$XDG_CACHE_HOME/sluice`, else `~/.cache/sluice`;
/// `SLUICE_CACHE_DIR=off` disables the cache.
fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SLUICE_CACHE_DIR") {
        Some(dir) if dir == "off" => return None,
        Some(dir) if !dir.is_empty() => return Some(PathBuf::from(dir)),
        _ => {}
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(xdg).join("sluice"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("sluice"))
}
