//! HTTP input hardening: malformed, ambiguous and abusive requests sent as
//! raw bytes (HTTP/1.x) or raw frames (HTTP/2, prior knowledge) to the real
//! gateway. Each probe asserts the exact status line (or that the
//! connection ends without an answer), what the origin received (every
//! request it parsed, so a smuggled request would show up as one of its
//! own), and that the gateway still serves a normal request afterwards.
//!
//! The origin here is a recorder rather than the harness's `Origin`: it
//! keeps every request (not only the last) with its body, and every byte
//! the gateway sent it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sluice_tests::client::{H2, connect, fetch, get};
use sluice_tests::{Manifest, TestGateway, WAIT, within};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// The recording origin

/// A request as the origin parsed it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// The request target (path and query).
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    /// The whole body, or why reading it failed; `None` while it is read.
    body: Option<Result<Vec<u8>, String>>,
}

impl Seen {
    fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }
}

#[derive(Debug, Default)]
struct RecorderState {
    seen: Mutex<Vec<Seen>>,
    /// Every byte the gateway sent, all connections in arrival order.
    raw: Mutex<Vec<u8>>,
}

/// An HTTP/1.1 origin (hyper, strict) that records every request head as
/// soon as it is parsed, then its body, and answers 200 `seen TARGET`.
struct Recorder {
    addr: SocketAddr,
    state: Arc<RecorderState>,
    accept: JoinHandle<()>,
}

impl Recorder {
    async fn start() -> anyhow::Result<Recorder> {
        // The standard library's backlog (128) overflows when the gateway
        // opens a few hundred upstream connections at once.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(RecorderState::default());
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let io = Tee {
                        inner: stream,
                        state: shared.clone(),
                    };
                    let service = service_fn(move |req| record(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                });
            }
        });
        Ok(Recorder {
            addr,
            state,
            accept,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.target).collect()
    }

    fn raw(&self) -> String {
        self.raw_since(0)
    }

    /// Bytes received from the gateway so far.
    fn raw_len(&self) -> usize {
        self.state
            .raw
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// What the gateway sent after the first `from` bytes, as text.
    fn raw_since(&self, from: usize) -> String {
        let raw = self
            .state
            .raw
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(raw.get(from..).unwrap_or_default()).into_owned()
    }

    /// Waits until at least `count` request heads arrived.
    async fn wait_for(&self, count: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.seen().len() < count {
            anyhow::ensure!(
                Instant::now() < deadline,
                "origin saw {} requests within {limit:?}, expected {count}",
                self.seen().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn record(
    state: Arc<RecorderState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |p| p.as_str().to_string());
    let index = {
        let mut seen = state.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.push(Seen {
            method: parts.method.to_string(),
            target: target.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: None,
        });
        seen.len() - 1
    };
    let body = match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(error) => Err(error.to_string()),
    };
    let failed = body.is_err();
    state.seen.lock().unwrap_or_else(PoisonError::into_inner)[index].body = Some(body);
    let mut response = Response::new(Full::new(Bytes::from(format!("seen {target}\n"))));
    if failed {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    Ok(response)
}

/// The origin's side of a connection, copying every byte read into the log.
struct Tee {
    inner: TcpStream,
    state: Arc<RecorderState>,
}

impl AsyncRead for Tee {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.state
                .raw
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Tee {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.x client

/// One response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw TCP connection to the gateway.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The gateway closed (EOF) or reset the connection.
    ended: bool,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Raw> {
        Ok(Raw {
            stream: connect(addr).await?,
            buf: Vec::new(),
            ended: false,
        })
    }

    /// Writes `bytes`. A write the gateway refused by closing is not an
    /// error: what it answered before closing is what the probe checks.
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match within("writing the probe", WAIT, self.stream.write_all(bytes)).await? {
            Ok(()) => Ok(()),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Reads more bytes; false once the connection has ended.
    async fn fill(&mut self, limit: Duration) -> anyhow::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        let mut chunk = [0u8; 16 * 1024];
        match within("the gateway's answer", limit, self.stream.read(&mut chunk)).await? {
            Ok(0) | Err(_) => {
                self.ended = true;
                Ok(false)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    /// The next response, or `None` when the connection ended without one.
    async fn response(&mut self) -> anyhow::Result<Option<RawResponse>> {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at;
            }
            if !self.fill(WAIT).await? {
                anyhow::ensure!(
                    self.buf.is_empty(),
                    "connection ended mid-response: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return Ok(None);
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse())
            .transpose()
            .context("bad content-length in the gateway's response")?
            .unwrap_or(0);
        let body_start = head_end + 4;
        while self.buf.len() < body_start + length {
            anyhow::ensure!(
                self.fill(WAIT).await?,
                "connection ended mid-body after {status_line:?}"
            );
        }
        let body = self.buf[body_start..body_start + length].to_vec();
        self.buf.drain(..body_start + length);
        Ok(Some(RawResponse {
            status_line,
            headers,
            body,
        }))
    }

    /// Whether the gateway ends the connection within `limit` (sending
    /// nothing more); false if it is still open then.
    async fn ends_within(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            match self.fill(left).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => return Ok(false),
            }
        }
        anyhow::ensure!(
            self.buf.is_empty(),
            "the gateway sent more before closing: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        Ok(true)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the gateway did with one probe.
#[derive(Debug)]
struct Answer {
    /// The status line of its response, if it sent one.
    status_line: Option<String>,
    response: Option<RawResponse>,
    /// The connection ended after the response (or without one).
    closed: bool,
}

/// Sends `probe` on a fresh connection, reads one response (if any) and
/// whether the connection then ends (within 2 s).
async fn probe(addr: SocketAddr, probe: &[u8]) -> anyhow::Result<Answer> {
    let mut conn = Raw::connect(addr).await?;
    conn.send(probe).await?;
    let response = conn.response().await?;
    let closed = conn.ends_within(Duration::from_secs(2)).await?;
    Ok(Answer {
        status_line: response.as_ref().map(|r| r.status_line.clone()),
        response,
        closed,
    })
}

/// Asserts `probe` is refused with exactly `status_line` and the
/// connection ends, and that the origin saw none of it.
async fn refused(
    gateway: &TestGateway,
    origin: &Recorder,
    label: &str,
    bytes: &[u8],
    status_line: &str,
) -> anyhow::Result<()> {
    let before = origin.seen().len();
    let raw_before = origin.raw_len();
    let answer = probe(gateway.addr("web"), bytes).await?;
    assert_eq!(
        answer.status_line.as_deref(),
        Some(status_line),
        "{label}: {answer:?}"
    );
    assert!(
        answer.closed,
        "{label}: the connection must end after refusing a malformed request"
    );
    still_serves(gateway, origin).await?;
    let seen = origin.targets();
    assert_eq!(
        &seen[before..],
        ["/still-serving"],
        "{label}: the origin must see nothing of a refused request"
    );
    // Byte for byte: one request line went upstream, the normal request's.
    let raw = origin.raw_since(raw_before);
    assert_eq!(
        raw.matches(" HTTP/1.1\r\n").count(),
        1,
        "{label}: upstream bytes: {raw:?}"
    );
    assert!(raw.starts_with("GET /still-serving "), "{label}: {raw:?}");
    Ok(())
}

/// A normal request is still served (no panic, no wedged worker), and it
/// reaches the origin as the newest request.
async fn still_serves(gateway: &TestGateway, origin: &Recorder) -> anyhow::Result<()> {
    // Anything a probe made the gateway forward arrives before this (the
    // probe's connection is finished); give a stray forward time to land.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = fetch(gateway.addr("web"), get("app.test", "/still-serving")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(
        origin.targets().last().map(String::as_str),
        Some("/still-serving")
    );
    Ok(())
}

/// One listener "web" (with `listener_extra`), one upstream, a catch-all route.
async fn gateway_with(origin: &Recorder, listener_extra: &str) -> anyhow::Result<TestGateway> {
    Manifest::simple(origin.addr(), listener_extra, "timeout = \"5s\"")
        .start()
        .await
}

fn assert_no_smuggled(origin: &Recorder, label: &str) {
    for seen in origin.seen() {
        assert!(
            !seen.target.contains("smuggled"),
            "{label}: the smuggled request reached the origin as a request of its own: {seen:?}"
        );
    }
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";

// ---------------------------------------------------------------------------
// Content-Length and Transfer-Encoding together (RFC 9112 §6.1, §6.3)

/// The gateway takes Transfer-Encoding over Content-Length, forwards the
/// chunked body without the Content-Length, and closes the client
/// connection after answering, so bytes past the chunked body are never
/// read as a request of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_read_as_chunked_and_the_connection_closes()
-> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;

    // CL.TE: Content-Length covers the smuggled request; chunked ends before it.
    let tail = format!("0\r\n\r\n{SMUGGLED}");
    let cl_te = format!(
        "POST /first HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{tail}",
        tail.len()
    );
    // The same with the headers the other way round.
    let te_cl = format!(
        "POST /first HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\
         Content-Length: {}\r\n\r\n{tail}",
        tail.len()
    );
    // TE.CL: Content-Length ends inside the chunk that carries the smuggled
    // request; chunked reads it as body data.
    let chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let te_cl_inner = format!(
        "POST /first HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4\r\n\
         Transfer-Encoding: chunked\r\n\r\n{chunk}"
    );

    for (label, probe_bytes, body) in [
        ("CL.TE", cl_te, ""),
        ("TE first", te_cl, ""),
        ("TE.CL", te_cl_inner, SMUGGLED),
    ] {
        let before = origin.seen().len();
        let raw_before = origin.raw_len();
        let answer = probe(gateway.addr("web"), probe_bytes.as_bytes()).await?;
        assert_eq!(
            answer.status_line.as_deref(),
            Some("HTTP/1.1 200 OK"),
            "{label}: {answer:?}"
        );
        let response = answer.response.as_ref().context("a response")?;
        assert_eq!(
            response.header("connection"),
            Some("close"),
            "{label}: RFC 9112 §6.1: close after a request with both CL and TE"
        );
        assert!(answer.closed, "{label}: the connection must close");
        assert_eq!(
            response.body, b"seen /first\n",
            "{label}: the answer is the origin's to /first"
        );
        still_serves(&gateway, &origin).await?;
        let seen = origin.seen();
        let targets: Vec<&str> = seen[before..].iter().map(|s| s.target.as_str()).collect();
        assert_eq!(targets, ["/first", "/still-serving"], "{label}");
        let first = &seen[before];
        assert!(
            first.header_values("content-length").is_empty(),
            "{label}: the Content-Length must be removed before forwarding: {first:?}"
        );
        assert_eq!(
            first.body,
            Some(Ok(body.as_bytes().to_vec())),
            "{label}: the origin reads the body the gateway read"
        );
        assert_no_smuggled(&origin, label);
        if body.is_empty() {
            // Past the chunked body: never forwarded at all, not even as data.
            let raw = origin.raw_since(raw_before);
            assert!(!raw.contains("smuggled"), "{label}: {raw:?}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Content-Length values

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_or_malformed_content_length_is_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    for (label, lengths) in [
        ("two different values", &["5", "6"][..]),
        ("a sign", &["+5"]),
        ("a negative value", &["-1"]),
        ("a list in one line", &["5, 6"]),
        ("a repeated list in one line", &["5, 5"]),
        ("hex with a leading space", &[" 0x10"]),
        ("digits and letters", &["5a"]),
        ("an overflowing value", &["99999999999999999999999"]),
        ("an empty value", &[""]),
    ] {
        let mut head = String::from("POST /cl HTTP/1.1\r\nHost: app.test\r\n");
        for length in lengths {
            head.push_str(&format!("Content-Length: {length}\r\n"));
        }
        let bytes = format!("{head}\r\nhello{SMUGGLED}");
        refused(
            &gateway,
            &origin,
            label,
            bytes.as_bytes(),
            "HTTP/1.1 400 Bad Request",
        )
        .await?;
    }
    assert_no_smuggled(&origin, "content-length");
    Ok(())
}

/// Two identical Content-Length lines are one length: the request is
/// forwarded with a single Content-Length, and the next request on the
/// connection starts right after the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_identical_content_length_is_one_length() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let mut conn = Raw::connect(gateway.addr("web")).await?;
    conn.send(
        b"POST /dup HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n\
          helloGET /next HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .await?;
    let first = conn.response().await?.context("an answer to /dup")?;
    assert_eq!(first.status_line, "HTTP/1.1 200 OK");
    assert_eq!(first.body, b"seen /dup\n");
    let second = conn.response().await?.context("an answer to /next")?;
    assert_eq!(second.status_line, "HTTP/1.1 200 OK");
    assert_eq!(second.body, b"seen /next\n");

    let seen = origin.seen();
    assert_eq!(origin.targets(), ["/dup", "/next"]);
    assert_eq!(seen[0].header_values("content-length"), ["5"]);
    assert_eq!(seen[0].body, Some(Ok(b"hello".to_vec())));
    assert_eq!(seen[1].body, Some(Ok(Vec::new())));
    still_serves(&gateway, &origin).await
}

// ---------------------------------------------------------------------------
// Transfer-Encoding values

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encodings_other_than_a_final_chunked_are_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let body = format!("5\r\nhello\r\n0\r\n\r\n{SMUGGLED}");
    for (label, version, encodings, status) in [
        (
            "chunked, identity",
            "1.1",
            &["chunked, identity"][..],
            "HTTP/1.1 400 Bad Request",
        ),
        ("xchunked", "1.1", &["xchunked"], "HTTP/1.1 400 Bad Request"),
        ("chunkedx", "1.1", &["chunkedx"], "HTTP/1.1 400 Bad Request"),
        (
            "chunked then identity on two lines",
            "1.1",
            &["chunked", "identity"],
            "HTTP/1.1 400 Bad Request",
        ),
        ("identity", "1.1", &["identity"], "HTTP/1.1 400 Bad Request"),
        // RFC 9112 §6.1: chunked at most once.
        (
            "chunked, chunked",
            "1.1",
            &["chunked, chunked"],
            "HTTP/1.1 400 Bad Request",
        ),
        (
            "chunked on two lines",
            "1.1",
            &["chunked", "chunked"],
            "HTTP/1.1 400 Bad Request",
        ),
        // RFC 9112 §6.1: a transfer coding the server does not understand: 501.
        // The gateway cannot decode gzip, so it must not forward the bytes as
        // if they were the body.
        (
            "gzip, chunked",
            "1.1",
            &["gzip, chunked"],
            "HTTP/1.1 501 Not Implemented",
        ),
        // HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1).
        (
            "TE on HTTP/1.0",
            "1.0",
            &["chunked"],
            "HTTP/1.1 400 Bad Request",
        ),
    ] {
        let mut head = format!("POST /te HTTP/{version}\r\nHost: app.test\r\n");
        for encoding in encodings {
            head.push_str(&format!("Transfer-Encoding: {encoding}\r\n"));
        }
        let bytes = format!("{head}\r\n{body}");
        refused(&gateway, &origin, label, bytes.as_bytes(), status).await?;
    }
    assert_no_smuggled(&origin, "transfer-encoding");
    Ok(())
}

/// Transfer codings are case-insensitive: `CHUNKED` is chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_in_capitals_is_chunked() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let answer = probe(
        gateway.addr("web"),
        b"POST /caps HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: CHUNKED\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await?;
    assert_eq!(
        answer.status_line.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "{answer:?}"
    );
    let seen = origin.seen();
    assert_eq!(origin.targets(), ["/caps"]);
    assert_eq!(seen[0].body, Some(Ok(b"hello".to_vec())));
    still_serves(&gateway, &origin).await
}

// ---------------------------------------------------------------------------
// Chunked framing errors

/// A chunked body the gateway cannot parse ends the exchange with 400 and
/// the connection: the origin may have seen the request head (the body is
/// streamed), but never a complete body and never the bytes after it as a
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_chunked_framing_is_refused_and_closes() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;

    let long_extension = format!(";ext={}", "e".repeat(2000));
    let extension_abuse: String = (0..12)
        .map(|_| format!("1{long_extension}\r\nx\r\n"))
        .collect::<String>()
        + "0\r\n\r\n";
    let chunks: Vec<(&str, String)> = vec![
        ("a non-hex size", "zz\r\nhello\r\n0\r\n\r\n".into()),
        ("an empty size", "\r\nhello\r\n0\r\n\r\n".into()),
        (
            "an overflowing size",
            "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("a negative size", "-5\r\nhello\r\n0\r\n\r\n".into()),
        ("a 0x prefix", "0x5\r\nhello\r\n0\r\n\r\n".into()),
        (
            "no CRLF after the data",
            "5\r\nhelloXX5\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("a bare LF after the size", "5\nhello\r\n0\r\n\r\n".into()),
        ("a bare LF after the data", "5\r\nhello\n0\r\n\r\n".into()),
        (
            "a bare LF in an extension",
            "5;a=b\nc\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("more than 16 KiB of chunk extensions", extension_abuse),
    ];
    for (label, chunked) in chunks {
        let before = origin.seen().len();
        let bytes = format!(
            "POST /chunked HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
             {chunked}{SMUGGLED}"
        );
        let answer = probe(gateway.addr("web"), bytes.as_bytes()).await?;
        assert_eq!(
            answer.status_line.as_deref(),
            Some("HTTP/1.1 400 Bad Request"),
            "{label}: {answer:?}"
        );
        assert!(answer.closed, "{label}: the connection must end");
        still_serves(&gateway, &origin).await?;
        let seen = origin.seen();
        let probe_seen = &seen[before..seen.len() - 1];
        for request in probe_seen {
            assert_eq!(request.target, "/chunked", "{label}: {probe_seen:?}");
            assert!(
                !matches!(request.body, Some(Ok(_))),
                "{label}: the origin must not get a complete body: {request:?}"
            );
        }
        assert!(probe_seen.len() <= 1, "{label}: {probe_seen:?}");
        assert_no_smuggled(&origin, label);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Header syntax

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_header_lines_are_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    for (label, headers) in [
        ("obs-fold with a space", "X-A: one\r\n two\r\n"),
        ("obs-fold with a tab", "X-A: one\r\n\ttwo\r\n"),
        (
            "obs-fold continuing Transfer-Encoding",
            "Transfer-Encoding: identity\r\n chunked\r\n",
        ),
        ("a space before the colon", "X-A : one\r\n"),
        (
            "a space before the colon of Transfer-Encoding",
            "Transfer-Encoding : chunked\r\n",
        ),
        (
            "a space before the colon of Content-Length",
            "Content-Length : 5\r\n",
        ),
        ("a tab before the colon", "X-A\t: one\r\n"),
        ("a control character in the name", "X\x01A: one\r\n"),
        ("a NUL in the name", "X\0A: one\r\n"),
        ("a NUL in the value", "X-A: one\0two\r\n"),
        ("a bare CR in the value", "X-A: one\rtwo\r\n"),
        ("a DEL in the value", "X-A: one\x7ftwo\r\n"),
        ("a line without a colon", "X-A one\r\n"),
        ("an empty name", ": one\r\n"),
    ] {
        let bytes = format!("POST /h HTTP/1.1\r\nHost: app.test\r\n{headers}\r\n{SMUGGLED}");
        refused(
            &gateway,
            &origin,
            label,
            bytes.as_bytes(),
            "HTTP/1.1 400 Bad Request",
        )
        .await?;
    }
    for (label, line) in [
        ("a space in the target", "GET /a b HTTP/1.1"),
        ("two spaces after the method", "GET  /a HTTP/1.1"),
        ("a tab as a delimiter", "GET\t/a HTTP/1.1"),
        ("a lowercase version", "GET /a http/1.1"),
        ("an unknown version", "GET /a HTTP/1.2"),
        ("a NUL in the target", "GET /a\0b HTTP/1.1"),
    ] {
        let bytes = format!("{line}\r\nHost: app.test\r\n\r\n");
        refused(
            &gateway,
            &origin,
            label,
            bytes.as_bytes(),
            "HTTP/1.1 400 Bad Request",
        )
        .await?;
    }
    Ok(())
}

/// A bare LF ends a line (RFC 9112 §2.2 allows a recipient to accept it).
/// Where that matters is whether the gateway and the origin agree on the
/// framing: the gateway writes the request anew with CRLF, so the origin
/// sees exactly what the gateway parsed, one request with its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_line_endings_are_normalised_before_forwarding() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let mut conn = Raw::connect(gateway.addr("web")).await?;
    conn.send(
        b"POST /lf HTTP/1.1\nHost: app.test\nX-A: one\nContent-Length: 5\n\nhello\
          GET /after-lf HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .await?;
    let first = conn.response().await?.context("an answer to /lf")?;
    assert_eq!(first.status_line, "HTTP/1.1 200 OK");
    let second = conn.response().await?.context("an answer to /after-lf")?;
    assert_eq!(second.status_line, "HTTP/1.1 200 OK");
    let seen = origin.seen();
    assert_eq!(origin.targets(), ["/lf", "/after-lf"]);
    assert_eq!(seen[0].header_values("x-a"), ["one"]);
    assert_eq!(seen[0].body, Some(Ok(b"hello".to_vec())));
    let raw = origin.raw();
    assert!(
        !raw.replace("\r\n", "").contains('\n'),
        "the gateway must forward CRLF line endings only: {raw:?}"
    );
    still_serves(&gateway, &origin).await
}

// ---------------------------------------------------------------------------
// Host and the request target

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_wins_over_a_disagreeing_host() -> anyhow::Result<()> {
    let app = Recorder::start().await?;
    let other = Recorder::start().await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .upstream("app", &[app.addr()], "timeout = \"5s\"")
        .upstream("other", &[other.addr()], "timeout = \"5s\"")
        .route("other", r#"{ host = "other.test" }"#, "other", "")
        .route("all", "{}", "app", "")
        .start()
        .await?;
    let answer = probe(
        gateway.addr("web"),
        b"GET http://other.test/abs HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(
        answer.status_line.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "{answer:?}"
    );
    // RFC 9112 §3.2.2: the target's authority replaces Host, for routing
    // and for what is forwarded.
    assert_eq!(other.targets(), ["/abs"]);
    let seen = &other.seen()[0];
    assert_eq!(seen.header_values("host"), ["other.test"]);
    assert_eq!(seen.header_values("x-forwarded-host"), ["other.test"]);
    assert_eq!(seen.method, "GET");

    // The other way round: the Host names the other route, the target does not.
    let answer = probe(
        gateway.addr("web"),
        b"GET http://app.test/abs2 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(
        answer.status_line.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "{answer:?}"
    );
    assert_eq!(app.targets(), ["/abs2"]);
    assert_eq!(app.seen()[0].header_values("host"), ["app.test"]);
    assert_eq!(other.targets(), ["/abs"], "nothing more for other.test");
    still_serves(&gateway, &app).await
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without
/// Host, with more than one Host line, or with an invalid Host value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_duplicate_or_invalid_host_is_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    for (label, head) in [
        ("no Host on HTTP/1.1", "GET /nohost HTTP/1.1\r\n"),
        (
            "no Host on HTTP/1.1, absolute form",
            "GET http://app.test/nohost HTTP/1.1\r\n",
        ),
        (
            "two Host lines",
            "GET /twohosts HTTP/1.1\r\nHost: app.test\r\nHost: evil.test\r\n",
        ),
        (
            "two identical Host lines",
            "GET /twohosts HTTP/1.1\r\nHost: app.test\r\nHost: app.test\r\n",
        ),
        (
            "a Host list",
            "GET /hostlist HTTP/1.1\r\nHost: app.test, evil.test\r\n",
        ),
        (
            "a Host with a path",
            "GET /hostpath HTTP/1.1\r\nHost: app.test/evil\r\n",
        ),
        (
            "a Host with a space",
            "GET /hostspace HTTP/1.1\r\nHost: app.test evil.test\r\n",
        ),
        (
            "a Host with userinfo",
            "GET /hostuser HTTP/1.1\r\nHost: user@app.test\r\n",
        ),
        (
            "an absolute target with userinfo",
            "GET http://user@app.test/abs HTTP/1.1\r\nHost: app.test\r\n",
        ),
    ] {
        let bytes = format!("{head}\r\n");
        refused(
            &gateway,
            &origin,
            label,
            bytes.as_bytes(),
            "HTTP/1.1 400 Bad Request",
        )
        .await?;
    }
    Ok(())
}

/// HTTP/1.0 has no Host requirement: such a request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_without_host_is_served() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let answer = probe(gateway.addr("web"), b"GET /old HTTP/1.0\r\n\r\n").await?;
    assert_eq!(
        answer.status_line.as_deref(),
        Some("HTTP/1.0 200 OK"),
        "{answer:?}"
    );
    assert!(answer.closed, "HTTP/1.0 without keep-alive closes");
    assert_eq!(origin.targets(), ["/old"]);
    still_serves(&gateway, &origin).await
}

// ---------------------------------------------------------------------------
// Sizes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_line_and_headers_are_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "max_header_bytes = \"8KiB\"\nmax_headers = 20").await?;

    // A request line longer than max_header_bytes: hyper's read buffer
    // fills before the line ends, so it is a too-large head (431), not 414.
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "a".repeat(9000)
    );
    refused(
        &gateway,
        &origin,
        "a 9000-byte request target",
        long_target.as_bytes(),
        "HTTP/1.1 431 Request Header Fields Too Large",
    )
    .await?;

    let big_header = format!(
        "GET /big HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    refused(
        &gateway,
        &origin,
        "a 9000-byte header",
        big_header.as_bytes(),
        "HTTP/1.1 431 Request Header Fields Too Large",
    )
    .await?;

    let many: String = (0..25).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let many_headers = format!("GET /many HTTP/1.1\r\nHost: app.test\r\n{many}\r\n");
    refused(
        &gateway,
        &origin,
        "26 headers with max_headers = 20",
        many_headers.as_bytes(),
        "HTTP/1.1 431 Request Header Fields Too Large",
    )
    .await?;

    // At the limits: 20 header lines in all, a head under 8 KiB.
    let fine: String = (0..17).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let fine = format!(
        "GET /fine HTTP/1.1\r\nHost: app.test\r\n{fine}X-Pad: {}\r\nConnection: close\r\n\r\n",
        "p".repeat(6000)
    );
    let answer = probe(gateway.addr("web"), fine.as_bytes()).await?;
    assert_eq!(
        answer.status_line.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "{answer:?}"
    );
    Ok(())
}

/// hyper answers 414 only for a target longer than 65534 bytes that fits
/// in the read buffer, i.e. with max_header_bytes above 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_longer_than_64k_gets_414_when_the_head_limit_allows_it() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "max_header_bytes = \"128KiB\"").await?;
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "a".repeat(70_000)
    );
    refused(
        &gateway,
        &origin,
        "a 70000-byte request target",
        long_target.as_bytes(),
        "HTTP/1.1 414 URI Too Long",
    )
    .await
}

// ---------------------------------------------------------------------------
// Slow clients

/// Slowloris: a head trickled a byte every 200 ms is cut at
/// header_read_timeout (1 s) however steadily bytes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_head_is_cut_at_header_read_timeout() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "header_read_timeout = \"1s\"").await?;
    let stream = connect(gateway.addr("web")).await?;
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let head = b"GET /slow HTTP/1.1\r\nHost: app.test\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'z')) {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut received = Vec::new();
    let read = within(
        "the gateway to cut a trickled head",
        Duration::from_secs(5),
        read.read_to_end(&mut received),
    )
    .await;
    trickle.abort();
    let elapsed = started.elapsed();
    assert!(
        read.is_ok(),
        "still open after {elapsed:?} of trickling: no slowloris guard"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "cut after {elapsed:?}; header_read_timeout is 1s"
    );
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408 "),
        "nothing but a 408 may be sent: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(origin.seen().is_empty());
    still_serves(&gateway, &origin).await
}

// ---------------------------------------------------------------------------
// HTTP/2 (h2c, prior knowledge), raw frames

const DATA: u8 = 0x0;
const WINDOW_UPDATE: u8 = 0x8;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes: [u8; 4] = self.payload.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_be_bytes(bytes))
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A request header block: `:method`, `:scheme http`, `:path`,
/// `:authority app.test`, then `extra` as literals without indexing.
fn request_block(method: &str, path: &str, extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    match method {
        "GET" => out.push(0x82),
        "POST" => out.push(0x83),
        other => {
            hpack_int(&mut out, 0, 4, 2);
            hpack_str(&mut out, other.as_bytes());
        }
    }
    out.push(0x86);
    hpack_int(&mut out, 0, 4, 4);
    hpack_str(&mut out, path.as_bytes());
    hpack_int(&mut out, 0, 4, 1);
    hpack_str(&mut out, b"app.test");
    for (name, value) in extra {
        out.push(0);
        hpack_str(&mut out, name);
        hpack_str(&mut out, value);
    }
    out
}

/// A raw HTTP/2 connection: preface and SETTINGS exchanged.
struct H2Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server's SETTINGS.
    settings: Vec<(u16, u32)>,
}

impl H2Raw {
    async fn connect(addr: SocketAddr) -> anyhow::Result<H2Raw> {
        H2Raw::connect_with(addr, &[]).await
    }

    /// [`H2Raw::connect`], announcing these SETTINGS of the client's.
    async fn connect_with(addr: SocketAddr, settings: &[(u16, u32)]) -> anyhow::Result<H2Raw> {
        let mut stream = connect(addr).await?;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
            .collect();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        stream.write_all(&hello).await?;
        let mut conn = H2Raw {
            stream,
            buf: Vec::new(),
            settings: Vec::new(),
        };
        loop {
            let f = conn
                .frame(WAIT)
                .await?
                .context("closed during the HTTP/2 handshake")?;
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                conn.settings = f
                    .payload
                    .chunks_exact(6)
                    .map(|s| {
                        (
                            u16::from_be_bytes([s[0], s[1]]),
                            u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                        )
                    })
                    .collect();
                conn.send(&frame(SETTINGS, ACK, 0, &[])).await?;
                return Ok(conn);
            }
        }
    }

    fn setting(&self, id: u16) -> Option<u32> {
        self.settings
            .iter()
            .find(|(s, _)| *s == id)
            .map(|(_, v)| *v)
    }

    /// Writes `bytes`; a connection the gateway already closed is not an error.
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match within("writing frames", WAIT, self.stream.write_all(bytes)).await? {
            Ok(()) => Ok(()),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The next frame; `None` once the connection ended.
    async fn frame(&mut self, limit: Duration) -> anyhow::Result<Option<Frame>> {
        let deadline = Instant::now() + limit;
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Ok(Some(f));
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match within("an HTTP/2 frame", left, self.stream.read(&mut chunk)).await? {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until the connection ends (or `limit`, an error).
    async fn frames_until_closed(&mut self, limit: Duration) -> anyhow::Result<Vec<Frame>> {
        let deadline = Instant::now() + limit;
        let mut frames = Vec::new();
        while let Some(f) = self
            .frame(deadline.saturating_duration_since(Instant::now()))
            .await?
        {
            frames.push(f);
        }
        Ok(frames)
    }
}

/// A normal HTTP/2 request is served after the abuse, on a new connection.
async fn still_serves_h2(gateway: &TestGateway, origin: &Recorder) -> anyhow::Result<()> {
    let mut client: H2 = H2::connect(gateway.addr("web")).await?;
    let reply = client
        .request(http::Request::get("http://app.test/still-serving-h2").body(Full::default())?)
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(
        origin.targets().last().map(String::as_str),
        Some("/still-serving-h2")
    );
    still_serves(gateway, origin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_settings_announce_the_limits() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "max_header_bytes = \"8KiB\"").await?;
    let conn = H2Raw::connect(gateway.addr("web")).await?;
    assert_eq!(
        conn.setting(SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(256),
        "{:?}",
        conn.settings
    );
    assert_eq!(
        conn.setting(SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(8192),
        "{:?}",
        conn.settings
    );
    Ok(())
}

/// Streams past SETTINGS_MAX_CONCURRENT_STREAMS are refused with
/// REFUSED_STREAM, and never reach the origin; the open ones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_past_max_concurrent_streams_are_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let mut conn = H2Raw::connect(gateway.addr("web")).await?;
    let max = conn
        .setting(SETTINGS_MAX_CONCURRENT_STREAMS)
        .context("no SETTINGS_MAX_CONCURRENT_STREAMS")?;
    let extra = 20;
    // Every stream sends its head and keeps its body open, so none ends.
    let mut burst = Vec::new();
    for i in 0..max + extra {
        let id = 2 * i + 1;
        let block = request_block("POST", &format!("/open/{id}"), &[]);
        burst.extend(frame(HEADERS, END_HEADERS, id, &block));
    }
    conn.send(&burst).await?;

    let mut refused = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.len() < extra as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = conn
            .frame(left)
            .await?
            .context("connection closed instead of refusing streams")?;
        assert_ne!(f.kind, GOAWAY, "GOAWAY instead of refusing streams: {f:?}");
        if f.kind == RST_STREAM {
            assert_eq!(f.code(), Some(REFUSED_STREAM), "{f:?}");
            refused.push(f.stream);
        }
    }
    let expected: Vec<u32> = (max..max + extra).map(|i| 2 * i + 1).collect();
    assert_eq!(refused, expected, "exactly the streams past the limit");
    origin
        .wait_for(max as usize, Duration::from_secs(5))
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = origin.targets();
    assert_eq!(
        seen.len(),
        max as usize,
        "only the admitted streams reach the origin"
    );
    for id in &refused {
        assert!(
            !seen.contains(&format!("/open/{id}")),
            "stream {id} was refused"
        );
    }
    drop(conn);
    still_serves_h2(&gateway, &origin).await
}

/// Rapid reset (CVE-2023-44487): streams opened and reset at once in a
/// flood. The gateway ends the connection with GOAWAY ENHANCE_YOUR_CALM
/// and forwards only a bounded number of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_flood_gets_goaway() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let mut conn = H2Raw::connect(gateway.addr("web")).await?;
    let streams: u32 = 2000;
    let mut burst = Vec::new();
    for i in 0..streams {
        let id = 2 * i + 1;
        let block = request_block("GET", "/reset", &[]);
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    conn.send(&burst).await?;
    let frames = conn.frames_until_closed(Duration::from_secs(5)).await?;
    let goaway = frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .with_context(|| format!("no GOAWAY; {} frames", frames.len()))?;
    assert_eq!(goaway.code(), Some(ENHANCE_YOUR_CALM), "{goaway:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let forwarded = origin.seen().len();
    assert!(
        forwarded < 100,
        "{forwarded} of {streams} reset streams were forwarded"
    );
    still_serves_h2(&gateway, &origin).await
}

/// Streams the server has to reset for a protocol error, in a flood
/// ("MadeYouReset", CVE-2025-8671): bounded by max_local_error_reset_streams
/// (hyper's default, 1024), then GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_server_reset_flood_gets_goaway() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let mut conn = H2Raw::connect(gateway.addr("web")).await?;
    let streams: u32 = 1500;
    let mut burst = Vec::new();
    for i in 0..streams {
        let id = 2 * i + 1;
        // An uppercase field name makes the request malformed: a stream
        // error, so the server resets the stream (RFC 9113 §8.2.1).
        let block = request_block("GET", "/made-you-reset", &[(b"connection", b"close")]);
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
    }
    conn.send(&burst).await?;
    let frames = conn.frames_until_closed(Duration::from_secs(8)).await?;
    let goaway = frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .with_context(|| format!("no GOAWAY; {} frames", frames.len()))?;
    assert_eq!(goaway.code(), Some(ENHANCE_YOUR_CALM), "{goaway:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        origin.seen().is_empty(),
        "malformed requests must not be forwarded: {:?}",
        origin.targets()
    );
    still_serves_h2(&gateway, &origin).await
}

/// CONTINUATION flood (CVE-2024-27316 class): a header block that never
/// ends is cut with GOAWAY, not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_gets_goaway() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "max_header_bytes = \"8KiB\"").await?;
    let mut conn = H2Raw::connect(gateway.addr("web")).await?;
    let mut block = request_block("GET", "/continuation", &[]);
    block.push(0);
    hpack_str(&mut block, b"x-flood");
    hpack_int(&mut block, 0, 7, 50_000_000);
    let mut burst = frame(HEADERS, 0, 1, &block);
    let filler = vec![b'a'; 16_000];
    for _ in 0..400 {
        burst.extend(frame(CONTINUATION, 0, 1, &filler));
    }
    conn.send(&burst).await?;
    let frames = conn.frames_until_closed(Duration::from_secs(5)).await?;
    let goaway = frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .with_context(|| format!("no GOAWAY; {frames:?}"))?;
    assert!(
        matches!(
            goaway.code(),
            Some(ENHANCE_YOUR_CALM | COMPRESSION_ERROR | PROTOCOL_ERROR)
        ),
        "{goaway:?}"
    );
    assert!(origin.seen().is_empty());
    still_serves_h2(&gateway, &origin).await
}

/// HTTP/2 to HTTP/1.1 downgrade smuggling (H2.TE, H2.CL, CRLF injection):
/// each malformed request is reset and nothing reaches the origin as a
/// request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_downgrade_smuggling_is_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "").await?;
    let smuggle_body = format!("0\r\n\r\n{SMUGGLED}");
    type Case<'a> = (&'a str, Vec<(&'a [u8], &'a [u8])>, Option<&'a [u8]>, u8);
    let cases: Vec<Case> = vec![
        (
            "transfer-encoding: chunked",
            vec![(b"transfer-encoding", b"chunked")],
            Some(smuggle_body.as_bytes()),
            RST_STREAM,
        ),
        (
            "connection: keep-alive",
            vec![(b"connection", b"keep-alive")],
            None,
            RST_STREAM,
        ),
        (
            "content-length shorter than the DATA",
            vec![(b"content-length", b"0")],
            Some(SMUGGLED.as_bytes()),
            RST_STREAM,
        ),
        (
            "CRLF in a header value",
            vec![(b"x-a", b"one\r\nTransfer-Encoding: chunked")],
            None,
            GOAWAY,
        ),
        (
            "LF in a header value",
            vec![(b"x-a", b"one\nX-B: two")],
            None,
            GOAWAY,
        ),
        (
            "NUL in a header value",
            vec![(b"x-a", b"one\0two")],
            None,
            GOAWAY,
        ),
        (
            "an uppercase header name",
            vec![(b"X-Upper", b"one")],
            None,
            GOAWAY,
        ),
        (
            "a space in a header name",
            vec![(b"x a", b"one")],
            None,
            GOAWAY,
        ),
        (
            "a colon in a header name",
            vec![(b"x:a", b"one")],
            None,
            GOAWAY,
        ),
    ];
    for (index, (label, extra, body, expected)) in cases.into_iter().enumerate() {
        let before = origin.seen().len();
        let mut conn = H2Raw::connect(gateway.addr("web")).await?;
        let id = 1;
        let block = request_block("POST", &format!("/h2smuggle/{index}"), &extra);
        let mut bytes = frame(
            HEADERS,
            END_HEADERS | if body.is_none() { END_STREAM } else { 0 },
            id,
            &block,
        );
        if let Some(body) = body {
            bytes.extend(frame(DATA, END_STREAM, id, body));
        }
        conn.send(&bytes).await?;
        let mut reset = None;
        let deadline = Instant::now() + Duration::from_secs(3);
        while reset.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(f) = conn.frame(left).await? else {
                break;
            };
            match f.kind {
                RST_STREAM if f.stream == id => reset = Some((RST_STREAM, f.code())),
                GOAWAY => reset = Some((GOAWAY, f.code())),
                HEADERS if f.stream == id => {
                    // The status is HPACK-coded; 0x88 is the static ":status 200".
                    assert_ne!(
                        f.payload.first(),
                        Some(&0x88),
                        "{label}: the malformed request was answered 200"
                    );
                }
                _ => {}
            }
        }
        // A malformed message is a stream error; a field the HPACK decoder
        // cannot make a header of ends the connection.
        assert_eq!(reset, Some((expected, Some(PROTOCOL_ERROR))), "{label}");
        drop(conn);
        still_serves(&gateway, &origin).await?;
        let seen = origin.seen();
        let probe_seen = &seen[before..seen.len() - 1];
        assert!(
            probe_seen.is_empty(),
            "{label}: a malformed HTTP/2 request reached the origin: {probe_seen:?}"
        );
        assert_no_smuggled(&origin, label);
    }
    assert!(!origin.raw().contains("smuggled"));
    Ok(())
}

/// A header list over max_header_bytes is refused (431) and not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_oversized_header_list_is_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "max_header_bytes = \"8KiB\"").await?;
    let mut client: H2 = H2::connect(gateway.addr("web")).await?;
    let mut req = http::Request::get("http://app.test/big-h2").body(Full::default())?;
    req.headers_mut()
        .insert("x-big", HeaderValue::from_bytes(&vec![b'b'; 9000])?);
    let reply = client.request(req).await?;
    assert_eq!(reply.status, 431, "{}", reply.excerpt());
    assert!(origin.seen().is_empty());
    still_serves_h2(&gateway, &origin).await
}

/// max_headers applies to HTTP/2 as to HTTP/1.1: more header fields than
/// that is 431, even when they fit in max_header_bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_too_many_headers_are_refused() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, "max_headers = 20").await?;
    let mut client: H2 = H2::connect(gateway.addr("web")).await?;
    let mut req = http::Request::get("http://app.test/many-h2").body(Full::default())?;
    for i in 0..25 {
        req.headers_mut().insert(
            format!("x-h{i}").parse::<http::HeaderName>()?,
            HeaderValue::from(i),
        );
    }
    let reply = client.request(req).await?;
    assert_eq!(reply.status, 431, "{}", reply.excerpt());
    assert!(origin.seen().is_empty());

    // 20 fields are fine.
    let mut req = http::Request::get("http://app.test/twenty-h2").body(Full::default())?;
    for i in 0..20 {
        req.headers_mut().insert(
            format!("x-h{i}").parse::<http::HeaderName>()?,
            HeaderValue::from(i),
        );
    }
    let reply = client.request(req).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(origin.targets(), ["/twenty-h2"]);
    still_serves_h2(&gateway, &origin).await
}

// ---------------------------------------------------------------------------
// Slow request bodies (body_read_timeout)

/// The slow-body tests' listener: a 1 s body timeout, the head's out of the way.
const BODY_TIMEOUT: &str = "body_read_timeout = \"1s\"\nheader_read_timeout = \"10s\"";

/// How the origin's read of the body of the request for `target` ended:
/// `None` if that request never reached it. A request that reached it must
/// end (the gateway closed the upstream connection) within a few seconds.
async fn origin_body(
    origin: &Recorder,
    target: &str,
) -> anyhow::Result<Option<Result<Vec<u8>, String>>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let seen = origin.seen().into_iter().find(|s| s.target == target);
        match seen {
            Some(Seen {
                body: Some(body), ..
            }) => return Ok(Some(body)),
            None if Instant::now() >= deadline => return Ok(None),
            Some(_) if Instant::now() >= deadline => {
                anyhow::bail!(
                    "the origin is still reading {target}'s body: the upstream request was not aborted"
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Sends `head_and_part` (a request whose body stops short), then nothing:
/// the gateway answers 408 between 1 s (body_read_timeout) and 3 s later,
/// closes the connection, and the origin never gets the whole body.
async fn stalled_body_gets_408(
    gateway: &TestGateway,
    origin: &Recorder,
    label: &str,
    target: &str,
    head_and_part: &[u8],
) -> anyhow::Result<()> {
    let mut conn = Raw::connect(gateway.addr("web")).await?;
    conn.send(head_and_part).await?;
    let started = Instant::now();
    let response = conn.response().await?;
    let elapsed = started.elapsed();
    let response = response.with_context(|| format!("{label}: closed without an answer"))?;
    assert_eq!(
        response.status_line, "HTTP/1.1 408 Request Timeout",
        "{label}: {response:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{label}: answered after {elapsed:?}; body_read_timeout is 1s"
    );
    assert_eq!(response.header("connection"), Some("close"), "{label}");
    assert!(
        conn.ends_within(Duration::from_secs(2)).await?,
        "{label}: the connection must close after a stalled body"
    );
    if let Some(Ok(body)) = origin_body(origin, target).await? {
        panic!(
            "{label}: the origin got a complete request, body {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    still_serves(gateway, origin).await
}

/// Content-Length 100, 10 bytes sent, then silence: 408 at body_read_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_stalled_short_of_its_content_length_gets_408() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, BODY_TIMEOUT).await?;
    stalled_body_gets_408(
        &gateway,
        &origin,
        "Content-Length 100, 10 bytes sent",
        "/stall-length",
        b"POST /stall-length HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
}

/// A chunked body stalled in the middle of a chunk: 408 at body_read_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_stalled_mid_chunk_gets_408() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, BODY_TIMEOUT).await?;
    stalled_body_gets_408(
        &gateway,
        &origin,
        "chunked, stalled 3 bytes into a 10-byte chunk",
        "/stall-chunked",
        b"POST /stall-chunked HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\na\r\nhel",
    )
    .await
}

/// A body sent one byte every 250 ms (3 s in all) is served: the timeout
/// is between reads, not for the whole body. The upstream's `timeout`
/// (2 s) does not run while the gateway waits for the client either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_but_steady_body_is_served() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = Manifest::simple(origin.addr(), BODY_TIMEOUT, "timeout = \"2s\"")
        .start()
        .await?;
    let body = b"steady-bytes";
    let mut conn = Raw::connect(gateway.addr("web")).await?;
    let started = Instant::now();
    conn.send(
        format!(
            "POST /steady HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    for byte in body {
        tokio::time::sleep(Duration::from_millis(250)).await;
        conn.send(&[*byte]).await?;
    }
    let response = conn
        .response()
        .await?
        .context("no answer to a steady body")?;
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    assert_eq!(response.body, b"seen /steady\n");
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "the body took {:?} to send",
        started.elapsed()
    );
    match origin_body(&origin, "/steady").await? {
        Some(Ok(received)) => assert_eq!(received, body),
        other => panic!("the origin did not get the whole body: {other:?}"),
    }
    still_serves(&gateway, &origin).await
}

/// Once the origin has answered and streams its response while the body
/// still arrives, a stall cuts both: the upstream request is aborted and
/// the client's connection closes without the response's last chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_stalled_while_the_response_streams_cuts_the_connection() -> anyhow::Result<()> {
    let origin = sluice_tests::Origin::start("stream", sluice_tests::Mode::StreamEcho).await?;
    let gateway = Manifest::simple(origin.addr(), BODY_TIMEOUT, "timeout = \"5s\"")
        .start()
        .await?;
    let mut stream = connect(gateway.addr("web")).await?;
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await?;
    // The response head and the echoed first chunk come back at once.
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&received, b"hello").is_none() {
        let n = within("the echoed chunk", WAIT, stream.read(&mut chunk)).await??;
        anyhow::ensure!(
            n > 0,
            "closed before echoing: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&chunk[..n]);
    }
    let stalled = Instant::now();
    let ended = within(
        "the gateway to cut the stalled exchange",
        Duration::from_secs(5),
        async {
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                }
            }
        },
    )
    .await;
    let elapsed = stalled.elapsed();
    assert!(
        ended.is_ok(),
        "still open {elapsed:?} after the body stalled"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "cut after {elapsed:?}; body_read_timeout is 1s"
    );
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the response must not look complete: {text:?}"
    );
    let reply = fetch(gateway.addr("web"), get("app.test", "/after")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    Ok(())
}

/// HTTP/2: a stream whose DATA stops short of its content-length gets 408
/// at body_read_timeout; the origin never gets the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_body_stalled_short_of_its_content_length_gets_408() -> anyhow::Result<()> {
    let origin = Recorder::start().await?;
    let gateway = gateway_with(&origin, BODY_TIMEOUT).await?;
    let (feed, body) = sluice_tests::client::channel_body(4);
    let mut client: H2<sluice_tests::client::ChannelBody> =
        H2::connect(gateway.addr("web")).await?;
    let req = http::Request::post("http://app.test/stall-h2")
        .header(http::header::CONTENT_LENGTH, "100")
        .body(body)?;
    feed.send(Bytes::from_static(b"0123456789")).await?;
    let started = Instant::now();
    let reply = client.request(req).await?;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 408, "{}", reply.excerpt());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}; body_read_timeout is 1s"
    );
    if let Some(Ok(body)) = origin_body(&origin, "/stall-h2").await? {
        panic!(
            "the origin got a complete request, body {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    drop(feed);
    still_serves_h2(&gateway, &origin).await
}

/// An origin that answers every request with a `size`-byte body, written
/// as fast as the gateway reads it, and counts the bytes it got written.
async fn download_origin(
    size: usize,
) -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let accept = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    counter.fetch_add(n, Ordering::SeqCst);
                    left -= n;
                }
            });
        }
    });
    Ok((addr, written, accept))
}

/// A client that announces a zero flow-control window and never opens it
/// cannot make the gateway buffer what it asked for: each stream's upstream
/// read stops once hyper's send buffer and the sockets are full, so the
/// origin gets to write only a bounded part of the bodies. Then, with the
/// window opened, a stream's body flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_with_a_closed_window_cannot_make_the_gateway_buffer() -> anyhow::Result<()> {
    const BODY: usize = 64 << 20;
    const STREAMS: u32 = 4;
    let (origin, written, _accept) = download_origin(BODY).await?;
    let gateway = Manifest::simple(origin, "", "timeout = \"5s\"")
        .start()
        .await?;
    let mut conn =
        H2Raw::connect_with(gateway.addr("web"), &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await?;
    let mut burst = Vec::new();
    for i in 0..STREAMS {
        let block = request_block("GET", &format!("/big/{i}"), &[]);
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
    }
    conn.send(&burst).await?;

    // Response heads arrive (HEADERS need no window); DATA cannot.
    let mut heads = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while heads < STREAMS {
        let f = conn
            .frame(deadline.saturating_duration_since(Instant::now()))
            .await?
            .context("closed before the response heads")?;
        assert_ne!(f.kind, DATA, "DATA past a zero window: {f:?}");
        assert_ne!(f.kind, GOAWAY, "{f:?}");
        heads += u32::from(f.kind == HEADERS);
    }
    // Give the gateway time to read as much as it would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let total = written.load(Ordering::SeqCst);
    let asked = BODY * STREAMS as usize;
    eprintln!("zero-window client: the origin wrote {total} of {asked} bytes");
    assert!(
        total < asked / 4,
        "the origin wrote {total} of {asked} bytes to a client that reads none: the gateway buffers"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        written.load(Ordering::SeqCst),
        total,
        "the upstream reads went on while the client read nothing"
    );

    // Opening stream 1's window (and the connection's) lets its body flow.
    let open = (1u32 << 30).to_be_bytes();
    let mut update = frame(WINDOW_UPDATE, 0, 0, &open);
    update.extend(frame(WINDOW_UPDATE, 0, 1, &open));
    conn.send(&update).await?;
    let mut received = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    while received < BODY {
        let f = conn
            .frame(deadline.saturating_duration_since(Instant::now()))
            .await?
            .context("closed before stream 1's body")?;
        if f.kind == DATA && f.stream == 1 {
            received += f.payload.len();
        }
        if f.kind == DATA {
            // Keep the connection window open for what stream 1 still needs.
            let credit = u32::try_from(f.payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes();
            conn.send(&frame(WINDOW_UPDATE, 0, 0, &credit)).await?;
        }
    }
    assert_eq!(
        received, BODY,
        "stream 1's whole body, once its window opened"
    );
    Ok(())
}
