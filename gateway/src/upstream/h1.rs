//! HTTP/1.1 to an upstream, run by the request's own task.
//!
//! The future forwarding a request writes its head and body to the pooled
//! connection and reads the response head; the response body is then read
//! from the socket by whoever polls it (the client connection's task, as it
//! writes the body out). Nothing is spawned per upstream connection and
//! nothing crosses a channel: hyper's client drives each connection from a
//! task of its own and hands the request, the response and every body
//! chunk across channels, a task switch and four channel operations per
//! request on the hot path.
//!
//! What the exchange does, as RFC 9112 asks of a client:
//! - the request body is framed by its known length (`Content-Length`)
//!   or chunked (trailers included); a body that ends short of, or runs
//!   past, its declared length fails the exchange;
//! - the response body is framed by the request method (`HEAD`), the
//!   status (1xx, 204, 304), `Transfer-Encoding: chunked`,
//!   `Content-Length` (several must agree), or else by the connection's
//!   close;
//! - interim responses (`100 Continue`, `103 Early Hints`) are read and
//!   dropped; `101 Switching Protocols` hands the connection to a tunnel;
//! - a response may arrive before the request body is all sent (an echo, a
//!   transcoder): the rest is sent while the response body is read; if the
//!   upstream stops reading it (one refusing an upload), its response still
//!   counts and the connection is not reused;
//! - a connection is reused only when both sides are done with the exchange
//!   and neither said `close` (HTTP/1.0: only with `keep-alive`).

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::body::{RequestBody, RequestBodyError};

/// Most bytes a response head (status line and fields), or a chunked
/// body's size line or trailer section, may take.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most fields in a response head or trailer section (hyper's client: 100).
const MAX_HEADERS: usize = 128;
/// Most request bytes queued for the socket: the body is not read further
/// ahead of what the upstream takes.
const MAX_QUEUED_BYTES: usize = 64 * 1024;
/// Free room a read asks the socket to fill, at least.
const READ_ROOM: usize = 8 * 1024;
/// Free room a read of a long body asks for: fewer reads, fewer buffers.
const BODY_READ_ROOM: usize = 32 * 1024;

/// One HTTP/1.1 connection to an endpoint, with its buffers; boxed, so
/// that the pool and every request's future move a pointer.
pub(crate) struct Connection(Box<State>);

struct State {
    stream: TcpStream,
    /// Bytes read from the upstream and not yet taken.
    read: BytesMut,
    /// Request heads and chunk framing under construction.
    write: BytesMut,
    /// What is left to write, in order.
    queue: VecDeque<Bytes>,
    /// Where each field of the response head being parsed lies in `read`:
    /// (name start, name end, value start, value end).
    fields: Vec<[usize; 4]>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.0.stream.peer_addr().ok())
            .field("buffered", &self.0.read.len())
            .finish_non_exhaustive()
    }
}

/// Why an exchange failed before its response head was read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// The upstream closed the connection (or reset it) before sending a
    /// byte of the response: on a reused connection, most likely its
    /// keep-alive timeout won the race with this request.
    #[error("upstream closed the connection before responding")]
    Closed(#[source] Option<io::Error>),
    /// Reading or writing failed after the response began.
    #[error("upstream connection failed: {0}")]
    Io(#[source] io::Error),
    /// The response head is not HTTP/1.x as RFC 9112 defines it.
    #[error("malformed response head from upstream: {0}")]
    Malformed(&'static str),
    /// The response head did not fit [`MAX_HEAD_BYTES`].
    #[error("upstream response head exceeds {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The client's body failed (too large, stalled, broken).
    #[error("request body: {0}")]
    Body(#[source] RequestBodyError),
    /// The request body ended short of, or ran past, its `Content-Length`.
    #[error("request body length differs from its content-length")]
    BodyLength,
}

impl ExchangeError {
    /// Whether the upstream closed the connection before answering: a
    /// request that sent nothing it cannot send again may go to another
    /// connection.
    pub(crate) fn closed_before_response(&self) -> bool {
        matches!(self, ExchangeError::Closed(_))
    }
}

/// Why sending stopped: the client's body failed (the exchange ends), or
/// the socket did (the upstream may still have answered).
enum SendFailure {
    Body(ExchangeError),
    Write(io::Error),
}

/// Why a response body failed part way.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Reading failed.
    #[error("upstream body: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed before the body's declared end.
    #[error("upstream closed the connection before the end of the body")]
    Incomplete,
    /// The chunked framing or the trailers are malformed.
    #[error("malformed chunked body from upstream: {0}")]
    Malformed(&'static str),
    /// The request body, still being sent, failed (the client stalled or
    /// broke it): the exchange is cut short.
    #[error("request body failed while the response streamed: {0}")]
    Upload(#[source] ExchangeError),
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length`: the bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    UntilClose,
    /// `101 Switching Protocols`: the connection now carries another protocol.
    Upgrade,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: the bytes still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// A response head, with what reading its body needs.
#[derive(Debug)]
pub(crate) struct Head {
    /// Status, version and fields.
    pub(crate) parts: http::response::Parts,
    /// How its body is read.
    pub(crate) body: BodyReader,
    /// Whether the connection may carry another exchange once the body is
    /// read (both sides done, no `close`).
    pub(crate) reusable: bool,
}

/// Reads one response body from its connection, and sends what is left of
/// the request body while it does (an upstream may answer and stream its
/// response before it has read the whole request: an echo, a transcoder).
#[derive(Debug)]
pub(crate) struct BodyReader {
    framing: Framing,
    /// The rest of the request body, when the response head came first.
    upload: Option<Box<Upload>>,
    /// The request body could not all be sent (the upstream stopped
    /// reading, or the client's body failed): the connection is done.
    abandoned: bool,
}

/// A request body still on its way while the response is read.
struct Upload {
    body: RequestBody,
    sending: Sending,
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload").finish_non_exhaustive()
    }
}

/// What parsing the buffered bytes as a response head gave.
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response, now taken off the buffer.
    Interim,
    /// The final response head.
    Final(Head),
}

/// The request body as it is being sent.
enum Sending {
    /// All of it is queued.
    Done,
    /// `Content-Length`: the bytes still to come from the client.
    Length(u64),
    /// Chunked.
    Chunked,
}

impl Connection {
    /// A connection over `stream` (connected, `TCP_NODELAY` set).
    pub(crate) fn new(stream: TcpStream) -> Self {
        Connection(Box::new(State {
            stream,
            read: BytesMut::new(),
            write: BytesMut::new(),
            queue: VecDeque::new(),
            fields: Vec::new(),
        }))
    }

    /// Whether the upstream closed this idle connection (or sent something
    /// unasked, which leaves it unusable too). Costs no system call unless
    /// the socket has become readable since the last exchange.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Sends the request (`parts` in origin form, `body`) and reads the
    /// response head. The body is polled only when it is not empty.
    pub(crate) fn send<'a>(
        &'a mut self,
        parts: &'a Parts,
        body: &'a mut RequestBody,
    ) -> impl Future<Output = Result<Head, ExchangeError>> + Send + 'a {
        self.0.send(parts, body)
    }

    /// The connection as a tunnel, after a `101` response.
    pub(crate) fn into_upgraded(self) -> Upgraded {
        let state = *self.0;
        Upgraded {
            early: state.read.freeze(),
            stream: state.stream,
        }
    }

    /// Whether bytes past the last exchange arrived with it (the upstream
    /// sent more than the response: the connection cannot be reused).
    pub(crate) fn has_leftover(&self) -> bool {
        !self.0.read.is_empty()
    }

    /// Lets go of buffers a long body grew, before the connection idles:
    /// an idle connection keeps at most [`READ_ROOM`] or so of its own.
    pub(crate) fn shrink(&mut self) {
        if self.0.read.capacity() > 2 * READ_ROOM {
            self.0.read = BytesMut::new();
        }
        if self.0.write.capacity() > 2 * READ_ROOM {
            self.0.write = BytesMut::new();
        }
    }
}

impl State {
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // Readable: closed, something unasked, or readiness left over
            // from the last read (cleared by this one).
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    async fn send(&mut self, parts: &Parts, body: &mut RequestBody) -> Result<Head, ExchangeError> {
        self.read.clear();
        self.queue.clear();
        let mut sending = self.encode_head(parts, body);
        let mut answered = false;
        let mut write_failed = None;
        let mut head = std::future::poll_fn(|cx| {
            if write_failed.is_none() {
                match self.poll_send(cx, body, &mut sending) {
                    Ok(()) => {}
                    Err(SendFailure::Body(error)) => return Poll::Ready(Err(error)),
                    // The upstream may have answered before it stopped
                    // reading (a refused upload): its response still counts.
                    Err(SendFailure::Write(error)) => write_failed = Some(error),
                }
            }
            match ready!(self.poll_head(cx, &parts.method, &mut answered)) {
                Err(ExchangeError::Closed(None)) if write_failed.is_some() => {
                    Poll::Ready(Err(ExchangeError::Closed(write_failed.take())))
                }
                polled => Poll::Ready(polled),
            }
        })
        .await?;
        if write_failed.is_some() {
            head.reusable = false;
            head.body.abandoned = true;
        } else if !matches!(sending, Sending::Done) || !self.queue.is_empty() {
            head.body.upload = Some(Box::new(Upload {
                body: std::mem::replace(body, RequestBody::empty()),
                sending,
            }));
        }
        Ok(head)
    }

    /// Queues the request head; returns how the body goes.
    fn encode_head(&mut self, parts: &Parts, body: &RequestBody) -> Sending {
        let w = &mut self.write;
        w.reserve(256);
        w.extend_from_slice(parts.method.as_str().as_bytes());
        w.extend_from_slice(b" ");
        w.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        w.extend_from_slice(b" HTTP/1.1\r\n");
        let mut declared = false;
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                declared = true;
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            push_field(w, name, value);
        }
        let sending = if body.is_end_stream() {
            // Methods that define a body say it is empty (hyper does the same).
            if declared || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                w.extend_from_slice(b"content-length: 0\r\n");
            }
            Sending::Done
        } else if let Some(length) = body.size_hint().exact() {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            w.extend_from_slice(b"\r\n");
            Sending::Length(length)
        } else {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Sending::Chunked
        };
        w.extend_from_slice(b"\r\n");
        let head = w.split().freeze();
        self.queue.push_back(head);
        sending
    }

    /// Writes what is queued and queues more of the body while the socket
    /// takes it; `Ok` when it is all written or the socket or the client is
    /// not ready.
    ///
    /// What the body has ready is taken before anything is written: the
    /// head leaves with the first data in one write, and a body that fails
    /// at once (a malformed HTTP/2 request the client's stream reset) sends
    /// nothing, not even the head.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut RequestBody,
        sending: &mut Sending,
    ) -> Result<(), SendFailure> {
        loop {
            let polled = if matches!(sending, Sending::Done)
                || self.queue.iter().map(Bytes::len).sum::<usize>() >= MAX_QUEUED_BYTES
            {
                Poll::Pending
            } else {
                Pin::new(&mut *body).poll_frame(cx)
            };
            let frame = match polled {
                Poll::Pending => {
                    if self.queue.is_empty() {
                        return Ok(());
                    }
                    match self.poll_write_queue(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(error)) => return Err(SendFailure::Write(error)),
                        Poll::Pending => return Ok(()),
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    return Err(SendFailure::Body(ExchangeError::Body(error)));
                }
                Poll::Ready(Some(Ok(frame))) => Some(frame),
                Poll::Ready(None) => None,
            };
            match (frame, &mut *sending) {
                (None, Sending::Length(left)) => {
                    if *left != 0 {
                        return Err(SendFailure::Body(ExchangeError::BodyLength));
                    }
                    *sending = Sending::Done;
                }
                (None, Sending::Chunked) => {
                    self.queue.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    *sending = Sending::Done;
                }
                (Some(frame), Sending::Length(left)) => {
                    // Trailers cannot follow a body with a known length; dropped.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        let Some(rest) = left.checked_sub(data.len() as u64) else {
                            return Err(SendFailure::Body(ExchangeError::BodyLength));
                        };
                        *left = rest;
                        self.queue.push_back(data);
                    }
                }
                (Some(frame), Sending::Chunked) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            let w = &mut self.write;
                            let _ = write!(w, "{:x}\r\n", data.len());
                            self.queue.push_back(w.split().freeze());
                            self.queue.push_back(data);
                            self.queue.push_back(Bytes::from_static(b"\r\n"));
                        }
                    }
                    Err(frame) => {
                        let w = &mut self.write;
                        w.extend_from_slice(b"0\r\n");
                        if let Ok(trailers) = frame.into_trailers() {
                            for (name, value) in &trailers {
                                push_field(w, name, value);
                            }
                        }
                        w.extend_from_slice(b"\r\n");
                        self.queue.push_back(w.split().freeze());
                        *sending = Sending::Done;
                    }
                },
                (_, Sending::Done) => unreachable!("a body that is done is not polled"),
            }
        }
    }

    /// Writes the queue's front buffers in one vectored write.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let mut count = 0;
            for (slot, bytes) in slices.iter_mut().zip(self.queue.iter()) {
                *slot = IoSlice::new(bytes);
                count += 1;
            }
            let mut written =
                ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..count]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while written > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if written >= front.len() {
                    written -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads until a final response head is parsed (interim 1xx heads are
    /// dropped). `answered` records whether any byte of a response came.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        answered: &mut bool,
    ) -> Poll<Result<Head, ExchangeError>> {
        loop {
            if !self.read.is_empty() {
                match self.parse_head(method)? {
                    Parsed::Final(head) => return Poll::Ready(Ok(head)),
                    // A final head may follow at once.
                    Parsed::Interim => continue,
                    Parsed::Partial if self.read.len() >= MAX_HEAD_BYTES => {
                        return Poll::Ready(Err(ExchangeError::HeadTooLarge));
                    }
                    Parsed::Partial => {}
                }
            }
            match ready!(poll_fill(&mut self.stream, &mut self.read, cx, READ_ROOM)) {
                Ok(0) if !*answered => return Poll::Ready(Err(ExchangeError::Closed(None))),
                Ok(0) => {
                    return Poll::Ready(Err(ExchangeError::Malformed(
                        "connection closed inside the response head",
                    )));
                }
                Ok(_) => *answered = true,
                Err(error) if !*answered => {
                    return Poll::Ready(Err(ExchangeError::Closed(Some(error))));
                }
                Err(error) => return Poll::Ready(Err(ExchangeError::Io(error))),
            }
        }
    }

    /// Parses a response head at the start of `read`.
    fn parse_head(&mut self, method: &Method) -> Result<Parsed, ExchangeError> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut response, &self.read, &mut slots)
            .map_err(|error| ExchangeError::Malformed(parse_error(error)))?;
        let httparse::Status::Complete(length) = parsed else {
            return Ok(Parsed::Partial);
        };
        let code = response.code.unwrap_or(0);
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let start = self.read.as_ptr() as usize;
        // Field names are never empty; an empty value may not point into
        // the buffer at all.
        let offset = |part: &[u8]| {
            if part.is_empty() {
                0
            } else {
                part.as_ptr() as usize - start
            }
        };
        self.fields.clear();
        for field in response.headers.iter() {
            let name = offset(field.name.as_bytes());
            let value = offset(field.value);
            self.fields.push([
                name,
                name + field.name.len(),
                value,
                value + field.value.len(),
            ]);
        }
        let head = self.read.split_to(length).freeze();
        let status = StatusCode::from_u16(code)
            .map_err(|_| ExchangeError::Malformed("status code out of range"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Parsed::Interim);
        }
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for &[name_start, name_end, value_start, value_end] in &self.fields {
            let name = HeaderName::from_bytes(&head[name_start..name_end])
                .map_err(|_| ExchangeError::Malformed("invalid field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
                .map_err(|_| ExchangeError::Malformed("invalid field value"))?;
            headers.append(name, value);
        }
        let framing = response_framing(method, status, &mut headers)?;
        let reusable = framing != Framing::UntilClose
            && framing != Framing::Upgrade
            && keeps_alive(version, &headers);
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        Ok(Parsed::Final(Head {
            parts,
            body: BodyReader {
                framing,
                upload: None,
                abandoned: false,
            },
            reusable,
        }))
    }
}

/// Writes one header or trailer field line.
fn push_field(w: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    w.extend_from_slice(name.as_str().as_bytes());
    w.extend_from_slice(b": ");
    w.extend_from_slice(value.as_bytes());
    w.extend_from_slice(b"\r\n");
}

/// Reads into `buf` with at least `room` bytes free.
fn poll_fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    room: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < room / 4 {
        buf.reserve(room);
    }
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
}

fn parse_error(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid field name",
        httparse::Error::HeaderValue => "invalid field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many fields",
        httparse::Error::Version => "not HTTP/1.x",
    }
}

/// How the body of a response with `status` to a `method` request is
/// delimited (RFC 9112 §6.3). A `Content-Length` that chunking overrides
/// is removed, as the RFC asks of a proxy.
fn response_framing(
    method: &Method,
    status: StatusCode,
    headers: &mut HeaderMap,
) -> Result<Framing, ExchangeError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Framing::Upgrade);
    }
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let chunked = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|coding| !coding.is_empty())
            .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"));
        headers.remove(header::CONTENT_LENGTH);
        return Ok(if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let parsed = std::str::from_utf8(item)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ExchangeError::Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(ExchangeError::Malformed(
                    "conflicting content-length values",
                ));
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// Whether the upstream keeps the connection open after this response.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep_alive)
}

impl BodyReader {
    /// Whether the body has been read to its end (or never had one).
    pub(crate) fn is_end(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    /// Whether the exchange ended with both messages whole: the response
    /// read to its end and the request sent to its end.
    pub(crate) fn is_complete(&self) -> bool {
        self.is_end() && self.upload.is_none() && !self.abandoned
    }

    /// Whether the connection now carries another protocol (`101`).
    pub(crate) fn is_upgrade(&self) -> bool {
        self.framing == Framing::Upgrade
    }

    /// The body's length when it is known.
    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty | Framing::Upgrade => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked(_) | Framing::UntilClose => SizeHint::default(),
        }
    }

    /// The next piece of the body from `conn`; `None` at its end, after
    /// which the connection holds nothing of this exchange.
    pub(crate) fn poll_frame(
        &mut self,
        conn: &mut Connection,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let conn = &mut *conn.0;
        if let Some(upload) = self.upload.as_deref_mut() {
            match conn.poll_send(cx, &mut upload.body, &mut upload.sending) {
                Ok(()) => {
                    if matches!(upload.sending, Sending::Done) && conn.queue.is_empty() {
                        self.upload = None;
                    }
                }
                // The upstream stopped reading; its response goes on.
                Err(SendFailure::Write(_)) => {
                    self.upload = None;
                    self.abandoned = true;
                }
                Err(SendFailure::Body(error)) => {
                    self.upload = None;
                    self.abandoned = true;
                    return Poll::Ready(Some(Err(BodyError::Upload(error))));
                }
            }
        }
        loop {
            match self.framing {
                Framing::Empty | Framing::Upgrade | Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(left) => {
                    if conn.read.is_empty() {
                        let room = if left > READ_ROOM as u64 {
                            BODY_READ_ROOM
                        } else {
                            READ_ROOM
                        };
                        if ready!(poll_fill(&mut conn.stream, &mut conn.read, cx, room))? == 0 {
                            return Poll::Ready(Some(Err(BodyError::Incomplete)));
                        }
                    }
                    let take =
                        usize::try_from(left).map_or(conn.read.len(), |l| l.min(conn.read.len()));
                    self.framing = Framing::Length(left - take as u64);
                    return Poll::Ready(Some(Ok(Frame::data(conn.read.split_to(take).freeze()))));
                }
                Framing::UntilClose => {
                    if conn.read.is_empty()
                        && ready!(poll_fill(
                            &mut conn.stream,
                            &mut conn.read,
                            cx,
                            BODY_READ_ROOM
                        ))? == 0
                    {
                        self.framing = Framing::Empty;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(conn.read.split().freeze()))));
                }
                Framing::Chunked(chunk) => {
                    match self.step_chunked(chunk, &mut conn.read) {
                        Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                        Ok(None) if self.framing == Framing::Empty => return Poll::Ready(None),
                        Ok(None) if self.framing != Framing::Chunked(chunk) => continue,
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(Some(Err(error))),
                    }
                    // Needs more bytes.
                    if conn.read.len() >= MAX_HEAD_BYTES && !matches!(chunk, Chunk::Data(_)) {
                        return Poll::Ready(Some(Err(BodyError::Malformed(
                            "chunk size line or trailers too long",
                        ))));
                    }
                    let room = match chunk {
                        Chunk::Data(left) if left > READ_ROOM as u64 => BODY_READ_ROOM,
                        _ => READ_ROOM,
                    };
                    if ready!(poll_fill(&mut conn.stream, &mut conn.read, cx, room))? == 0 {
                        return Poll::Ready(Some(Err(BodyError::Incomplete)));
                    }
                }
            }
        }
    }

    /// One step of the chunked decoder over what `conn` has buffered: a
    /// frame, or `None` when the state moved on without one or more bytes
    /// are needed (the state is then unchanged).
    fn step_chunked(
        &mut self,
        chunk: Chunk,
        read: &mut BytesMut,
    ) -> Result<Option<Frame<Bytes>>, BodyError> {
        match chunk {
            Chunk::Size => match httparse::parse_chunk_size(read) {
                Ok(httparse::Status::Complete((used, size))) => {
                    read.advance(used);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                    Ok(None)
                }
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(BodyError::Malformed("invalid chunk size")),
            },
            Chunk::Data(left) => {
                if read.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(left).map_or(read.len(), |l| l.min(read.len()));
                let rest = left - take as u64;
                self.framing = Framing::Chunked(if rest == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rest)
                });
                Ok(Some(Frame::data(read.split_to(take).freeze())))
            }
            Chunk::DataEnd => {
                if read.len() < 2 {
                    return Ok(None);
                }
                if &read[..2] != b"\r\n" {
                    return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                }
                read.advance(2);
                self.framing = Framing::Chunked(Chunk::Size);
                Ok(None)
            }
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; 32];
                match httparse::parse_headers(read, &mut fields) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for field in fields {
                            let name = HeaderName::from_bytes(field.name.as_bytes())
                                .map_err(|_| BodyError::Malformed("invalid trailer name"))?;
                            let value = HeaderValue::from_bytes(field.value)
                                .map_err(|_| BodyError::Malformed("invalid trailer value"))?;
                            trailers.append(name, value);
                        }
                        read.advance(used);
                        self.framing = Framing::Empty;
                        Ok((!trailers.is_empty()).then(|| Frame::trailers(trailers)))
                    }
                    Ok(httparse::Status::Partial) => Ok(None),
                    Err(_) => Err(BodyError::Malformed("invalid trailers")),
                }
            }
        }
    }
}

/// An upstream connection after `101 Switching Protocols`: what the
/// upstream sent past the response head, then the socket.
#[derive(Debug)]
pub(crate) struct Upgraded {
    early: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Reads one request head (up to its blank line, or the end) off `stream`,
/// for the scripted origins of this module's and the pool's tests.
#[cfg(test)]
pub(crate) async fn read_request_head(stream: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    head
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// An origin that takes one connection, reads one request head, sends
    /// `response` as it is, and closes when `close` says so. Gives back the
    /// request head it read.
    async fn origin(
        response: &'static [u8],
        close: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let head = read_request_head(&mut stream).await;
            stream.write_all(response).await.expect("write");
            if close {
                drop(stream);
            } else {
                // Hold the connection open until the client is done with it.
                let _ = stream.read(&mut [0u8; 64]).await;
            }
            head
        });
        (addr, served)
    }

    async fn connect(addr: SocketAddr) -> Connection {
        Connection::new(TcpStream::connect(addr).await.expect("connect"))
    }

    fn request(method: Method) -> Parts {
        let mut parts = http::Request::new(()).into_parts().0;
        parts.method = method;
        parts.uri = http::Uri::from_static("/path?q=1");
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("origin"));
        parts
    }

    /// Sends a request without a body; gives back the head and the whole body.
    async fn exchange(
        conn: &mut Connection,
        method: Method,
    ) -> Result<(Head, Vec<u8>, Option<HeaderMap>), ExchangeError> {
        let mut body = RequestBody::empty();
        let mut head = conn.send(&request(method), &mut body).await?;
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = std::future::poll_fn(|cx| head.body.poll_frame(conn, cx)).await {
            let frame = frame.expect("body frame");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok((head, data, trailers))
    }

    #[tokio::test]
    async fn a_request_head_is_written_in_origin_form_with_its_framing() {
        let (addr, served) = origin(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let mut conn = connect(addr).await;
        let mut parts = request(Method::POST);
        // The framing is the gateway's to decide: these go.
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let head = conn
            .send(&parts, &mut RequestBody::empty())
            .await
            .expect("exchange");
        assert_eq!(head.parts.status, StatusCode::NO_CONTENT);
        assert!(head.body.is_complete() && head.reusable);
        drop(conn);
        let sent = String::from_utf8(served.await.expect("origin")).expect("utf-8");
        assert_eq!(
            sent,
            "POST /path?q=1 HTTP/1.1\r\nhost: origin\r\ncontent-length: 0\r\n\r\n"
        );

        // A GET without a body says nothing of one.
        let (addr, served) = origin(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let mut conn = connect(addr).await;
        exchange(&mut conn, Method::GET).await.expect("exchange");
        drop(conn);
        let sent = String::from_utf8(served.await.expect("origin")).expect("utf-8");
        assert_eq!(sent, "GET /path?q=1 HTTP/1.1\r\nhost: origin\r\n\r\n");
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_its_trailers() {
        let (addr, _served) = origin(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
            false,
        )
        .await;
        let mut conn = connect(addr).await;
        let (head, data, trailers) = exchange(&mut conn, Method::GET).await.expect("exchange");
        assert_eq!(data, b"hello world");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["x-checksum"], "abc");
        assert!(
            !head.parts.headers.contains_key(header::CONTENT_LENGTH),
            "chunking overrides content-length, which goes"
        );
        assert!(head.reusable && head.body.is_complete() && !conn.has_leftover());
    }

    #[tokio::test]
    async fn interim_responses_are_dropped() {
        let (addr, _served) = origin(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-final: yes\r\n\r\nok",
            false,
        )
        .await;
        let mut conn = connect(addr).await;
        let (head, data, _) = exchange(&mut conn, Method::GET).await.expect("exchange");
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(head.parts.headers["x-final"], "yes");
        assert!(!head.parts.headers.contains_key("link"));
        assert_eq!(data, b"ok");
        assert!(head.reusable && head.body.is_complete());
    }

    #[tokio::test]
    async fn a_body_without_framing_runs_to_the_close_and_ends_the_connection() {
        let (addr, _served) = origin(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        let mut conn = connect(addr).await;
        let (head, data, _) = exchange(&mut conn, Method::GET).await.expect("exchange");
        assert_eq!(data, b"all of it");
        assert!(!head.reusable);
    }

    #[tokio::test]
    async fn bodiless_responses_have_no_body_whatever_they_declare() {
        for (method, response) in [
            (
                Method::HEAD,
                &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"[..],
            ),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            ),
            (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n"),
        ] {
            let (addr, _served) = origin(response, false).await;
            let mut conn = connect(addr).await;
            let (head, data, _) = exchange(&mut conn, method).await.expect("exchange");
            assert!(data.is_empty());
            assert!(head.reusable && head.body.is_complete(), "{head:?}");
        }
    }

    #[tokio::test]
    async fn close_and_http_1_0_decide_reuse() {
        for (response, reusable) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"[..],
                false,
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n",
                true,
            ),
        ] {
            let (addr, _served) = origin(response, false).await;
            let mut conn = connect(addr).await;
            let (head, _, _) = exchange(&mut conn, Method::GET).await.expect("exchange");
            assert_eq!(
                head.reusable,
                reusable,
                "{}",
                String::from_utf8_lossy(response)
            );
        }
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        for (response, expected) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
                "conflicting content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\n",
                "invalid content-length",
            ),
            (b"SPDY/3 200 OK\r\n\r\n", "not HTTP/1.x"),
            (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "invalid"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-le",
                "closed inside the response head",
            ),
        ] {
            let (addr, _served) = origin(response, true).await;
            let mut conn = connect(addr).await;
            let error = exchange(&mut conn, Method::GET)
                .await
                .expect_err("malformed");
            assert!(
                error.to_string().contains(expected),
                "{error} for {}",
                String::from_utf8_lossy(response)
            );
            assert!(!error.closed_before_response());
        }
        // Identical repeated lengths are one length.
        let (addr, _served) = origin(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2, 2\r\n\r\nok",
            false,
        )
        .await;
        let mut conn = connect(addr).await;
        let (_, data, _) = exchange(&mut conn, Method::GET).await.expect("exchange");
        assert_eq!(data, b"ok");
    }

    #[tokio::test]
    async fn a_chunked_body_cut_short_or_malformed_fails() {
        for response in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ] {
            let (addr, _served) = origin(response, true).await;
            let mut conn = connect(addr).await;
            let mut head = conn
                .send(&request(Method::GET), &mut RequestBody::empty())
                .await
                .expect("head");
            let mut failed = false;
            while let Some(frame) =
                std::future::poll_fn(|cx| head.body.poll_frame(&mut conn, cx)).await
            {
                if frame.is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed, "{}", String::from_utf8_lossy(response));
            assert!(!head.body.is_complete());
        }
    }

    #[tokio::test]
    async fn an_upstream_closing_before_answering_is_told_apart() {
        let (addr, _served) = origin(b"", true).await;
        let mut conn = connect(addr).await;
        let error = exchange(&mut conn, Method::GET).await.expect_err("closed");
        assert!(error.closed_before_response(), "{error}");
    }

    #[tokio::test]
    async fn a_response_head_past_the_limit_is_refused() {
        static HUGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            // Few fields (the field count has its own limit), long values.
            while head.len() <= MAX_HEAD_BYTES {
                head.extend_from_slice(b"x-filler: ");
                head.extend_from_slice(&[b'a'; 2048]);
                head.extend_from_slice(b"\r\n");
            }
            head
        });
        let (addr, _served) = origin(&HUGE, false).await;
        let mut conn = connect(addr).await;
        let error = exchange(&mut conn, Method::GET)
            .await
            .expect_err("too large");
        assert!(matches!(error, ExchangeError::HeadTooLarge), "{error}");
    }

    #[tokio::test]
    async fn an_idle_connection_knows_when_the_upstream_closed_it() {
        let (addr, _served) = origin(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
        let mut conn = connect(addr).await;
        exchange(&mut conn, Method::GET).await.expect("exchange");
        let mut closed = false;
        for _ in 0..200 {
            if conn.is_closed() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(closed, "the upstream's close was not seen");

        let (addr, _served) =
            origin(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
        let mut conn = connect(addr).await;
        exchange(&mut conn, Method::GET).await.expect("exchange");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!conn.is_closed(), "an open idle connection is not closed");
        assert!(!conn.is_closed(), "and asking again does not change that");
    }

    #[tokio::test]
    async fn switching_protocols_hands_over_the_bytes_that_came_early() {
        let (addr, _served) = origin(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nearly",
            true,
        )
        .await;
        let mut conn = connect(addr).await;
        let head = conn
            .send(&request(Method::GET), &mut RequestBody::empty())
            .await
            .expect("head");
        assert_eq!(head.parts.status, StatusCode::SWITCHING_PROTOCOLS);
        assert!(head.body.is_upgrade() && !head.reusable);
        let mut tunnel = conn.into_upgraded();
        let mut received = Vec::new();
        tunnel.read_to_end(&mut received).await.expect("read");
        assert_eq!(received, b"early");
    }
}
