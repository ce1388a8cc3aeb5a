//! Entry points for the `cargo fuzz` targets in `fuzz/` and for their
//! regression tests (`gateway/tests/fuzz_regressions.rs`): each takes the
//! fuzzer's bytes, runs the real code path on them and panics when an
//! invariant breaks. Not a stable API.
//!
//! - [`manifest`]: manifest text through [`Config::parse`] (TOML, serde,
//!   validation, route table), skipping manifests whose loading has side
//!   effects (see [`manifest`]).
//! - [`route_match`]: routes and a request, in a small line format; the
//!   route table built by validation must pick what an independent model of
//!   the routing rules picks.
//! - [`request_headers`]: request headers, in a small line format, sent
//!   through an in-process gateway to a recording origin; what the origin
//!   sees must follow the forwarding rules (hop-by-hop removal,
//!   `X-Forwarded-*`, `Via`, `Host`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::Config;
use crate::route::{RequestFacts, request_host};

/// Manifest keys whose loading has side effects, as substrings: `[admin]
/// audit_log` creates and opens a file; `[state] backend = "redis"` starts a
/// thread connecting to Redis; `[plugin.*]` and an upstream's `balancer`
/// compile and instantiate Wasm components (seconds each); `[geo]` and a
/// listener's `tls` read files. A fuzzer must not create files or threads
/// and must run thousands of inputs a second, so [`manifest`] skips inputs
/// that contain any of these.
pub const SIDE_EFFECT_WORDS: [&str; 6] = ["audit_log", "state", "plugin", "tls", "geo", "balancer"];

/// At most this many routes are read from a [`route_match`] input, so the
/// shadowing check (quadratic in routes) stays fast.
const MAX_ROUTES: usize = 32;

/// How long [`request_headers`] waits for the gateway's answer before it
/// reports a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// An empty directory, `$TMPDIR/sluice-fuzz`, created on first use. Fuzzed
/// manifests are parsed as if read from a file in it, so every relative
/// path in one (certificates, `audit_log`, plugin sources, the geo database)
/// resolves there, never in the working tree, whatever the working directory.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("sluice-fuzz");
        if let Err(error) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {error}", dir.display());
        }
        dir
    })
}

/// Parses and validates manifest `data` (UTF-8 TOML; other bytes are
/// ignored) with [`Config::parse`], as if read from a file in
/// [`scratch_dir`].
///
/// Skipped, because loading them has side effects or takes seconds: inputs
/// containing any of [`SIDE_EFFECT_WORDS`], and inputs whose parsed keys name
/// one of those tables or fields through TOML escapes (`"st\u0061te"`).
///
/// Checks: no panic; an error names at least one problem and displays; a
/// valid config has no route that can never match (validation refuses
/// those); and no file appeared in [`scratch_dir`] meanwhile.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if has_side_effects(text) {
        return;
    }
    let dir = scratch_dir();
    let files = || std::fs::read_dir(dir).map_or(0, |entries| entries.count());
    let before = files();
    match Config::parse(text, &dir.join("fuzz.toml")) {
        Ok(config) => {
            let shadowed = config.routes.shadowed();
            assert!(
                shadowed.is_empty(),
                "a valid config has routes that can never match: {shadowed:?}"
            );
            let _ = config.endpoint_addrs();
            let _ = config.listener_addrs();
            let _ = config.plugin_names();
            let _ = format!("{config:?}");
        }
        Err(error) => {
            assert!(
                !error.problems().is_empty(),
                "an error with no problem: {error:?}"
            );
            assert!(
                !error.to_string().is_empty(),
                "an error that displays empty"
            );
        }
    }
    assert!(
        files() <= before,
        "Config::parse created a file in {}",
        dir.display()
    );
}

/// Whether loading manifest `text` could have side effects (see
/// [`SIDE_EFFECT_WORDS`]).
fn has_side_effects(text: &str) -> bool {
    if SIDE_EFFECT_WORDS.iter().any(|word| text.contains(word)) {
        return true;
    }
    // A quoted key can spell a word with escapes, which the substring test
    // misses: look at the keys as parsed. Text that does not deserialize
    // fails `Config::parse` at the same step, before anything is loaded.
    let Ok(file) = toml::from_str::<crate::config::file::ManifestFile>(text) else {
        return false;
    };
    file.admin.as_ref().is_some_and(|a| a.audit_log.is_some())
        || file.geo.is_some()
        || file.state.is_some()
        || !file.plugin.is_empty()
        || file.listener.iter().any(|l| l.tls.is_some())
        || file.upstream.values().any(|u| u.balancer.is_some())
}

/// One route of a [`route_match`] input: its `match` table.
#[derive(Debug, Default)]
struct RouteSpec {
    host: Option<String>,
    path: Option<String>,
    prefix: Option<String>,
    methods: Option<Vec<String>>,
    headers: BTreeMap<String, String>,
}

/// The request of a [`route_match`] input, as raw bytes.
#[derive(Debug)]
struct RequestSpec {
    method: Vec<u8>,
    uri: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Builds a manifest with the routes of `data`, validates it with
/// [`Config::parse`] and looks the request of `data` up in its route table,
/// as the proxy does (host from [`request_host`], path, method, headers).
///
/// `data` is lines (`\n`-separated, bytes taken as they are):
///
/// ```text
/// route                  starts a route; then, for it:
/// host=*.example.com     match.host
/// path=/exact            match.path
/// prefix=/v1/            match.path_prefix
/// method=GET             one more entry in match.methods (`methods=` alone: an empty list)
/// header=x-canary:1      one more entry in match.headers (name before the first ':')
/// request                then the request:
/// method=GET             its method (default GET)
/// uri=/v1/users?id=7     its target (default /)
/// header=Host:api.example.com   one more header
/// ```
///
/// Checks: when the manifest is valid, the route found is the one an
/// independent model of the README's rules picks (most specific host, then
/// path, then most conditions, then manifest order); when validation says
/// a route can never match because another always wins, that other route
/// does match this request whenever the refused one does.
pub fn route_match(data: &[u8]) {
    let (routes, request) = decode_route_input(data);
    let Ok(method) = Method::from_bytes(&request.method) else {
        return;
    };
    let Ok(uri) = Uri::try_from(request.uri.as_slice()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let host = request_host(&uri, &headers);
    let path = uri.path();
    let model = |spec: &RouteSpec| model_matches(spec, &host, path, &method, &headers);

    let Some(text) = route_manifest(&routes) else {
        return;
    };
    let config = match Config::parse(&text, &scratch_dir().join("routes.toml")) {
        Ok(config) => config,
        Err(error) => {
            for problem in error.problems() {
                let Some((dead, winner)) = shadowing_claim(&problem.message) else {
                    continue;
                };
                let (Some(dead_spec), Some(winner_spec)) =
                    (route_spec(&routes, dead), route_spec(&routes, winner))
                else {
                    continue;
                };
                assert!(
                    !model(dead_spec) || model(winner_spec),
                    "validation says route {dead} can never match because {winner} always \
                     wins, but this request matches {dead} and not {winner}\n\
                     host {host:?}, path {path:?}, method {method}, headers {headers:?}\n\
                     manifest:\n{text}"
                );
            }
            return;
        }
    };

    let facts = RequestFacts {
        host: &host,
        path,
        method: &method,
        headers: &headers,
    };
    let found = config.routes.find(&facts).map(|r| r.name.to_string());
    let expected = routes
        .iter()
        .enumerate()
        .filter(|(_, spec)| model(spec))
        .max_by(|(i, a), (j, b)| model_rank(a).cmp(&model_rank(b)).then(j.cmp(i)))
        .map(|(i, _)| format!("r{i}"));
    assert_eq!(
        found, expected,
        "the route table picked {found:?}, the routing rules pick {expected:?}\n\
         host {host:?}, path {path:?}, method {method}, headers {headers:?}\nmanifest:\n{text}"
    );
}

fn decode_route_input(data: &[u8]) -> (Vec<RouteSpec>, RequestSpec) {
    let mut routes: Vec<RouteSpec> = Vec::new();
    let mut request = RequestSpec {
        method: b"GET".to_vec(),
        uri: b"/".to_vec(),
        headers: Vec::new(),
    };
    let mut in_request = false;
    for line in data.split(|&b| b == b'\n') {
        match line {
            b"route" => {
                in_request = false;
                if routes.len() < MAX_ROUTES {
                    routes.push(RouteSpec::default());
                }
                continue;
            }
            b"request" => {
                in_request = true;
                continue;
            }
            _ => {}
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        if in_request {
            match key {
                b"method" => request.method = value.to_vec(),
                b"uri" => request.uri = value.to_vec(),
                b"header" => {
                    let (name, value) = split_field(value);
                    request.headers.push((name.to_vec(), value.to_vec()));
                }
                _ => {}
            }
            continue;
        }
        let Some(route) = routes.last_mut() else {
            continue;
        };
        let text = || String::from_utf8_lossy(value).into_owned();
        match key {
            b"host" => route.host = Some(text()),
            b"path" => route.path = Some(text()),
            b"prefix" => route.prefix = Some(text()),
            b"method" => route.methods.get_or_insert_with(Vec::new).push(text()),
            b"methods" => {
                route.methods.get_or_insert_with(Vec::new);
            }
            b"header" => {
                let (name, value) = split_field(value);
                route.headers.insert(
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
            _ => {}
        }
    }
    (routes, request)
}

/// `name:value` split at the first `:`; without one, all name.
fn split_field(field: &[u8]) -> (&[u8], &[u8]) {
    match field.iter().position(|&b| b == b':') {
        Some(colon) => (&field[..colon], &field[colon + 1..]),
        None => (field, &[]),
    }
}

/// A manifest with one listener, one upstream and `routes` as `r0`, `r1`, ...
fn route_manifest(routes: &[RouteSpec]) -> Option<String> {
    use toml::{Table, Value};
    let table = |pairs: Vec<(&str, Value)>| -> Value {
        Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let string = |s: &str| Value::String(s.to_string());
    let mut root = Table::new();
    root.insert(
        "listener".into(),
        Value::Array(vec![table(vec![
            ("name", string("web")),
            ("listen", string("127.0.0.1:0")),
        ])]),
    );
    root.insert(
        "upstream".into(),
        table(vec![(
            "app",
            table(vec![(
                "endpoints",
                Value::Array(vec![string("127.0.0.1:9")]),
            )]),
        )]),
    );
    let mut list = Vec::with_capacity(routes.len());
    for (i, spec) in routes.iter().enumerate() {
        let mut matcher = Table::new();
        for (key, value) in [
            ("host", &spec.host),
            ("path", &spec.path),
            ("path_prefix", &spec.prefix),
        ] {
            if let Some(value) = value {
                matcher.insert(key.into(), string(value));
            }
        }
        if let Some(methods) = &spec.methods {
            let methods = methods.iter().map(|m| string(m)).collect();
            matcher.insert("methods".into(), Value::Array(methods));
        }
        if !spec.headers.is_empty() {
            let headers = spec
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), string(v)))
                .collect();
            matcher.insert("headers".into(), Value::Table(headers));
        }
        list.push(table(vec![
            ("name", string(&format!("r{i}"))),
            ("upstream", string("app")),
            ("match", Value::Table(matcher)),
        ]));
    }
    root.insert("route".into(), Value::Array(list));
    toml::to_string(&root).ok()
}

/// The route called `name` (`r<index>`).
fn route_spec<'a>(routes: &'a [RouteSpec], name: &str) -> Option<&'a RouteSpec> {
    let index: usize = name.strip_prefix('r')?.parse().ok()?;
    routes.get(index)
}

/// `(dead, winner)` from validation's "route \"DEAD\" can never match:
/// route \"WINNER\" matches every request it would ..." message.
fn shadowing_claim(message: &str) -> Option<(&str, &str)> {
    let rest = message.strip_prefix("route \"")?;
    let (dead, rest) = rest.split_once("\" can never match: route \"")?;
    let (winner, _) = rest.split_once('"')?;
    Some((dead, winner))
}

/// The model of a route's host condition: `None` for any host, else
/// `(wildcard, lower-case name)`.
fn model_host(spec: &RouteSpec) -> Option<(bool, String)> {
    match spec.host.as_deref() {
        None | Some("*") => None,
        Some(host) => {
            let host = host.to_ascii_lowercase();
            match host.strip_prefix("*.") {
                Some(suffix) => Some((true, suffix.to_string())),
                None => Some((false, host)),
            }
        }
    }
}

/// Whether a (valid) route matches, by the README's rules, written apart
/// from `route::RouteMatch`.
fn model_matches(
    spec: &RouteSpec,
    host: &str,
    path: &str,
    method: &Method,
    headers: &HeaderMap,
) -> bool {
    let host_ok = match model_host(spec) {
        None => true,
        Some((false, exact)) => host == exact,
        // `*.example.com`: at least one more label, so not `example.com` itself.
        Some((true, suffix)) => host
            .strip_suffix(suffix.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
    };
    let path_ok = match (&spec.path, &spec.prefix) {
        (Some(exact), _) => path == exact,
        // `path_prefix = "/"` matches every path, even `*` (OPTIONS).
        (None, Some(prefix)) => prefix == "/" || path.starts_with(prefix.as_str()),
        (None, None) => true,
    };
    let method_ok = spec.methods.as_ref().is_none_or(|methods| {
        methods
            .iter()
            .any(|m| m.to_ascii_uppercase() == method.as_str())
    });
    let headers_ok = spec.headers.iter().all(|(name, value)| {
        headers
            .iter()
            .any(|(n, v)| n.as_str().eq_ignore_ascii_case(name) && v.as_bytes() == value.as_bytes())
    });
    host_ok && path_ok && method_ok && headers_ok
}

/// How specific a route is, by the README's rules: host (exact over
/// wildcard over none, longer over shorter), then path (exact over prefix
/// over none, longer over shorter), then conditions (a method list counts
/// one, each header one).
fn model_rank(spec: &RouteSpec) -> ((u8, usize), (u8, usize), usize) {
    let host = match model_host(spec) {
        None => (0, 0),
        Some((true, suffix)) => (1, suffix.len()),
        Some((false, exact)) => (2, exact.len()),
    };
    let path = match (&spec.path, &spec.prefix) {
        (Some(exact), _) => (2, exact.len()),
        (None, Some(prefix)) if prefix != "/" => (1, prefix.len()),
        _ => (0, 0),
    };
    let conditions = usize::from(spec.methods.is_some()) + spec.headers.len();
    (host, path, conditions)
}

/// The in-process gateway [`request_headers`] sends through: a
/// current-thread runtime (it runs only while a request is in flight), a
/// recording origin and a gateway with one catch-all route to it.
struct Harness {
    runtime: tokio::runtime::Runtime,
    gateway: SocketAddr,
    /// The headers of the last request the origin received.
    seen: Arc<Mutex<Option<HeaderMap>>>,
}

/// Set on the origin's responses, so the client knows it was forwarded.
static ORIGIN_MARK: HeaderName = HeaderName::from_static("x-fuzz-origin");

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| match start_harness() {
        Ok(harness) => harness,
        Err(error) => panic!("cannot start the header fuzzing gateway: {error}"),
    })
}

fn start_harness() -> Result<Harness, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seen = Arc::new(Mutex::new(None));
    let origin = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let origin_addr = origin.local_addr()?;
    runtime.spawn(serve_origin(origin, seen.clone()));
    // max_fails = 0: no passive ejection, so one odd exchange cannot turn
    // the next inputs into 502s.
    let manifest = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         [upstream.origin]\nendpoints = [\"{origin_addr}\"]\npassive = {{ max_fails = 0 }}\n\
         [[route]]\nname = \"all\"\nupstream = \"origin\"\n"
    );
    let config = Config::parse(&manifest, &scratch_dir().join("headers.toml"))?;
    let gateway = runtime.block_on(crate::Gateway::bind(&config))?;
    let addr = gateway
        .local_addr("web")
        .ok_or("the gateway has no listener \"web\"")?;
    runtime.spawn(gateway.serve(std::future::pending::<()>()));
    Ok(Harness {
        runtime,
        gateway: addr,
        seen,
    })
}

async fn serve_origin(listener: tokio::net::TcpListener, seen: Arc<Mutex<Option<HeaderMap>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let _ = body.collect().await;
                    *seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(parts.headers);
                    let mut response = Response::new(Empty::<Bytes>::new());
                    response
                        .headers_mut()
                        .insert(ORIGIN_MARK.clone(), HeaderValue::from_static("1"));
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A request as [`request_headers`] sends it.
#[derive(Debug)]
struct Sent {
    http2: bool,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// Sends a request with the headers of `data` through an in-process
/// gateway (a real listener, HTTP/1.1 or h2c, and a real upstream pool, on
/// loopback) to a recording origin, and checks what the origin received.
/// The gateway, origin and runtime start on the first call and are kept.
///
/// `data` is lines (`\n`-separated, bytes taken as they are): `NAME:VALUE`
/// adds a header (split at the first `:`; a line without one is a name with
/// an empty value, so `:x` has an empty name); `@uri=TARGET` sets the
/// request target (default `/`; absolute-form works); `@method=NAME` the
/// method (default GET); `@http2` sends over HTTP/2 (h2c, prior knowledge).
/// Names or values `http` refuses are dropped, as hyper would refuse them.
/// So are `Content-Length`, `Transfer-Encoding` and `Expect`: they frame
/// the body, which hyper handles before the gateway's code sees the head;
/// and over HTTP/2 the connection-specific headers HTTP/2 forbids.
///
/// Checks, before sending: [`request_host`] lower-cases and ignores the
/// port. When the origin got the request: no hop-by-hop header reached it,
/// nor any header the client's `Connection` named (except those the gateway
/// sets afterwards); `Upgrade` passes only when asked for;
/// `X-Forwarded-For` is the client's chain plus `127.0.0.1`;
/// `X-Forwarded-Proto` is `http`; `Via` ends with this hop; `Host` is the
/// request's authority or the client's `Host`, and `X-Forwarded-Host` the
/// same. Otherwise: the gateway answered within 10 s, and not with a 5xx.
pub fn request_headers(data: &[u8]) {
    let Some(sent) = decode_header_input(data) else {
        return;
    };
    check_request_host(&sent);
    let Ok(request) = build_request(&sent) else {
        return;
    };

    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let harness = harness();
    harness
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let answer = harness.runtime.block_on(async {
        tokio::time::timeout(
            ANSWER_TIMEOUT,
            exchange(harness.gateway, request, sent.http2),
        )
        .await
    });
    let response = match answer {
        Err(_elapsed) => panic!("the gateway did not answer within {ANSWER_TIMEOUT:?}: {sent:?}"),
        // The client refused to send it or the connection broke: nothing to check.
        Ok(Err(_)) => return,
        Ok(Ok(response)) => response,
    };
    let seen = harness
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match seen {
        Some(seen) if response.headers().contains_key(&ORIGIN_MARK) => {
            check_forwarded(&sent, &seen);
        }
        _ => assert!(
            !response.status().is_server_error() || sent.method == Method::CONNECT,
            "the gateway answered {} instead of forwarding to a healthy origin: {sent:?}",
            response.status()
        ),
    }
}

fn decode_header_input(data: &[u8]) -> Option<Sent> {
    let mut http2 = false;
    let mut method = Method::GET;
    let mut uri = Uri::from_static("/");
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        if line == b"@http2" {
            http2 = true;
        } else if let Some(target) = line.strip_prefix(b"@uri=") {
            uri = Uri::try_from(target).ok()?;
        } else if let Some(name) = line.strip_prefix(b"@method=") {
            method = Method::from_bytes(name).ok()?;
        } else {
            let (name, value) = split_field(line);
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                headers.append(name, value);
            }
        }
    }
    for framing in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::EXPECT,
    ] {
        headers.remove(framing);
    }
    if http2 {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "te",
        ] {
            headers.remove(name);
        }
        if uri.authority().is_none() {
            // HTTP/2 sends :scheme and :authority; take the authority from Host.
            let authority = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| !h.is_empty() && !h.contains('@'))
                .unwrap_or("fuzz.test");
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            uri = Uri::try_from(format!("http://{authority}{path}")).ok()?;
        }
    }
    Some(Sent {
        http2,
        method,
        uri,
        headers,
    })
}

fn build_request(sent: &Sent) -> Result<Request<Empty<Bytes>>, http::Error> {
    let mut request = Request::builder()
        .method(sent.method.clone())
        .uri(sent.uri.clone())
        .version(if sent.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .body(Empty::new())?;
    *request.headers_mut() = sent.headers.clone();
    Ok(request)
}

/// One request on a new connection, closed with a reset afterwards (no
/// TIME_WAIT: a long run would otherwise use up the ephemeral ports).
async fn exchange(
    addr: SocketAddr,
    request: Request<Empty<Bytes>>,
    http2: bool,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    let io = TokioIo::new(stream);
    if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        let driver = tokio::spawn(connection);
        let response = sender.send_request(request).await;
        driver.abort();
        Ok(response?)
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        let driver = tokio::spawn(connection);
        let response = sender.send_request(request).await;
        driver.abort();
        Ok(response?)
    }
}

/// [`request_host`] ignores case and a port: the same as for the request
/// with its (single, valid, port-less) `Host` upper-cased or given a port.
fn check_request_host(sent: &Sent) {
    let host = request_host(&sent.uri, &sent.headers);
    assert!(
        !host.bytes().any(|b| b.is_ascii_uppercase()),
        "request_host kept upper case: {host:?}"
    );
    if sent.uri.authority().is_some() {
        return;
    }
    let mut hosts = sent.headers.get_all(header::HOST).iter();
    let (Some(value), None) = (hosts.next(), hosts.next()) else {
        return;
    };
    let Ok(text) = value.to_str() else {
        return;
    };
    // No port at all: not even one `Authority::port` refuses (`:80180`).
    let port_less = !text.contains(':') || (text.starts_with('[') && text.ends_with(']'));
    let plain = port_less && !text.contains('@') && http::uri::Authority::try_from(text).is_ok();
    if !plain {
        return;
    }
    for variant in [text.to_ascii_uppercase(), format!("{text}:8080")] {
        let Ok(value) = HeaderValue::from_str(&variant) else {
            continue;
        };
        let mut headers = sent.headers.clone();
        headers.insert(header::HOST, value);
        assert_eq!(
            request_host(&sent.uri, &headers),
            host,
            "Host {variant:?} routes differently from Host {text:?}"
        );
    }
}

/// Values of header `name`, without the optional whitespace around them
/// (HTTP/1 parsers drop it).
fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().trim_ascii())
        .collect()
}

/// The forwarding rules (README, "What forwarding does"), checked on what
/// the origin received for `sent`.
fn check_forwarded(sent: &Sent, seen: &HeaderMap) {
    let context = || format!("sent {sent:?}\norigin saw {seen:?}");
    // Tokens of the client's Connection header, as the gateway reads them.
    let tokens: Vec<String> = sent
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let named = |name: &str| tokens.iter().any(|t| t == name);

    for hop in ["keep-alive", "proxy-connection", "te"] {
        assert!(
            !seen.contains_key(hop),
            "hop-by-hop {hop} reached the origin\n{}",
            context()
        );
    }
    let encodings = values(seen, "transfer-encoding");
    assert!(
        encodings.iter().all(|e| e.eq_ignore_ascii_case(b"chunked")),
        "the client's transfer-encoding reached the origin\n{}",
        context()
    );

    let upgrade = sent
        .headers
        .get(header::UPGRADE)
        .filter(|_| named("upgrade"));
    match upgrade {
        Some(protocol) if !sent.http2 => {
            assert_eq!(
                values(seen, "connection"),
                [&b"upgrade"[..]],
                "{}",
                context()
            );
            assert_eq!(
                values(seen, "upgrade"),
                [protocol.as_bytes().trim_ascii()],
                "{}",
                context()
            );
        }
        _ => {
            for hop in ["connection", "upgrade"] {
                assert!(
                    !seen.contains_key(hop),
                    "{hop} reached the origin though no upgrade was asked for\n{}",
                    context()
                );
            }
        }
    }

    // What the gateway sets after removing what Connection names.
    const SET_AFTER: [&str; 9] = [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
        "connection",
        "upgrade",
        "transfer-encoding",
        "content-length",
    ];
    for token in &tokens {
        if SET_AFTER.contains(&token.as_str()) {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            assert!(
                !seen.contains_key(&name),
                "{name}, named by Connection, reached the origin\n{}",
                context()
            );
        }
    }

    assert_eq!(
        values(seen, "x-forwarded-proto"),
        [&b"http"[..]],
        "{}",
        context()
    );

    let mut chain: Vec<Vec<u8>> = Vec::new();
    if !named("x-forwarded-for") {
        for value in sent.headers.get_all("x-forwarded-for") {
            chain.extend(
                value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .map(|e| e.trim_ascii().to_vec()),
            );
        }
    }
    chain.push(b"127.0.0.1".to_vec());
    let forwarded_for = values(seen, "x-forwarded-for");
    let [forwarded_for] = forwarded_for.as_slice() else {
        panic!("not one X-Forwarded-For\n{}", context());
    };
    let got: Vec<&[u8]> = forwarded_for
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .collect();
    assert_eq!(
        got,
        chain,
        "X-Forwarded-For is not the client's chain plus the client\n{}",
        context()
    );

    let via = values(seen, "via");
    let hop: &[u8] = if sent.http2 {
        b"2 sluice"
    } else {
        b"1.1 sluice"
    };
    assert!(
        via.len() == 1 && via[0].ends_with(hop),
        "Via does not end with this hop\n{}",
        context()
    );

    let forwarded_host = values(seen, "x-forwarded-host");
    let expected: Vec<u8> = match sent.uri.authority() {
        Some(authority) => authority.as_str().as_bytes().to_vec(),
        None => match values(&sent.headers, "host").as_slice() {
            [host] => host.to_vec(),
            _ => return,
        },
    };
    assert_eq!(
        values(seen, "host"),
        [expected.as_slice()],
        "Host is not the request's authority or Host\n{}",
        context()
    );
    assert_eq!(
        forwarded_host,
        [expected.as_slice()],
        "X-Forwarded-Host is not the request's host\n{}",
        context()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_with_side_effects_are_skipped_even_through_escapes() {
        assert!(has_side_effects("[state]\nbackend = \"redis\""));
        assert!(has_side_effects("[admin]\naudit_log = \"a.jsonl\""));
        assert!(has_side_effects("[\"st\\u0061te\"]\nbackend = \"redis\""));
        assert!(has_side_effects(
            "[\"pl\\u0075gin\".x]\nsource = \"builtin:headers\""
        ));
        assert!(has_side_effects(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\"audit\\u005flog\" = \"a\""
        ));
        assert!(has_side_effects(
            "[upstream.a]\nendpoints = []\n\"b\\u0061lancer\" = \"rr\""
        ));
        assert!(has_side_effects(
            "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n\"t\\u006cs\" = []"
        ));
        assert!(has_side_effects("[\"g\\u0065o\"]\ndatabase = \"x\""));
        assert!(!has_side_effects(
            "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\""
        ));
    }

    #[test]
    fn route_inputs_decode_as_documented() {
        let (routes, request) = decode_route_input(
            b"route\nhost=*.a.com\nprefix=/v1/\nmethod=GET\nheader=x-a:1:2\nroute\nmethods=\nrequest\nmethod=POST\nuri=/v1/x\nheader=:\n",
        );
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].host.as_deref(), Some("*.a.com"));
        assert_eq!(routes[0].prefix.as_deref(), Some("/v1/"));
        assert_eq!(routes[0].methods, Some(vec!["GET".to_string()]));
        assert_eq!(
            routes[0].headers.get("x-a").map(String::as_str),
            Some("1:2")
        );
        assert_eq!(routes[1].methods, Some(vec![]));
        assert_eq!(request.method, b"POST");
        assert_eq!(request.uri, b"/v1/x");
        assert_eq!(request.headers, vec![(vec![], vec![])]);
    }
}
