//! The running config and every change made to it: manifest reloads
//! (SIGHUP, `POST /reload`) and live plugin swaps (`PUT /plugins/...`,
//! rollback). Changes are serialised; each one is validated whole before
//! anything is swapped, so a refused change leaves the running config as it
//! was.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

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
        bytes: Vec<u8>,
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
    /// whose active health checks are `checks`.
    pub fn new(config: Config, reloaders: Vec<Reloader>, checks: HealthChecks) -> Control {
        Control {
            inner: Arc::new(Inner {
                config: ArcSwap::from_pointee(config),
                reloaders,
                changes: tokio::sync::Mutex::new(Changes {
                    checks,
                    previous: HashMap::new(),
                }),
            }),
        }
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// Re-reads the manifest at `path` and, when it is valid, serves it:
    /// routes, upstreams and plugins are replaced, in-flight requests finish
    /// on the old ones, and the new config's health checks start. Listener
    /// changes need a restart (logged). Kept plugin versions are dropped.
    pub async fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        let mut changes = self.inner.changes.lock().await;
        let loaded = tokio::task::spawn_blocking({
            let path = path.to_path_buf();
            move || Config::load(&path)
        })
        .await
        .map_err(|e| ReloadError::Aborted(e.to_string()))?;
        let config = loaded?;
        if config.listener_addrs() != self.inner.config.load().listener_addrs() {
            tracing::warn!("listener changes in the manifest take effect on restart only");
        }
        for reloader in &self.inner.reloaders {
            reloader.apply(&config);
        }
        // The new config's endpoints start fresh; the old checks stop.
        changes.checks = config.start_health_checks();
        changes.previous.clear();
        self.inner.config.store(Arc::new(config));
        tracing::info!(manifest = %path.display(), "reloaded routes and upstreams");
        Ok(())
    }

    /// Builds a new version of plugin `name` (compile, link, instantiate,
    /// `init`; off the runtime threads) and swaps it in everywhere the
    /// running one serves. The replaced version is kept for rollback.
    pub(crate) async fn swap(
        &self,
        name: &str,
        change: PluginChange,
    ) -> Result<Swapped, SwapError> {
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
            Some(bytes) => Plugin::from_upload(spec, bytes),
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
