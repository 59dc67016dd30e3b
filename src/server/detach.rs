//! Long-lived responses (a stock stream, `stock_events.rs`) on HTTP/1.1 without hyper.
//!
//! An HTTP/1.1 connection with a response in flight cannot be parked: hyper keeps its read and
//! write buffers and dispatcher (~16 KiB) for as long as the body streams, which for 10,000
//! shoppers watching a sale is most of the memory. A response marked [`Detach`] is instead
//! taken out of hyper once its head is written:
//!
//! 1. hyper writes the head (`Transfer-Encoding: chunked`: the body has no length) and polls
//!    the body, which is a [`Handover`]: its first poll puts the real body in the
//!    connection's [`Slot`] and never wakes hyper again;
//! 2. hyper flushes; the flush that follows the offer means every byte of the head is on the
//!    socket (hyper flushes the socket only once its own write buffer is empty), and the slot
//!    is ready;
//! 3. the connection task (`conn.rs`) drops hyper's connection, keeps the socket (as a park
//!    does) and runs [`stream`]: it writes each frame of the body as a chunk, ends with the
//!    last chunk when the body ends or the server stops, and closes when the client does.
//!
//! What a detached response keeps: the socket, the connection task and the body. A client
//! that stops reading holds at most what the kernel's socket buffer takes; a write that makes
//! no progress for [`STALL`] drops the client. Bytes the client sends on a detached
//! connection (an EventSource client sends none) close it: there is no next request to read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

use super::activity::{Activity, Busy};
use crate::body::{self, Body, BoxError};

/// Marks a response whose body streams for long: on an HTTP/1.1 connection the server takes
/// it out of hyper once the head is written (see the module doc). Harmless elsewhere (h2,
/// HTTP/1.0): hyper streams it as usual.
#[derive(Debug, Clone, Copy)]
pub struct Detach;

/// A write to a detached client that makes no progress for this long drops the client.
pub const STALL: Duration = Duration::from_secs(10);
/// Bound on writing the last chunk at the end of a stream.
const LAST_CHUNK_WAIT: Duration = Duration::from_secs(1);

const IDLE: u8 = 0;
const OFFERED: u8 = 1;
const READY: u8 = 2;

/// Where a connection's detached body waits for the connection task (one per connection).
#[derive(Default)]
pub(super) struct Slot {
    body: Mutex<Option<Body>>,
    state: AtomicU8,
}

impl Slot {
    fn offer(&self, body: Body) {
        *self.body.lock().unwrap_or_else(|p| p.into_inner()) = Some(body);
        self.state.store(OFFERED, Ordering::Release);
    }

    /// hyper flushed the socket: after an offer, the head is all written.
    pub(super) fn flushed(&self) {
        let _ = self
            .state
            .compare_exchange(OFFERED, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Resolves once a body is offered and the head is out. Needs no waker: the state only
    /// changes while the connection task polls hyper, and `drive` polls this right after.
    pub(super) async fn ready(&self) {
        std::future::poll_fn(|_| {
            if self.state.load(Ordering::Acquire) == READY {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    pub(super) fn take(&self) -> Option<Body> {
        self.state.store(IDLE, Ordering::Release);
        self.body.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The answer to one request, as handed to hyper: the body keeps `busy` (the request is in
/// flight until it ends), and a [`Detach`] response on an HTTP/1.1 connection (`may_detach`)
/// goes through a [`Handover`].
pub(super) fn offer(resp: Response<Body>, busy: Busy, may_detach: bool) -> Response<Body> {
    let detach = may_detach
        && resp.extensions().get::<Detach>().is_some()
        && resp.status() == http::StatusCode::OK;
    if !detach {
        return resp.map(|b| body::guarded(b, busy));
    }
    let activity = busy.activity().clone();
    resp.map(|b| {
        Handover {
            body: Some(body::guarded(b, busy)),
            activity,
        }
        .boxed_unsync()
    })
}

/// The body hyper sees for a detached response: offers the real one on the first poll, then
/// waits for the connection task to take the connection away.
struct Handover {
    body: Option<Body>,
    activity: Arc<Activity>,
}

impl HttpBody for Handover {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(body) = this.body.take() {
            this.activity.detach.offer(body);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Writes a detached response's body on `stream` as chunks until it ends, the client leaves
/// or stalls, or the server stops.
pub(super) async fn stream(stream: TcpStream, mut body: Body, stop: &mut watch::Receiver<bool>) {
    let mut scratch = [0u8; 64];
    loop {
        if *stop.borrow() {
            finish(&stream).await;
            return;
        }
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if let Err(e) = write_chunk(&stream, &data).await {
                        debug!(error = %e, "detached stream: client gone or stalled");
                        return;
                    }
                }
                Some(Err(e)) => {
                    // Closed without the last chunk: the client sees the body cut short.
                    debug!(error = %e, "detached stream: body failed");
                    return;
                }
                None => {
                    finish(&stream).await;
                    return;
                }
            },
            readable = stream.readable() => {
                if readable.is_err() {
                    return;
                }
                match stream.try_read(&mut scratch) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Closed (0), failed, or sent bytes nobody will read.
                    _ => return,
                }
            }
            changed = stop.changed() => {
                if changed.is_ok() {
                    finish(&stream).await;
                }
                return;
            }
        }
    }
}

/// One chunk: its size in hex, the data, CRLF.
async fn write_chunk(stream: &TcpStream, data: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 18];
    let n = {
        let mut w = &mut head[..];
        io::Write::write_fmt(&mut w, format_args!("{:x}\r\n", data.len()))?;
        18 - w.len()
    };
    write_all(stream, [&head[..n], data, b"\r\n"], STALL).await
}

/// The last chunk, best effort.
async fn finish(stream: &TcpStream) {
    let _ = write_all(stream, [b"0\r\n\r\n", &[], &[]], LAST_CHUNK_WAIT).await;
}

/// Writes every part, failing if a write makes no progress for `stall`. The first try costs
/// no timer: one arms only when the socket is full.
async fn write_all(stream: &TcpStream, mut parts: [&[u8]; 3], stall: Duration) -> io::Result<()> {
    while parts.iter().any(|p| !p.is_empty()) {
        let slices = parts.map(io::IoSlice::new);
        match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => advance(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::timeout(stall, stream.writable())
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stalled"))??;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Drops `n` written bytes from the front of `parts`.
fn advance(parts: &mut [&[u8]; 3], mut n: usize) {
    for part in parts.iter_mut() {
        let k = n.min(part.len());
        *part = &part[k..];
        n -= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that stops reading is dropped once a write makes no progress for the stall
    /// bound, instead of flashgate buffering for it.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let started = std::time::Instant::now();
        let mut failed = None;
        // The kernel's buffers fill after a few MiB at most; bounded anyway.
        for _ in 0..4096 {
            if let Err(e) = write_all(&server, [&chunk, &[], &[]], Duration::from_millis(200)).await
            {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("writes to a client that never reads went on");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(client);
    }

    #[test]
    fn advance_across_parts() {
        let mut parts: [&[u8]; 3] = [b"ab", b"cde", b"f"];
        advance(&mut parts, 3);
        assert_eq!(parts, [&b""[..], b"de", b"f"]);
        advance(&mut parts, 3);
        assert!(parts.iter().all(|p| p.is_empty()));
    }
}
