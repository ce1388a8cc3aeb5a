//! Clients: raw hyper HTTP/1.1 and HTTP/2 connections over any stream, a
//! channel-backed streaming body, and bounded waits.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The default bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Runs `future` for at most `limit`; on timeout the error says `what` was awaited.
pub async fn within<T>(
    what: &str,
    limit: Duration,
    future: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {limit:?} waiting for {what}"))
}

/// A complete response: head and collected body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: StatusCode,
    /// The HTTP version of the response.
    pub version: Version,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// Reads a response's body to the end (bounded by [`WAIT`]).
    pub async fn collect(response: Response<Incoming>) -> anyhow::Result<Reply> {
        let (parts, body) = response.into_parts();
        let body = within("the response body", WAIT, body.collect())
            .await??
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The status and at most the first 300 characters of the body, for
    /// assertion messages.
    pub fn excerpt(&self) -> String {
        let text = self.text();
        let cut: String = text.chars().take(300).collect();
        let more = if cut.len() < text.len() { "..." } else { "" };
        format!("{} {cut:?}{more}", self.status)
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }

    /// A header's value as a string, if present and valid.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Opens a TCP connection (bounded by [`WAIT`]) with `TCP_NODELAY`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = within("TCP connect", WAIT, TcpStream::connect(addr)).await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One HTTP/1.1 client connection. Dropping it closes the connection.
#[derive(Debug)]
pub struct H1<B = Full<Bytes>> {
    sender: http1::SendRequest<B>,
    driver: JoinHandle<()>,
}

impl<B> H1<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Connects to `addr` and performs the (local) HTTP/1.1 handshake.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<H1<B>> {
        H1::over(connect(addr).await?).await
    }

    /// Speaks HTTP/1.1 over an already connected stream (TCP or TLS).
    pub async fn over<I>(io: I) -> anyhow::Result<H1<B>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = within(
            "HTTP/1.1 handshake",
            WAIT,
            http1::handshake(TokioIo::new(io)),
        )
        .await??;
        let driver = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(H1 { sender, driver })
    }

    /// Sends a request; resolves with the response head (bounded by [`WAIT`]).
    pub async fn send(&mut self, request: Request<B>) -> anyhow::Result<Response<Incoming>> {
        within("the connection to be ready", WAIT, self.sender.ready()).await??;
        Ok(within("the response head", WAIT, self.sender.send_request(request)).await??)
    }

    /// Sends a request without waiting; the returned future resolves with the
    /// response head. Lets a test bound the wait itself.
    pub fn send_unbounded(
        &mut self,
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + use<B> {
        self.sender.send_request(request)
    }

    /// Sends a request and reads the whole response.
    pub async fn request(&mut self, request: Request<B>) -> anyhow::Result<Reply> {
        let response = self.send(request).await?;
        Reply::collect(response).await
    }
}

impl<B> Drop for H1<B> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One HTTP/2 client connection (prior knowledge, or after ALPN `h2`).
/// Dropping it closes the connection.
#[derive(Debug)]
pub struct H2<B = Full<Bytes>> {
    sender: http2::SendRequest<B>,
    driver: JoinHandle<()>,
}

impl<B> H2<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Connects to `addr` and speaks HTTP/2 with prior knowledge (h2c).
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<H2<B>> {
        H2::over(connect(addr).await?).await
    }

    /// Speaks HTTP/2 over an already connected stream (TCP or TLS).
    pub async fn over<I>(io: I) -> anyhow::Result<H2<B>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = within(
            "HTTP/2 handshake",
            WAIT,
            http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
        )
        .await??;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2 { sender, driver })
    }

    /// Sends a request and reads the whole response. The URI must be
    /// absolute (`http://host/path`): HTTP/2 carries the host in it.
    pub async fn request(&mut self, request: Request<B>) -> anyhow::Result<Reply> {
        within("the connection to be ready", WAIT, self.sender.ready()).await??;
        let response =
            within("the response head", WAIT, self.sender.send_request(request)).await??;
        Reply::collect(response).await
    }
}

impl<B> Drop for H2<B> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A `GET` for `path` with `Host: host` and an empty body.
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    request("GET", host, path, Bytes::new())
}

/// A request with `Host: host` and a fixed body (sent with Content-Length).
///
/// # Panics
/// When `method`, `host` or `path` is not valid in a request: a mistake in the test.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(body.into()))
        .unwrap_or_else(|e| panic!("bad test request {method} {host} {path}: {e}"))
}

/// Sends one request on a new HTTP/1.1 connection and reads the reply.
pub async fn fetch(addr: SocketAddr, request: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let mut conn = H1::connect(addr).await?;
    conn.request(request).await
}

/// `GET path` on the admin API at `addr`, with `Authorization: Bearer token` when given.
pub async fn admin_get(addr: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<Reply> {
    admin_send(addr, "GET", path, token, Bytes::new()).await
}

/// `METHOD path` with `body` on the admin API at `addr`, with
/// `Authorization: Bearer token` when given.
pub async fn admin_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> anyhow::Result<Reply> {
    let mut client: H1 = H1::connect(addr).await?;
    let mut req = request(method, "admin.test", path, body);
    if let Some(token) = token {
        req.headers_mut().insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
    }
    client.request(req).await
}

/// A request body fed from a channel: each `Bytes` sent becomes one data
/// frame; dropping the sender ends the body. It has no length, so HTTP/1.1
/// sends it chunked.
pub type ChannelBody = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A [`ChannelBody`] and the sender that feeds it (`capacity` frames buffered).
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok(Frame::data(chunk)), rx))
    });
    let boxed: BoxStream<'static, Result<Frame<Bytes>, Infallible>> = Box::pin(stream);
    (tx, StreamBody::new(boxed))
}

/// Each worker's `sluice_worker_connections` in a `/metrics` exposition,
/// by worker index, for `workers` workers.
///
/// # Panics
/// When a worker's line is missing: the gateway did not export it.
pub fn worker_connections(metrics: &str, workers: usize) -> Vec<u64> {
    (0..workers)
        .map(|worker| {
            let name = format!("sluice_worker_connections{{worker=\"{worker}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&name))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name}in:\n{metrics}"))
        })
        .collect()
}
