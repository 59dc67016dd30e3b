//! Informational (1xx) answers from the backend. hyper's client reads them and goes on to
//! the final response; flashgate looks at each one on the way ([`Interim`]):
//!
//! - `103 Early Hints` go on to an HTTP/1.1 client at once, through the connection's
//!   [`Outbox`]: the socket wrapper (`server/watched.rs`) writes them ahead of anything hyper
//!   writes next, so they always precede the final response. An HTTP/1.0 client never gets a
//!   1xx (RFC 9110 §15.2). An HTTP/2 client does not get them either, for now: hyper's server
//!   has no way to send an informational response (hyperium/hyper#4114).
//! - A bare `100`/`102` with nothing after it is a backend that took it for its answer.
//!   flashgate never sends `Expect` upstream (it answers the client's itself), so a `100` is
//!   unsolicited, and `102` (WebDAV's, dropped by RFC 4918) is rare: once one arrives, the
//!   final response must follow within `upstream.interim_timeout`, or the client gets 502
//!   `bad_upstream_response` then instead of waiting out `request_timeout`.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use http::{Request, StatusCode};

/// Bytes of early hints one connection holds before the socket takes them; hints past it are
/// dropped (they are only hints).
const MAX_OUTBOX: usize = 64 * 1024;

/// Early hints on their way to one HTTP/1.1 client connection: filled by the request being
/// forwarded, emptied by the connection's socket wrapper before hyper's next bytes.
#[derive(Default)]
pub struct Outbox {
    pending: AtomicBool,
    bytes: Mutex<Vec<u8>>,
    /// The connection's task, woken to write hints while its response is still awaited.
    conn: AtomicWaker,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    fn push(&self, head: &[u8]) {
        {
            let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
            if bytes.len() + head.len() > MAX_OUTBOX {
                return;
            }
            bytes.extend_from_slice(head);
        }
        self.pending.store(true, Ordering::Release);
        self.conn.wake();
    }

    /// Moves waiting hints to the end of `out` (the socket wrapper's bytes to write first).
    pub fn take_into(&self, out: &mut Vec<u8>) {
        if self.pending.swap(false, Ordering::Acquire) {
            let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
            out.append(&mut bytes);
        }
    }

    /// The connection's task, to wake when hints arrive while it waits for a response.
    pub fn register(&self, waker: &Waker) {
        self.conn.register(waker);
    }
}

/// What the backend sent before its final response, as hyper's client read it.
#[derive(Default)]
struct Seen {
    /// Encoded `103` heads for the client, when it takes them.
    hints: Mutex<Vec<u8>>,
    /// A `100`/`102` arrived (since the last look).
    bare: AtomicBool,
    any: AtomicBool,
    forward: AtomicWaker,
}

/// One forwarded request's watch on the backend's informational answers.
pub struct Interim {
    seen: Arc<Seen>,
    outbox: Option<Arc<Outbox>>,
    /// A bare `100`/`102` came: whatever goes wrong next is the backend's answer gone bad,
    /// not an unreachable backend.
    saw_bare: bool,
}

/// The backend sent a bare `100`/`102` and then nothing within `interim_timeout`.
#[derive(Debug)]
pub struct OnlyInterim(pub Duration);

impl Interim {
    /// Starts watching `req`'s informational answers; 103s go to `outbox` (`None`: the client
    /// cannot take them).
    pub fn watch<B>(req: &mut Request<B>, outbox: Option<Arc<Outbox>>) -> Interim {
        let seen = Arc::new(Seen::default());
        let hints_wanted = outbox.is_some();
        let s = seen.clone();
        hyper::ext::on_informational(req, move |res| {
            let status = res.status();
            if status == StatusCode::EARLY_HINTS {
                if hints_wanted {
                    let mut hints = s.hints.lock().unwrap_or_else(|p| p.into_inner());
                    encode_103(res.headers(), &mut hints);
                }
            } else if status != StatusCode::SWITCHING_PROTOCOLS {
                s.bare.store(true, Ordering::Release);
            }
            s.any.store(true, Ordering::Release);
            s.forward.wake();
        });
        Interim {
            seen,
            outbox,
            saw_bare: false,
        }
    }

    /// Whether the backend sent a bare `100`/`102` (so far).
    pub fn saw_bare(&self) -> bool {
        self.saw_bare
    }

    /// Awaits `response` (the request in flight), passing early hints on as they come; after
    /// a bare `100`/`102`, gives the final response `interim_timeout` to start.
    pub async fn until_final<F: Future>(
        &mut self,
        response: F,
        interim_timeout: Duration,
    ) -> Result<F::Output, OnlyInterim> {
        let mut response = pin!(response);
        let mut silence: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| {
            self.seen.forward.register(cx.waker());
            // Hints first: they must reach the outbox before the final response can.
            if self.seen.any.swap(false, Ordering::Acquire) {
                let hints =
                    std::mem::take(&mut *self.seen.hints.lock().unwrap_or_else(|p| p.into_inner()));
                if let Some(outbox) = &self.outbox
                    && !hints.is_empty()
                {
                    outbox.push(&hints);
                }
                if self.seen.bare.swap(false, Ordering::Acquire) {
                    self.saw_bare = true;
                    silence = Some(Box::pin(tokio::time::sleep(interim_timeout)));
                }
            }
            if let Poll::Ready(out) = response.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            match silence.as_mut().map(|s| s.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(OnlyInterim(interim_timeout))),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

/// Appends `HTTP/1.1 103 Early Hints` with `headers` (minus hop-by-hop ones) to `out`.
fn encode_103(headers: &http::HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\n");
    let mut headers = headers.clone();
    crate::forward::strip_hop_by_hop(&mut headers);
    for (name, value) in &headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_103_is_encoded_without_hop_by_hop_fields() {
        let mut h = http::HeaderMap::new();
        h.append("link", "</a.css>; rel=preload".parse().expect("value"));
        h.append("link", "</b.js>; rel=preload".parse().expect("value"));
        h.append("connection", "close".parse().expect("value"));
        let mut out = Vec::new();
        encode_103(&h, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\
             link: </b.js>; rel=preload\r\n\r\n"
        );
    }

    #[test]
    fn the_outbox_hands_out_hints_once_and_caps_them() {
        let outbox = Outbox::default();
        let mut out = Vec::new();
        outbox.take_into(&mut out);
        assert!(out.is_empty());
        outbox.push(b"one");
        outbox.push(&vec![b'x'; MAX_OUTBOX]);
        outbox.take_into(&mut out);
        assert_eq!(out, b"one");
        outbox.take_into(&mut out);
        assert_eq!(out, b"one");
    }
}
