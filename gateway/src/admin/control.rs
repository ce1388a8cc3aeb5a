//! The running config and every change made to it: manifest reloads
//! (SIGHUP, `POST /reload`) and live plugin swaps (`PUT /plugins/...`,
//! rollback). Changes are serialised; each one is validated whole before
//! anything is swapped, so a refused change leaves the running config as it
//! was.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use super::audit::{Action, Actor, AuditEntry, AuditLog};

use crate::config::{Config, ConfigError};
use crate::plugin::{Plugin, PluginError, PluginSpec, Source};
use crate::{HealthChecks, Reloader};

/// How many replaced versions of each plugin are kept for rollback.
pub const KEPT_VERSIONS: usize = 5;

/// The control plane's handle on the running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    config: ArcSwap<Config>,
    reloaders: Vec<Reloader>,
    /// Held for the length of a change, so changes apply one at a time.
    changes: tokio::sync::Mutex<Changes>,
    /// Every change, for `GET /audit` and `[admin] audit_log`.
    audit: AuditLog,
    /// When this control plane took charge.
    started: Instant,
    started_at: SystemTime,
    /// When the running manifest was loaded (start or last reload), ms since the Unix epoch.
    loaded_at_ms: AtomicU64,
    /// Successful reloads since the start.
    reloads: AtomicU64,
}

/// How long the gateway has served and since when its manifest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving {
    pub(crate) started_at: SystemTime,
    pub(crate) uptime: Duration,
    /// When the running manifest was loaded: at the start or the last reload.
    pub(crate) loaded_at: SystemTime,
    pub(crate) reloads: u64,
}

/// What only a change touches.
struct Changes {
    /// The running config's active health checks.
    checks: HealthChecks,
    /// Replaced versions by plugin name, oldest first.
    previous: HashMap<String, Vec<Arc<Plugin>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// A change to one plugin.
#[derive(Debug)]
pub(crate) enum PluginChange {
    /// New `config` JSON for the running component.
    Config(String),
    /// A new component, with new config JSON or the running one.
    Component {
        /// The `.wasm` bytes.
        bytes: bytes::Bytes,
        /// New config JSON, when given.
        config: Option<String>,
    },
}

/// Why a plugin change was refused. The running version is untouched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SwapError {
    /// No plugin has that name in the running config.
    #[error("no plugin named \"{0}\" is loaded")]
    Unknown(String),
    /// Rollback with no earlier version kept.
    #[error("plugin \"{0}\" has no earlier version to roll back to")]
    NoPrevious(String),
    /// The new version failed to compile, link, instantiate or `init`.
    #[error("{0}")]
    Invalid(PluginError),
    /// The new version cannot do the job the running one does.
    #[error("{0}")]
    Unfit(String),
}

/// What a successful swap did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Swapped {
    pub(crate) plugin: String,
    /// SHA-256 of the component now running.
    pub(crate) version: String,
    /// SHA-256 of the component it replaced.
    pub(crate) previous: String,
    /// The config JSON now running.
    pub(crate) config: serde_json::Value,
}

/// Why a reload was refused. The running config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The manifest is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Loading did not finish.
    #[error("the reload did not finish: {0}")]
    Aborted(String),
}

impl Control {
    /// Takes charge of `config`, served by the workers behind `reloaders`,
    /// whose active health checks are `checks`. Changes are audited to
    /// `config`'s `[admin] audit_log`, if any, for as long as this runs.
    pub fn new(config: Config, reloaders: Vec<Reloader>, checks: HealthChecks) -> Control {
        let audit = AuditLog::new(config.admin.as_ref().and_then(|a| a.audit_log.as_ref()));
        let started_at = SystemTime::now();
        Control {
            inner: Arc::new(Inner {
                config: ArcSwap::from_pointee(config),
                reloaders,
                changes: tokio::sync::Mutex::new(Changes {
                    checks,
                    previous: HashMap::new(),
                }),
                audit,
                started: Instant::now(),
                started_at,
                loaded_at_ms: AtomicU64::new(unix_ms(started_at)),
                reloads: AtomicU64::new(0),
            }),
        }
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// The audit log every change is recorded in.
    pub(crate) fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// How many workers serve the listeners.
    pub(crate) fn workers(&self) -> usize {
        self.inner.reloaders.len()
    }

    /// The client connections each worker serves now, by worker index.
    pub(crate) fn worker_connections(&self) -> Vec<usize> {
        self.inner
            .reloaders
            .iter()
            .map(Reloader::open_connections)
            .collect()
    }

    /// Each listener the workers serve and the address it is bound to,
    /// counting only listeners every worker serves.
    pub(crate) fn bound_listeners(&self) -> Vec<(String, SocketAddr)> {
        let mut workers = self.inner.reloaders.iter().map(Reloader::local_addrs);
        let Some(first) = workers.next() else {
            return Vec::new();
        };
        let rest: Vec<_> = workers.collect();
        first
            .into_iter()
            .filter(|(name, _)| rest.iter().all(|w| w.iter().any(|(n, _)| n == name)))
            .collect()
    }

    /// How long the gateway has served, and since when its manifest.
    pub(crate) fn serving(&self) -> Serving {
        let loaded_ms = self.inner.loaded_at_ms.load(Ordering::Relaxed);
        Serving {
            started_at: self.inner.started_at,
            uptime: self.inner.started.elapsed(),
            loaded_at: SystemTime::UNIX_EPOCH + Duration::from_millis(loaded_ms),
            reloads: self.inner.reloads.load(Ordering::Relaxed),
        }
    }

    /// [`Control::reload`] asked for by `actor`, recorded in the audit log
    /// (for a request, with the status it is answered with: 200 or 422).
    /// `[admin]` itself is read at start only: changes to it are logged
    /// and wait for a restart.
    pub(crate) async fn reload_as(&self, path: &Path, actor: &Actor) -> Result<(), ReloadError> {
        let admin_before = admin_table(&self.config());
        let result = self.reload(path).await;
        let asked = matches!(actor, Actor::Token { .. } | Actor::Peer(_));
        let entry = AuditEntry::new(actor, Action::Reload, &path.display().to_string());
        match &result {
            Ok(()) => {
                self.inner
                    .loaded_at_ms
                    .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
                if admin_table(&self.config()) != admin_before {
                    tracing::warn!(
                        "[admin] changes in the manifest (listen, token, audit_log) take effect on restart only"
                    );
                }
                self.inner.audit.record(entry.ok(asked.then_some(200)));
            }
            Err(error) => {
                self.inner
                    .audit
                    .record(entry.refused(asked.then_some(422), &error.to_string()));
            }
        }
        result
    }

    /// Re-reads the manifest at `path` and, when it is valid and its new
    /// listeners can be bound, serves it; otherwise nothing changes.
    ///
    /// Routes and plugins are replaced; in-flight requests finish on the old
    /// ones. An upstream whose definition is unchanged keeps its live state
    /// (health, ejections, load, breaker states, retry budget, each worker's
    /// pool with its idle connections, its running health checks); new and
    /// changed upstreams start fresh, removed ones' checks stop. New
    /// listeners start accepting on every worker; removed ones stop, their
    /// connections finishing in-flight requests; a listener whose address is
    /// unchanged keeps its socket and connections, and new connections take
    /// its new settings. Kept plugin versions are dropped.
    pub async fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        let result = self.reload_manifest(path).await;
        self.inner.config.load().changes.reload(result.is_ok());
        result
    }

    /// Builds a new version of plugin `name` (compile, link, instantiate,
    /// `init`; off the runtime threads) and swaps it in everywhere the
    /// running one serves. The replaced version is kept for rollback.
    pub(crate) async fn swap(
        &self,
        name: &str,
        change: PluginChange,
    ) -> Result<Swapped, SwapError> {
        let result = self.try_swap(name, change).await;
        self.inner.config.load().changes.swap(result.is_ok());
        result
    }

    async fn try_swap(&self, name: &str, change: PluginChange) -> Result<Swapped, SwapError> {
        let mut changes = self.inner.changes.lock().await;
        let config = self.inner.config.load_full();
        let running = config
            .plugin(name)
            .cloned()
            .ok_or_else(|| SwapError::Unknown(name.to_string()))?;
        let mut spec: PluginSpec = running.spec.clone();
        let bytes = match change {
            PluginChange::Config(json) => {
                spec.config = json;
                None
            }
            PluginChange::Component { bytes, config } => {
                if let Some(json) = config {
                    spec.config = json;
                }
                spec.source = Source::Upload;
                Some(bytes)
            }
        };
        let base = running.clone();
        let built = tokio::task::spawn_blocking(move || match bytes {
            Some(bytes) => Plugin::from_upload(spec, &bytes),
            None => Plugin::rebuild(&base, spec),
        })
        .await
        .map_err(|e| SwapError::Unfit(format!("building the plugin did not finish: {e}")))?
        .map_err(SwapError::Invalid)?;
        fits_in_place_of(&config, &running, &built)?;
        self.install(&config, built.clone());
        let kept = changes.previous.entry(name.to_string()).or_default();
        kept.push(running.clone());
        if kept.len() > KEPT_VERSIONS {
            kept.remove(0);
        }
        Ok(swapped(&built, &running))
    }

    /// Puts back the version plugin `name` ran before its last swap.
    pub(crate) async fn rollback(&self, name: &str) -> Result<Swapped, SwapError> {
        let result = self.try_rollback(name).await;
        self.inner.config.load().changes.swap(result.is_ok());
        result
    }

    async fn try_rollback(&self, name: &str) -> Result<Swapped, SwapError> {
        let mut changes = self.inner.changes.lock().await;
        let config = self.inner.config.load_full();
        let running = config
            .plugin(name)
            .cloned()
            .ok_or_else(|| SwapError::Unknown(name.to_string()))?;
        let earlier = changes
            .previous
            .get_mut(name)
            .and_then(Vec::pop)
            .ok_or_else(|| SwapError::NoPrevious(name.to_string()))?;
        self.install(&config, earlier.clone());
        Ok(swapped(&earlier, &running))
    }

    /// Serves `config` with `plugin` in place of the version of that name.
    fn install(&self, config: &Config, plugin: Arc<Plugin>) {
        let next = config.with_plugin(plugin);
        for reloader in &self.inner.reloaders {
            reloader.apply_plugins(&next);
        }
        self.inner.config.store(Arc::new(next));
    }

    /// The replaced versions kept for rollback (SHA-256s, oldest first), by plugin name.
    pub(crate) async fn kept_versions(&self) -> HashMap<String, Vec<String>> {
        let changes = self.inner.changes.lock().await;
        changes
            .previous
            .iter()
            .map(|(name, kept)| {
                (
                    name.clone(),
                    kept.iter().map(|p| p.version.clone()).collect(),
                )
            })
            .collect()
    }
}

/// What of `[admin]` a reload cannot change: listen address, token, audit file.
fn admin_table(config: &Config) -> Option<(SocketAddr, Option<Arc<str>>, Option<PathBuf>)> {
    config.admin.as_ref().map(|a| {
        (
            a.addr,
            a.token.clone(),
            a.audit_log.as_ref().map(|log| log.path.clone()),
        )
    })
}

/// Milliseconds since the Unix epoch.
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn swapped(now: &Plugin, before: &Plugin) -> Swapped {
    Swapped {
        plugin: now.name.to_string(),
        version: now.version.clone(),
        previous: before.version.clone(),
        config: serde_json::from_str(&now.spec.config).unwrap_or(serde_json::Value::Null),
    }
}

/// Refuses a new version that lacks a hook the running one is used for.
fn fits_in_place_of(config: &Config, running: &Plugin, new: &Plugin) -> Result<(), SwapError> {
    if let Some(upstream) = config.upstream_balanced_by(&running.name)
        && !new.is_balancer()
    {
        return Err(SwapError::Unfit(format!(
            "plugin \"{}\" is the balancer of upstream \"{upstream}\", but the new component does not export `balance`",
            running.name
        )));
    }
    if config.plugin_in_chain(&running.name) && !new.has_policy_hooks() {
        return Err(SwapError::Unfit(format!(
            "plugin \"{}\" is in a route's policies, but the new component exports no request, response or outcome hook",
            running.name
        )));
    }
    Ok(())
}

impl Control {
    /// [`Control::reload`], uncounted.
    async fn reload_manifest(&self, path: &Path) -> Result<(), ReloadError> {
        let mut changes = self.inner.changes.lock().await;
        let loaded = tokio::task::spawn_blocking({
            let path = path.to_path_buf();
            move || Config::load(&path)
        })
        .await
        .map_err(|e| ReloadError::Aborted(e.to_string()))?;
        let mut config = loaded?;
        let running = self.inner.config.load_full();
        config.adopt_metrics(&running);
        let kept = config.keep_unchanged_upstreams(&running);
        // The last step that can fail: until every new socket is bound, nothing has changed.
        let reloaders = &self.inner.reloaders;
        let listeners = crate::proxy::ListenerChange::bind(&running, &config, reloaders)?;
        let (added, removed) = (listeners.added.clone(), listeners.removed.clone());
        // Routes and upstreams first, so a new listener serves the new routes.
        for reloader in reloaders {
            reloader.apply(&config);
        }
        let closing = listeners.apply(&config, reloaders);
        changes.checks = config.keep_health_checks(std::mem::take(&mut changes.checks));
        changes.previous.clear();
        let fresh: Vec<&str> = config
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .filter(|name| !kept.iter().any(|k| k == name))
            .collect();
        for (listener, addr) in &added {
            tracing::info!(listener, %addr, workers = reloaders.len(), "listening");
        }
        tracing::info!(
            manifest = %path.display(),
            upstreams_kept = ?kept,
            upstreams_fresh = ?fresh,
            listeners_added = ?added.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            listeners_removed = ?removed,
            "reloaded routes and upstreams"
        );
        self.inner.config.store(Arc::new(config));
        closing.closed().await;
        Ok(())
    }
}
