//! One request, start to end: redirect or route, check limits, pick an
//! endpoint, forward, and turn the outcome into the client's response.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::ListenerContext;
use super::activity::Activity;
use super::body::{
    BodyLimits, ClientWait, RequestBody, RequestBodyError, ResponseBody, UnsentBody,
    upstream_timeout,
};
use super::forward::{self, ClientHop};
use super::trace::TraceContext;
use crate::plugin::chain::{LocalReply, Verdict, apply_on_error};
use crate::plugin::host::{RequestState, copy_parts};
use crate::plugin::{ErrorKind, Outcome as PolicyOutcome, Plugin};
use crate::route::{RequestFacts, request_host};
use crate::telemetry::metrics::RouteMetrics;
use crate::telemetry::{self, AccessRecord};
use crate::upstream::{
    Endpoint, EndpointSet, Pool, QueuePlace, QueuedCount, Rotated, SendError, TryResult, Upgraded,
};

/// Everything a request needs to know about its connection.
#[derive(Debug)]
pub(crate) struct ConnectionContext {
    pub(crate) listener: Arc<ListenerContext>,
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    pub(crate) activity: Arc<Activity>,
}

impl ConnectionContext {
    pub(crate) fn new(listener: Arc<ListenerContext>, peer: SocketAddr, https: bool) -> Arc<Self> {
        Arc::new(ConnectionContext {
            listener,
            peer,
            https,
            activity: Activity::new(),
        })
    }
}

/// What happened to a request, for the access log.
#[derive(Debug, Default)]
struct Outcome {
    route: Option<Arc<str>>,
    upstream: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    upstream_ms: Option<f64>,
    error: Option<&'static str>,
    policy: Option<Arc<str>>,
    /// Tries made upstream (more than 1 when retried).
    attempts: u32,
    /// How long a policy held the request before it was forwarded (`request.delay`).
    delayed: Duration,
    /// Where the request is counted: its route's metrics, or the unrouted ones.
    metrics: Option<Arc<RouteMetrics>>,
}

/// hyper's entry point for each request on a connection.
pub(crate) async fn handle(
    conn: Arc<ConnectionContext>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let in_flight = conn.activity.begin();
    // Counted before the gateway adds its own (x-request-id).
    let fields = req.headers().len();
    let request_id = forward::ensure_request_id(req.headers_mut());
    let trace = TraceContext::enter(req.headers_mut());
    let head = telemetry::access_log_enabled().then(|| {
        (
            req.method().clone(),
            req.uri().clone(),
            request_host(req.uri(), req.headers()).into_owned(),
            req.version(),
        )
    });
    let mut outcome = Outcome::default();
    // Boxed: hyper keeps one slot the size of this future for every
    // connection, idle or not; the proxy's own state (~7 KiB) is held only
    // while a request is in flight.
    let response = Box::pin(proxy(&conn, req, fields, &mut outcome, started))
        .await
        .map(|body| body.with_in_flight(in_flight));
    if let Some(metrics) = outcome.metrics.take() {
        metrics.record(response.status(), started.elapsed());
    }
    let Some((method, uri, host, version)) = head else {
        return Ok(response);
    };
    let record = AccessRecord {
        started,
        listener: conn.listener.name.clone(),
        client: conn.peer,
        method,
        uri,
        host,
        version,
        request_id: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
        trace_id: trace.trace_id,
        span_id: trace.span_id,
        route: outcome.route,
        upstream: outcome.upstream,
        endpoint: outcome.endpoint,
        status: response.status().as_u16(),
        upstream_ms: outcome.upstream_ms,
        error: outcome.error,
        policy: outcome.policy,
        attempts: (outcome.attempts > 1).then_some(outcome.attempts),
        delayed_ms: (!outcome.delayed.is_zero()).then_some(outcome.delayed.as_secs_f64() * 1000.0),
        bytes_sent: 0,
        body_complete: false,
        upstream_body_error: false,
    };
    Ok(response.map(|body| body.with_log(Some(Box::new(record)))))
}

async fn proxy(
    conn: &ConnectionContext,
    req: Request<Incoming>,
    fields: usize,
    outcome: &mut Outcome,
    started: Instant,
) -> Response<ResponseBody> {
    let listener = &conn.listener;
    let tables = listener.tables.load_full();
    if let Some((status, text, kind)) = malformed(&req, fields, listener.config.max_headers) {
        outcome.metrics = Some(tables.routes.unrouted().clone());
        let mut response = local(status, text, kind, outcome);
        if req.version() < http::Version::HTTP_2 {
            // What follows on this connection cannot be trusted to be framed as we read it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return response;
    }
    if let Some(port) = listener.config.redirect_https {
        outcome.metrics = Some(tables.routes.unrouted().clone());
        return redirect_to_https(&req, port, outcome);
    }

    let route = {
        let host = request_host(req.uri(), req.headers());
        let facts = RequestFacts {
            host: &host,
            path: req.uri().path(),
            method: req.method(),
            headers: req.headers(),
        };
        tables.routes.find(&facts)
    };
    let Some(route) = route else {
        outcome.metrics = Some(tables.routes.unrouted().clone());
        return local(
            StatusCode::NOT_FOUND,
            "no route matches this request\n",
            "no-route",
            outcome,
        );
    };
    outcome.route = Some(route.name.clone());
    outcome.metrics = Some(route.metrics.clone());

    let body_limits = BodyLimits {
        max_bytes: route.max_body_bytes.or(listener.config.max_body_bytes),
        read_timeout: listener.config.body_read_timeout,
    };
    if let Some(limit) = body_limits.max_bytes
        && content_length(&req).is_some_and(|length| length > limit)
    {
        return local(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
            "body-too-large",
            outcome,
        );
    }

    let Some(mut upstream) = tables.upstreams.get(route.upstream) else {
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no upstream\n",
            "no-upstream",
            outcome,
        );
    };

    let upgrade = forward::upgrade_request(req.version(), req.headers());
    let (parts, body) = req.into_parts();
    let mut request = RequestState {
        parts,
        client_ip: conn.peer.ip(),
        https: conn.https,
        route: route.name.clone(),
        upstream: upstream.endpoints.clone(),
        endpoint: None,
        directory: tables.directory.clone(),
        delay: Duration::ZERO,
    };

    // Policies: admit, answer, rewrite, steer. Plugin calls are boxed here and
    // below: their futures (~1 KiB each) would otherwise sit inline in every
    // request's future, plugins or not.
    let chain = &route.chain;
    if !chain.is_empty() {
        let upstream_named = |name: &str| {
            tables
                .upstreams
                .iter()
                .find(|u| &*u.name == name)
                .map(|u| u.endpoints.clone())
        };
        let (back, verdict) = Box::pin(chain.on_request(request, upstream_named)).await;
        request = back;
        match verdict {
            Verdict::Forward => {}
            Verdict::Answer(reply) => return answered(reply, outcome),
            Verdict::Failed(plugin) => return policy_failed(plugin, outcome),
        }
        if !Arc::ptr_eq(&request.upstream, &upstream.endpoints) {
            match tables
                .upstreams
                .iter()
                .find(|u| Arc::ptr_eq(&u.endpoints, &request.upstream))
            {
                Some(steered) => upstream = steered,
                None => {
                    return local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no upstream\n",
                        "no-upstream",
                        outcome,
                    );
                }
            }
        }
    }
    outcome.upstream = Some(upstream.name.clone());
    // Pacing asked for by a policy (a rate limit without `nodelay`).
    if !request.delay.is_zero() {
        outcome.delayed = request.delay;
        tokio::time::sleep(request.delay).await;
    }

    // Balance, forward, and retry when the upstream's `retries` allow.
    let endpoints = &upstream.endpoints;
    let balancer = upstream.balancer.as_ref();
    let learns = chain.has_outcome_hooks() || balancer.is_some_and(|b| b.has_outcome_hook());
    let rewrites = chain.has_response_hooks() || balancer.is_some_and(|b| b.has_response_hook());
    // Upgrades (WebSocket) are never retried: the client's connection changes hands.
    let retries = upstream.retries.as_deref().filter(|_| upgrade.is_none());
    let client_upgrade = upgrade
        .is_some()
        .then(|| request.parts.extensions.remove::<OnUpgrade>())
        .flatten();
    // Boxed: only requests whose responses policies rewrite hold a copy.
    let mut forwarded_head = rewrites.then(|| Box::new(request.copy_head()));
    let hop = ClientHop {
        ip: conn.peer.ip(),
        https: conn.https,
        version: request.parts.version,
        authority: request.parts.uri.authority(),
    };
    let client_version = hop.version;
    forward::request_headers(&mut request.parts.headers, hop, upgrade);
    request.parts.version = http::Version::HTTP_11;
    let path_and_query = request
        .parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));

    let empty_body = http_body::Body::is_end_stream(&body);
    // Only a body that streams has a client to wait for.
    let client_wait = (!empty_body).then(ClientWait::new);
    // Only a body that may be needed again is watched for coming back unread.
    let unsent = retries
        .filter(|_| !empty_body)
        .map(|_| UnsentBody::default());
    let mut body = Some(body);
    let attempts = retries.map_or(1, |r| r.attempts);
    if let Some(retries) = retries {
        retries.budget.deposit();
    }
    // The clock as last read: policies and pacing take time, so it is read
    // again after them; the core alone forwards at the request's arrival.
    let mut now = if chain.is_empty() && request.delay.is_zero() {
        started
    } else {
        Instant::now()
    };
    let deadline = now + upstream.timeout;
    let mut tried: Vec<u32> = Vec::new();
    let mut attempt = 1;
    let (endpoint, sent) = loop {
        let (picked, queued) = match balancer {
            None if tried.is_empty() => core_pick(endpoints, &upstream.pool, deadline).await,
            None => (
                Ok(core_retry_pick(endpoints, &upstream.pool, &tried)),
                false,
            ),
            // Boxed: the request is lent to the plugin, and its future
            // would otherwise sit in every request's future.
            Some(balancer) => {
                let pick = plugin_pick(request, endpoints, &upstream.pool, balancer, &tried);
                let (back, picked) = Box::pin(pick).await;
                request = back;
                (picked, false)
            }
        };
        let picked = match picked {
            Ok(Some(endpoint)) => Ok(endpoint),
            Ok(None) => Err((
                ErrorKind::NoEndpoint,
                Duration::ZERO,
                "no endpoint available\n",
                "no-endpoint",
            )),
            Err(PickFailed::QueueTimedOut) => Err((
                ErrorKind::Timeout,
                upstream.timeout,
                "no upstream connection came free within the upstream's timeout\n",
                "queue-timeout",
            )),
            Err(PickFailed::Policy(plugin)) => return policy_failed(plugin, outcome),
        };
        // No try is made: policies that learn hear why, and the client gets a 503.
        let endpoint = match picked {
            Ok(endpoint) => endpoint,
            Err((kind, waited, text, tag)) => {
                if learns {
                    let report =
                        policy_outcome(&route.name, &upstream.name, None, Err(kind), waited);
                    Box::pin(chain.on_outcome(balancer, endpoints, &tables.directory, &report))
                        .await;
                }
                return local(StatusCode::SERVICE_UNAVAILABLE, text, tag, outcome);
            }
        };
        outcome.endpoint = Some(endpoint.addr);
        outcome.attempts = attempt;
        request.endpoint = Some(endpoint.addr);

        // The head for this try: a copy while another try may follow.
        let last_chance = attempt >= attempts;
        let mut parts = if last_chance {
            std::mem::replace(&mut request.parts, http::Request::new(()).into_parts().0)
        } else {
            copy_parts(&request.parts)
        };
        // Origin-form: the connection already goes to the endpoint.
        parts.uri = Uri::from(path_and_query.clone());
        let try_body = match (body.take(), &unsent) {
            (Some(incoming), Some(unsent)) => {
                RequestBody::returning(incoming, body_limits, client_wait.as_ref(), unsent)
            }
            (Some(incoming), None) => RequestBody::new(incoming, body_limits, client_wait.as_ref()),
            (None, _) => RequestBody::empty(),
        };
        let upstream_req = Request::from_parts(parts, try_body);

        // A balancer plugin's pick, or the upstream's queue, took time.
        let forwarding = if balancer.is_some() || queued {
            Instant::now()
        } else {
            now
        };
        let try_timeout = retries
            .and_then(|r| r.per_try_timeout)
            .unwrap_or(upstream.timeout)
            .min(deadline.saturating_duration_since(forwarding));
        let in_flight = endpoint.begin();
        // Boxed: the exchange's state (~0.9 KiB) is needed only while this
        // try is on the wire, not by the many requests waiting in a queue
        // or a policy (at 10,000 connections, ~9 MiB).
        let mut exchange = Box::pin(upstream.pool.send(endpoint.id, endpoint.addr, upstream_req));
        let sent = upstream_timeout(
            forwarding.into(),
            try_timeout,
            client_wait.as_deref(),
            exchange.as_mut(),
        )
        .await;
        drop(in_flight);
        now = Instant::now();
        let latency = now.saturating_duration_since(forwarding);
        let result = match &sent {
            Err(_elapsed) => TryResult::Failed(ErrorKind::Timeout),
            Ok(Err(error)) => {
                tracing::debug!(%error, endpoint = %endpoint.addr, attempt, "upstream request failed");
                match classify(error).3 {
                    Some(kind) => TryResult::Failed(kind),
                    // Our own body limit, the client's body or this host's
                    // resources failed: not the upstream's fault.
                    None => break (endpoint, sent),
                }
            }
            Ok(Ok(response)) => TryResult::Answered(response.status()),
        };
        match result {
            TryResult::Failed(_) => endpoints.failed(endpoint),
            TryResult::Answered(_) => {
                endpoints.observe_latency(endpoint, latency, now);
                endpoints.succeeded(endpoint);
            }
        }
        if learns {
            let status = match result {
                TryResult::Answered(status) => Ok(status),
                TryResult::Failed(kind) => Err(kind),
            };
            let report =
                policy_outcome(&route.name, &upstream.name, Some(endpoint), status, latency);
            Box::pin(chain.on_outcome(balancer, endpoints, &tables.directory, &report)).await;
            now = Instant::now();
        }

        let Some(retries) = retries.filter(|_| !last_chance) else {
            break (endpoint, sent);
        };
        // A body that has not come back was (partly) sent: it cannot be sent again.
        if !empty_body {
            body = unsent.as_ref().and_then(UnsentBody::take);
        }
        let replayable = empty_body || body.is_some();
        if !retries.is_retriable(result, &request.parts.method, replayable) {
            break (endpoint, sent);
        }
        let backoff = retries.backoff.delay(attempt, fastrand::f64());
        if now + backoff >= deadline || !retries.budget.try_withdraw() {
            break (endpoint, sent);
        }
        tracing::debug!(
            upstream = &*upstream.name,
            endpoint = %endpoint.addr,
            attempt,
            ?result,
            ?backoff,
            "retrying"
        );
        drop(sent);
        tried.push(endpoint.id);
        tokio::time::sleep(backoff).await;
        now = Instant::now();
        attempt += 1;
    };

    let failure = match sent {
        Err(ref _elapsed) => Some((
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "upstream timed out\n",
        )),
        Ok(Err(ref error)) => {
            let (status, kind, text, _) = classify(error);
            Some((status, kind, text))
        }
        Ok(Ok(_)) => None,
    };
    if let Some((status, kind, text)) = failure {
        let mut response = local(status, text, kind, outcome);
        if CLIENT_BODY_FAILURES.contains(&kind) && client_version < http::Version::HTTP_2 {
            // The rest of the body is unread (a stalled client may still send
            // it): nothing after it on this connection can be read as a request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return response;
    }
    let Ok(Ok(mut response)) = sent else {
        return local(
            StatusCode::BAD_GATEWAY,
            "upstream failed\n",
            "upstream-error",
            outcome,
        );
    };
    outcome.upstream_ms = Some(now.saturating_duration_since(started).as_secs_f64() * 1000.0);

    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let (parts, body) = response.into_parts();
        if let Some(upstream_upgrade) = body.into_upgraded() {
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
        }
        return Response::from_parts(parts, ResponseBody::local(bytes::Bytes::new()));
    }
    forward::response_headers(response.headers_mut());
    if let Some(mut head) = forwarded_head.take() {
        head.endpoint = Some(endpoint.addr);
        let (parts, body) = response.into_parts();
        let (parts, rewritten) = Box::pin(chain.on_response(balancer, *head, parts)).await;
        if let Err(plugin) = rewritten {
            return policy_failed(plugin, outcome);
        }
        response = Response::from_parts(parts, body);
    }
    response.map(ResponseBody::upstream)
}

/// Why no endpoint was picked for a try, other than there being none.
enum PickFailed {
    /// A `closed` balancer plugin failed; it is named.
    Policy(Arc<str>),
    /// Every endpoint stayed full until the upstream's deadline.
    QueueTimedOut,
}

/// The balancer plugin's pick for a try (or, on its failure with
/// `on_error = "open"`, the core's). The plugin's choice is kept as it is
/// and waits at its endpoint for a connection; a retry avoids the
/// endpoints in `tried` while any other is a candidate. (Without a plugin,
/// [`core_pick`] picks a first try and [`core_retry_pick`] a retry.)
async fn plugin_pick<'a>(
    request: RequestState,
    endpoints: &'a Arc<EndpointSet>,
    pool: &Pool,
    balancer: &Arc<Plugin>,
    tried: &[u32],
) -> (RequestState, Result<Option<&'a Endpoint>, PickFailed>) {
    let candidates = endpoints.candidates();
    if candidates.len() == 0 {
        return (request, Ok(None));
    }
    let (request, picked) = balancer.pick(request, endpoints, &candidates).await;
    let picked = match picked {
        Ok(position) => position.and_then(|p| endpoints.at(&candidates, p)),
        Err(failure) => match apply_on_error(balancer, "pick", &failure) {
            None => core_retry_pick(endpoints, pool, tried),
            Some(_) => {
                return (request, Err(PickFailed::Policy(balancer.name.clone())));
            }
        },
    };
    let retry_elsewhere = picked.is_some_and(|e| tried.contains(&e.id))
        && candidates.ids.iter().any(|id| !tried.contains(id));
    if retry_elsewhere {
        return (request, Ok(endpoints.pick_weighted_untried(tried)));
    }
    (request, Ok(picked))
}

/// The core's weighted rotation for a first try: the next endpoint with
/// room in `pool` (passing over endpoints whose connections are all busy
/// at `max_connections`, as HAProxy's round-robin skips a full server, so
/// a stalled backend costs no wait to requests another could serve at
/// once); when every one is full, the first to have room once this
/// request's turn in the upstream's queue comes (HAProxy's backend queue),
/// waiting until `deadline`. The second value says whether it waited.
async fn core_pick<'a>(
    endpoints: &'a EndpointSet,
    pool: &Pool,
    deadline: Instant,
) -> (Result<Option<&'a Endpoint>, PickFailed>, bool) {
    let mut place: Option<(QueuePlace<'_>, QueuedCount<'_>)> = None;
    loop {
        let queued = place.is_some();
        match endpoints.rotate(|id| pool.has_room(id, queued)) {
            None => return (Ok(None), queued),
            Some(Rotated::Usable(endpoint)) => {
                if let Some((place, _)) = place.as_mut() {
                    place.served();
                }
                return (Ok(Some(endpoint)), queued);
            }
            Some(Rotated::NoneUsable(_)) => {}
        }
        let (place, _) = place.get_or_insert_with(|| (pool.queue(), endpoints.count_queued()));
        // Boxed: only a request that waits pays for the timer and the wake
        // in its future, which every request in flight holds.
        let room = Box::pin(tokio::time::timeout_at(deadline.into(), place.room()));
        if room.await.is_err() {
            return (Err(PickFailed::QueueTimedOut), true);
        }
    }
}

/// The core's pick for a retry (and for a failed `open` balancer): the
/// next endpoint not in `tried` with room in `pool`, else the next one not
/// in `tried`, else the plain next one. It does not queue: the request
/// waits at that endpoint for a connection.
fn core_retry_pick<'a>(
    endpoints: &'a EndpointSet,
    pool: &Pool,
    tried: &[u32],
) -> Option<&'a Endpoint> {
    match endpoints.rotate(|id| !tried.contains(&id) && pool.has_room(id, false))? {
        Rotated::Usable(endpoint) => Some(endpoint),
        Rotated::NoneUsable(_) => endpoints.pick_weighted_untried(tried),
    }
}

/// The outcome record policies learn from.
fn policy_outcome(
    route: &str,
    upstream_name: &str,
    endpoint: Option<&Endpoint>,
    result: Result<StatusCode, ErrorKind>,
    latency: Duration,
) -> PolicyOutcome {
    PolicyOutcome {
        route: route.to_string(),
        upstream: upstream_name.to_string(),
        endpoint: endpoint.map(|e| e.address.to_string()),
        endpoint_id: endpoint.map(|e| e.id),
        status: result.ok().map(|s| s.as_u16()),
        latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        error: result.err(),
    }
}

/// The response a policy answered with.
fn answered(reply: LocalReply, outcome: &mut Outcome) -> Response<ResponseBody> {
    outcome.error = Some("policy-answered");
    outcome.policy = Some(reply.by);
    let mut response = Response::new(ResponseBody::local(reply.body));
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers;
    response
}

/// 503 for a `closed` policy that failed.
fn policy_failed(plugin: Arc<str>, outcome: &mut Outcome) -> Response<ResponseBody> {
    outcome.policy = Some(plugin);
    local(
        StatusCode::SERVICE_UNAVAILABLE,
        "a policy failed\n",
        "policy-failed",
        outcome,
    )
}

/// Copies bytes both ways between an upgraded client and upstream until either closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, mut upstream: Upgraded) {
    match client.await {
        Ok(client) => {
            let mut client = TokioIo::new(client);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
        }
        Err(error) => tracing::debug!(%error, "client upgrade did not complete"),
    }
}

/// Why [`classify`] puts a failure on the client's body rather than the upstream.
const CLIENT_BODY_FAILURES: [&str; 3] = ["body-too-large", "body-timeout", "client-body-error"];

/// Maps a failed upstream exchange to the client's status: 413 when our body
/// limit cut the upload, 408 when the client stalled its body, 400 when its
/// body failed, 504 for a connect timeout, 502 for every other failure.
fn classify(error: &SendError) -> (StatusCode, &'static str, &'static str, Option<ErrorKind>) {
    if let SendError::Connect(io) = error
        && local_shortage(io)
    {
        // Out of descriptors or ports here: not the endpoint's fault, so it
        // must not be marked down for it.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "local-resources",
            "gateway out of connections\n",
            None,
        );
    }
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    let mut timed_out = false;
    while let Some(cause) = source {
        if let Some(body_error) = cause.downcast_ref::<RequestBodyError>() {
            return match body_error {
                RequestBodyError::TooLarge { .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "request body too large\n",
                    None,
                ),
                RequestBodyError::TimedOut { .. } => (
                    StatusCode::REQUEST_TIMEOUT,
                    "body-timeout",
                    "request body timed out\n",
                    None,
                ),
                RequestBodyError::Client(_) => (
                    StatusCode::BAD_REQUEST,
                    "client-body-error",
                    "request body failed\n",
                    None,
                ),
            };
        }
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            timed_out = true;
        }
        source = cause.source();
    }
    match (error.is_connect(), timed_out) {
        (true, true) => (
            StatusCode::GATEWAY_TIMEOUT,
            "connect-timeout",
            "upstream connect timed out\n",
            Some(ErrorKind::ConnectTimeout),
        ),
        (true, false) => (
            StatusCode::BAD_GATEWAY,
            "connect-failed",
            "upstream connection failed\n",
            Some(ErrorKind::ConnectFailed),
        ),
        (false, _) => (
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            "upstream failed\n",
            Some(ErrorKind::UpstreamError),
        ),
    }
}

/// Whether a connect failed for want of something on this host (file
/// descriptors, ephemeral ports, buffers) rather than at the endpoint.
fn local_shortage(error: &std::io::Error) -> bool {
    // Linux's numbers for "too many open files" (process, system) and "no
    // buffer space"; the others have their own kinds.
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    matches!(
        error.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::OutOfMemory
    ) || error
        .raw_os_error()
        .is_some_and(|code| [EMFILE, ENFILE, ENOBUFS].contains(&code))
}

/// Why a request is refused before routing, if it is: more header fields
/// than `max_headers` (hyper counts them on HTTP/1.1 only); no Host on
/// HTTP/1.1, more than one, or an invalid one (RFC 9112 §3.2); userinfo in
/// the target; a transfer coding other than chunked, which the gateway
/// cannot decode (RFC 9112 §6.1: 501).
fn malformed(
    req: &Request<Incoming>,
    fields: usize,
    max_headers: usize,
) -> Option<(StatusCode, &'static str, &'static str)> {
    if fields > max_headers {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many header fields\n",
            "too-many-headers",
        ));
    }
    let bad = |text| Some((StatusCode::BAD_REQUEST, text, "bad-host"));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad("more than one Host header\n"),
        (None, _) if req.version() == http::Version::HTTP_11 => {
            return bad("a Host header is required\n");
        }
        (Some(host), None) if !host.is_empty() && !valid_authority(host.as_bytes()) => {
            return bad("invalid Host header\n");
        }
        _ => {}
    }
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return bad("userinfo in the request target\n");
    }
    // hyper has checked that chunked comes last, so it is there when any coding is.
    let mut chunked = 0;
    for value in req.headers().get_all(header::TRANSFER_ENCODING) {
        for coding in value.to_str().unwrap_or("?").split(',') {
            if !coding.trim().eq_ignore_ascii_case("chunked") {
                return Some((
                    StatusCode::NOT_IMPLEMENTED,
                    "unsupported transfer coding\n",
                    "bad-transfer-encoding",
                ));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        // RFC 9112 §6.1: chunked is applied at most once.
        return Some((
            StatusCode::BAD_REQUEST,
            "chunked more than once\n",
            "bad-transfer-encoding",
        ));
    }
    None
}

/// `uri-host [ ":" port ]` without userinfo: only the characters RFC 3986
/// allows in a host (reg-name, IP literal) and port, no `@`, `/`, `?`, `#`
/// or whitespace. Checked byte by byte: this runs on every request and must
/// not allocate.
fn valid_authority(value: &[u8]) -> bool {
    value
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(b))
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn redirect_to_https(
    req: &Request<Incoming>,
    port: u16,
    outcome: &mut Outcome,
) -> Response<ResponseBody> {
    let host = request_host(req.uri(), req.headers());
    if host.is_empty() {
        return local(
            StatusCode::BAD_REQUEST,
            "a Host header is required\n",
            "no-host",
            outcome,
        );
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    outcome.error = Some("redirect-https");
    match HeaderValue::from_str(&location) {
        Ok(location) => {
            let mut response = Response::new(ResponseBody::local(bytes::Bytes::new()));
            *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => local(
            StatusCode::BAD_REQUEST,
            "bad request target\n",
            "bad-uri",
            outcome,
        ),
    }
}

/// A response made by the gateway itself, with the reason logged.
fn local(
    status: StatusCode,
    text: &'static str,
    kind: &'static str,
    outcome: &mut Outcome,
) -> Response<ResponseBody> {
    outcome.error = Some(kind);
    let mut response = Response::new(ResponseBody::local(bytes::Bytes::from_static(
        text.as_bytes(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_not_the_endpoint_s_failure() {
        let emfile = SendError::Connect(std::io::Error::from_raw_os_error(24));
        let (status, kind, _, blame) = classify(&emfile);
        assert_eq!(
            (status, kind, blame),
            (StatusCode::SERVICE_UNAVAILABLE, "local-resources", None)
        );

        let refused = SendError::Connect(std::io::ErrorKind::ConnectionRefused.into());
        let (status, kind, _, blame) = classify(&refused);
        assert_eq!(
            (status, kind, blame),
            (
                StatusCode::BAD_GATEWAY,
                "connect-failed",
                Some(ErrorKind::ConnectFailed)
            )
        );

        let timed_out = SendError::Connect(std::io::ErrorKind::TimedOut.into());
        assert_eq!(classify(&timed_out).3, Some(ErrorKind::ConnectTimeout));
    }
}
