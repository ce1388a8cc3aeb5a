//! The `[state] backend = "redis"` store: the `state` host imports on a
//! Redis server, so several gateway instances share rate limits, breaker
//! state and sticky assignments.
//!
//! Every operation is one Lua script (or one `GET`/`DEL`), so each is atomic
//! on the server and costs one round trip. Times inside scripts come from
//! Redis' own clock (`TIME`), so instances with skewed clocks agree.
//!
//! One connection per store, multiplexed (pipelined) by the `redis` crate,
//! kept by a thread of its own that reconnects with backoff. While it is
//! down, calls fail at once instead of waiting; the caller (the host
//! import) then follows the plugin's `on_error`: answer from in-process
//! state, or fail the request.
//!
//! In `mode = "batched"`, `throttle` decides in process and the admitted
//! cost is added to Redis every `sync_interval`; the first call on a key
//! (and the first after a second without hearing from Redis about it)
//! still asks Redis, so an instance starts from the shared state. See
//! [`SyncMode::Batched`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use tokio::sync::Notify;

use super::scope::PluginScope;
use super::state::{Rate, Throttled};

/// `[state]` with `backend = "redis"`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisSettings {
    /// `redis://` or `rediss://` URL, parsed once at validation.
    pub(crate) url: String,
    /// Prepended to every key.
    pub(crate) prefix: String,
    /// Most time one operation may take before the call fails.
    pub(crate) timeout: Duration,
    /// Most time one connection attempt may take.
    pub(crate) connect_timeout: Duration,
    /// Whether `throttle` goes to Redis on each call.
    pub(crate) mode: SyncMode,
}

/// How `state.throttle` uses Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncMode {
    /// Every call is one round trip: exact across instances.
    Strict,
    /// Decide in process, add the admitted cost to Redis every `interval`
    /// and adopt Redis' arrival time. Between syncs an instance does not see
    /// the others' admissions, so N instances may together admit up to
    /// about (N − 1) × rate × interval more than the limit; the shared
    /// arrival time then runs ahead and the excess is paid back.
    Batched {
        /// Time between syncs.
        interval: Duration,
    },
}

/// Why a state operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StateError {
    /// No connection to Redis right now (reconnecting).
    #[error("redis is not connected ({0})")]
    Disconnected(String),
    /// The operation ran past `timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection broke mid-call.
    #[error("redis: {0}")]
    Redis(String),
}

/// Operation counts for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StateCounts {
    /// Whether the connection is up now.
    pub(crate) up: bool,
    /// Operations answered by Redis.
    pub(crate) ok: u64,
    /// Operations that failed (disconnected, Redis errors).
    pub(crate) errors: u64,
    /// Operations that ran past `timeout`.
    pub(crate) timeouts: u64,
    /// Calls answered from in-process state because Redis failed.
    pub(crate) fallbacks: u64,
}

/// A shared Redis state store; see the module docs.
#[derive(Debug)]
pub(crate) struct RedisStore {
    inner: Arc<Inner>,
    /// Dropped with the store: stops its connection thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Plugins are compared by their spec on reload; stores with the same
/// settings are the same store.
impl PartialEq for RedisStore {
    fn eq(&self, other: &RedisStore) -> bool {
        self.inner.settings == other.inner.settings
    }
}

impl Eq for RedisStore {}

#[derive(Debug)]
struct Inner {
    settings: RedisSettings,
    client: redis::Client,
    connection: ArcSwapOption<MultiplexedConnection>,
    /// The last connection error, for callers while disconnected.
    last_error: Mutex<String>,
    /// Wakes the connection thread when a call found the connection broken.
    broken: Notify,
    up: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    fallbacks: AtomicU64,
    /// Batched mode: admitted cost not yet added to Redis, by Redis key.
    pending: DashMap<String, Pending>,
    /// Batched mode: when each throttle key last heard from Redis; a key
    /// not heard from within [`BATCHED_FRESH`] asks Redis first.
    heard: DashMap<String, Instant>,
}

/// Batched mode: how long a key's in-process arrival time is trusted
/// without hearing from Redis.
const BATCHED_FRESH: Duration = Duration::from_secs(1);

/// Cost admitted in process on one throttle key since the last sync.
#[derive(Debug)]
struct Pending {
    scope: Weak<PluginScope>,
    key: Box<str>,
    rate: Rate,
    cost: u64,
}

/// Live stores by settings, so a reload with the same `[state]` keeps its
/// connection. Touched only when a manifest loads.
static STORES: LazyLock<Mutex<Vec<Weak<RedisStore>>>> = LazyLock::new(|| Mutex::new(Vec::new()));

/// `counter-add`: INCRBY, or a fresh counter (with its TTL) when the key is
/// absent or holds text.
static COUNTER_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key, delta, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', key) == 1 then
  local ok, value = pcall(redis.call, 'INCRBY', key, delta)
  if ok then return value end
end
if ttl > 0 then redis.call('SET', key, delta, 'PX', ttl) else redis.call('SET', key, delta) end
return tonumber(delta)
",
    )
});

/// `compare-and-swap`: ARGV = has-expected ('1'/'0'), expected, value, ttl-ms.
/// Returns {'1'} when stored, {'0'} or {'0', current} on a mismatch.
static COMPARE_AND_SWAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GET', KEYS[1])
local matches
if ARGV[1] == '1' then matches = (current == ARGV[2]) else matches = (current == false) end
if matches then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
  return {'1'}
end
if current == false then return {'0'} end
return {'0', current}
",
    )
});

/// GCRA as [`Rate::decide`] does it in process, in microseconds of Redis'
/// clock. ARGV = interval-ns, burst, cost. Returns {allowed, remaining,
/// retry-after-us, reset-us, ahead-us}. The arrival time is stored as whole
/// microseconds and expires when the limit is full again.
static THROTTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = math.max(tonumber(ARGV[1]) / 1000, 0.001)
local burst, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local window = interval * (burst + 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local ahead = tat - now
local next = ahead + interval * cost
local function fits(used)
  local left = window - used
  if left < 0 then left = 0 end
  return math.floor(left / interval + 1e-9)
end
-- Half a microsecond of slack: the stored arrival time is rounded.
if next <= window + 0.5 then
  if cost > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', now + next), 'PX', math.max(1, math.ceil(next / 1000)))
  end
  return {1, fits(next), 0, math.ceil(next), math.ceil(ahead)}
end
return {0, fits(ahead), math.ceil(next - window), math.ceil(ahead), 0}
",
    )
});

/// Batched mode's sync: adds `cost` admitted calls to the arrival time
/// whatever the limit says (they were admitted already) and returns how far
/// ahead of now it runs, in microseconds. ARGV = interval-ns, cost. Sent as
/// `EVAL` in a pipeline (a pipeline cannot fall back from `EVALSHA` when
/// Redis has forgotten the script, as after a restart).
const THROTTLE_ADD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = math.max(tonumber(ARGV[1]) / 1000, 0.001)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
tat = tat + interval * tonumber(ARGV[2])
local ahead = tat - now
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.max(1, math.ceil(ahead / 1000)))
return math.ceil(ahead)
";

/// First wait before reconnecting; doubles up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

impl RedisStore {
    /// The store for `settings`: the running one when a store with the same
    /// settings is alive (a reload keeps its connection), else a new one
    /// whose thread starts connecting at once. Never waits for Redis: a
    /// gateway starts while Redis is down, and its plugins follow `on_error`
    /// until it is up.
    pub(crate) fn open(settings: RedisSettings) -> Result<Arc<RedisStore>, String> {
        let mut stores = STORES.lock().unwrap_or_else(|e| e.into_inner());
        stores.retain(|store| store.strong_count() > 0);
        if let Some(store) = stores
            .iter()
            .filter_map(Weak::upgrade)
            .find(|store| store.inner.settings == settings)
        {
            return Ok(store);
        }
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| e.to_string())?;
        let inner = Arc::new(Inner {
            settings,
            client,
            connection: ArcSwapOption::empty(),
            last_error: Mutex::new("not connected yet".to_string()),
            broken: Notify::new(),
            up: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            pending: DashMap::new(),
            heard: DashMap::new(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the redis thread: {e}"))?;
        let keeper = inner.clone();
        std::thread::Builder::new()
            .name("sluice-redis".to_string())
            .spawn(move || runtime.block_on(keep_connected(keeper, stopped)))
            .map_err(|e| format!("cannot start the redis thread: {e}"))?;
        let store = Arc::new(RedisStore { inner, _stop: stop });
        stores.push(Arc::downgrade(&store));
        Ok(store)
    }

    /// Most time one operation may take.
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.settings.timeout
    }

    /// Operation counts and whether the connection is up.
    pub(crate) fn counts(&self) -> StateCounts {
        let inner = &self.inner;
        StateCounts {
            up: inner.up.load(Ordering::Relaxed),
            ok: inner.ok.load(Ordering::Relaxed),
            errors: inner.errors.load(Ordering::Relaxed),
            timeouts: inner.timeouts.load(Ordering::Relaxed),
            fallbacks: inner.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Counts a call answered from in-process state after a failure.
    pub(crate) fn count_fallback(&self) {
        self.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// `state.counter-add` on Redis.
    pub(crate) async fn counter_add(
        &self,
        plugin: &str,
        key: &str,
        delta: i64,
        ttl_ms: u64,
    ) -> Result<i64, StateError> {
        let mut invocation = COUNTER_ADD.key(self.value_key(plugin, key));
        invocation.arg(delta).arg(ttl_ms);
        self.inner
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }

    /// `state.get` on Redis.
    pub(crate) async fn get(&self, plugin: &str, key: &str) -> Result<Option<String>, StateError> {
        let key = self.value_key(plugin, key);
        self.inner
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// `state.compare-and-swap` on Redis.
    pub(crate) async fn compare_and_swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&str>,
        value: &str,
        ttl_ms: u64,
    ) -> Result<Result<(), Option<String>>, StateError> {
        let mut invocation = COMPARE_AND_SWAP.key(self.value_key(plugin, key));
        invocation
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or(""))
            .arg(value)
            .arg(ttl_ms);
        let reply: Vec<String> = self
            .inner
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        match reply.first().map(String::as_str) {
            Some("1") => Ok(Ok(())),
            Some("0") => Ok(Err(reply.into_iter().nth(1))),
            _ => Err(StateError::Redis(format!(
                "unexpected compare-and-swap reply {reply:?}"
            ))),
        }
    }

    /// `state.remove` on Redis.
    pub(crate) async fn remove(&self, plugin: &str, key: &str) -> Result<(), StateError> {
        let key = self.value_key(plugin, key);
        self.inner
            .run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await })
            .await
    }

    /// `state.throttle` on Redis: one script per call in strict mode; in
    /// batched mode in process with the admitted cost synced later, once
    /// the key's shared arrival time is known (see [`SyncMode::Batched`]).
    pub(crate) async fn throttle(
        &self,
        scope: &Arc<PluginScope>,
        key: &str,
        rate: Rate,
        cost: u32,
    ) -> Result<Throttled, StateError> {
        let shared = self.throttle_key(&scope.name, key);
        let batched = matches!(self.inner.settings.mode, SyncMode::Batched { .. });
        if batched
            && self
                .inner
                .heard
                .get(&shared)
                .is_some_and(|at| at.elapsed() < BATCHED_FRESH)
        {
            let decision = scope.state.throttle(key, rate, cost);
            if decision.allowed && cost > 0 {
                self.inner
                    .pending
                    .entry(shared)
                    .and_modify(|p| p.cost += u64::from(cost))
                    .or_insert_with(|| Pending {
                        scope: Arc::downgrade(scope),
                        key: Box::from(key),
                        rate,
                        cost: u64::from(cost),
                    });
            }
            return Ok(decision);
        }
        let mut invocation = THROTTLE.key(&shared);
        invocation
            .arg(u64::try_from(rate.interval.as_nanos()).unwrap_or(u64::MAX))
            .arg(rate.burst)
            .arg(cost);
        let reply: (u8, u64, u64, u64, u64) = self
            .inner
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let (allowed, remaining, retry_after, reset, ahead) = reply;
        let decision = Throttled {
            allowed: allowed == 1,
            remaining,
            retry_after: Duration::from_micros(retry_after),
            reset: Duration::from_micros(reset),
            ahead: Duration::from_micros(ahead),
        };
        if batched {
            // Start the in-process copy from the shared arrival time.
            let now = Instant::now();
            scope.state.raise_arrival(key, now + decision.reset);
            self.inner.heard.insert(shared, now);
        }
        Ok(decision)
    }

    fn value_key(&self, plugin: &str, key: &str) -> String {
        format!("{}{plugin}:v:{key}", self.inner.settings.prefix)
    }

    fn throttle_key(&self, plugin: &str, key: &str) -> String {
        format!("{}{plugin}:t:{key}", self.inner.settings.prefix)
    }
}

impl Inner {
    /// Runs one operation on the current connection within `timeout`,
    /// counting the result. A broken connection is dropped and the
    /// connection thread woken to replace it.
    async fn run<T, F, Fut>(&self, operation: F) -> Result<T, StateError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(connection) = self.connection.load_full() else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let why = self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(StateError::Disconnected(why));
        };
        let timeout = self.settings.timeout;
        match tokio::time::timeout(timeout, operation((*connection).clone())).await {
            Ok(Ok(value)) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Err(error)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if error.is_connection_dropped() || error.is_io_error() {
                    self.lost(&connection, &error.to_string());
                }
                Err(StateError::Redis(error.to_string()))
            }
            Err(_) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(StateError::Timeout(timeout))
            }
        }
    }

    /// Forgets `connection` (if it is still the current one) and wakes the
    /// connection thread.
    fn lost(&self, connection: &Arc<MultiplexedConnection>, why: &str) {
        let current = self.connection.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
            self.connection.store(None);
            self.up.store(false, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = why.to_string();
            self.broken.notify_one();
        }
    }

    /// Batched mode: adds every pending cost to Redis in one pipeline and
    /// raises each key's in-process arrival time to the shared one.
    async fn sync(&self) {
        if self.pending.is_empty() {
            if !self.heard.is_empty() {
                self.heard.retain(|_, at| at.elapsed() < BATCHED_FRESH);
            }
            return;
        }
        let keys: Vec<String> = self.pending.iter().map(|e| e.key().clone()).collect();
        let mut batch = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((key, pending)) = self.pending.remove(&key) {
                batch.push((key, pending));
            }
        }
        let mut pipe = redis::pipe();
        for (key, pending) in &batch {
            pipe.cmd("EVAL")
                .arg(THROTTLE_ADD)
                .arg(1)
                .arg(key)
                .arg(u64::try_from(pending.rate.interval.as_nanos()).unwrap_or(u64::MAX))
                .arg(pending.cost);
        }
        let sent = Instant::now();
        let aheads: Vec<u64> = match self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
        {
            Ok(aheads) => aheads,
            Err(error) => {
                tracing::debug!(%error, keys = batch.len(), "rate limit sync failed; retrying");
                // Keep the cost for the next sync.
                for (key, pending) in batch {
                    self.pending
                        .entry(key)
                        .and_modify(|p| p.cost += pending.cost)
                        .or_insert(pending);
                }
                return;
            }
        };
        let now = Instant::now();
        for ((key, pending), ahead) in batch.into_iter().zip(aheads) {
            if let Some(scope) = pending.scope.upgrade() {
                scope
                    .state
                    .raise_arrival(&pending.key, sent + Duration::from_micros(ahead));
            }
            self.heard.insert(key, now);
        }
    }
}

/// The connection thread: connects, reconnects with backoff when a call
/// found the connection broken, and in batched mode syncs every interval.
/// Ends when the store is dropped.
async fn keep_connected(inner: Arc<Inner>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    // No response timeout in the client: `Inner::run` bounds each call
    // itself, and a slow answer must not drop the connection (the client
    // treats its own timeout as a broken connection).
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(inner.settings.connect_timeout))
        .set_response_timeout(None);
    let mut backoff = RECONNECT_MIN;
    let mut was_up = true;
    let sync_every = match inner.settings.mode {
        SyncMode::Batched { interval } => interval,
        // Nothing to sync; the tick only bounds how long a wake can wait.
        SyncMode::Strict => Duration::from_secs(3600),
    };
    let mut tick = tokio::time::interval(sync_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if inner.connection.load().is_none() {
            let attempt = tokio::time::timeout(
                inner.settings.connect_timeout,
                inner
                    .client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await;
            match attempt {
                Ok(Ok(connection)) => {
                    inner.connection.store(Some(Arc::new(connection)));
                    inner.up.store(true, Ordering::Relaxed);
                    tracing::info!(url = %redacted(&inner.settings.url), "state backend connected to redis");
                    backoff = RECONNECT_MIN;
                    was_up = true;
                }
                failed => {
                    let why = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!(
                            "connect timed out after {:?}",
                            inner.settings.connect_timeout
                        ),
                    };
                    if was_up {
                        tracing::warn!(url = %redacted(&inner.settings.url), error = %why,
                            "state backend cannot reach redis; plugins follow on_error until it is back");
                        was_up = false;
                    }
                    *inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = why;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = &mut stopped => return,
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
            }
        }
        tokio::select! {
            () = inner.broken.notified() => {
                tracing::warn!(url = %redacted(&inner.settings.url), "state backend lost its redis connection; reconnecting");
            }
            _ = tick.tick() => inner.sync().await,
            _ = &mut stopped => return,
        }
    }
}

/// `url` without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://user:secret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
