//! Upstreams: the shared endpoint set (health, load, candidates), the
//! balancer plugin when one is configured, and each worker's pooled
//! keep-alive client that forwards to the endpoints.

mod checks;
mod endpoints;
mod h1;
mod pool;
mod retry;

use std::sync::Arc;
use std::time::Duration;

pub use checks::HealthChecks;
pub(crate) use checks::{HealthCheck, Probe};
pub(crate) use endpoints::{
    CandidateSet, CircuitState, CircuitStatus, Endpoint, EndpointSet, EndpointStatus, Passive,
    QueuedCount, Rotated,
};
pub(crate) use h1::Upgraded;
pub(crate) use pool::{Pool, QueuePlace, SendError, UpstreamBody};
pub(crate) use retry::{Backoff, RetryBudget, RetryOn, RetryPolicy, TryResult};

use crate::config::UpstreamConfig;
use crate::plugin::Plugin;

/// Every upstream's endpoints in one config, in manifest order: what
/// `health.healthy` looks names up in.
pub(crate) type Directory = Arc<[Arc<EndpointSet>]>;

/// A live upstream as one worker sees it. A clone shares the connection pool.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) name: Arc<str>,
    /// Endpoints, health and load, shared with every other worker.
    pub(crate) endpoints: Arc<EndpointSet>,
    /// The plugin that picks endpoints, when the manifest names one.
    pub(crate) balancer: Option<Arc<Plugin>>,
    /// This worker's keep-alive connections to the endpoints.
    pub(crate) pool: Pool,
    /// How long to wait for the response head, retries included.
    pub(crate) timeout: Duration,
    /// Retries, when configured.
    pub(crate) retries: Option<Arc<RetryPolicy>>,
}

impl Upstream {
    /// This worker's view of one upstream: the shared endpoints and a pool of its own.
    pub(crate) fn new(config: &UpstreamConfig) -> Self {
        let pool = Pool::new(
            config.keepalive,
            config.keepalive_timeout,
            config.max_connections,
            config.connect_timeout,
        );
        Upstream {
            name: config.endpoint_set.name.clone(),
            endpoints: config.endpoint_set.clone(),
            balancer: config.balancer.clone(),
            pool,
            timeout: config.timeout,
            retries: config.retries.clone(),
        }
    }

    /// This worker's upstream serving `config`, a definition equal to the
    /// one it was made for (a reload kept its endpoint set): the connection
    /// pool and its idle connections are kept; the balancer is `config`'s,
    /// as plugins are replaced by a reload.
    pub(crate) fn kept(&self, config: &UpstreamConfig) -> Self {
        Upstream {
            balancer: config.balancer.clone(),
            retries: config.retries.clone(),
            timeout: config.timeout,
            ..self.clone()
        }
    }
}
