//! The gateway under test, served in-process from manifest text, and a small
//! builder for manifests.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running gateway. Dropping it signals shutdown and stops serving.
#[derive(Debug)]
pub struct TestGateway {
    /// The running config, its health checks and the changes made to it.
    control: sluice::admin::Control,
    addrs: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    admin_shutdown: Option<oneshot::Sender<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<sluice::Drained>>,
}

impl TestGateway {
    /// Parses `manifest`, binds its listeners (use `listen = "127.0.0.1:0"`)
    /// and starts serving. Errors name every manifest problem.
    pub async fn start(manifest: &str) -> anyhow::Result<TestGateway> {
        let config = sluice::Config::parse(manifest, Path::new("test.toml")).map_err(|e| {
            anyhow::anyhow!("manifest rejected:\n{e}\n--- manifest ---\n{manifest}")
        })?;
        let gateway = sluice::Gateway::bind(&config)
            .await
            .context("binding the gateway's listeners")?;
        let addrs = gateway.local_addrs();
        let checks = config.start_health_checks();
        let control = sluice::admin::Control::new(config, vec![gateway.reloader()], checks);
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
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(async move {
            let _ = rx.await;
        }));
        Ok(TestGateway {
            control,
            addrs,
            admin,
            admin_shutdown,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The bound address of the listener called `listener`.
    ///
    /// # Panics
    /// When the manifest has no such listener: a mistake in the test itself.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| {
                panic!(
                    "no listener named {listener:?}; the gateway has {:?}",
                    self.addrs
                )
            })
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

    /// Signals shutdown and waits (bounded by `limit`) for the drain to end.
    pub async fn shutdown(mut self, limit: std::time::Duration) -> anyhow::Result<sluice::Drained> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().context("gateway already stopped")?;
        let drained = tokio::time::timeout(limit, task)
            .await
            .context("gateway did not drain in time")??;
        Ok(drained)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.admin_shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
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
