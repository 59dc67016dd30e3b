//! The body type flashgate passes around, a wrapper that keeps something alive for exactly as
//! long as a body is being streamed (an in-flight slot, a connection's activity count), and the
//! request body limit (`max_body`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use crate::reject::Reject;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body flashgate forwards or answers with: streamed, never collected.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any streamed body (e.g. hyper's `Incoming`) without buffering it.
pub fn stream<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(|e| -> BoxError { e.into() }).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` until the body is finished or dropped.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Guarded {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: HttpBody, G> HttpBody for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // Finished: let go now rather than when hyper gets round to dropping the body.
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps `body` so `guard` lives as long as it streams.
pub fn guarded<G: Send + 'static>(body: Body, guard: G) -> Body {
    Guarded::new(body, guard).boxed_unsync()
}

/// The error a [`limited`] body fails with once it passes its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

pin_project_lite::pin_project! {
    struct Limited<B> {
        #[pin]
        inner: B,
        left: u64,
        max: u64,
        tripped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }
}

impl<B> HttpBody for Limited<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            if n > *this.left {
                this.tripped
                    .store(true, std::sync::atomic::Ordering::Release);
                return Poll::Ready(Some(Err(Box::new(TooLarge(*this.max)))));
            }
            *this.left -= n;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Streams `body` but fails it past `max` bytes. The flag tells the caller afterwards that
/// the limit (and not the network) ended the body, so it can answer 413.
pub fn limited(body: Body, max: u64) -> (Body, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let tripped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = Limited {
        inner: body,
        left: max,
        max,
        tripped: tripped.clone(),
    }
    .boxed_unsync();
    (body, tripped)
}
/// Set when the body limit (not the network) cut the request body short.
pub type BodyLimit = Option<Arc<AtomicBool>>;

pub fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Boxes the body for forwarding, enforcing `max` bytes: a declared length over it is refused
/// at once; a streamed body is cut off when it passes it.
pub fn limit_request(
    req: Request<Incoming>,
    max: Option<u64>,
) -> Result<(Request<Body>, BodyLimit), Reject> {
    let Some(max) = max else {
        return Ok((req.map(stream), None));
    };
    if declared_length(&req).is_some_and(|n| n > max) {
        return Err(Reject::PayloadTooLarge);
    }
    let (parts, b) = req.into_parts();
    let (b, tripped) = limited(stream(b), max);
    Ok((Request::from_parts(parts, b), Some(tripped)))
}
