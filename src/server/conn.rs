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

/// What a connection is served with besides its socket, the listener's settings and the app.
pub(super) struct Conn {
    pub peer: std::net::SocketAddr,
    /// Becomes true when the server stops; closed when the drain timeout is reached.
    pub stop: watch::Receiver<bool>,
    /// Header and idle timeouts.
    pub timeouts: (Duration, Duration),
    pub limits: HeadLimits,
    /// The connection's slot under `max_connections`, freed when the connection ends.
    #[expect(dead_code, reason = "held for its drop, which frees the slot")]
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// Serves one accepted connection until it closes or the server stops; between requests an
/// idle HTTP/1.1 connection waits here parked, with its socket and no hyper state.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in every parked connection's task"
)]
pub(super) fn serve_connection(
    protocols: Arc<Protocols>,
    mut stream: TcpStream,
    app: Arc<App>,
    mut conn: Conn,
) -> impl Future<Output = ()> + Send {
    // An `async move` block rather than an `async fn`: an `async fn` keeps its arguments twice
    // in its state (as passed, and moved into locals), and this state is what every parked
    // connection holds.
    async move {
        // The whole of `conn` must live in this task, its slot (`permit`) included: a block
        // captures only the fields it names, so take it whole here.
        let conn = &mut conn;
        let _counted = Connected::new(&app.metrics.connections);
        let activity = Arc::new(Activity::new(conn.limits));
        let outbox = Arc::new(Outbox::default());
        // Whether the client speaks HTTP/2: unknown until its first bytes arrive.
        let mut h2 = None;
        loop {
            // No hyper state exists here: an idle keep-alive connection waits with nothing but
            // its socket and this task, instead of hyper's read and write buffers (16 KiB or
            // more per connection, most of the cost of 10,000 idle clients).
            if *conn.stop.borrow() {
                return;
            }
            let waited = wait_for_bytes(
                &stream,
                &activity,
                &mut conn.stop,
                h2.is_none(),
                &conn.timeouts,
            )
            .await;
            let is_h2 = match waited {
                Waited::Bytes(sniffed) => *h2.get_or_insert(sniffed),
                Waited::Closed | Waited::Stop => return,
                Waited::TimedOut(verdict) => {
                    match verdict {
                        Verdict::HeaderTimeout => {
                            debug!(%conn.peer, "request head not received in time: closing")
                        }
                        Verdict::Idle | Verdict::Park => debug!(%conn.peer, "idle: closing"),
                    }
                    return;
                }
                Waited::Failed(e) => {
                    debug!(%conn.peer, error = %e, "connection failed while idle");
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
                let (app, activity, peer) = (app.clone(), activity.clone(), conn.peer);
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
            let watch = Watch {
                activity: &activity,
                stop: &mut conn.stop,
                peer: conn.peer,
                timeouts: conn.timeouts,
            };
            // hyper's connection and `drive` are boxed: their state (buffers, timers, the
            // shutdown watch) exists only while hyper serves, so a parked connection's task is
            // just `wait_for_bytes` and these locals.
            let ended = if is_h2 {
                let conn = Box::pin(protocols.h2.serve_connection(io, service));
                Box::pin(drive(conn, |c| c.graceful_shutdown(), watch, false)).await
            } else {
                let conn = Box::pin(protocols.h1.serve_connection(io, service).with_upgrades());
                Box::pin(drive(conn, |c| c.graceful_shutdown(), watch, true)).await
            };
            match ended {
                Ended::Closed => return,
                Ended::Parked(s) => stream = s,
                Ended::Detached(s, body) => {
                    // Boxed: only detached connections carry the writer's state.
                    Box::pin(detach::stream(s, body, &mut conn.stop)).await;
                    return;
                }
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

/// How a wait for the next request's bytes ended.
enum Waited {
    /// Bytes are there; on a new connection, whether they are the HTTP/2 preface.
    Bytes(bool),
    /// The client closed the connection.
    Closed,
    /// The server is stopping.
    Stop,
    /// No bytes in time (idle), or a head begun but not finished in time.
    TimedOut(Verdict),
    Failed(io::Error),
}

/// Waits until the connection has bytes to read, the client closes it, the server stops or a
/// timeout passes. On a new connection (`sniff`), also tells from the first bytes whether it
/// speaks HTTP/2 (prior knowledge). The bytes are peeked, not consumed, so hyper reads the
/// whole request head itself (and into one buffer, without the copy and regrowth of a
/// replayed prefix).
///
/// This is all a parked connection's task holds while it waits, so it is kept small: one
/// timer, set to the idle deadline (or the header deadline once a head has begun), and a peek
/// polled in place (a `peek` future is larger than the rest together).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in every parked connection's task"
)]
fn wait_for_bytes<'a>(
    stream: &'a TcpStream,
    activity: &'a Activity,
    stop: &'a mut watch::Receiver<bool>,
    sniff: bool,
    timeouts: &'a (Duration, Duration),
) -> impl Future<Output = Waited> + 'a {
    async move {
        let mut first = [0u8; H2_PREFACE.len()];
        let want = if sniff { first.len() } else { 1 };
        let timer = tokio::time::sleep_until(activity.deadline(timeouts.0, timeouts.1));
        tokio::pin!(timer);
        // Set while an incomplete start of the h2 preface waits to be peeked at again: a peek
        // does not consume, so the socket stays readable and must not be polled meanwhile.
        let mut repeek_at: Option<tokio::time::Instant> = None;
        loop {
            let peeked = tokio::select! {
                biased;
                _ = stop.changed() => return Waited::Stop,
                () = &mut timer => {
                    if let Some(verdict) = activity.timed_out_at_rest(timeouts.0, timeouts.1) {
                        return Waited::TimedOut(verdict);
                    }
                    let now = tokio::time::Instant::now();
                    let mut next = activity.deadline(timeouts.0, timeouts.1);
                    if next <= now {
                        // Not timed out although due: a request still counted in flight. Look
                        // again later rather than spin on a past deadline.
                        next = now + Duration::from_secs(1);
                    }
                    match repeek_at {
                        Some(at) if at > now => next = next.min(at),
                        // Time to peek again (or no peek waiting).
                        _ => repeek_at = None,
                    }
                    timer.as_mut().reset(next);
                    continue;
                }
                peeked = std::future::poll_fn(|cx| {
                    let mut buf = tokio::io::ReadBuf::new(&mut first[..want]);
                    stream.poll_peek(cx, &mut buf)
                }), if repeek_at.is_none() => peeked,
            };
            let n = match peeked {
                Ok(0) => return Waited::Closed,
                Ok(n) => n,
                Err(e) => return Waited::Failed(e),
            };
            activity.head_begins();
            if !sniff || first[..n] != H2_PREFACE[..n] {
                return Waited::Bytes(false);
            }
            if n == H2_PREFACE.len() {
                return Waited::Bytes(true);
            }
            let at = tokio::time::Instant::now() + PREFACE_REPEEK;
            repeek_at = Some(at);
            timer
                .as_mut()
                .reset(at.min(activity.deadline(timeouts.0, timeouts.1)));
        }
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
/// socket and a small task (a 768-byte task, its ~300-byte `Activity` and the socket's
/// registration, instead of ~16 KiB) while it waits.
const PARK_AFTER: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    /// A parked connection holds its task and nothing of hyper's: the task's state is what
    /// 10,000 idle clients cost. tokio rounds a task up to 128 bytes with ~112 of its own, so
    /// 648 bytes of state (release build; 664 in a test build) make a 768-byte task; before
    /// `wait_for_bytes`, `drive` and this function were reshaped it was 1,192 bytes (1,536 a
    /// task). The bound leaves a little room; a change that needs more should say what the
    /// extra bytes buy.
    #[tokio::test]
    async fn a_parked_connection_task_stays_small() {
        let config = crate::config::parse(
            "listen: 127.0.0.1:0\nupstream: { url: \"http://127.0.0.1:9\" }\nroutes:\n  - name: rest\n    match: { path: \"/{*rest}\" }\n",
            "test.yaml",
        )
        .expect("a valid config");
        let protocols = Arc::new(protocols(&config.server));
        let app = App::build(config).await.expect("an app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let (_stop_tx, stop) = watch::channel(false);
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let conn = Conn {
            peer,
            stop,
            timeouts: (Duration::from_secs(1), Duration::from_secs(1)),
            limits: HeadLimits {
                max_head: 8192,
                max_uri: 8192,
            },
            permit,
        };
        let task = serve_connection(protocols, stream, app, conn);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 680,
            "a connection task's state grew to {size} bytes"
        );
        drop(client);
    }
}
