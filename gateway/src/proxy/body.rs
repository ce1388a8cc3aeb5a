//! Body types of the forwarding path. Both stream frame by frame: nothing is
//! buffered whole, so a 50 MB upload costs the same memory as a 5 KB one.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::activity::InFlight;
use crate::telemetry::AccessRecord;

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    /// The client sent more than the route allows.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The client's stream failed (reset, closed early, malformed chunking).
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
}

/// The client's request body on its way upstream, cut off past `limit`.
#[derive(Debug)]
pub(crate) struct RequestBody {
    /// `None`: an empty body (a retried request that had none).
    inner: Option<Incoming>,
    limit: Option<u64>,
    received: u64,
    /// Where the body goes back if it is dropped before it was read, so a
    /// failed try whose body never left can be retried with it.
    unsent: Option<UnsentBody>,
    polled: bool,
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
    /// Wraps a client body with an optional byte limit.
    pub(crate) fn new(inner: Incoming, limit: Option<u64>) -> Self {
        RequestBody {
            inner: Some(inner),
            limit,
            received: 0,
            unsent: None,
            polled: false,
        }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        RequestBody {
            inner: None,
            limit: None,
            received: 0,
            unsent: None,
            polled: false,
        }
    }

    /// Like [`new`](Self::new), but a body dropped before it was read is put
    /// back in `unsent`.
    pub(crate) fn returning(inner: Incoming, limit: Option<u64>, unsent: &UnsentBody) -> Self {
        let mut body = RequestBody::new(inner, limit);
        body.unsent = Some(unsent.clone());
        body
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
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
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    if let Some(limit) = self.limit.filter(|limit| self.received > *limit) {
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
    Upstream(Incoming),
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
    pub(crate) fn upstream(body: Incoming) -> Self {
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.payload {
            Payload::Upstream(body) => Pin::new(body).poll_frame(cx),
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
