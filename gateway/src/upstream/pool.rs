//! Each worker's keep-alive connections to one upstream's endpoints: a
//! connection is taken for one exchange and handed back, ready for the
//! next, when the response body has been read to its end. At most
//! `max_connections` are open to an endpoint at once (busy or idle).
//!
//! A request the core balancer routes waits, when every endpoint is full,
//! in the upstream's queue ([`Pool::queue`]) and goes to whichever endpoint
//! frees a connection first, in arrival order (HAProxy's backend queue); the
//! core balancer asks [`Pool::has_room`] and passes over a full endpoint
//! while another has room. A request sent to an endpoint regardless (a
//! plugin's pick, a retry) waits at that endpoint for one of its
//! connections (HAProxy's server queue), within the upstream's `timeout`.
//!
//! A worker's requests never cross threads, so the lock around the idle
//! lists is never contended; taking and returning a connection is a push
//! and a pop. Nothing is spawned per request or per connection: the
//! request's task runs the exchange ([`h1`](super::h1)), and while
//! connections are idle one timer task per pool closes those idle longer
//! than `keepalive_timeout`.

use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::h1::{self, BodyError, BodyReader, ExchangeError};
use super::retry::is_idempotent;
use crate::proxy::body::RequestBody;

/// One worker's idle keep-alive connections to an upstream's endpoints.
/// A clone shares the connections.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Idle connections kept per endpoint at most (`keepalive`).
    max_idle: usize,
    /// How long a connection may stay idle (`keepalive_timeout`).
    idle_timeout: Duration,
    /// Connections open to one endpoint at most, busy or idle (`max_connections`).
    max_connections: usize,
    connect_timeout: Duration,
    idle: Mutex<Idle>,
}

/// The idle connections and the gates, by endpoint id.
#[derive(Default)]
struct Idle {
    by_endpoint: Vec<EndpointIdle>,
    /// Whether the task closing expired connections is running.
    reaping: bool,
    /// Requests in the upstream's queue, waiting for room at any endpoint.
    /// While any wait, no newcomer finds room: first come, first served.
    queued: usize,
    /// Wakes the first of them when a connection comes back or closes.
    room: Arc<Notify>,
}

/// One endpoint's idle connections, most recently returned last, and its gate.
struct EndpointIdle {
    connections: Vec<IdleConnection>,
    gate: Arc<Gate>,
    /// Requests waiting at the gate. While any wait, a newcomer queues
    /// behind them rather than take the connection that was handed back
    /// for the one woken: first come, first served.
    waiting: usize,
}

impl EndpointIdle {
    fn new(room: &Arc<Notify>) -> Self {
        EndpointIdle {
            connections: Vec::new(),
            gate: Arc::new(Gate {
                open: AtomicUsize::new(0),
                freed: Notify::new(),
                room: room.clone(),
            }),
            waiting: 0,
        }
    }
}

/// Counts an endpoint's open connections and wakes a request waiting for
/// one when a connection comes back or closes.
struct Gate {
    open: AtomicUsize,
    freed: Notify,
    /// The upstream queue's wake ([`Idle::room`]).
    room: Arc<Notify>,
}

/// One open connection's place under its endpoint's `max_connections`;
/// given back when the connection is dropped.
struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
        // Closing is rare: wake the upstream queue without asking whether
        // anyone waits in it (a wake nobody takes is kept for the next
        // waiter, who looks and waits again).
        self.0.room.notify_one();
    }
}

/// A request's place in the upstream's queue ([`Pool::queue`]). Leaving it
/// without having been served passes a wake it may have taken to the next.
pub(crate) struct QueuePlace<'a> {
    pool: &'a Pool,
    room: Arc<Notify>,
    served: bool,
}

impl QueuePlace<'_> {
    /// Waits until a connection to one of the upstream's endpoints comes
    /// back or closes; the first in the queue is woken first.
    pub(crate) async fn room(&self) {
        self.room.notified().await;
    }

    /// Marks the request as served: it found room and leaves the queue for it.
    pub(crate) fn served(&mut self) {
        self.served = true;
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        let mut idle = self.pool.lock();
        idle.queued -= 1;
        if !self.served && idle.queued > 0 {
            idle.room.notify_one();
        }
    }
}

/// A connection ready for an exchange, with its slot (held for its drop).
struct Connection {
    h1: h1::Connection,
    _slot: Slot,
}

struct IdleConnection {
    connection: Connection,
    since: Instant,
}

/// A request's place among those waiting for a connection to endpoint
/// `id`; leaving the queue without a connection (the request given up)
/// gives the place back.
struct Queued<'a> {
    pool: &'a Pool,
    id: u32,
    /// Whether the request is counted in the endpoint's `waiting`.
    counted: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.counted {
            let mut idle = self.pool.lock();
            let endpoint = Pool::endpoint(&mut idle, self.id);
            endpoint.waiting -= 1;
            // A wake meant for this request must not be lost with it.
            if endpoint.waiting > 0 {
                endpoint.gate.freed.notify_one();
            }
        }
    }
}

/// What a request gets from the pool.
enum Lease {
    /// An idle connection.
    Idle(Connection),
    /// Room to open a new one.
    Open(Slot),
    /// Every slot taken: wait for a connection to come back or close.
    Full(Arc<Gate>),
}

/// Why an exchange with an endpoint failed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection: refused, unreachable, or not made within
    /// `connect_timeout` (an [`std::io::ErrorKind::TimedOut`] error).
    Connect(std::io::Error),
    /// The connection broke, or the exchange failed, before a response head.
    Exchange(ExchangeError),
}

impl SendError {
    /// Whether no connection could be made (nothing was sent).
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(error) => write!(f, "connect: {error}"),
            SendError::Exchange(error) => write!(f, "{error}"),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Connect(error) => Some(error),
            SendError::Exchange(error) => Some(error),
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("max_idle", &self.inner.max_idle)
            .field("idle_timeout", &self.inner.idle_timeout)
            .field("max_connections", &self.inner.max_connections)
            .field("connect_timeout", &self.inner.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool keeping at most `max_idle` idle connections per
    /// endpoint for `idle_timeout` each, and at most `max_connections` open
    /// per endpoint.
    pub(crate) fn new(
        max_idle: usize,
        idle_timeout: Duration,
        max_connections: usize,
        connect_timeout: Duration,
    ) -> Self {
        Pool {
            inner: Arc::new(Inner {
                max_idle,
                idle_timeout,
                max_connections: max_connections.max(1),
                connect_timeout,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Sends `request` (origin-form target, `Host` set) to endpoint `id` at
    /// `addr` on an idle connection, or a new one when none is left. A
    /// request that a reused connection could not take because the
    /// upstream had just closed it (its own keep-alive timeout) goes to the
    /// next one when it can be sent again (no body, an idempotent method),
    /// so that race does not fail it.
    ///
    /// Written as an `async` block rather than an `async fn`: an `async fn`
    /// keeps a second copy of its by-value arguments (the ~340-byte request)
    /// in its future, for every request in flight.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn send(
        &self,
        id: u32,
        addr: SocketAddr,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + '_ {
        async move {
            let mut queued = Queued {
                pool: self,
                id,
                counted: false,
            };
            let (parts, mut body) = request.into_parts();
            let replayable = body.is_end_stream() && is_idempotent(&parts.method);
            loop {
                let (mut connection, reused) = match self.lease(id, &mut queued.counted) {
                    Lease::Idle(connection) => (connection, true),
                    Lease::Open(slot) => {
                        // Boxed: connecting is rare, and its future (~360
                        // bytes) would otherwise sit in every request's.
                        let h1 = Box::pin(self.connect(addr)).await?;
                        (Connection { h1, _slot: slot }, false)
                    }
                    Lease::Full(gate) => {
                        // A release before this wait left a permit, so none is
                        // missed; a spurious wake just looks again.
                        gate.freed.notified().await;
                        continue;
                    }
                };
                match connection.h1.send(&parts, &mut body).await {
                    Ok(head) => return Ok(self.wrap(id, connection, head)),
                    Err(error) if reused && replayable && error.closed_before_response() => {
                        tracing::debug!(%addr, "reused upstream connection was closed; trying another");
                    }
                    Err(error) => return Err(SendError::Exchange(error)),
                }
            }
        }
    }

    /// How many idle connections the pool holds for endpoint `id`.
    #[cfg(test)]
    fn idle_count(&self, id: u32) -> usize {
        self.lock()
            .by_endpoint
            .get(id as usize)
            .map_or(0, |e| e.connections.len())
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How many connections are open to endpoint `id`, busy or idle.
    #[cfg(test)]
    fn open_count(&self, id: u32) -> usize {
        self.lock()
            .by_endpoint
            .get(id as usize)
            .map_or(0, |e| e.gate.open.load(Ordering::Acquire))
    }

    /// Endpoint `id`'s idle connections and gate, made on first use.
    fn endpoint(idle: &mut Idle, id: u32) -> &mut EndpointIdle {
        let index = id as usize;
        if idle.by_endpoint.len() <= index {
            let room = idle.room.clone();
            idle.by_endpoint
                .resize_with(index + 1, || EndpointIdle::new(&room));
        }
        &mut idle.by_endpoint[index]
    }

    /// Whether a request for endpoint `id` would be sent now rather than
    /// wait: nobody waits there, and it has an idle connection or room to
    /// open one. (An idle connection the upstream has closed counts: the
    /// request would find out and open another.) While requests wait in
    /// the upstream's queue, only they (`queued`) find room.
    pub(crate) fn has_room(&self, id: u32, queued: bool) -> bool {
        let mut idle = self.lock();
        if !queued && idle.queued > 0 {
            return false;
        }
        let endpoint = Pool::endpoint(&mut idle, id);
        endpoint.waiting == 0
            && (!endpoint.connections.is_empty()
                || endpoint.gate.open.load(Ordering::Acquire) < self.inner.max_connections)
    }

    /// A place at the back of the upstream's queue, for a request that
    /// found every endpoint full. It waits with [`QueuePlace::room`] and
    /// looks again with [`Pool::has_room`] as queued.
    pub(crate) fn queue(&self) -> QueuePlace<'_> {
        let mut idle = self.lock();
        idle.queued += 1;
        QueuePlace {
            pool: self,
            room: idle.room.clone(),
            served: false,
        }
    }

    /// The most recently returned idle connection to endpoint `id` that is
    /// still open and has not expired; else room for a new one; else the
    /// gate to wait at. `queued` says whether the caller is counted among
    /// the waiters: a caller that is not queues behind any that are; a
    /// waiter served stops being counted.
    fn lease(&self, id: u32, queued: &mut bool) -> Lease {
        let mut idle = self.lock();
        let endpoint = Pool::endpoint(&mut idle, id);
        if !*queued && endpoint.waiting > 0 {
            endpoint.waiting += 1;
            *queued = true;
            return Lease::Full(endpoint.gate.clone());
        }
        let now = Instant::now();
        let mut lease = None;
        while let Some(idle) = endpoint.connections.pop() {
            if now.duration_since(idle.since) < self.inner.idle_timeout
                && !idle.connection.h1.is_closed()
            {
                lease = Some(Lease::Idle(idle.connection));
                break;
            }
        }
        // Slots are only taken under this lock; a dropped connection may
        // give one back meanwhile, which only leaves more room.
        let gate = &endpoint.gate;
        if lease.is_none() && gate.open.load(Ordering::Acquire) < self.inner.max_connections {
            gate.open.fetch_add(1, Ordering::AcqRel);
            lease = Some(Lease::Open(Slot(gate.clone())));
        }
        match lease {
            Some(lease) => {
                if std::mem::take(queued) {
                    endpoint.waiting -= 1;
                }
                lease
            }
            None => {
                if !*queued {
                    endpoint.waiting += 1;
                    *queued = true;
                }
                Lease::Full(gate.clone())
            }
        }
    }

    /// Hands a connection back after its exchange ended cleanly, waking a
    /// request waiting for one.
    fn checkin(&self, id: u32, connection: Connection) {
        let mut idle = self.lock();
        let endpoint = Pool::endpoint(&mut idle, id);
        if endpoint.connections.len() >= self.inner.max_idle {
            return;
        }
        endpoint.connections.push(IdleConnection {
            connection,
            since: Instant::now(),
        });
        endpoint.gate.freed.notify_one();
        if idle.queued > 0 {
            idle.room.notify_one();
        }
        if !idle.reaping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            idle.reaping = true;
            runtime.spawn(reap(Arc::downgrade(&self.inner)));
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<h1::Connection, SendError> {
        let connecting = tokio::net::TcpStream::connect(addr);
        let stream = match tokio::time::timeout(self.inner.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(SendError::Connect(error)),
            Err(_elapsed) => {
                return Err(SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.inner.connect_timeout),
                )));
            }
        };
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        Ok(h1::Connection::new(stream))
    }

    /// The response with its body tied to the connection: the connection
    /// goes back to the pool when the body ends, if both sides keep it
    /// open. A `101 Switching Protocols` connection now belongs to the
    /// tunnel ([`UpstreamBody::into_upgraded`]).
    fn wrap(&self, id: u32, connection: Connection, head: h1::Head) -> Response<UpstreamBody> {
        let home = (self.inner.max_idle > 0 && head.reusable).then(|| (self.clone(), id));
        let mut body = UpstreamBody {
            reader: head.body,
            connection: Some(connection),
            home,
        };
        if body.reader.is_end() {
            body.release();
        }
        Response::from_parts(head.parts, body)
    }
}

/// How often the reaper also drops idle connections the upstream has
/// closed (its own keep-alive timeout, a restart): without it such a socket
/// would wait in CLOSE_WAIT until the pool next looked at it.
const CLOSED_SWEEP: Duration = Duration::from_secs(1);

/// Closes connections idle longer than the timeout or closed by the
/// upstream, waking when the oldest expires and at least every
/// [`CLOSED_SWEEP`]; ends when none is left idle (the next return starts it
/// again) or the pool is gone.
async fn reap(pool: Weak<Inner>) {
    loop {
        let wake = {
            let Some(inner) = pool.upgrade() else { return };
            let mut idle = inner.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let mut oldest: Option<Instant> = None;
            for endpoint in &mut idle.by_endpoint {
                endpoint.connections.retain(|c| {
                    now.duration_since(c.since) < inner.idle_timeout && !c.connection.h1.is_closed()
                });
                if let Some(first) = endpoint.connections.first() {
                    oldest = Some(oldest.map_or(first.since, |o| o.min(first.since)));
                }
            }
            match oldest {
                Some(since) => (since + inner.idle_timeout).min(now + CLOSED_SWEEP),
                None => {
                    idle.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// An upstream response body, read from its connection as it is polled;
/// the connection returns to the pool when the body has been read to its
/// end (one that is dropped unread closes it).
pub(crate) struct UpstreamBody {
    reader: BodyReader,
    /// `None` once the body has ended (the connection went back or closed).
    connection: Option<Connection>,
    /// The pool and endpoint to return the connection to; `None` when it
    /// must not be reused.
    home: Option<(Pool, u32)>,
}

impl UpstreamBody {
    /// Hands the connection back (when reusable and nothing is left over)
    /// or closes it.
    fn release(&mut self) {
        if let (Some(mut connection), Some((pool, id))) = (self.connection.take(), self.home.take())
            && self.reader.is_complete()
            && !connection.h1.has_leftover()
        {
            connection.h1.shrink();
            pool.checkin(id, connection);
        }
    }

    /// The upstream connection after `101 Switching Protocols`, for the
    /// tunnel; `None` for any other response.
    pub(crate) fn into_upgraded(mut self) -> Option<h1::Upgraded> {
        if !self.reader.is_upgrade() {
            return None;
        }
        self.home = None;
        self.connection
            .take()
            .map(|connection| connection.h1.into_upgraded())
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("reader", &self.reader)
            .field("pooled", &self.home.is_some())
            .finish()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(connection) = this.connection.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = this.reader.poll_frame(&mut connection.h1, cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.reader.is_end() => this.release(),
            Poll::Ready(Some(Err(_))) => {
                this.home = None;
                this.connection = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none() || self.reader.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.reader.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.reader.is_end() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{Method, StatusCode};
    use http_body_util::{BodyExt as _, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;

    /// Connections an origin accepted and saw closed.
    #[derive(Default)]
    struct Counts {
        accepted: AtomicUsize,
        closed: AtomicUsize,
    }

    /// A keep-alive HTTP/1.1 origin answering "ok".
    async fn origin() -> (SocketAddr, Arc<Counts>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let seen = counts.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    seen.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, counts)
    }

    fn get() -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "origin")
            .body(RequestBody::empty())
            .expect("request")
    }

    async fn read_all(pool: &Pool, addr: SocketAddr) -> Bytes {
        let response = pool.send(0, addr, get()).await.expect("send");
        assert_eq!(response.status(), StatusCode::OK);
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 2 s: {what}");
    }

    /// A request waiting here sits in every in-flight request's future (a
    /// client connection's whole cost at c10k is ~20 KiB); an `async fn`
    /// would hold the request twice.
    #[test]
    fn a_send_future_holds_its_request_once() {
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_secs(1));
        let request = get();
        let request_size = std::mem::size_of_val(&request);
        let send = pool.send(0, SocketAddr::from(([127, 0, 0, 1], 9)), request);
        let size = std::mem::size_of_val(&send);
        // As an `async fn`: 1,248 bytes in a debug build; as a block: 872.
        assert!(
            size < request_size + 600,
            "send future is {size} bytes, its request {request_size}"
        );
    }

    #[tokio::test]
    async fn a_read_response_returns_its_connection_for_the_next_request() {
        let (addr, counts) = origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(read_all(&pool, addr).await, "ok");
        }
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(0), 1);
    }

    #[tokio::test]
    async fn an_unread_response_does_not_return_its_connection() {
        let (addr, counts) = origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_secs(1));
        let response = pool.send(0, addr, get()).await.expect("send");
        assert_eq!(pool.idle_count(0), 0, "returned before its body was read");
        drop(response);
        assert_eq!(pool.idle_count(0), 0, "returned with its body unread");
        assert_eq!(read_all(&pool, addr).await, "ok");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closes_is_dropped_without_a_request() {
        // Closes 50 ms after answering: after the pool has taken the
        // connection back and first looked at it, as an upstream with a short
        // keep-alive timeout does.
        let (addr, _counts) = raw_origin(|mut stream| async move {
            h1::read_request_head(&mut stream).await;
            let _ = stream.write_all(OK).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await;
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_secs(1));
        assert_eq!(read_all(&pool, addr).await, "ok");
        assert_eq!(pool.idle_count(0), 1);
        // Well before the 60 s keep-alive timeout, and with no request to look at it.
        eventually("the closed connection leaves the pool", || {
            pool.idle_count(0) == 0
        })
        .await;
        assert_eq!(pool.open_count(0), 0, "its slot is given back");
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_keepalive_timeout() {
        let (addr, counts) = origin().await;
        let pool = Pool::new(8, Duration::from_millis(100), 64, Duration::from_secs(1));
        read_all(&pool, addr).await;
        assert_eq!(pool.idle_count(0), 1);
        eventually("the idle connection is closed at the origin", || {
            counts.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(pool.idle_count(0), 0);
        // And the pool connects again afterwards.
        assert_eq!(read_all(&pool, addr).await, "ok");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn at_most_keepalive_connections_stay_idle_per_endpoint() {
        let (addr, counts) = origin().await;
        let pool = Pool::new(2, Duration::from_secs(60), 64, Duration::from_secs(1));
        // Three exchanges at once need three connections.
        let responses =
            futures_util::future::join_all((0..3).map(|_| pool.send(0, addr, get()))).await;
        for response in responses {
            let body = response
                .expect("send")
                .into_body()
                .collect()
                .await
                .expect("body");
            assert_eq!(body.to_bytes(), "ok");
        }
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(0), 2);
        eventually("the third connection is closed", || {
            counts.closed.load(Ordering::SeqCst) == 1
        })
        .await;

        let none = Pool::new(0, Duration::from_secs(60), 64, Duration::from_secs(1));
        read_all(&none, addr).await;
        assert_eq!(none.idle_count(0), 0);
    }

    #[tokio::test]
    async fn requests_past_max_connections_wait_for_a_connection() {
        let (addr, counts) = origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 2, Duration::from_secs(1));
        let bodies = futures_util::future::join_all((0..12).map(|_| read_all(&pool, addr))).await;
        assert!(bodies.iter().all(|b| b == "ok"), "{bodies:?}");
        assert_eq!(
            counts.accepted.load(Ordering::SeqCst),
            2,
            "never more than 2 open"
        );
        assert_eq!(pool.open_count(0), 2);
        assert_eq!(pool.idle_count(0), 2);

        // A connection that closes frees its place for a waiting request.
        let (addr, counts) = closing_origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 1, Duration::from_secs(1));
        let bodies = futures_util::future::join_all((0..5).map(|_| read_all(&pool, addr))).await;
        assert!(bodies.iter().all(|b| b == "ok"), "{bodies:?}");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 5);
        assert!(pool.open_count(0) <= 1);
    }

    #[tokio::test]
    async fn while_requests_wait_in_the_upstream_queue_only_they_find_room() {
        let (addr, _) = origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 1, Duration::from_secs(1));
        let busy = pool.send(0, addr, get()).await.expect("send");
        assert!(!pool.has_room(0, false), "the one connection is busy");
        let mut place = pool.queue();
        let wake = Duration::from_millis(200);
        assert!(
            tokio::time::timeout(wake, place.room()).await.is_err(),
            "nothing came free"
        );

        // The connection comes back: the queue is woken, and only a queued
        // request finds the room; a newcomer would queue behind it.
        let body = busy.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), "ok");
        assert!(tokio::time::timeout(wake, place.room()).await.is_ok());
        assert!(pool.has_room(0, true));
        assert!(!pool.has_room(0, false));
        place.served();
        drop(place);
        assert!(pool.has_room(0, false), "the queue is empty again");
        assert_eq!(read_all(&pool, addr).await, "ok");

        // A closed connection wakes the queue too.
        let busy = pool.send(0, addr, get()).await.expect("send");
        let place = pool.queue();
        drop(busy);
        assert!(tokio::time::timeout(wake, place.room()).await.is_ok());
        assert!(
            pool.has_room(0, true),
            "a slot is free to open a connection"
        );
    }

    #[tokio::test]
    async fn a_request_arriving_while_others_wait_queues_behind_them() {
        let pool = Pool::new(8, Duration::from_secs(60), 1, Duration::from_secs(1));
        let (mut first, mut second, mut newcomer) = (false, false, false);
        let Lease::Open(slot) = pool.lease(0, &mut first) else {
            panic!("the first request gets room")
        };
        assert!(matches!(pool.lease(0, &mut second), Lease::Full(_)));
        assert!(second, "the second request is counted as waiting");

        // Room comes back; a newcomer must not take it from the waiter.
        drop(slot);
        assert!(matches!(pool.lease(0, &mut newcomer), Lease::Full(_)));
        assert!(newcomer, "the newcomer queues behind the waiter");
        assert!(matches!(pool.lease(0, &mut second), Lease::Open(_)));
        assert!(!second, "a waiter served leaves the queue");

        // A waiter that gives up leaves the queue: later requests are not held behind it.
        let gave_up = Queued {
            pool: &pool,
            id: 0,
            counted: newcomer,
        };
        drop(gave_up);
        assert_eq!(pool.lock().by_endpoint[0].waiting, 0);
        let mut later = false;
        assert!(matches!(pool.lease(0, &mut later), Lease::Open(_)));
        assert!(!later);
    }

    /// An origin on raw sockets: counts each connection it accepts and
    /// hands it to `serve` on a task of its own.
    async fn raw_origin<F, Serving>(serve: F) -> (SocketAddr, Arc<Counts>)
    where
        F: Fn(tokio::net::TcpStream) -> Serving + Send + 'static,
        Serving: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let seen = counts.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, counts)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// An origin that answers one request per connection and then closes it
    /// without saying so (no `Connection: close`), as an upstream whose
    /// keep-alive timeout just fired does.
    async fn closing_origin() -> (SocketAddr, Arc<Counts>) {
        raw_origin(|mut stream| async move {
            h1::read_request_head(&mut stream).await;
            let _ = stream.write_all(OK).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_costs_no_request() {
        let (addr, counts) = closing_origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_secs(1));
        for _ in 0..20 {
            assert_eq!(read_all(&pool, addr).await, "ok");
        }
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 20);
    }

    /// An origin that answers the first request on each connection and
    /// closes the connection, unanswered, when the second arrives: what a
    /// keep-alive timeout firing as a request goes out looks like.
    async fn one_answer_origin() -> (SocketAddr, Arc<Counts>) {
        raw_origin(|mut stream| async move {
            h1::read_request_head(&mut stream).await;
            if stream.write_all(OK).await.is_ok() {
                h1::read_request_head(&mut stream).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_request_the_upstream_closed_on_is_replayed_only_when_safe() {
        let (addr, counts) = one_answer_origin().await;
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_secs(1));
        assert_eq!(read_all(&pool, addr).await, "ok");
        // The second GET goes out on the kept connection, which the origin
        // closes unanswered: replayed on a new one.
        assert_eq!(read_all(&pool, addr).await, "ok");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);

        // A POST is not sent twice: it fails as the upstream's error.
        let post = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header(http::header::HOST, "origin")
            .body(RequestBody::empty())
            .expect("request");
        let error = pool.send(0, addr, post).await.expect_err("not replayed");
        assert!(!error.is_connect(), "{error}");
        assert!(
            matches!(&error, SendError::Exchange(e) if e.closed_before_response()),
            "{error}"
        );
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_failures_and_timeouts_are_connect_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed = listener.local_addr().expect("addr");
        drop(listener);
        let pool = Pool::new(8, Duration::from_secs(60), 64, Duration::from_millis(200));
        let error = pool.send(0, closed, get()).await.expect_err("refused");
        assert!(error.is_connect(), "{error}");
        // TEST-NET-1 is not routed: unreachable at once, or no answer to
        // the SYN within the connect timeout; either is a connect error.
        let silent: SocketAddr = "192.0.2.1:80".parse().expect("addr");
        let error = pool.send(1, silent, get()).await.expect_err("timed out");
        assert!(error.is_connect(), "{error}");
    }
}
