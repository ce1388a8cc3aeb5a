//! Upstreams: endpoints with their live load, the core's weighted
//! round-robin, the balancer plugin when one is configured, and the pooled
//! keep-alive client that forwards to them.
//!
//! Backup endpoints are parsed and kept but not picked: choosing them needs
//! health state, which this build does not track yet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{EndpointConfig, UpstreamConfig};
use crate::plugin::host::{EndpointMeta, UpstreamMeta};
use crate::plugin::{Candidate, Plugin};
use crate::proxy::body::RequestBody;

/// Upper bound on one rotation cycle; weights are scaled down past it.
const MAX_ROTATION: u64 = 10_000;

/// Weight of a new latency sample in the moving average (1/8, as Finagle's default decay is close to).
const EWMA_SHIFT: u32 = 3;

/// One endpoint, with its address pre-rendered for request URIs and its live load.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Index in the upstream's `endpoints` list (the WIT's endpoint id).
    pub(crate) id: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) authority: Authority,
    weight: u32,
    backup: bool,
    /// Requests sent and still waiting for their response head.
    in_flight: AtomicU32,
    /// Moving average of response-head latency, microseconds; 0 before the first sample.
    latency_ewma_us: AtomicU32,
}

impl Endpoint {
    /// Counts a request as in flight until the returned guard drops.
    pub(crate) fn begin(&self) -> InFlightRequest<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightRequest(self)
    }

    /// Folds a response-head latency into the moving average. Concurrent
    /// updates may lose a sample; the average stays an average.
    pub(crate) fn observe_latency(&self, latency: Duration) {
        let sample = u32::try_from(latency.as_micros())
            .unwrap_or(u32::MAX)
            .max(1);
        let old = self.latency_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            let old = i64::from(old);
            let next = old + ((i64::from(sample) - old) >> EWMA_SHIFT);
            u32::try_from(next.max(1)).unwrap_or(u32::MAX)
        };
        self.latency_ewma_us.store(new, Ordering::Relaxed);
    }
}

/// A request counted in its endpoint's in-flight gauge.
#[derive(Debug)]
pub(crate) struct InFlightRequest<'a>(&'a Endpoint);

impl Drop for InFlightRequest<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A live upstream: endpoints, rotation and connection pool.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) endpoints: Vec<Endpoint>,
    /// Names, addresses and labels, lent to a balancer plugin.
    pub(crate) meta: Arc<UpstreamMeta>,
    /// The plugin that picks endpoints, when the manifest names one.
    pub(crate) balancer: Option<Arc<Plugin>>,
    /// One smooth-weighted round-robin cycle over the primary endpoints.
    rotation: Vec<usize>,
    next: AtomicUsize,
    pub(crate) client: Client<HttpConnector, RequestBody>,
    /// How long to wait for the response head.
    pub(crate) timeout: Duration,
}

impl Upstream {
    /// Builds the endpoints, rotation and pool for one upstream.
    pub(crate) fn new(config: &UpstreamConfig) -> Self {
        let endpoints = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| Endpoint {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                addr: e.addr,
                // A socket address always renders as a valid authority.
                authority: Authority::try_from(e.addr.to_string().as_str())
                    .unwrap_or_else(|_| Authority::from_static("invalid")),
                weight: e.weight,
                backup: e.backup,
                in_flight: AtomicU32::new(0),
                latency_ewma_us: AtomicU32::new(0),
            })
            .collect();
        let name: Arc<str> = Arc::from(config.name.as_str());
        let meta = Arc::new(UpstreamMeta {
            name: name.clone(),
            endpoints: config
                .endpoints
                .iter()
                .map(|e| EndpointMeta {
                    address: e.addr.to_string(),
                    labels: e.labels.clone(),
                })
                .collect(),
        });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(config.keepalive)
            .pool_idle_timeout(config.keepalive_timeout)
            .set_host(false)
            .build(connector);
        Upstream {
            name,
            endpoints,
            meta,
            balancer: config.balancer.clone(),
            rotation: smooth_weighted_rotation(&config.endpoints),
            next: AtomicUsize::new(0),
            client,
            timeout: config.timeout,
        }
    }

    /// The next endpoint in weighted rotation.
    pub(crate) fn pick(&self) -> Option<&Endpoint> {
        if self.rotation.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.rotation.len();
        self.endpoints.get(self.rotation[turn])
    }

    /// The endpoints a balancer may choose from, with their live load.
    /// Without health state every primary is available, so backups never are.
    pub(crate) fn candidates(&self) -> Vec<Candidate> {
        self.endpoints
            .iter()
            .filter(|e| !e.backup)
            .map(|e| Candidate {
                id: e.id,
                weight: e.weight,
                in_flight: e.in_flight.load(Ordering::Relaxed),
                latency_ewma_us: e.latency_ewma_us.load(Ordering::Relaxed),
                backup: e.backup,
            })
            .collect()
    }
}

/// One full cycle of nginx's smooth weighted round-robin over the primary
/// endpoints: each endpoint appears `weight` times, spread out rather than in
/// bursts. Precomputed so a pick is one atomic increment.
fn smooth_weighted_rotation(endpoints: &[EndpointConfig]) -> Vec<usize> {
    let primaries: Vec<(usize, u64)> = endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.backup)
        .map(|(i, e)| (i, u64::from(e.weight.max(1))))
        .collect();
    let total: u64 = primaries.iter().map(|(_, w)| w).sum();
    let scale = total.div_ceil(MAX_ROTATION).max(1);
    let weights: Vec<(usize, i64)> = primaries
        .iter()
        .map(|(i, w)| (*i, i64::try_from((w / scale).max(1)).unwrap_or(1)))
        .collect();
    let total: i64 = weights.iter().map(|(_, w)| w).sum();
    let mut current = vec![0i64; weights.len()];
    let mut rotation = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (slot, (_, weight)) in weights.iter().enumerate() {
            current[slot] += weight;
            if current[slot] > current[best] {
                best = slot;
            }
        }
        current[best] -= total;
        rotation.push(weights[best].0);
    }
    rotation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16, weight: u32, backup: bool) -> EndpointConfig {
        EndpointConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            labels: Default::default(),
            backup,
        }
    }

    #[test]
    fn rotation_is_smooth_and_skips_backups() {
        let rotation = smooth_weighted_rotation(&[
            endpoint(1, 5, false),
            endpoint(2, 1, false),
            endpoint(3, 1, false),
            endpoint(4, 9, true),
        ]);
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(rotation, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_alternate() {
        let rotation = smooth_weighted_rotation(&[endpoint(1, 1, false), endpoint(2, 1, false)]);
        assert_eq!(rotation, vec![0, 1]);
    }
}
