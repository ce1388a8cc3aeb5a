//! The gateway under test, served in-process from a manifest written to a
//! temporary file (so `POST /reload` and [`TestGateway::reload`] re-read
//! it), and a small builder for manifests.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The manifest's file name in the gateway's temporary directory.
const MANIFEST_FILE: &str = "test.toml";

/// A running gateway. Dropping it signals shutdown and stops serving.
#[derive(Debug)]
pub struct TestGateway {
    /// The running config, its health checks and the changes made to it.
    control: sluice::admin::Control,
    /// One per worker: where the listeners' bound addresses are read.
    reloaders: Vec<sluice::Reloader>,
    /// The manifest file reloads read.
    manifest: PathBuf,
    /// Holds the manifest file; removed on drop.
    _dir: tempfile::TempDir,
    admin: Option<SocketAddr>,
    admin_shutdown: Option<oneshot::Sender<()>>,
    shutdown: Option<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<sluice::Drained>>,
}

impl TestGateway {
    /// Writes `manifest` to a temporary file, loads it, binds its listeners
    /// (use `listen = "127.0.0.1:0"`) and starts serving. Errors name every
    /// manifest problem. Relative paths in the manifest are relative to that
    /// file's directory: use absolute ones.
    pub async fn start(manifest: &str) -> anyhow::Result<TestGateway> {
        TestGateway::start_with_workers(manifest, 1).await
    }

    /// [`TestGateway::start`] with `workers` gateways on the test's runtime,
    /// each with its own socket per listener (`SO_REUSEPORT`) and its own
    /// upstream pools, as `sluice run --workers N` serves.
    pub async fn start_with_workers(manifest: &str, workers: usize) -> anyhow::Result<TestGateway> {
        let dir = tempfile::tempdir().context("creating the manifest's directory")?;
        let path = dir.path().join(MANIFEST_FILE);
        std::fs::write(&path, manifest).context("writing the manifest")?;
        let config = sluice::Config::load(&path).map_err(|e| {
            anyhow::anyhow!("manifest rejected:\n{e}\n--- manifest ---\n{manifest}")
        })?;
        let sockets = sluice::bind_for_workers(&config, workers)
            .context("binding the gateway's listeners")?;
        let mut gateways = Vec::with_capacity(sockets.len());
        for (sockets, worker) in sockets.into_iter().zip(sluice::Worker::all(workers)) {
            gateways.push(
                sluice::Gateway::from_listeners(&config, sockets, worker)
                    .context("binding the gateway's listeners")?,
            );
        }
        let reloaders: Vec<sluice::Reloader> =
            gateways.iter().map(sluice::Gateway::reloader).collect();
        let checks = config.start_health_checks();
        let control = sluice::admin::Control::new(config, reloaders.clone(), checks);
        let (admin, admin_shutdown) = match sluice::admin::Admin::bind(&control).await {
            None => (None, None),
            Some(bound) => {
                let admin = bound.context("binding the admin listener")?;
                let addr = admin.local_addr();
                let (tx, rx) = oneshot::channel::<()>();
                tokio::spawn(admin.serve(async move {
                    let _ = rx.await;
                }));
                (addr, Some(tx))
            }
        };
        let (tx, rx) = watch::channel(false);
        let tasks = gateways
            .into_iter()
            .map(|gateway| {
                let mut stop = rx.clone();
                tokio::spawn(gateway.serve(async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                }))
            })
            .collect();
        Ok(TestGateway {
            control,
            reloaders,
            manifest: path,
            _dir: dir,
            admin,
            admin_shutdown,
            shutdown: Some(tx),
            tasks,
        })
    }

    /// The bound address of the listener called `listener`, as served now
    /// (a reload may have added or removed listeners).
    ///
    /// # Panics
    /// When the gateway serves no such listener: a mistake in the test itself.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        let addrs = self.listeners();
        addrs
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("no listener named {listener:?}; the gateway has {addrs:?}"))
    }

    /// Every listener served now, with its bound address.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.reloaders
            .first()
            .map(sluice::Reloader::local_addrs)
            .unwrap_or_default()
    }

    /// The manifest file: what `POST /reload` and [`TestGateway::reload`] read.
    pub fn manifest_path(&self) -> &Path {
        &self.manifest
    }

    /// Replaces the manifest file's text. Nothing changes until a reload.
    pub fn rewrite(&self, manifest: &str) -> anyhow::Result<()> {
        std::fs::write(&self.manifest, manifest)
            .with_context(|| format!("rewriting {}", self.manifest.display()))
    }

    /// Reloads the manifest file, as SIGHUP does.
    pub async fn reload(&self) -> Result<(), sluice::admin::ReloadError> {
        self.control.reload(&self.manifest).await
    }

    /// [`TestGateway::rewrite`], then [`TestGateway::reload`].
    pub async fn reload_with(&self, manifest: &str) -> anyhow::Result<()> {
        self.rewrite(manifest)?;
        self.reload()
            .await
            .map_err(|e| anyhow::anyhow!("reload refused:\n{e}\n--- manifest ---\n{manifest}"))
    }

    /// The admin API's bound address.
    ///
    /// # Panics
    /// When the manifest has no `[admin]` table: a mistake in the test itself.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .expect("the manifest has no [admin] table (use listen = \"127.0.0.1:0\")")
    }

    /// What the gateway knows about plugin `name`: version, call statistics, metrics.
    ///
    /// # Panics
    /// When the manifest has no such plugin: a mistake in the test itself.
    pub fn plugin(&self, name: &str) -> sluice::PluginReport {
        let config = self.control.config();
        config.plugin_report(name).unwrap_or_else(|| {
            panic!(
                "no plugin named {name:?}; the gateway has {:?}",
                config.plugin_names()
            )
        })
    }

    /// Counter `name` that plugin `plugin` reported through `metrics`; 0 until it does.
    ///
    /// # Panics
    /// When the manifest has no such plugin: a mistake in the test itself.
    pub fn counter(&self, plugin: &str, name: &str) -> u64 {
        self.plugin(plugin).counters.get(name).copied().unwrap_or(0)
    }

    /// Signals shutdown and waits (bounded by `limit`) for the drain to end;
    /// with several workers, connections left open are summed.
    pub async fn shutdown(mut self, limit: std::time::Duration) -> anyhow::Result<sluice::Drained> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        anyhow::ensure!(!self.tasks.is_empty(), "gateway already stopped");
        let tasks = futures_util::future::join_all(std::mem::take(&mut self.tasks));
        let ended = tokio::time::timeout(limit, tasks)
            .await
            .context("gateway did not drain in time")?;
        let mut open = 0;
        for drained in ended {
            if let sluice::Drained::TimedOut { open: left } = drained? {
                open += left;
            }
        }
        Ok(if open == 0 {
            sluice::Drained::Complete
        } else {
            sluice::Drained::TimedOut { open }
        })
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.admin_shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Builds manifest text. Listeners always bind `127.0.0.1:0`; `extra` is
/// inserted verbatim as TOML key/value lines of the section.
///
/// ```
/// # let origin: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
/// let text = sluice_tests::Manifest::new()
///     .listener("web", "")
///     .upstream("app", &[origin], "timeout = \"1s\"")
///     .route("all", "{}", "app", "")
///     .build();
/// assert!(text.contains("[upstream.app]"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    text: String,
}

impl Manifest {
    /// An empty manifest.
    pub fn new() -> Self {
        Manifest::default()
    }

    /// One plain listener "web", one upstream "app" with `origin` as its only
    /// endpoint, one catch-all route "all"; `listener_extra` and
    /// `upstream_extra` go into their sections.
    pub fn simple(origin: SocketAddr, listener_extra: &str, upstream_extra: &str) -> Self {
        Manifest::new()
            .listener("web", listener_extra)
            .upstream("app", &[origin], upstream_extra)
            .route("all", "{}", "app", "")
    }

    /// Adds a `[[listener]]` called `name` on `127.0.0.1:0`.
    pub fn listener(mut self, name: &str, extra: &str) -> Self {
        let _ = write!(
            self.text,
            "\n[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{extra}\n"
        );
        self
    }

    /// Adds `[upstream.NAME]` with these endpoints.
    pub fn upstream(mut self, name: &str, endpoints: &[SocketAddr], extra: &str) -> Self {
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let _ = write!(
            self.text,
            "\n[upstream.{name}]\nendpoints = [{}]\n{extra}\n",
            list.join(", ")
        );
        self
    }

    /// Adds a `[[route]]`; `matcher` is an inline TOML table like
    /// `{ path_prefix = "/api/" }`.
    pub fn route(mut self, name: &str, matcher: &str, upstream: &str, extra: &str) -> Self {
        let _ = write!(
            self.text,
            "\n[[route]]\nname = \"{name}\"\nmatch = {matcher}\nupstream = \"{upstream}\"\n{extra}\n"
        );
        self
    }

    /// Appends raw TOML.
    pub fn raw(mut self, toml: &str) -> Self {
        self.text.push('\n');
        self.text.push_str(toml);
        self.text.push('\n');
        self
    }

    /// The manifest text.
    pub fn build(&self) -> String {
        self.text.clone()
    }

    /// Starts a [`TestGateway`] serving this manifest.
    pub async fn start(&self) -> anyhow::Result<TestGateway> {
        TestGateway::start(&self.text).await
    }
}
