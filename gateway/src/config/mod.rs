//! The manifest: parsing, validation, and the immutable runtime tables the
//! data plane reads.
//!
//! [`Config::load`] reads a TOML file, [`Config::parse`] a string. Both return
//! every problem found, each naming the file, the key path and what is wrong,
//! so `sluice check` can print them all at once.

pub(crate) mod file;
mod resilience;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::plugin::chain::Chain;
use crate::plugin::geo::GeoDatabase;
use crate::plugin::shared_state::{RedisSettings, RedisStore, SyncMode};
use crate::plugin::{OnError, Plugin, PluginError, PluginSpec, Source};
use crate::route::{HostMatch, PathMatch, Route, RouteMatch, RouteTable};
use crate::telemetry::metrics::{ChangeCounts, ConnectionCounts};
use crate::upstream::{EndpointSet, HealthCheck, HealthChecks, Passive, RetryPolicy};
use file::{
    AdminFile, DurationText, EndpointFile, GeoFile, InstancesFile, ListenerFile, ManifestFile,
    OnErrorFile, PluginFile, PluginStateFile, RouteFile, StateBackendFile, StateFile,
    StateModeFile, UpstreamFile,
};

/// Default bound on draining in-flight requests at shutdown.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client has to send a request head (also the HTTP/1.1 keep-alive idle limit).
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest wait for the next bytes of a request body (nginx's `client_body_timeout`).
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a client connection may sit with no request in flight.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on the request head (request line and headers).
const DEFAULT_MAX_HEADER_BYTES: u64 = 64 << 10;
/// Smallest head limit the HTTP/1 parser supports.
const MIN_MAX_HEADER_BYTES: u64 = 8 << 10;
/// Default cap on the number of request headers.
const DEFAULT_MAX_HEADERS: usize = 100;
/// Default cap on concurrent connections per listener.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default idle upstream connections kept per endpoint.
const DEFAULT_KEEPALIVE: usize = 32;
/// Connections per endpoint per worker, busy or idle (HAProxy's server
/// `maxconn`): enough for any backend's concurrency, few enough that
/// 10,000 client connections cannot take as many upstream descriptors.
const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 1024;
/// Default time an idle upstream connection is kept.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default upstream TCP connect timeout.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default wait for an upstream's response head.
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default wall-clock budget of one plugin call.
const DEFAULT_PLUGIN_DEADLINE: Duration = Duration::from_millis(10);
/// Default linear-memory cap of one plugin instance.
const DEFAULT_PLUGIN_MEMORY: u64 = 64 << 20;
/// Default number of idle instances kept per plugin.
const DEFAULT_PLUGIN_POOL: usize = 32;
/// `[state] timeout`: most time one Redis operation may take.
const DEFAULT_STATE_TIMEOUT: Duration = Duration::from_millis(50);
/// `[state] connect_timeout`.
const DEFAULT_STATE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// `[state] sync_interval` in batched mode.
const DEFAULT_STATE_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// `[state] prefix`.
const DEFAULT_STATE_PREFIX: &str = "sluice:";
/// Names a balancer may use for the builtin round-robin without a `[plugin.*]` table.
const ROUND_ROBIN_ALIASES: [&str; 2] = ["rr", "round-robin"];

/// A validated manifest: what the gateway serves.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) source: PathBuf,
    pub(crate) drain_timeout: Duration,
    /// The admin API listener, when `[admin]` is present.
    pub(crate) admin: Option<AdminConfig>,
    pub(crate) listeners: Vec<ListenerConfig>,
    pub(crate) upstreams: Vec<UpstreamConfig>,
    pub(crate) routes: RouteTable,
    /// Every loaded plugin by name, including builtins used directly as balancers.
    pub(crate) plugins: BTreeMap<String, Arc<Plugin>>,
    /// The `[state]` Redis store, when `backend = "redis"`.
    pub(crate) state: Option<Arc<RedisStore>>,
    /// Reloads and live swaps counted, for `/metrics`; kept across both.
    pub(crate) changes: Arc<ChangeCounts>,
}

/// One listener, ready to bind.
#[derive(Clone)]
pub(crate) struct ListenerConfig {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) redirect_https: Option<u16>,
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    /// Longest wait for the client's next request body bytes: a stall past
    /// it answers 408 (or cuts a response already under way) and closes.
    pub(crate) body_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) max_body_bytes: Option<u64>,
    /// Its connections, for `/metrics`; kept across reloads.
    pub(crate) connections: Arc<ConnectionCounts>,
}

impl fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// One upstream: its endpoints and how to talk to them.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamConfig {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<EndpointConfig>,
    pub(crate) keepalive: usize,
    pub(crate) keepalive_timeout: Duration,
    /// Most connections a worker keeps open to each endpoint, busy or idle.
    pub(crate) max_connections: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) timeout: Duration,
    /// The plugin that picks endpoints; `None` for the core's weighted round-robin.
    pub(crate) balancer: Option<Arc<Plugin>>,
    /// Passive health: `passive = { max_fails, fail_timeout }` or nginx's defaults.
    pub(crate) passive: Passive,
    /// The endpoints' live state, shared by every worker serving this config
    /// (and kept by a reload that leaves the upstream unchanged).
    pub(crate) endpoint_set: Arc<EndpointSet>,
    /// Active health checks, when `health` is configured.
    pub(crate) health: Option<Arc<HealthCheck>>,
    /// Retries, when `retries` is configured (with its budget, shared by every worker).
    pub(crate) retries: Option<Arc<RetryPolicy>>,
}

impl UpstreamConfig {
    /// Whether `other` defines the same upstream, as the manifest's values
    /// come out of validation (so `"2s"` and `"2000ms"` are equal): name;
    /// endpoints in order, with weights, labels and backup flags; balancer,
    /// by name (a plugin's own changes are a plugin change, as a swap);
    /// passive and active health; retries; pool size and idle time; connect
    /// and response timeouts.
    pub(crate) fn same_definition(&self, other: &UpstreamConfig) -> bool {
        // Every field is named, so a new one cannot be left out by mistake.
        let UpstreamConfig {
            name,
            endpoints,
            keepalive,
            keepalive_timeout,
            max_connections,
            connect_timeout,
            timeout,
            balancer,
            passive,
            endpoint_set: _,
            health,
            retries,
        } = self;
        let same_retries = match (retries, &other.retries) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_settings(b),
            _ => false,
        };
        *name == other.name
            && *endpoints == other.endpoints
            && *keepalive == other.keepalive
            && *keepalive_timeout == other.keepalive_timeout
            && *max_connections == other.max_connections
            && *connect_timeout == other.connect_timeout
            && *timeout == other.timeout
            && balancer.as_ref().map(|b| &b.name) == other.balancer.as_ref().map(|b| &b.name)
            && *passive == other.passive
            && health.as_deref() == other.health.as_deref()
            && same_retries
    }
}

/// `[admin]`: the admin API listener.
#[derive(Clone)]
pub(crate) struct AdminConfig {
    pub(crate) addr: SocketAddr,
    /// The bearer token every request must carry; `None` only on loopback.
    pub(crate) token: Option<Arc<str>>,
    /// `audit_log`: where admin changes are appended; `None` keeps them in memory only.
    pub(crate) audit_log: Option<AuditLogFile>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("audit_log", &self.audit_log.as_ref().map(|a| &a.path))
            .finish()
    }
}

/// `[admin] audit_log`, opened for appending when the manifest is loaded,
/// so a path that cannot be written is a manifest error, not a lost entry.
#[derive(Debug, Clone)]
pub(crate) struct AuditLogFile {
    /// The path, resolved against the manifest's directory.
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<std::fs::File>,
}

/// One endpoint of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointConfig {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) backup: bool,
}

/// Everything wrong with a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    file: PathBuf,
    problems: Vec<Problem>,
}

/// One problem: the key path it is at and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, like `route[2].upstream`; empty for the whole file.
    pub key: String,
    /// What is wrong, naming the offending value.
    pub message: String,
}

impl ConfigError {
    /// The problems found, in manifest order.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// One problem, at `key` of `file`.
    pub(crate) fn single(file: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if problem.key.is_empty() {
                write!(f, "{}: {}", self.file.display(), problem.message)?;
            } else {
                write!(
                    f,
                    "{}: {}: {}",
                    self.file.display(),
                    problem.key,
                    problem.message
                )?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single(path, "", format!("cannot read manifest: {e}")))?;
        Config::parse(&text, path)
    }

    /// Validates manifest text; `origin` names it in errors and anchors relative paths.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let manifest = deserialize(text, origin)?;
        let base = origin.parent().unwrap_or(Path::new("."));
        Validator {
            base,
            problems: Vec::new(),
            plugins: BTreeMap::new(),
            geo: None,
            state: None,
        }
        .validate(manifest, origin)
    }

    /// Where this config was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Every distinct endpoint address of every upstream.
    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        let mut seen = HashSet::new();
        self.upstreams
            .iter()
            .flat_map(|u| u.endpoints.iter().map(|e| e.addr))
            .filter(|addr| seen.insert(*addr))
            .collect()
    }

    /// What the host knows about plugin `name`: source, version and statistics.
    pub fn plugin_report(&self, name: &str) -> Option<crate::plugin::PluginReport> {
        self.plugins.get(name).map(|p| p.report())
    }

    /// Takes over the metrics of the routes and listeners that `old` (the
    /// config this one replaces) shares with it by name, so a reload does not
    /// reset their counters.
    pub(crate) fn adopt_metrics(&mut self, old: &Config) {
        self.changes = old.changes.clone();
        self.routes.adopt_metrics(&old.routes);
        for listener in &mut self.listeners {
            if let Some(kept) = old.listeners.iter().find(|l| l.name == listener.name) {
                listener.connections = kept.connections.clone();
            }
        }
    }

    /// This config with `plugin` in place of the loaded plugin of the same
    /// name: in the plugin list, every route's chain and every upstream's
    /// balancer. Everything else (endpoints and their health, limits) is
    /// shared with `self`.
    pub(crate) fn with_plugin(&self, plugin: Arc<Plugin>) -> Config {
        let mut config = self.clone();
        config.routes = self.routes.replacing(&plugin);
        for upstream in &mut config.upstreams {
            if upstream
                .balancer
                .as_ref()
                .is_some_and(|b| b.name == plugin.name)
            {
                upstream.balancer = Some(plugin.clone());
            }
        }
        config.plugins.insert(plugin.name.to_string(), plugin);
        config
    }

    /// The first upstream whose balancer is plugin `name`.
    pub(crate) fn upstream_balanced_by(&self, name: &str) -> Option<&str> {
        self.upstreams
            .iter()
            .find(|u| u.balancer.as_ref().is_some_and(|b| &*b.name == name))
            .map(|u| u.name.as_str())
    }

    /// Whether a route's `policies` list plugin `name`.
    pub(crate) fn plugin_in_chain(&self, name: &str) -> bool {
        self.routes.uses_plugin(name)
    }

    /// The loaded plugin called `name`.
    pub(crate) fn plugin(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(name)
    }

    /// The names of every loaded plugin.
    pub fn plugin_names(&self) -> Vec<String> {
        self.plugins.keys().cloned().collect()
    }

    /// Starts the active health checks of every upstream that has them, on
    /// the current tokio runtime. They run until the handle is dropped: keep
    /// it as long as this config serves, and drop it when a reload replaces it.
    pub fn start_health_checks(&self) -> HealthChecks {
        self.keep_health_checks(HealthChecks::default())
    }

    /// The health checks of this config, made from `running`'s: the checks
    /// of endpoint sets this config kept (see [`Config::keep_unchanged_upstreams`])
    /// run on, new and changed upstreams' checks start on the current tokio
    /// runtime, and the rest (removed and changed upstreams') stop as
    /// `running` drops.
    pub(crate) fn keep_health_checks(&self, mut running: HealthChecks) -> HealthChecks {
        let mut checks = HealthChecks::default();
        for upstream in &self.upstreams {
            if let Some(check) = &upstream.health {
                checks.keep_or_start(&mut running, &upstream.endpoint_set, check);
            }
        }
        checks
    }

    /// Gives each upstream that `running` defines the same way (see
    /// [`UpstreamConfig::same_definition`]) the running one's live state: its
    /// endpoint set (health, ejections, in-flight and latency figures,
    /// breaker states, selection counts), its retry budget and its health
    /// check settings, so that workers keep its connection pools and
    /// [`Config::keep_health_checks`] its running checks. New and changed
    /// upstreams keep the fresh state they were validated with. Returns the
    /// names of the upstreams kept.
    pub(crate) fn keep_unchanged_upstreams(&mut self, running: &Config) -> Vec<String> {
        let mut kept = Vec::new();
        for upstream in &mut self.upstreams {
            let Some(old) = running.upstreams.iter().find(|u| u.name == upstream.name) else {
                continue;
            };
            if upstream.same_definition(old) {
                upstream.endpoint_set = old.endpoint_set.clone();
                upstream.health = old.health.clone();
                upstream.retries = old.retries.clone();
                kept.push(upstream.name.clone());
            }
        }
        kept
    }

    /// Listener names with the addresses they are configured to bind.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr, bool)> {
        self.listeners
            .iter()
            .map(|l| (l.name.clone(), l.addr, l.tls.is_some()))
            .collect()
    }
}

/// TOML → file types, with the key path and line of the first error.
fn deserialize(text: &str, origin: &Path) -> Result<ManifestFile, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| {
        ConfigError::single(
            origin,
            "",
            format!("{}{}", e.message(), line_suffix(text, e.span())),
        )
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = display_path(e.path());
        let inner = e.into_inner();
        ConfigError::single(
            origin,
            key,
            format!("{}{}", inner.message(), line_suffix(text, inner.span())),
        )
    })
}

/// `a.b[0].c` from serde_path_to_error's path (which writes `a.b[0].c` already,
/// except for the root `.`).
fn display_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text == "." { String::new() } else { text }
}

fn line_suffix(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) if span.start <= text.len() => {
            let before = &text[..span.start];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        }
        _ => String::new(),
    }
}

/// Collects problems while turning file types into runtime tables.
struct Validator<'a> {
    base: &'a Path,
    problems: Vec<Problem>,
    /// Plugins loaded so far, by name.
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// The `[geo] database`, opened before any plugin loads.
    geo: Option<Arc<GeoDatabase>>,
    /// The `[state]` Redis store, opened before any plugin loads.
    state: Option<Arc<RedisStore>>,
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn validate(mut self, manifest: ManifestFile, origin: &Path) -> Result<Config, ConfigError> {
        let admin = manifest.admin.as_ref().and_then(|a| self.admin(a));
        if let Some(geo) = &manifest.geo {
            self.geo(geo);
        }
        if let Some(state) = &manifest.state {
            self.state(state);
        }
        for (name, plugin) in &manifest.plugin {
            self.plugin(name, plugin);
        }
        if manifest.listener.is_empty() {
            self.problem("listener", "at least one [[listener]] is required");
        }
        if manifest.route.is_empty() {
            self.problem("route", "at least one [[route]] is required");
        }

        let listeners = self.listeners(&manifest.listener);
        let upstream_names: Vec<&str> = manifest.upstream.keys().map(String::as_str).collect();
        let upstreams: Vec<UpstreamConfig> = manifest
            .upstream
            .iter()
            .map(|(name, upstream)| self.upstream(name, upstream))
            .collect();
        let routes = self.routes(&manifest.route, &upstream_names);
        for (dead, winner) in routes.shadowed() {
            let index = manifest
                .route
                .iter()
                .position(|r| r.name.as_str() == dead)
                .unwrap_or(0);
            self.problem(
                format!("route[{index}].match"),
                format!("route \"{dead}\" can never match: route \"{winner}\" matches every request it would and takes precedence"),
            );
        }

        let drain_timeout = manifest
            .server
            .and_then(|s| s.drain_timeout)
            .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0);

        if self.problems.is_empty() {
            Ok(Config {
                source: origin.to_path_buf(),
                drain_timeout,
                admin,
                listeners,
                upstreams,
                routes,
                plugins: self.plugins,
                state: self.state,
                changes: Arc::default(),
            })
        } else {
            Err(ConfigError {
                file: origin.to_path_buf(),
                problems: self.problems,
            })
        }
    }

    fn listeners(&mut self, files: &[ListenerFile]) -> Vec<ListenerConfig> {
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut out = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let key = format!("listener[{i}]");
            if !names.insert(file.name.as_str()) {
                self.problem(
                    format!("{key}.name"),
                    format!("duplicate listener name \"{}\"", file.name),
                );
            }
            check_name(self, &format!("{key}.name"), &file.name);
            let addr = match file.listen.parse::<SocketAddr>() {
                Ok(addr) => {
                    if addr.port() != 0 && !addrs.insert(addr) {
                        self.problem(
                            format!("{key}.listen"),
                            format!("address {addr} is used by another listener"),
                        );
                    }
                    addr
                }
                Err(_) => {
                    self.problem(
                        format!("{key}.listen"),
                        format!("invalid address \"{}\": expected IP:port, like \"0.0.0.0:8080\" or \"[::]:8443\"", file.listen),
                    );
                    continue;
                }
            };
            let tls = match &file.tls {
                None => None,
                Some(certs) => match crate::proxy::tls::server_config(certs, self.base) {
                    Ok(config) => Some(Arc::new(config)),
                    Err((sub, message)) => {
                        self.problem(format!("{key}.tls{sub}"), message);
                        None
                    }
                },
            };
            if file.redirect_https.is_some() && file.tls.is_some() {
                self.problem(
                    format!("{key}.redirect_https"),
                    "only a plain (non-TLS) listener can redirect to https",
                );
            }
            let max_header_bytes = file
                .max_header_bytes
                .map_or(DEFAULT_MAX_HEADER_BYTES, |b| b.0);
            if max_header_bytes < MIN_MAX_HEADER_BYTES {
                self.problem(
                    format!("{key}.max_header_bytes"),
                    format!("{max_header_bytes} bytes is below the minimum of 8KiB"),
                );
            }
            if file.max_connections == Some(0) {
                self.problem(format!("{key}.max_connections"), "must be at least 1");
            }
            if file.max_headers == Some(0) {
                self.problem(format!("{key}.max_headers"), "must be at least 1");
            }
            for (field, value) in [
                ("header_read_timeout", file.header_read_timeout),
                ("body_read_timeout", file.body_read_timeout),
                ("idle_timeout", file.idle_timeout),
            ] {
                if value.is_some_and(|d| d.0.is_zero()) {
                    self.problem(format!("{key}.{field}"), "must be greater than zero");
                }
            }
            out.push(ListenerConfig {
                name: file.name.clone(),
                addr,
                tls,
                redirect_https: file.redirect_https,
                max_connections: file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                header_read_timeout: file
                    .header_read_timeout
                    .map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0),
                body_read_timeout: file
                    .body_read_timeout
                    .map_or(DEFAULT_BODY_READ_TIMEOUT, |d| d.0),
                idle_timeout: file.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
                max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
                max_headers: file.max_headers.unwrap_or(DEFAULT_MAX_HEADERS),
                max_body_bytes: file.max_body_bytes.map(|b| b.0),
                connections: Arc::default(),
            });
        }
        out
    }

    fn upstream(&mut self, name: &str, file: &UpstreamFile) -> UpstreamConfig {
        let key = format!("upstream.{name}");
        check_name(self, &key, name);
        if file.endpoints.is_empty() {
            self.problem(
                format!("{key}.endpoints"),
                "at least one endpoint is required",
            );
        }
        let mut endpoints = Vec::new();
        for (i, endpoint) in file.endpoints.iter().enumerate() {
            let (addr_text, weight, labels, backup) = match endpoint {
                EndpointFile::Addr(addr) => (addr, None, BTreeMap::new(), false),
                EndpointFile::Detailed(d) => (&d.addr, d.weight, d.labels.clone(), d.backup),
            };
            let Ok(addr) = addr_text.parse::<SocketAddr>() else {
                self.problem(
                    format!("{key}.endpoints[{i}]"),
                    format!("invalid address \"{addr_text}\": expected IP:port, like \"127.0.0.1:9101\" (DNS names are not supported yet)"),
                );
                continue;
            };
            if weight == Some(0) {
                self.problem(format!("{key}.endpoints[{i}].weight"), "must be at least 1");
            }
            if endpoints.iter().any(|e: &EndpointConfig| e.addr == addr) {
                self.problem(
                    format!("{key}.endpoints[{i}]"),
                    format!("endpoint {addr} is listed twice"),
                );
            }
            endpoints.push(EndpointConfig {
                addr,
                weight: weight.unwrap_or(1),
                labels,
                backup,
            });
        }
        if !endpoints.is_empty() && endpoints.iter().all(|e| e.backup) {
            self.problem(
                format!("{key}.endpoints"),
                "every endpoint is a backup; at least one must be primary",
            );
        }
        let balancer = file
            .balancer
            .as_deref()
            .and_then(|name| self.balancer(&format!("{key}.balancer"), name));
        let defaults = Passive::default();
        let passive = file.passive.as_ref().map_or(defaults, |p| Passive {
            max_fails: p.max_fails.unwrap_or(defaults.max_fails),
            fail_timeout: p.fail_timeout.map_or(defaults.fail_timeout, |d| d.0),
        });
        if passive.fail_timeout.is_zero() {
            self.problem(
                format!("{key}.passive.fail_timeout"),
                "must be greater than zero",
            );
        }
        let health = file.health.as_ref().and_then(|h| self.health(&key, h));
        let retries = file.retries.as_ref().and_then(|r| self.retries(&key, r));
        for (field, value) in [
            ("connect_timeout", file.connect_timeout),
            ("timeout", file.timeout),
        ] {
            if value.is_some_and(|d| d.0.is_zero()) {
                self.problem(format!("{key}.{field}"), "must be greater than zero");
            }
        }
        if file.max_connections == Some(0) {
            self.problem(format!("{key}.max_connections"), "must be at least 1");
        }
        let endpoint_set = Arc::new(EndpointSet::new(name, &endpoints, passive));
        UpstreamConfig {
            name: name.to_string(),
            endpoint_set,
            endpoints,
            passive,
            keepalive: file.keepalive.unwrap_or(DEFAULT_KEEPALIVE),
            keepalive_timeout: file
                .keepalive_timeout
                .map_or(DEFAULT_KEEPALIVE_TIMEOUT, |d| d.0),
            max_connections: file
                .max_connections
                .unwrap_or(DEFAULT_UPSTREAM_MAX_CONNECTIONS),
            connect_timeout: file
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            timeout: file.timeout.map_or(DEFAULT_UPSTREAM_TIMEOUT, |d| d.0),
            balancer,
            health,
            retries,
        }
    }

    /// Checks `[admin]`: a parseable address, a token unless on loopback,
    /// and an `audit_log` that can be appended to.
    fn admin(&mut self, file: &AdminFile) -> Option<AdminConfig> {
        let audit_log = file
            .audit_log
            .as_deref()
            .and_then(|path| self.audit_log(path));
        let Ok(addr) = file.listen.parse::<SocketAddr>() else {
            self.problem(
                "admin.listen",
                format!(
                    "invalid address \"{}\": expected IP:port, like \"127.0.0.1:9901\"",
                    file.listen
                ),
            );
            return None;
        };
        let token = match file.token.as_deref() {
            None => None,
            Some(text) => {
                let token = match text.strip_prefix("env:") {
                    Some(var) => match std::env::var(var) {
                        Ok(value) => value,
                        Err(_) => {
                            self.problem(
                                "admin.token",
                                format!("environment variable {var} is not set"),
                            );
                            return None;
                        }
                    },
                    None => text.to_string(),
                };
                if token.len() < 16 {
                    self.problem("admin.token", "must be at least 16 characters");
                    return None;
                }
                Some(Arc::from(token))
            }
        };
        if token.is_none() && !addr.ip().is_loopback() {
            self.problem(
                "admin.token",
                format!("required when the admin API listens on {addr}, which is not loopback"),
            );
            return None;
        }
        Some(AdminConfig {
            addr,
            token,
            audit_log,
        })
    }

    /// Opens `[admin] audit_log` (relative to the manifest's directory) for
    /// appending, creating it when missing.
    fn audit_log(&mut self, path: &str) -> Option<AuditLogFile> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.base.join(path);
        match std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&path)
        {
            Ok(file) => Some(AuditLogFile {
                path,
                file: Arc::new(file),
            }),
            Err(error) => {
                self.problem(
                    "admin.audit_log",
                    format!("cannot open \"{}\" for appending: {error}", path.display()),
                );
                None
            }
        }
    }

    /// Opens `[geo] database` (relative to the manifest's directory).
    fn geo(&mut self, file: &GeoFile) {
        let path = self.base.join(&file.database);
        match GeoDatabase::open(&path) {
            Ok(database) => self.geo = Some(Arc::new(database)),
            Err(message) => self.problem("geo.database", message),
        }
    }

    /// Checks `[state]` and, for `backend = "redis"`, opens its store (which
    /// connects in the background: a gateway starts while Redis is down).
    fn state(&mut self, file: &StateFile) {
        let duration = |this: &mut Self, key: &str, value: Option<DurationText>, default| {
            let value = value.map_or(default, |d| d.0);
            if value.is_zero() {
                this.problem(format!("state.{key}"), "must be greater than zero");
            }
            value
        };
        let timeout = duration(self, "timeout", file.timeout, DEFAULT_STATE_TIMEOUT);
        let connect_timeout = duration(
            self,
            "connect_timeout",
            file.connect_timeout,
            DEFAULT_STATE_CONNECT_TIMEOUT,
        );
        let sync_interval = duration(
            self,
            "sync_interval",
            file.sync_interval,
            DEFAULT_STATE_SYNC_INTERVAL,
        );
        let mode = match file.mode {
            None | Some(StateModeFile::Strict) => {
                if file.sync_interval.is_some() {
                    self.problem("state.sync_interval", "applies only to mode = \"batched\"");
                }
                SyncMode::Strict
            }
            Some(StateModeFile::Batched) => SyncMode::Batched {
                interval: sync_interval,
            },
        };
        let redis = matches!(file.backend, Some(StateBackendFile::Redis));
        if !redis {
            if let Some(key) = [
                ("url", file.url.is_some()),
                ("prefix", file.prefix.is_some()),
                ("timeout", file.timeout.is_some()),
                ("connect_timeout", file.connect_timeout.is_some()),
                ("mode", file.mode.is_some()),
            ]
            .iter()
            .find_map(|(key, set)| set.then_some(key))
            {
                self.problem(
                    format!("state.{key}"),
                    "applies only to backend = \"redis\" (the memory backend keeps state in process)",
                );
            }
            return;
        }
        let Some(url) = &file.url else {
            self.problem(
                "state.url",
                "is required with backend = \"redis\", like \"redis://127.0.0.1:6379/0\"",
            );
            return;
        };
        if let Err(error) = redis::parse_redis_url(url)
            .ok_or("not a redis:// or rediss:// URL".to_string())
            .and_then(|_| {
                redis::Client::open(url.as_str())
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        {
            self.problem("state.url", format!("invalid Redis URL \"{url}\": {error}"));
            return;
        }
        let settings = RedisSettings {
            url: url.clone(),
            prefix: file
                .prefix
                .clone()
                .unwrap_or_else(|| DEFAULT_STATE_PREFIX.to_string()),
            timeout,
            connect_timeout,
            mode,
        };
        if !self.problems.is_empty() {
            return;
        }
        match RedisStore::open(settings) {
            Ok(store) => self.state = Some(store),
            Err(error) => self.problem("state.url", error),
        }
    }

    /// Loads `[plugin.NAME]`, recording a problem at the key that caused a failure.
    fn plugin(&mut self, name: &str, file: &PluginFile) {
        let key = format!("plugin.{name}");
        check_name(self, &key, name);
        let source = match file.source.strip_prefix("builtin:") {
            Some(builtin) => Source::Builtin(builtin.to_string()),
            None => Source::File(self.base.join(&file.source)),
        };
        let config = match &file.config {
            None => "{}".to_string(),
            Some(table) => match serde_json::to_string(table) {
                Ok(json) => json,
                Err(e) => {
                    self.problem(
                        format!("{key}.config"),
                        format!("cannot be expressed as JSON: {e}"),
                    );
                    return;
                }
            },
        };
        let deadline = file.deadline.map_or(DEFAULT_PLUGIN_DEADLINE, |d| d.0);
        if deadline.is_zero() {
            self.problem(format!("{key}.deadline"), "must be greater than zero");
        }
        let memory = file.memory.map_or(DEFAULT_PLUGIN_MEMORY, |m| m.0);
        if memory < (1 << 16) {
            self.problem(
                format!("{key}.memory"),
                "must be at least 64KiB (one Wasm page)",
            );
        }
        if file.pool_size == Some(0) {
            self.problem(format!("{key}.pool_size"), "must be at least 1");
        }
        if file.max_host_calls == Some(0) {
            self.problem(format!("{key}.max_host_calls"), "must be at least 1");
        }
        let spec = PluginSpec {
            name: name.to_string(),
            source,
            config,
            on_error: match file.on_error {
                Some(OnErrorFile::Open) => OnError::Open,
                None | Some(OnErrorFile::Closed) => OnError::Closed,
            },
            deadline,
            memory_bytes: usize::try_from(memory).unwrap_or(usize::MAX),
            max_host_calls: file
                .max_host_calls
                .unwrap_or(crate::plugin::DEFAULT_MAX_HOST_CALLS),
            reuse_instances: !matches!(file.instances, Some(InstancesFile::PerRequest)),
            pool_size: file.pool_size.unwrap_or(DEFAULT_PLUGIN_POOL),
            geo: self.geo.clone(),
            state: match file.state {
                None | Some(PluginStateFile::Shared) => self.state.clone(),
                Some(PluginStateFile::Local) => None,
            },
        };
        self.load_plugin(&key, spec);
    }

    fn load_plugin(&mut self, key: &str, spec: PluginSpec) -> Option<Arc<Plugin>> {
        let name = spec.name.clone();
        match Plugin::load(spec) {
            Ok(plugin) => {
                self.plugins.insert(name, plugin.clone());
                Some(plugin)
            }
            Err(error) => {
                let at = match &error {
                    PluginError::Init(_) => format!("{key}.config"),
                    _ => format!("{key}.source"),
                };
                self.problem(at, format!("plugin \"{name}\": {error}"));
                None
            }
        }
    }

    /// The plugin an upstream's `balancer` names: a `[plugin.*]`, or a builtin
    /// balancer used directly (`"round-robin"`, alias `"rr"`).
    fn balancer(&mut self, key: &str, name: &str) -> Option<Arc<Plugin>> {
        let builtin = if ROUND_ROBIN_ALIASES.contains(&name) {
            "round-robin"
        } else {
            name
        };
        let plugin = match self.plugins.get(name).or_else(|| self.plugins.get(builtin)) {
            Some(plugin) => plugin.clone(),
            None if crate::plugin::builtin::names().contains(&builtin) => {
                let spec = PluginSpec {
                    name: builtin.to_string(),
                    source: Source::Builtin(builtin.to_string()),
                    config: "{}".to_string(),
                    // A builtin balancer named directly fails open: should a
                    // call ever fail, the core's own round-robin picks.
                    on_error: OnError::Open,
                    deadline: DEFAULT_PLUGIN_DEADLINE,
                    memory_bytes: usize::try_from(DEFAULT_PLUGIN_MEMORY).unwrap_or(usize::MAX),
                    max_host_calls: crate::plugin::DEFAULT_MAX_HOST_CALLS,
                    reuse_instances: true,
                    pool_size: DEFAULT_PLUGIN_POOL,
                    geo: self.geo.clone(),
                    // A balancer's counters need no sharing between gateways.
                    state: None,
                };
                self.load_plugin(key, spec)?
            }
            None => {
                let mut known: Vec<&str> = self.plugins.keys().map(String::as_str).collect();
                known.extend(crate::plugin::builtin::names());
                let hint = did_you_mean(name, &known);
                self.problem(
                    key,
                    format!(
                        "balancer \"{name}\" is neither a [plugin.*] nor a builtin balancer{hint}"
                    ),
                );
                return None;
            }
        };
        if !plugin.is_balancer() {
            self.problem(
                key,
                format!(
                    "plugin \"{}\" does not export `balance`, so it cannot pick endpoints",
                    plugin.name
                ),
            );
            return None;
        }
        Some(plugin)
    }

    fn routes(&mut self, files: &[RouteFile], upstream_names: &[&str]) -> RouteTable {
        let mut names = HashSet::new();
        let mut routes = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let key = format!("route[{i}]");
            if !names.insert(file.name.as_str()) {
                self.problem(
                    format!("{key}.name"),
                    format!("duplicate route name \"{}\"", file.name),
                );
            }
            check_name(self, &format!("{key}.name"), &file.name);
            let upstream = upstream_names.iter().position(|n| *n == file.upstream);
            if upstream.is_none() {
                let hint = did_you_mean(&file.upstream, upstream_names);
                self.problem(
                    format!("{key}.upstream"),
                    format!(
                        "route \"{}\": upstream \"{}\" is not defined{hint}",
                        file.name, file.upstream
                    ),
                );
            }
            let chain = self.chain(&key, file.policies.as_deref().unwrap_or_default());
            let Some(matcher) = self.route_match(&key, file) else {
                continue;
            };
            routes.push(Route {
                name: Arc::from(file.name.as_str()),
                matcher,
                upstream: upstream.unwrap_or(0),
                max_body_bytes: file.max_body_bytes.map(|b| b.0),
                chain,
                order: i,
                metrics: Default::default(),
            });
        }
        RouteTable::new(routes)
    }

    /// A route's `policies`: each a loaded `[plugin.*]` with a request, response or outcome hook.
    fn chain(&mut self, key: &str, names: &[String]) -> Chain {
        let mut policies = Vec::with_capacity(names.len());
        for (j, name) in names.iter().enumerate() {
            let at = format!("{key}.policies[{j}]");
            let Some(plugin) = self.plugins.get(name).cloned() else {
                let known: Vec<&str> = self.plugins.keys().map(String::as_str).collect();
                let hint = did_you_mean(name, &known);
                self.problem(
                    at,
                    format!("plugin \"{name}\" is not defined (or failed to load){hint}"),
                );
                continue;
            };
            if !plugin.has_policy_hooks() {
                self.problem(
                    at,
                    format!(
                        "plugin \"{name}\" is a balancer only; use it as an upstream's `balancer`"
                    ),
                );
                continue;
            }
            if policies.iter().any(|p: &Arc<Plugin>| p.name == plugin.name) {
                self.problem(at, format!("plugin \"{name}\" is listed twice"));
                continue;
            }
            policies.push(plugin);
        }
        Chain::new(policies)
    }

    fn route_match(&mut self, key: &str, file: &RouteFile) -> Option<RouteMatch> {
        let m = &file.matcher;
        let before = self.problems.len();
        let host = match m.host.as_deref() {
            None | Some("*") => HostMatch::Any,
            Some(host) => {
                let host = host.to_ascii_lowercase();
                if let Some(suffix) = host.strip_prefix("*.") {
                    if !valid_hostname(suffix) {
                        self.problem(
                            format!("{key}.match.host"),
                            format!("invalid host pattern \"{host}\""),
                        );
                    }
                    HostMatch::Wildcard(format!(".{suffix}"))
                } else {
                    if !valid_hostname(&host) {
                        self.problem(
                            format!("{key}.match.host"),
                            format!("invalid host \"{host}\": expected a name like \"api.example.com\" or \"*.example.com\" (no port)"),
                        );
                    }
                    HostMatch::Exact(host)
                }
            }
        };
        let path = match (&m.path, &m.path_prefix) {
            (Some(_), Some(_)) => {
                self.problem(
                    format!("{key}.match"),
                    "set either `path` or `path_prefix`, not both",
                );
                PathMatch::Any
            }
            (Some(path), None) => {
                if !path.starts_with('/') {
                    self.problem(
                        format!("{key}.match.path"),
                        format!("path \"{path}\" must start with '/'"),
                    );
                }
                PathMatch::Exact(path.clone())
            }
            (None, Some(prefix)) => {
                if !prefix.starts_with('/') {
                    self.problem(
                        format!("{key}.match.path_prefix"),
                        format!("prefix \"{prefix}\" must start with '/'"),
                    );
                }
                if prefix == "/" {
                    PathMatch::Any
                } else {
                    PathMatch::Prefix(prefix.clone())
                }
            }
            (None, None) => PathMatch::Any,
        };
        let mut methods = Vec::new();
        if let Some(list) = &m.methods {
            if list.is_empty() {
                self.problem(
                    format!("{key}.match.methods"),
                    "an empty list can never match; remove `methods` to match any method",
                );
            }
            for (j, text) in list.iter().enumerate() {
                match Method::from_bytes(text.to_ascii_uppercase().as_bytes()) {
                    Ok(method) if !methods.contains(&method) => methods.push(method),
                    Ok(_) => self.problem(
                        format!("{key}.match.methods[{j}]"),
                        format!("method \"{text}\" is listed twice"),
                    ),
                    Err(_) => self.problem(
                        format!("{key}.match.methods[{j}]"),
                        format!("invalid method \"{text}\""),
                    ),
                }
            }
        }
        let mut headers = Vec::new();
        for (name, value) in &m.headers {
            let parsed = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            );
            match parsed {
                (Ok(name), Ok(value)) => headers.push((name, value)),
                (Err(_), _) => self.problem(
                    format!("{key}.match.headers.{name}"),
                    format!("invalid header name \"{name}\""),
                ),
                (_, Err(_)) => self.problem(
                    format!("{key}.match.headers.{name}"),
                    format!("invalid header value \"{value}\""),
                ),
            }
        }
        (self.problems.len() == before).then_some(RouteMatch {
            host,
            path,
            methods,
            headers,
        })
    }
}

fn check_name(validator: &mut Validator<'_>, key: &str, name: &str) {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        validator.problem(
            key,
            format!("invalid name \"{name}\": use letters, digits, '-' and '_'"),
        );
    }
}

fn valid_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// ` (did you mean "NAME"?)` when a defined name is close to `wanted`, else empty.
fn did_you_mean(wanted: &str, names: &[&str]) -> String {
    closest(wanted, names)
        .map(|n| format!(" (did you mean \"{n}\"?)"))
        .unwrap_or_default()
}

/// The defined name closest to a misspelt one, when it is close enough to be a typo.
fn closest<'a>(wanted: &str, names: &[&'a str]) -> Option<&'a str> {
    names
        .iter()
        .map(|name| (edit_distance(wanted, name), *name))
        .filter(|(distance, name)| *distance <= 2.max(name.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems with manifest `text`, as `key: message`.
    pub(super) fn errors(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new("t.toml")) {
            Ok(_) => vec![],
            Err(e) => e
                .problems()
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect(),
        }
    }

    const GOOD: &str = r#"
        [[listener]]
        name = "web"
        listen = "127.0.0.1:0"
        [upstream.api]
        endpoints = ["127.0.0.1:9101", { addr = "127.0.0.1:9102", weight = 2 }]
        [[route]]
        name = "api"
        match = { path_prefix = "/v1/" }
        upstream = "api"
    "#;

    #[test]
    fn upstream_max_connections_defaults_to_1024_and_must_be_positive() {
        let config = Config::parse(GOOD, Path::new("t.toml")).expect("valid");
        assert_eq!(config.upstreams[0].max_connections, 1024);
        let with = |line: &str| {
            errors(&GOOD.replace("[upstream.api]", &format!("[upstream.api]\n{line}")))
        };
        assert_eq!(
            with("max_connections = 0"),
            ["upstream.api.max_connections: must be at least 1"]
        );
        assert_eq!(with("max_connections = 8"), Vec::<String>::new());
    }

    #[test]
    fn the_state_backend_is_checked_key_by_key() {
        let with = |state: &str| errors(&format!("[state]\n{state}\n{GOOD}"));
        assert_eq!(with("backend = \"memory\""), Vec::<String>::new());
        let missing = with("backend = \"redis\"");
        assert!(
            missing.len() == 1 && missing[0].starts_with("state.url: is required"),
            "{missing:?}"
        );
        let bad = with("backend = \"redis\"\nurl = \"http://x\"");
        assert!(
            bad.len() == 1 && bad[0].starts_with("state.url: invalid Redis URL \"http://x\""),
            "{bad:?}"
        );
        let mode = with("backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"eventual\"");
        assert!(
            mode[0].contains("mode") && mode[0].contains("eventual"),
            "{mode:?}"
        );
        let backend = with("backend = \"etcd\"");
        assert!(backend[0].contains("etcd"), "{backend:?}");
        let stray = with("url = \"redis://127.0.0.1:1\"");
        assert!(
            stray.len() == 1
                && stray[0].starts_with("state.url: applies only to backend = \"redis\""),
            "{stray:?}"
        );
        let interval =
            with("backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nsync_interval = \"5ms\"");
        assert!(
            interval.len() == 1
                && interval[0]
                    .starts_with("state.sync_interval: applies only to mode = \"batched\""),
            "{interval:?}"
        );
        let zero = with("backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\ntimeout = \"0s\"");
        assert!(
            zero.len() == 1 && zero[0].starts_with("state.timeout: must be greater than zero"),
            "{zero:?}"
        );
        // A valid [state] loads without Redis running: it connects in the background.
        let config = Config::parse(
            &format!("[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/0\"\nmode = \"batched\"\n{GOOD}"),
            Path::new("sluice.toml"),
        )
        .expect("valid [state]");
        assert!(config.state.is_some());
    }

    #[test]
    fn the_geo_database_is_opened_or_named() {
        let missing = format!("[geo]\ndatabase = \"no/such.mmdb\"\n{GOOD}");
        let problems = errors(&missing);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("geo.database: cannot read"),
            "{problems:?}"
        );
        let bundled =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/geo/geo-whois-asn-country.mmdb");
        let good = format!(
            "[geo]\ndatabase = {:?}\n{GOOD}",
            bundled.display().to_string()
        );
        assert_eq!(errors(&good), Vec::<String>::new());
        let typo = format!("[geo]\ndatabse = \"x\"\n{GOOD}");
        assert!(errors(&typo)[0].contains("databse"), "{:?}", errors(&typo));
    }

    #[test]
    fn a_good_manifest_parses() {
        let config = Config::parse(GOOD, Path::new("t.toml")).expect("valid");
        assert_eq!(config.upstreams[0].endpoints[1].weight, 2);
        assert_eq!(&*config.routes.routes()[0].name, "api");
    }

    #[test]
    fn passive_health_and_admin_are_checked() {
        let passive = GOOD.replace(
            "weight = 2 }]",
            "weight = 2 }]\n        passive = { max_fails = 3, fail_timeout = \"0s\" }",
        );
        let errs = errors(&passive);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("upstream.api.passive.fail_timeout"),
            "{errs:?}"
        );

        let open = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9901\"\n");
        let errs = errors(&open);
        assert!(
            errs[0].starts_with("admin.token") && errs[0].contains("not loopback"),
            "{errs:?}"
        );
        let short = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"abc\"\n");
        assert!(errors(&short)[0].contains("at least 16"));
        let unset = format!(
            "{GOOD}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SLUICE_TEST_TOKEN_THAT_IS_NOT_SET\"\n"
        );
        assert!(errors(&unset)[0].contains("SLUICE_TEST_TOKEN_THAT_IS_NOT_SET is not set"));
        let local = format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        let config = Config::parse(&local, Path::new("t.toml")).expect("loopback needs no token");
        assert!(config.admin.is_some_and(|a| a.token.is_none()));
    }

    #[test]
    fn unknown_keys_name_their_path_and_line() {
        let errs = errors(&GOOD.replace("weight = 2", "wieght = 2"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("upstream.api.endpoints"), "{errs:?}");
        let errs =
            errors(&GOOD.replace("upstream = \"api\"", "upstream = \"api\"\ntimeout = \"1s\""));
        assert!(
            errs[0].starts_with("route[0].timeout: unknown field `timeout`"),
            "{errs:?}"
        );
        assert!(errs[0].contains("line "), "{errs:?}");
    }

    #[test]
    fn undefined_upstream_suggests_the_close_name() {
        let errs = errors(&GOOD.replace("upstream = \"api\"", "upstream = \"apx\""));
        assert_eq!(
            errs,
            vec![
                "route[0].upstream: route \"api\": upstream \"apx\" is not defined (did you mean \"api\"?)"
            ]
        );
    }

    #[test]
    fn listener_timeouts_are_named_and_default_like_nginx() {
        let config = Config::parse(GOOD, Path::new("t.toml")).expect("valid");
        assert_eq!(
            config.listeners[0].body_read_timeout,
            Duration::from_secs(60)
        );
        let with = |line: &str| {
            errors(&GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:0\"\n{line}"),
            ))
        };
        assert_eq!(
            with("body_read_timeout = \"0s\""),
            ["listener[0].body_read_timeout: must be greater than zero"]
        );
        let unitless = with("body_read_timeout = \"5\"");
        assert!(
            unitless.len() == 1
                && unitless[0].starts_with("listener[0].body_read_timeout: invalid duration \"5\""),
            "{unitless:?}"
        );
        let set = Config::parse(
            &GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nbody_read_timeout = \"250ms\"",
            ),
            Path::new("t.toml"),
        )
        .expect("valid");
        assert_eq!(
            set.listeners[0].body_read_timeout,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn bad_durations_and_addresses_are_named() {
        let errs =
            errors(&GOOD.replace("[upstream.api]", "[upstream.api]\nconnect_timeout = \"5\""));
        assert!(
            errs[0].starts_with("upstream.api.connect_timeout: invalid duration \"5\""),
            "{errs:?}"
        );
        let errs = errors(&GOOD.replace("127.0.0.1:0", "localhost"));
        assert!(
            errs[0].starts_with("listener[0].listen: invalid address \"localhost\""),
            "{errs:?}"
        );
    }
}
