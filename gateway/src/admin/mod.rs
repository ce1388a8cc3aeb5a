//! The admin API: JSON over HTTP/1.1 on `[admin] listen`, behind a bearer
//! token.
//!
//! Served: `GET /upstreams` (endpoint health, load, breakers), `GET /plugins`,
//! `PUT /plugins/{name}` (a new component), `PUT /plugins/{name}/config`,
//! `POST /plugins/{name}/rollback` and `POST /reload`. Every change goes
//! through [`Control`]: validated whole, then swapped; a refused change
//! answers 422 with the reason and leaves the running config serving.
//! The audit log, `/metrics` and `/health/*` are not built yet; their paths
//! answer 404 with a JSON error saying so.

mod control;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use control::{Control, KEPT_VERSIONS, ReloadError};
use control::{PluginChange, SwapError};

use crate::config::Config;
use crate::upstream::{CircuitStatus, EndpointStatus};

/// Time an admin client has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest component `PUT /plugins/{name}` accepts.
pub const MAX_UPLOAD_BYTES: usize = 64 << 20;

/// Largest body of any other admin request.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Time an admin client has to send its request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The admin listener, bound and ready to serve.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
    state: Arc<AdminState>,
}

#[derive(Debug)]
struct AdminState {
    control: Control,
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
    /// Binds `[admin] listen` when the running config has an `[admin]`
    /// table; changes made through it go to `control`.
    pub async fn bind(control: &Control) -> Option<Result<Admin, AdminBindError>> {
        let admin = control.config().admin.clone()?;
        Some(match TcpListener::bind(admin.addr).await {
            Ok(listener) => Ok(Admin {
                listener,
                state: Arc::new(AdminState {
                    control: control.clone(),
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
                            async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
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

/// One admin request. A request whose body is left unread (refused before
/// reading it) closes the connection after the answer, so the client stops
/// sending instead of waiting on a peer that will never read.
async fn handle(
    state: &AdminState,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let has_body = !http_body::Body::is_end_stream(req.body());
    let mut response = route(state, peer, req).await;
    if has_body && !response.status().is_success() {
        response
            .headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response
}

/// Authorises and dispatches one admin request.
async fn route(
    state: &AdminState,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if let Some(token) = &state.token
        && !authorized(&req, token)
    {
        tracing::warn!(%peer, path = req.uri().path(), "admin request refused: bad or missing token");
        let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let control = &state.control;
    match (method, segments.as_slice()) {
        (Method::GET, ["upstreams"]) => json(StatusCode::OK, &upstreams(&control.config())),
        (Method::GET, ["plugins"]) => json(StatusCode::OK, &plugins(control).await),
        (Method::PUT, ["plugins", name]) => {
            let name = (*name).to_string();
            let config = match query_config(req.uri().query()) {
                Ok(config) => config,
                Err(message) => return error(StatusCode::BAD_REQUEST, &message),
            };
            let bytes = match read_body(req, MAX_UPLOAD_BYTES).await {
                Ok(bytes) => bytes,
                Err(response) => return response,
            };
            let change = PluginChange::Component {
                bytes: bytes.to_vec(),
                config,
            };
            changed(peer, "upload", &name, control.swap(&name, change).await)
        }
        (Method::PUT, ["plugins", name, "config"]) => {
            let name = (*name).to_string();
            let bytes = match read_body(req, MAX_BODY_BYTES).await {
                Ok(bytes) => bytes,
                Err(response) => return response,
            };
            let config = match config_json(&bytes) {
                Ok(config) => config,
                Err(message) => return error(StatusCode::BAD_REQUEST, &message),
            };
            let change = PluginChange::Config(config);
            changed(peer, "config", &name, control.swap(&name, change).await)
        }
        (Method::POST, ["plugins", name, "rollback"]) => {
            let name = (*name).to_string();
            changed(peer, "rollback", &name, control.rollback(&name).await)
        }
        (Method::POST, ["reload"]) => {
            let path = control.config().source().to_path_buf();
            match control.reload(&path).await {
                Ok(()) => {
                    tracing::info!(%peer, "admin: reloaded the manifest");
                    json(StatusCode::OK, &serde_json::json!({ "reloaded": path }))
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "admin: reload refused");
                    error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string())
                }
            }
        }
        (
            _,
            ["upstreams" | "plugins" | "reload"]
            | ["plugins", _]
            | ["plugins", _, "config" | "rollback"],
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        _ => error(
            StatusCode::NOT_FOUND,
            &format!(
                "no admin endpoint {path}; this build serves GET /upstreams, GET /plugins, PUT /plugins/NAME, PUT /plugins/NAME/config, POST /plugins/NAME/rollback and POST /reload"
            ),
        ),
    }
}

/// The answer to a plugin change, logged.
fn changed(
    peer: SocketAddr,
    what: &str,
    name: &str,
    result: Result<control::Swapped, SwapError>,
) -> Response<Full<Bytes>> {
    match result {
        Ok(swapped) => {
            tracing::info!(%peer, plugin = name, change = what, version = %swapped.version, previous = %swapped.previous, "admin: plugin swapped");
            json(StatusCode::OK, &swapped)
        }
        Err(e) => {
            tracing::warn!(%peer, plugin = name, change = what, error = %e, "admin: plugin change refused");
            let status = match e {
                SwapError::Unknown(_) => StatusCode::NOT_FOUND,
                SwapError::NoPrevious(_) => StatusCode::CONFLICT,
                SwapError::Invalid(_) | SwapError::Unfit(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            error(status, &e.to_string())
        }
    }
}

/// Reads the whole body, up to `limit` bytes and [`BODY_READ_TIMEOUT`].
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Full<Bytes>>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, body).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the body: {e}"),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        )),
    }
}

/// A plugin config: a JSON object, re-serialised compactly.
fn config_json(bytes: &[u8]) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the config is not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err("the config must be a JSON object".to_string());
    }
    Ok(value.to_string())
}

/// `?config=JSON` on an upload, when present.
fn query_config(query: Option<&str>) -> Result<Option<String>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut config = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "config" {
            return Err(format!(
                "unknown query parameter \"{key}\" (only config=JSON)"
            ));
        }
        config = Some(config_json(value.as_bytes())?);
    }
    Ok(config)
}

/// One plugin in `GET /plugins`.
#[derive(Debug, Serialize)]
struct PluginStatus {
    name: String,
    source: String,
    /// SHA-256 of the running component.
    version: String,
    config: serde_json::Value,
    /// Replaced versions kept for rollback, oldest first.
    previous: Vec<String>,
    stats: crate::CallStatsSnapshot,
}

async fn plugins(control: &Control) -> Vec<PluginStatus> {
    let config = control.config();
    let mut kept = control.kept_versions().await;
    config
        .plugin_names()
        .into_iter()
        .filter_map(|name| {
            let plugin = config.plugin(&name)?;
            let report = plugin.report();
            Some(PluginStatus {
                previous: kept.remove(&name).unwrap_or_default(),
                source: report.source,
                version: report.version,
                config: serde_json::from_str(&plugin.spec.config)
                    .unwrap_or(serde_json::Value::Null),
                stats: report.stats,
                name,
            })
        })
        .collect()
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
