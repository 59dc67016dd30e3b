//! Serving one client connection: the HTTP/1.1 and HTTP/2 settings ([`Protocols`]), telling
//! h2c (prior knowledge) from HTTP/1.1 by peeking at the first bytes, handing requests to
//! [`gate::handle`], and driving hyper's connection under the header and idle timeouts and the
//! graceful shutdown. When an idle HTTP/1.1 connection is parked, the socket comes back here
//! and waits, with no hyper state, for its next request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

use super::activity::{Activity, HeadLimits, Verdict};
use super::detach;
use super::watched::Watched;
use crate::config::Server as ServerConfig;
use crate::gate;
use crate::interim::Outbox;
use crate::state::App;

/// The HTTP/1.1 and HTTP/2 settings, shared by every connection of a listener (one copy per
/// listener instead of one inside every connection task).
pub(super) struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

pub(super) fn protocols(cfg: &ServerConfig) -> Protocols {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        // `Activity` enforces `header_read_timeout`. hyper's own header timer (30 s unless
        // set) also ran on idle keep-alive connections, closing them at 30 s whatever
        // `keep_alive_timeout` said, and cost a timer allocation per request.
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(cfg.max_headers);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    Protocols { h1, h2 }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), which an h2c prior-knowledge client sends
/// first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long to wait before peeking again at a connection whose first bytes are an incomplete
/// start of the HTTP/2 preface (a peek does not consume, so the socket stays readable).
const PREFACE_REPEEK: Duration = Duration::from_millis(5);

/// How a served stretch of a connection ended.
enum Ended {
    /// The connection is closed (or handed over to an upgrade).
    Closed,
    /// hyper let go of an idle HTTP/1.1 connection: the socket is back, open and idle.
    Parked(TcpStream),
    /// hyper wrote the head of a long-lived response and let go of the connection; the
    /// socket and the response's body are back (see `detach.rs`).
    Detached(TcpStream, crate::body::Body),
}

/// Serves one accepted connection until it closes or the server stops; between requests an
/// idle HTTP/1.1 connection waits here parked, with its socket and no hyper state.
pub(super) async fn serve_connection(
    protocols: Arc<Protocols>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
    timeouts: (Duration, Duration),
    limits: HeadLimits,
) {
    let (header_timeout, idle_timeout) = timeouts;
    let _counted = Connected::new(&app.metrics.connections);
    let activity = Arc::new(Activity::new(limits));
    let outbox = Arc::new(Outbox::default());
    let mut stream = stream;
    // Whether the client speaks HTTP/2: unknown until its first bytes arrive.
    let mut h2 = None;
    loop {
        // No hyper state exists here: an idle keep-alive connection waits with nothing but
        // its socket and this task, instead of hyper's read and write buffers (16 KiB or
        // more per connection, most of the cost of 10,000 idle clients).
        if *stop.borrow() {
            return;
        }
        let waited = tokio::select! {
            w = wait_for_bytes(&stream, &activity, h2.is_none()) => w,
            _ = stop.changed() => return,
            verdict = activity.watch(header_timeout, idle_timeout, None) => {
                match verdict {
                    Verdict::HeaderTimeout => debug!(%peer, "request head not received in time: closing"),
                    Verdict::Idle | Verdict::Park => debug!(%peer, "idle: closing"),
                }
                return;
            }
        };
        let is_h2 = match waited {
            Ok(Some(sniffed)) => *h2.get_or_insert(sniffed),
            Ok(None) => return,
            Err(e) => {
                debug!(%peer, error = %e, "connection failed while idle");
                return;
            }
        };
        // Early hints from the backend reach an HTTP/1.1 client through the socket wrapper;
        // hyper's h2 server cannot send a 1xx.
        let hints = (!is_h2).then(|| outbox.clone());
        let io = TokioIo::new(Watched::new(stream, activity.clone(), hints.clone()));
        if is_h2 {
            activity.line().switch_off();
        }
        let service = {
            let (app, activity) = (app.clone(), activity.clone());
            service_fn(move |req: Request<Incoming>| {
                let hints = hints.clone();
                // The body's exact length tells `Activity` when hyper has read all of this
                // request; a possible upgrade (hyper marks it) may take the socket over.
                let body_len = if req.extensions().get::<OnUpgrade>().is_some() {
                    // The socket may be handed over: its bytes are not request lines.
                    activity.line().switch_off();
                    None
                } else {
                    req.body().size_hint().exact()
                };
                let (busy, marks) = activity.begin_request(body_len);
                let mut req = req;
                if marks.two_framings {
                    req.extensions_mut().insert(gate::TwoFramings);
                }
                if marks.uri_too_long {
                    req.extensions_mut().insert(gate::UriTooLong);
                }
                // A long-lived response leaves hyper on HTTP/1.1 only (chunked framing).
                let may_detach = !is_h2 && req.version() == http::Version::HTTP_11;
                let app = app.clone();
                async move {
                    let resp = gate::handle(app, peer, hints, req).await?;
                    Ok::<_, std::convert::Infallible>(detach::offer(resp, busy, may_detach))
                }
            })
        };
        // Boxed: the connection task keeps only a pointer while the connection is parked.
        let watch = Watch {
            activity: &activity,
            stop: &mut stop,
            peer,
            timeouts,
        };
        let ended = if is_h2 {
            let conn = Box::pin(protocols.h2.serve_connection(io, service));
            drive(conn, |c| c.graceful_shutdown(), watch, false).await
        } else {
            let conn = Box::pin(protocols.h1.serve_connection(io, service).with_upgrades());
            drive(conn, |c| c.graceful_shutdown(), watch, true).await
        };
        match ended {
            Ended::Closed => return,
            Ended::Parked(s) => stream = s,
            Ended::Detached(s, body) => {
                // Boxed: only detached connections carry the writer's state.
                Box::pin(detach::stream(s, body, &mut stop)).await;
                return;
            }
        }
    }
}

/// One open client connection in `flashgate_connections`, until it drops.
struct Connected(prometheus_client::metrics::gauge::Gauge);

impl Connected {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Connected {
        gauge.inc();
        Connected(gauge.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Waits until the connection has bytes to read; `None` if the client closed it instead. On a
/// new connection (`sniff`), also tells from the first bytes whether it speaks HTTP/2 (prior
/// knowledge): `Some(true)` for the h2 preface, `Some(false)` for anything else. The bytes are
/// peeked, not consumed, so hyper reads the whole request head itself (and into one buffer,
/// without the copy and regrowth of a replayed prefix).
async fn wait_for_bytes(
    stream: &TcpStream,
    activity: &Activity,
    sniff: bool,
) -> io::Result<Option<bool>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let want = if sniff { first.len() } else { 1 };
    loop {
        let n = stream.peek(&mut first[..want]).await?;
        if n == 0 {
            return Ok(None);
        }
        activity.head_begins();
        if !sniff || first[..n] != H2_PREFACE[..n] {
            return Ok(Some(false));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        tokio::time::sleep(PREFACE_REPEEK).await;
    }
}

/// What [`drive`] watches besides hyper's connection.
struct Watch<'a> {
    activity: &'a Activity,
    stop: &'a mut watch::Receiver<bool>,
    peer: std::net::SocketAddr,
    /// Header and idle timeouts.
    timeouts: (Duration, Duration),
}

/// Serves one connection with hyper until it closes, or until hyper lets go of it while it is
/// idle (HTTP/1.1 only, see [`Activity::try_park`]); meanwhile applies the header and idle
/// timeouts and the graceful shutdown.
async fn drive<C>(
    mut conn: Pin<Box<C>>,
    graceful_shutdown: fn(Pin<&mut C>),
    watch: Watch<'_>,
    may_park: bool,
) -> Ended
where
    C: Future<Output = hyper::Result<()>>,
{
    let Watch {
        activity,
        stop,
        peer,
        timeouts: (header_timeout, idle_timeout),
    } = watch;
    let park_after = may_park.then_some(PARK_AFTER);
    let mut graceful = false;
    loop {
        tokio::select! {
            // In this order: `watch` must see what polling hyper just changed.
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                // Dropping hyper's connection drops its I/O, which hands a parked socket back.
                drop(conn);
                return match activity.take_parked() {
                    Some(stream) if !graceful => Ended::Parked(stream),
                    _ => Ended::Closed,
                };
            }
            // A long-lived response's head is out: the connection leaves hyper.
            () = activity.detach.ready() => {
                activity.keep_socket();
                drop(conn);
                return match (activity.take_parked(), activity.detach.take()) {
                    (Some(stream), Some(body)) => Ended::Detached(stream, body),
                    _ => Ended::Closed,
                };
            }
            changed = stop.changed() => {
                if changed.is_err() {
                    debug!(%peer, "drain timeout reached: closing");
                    return Ended::Closed;
                }
                if !graceful {
                    graceful = true;
                    graceful_shutdown(conn.as_mut());
                }
            }
            verdict = activity.watch(header_timeout, idle_timeout, park_after), if !graceful => match verdict {
                Verdict::HeaderTimeout => {
                    debug!(%peer, "request head not received in time: closing");
                    return Ended::Closed;
                }
                Verdict::Idle => {
                    graceful = true;
                    graceful_shutdown(conn.as_mut());
                }
                // hyper's next read (right away: the loop polls the connection first) ends the
                // session; the socket comes back through `take_parked`.
                Verdict::Park => activity.want_park(),
            },
        }
    }
}

/// How long an HTTP/1.1 connection stays idle before hyper's state for it is dropped. A park
/// and the next request's fresh hyper state cost ~10k instructions (a fifth of a proxied
/// request, measured with callgrind), so a client that keeps requesting (a load generator, a
/// busy proxy in front) should never park; one that pauses longer than this holds only its
/// socket and a small task (~2 KiB instead of ~16 KiB) while it waits.
const PARK_AFTER: Duration = Duration::from_millis(100);
