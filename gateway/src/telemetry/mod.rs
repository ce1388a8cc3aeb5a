//! Logging and metrics: the JSON access log (one line per request) and
//! diagnostics, both through `tracing` and written off the runtime threads,
//! and the Prometheus [`metrics`].
//!
//! `RUST_LOG` filters as usual; the access log's target is `sluice::access`
//! (`RUST_LOG=info,sluice::access=off` turns it off).

pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Uri, Version};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// The `tracing` target of access log lines.
pub const ACCESS_TARGET: &str = "sluice::access";

/// Installs the global JSON subscriber. Keep the guard alive until exit: it
/// flushes buffered lines when dropped.
pub fn init() -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(64 * 1024)
        .lossy(false)
        .finish(std::io::stdout());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests starting several gateways in one process) keeps the first.
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
    guard
}

/// Whether access lines would be written; checked before building a record.
pub(crate) fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// What one request did, written as one JSON line when its response ends.
#[derive(Debug)]
pub(crate) struct AccessRecord {
    pub(crate) started: Instant,
    pub(crate) listener: Arc<str>,
    pub(crate) client: SocketAddr,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) host: String,
    pub(crate) version: Version,
    pub(crate) request_id: String,
    /// The W3C trace the request belongs to.
    pub(crate) trace_id: u128,
    /// The gateway's span in it: the parent id sent upstream.
    pub(crate) span_id: u64,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) status: u16,
    /// Time to the upstream's response head, when there was one.
    pub(crate) upstream_ms: Option<f64>,
    /// Why the gateway answered itself (`no-route`, `connect-refused`, …).
    pub(crate) error: Option<&'static str>,
    /// The policy that answered the request, steered it, or failed it.
    pub(crate) policy: Option<Arc<str>>,
    /// Tries made upstream, when it was retried (more than one).
    pub(crate) attempts: Option<u32>,
    /// How long a policy held the request before forwarding it, when it did.
    pub(crate) delayed_ms: Option<f64>,
    pub(crate) bytes_sent: u64,
    pub(crate) body_complete: bool,
    pub(crate) upstream_body_error: bool,
}

impl AccessRecord {
    /// Emits the line.
    pub(crate) fn write(self) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: ACCESS_TARGET,
            listener = &*self.listener,
            client = %self.client.ip(),
            method = self.method.as_str(),
            host = self.host,
            path = self.uri.path(),
            query = self.uri.query(),
            version = ?self.version,
            request_id = self.request_id,
            trace_id = %format_args!("{:032x}", self.trace_id),
            span_id = %format_args!("{:016x}", self.span_id),
            route = self.route.as_deref(),
            upstream = self.upstream.as_deref(),
            endpoint = self.endpoint.map(tracing::field::display),
            status = self.status,
            error = self.error,
            policy = self.policy.as_deref(),
            upstream_ms = self.upstream_ms,
            attempts = self.attempts,
            delayed_ms = self.delayed_ms,
            duration_ms,
            bytes_sent = self.bytes_sent,
            completed = self.body_complete && !self.upstream_body_error,
            "access"
        );
    }
}
