//! Test backends ("origins"): HTTP/1.1 servers on `127.0.0.1:0` that count
//! the connections they accept and the requests they read, remember the last
//! request, and answer according to their [`Mode`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// The response header every origin answer carries, naming the origin.
pub const ORIGIN_HEADER: &str = "x-origin";

/// How an origin answers each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads the whole body, then answers 200 with JSON naming the origin and
    /// describing the request: `origin`, `method`, `path`, `query`,
    /// `version`, `headers` (name to comma-joined values), `body_bytes` and
    /// `body_sha256`.
    Echo,
    /// Answers 200 at once and streams the request body back as the response
    /// body, frame by frame, while the request body is still arriving.
    StreamEcho,
    /// Waits this long, then answers like [`Mode::Echo`].
    Delay(Duration),
    /// Reads the request head and never answers.
    Stall,
    /// Accepts a WebSocket upgrade (101 with `Sec-WebSocket-Accept`) and
    /// echoes every text and binary message.
    WebSocketEcho,
    /// Reads the whole body, then answers with this status and a short text body.
    Status(u16),
    /// Waits this long, then answers with the status.
    DelayedStatus(Duration, u16),
    /// Answers like [`Mode::Echo`], with these extra response headers
    /// (`Server`, `X-Powered-By`, ...: what a policy may strip or keep).
    EchoWithHeaders(&'static [(&'static str, &'static str)]),
}

/// A request as an origin saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// The request method.
    pub method: Method,
    /// The request target as received (origin-form for proxied requests).
    pub uri: Uri,
    /// The HTTP version of the hop from the gateway.
    pub version: Version,
    /// Every header as received.
    pub headers: HeaderMap,
}

/// Tasks owned by an origin, aborted when it is dropped.
#[derive(Debug, Default, Clone)]
struct Tasks(Arc<Mutex<JoinSet<()>>>);

impl Tasks {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    fn abort_all(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abort_all();
    }
}

/// State shared by an origin's handle and its connections.
#[derive(Debug)]
struct Shared {
    name: String,
    mode: Mutex<Mode>,
    connections: AtomicUsize,
    requests: AtomicUsize,
    last: Mutex<Option<SeenRequest>>,
    /// When each request head was read.
    arrivals: Mutex<Vec<std::time::Instant>>,
    arrived: Notify,
    tasks: Tasks,
}

/// A running test backend. Dropping it stops it: the listener closes and
/// every connection it holds is dropped.
#[derive(Debug)]
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// Starts an [`Origin`]; see [`Origin::builder`].
#[derive(Debug, Clone)]
pub struct OriginBuilder {
    name: String,
    mode: Mode,
    addr: SocketAddr,
}

impl OriginBuilder {
    /// Sets how the origin answers (default [`Mode::Echo`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Listens on `addr` instead of a free port: to bring back an origin
    /// that was stopped, on the address the gateway knows.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Binds (`127.0.0.1:0` unless [`addr`](Self::addr) says otherwise) and starts serving.
    pub async fn start(self) -> anyhow::Result<Origin> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: self.name,
            mode: Mutex::new(self.mode),
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            last: Mutex::new(None),
            arrivals: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            tasks: Tasks::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Origin {
            addr,
            shared,
            accept,
        })
    }
}

impl Origin {
    /// A builder for an origin called `name` (reported in every answer).
    pub fn builder(name: &str) -> OriginBuilder {
        OriginBuilder {
            name: name.to_string(),
            mode: Mode::Echo,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// Starts an origin called `name` in [`Mode::Echo`].
    pub async fn echo(name: &str) -> anyhow::Result<Origin> {
        Origin::builder(name).start().await
    }

    /// Starts an origin called `name` answering in `mode`.
    pub async fn start(name: &str, mode: Mode) -> anyhow::Result<Origin> {
        Origin::builder(name).mode(mode).start().await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes how it answers from the next request on.
    pub fn set_mode(&self, mode: Mode) {
        *self
            .shared
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Request heads read so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// When each request head was read, in order.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The most recent request it read, if any.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.shared
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until it has read at least `count` requests, up to `limit`.
    pub async fn wait_for_requests(&self, count: usize, limit: Duration) -> anyhow::Result<()> {
        let wait = async {
            loop {
                let arrived = self.shared.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if self.requests() >= count {
                    return;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(limit, wait).await.map_err(|_| {
            anyhow::anyhow!(
                "origin {} saw {} requests within {limit:?}, expected {count}",
                self.name(),
                self.requests()
            )
        })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.tasks.abort_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let conn_shared = shared.clone();
        shared.tasks.spawn(async move {
            let service = service_fn(move |req| handle(conn_shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

type OriginBody = BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> OriginBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<OriginBody>, Infallible> {
    {
        let seen = SeenRequest {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        };
        *shared.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(seen);
        shared
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(std::time::Instant::now());
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    shared.arrived.notify_waiters();

    let mode = *shared.mode.lock().unwrap_or_else(PoisonError::into_inner);
    let mut response = match mode {
        Mode::Echo => echo(&shared, req).await,
        Mode::Delay(delay) => {
            tokio::time::sleep(delay).await;
            echo(&shared, req).await
        }
        Mode::Stall => std::future::pending().await,
        Mode::StreamEcho => Response::new(req.into_body().boxed()),
        Mode::WebSocketEcho => websocket(&shared, req),
        Mode::Status(code) => answer_status(req, code).await,
        Mode::DelayedStatus(delay, code) => {
            tokio::time::sleep(delay).await;
            answer_status(req, code).await
        }
        Mode::EchoWithHeaders(extra) => {
            let mut response = echo(&shared, req).await;
            for &(name, value) in extra {
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        }
    };
    if let Ok(name) = HeaderValue::from_str(&shared.name) {
        response.headers_mut().insert(ORIGIN_HEADER, name);
    }
    Ok(response)
}

fn status(code: StatusCode, text: &'static str) -> Response<OriginBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response
}

async fn answer_status(req: Request<Incoming>, code: u16) -> Response<OriginBody> {
    let _ = req.into_body().collect().await;
    let mut response = Response::new(full(format!("status {code}\n")));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

async fn echo(shared: &Shared, req: Request<Incoming>) -> Response<OriginBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST, "request body failed\n"),
    };
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.to_string(), values.join(", ").into());
    }
    let json = serde_json::json!({
        "origin": shared.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body.len(),
        "body_sha256": hex(&Sha256::digest(&body)),
    });
    let mut response = Response::new(full(json.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn websocket(shared: &Shared, mut req: Request<Incoming>) -> Response<OriginBody> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return status(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return status(StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key\n");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    shared.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Pings and closes are answered by tungstenite while reading.
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Lower-case hex of `bytes` (used for sha256 digests).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}
