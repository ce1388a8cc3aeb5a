//! Entry points for the criterion benchmarks (`tests/benches/`,
//! `gateway/benches/`): load a plugin, call its hooks, run a chain, look a
//! request up in a route table — the same code the request path runs.
//! Not a stable API.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::EndpointConfig;
use crate::plugin::chain::{Chain, Verdict};
use crate::plugin::host::RequestState;
use crate::plugin::{OnError, Plugin, PluginSpec, Source, engine};
use crate::upstream::{EndpointSet, Passive};

/// A loaded plugin.
#[derive(Debug, Clone)]
pub struct Policy(Arc<Plugin>);

/// Loads `source` (`builtin:NAME` or a path) as plugin `name` with `config`
/// (JSON), on the gateway's engine or on a separate engine using wasmtime's
/// pooling allocator.
pub fn load(name: &str, source: &str, config: &str, pooling: bool) -> Result<Policy, String> {
    load_spec(spec(name, source, config), pooling)
}

/// Loads `source` as [`load`] does, with `geo` (a MaxMind-format file) as
/// the manifest's `[geo] database`.
pub fn load_with_geo(
    name: &str,
    source: &str,
    config: &str,
    geo: &std::path::Path,
) -> Result<Policy, String> {
    let database = crate::plugin::geo::GeoDatabase::open(geo)?;
    let spec = PluginSpec {
        geo: Some(Arc::new(database)),
        ..spec(name, source, config)
    };
    load_spec(spec, false)
}

/// The spec the benchmarks load plugins with: closed, a 1 s deadline, pooled instances.
fn spec(name: &str, source: &str, config: &str) -> PluginSpec {
    PluginSpec {
        name: name.to_string(),
        source: match source.strip_prefix("builtin:") {
            Some(builtin) => Source::Builtin(builtin.to_string()),
            None => Source::File(source.into()),
        },
        config: config.to_string(),
        on_error: OnError::Closed,
        deadline: std::time::Duration::from_secs(1),
        memory_bytes: 64 << 20,
        max_host_calls: crate::plugin::DEFAULT_MAX_HOST_CALLS,
        reuse_instances: true,
        pool_size: 8,
        geo: None,
        state: None,
    }
}

fn load_spec(spec: PluginSpec, pooling: bool) -> Result<Policy, String> {
    if !pooling {
        return Plugin::load(spec).map(Policy).map_err(|e| e.to_string());
    }
    let runtime: &'static engine::Runtime = Box::leak(Box::new(
        engine::Runtime::new(true).map_err(|e| format!("{e:#}"))?,
    ));
    let bytes = spec.source.read().map_err(|e| e.to_string())?;
    Plugin::from_bytes(spec, &bytes, runtime)
        .map(Policy)
        .map_err(|e| e.to_string())
}

/// A request head as the chain sees it, bound for upstream `app` (two
/// endpoints).
pub fn request(req: http::Request<()>) -> Request {
    // Two healthy endpoints, so policies that ask about the upstream's
    // health (geo) take the path a gateway with live backends takes.
    let upstream = upstream(2).0;
    Request(RequestState {
        parts: req.into_parts().0,
        client_ip: IpAddr::from([127, 0, 0, 1]),
        https: false,
        route: Arc::from("bench"),
        directory: Arc::from([upstream.clone()]),
        upstream,
        endpoint: None,
        delay: std::time::Duration::ZERO,
    })
}

/// A request lent to hooks.
#[derive(Debug)]
pub struct Request(RequestState);

impl Policy {
    /// One `on-request` call; `true` when the policy let the request
    /// through (continued, or steered it).
    pub async fn on_request(&self, req: Request) -> (Request, bool) {
        let (back, result) = self.0.on_request(req.0).await;
        let proceed = matches!(
            result,
            Ok(crate::plugin::Action::Continue | crate::plugin::Action::Steer(_))
        );
        (Request(back), proceed)
    }

    /// One `on-outcome` call for a 200 from endpoint 0 of `upstream` after
    /// `latency_us`; `true` when the call succeeded.
    pub async fn on_outcome(&self, upstream: &Upstream, latency_us: u64) -> bool {
        let endpoint = upstream.0.endpoints.first();
        let outcome = crate::plugin::Outcome {
            route: "bench".to_string(),
            upstream: upstream.0.name.to_string(),
            endpoint: endpoint.map(|e| e.address.to_string()),
            endpoint_id: endpoint.map(|e| e.id),
            status: Some(200),
            latency_us,
            error: None,
        };
        let directory: crate::upstream::Directory = Arc::from([upstream.0.clone()]);
        self.0
            .on_outcome(&upstream.0, &directory, &outcome)
            .await
            .is_ok()
    }

    /// One `pick` over the upstream's candidates; the position picked.
    pub async fn pick(&self, req: Request, upstream: &Upstream) -> (Request, Option<usize>) {
        let candidates = upstream.0.candidates();
        let (back, result) = self.0.pick(req.0, &upstream.0, &candidates).await;
        (Request(back), result.ok().flatten())
    }

    /// Makes a new instance and runs `init`, then drops it.
    pub async fn instantiate(&self) -> Result<(), String> {
        self.0.instantiate_for_bench().await
    }
}

/// An upstream of `n` endpoints, for balancer benchmarks.
#[derive(Debug)]
pub struct Upstream(Arc<EndpointSet>);

impl Upstream {
    /// One pick by the core's native smooth weighted round-robin.
    pub fn core_pick(&self) -> bool {
        self.0.pick_weighted().is_some()
    }
}

/// `n` endpoints on 127.0.0.1 with weights 1, 2, 3, 1, 2, 3, ... and no load.
pub fn upstream(n: u16) -> Upstream {
    let endpoints: Vec<EndpointConfig> = (0..n)
        .map(|i| EndpointConfig {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 10_000 + i)),
            weight: u32::from(i % 3 + 1),
            labels: Default::default(),
            backup: false,
        })
        .collect();
    Upstream(Arc::new(EndpointSet::new(
        "app",
        &endpoints,
        Passive::default(),
    )))
}

/// Policies run as a route's chain.
#[derive(Debug, Clone)]
pub struct PolicyChain(Chain);

/// A chain of `policies`, in order.
pub fn chain(policies: &[&Policy]) -> PolicyChain {
    PolicyChain(Chain::new(policies.iter().map(|p| p.0.clone()).collect()))
}

impl PolicyChain {
    /// The request phase; `true` when the request would be forwarded.
    pub async fn on_request(&self, req: Request) -> (Request, bool) {
        let (back, verdict) = self.0.on_request(req.0, |_| None).await;
        (Request(back), matches!(verdict, Verdict::Forward))
    }
}

/// A route table built from a manifest the way the gateway builds it
/// (validation, then most specific first), for the route-matching benchmark.
#[derive(Debug)]
pub struct Routes(crate::config::Config);

/// Parses and validates `manifest` (TOML, as a file would hold it) and keeps
/// its route table.
pub fn routes(manifest: &str) -> Result<Routes, String> {
    crate::config::Config::parse(manifest, std::path::Path::new("bench.toml"))
        .map(Routes)
        .map_err(|e| e.to_string())
}

impl Routes {
    /// The name of the route that serves `req`, found as the proxy finds it:
    /// the host from the URI or `Host` (lower-cased, without port), then the
    /// first route in lookup order whose host, path, methods and headers all
    /// match.
    pub fn find(&self, req: &http::Request<()>) -> Option<&str> {
        let host = crate::route::request_host(req.uri(), req.headers());
        let facts = crate::route::RequestFacts {
            host: &host,
            path: req.uri().path(),
            method: req.method(),
            headers: req.headers(),
        };
        self.0.routes.find(&facts).map(|route| &*route.name)
    }

    /// How many routes the table holds.
    pub fn count(&self) -> usize {
        self.0.routes.routes().len()
    }
}
