//! Body types of the forwarding path. Both stream frame by frame: nothing is
//! buffered whole, so a 50 MB upload costs the same memory as a 5 KB one.

use std::pin::Pin;
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
    inner: Incoming,
    limit: Option<u64>,
    received: u64,
}

impl RequestBody {
    /// Wraps a client body with an optional byte limit.
    pub(crate) fn new(inner: Incoming, limit: Option<u64>) -> Self {
        RequestBody {
            inner,
            limit,
            received: 0,
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
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
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
