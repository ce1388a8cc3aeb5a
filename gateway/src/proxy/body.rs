//! Body types of the forwarding path. Both stream frame by frame: nothing is
//! buffered whole, so a 50 MB upload costs the same memory as a 5 KB one.
//!
//! A request body is bounded in size (`max_body_bytes`) and in how long the
//! client may leave it stalled (`body_read_timeout`); the time spent waiting
//! for the client is measured ([`ClientWait`]) so that the upstream's
//! `timeout` is not charged for a slow client.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::activity::InFlight;
use crate::telemetry::AccessRecord;
use crate::upstream::UpstreamBody;

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    /// The client sent more than the route allows.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The client sent nothing for `body_read_timeout` while the gateway
    /// waited for more of the body.
    #[error("no request body bytes from the client for {timeout:?} (body_read_timeout)")]
    TimedOut {
        /// The configured `body_read_timeout`.
        timeout: Duration,
    },
    /// The client's stream failed (reset, closed early, malformed chunking).
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
}

/// How a client's request body is read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// The route's or listener's `max_body_bytes`.
    pub(crate) max_bytes: Option<u64>,
    /// The listener's `body_read_timeout`: the longest wait for the
    /// client's next bytes (nginx's `client_body_timeout`).
    pub(crate) read_timeout: Duration,
}

/// How long a request has waited for its client's body, all tries together.
/// The body measures it; the upstream timeout leaves it out, so a client
/// that sends slowly neither gets a 504 nor counts as the endpoint's failure.
#[derive(Debug)]
pub(crate) struct ClientWait {
    base: Instant,
    /// When the wait under way began, in µs after `base`, plus one; 0 when
    /// the body is not waiting for the client.
    since_us: AtomicU64,
    /// Waits that have ended, in µs.
    ended_us: AtomicU64,
}

impl ClientWait {
    /// No wait yet.
    pub(crate) fn new() -> Arc<ClientWait> {
        Arc::new(ClientWait {
            base: Instant::now(),
            since_us: AtomicU64::new(0),
            ended_us: AtomicU64::new(0),
        })
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    fn begin(&self) {
        let now = self.micros(Instant::now());
        self.since_us
            .store(now.saturating_add(1), Ordering::Release);
    }

    fn end(&self) {
        let since = self.since_us.swap(0, Ordering::AcqRel);
        if since != 0 {
            let waited = self.micros(Instant::now()).saturating_sub(since - 1);
            self.ended_us.fetch_add(waited, Ordering::AcqRel);
        }
    }

    /// Time spent waiting for the client so far, the wait under way included.
    pub(crate) fn waited(&self) -> Duration {
        let ended = self.ended_us.load(Ordering::Acquire);
        let since = self.since_us.load(Ordering::Acquire);
        let ongoing = if since == 0 {
            0
        } else {
            self.micros(Instant::now()).saturating_sub(since - 1)
        };
        Duration::from_micros(ended.saturating_add(ongoing))
    }
}

/// `timeout` on one try upstream, counted from `started` (when the try
/// began: the caller has read the clock already), not counting time spent
/// waiting for the client's body (`body_read_timeout` bounds that): a
/// client that uploads slowly is not the upstream's fault, so it neither
/// gets a 504 nor makes the endpoint count as failed.
pub(crate) async fn upstream_timeout<F: Future>(
    started: Instant,
    limit: Duration,
    client_wait: Option<&ClientWait>,
    mut exchange: Pin<&mut F>,
) -> Result<F::Output, UpstreamTimedOut> {
    // The exchange is pinned by the caller: taken by value, it would sit in
    // this future twice (as the argument and inside the timeout), ~1.2 KiB
    // more per request in flight.
    let Some(client_wait) = client_wait else {
        return tokio::time::timeout_at(started + limit, exchange)
            .await
            .map_err(|_| UpstreamTimedOut);
    };
    let waited_before = client_wait.waited();
    loop {
        let client = client_wait.waited().saturating_sub(waited_before);
        let charged = started.elapsed().saturating_sub(client);
        let Some(left) = limit.checked_sub(charged).filter(|left| !left.is_zero()) else {
            return Err(UpstreamTimedOut);
        };
        // Wakes at most once per `left`: while the client is being waited
        // for, the budget does not shrink and the sleep starts over.
        if let Ok(output) = tokio::time::timeout(left, exchange.as_mut()).await {
            return Ok(output);
        }
    }
}

/// A try's `timeout` passed without the upstream's response head.
#[derive(Debug)]
pub(crate) struct UpstreamTimedOut;

/// The client's request body on its way upstream, cut off past
/// `max_bytes` or after `read_timeout` without a byte from the client.
#[derive(Debug)]
pub(crate) struct RequestBody {
    /// `None`: an empty body (a retried request that had none).
    inner: Option<Incoming>,
    limits: BodyLimits,
    received: u64,
    /// Where the body goes back if it is dropped before it was read, so a
    /// failed try whose body never left can be retried with it.
    unsent: Option<UnsentBody>,
    polled: bool,
    /// Armed while the body waits for the client; every frame disarms it.
    stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    wait: Option<Arc<ClientWait>>,
}

/// A request body that a failed try gave back unread.
#[derive(Debug, Clone, Default)]
pub(crate) struct UnsentBody(Arc<Mutex<Option<Incoming>>>);

impl UnsentBody {
    /// The body, if the last try gave it back unread.
    pub(crate) fn take(&self) -> Option<Incoming> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl RequestBody {
    /// Wraps a client body read within `limits`; time spent waiting for
    /// the client is added to `wait`.
    pub(crate) fn new(inner: Incoming, limits: BodyLimits, wait: Option<&Arc<ClientWait>>) -> Self {
        RequestBody {
            inner: Some(inner),
            limits,
            received: 0,
            unsent: None,
            polled: false,
            stall: None,
            waiting: false,
            wait: wait.cloned(),
        }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        RequestBody {
            inner: None,
            limits: BodyLimits {
                max_bytes: None,
                read_timeout: Duration::MAX,
            },
            received: 0,
            unsent: None,
            polled: false,
            stall: None,
            waiting: false,
            wait: None,
        }
    }

    /// Like [`new`](Self::new), but a body dropped before it was read is put
    /// back in `unsent`.
    pub(crate) fn returning(
        inner: Incoming,
        limits: BodyLimits,
        wait: Option<&Arc<ClientWait>>,
        unsent: &UnsentBody,
    ) -> Self {
        let mut body = RequestBody::new(inner, limits, wait);
        body.unsent = Some(unsent.clone());
        body
    }

    /// The client has nothing for us: starts (or keeps) the stall clock,
    /// and fails the body once it passes `read_timeout`.
    fn wait_for_client(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let timeout = self.limits.read_timeout;
        if !self.waiting {
            self.waiting = true;
            if let Some(wait) = &self.wait {
                wait.begin();
            }
            let deadline = Instant::now().checked_add(timeout);
            match (&mut self.stall, deadline) {
                (Some(stall), Some(deadline)) => stall.as_mut().reset(deadline),
                (None, Some(deadline)) => {
                    self.stall = Some(Box::pin(tokio::time::sleep_until(deadline)))
                }
                // A timeout too long to represent never fires.
                (_, None) => self.stall = None,
            }
        }
        let fired = self
            .stall
            .as_mut()
            .is_some_and(|stall| stall.as_mut().poll(cx).is_ready());
        if !fired {
            return Poll::Pending;
        }
        self.client_answered();
        Poll::Ready(Some(Err(RequestBodyError::TimedOut { timeout })))
    }

    /// The client's stream moved (a frame, its end or an error): the stall clock stops.
    fn client_answered(&mut self) {
        if std::mem::take(&mut self.waiting)
            && let Some(wait) = &self.wait
        {
            wait.end();
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.client_answered();
        if !self.polled
            && let (Some(unsent), Some(inner)) = (self.unsent.take(), self.inner.take())
        {
            *unsent.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(inner);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.polled = true;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_pending() {
            return self.wait_for_client(cx);
        }
        self.client_answered();
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    if let Some(limit) =
                        self.limits.max_bytes.filter(|limit| self.received > *limit)
                    {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What a response carries: the upstream's stream or a body made here.
#[derive(Debug)]
enum Payload {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

/// The body sent to the client. Counts the bytes sent and writes the access
/// log line when the body ends or the client goes away.
#[derive(Debug)]
pub struct ResponseBody {
    payload: Payload,
    log: Option<Box<AccessRecord>>,
    /// Keeps the connection from counting as idle until the body is done.
    in_flight: Option<InFlight>,
}

impl ResponseBody {
    /// The upstream's body, streamed through.
    pub(crate) fn upstream(body: UpstreamBody) -> Self {
        ResponseBody {
            payload: Payload::Upstream(body),
            log: None,
            in_flight: None,
        }
    }

    /// A body made by the gateway.
    pub(crate) fn local(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody {
            payload: Payload::Local((!bytes.is_empty()).then_some(bytes)),
            log: None,
            in_flight: None,
        }
    }

    /// Attaches the access record to finish and write when the body is done.
    pub(crate) fn with_log(mut self, record: Option<Box<AccessRecord>>) -> Self {
        self.log = record;
        self
    }

    /// Holds the request's in-flight mark until the body is done.
    pub(crate) fn with_in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = Some(in_flight);
        self
    }

    fn count(&mut self, n: usize) {
        if let Some(log) = self.log.as_deref_mut() {
            log.bytes_sent += n as u64;
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.payload {
            Payload::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Payload::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len();
                    this.count(n);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(log) = this.log.as_deref_mut() {
                    log.upstream_body_error = true;
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.as_deref_mut() {
                    log.body_complete = true;
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.payload {
            Payload::Upstream(body) => body.is_end_stream(),
            Payload::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.payload {
            Payload::Upstream(body) => body.size_hint(),
            Payload::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            log.body_complete |= self.is_end_stream();
            log.write();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn client_wait_counts_only_time_spent_waiting() {
        let wait = ClientWait::new();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(wait.waited(), Duration::ZERO);
        wait.begin();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            wait.waited(),
            Duration::from_secs(2),
            "a wait under way counts"
        );
        wait.end();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(wait.waited(), Duration::from_secs(2));
        wait.begin();
        tokio::time::sleep(Duration::from_secs(1)).await;
        wait.end();
        wait.end();
        assert_eq!(wait.waited(), Duration::from_secs(3), "waits add up");
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_timeout_leaves_out_the_wait_for_the_client() {
        let limit = Duration::from_secs(2);
        let started = Instant::now();
        let plain = upstream_timeout(
            started,
            limit,
            None,
            std::pin::pin!(std::future::pending::<()>()),
        )
        .await;
        assert!(plain.is_err());
        assert_eq!(started.elapsed(), limit);

        // 1 s on the upstream, 10 s waiting for the client, then the
        // upstream's second second: timed out after 12 s.
        let wait = ClientWait::new();
        let client = tokio::spawn({
            let wait = wait.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                wait.begin();
                tokio::time::sleep(Duration::from_secs(10)).await;
                wait.end();
            }
        });
        let started = Instant::now();
        let slow = upstream_timeout(
            started,
            limit,
            Some(&wait),
            std::pin::pin!(std::future::pending::<()>()),
        )
        .await;
        assert!(slow.is_err());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(12) && elapsed < Duration::from_millis(12_050),
            "timed out after {elapsed:?}"
        );
        assert!(client.is_finished());

        let answered = upstream_timeout(
            Instant::now(),
            limit,
            Some(&wait),
            std::pin::pin!(async { 7 }),
        )
        .await;
        assert_eq!(answered.ok(), Some(7));
    }
}
