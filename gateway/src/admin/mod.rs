//! The admin API: JSON over HTTP/1.1 on `[admin] listen`, behind a bearer
//! token.
//!
//! This build serves the read-only views operators need to see load
//! balancing at work: `GET /upstreams` (per-endpoint weight, health,
//! in-flight, latency, selections). Plugin upload, rollback, reload, audit,
//! metrics and the health endpoints are not built yet; their paths answer
//! 404 with a JSON error saying so.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::upstream::{CircuitStatus, EndpointStatus};

/// Time an admin client has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin listener, bound and ready to serve.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
    state: Arc<AdminState>,
}

/// Publishes a reloaded config to the admin API.
#[derive(Debug, Clone)]
pub struct AdminHandle(Arc<AdminState>);

#[derive(Debug)]
struct AdminState {
    config: ArcSwap<Config>,
    token: Option<Arc<str>>,
}

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
#[error("admin API: cannot listen on {addr}: {source}")]
pub struct AdminBindError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl Admin {
    /// Binds `[admin] listen` when the manifest has an `[admin]` table.
    pub async fn bind(config: &Config) -> Option<Result<Admin, AdminBindError>> {
        let admin = config.admin.clone()?;
        Some(match TcpListener::bind(admin.addr).await {
            Ok(listener) => Ok(Admin {
                listener,
                state: Arc::new(AdminState {
                    config: ArcSwap::from_pointee(config.clone()),
                    token: admin.token,
                }),
            }),
            Err(source) => Err(AdminBindError {
                addr: admin.addr,
                source,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// A handle to publish reloaded configs.
    pub fn handle(&self) -> AdminHandle {
        AdminHandle(self.state.clone())
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = {
            let stop = stop.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let accepted = tokio::select! {
                        () = stop.cancelled() => break,
                        accepted = self.listener.accept() => accepted,
                    };
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::debug!(%error, "admin accept failed");
                            continue;
                        }
                    };
                    let state = self.state.clone();
                    let stop = stop.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(&state, peer, &req)) }
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(connection);
                        tokio::select! {
                            _ = connection.as_mut() => {}
                            () = stop.cancelled() => {
                                connection.as_mut().graceful_shutdown();
                                let _ = connection.await;
                            }
                        }
                    });
                }
            }
        };
        let accept = tokio::spawn(accept);
        shutdown.await;
        stop.cancel();
        let _ = accept.await;
        connections.close();
        connections.wait().await;
    }
}

impl AdminHandle {
    /// Shows `config` from now on.
    pub fn publish(&self, config: &Config) {
        self.0.config.store(Arc::new(config.clone()));
    }
}

/// One admin request. Bodies are never read: every route here is a GET.
fn handle(state: &AdminState, peer: SocketAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(token) = &state.token
        && !authorized(req, token)
    {
        tracing::warn!(%peer, path = req.uri().path(), "admin request refused: bad or missing token");
        let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let config = state.config.load();
    match req.uri().path() {
        "/upstreams" if req.method() == Method::GET => json(StatusCode::OK, &upstreams(&config)),
        "/upstreams" => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        path => error(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint {path}; this build serves GET /upstreams"),
        ),
    }
}

/// Whether `req` carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(presented) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    bool::from(presented.ct_eq(token.as_bytes()))
}

/// One upstream in `GET /upstreams`.
#[derive(Debug, Serialize)]
struct UpstreamStatus {
    name: String,
    /// The balancer plugin, or `weighted` for the core's own smooth weighted round-robin.
    balancer: String,
    /// Breaker states plugins reported for the whole upstream, by plugin.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    circuits: std::collections::BTreeMap<String, CircuitStatus>,
    endpoints: Vec<EndpointStatus>,
}

fn upstreams(config: &Config) -> Vec<UpstreamStatus> {
    config
        .upstreams
        .iter()
        .map(|u| UpstreamStatus {
            name: u.name.clone(),
            balancer: u
                .balancer
                .as_ref()
                .map_or_else(|| "weighted (core)".to_string(), |b| b.name.to_string()),
            circuits: u.endpoint_set.circuits(None),
            endpoints: u.endpoint_set.status(u.health.is_some()),
        })
        .collect()
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}
