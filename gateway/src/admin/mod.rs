//! The admin API: JSON over HTTP/1.1 on `[admin] listen`, behind a bearer
//! token.
//!
//! Served: `GET /upstreams` (endpoint health, load, breakers), `GET /plugins`,
//! `PUT /plugins/{name}` (a new component), `PUT /plugins/{name}/config`,
//! `POST /plugins/{name}/rollback`, `POST /reload`, `GET /audit`,
//! `GET /metrics` (Prometheus) and the health endpoints. Every change goes through [`Control`]: validated whole,
//! then swapped; a refused change answers 422 with the reason and leaves the
//! running config serving.
//!
//! Every change, applied or refused, and every change attempt refused for
//! its token, is recorded in the audit log (`GET /audit?limit=N`, and
//! `[admin] audit_log` as JSON lines). `GET /health/live` and
//! `GET /health/ready` answer without the token, for load balancers;
//! `GET /health`, `GET /metrics` and everything else need it.

mod audit;
mod control;
mod health;

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
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use audit::Actor;
use audit::{Action, AuditEntry};
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
    /// How the audit log names the token.
    token_id: Option<Arc<str>>,
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
                    token_id: admin.token.as_deref().map(Actor::token_id),
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
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let control = &state.control;
    // Probes carry no credentials.
    if method == Method::GET || method == Method::HEAD {
        match segments.as_slice() {
            ["health", "live"] => return json(StatusCode::OK, &health::live()),
            ["health", "ready"] => {
                let (status, ready) = health::ready(control);
                return json(status, &ready);
            }
            _ => {}
        }
    }
    let change = change_of(control, &method, &segments);
    let actor = match (&state.token, &state.token_id) {
        (Some(token), Some(id)) if authorized(&req, token) => Actor::Token {
            id: id.clone(),
            peer,
        },
        (Some(_), _) => {
            tracing::warn!(%peer, path, "admin request refused: bad or missing token");
            if let Some((action, target)) = change {
                control.audit().record(
                    AuditEntry::new(&Actor::Peer(peer), action, &target)
                        .unauthorized(StatusCode::UNAUTHORIZED.as_u16()),
                );
            }
            let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
        (None, _) => Actor::Peer(peer),
    };
    if let Some((action, target)) = change {
        let entry = AuditEntry::new(&actor, action, &target);
        // Before any body is read: an upload for a name that is not one of
        // the manifest's plugins is refused without taking it in.
        if action != Action::Reload
            && let Err(refusal) = declared_plugin(&control.config(), &target)
        {
            return finish(control, (entry, Err(refusal)));
        }
        return match action {
            Action::Upload => {
                let outcome = upload(control, &target, req, entry).await;
                finish(control, outcome)
            }
            Action::Config => {
                let outcome = configure(control, &target, req, entry).await;
                finish(control, outcome)
            }
            Action::Rollback => {
                let mut entry = entry;
                entry.old_version = running_version(control, &target);
                let outcome = control.rollback(&target).await;
                finish(control, swap_outcome(entry, outcome))
            }
            Action::Reload => {
                let manifest = control.config().source().to_path_buf();
                match control.reload_as(&manifest, &actor).await {
                    Ok(()) => {
                        tracing::info!(%peer, "admin: reloaded the manifest");
                        json(StatusCode::OK, &serde_json::json!({ "reloaded": manifest }))
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "admin: reload refused");
                        error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string())
                    }
                }
            }
        };
    }
    match (method, segments.as_slice()) {
        (Method::GET, ["upstreams"]) => json(StatusCode::OK, &upstreams(&control.config())),
        (Method::GET, ["plugins"]) => json(StatusCode::OK, &plugins(control).await),
        (Method::GET, ["metrics"]) => metrics(control),
        (Method::GET, ["audit"]) => match query_limit(req.uri().query()) {
            Ok(limit) => json(StatusCode::OK, &control.audit().recent(limit)),
            Err(message) => error(StatusCode::BAD_REQUEST, &message),
        },
        (Method::GET | Method::HEAD, ["health"]) => json(StatusCode::OK, &health::report(control)),
        (
            _,
            ["upstreams" | "plugins" | "reload" | "audit" | "health" | "metrics"]
            | ["plugins", _]
            | ["plugins", _, "config" | "rollback"]
            | ["health", "live" | "ready"],
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        _ => error(
            StatusCode::NOT_FOUND,
            &format!(
                "no admin endpoint {path}; this build serves GET /upstreams, GET /plugins, PUT /plugins/NAME, PUT /plugins/NAME/config, POST /plugins/NAME/rollback, POST /reload, GET /audit, GET /metrics, GET /health, GET /health/live and GET /health/ready"
            ),
        ),
    }
}

/// The change a request asks for, and its target (a plugin name or the
/// manifest path), when it asks for one.
fn change_of(control: &Control, method: &Method, segments: &[&str]) -> Option<(Action, String)> {
    let (action, target) = match (method, segments) {
        (&Method::PUT, ["plugins", name]) => (Action::Upload, *name),
        (&Method::PUT, ["plugins", name, "config"]) => (Action::Config, *name),
        (&Method::POST, ["plugins", name, "rollback"]) => (Action::Rollback, *name),
        (&Method::POST, ["reload"]) => {
            let manifest = control.config().source().display().to_string();
            return Some((Action::Reload, manifest));
        }
        _ => return None,
    };
    Some((action, target.to_string()))
}

/// How much of a refused plugin name an answer quotes: the name comes from
/// the request's path, the client's to choose.
const QUOTED_NAME_CHARS: usize = 64;

/// Checks that `name`, as it appears in an admin path, is a plugin of the
/// running manifest: 400 for a name no manifest could declare (anything but
/// letters, digits, `-` and `_`; the path is not percent-decoded, so `%2e`
/// or `%2F` is refused as it is), 404 for one it does not declare.
fn declared_plugin(config: &Config, name: &str) -> Result<(), Refusal> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid plugin name {}: a plugin name has only letters, digits, '-' and '_', as in the manifest's [plugin.NAME] (the path is not percent-decoded)",
                quoted(name)
            ),
        ));
    }
    if config.plugin(name).is_none() {
        let declared = config.plugin_names();
        let declared = if declared.is_empty() {
            "none".to_string()
        } else {
            declared.join(", ")
        };
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "no plugin named {} in the manifest; a change names one of its plugins (declared: {declared})",
                quoted(name)
            ),
        ));
    }
    Ok(())
}

/// `name` quoted with its control characters escaped, and cut short
/// (saying how long it was) past [`QUOTED_NAME_CHARS`].
fn quoted(name: &str) -> String {
    let count = name.chars().count();
    if count <= QUOTED_NAME_CHARS {
        return format!("{name:?}");
    }
    let start: String = name.chars().take(QUOTED_NAME_CHARS).collect();
    format!("{start:?}... ({} bytes)", name.len())
}

/// Why a change was refused: the status it is answered with and the reason.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

/// A plugin change's answer and audit entry.
type ChangeOutcome = (AuditEntry, Result<serde_json::Value, Refusal>);

/// `PUT /plugins/{name}`: a new component, with `?config=JSON` optionally.
async fn upload(
    control: &Control,
    name: &str,
    req: Request<Incoming>,
    mut entry: AuditEntry,
) -> ChangeOutcome {
    entry.old_version = running_version(control, name);
    let config = match query_config(req.uri().query()) {
        Ok(config) => config,
        Err(message) => return (entry, Err(Refusal::new(StatusCode::BAD_REQUEST, message))),
    };
    let bytes = match read_body(req, MAX_UPLOAD_BYTES).await {
        Ok(bytes) => bytes,
        Err(refusal) => return (entry, Err(refusal)),
    };
    let change = PluginChange::Component {
        bytes: bytes.clone(),
        config,
    };
    let outcome = control.swap(name, change).await;
    if outcome.is_err() {
        // The offered version, so a refused one is on record too (an applied
        // one's comes with the swap); hashing up to MAX_UPLOAD_BYTES is work
        // for a blocking thread.
        entry.new_version = tokio::task::spawn_blocking(move || crate::plugin::sha256_hex(&bytes))
            .await
            .ok();
    }
    swap_outcome(entry, outcome)
}

/// `PUT /plugins/{name}/config`: new config JSON for the running component.
async fn configure(
    control: &Control,
    name: &str,
    req: Request<Incoming>,
    mut entry: AuditEntry,
) -> ChangeOutcome {
    entry.old_version = running_version(control, name);
    entry.new_version.clone_from(&entry.old_version);
    let bytes = match read_body(req, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(refusal) => return (entry, Err(refusal)),
    };
    let config = match config_json(&bytes) {
        Ok(config) => config,
        Err(message) => return (entry, Err(Refusal::new(StatusCode::BAD_REQUEST, message))),
    };
    let outcome = control.swap(name, PluginChange::Config(config)).await;
    swap_outcome(entry, outcome)
}

/// The SHA-256 of plugin `name`'s running component, if it is loaded.
fn running_version(control: &Control, name: &str) -> Option<String> {
    control.config().plugin(name).map(|p| p.version.clone())
}

/// A swap's or rollback's result as an answer; the entry gets the
/// versions and config now running.
fn swap_outcome(
    mut entry: AuditEntry,
    result: Result<control::Swapped, SwapError>,
) -> ChangeOutcome {
    match result {
        Ok(swapped) => {
            entry.old_version = Some(swapped.previous.clone());
            entry.new_version = Some(swapped.version.clone());
            entry.config = Some(swapped.config.clone());
            let answer = serde_json::to_value(&swapped).unwrap_or_default();
            (entry, Ok(answer))
        }
        Err(e) => {
            let status = match e {
                SwapError::Unknown(_) => StatusCode::NOT_FOUND,
                SwapError::NoPrevious(_) => StatusCode::CONFLICT,
                SwapError::Invalid(_) | SwapError::Unfit(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            (entry, Err(Refusal::new(status, e.to_string())))
        }
    }
}

/// Answers a plugin change, logs it and records it in the audit log.
fn finish(control: &Control, (entry, outcome): ChangeOutcome) -> Response<Full<Bytes>> {
    match outcome {
        Ok(answer) => {
            tracing::info!(
                who = %entry.who(),
                change = ?entry.action(),
                plugin = entry.target(),
                version = entry.new_version.as_deref().unwrap_or_default(),
                previous = entry.old_version.as_deref().unwrap_or_default(),
                "admin: plugin swapped"
            );
            control
                .audit()
                .record(entry.ok(Some(StatusCode::OK.as_u16())));
            json(StatusCode::OK, &answer)
        }
        Err(refusal) => {
            tracing::warn!(
                who = %entry.who(),
                change = ?entry.action(),
                plugin = entry.target(),
                error = %refusal.message,
                "admin: plugin change refused"
            );
            control
                .audit()
                .record(entry.refused(Some(refusal.status.as_u16()), &refusal.message));
            error(refusal.status, &refusal.message)
        }
    }
}

/// Reads the whole body, up to `limit` bytes and [`BODY_READ_TIMEOUT`].
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
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
        Ok(Err(e)) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
        Err(_) => Err(Refusal::new(
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
    query_param(query, "config", "config=JSON")?
        .map(|value| config_json(value.as_bytes()))
        .transpose()
}

/// `?limit=N` on `GET /audit`, when present.
fn query_limit(query: Option<&str>) -> Result<Option<usize>, String> {
    query_param(query, "limit", "limit=N")?
        .map(|value| {
            value
                .parse::<usize>()
                .map_err(|_| format!("limit must be a whole number of entries, not \"{value}\""))
        })
        .transpose()
}

/// The value of the one query parameter `name` an endpoint takes (the last
/// one when repeated); any other parameter is refused, naming `usage`.
fn query_param(query: Option<&str>, name: &str, usage: &str) -> Result<Option<String>, String> {
    let mut found = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key != name {
            return Err(format!("unknown query parameter \"{key}\" (only {usage})"));
        }
        found = Some(value.into_owned());
    }
    Ok(found)
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
    /// The hooks the gateway calls: exported and not skipped by `init`.
    hooks: Vec<&'static str>,
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
                hooks: report.hooks,
                name,
            })
        })
        .collect()
}

/// Whether `req` carries `Authorization: Bearer <token>` (the scheme in
/// any case, RFC 9110 §11.1). The SHA-256 digests are compared, in
/// constant time: comparing the tokens themselves would return at once on a
/// length mismatch and so tell a client the token's length.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(presented) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
    else {
        return false;
    };
    let presented = Sha256::digest(presented);
    let expected = Sha256::digest(token.as_bytes());
    bool::from(presented.as_slice().ct_eq(expected.as_slice()))
}

/// The credentials of a `Bearer` authorization value.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"Bearer ").then_some(rest)
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
    /// Requests waiting in the upstream's queue for a connection, every endpoint being full.
    queued: usize,
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
            queued: u.endpoint_set.queued(),
            endpoints: u.endpoint_set.status(u.health.is_some()),
        })
        .collect()
}

/// `GET /metrics`: the Prometheus exposition of the running gateway.
fn metrics(control: &Control) -> Response<Full<Bytes>> {
    let text = crate::telemetry::metrics::render(control.config(), control.worker_connections());
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(crate::telemetry::metrics::CONTENT_TYPE),
    );
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_required() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), Some(&b""[..]));
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"abc"), None);
    }

    #[test]
    fn quoted_names_are_escaped_and_cut_short() {
        assert_eq!(quoted("a\0b"), "\"a\\0b\"");
        let long = "x".repeat(5000);
        let shown = quoted(&long);
        assert!(shown.ends_with("... (5000 bytes)"), "{shown}");
        assert!(shown.len() < 100, "{shown}");
    }
}
