//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, a cap on connections, a
//! header-read timeout against slowloris, a keep-alive idle timeout, and graceful shutdown
//! that stops accepting and drains in-flight requests within the drain timeout.
//!
//! An HTTP/1.1 connection idle for [`PARK_AFTER`] is parked: hyper's state for it (read and
//! write buffers, dispatcher) is dropped and only the socket waits for the next request, which
//! starts a fresh hyper connection on it. Idle keep-alive clients are most of a sale's
//! connections, and hyper's buffers were most of their cost.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::Request;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::body;
use crate::config::Server as ServerConfig;
use crate::framing::HeadScan;
use crate::gate;
use crate::head_errors;
use crate::request_line::RequestLine;
use crate::state::App;

/// Serves `listener` until `shutdown` resolves, then drains. Used by `main` and by tests
/// (bind `127.0.0.1:0`); holds no global state, so one process can run many instances.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let connections = Arc::new(Semaphore::new(app.snapshot().config.server.max_connections));
    run_shared(listener, app, shutdown, connections).await
}

/// Like [`run`], with the connection cap shared by several listeners (one per core).
pub async fn run_shared(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    connections: Arc<Semaphore>,
) -> io::Result<()> {
    let cfg = app.snapshot().config.server.clone();
    let protocols = Arc::new(protocols(&cfg));
    let tracker = TaskTracker::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);

    info!(addr = %listener.local_addr()?, "listening");
    loop {
        // Wait for a free connection slot before accepting: over the cap, new connections
        // queue in the kernel backlog instead of being accepted and starved.
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p.map_err(io::Error::other)?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let protocols = protocols.clone();
        let stop = stop_rx.clone();
        let timeouts = (cfg.header_read_timeout, cfg.keep_alive_timeout);
        let limits = HeadLimits {
            max_head: cfg.max_header_bytes,
            max_uri: cfg.max_uri_bytes,
        };
        tracker.spawn(async move {
            serve_connection(protocols, stream, peer, app, stop, timeouts, limits).await;
            drop(permit);
        });
    }

    drop(listener);
    let drain_started = Instant::now();
    tracker.close();
    info!(connections = tracker.len(), drain_timeout = ?cfg.drain_timeout, "shutting down: draining");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            left = tracker.len(),
            "drain timeout reached; closing remaining connections"
        );
    } else {
        info!("drained");
    }
    // Dropping the sender is the signal for connections still open to close now (their tasks
    // are not owned by this function and would otherwise outlive it).
    drop(stop_tx);
    // What the answered requests left to record (an order's settle) gets the rest of the
    // drain time: the process exits after this, and an unrecorded order would stay `held`.
    app.bookkeeping.close();
    let left = cfg.drain_timeout.saturating_sub(drain_started.elapsed());
    if tokio::time::timeout(left, app.bookkeeping.wait())
        .await
        .is_err()
    {
        warn!(
            left = app.bookkeeping.len(),
            "drain timeout reached with store bookkeeping unfinished"
        );
    }
    Ok(())
}

/// A listening socket with `SO_REUSEPORT`, so that one listener per core can share the port
/// and the kernel spreads new connections across them.
pub fn bind_reuseport(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Serves `addr` with `threads` single-threaded runtimes, each with its own listener
/// (`SO_REUSEPORT`) and upstream pool: a request stays on one core from accept to response,
/// the way nginx workers do, instead of hopping between threads. Returns when every thread
/// has drained after `shutdown`.
pub async fn run_per_core(
    addr: std::net::SocketAddr,
    threads: usize,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // SO_REUSEPORT would let us share the port with whatever already listens there (say, a
    // flashgate started twice) and silently split its traffic. A plain bind first fails loudly.
    drop(bind_exclusive(addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e} (is another server running?)"),
        )
    })?);
    let connections = Arc::new(Semaphore::new(app.snapshot().config.server.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let listener = bind_reuseport(addr)?;
        let (app, connections, mut stop) = (app.clone(), connections.clone(), stop_rx.clone());
        let handle = std::thread::Builder::new()
            .name(format!("flashgate-{i}"))
            .spawn(move || -> io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    run_shared(listener, app, stopped, connections).await
                })
            })?;
        handles.push(handle);
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    let joined = tokio::task::spawn_blocking(move || {
        for h in handles {
            match h.join() {
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a server thread panicked")),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    });
    joined.await.map_err(io::Error::other)?
}

fn bind_exclusive(addr: std::net::SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)?;
    Ok(socket)
}

/// The HTTP/1.1 and HTTP/2 settings, shared by every connection of a listener (one copy per
/// listener instead of one inside every connection task).
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

fn protocols(cfg: &ServerConfig) -> Protocols {
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
}

async fn serve_connection(
    protocols: Arc<Protocols>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
    timeouts: (Duration, Duration),
    limits: HeadLimits,
) {
    let (header_timeout, idle_timeout) = timeouts;
    let activity = Arc::new(Activity::new(limits));
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
        let io = TokioIo::new(Watched::new(stream, activity.clone(), !is_h2));
        if is_h2 {
            activity.line().switch_off();
        }
        let service = {
            let (app, activity) = (app.clone(), activity.clone());
            service_fn(move |req: Request<Incoming>| {
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
                let app = app.clone();
                async move {
                    let resp = gate::handle(app, peer, req).await?;
                    Ok::<_, std::convert::Infallible>(resp.map(|b| body::guarded(b, busy)))
                }
            })
        };
        // Boxed: the connection task keeps only a pointer while the connection is parked.
        let ended = if is_h2 {
            let conn = Box::pin(protocols.h2.serve_connection(io, service));
            drive(
                conn,
                |c| c.graceful_shutdown(),
                &activity,
                &mut stop,
                peer,
                timeouts,
                false,
            )
            .await
        } else {
            let conn = Box::pin(protocols.h1.serve_connection(io, service).with_upgrades());
            drive(
                conn,
                |c| c.graceful_shutdown(),
                &activity,
                &mut stop,
                peer,
                timeouts,
                true,
            )
            .await
        };
        match ended {
            Ended::Closed => return,
            Ended::Parked(s) => stream = s,
        }
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

/// Serves one connection with hyper until it closes, or until hyper lets go of it while it is
/// idle (HTTP/1.1 only, see [`Activity::try_park`]); meanwhile applies the header and idle
/// timeouts and the graceful shutdown.
async fn drive<C>(
    mut conn: Pin<Box<C>>,
    graceful_shutdown: fn(Pin<&mut C>),
    activity: &Activity,
    stop: &mut watch::Receiver<bool>,
    peer: std::net::SocketAddr,
    (header_timeout, idle_timeout): (Duration, Duration),
    may_park: bool,
) -> Ended
where
    C: Future<Output = hyper::Result<()>>,
{
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

/// What one connection is doing, for the header and idle timeouts, and whether hyper's read
/// buffer is certainly empty (so that an idle HTTP/1.1 connection can be parked).
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the connection last became idle (ms since epoch).
    idle_since: AtomicU64,
    /// When bytes of a new request head started arriving on an idle connection; 0 = none.
    head_started: AtomicU64,
    head_scan: std::sync::Mutex<HeadScan>,
    /// Repairs each request line as it is read (see `request_line.rs`).
    line: std::sync::Mutex<RequestLine>,
    limits: HeadLimits,
    /// Bytes of the current request's body not read yet, or [`UNACCOUNTED`]: bytes were read
    /// that hyper may still hold (a pipelined request, a chunked body, an upgrade...).
    unread_body: AtomicU64,
    /// The connection task asked hyper's next idle read to end the session.
    park_wanted: AtomicBool,
    /// The session is ending for a park: the socket must be kept, not shut down.
    parking: AtomicBool,
    /// Where the I/O puts the socket back when hyper drops it after a park.
    parked: std::sync::Mutex<Option<TcpStream>>,
}

const UNACCOUNTED: u64 = u64::MAX;

/// Limits on a request head, checked as its bytes are read.
#[derive(Debug, Clone, Copy)]
struct HeadLimits {
    max_head: usize,
    max_uri: usize,
}

/// What was noticed in a request head as it was read.
#[derive(Debug, Clone, Copy)]
struct HeadMarks {
    two_framings: bool,
    uri_too_long: bool,
}

enum Verdict {
    HeaderTimeout,
    Idle,
    /// Idle long enough to drop hyper's state (see [`Activity::try_park`]).
    Park,
}

impl Activity {
    fn new(limits: HeadLimits) -> Self {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            head_scan: std::sync::Mutex::new(HeadScan::default()),
            line: std::sync::Mutex::new(RequestLine::default()),
            limits,
            unread_body: AtomicU64::new(UNACCOUNTED),
            park_wanted: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            parked: std::sync::Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 can mean "not set".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Bytes of a request head have arrived (starts the header timeout).
    fn head_begins(&self) {
        // Read the clock only for the first bytes of a head.
        if self.head_started.load(Ordering::Acquire) == 0 {
            let _ = self.head_started.compare_exchange(
                0,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.head_begins();
            self.scan().feed(bytes, self.limits.max_head);
        } else {
            let n = bytes.len() as u64;
            let _ = self
                .unread_body
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    Some(if left >= n { left - n } else { UNACCOUNTED })
                });
        }
    }

    /// Bytes just read, as hyper should see them: a request line in head position repaired.
    fn repair_line(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        self.line().repair(bytes, self.limits.max_uri)
    }

    fn line(&self) -> std::sync::MutexGuard<'_, RequestLine> {
        // Held for one pass over the bytes just read, never across an await.
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scan(&self) -> std::sync::MutexGuard<'_, HeadScan> {
        // Held for a copy of the bytes just read, never across an await.
        self.head_scan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request head was parsed: the connection is busy until its response is sent. Also
    /// says what was noticed in that head (two framings, see `framing.rs`; a cut request
    /// line, see `request_line.rs`). `body_len` is the exact length of the request body, when
    /// it is known.
    fn begin_request(self: &Arc<Self>, body_len: Option<u64>) -> (Busy, HeadMarks) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        self.park_wanted.store(false, Ordering::Release);
        let scanned = self.scan().take(body_len, self.limits.max_head);
        let uri_too_long = {
            let mut line = self.line();
            let cut = line.too_long();
            line.next_request();
            cut
        };
        // Whatever was read past the head is the start of the body; more than the body means
        // a pipelined request is (partly) in hyper's buffer.
        let unread = match (scanned.past_head, body_len) {
            (Some(past), Some(len)) if past <= len => len - past,
            _ => UNACCOUNTED,
        };
        self.unread_body.store(unread, Ordering::Release);
        let marks = HeadMarks {
            two_framings: scanned.two_framings,
            uri_too_long,
        };
        (Busy(self.clone()), marks)
    }

    /// Whether hyper, asking to read now, holds no unread bytes: no request in flight, no
    /// bytes of a next head read, and every byte read since the last head belonged to its body.
    fn nothing_buffered(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == 0
            && self.unread_body.load(Ordering::Acquire) == 0
    }

    /// Bytes of a request head have arrived and no request was made of them (yet): what
    /// hyper writes now is its own answer to a head it refused.
    fn head_without_request(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) != 0
    }

    fn want_park(&self) {
        self.park_wanted.store(true, Ordering::Release);
    }

    /// Called by the I/O when hyper's read would block: decides whether to answer with an end
    /// of stream instead, which hyper takes, on an idle connection, as the client closing; it
    /// then drops its connection state without an error or a response. Only when hyper's read
    /// buffer is empty, or that end of stream would cut a request short.
    fn try_park(&self) -> bool {
        if self.park_wanted.load(Ordering::Acquire) && self.nothing_buffered() {
            self.parking.store(true, Ordering::Release);
            true
        } else {
            false
        }
    }

    fn is_parking(&self) -> bool {
        self.parking.load(Ordering::Acquire)
    }

    fn put_parked(&self, stream: TcpStream) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
    }

    fn take_parked(&self) -> Option<TcpStream> {
        self.parking.store(false, Ordering::Release);
        self.park_wanted.store(false, Ordering::Release);
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Resolves when the connection should be closed, or, given `park_after`, when it has been
    /// idle that long with nothing left in hyper's buffer. Looks at the timeouts at a coarse
    /// tick, and wakes exactly when a park is due. A busy connection arms no park: every change
    /// to that state happens while the task polls hyper, and `drive` polls this right after.
    async fn watch(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
        park_after: Option<Duration>,
    ) -> Verdict {
        let tick = (header_timeout.min(idle_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let header_ms = u64::try_from(header_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let sleep = tokio::time::sleep(tick);
        tokio::pin!(sleep);
        std::future::poll_fn(|cx| {
            loop {
                let park_due = park_after
                    .filter(|_| {
                        !self.park_wanted.load(Ordering::Acquire) && self.nothing_buffered()
                    })
                    .map(|after| {
                        let idle_since = self.idle_since.load(Ordering::Acquire);
                        tokio::time::Instant::from_std(
                            self.epoch + Duration::from_millis(idle_since) + after,
                        )
                    });
                if let Some(due) = park_due
                    && sleep.deadline() > due
                {
                    sleep.as_mut().reset(due);
                }
                ready!(sleep.as_mut().poll(cx));
                if park_due.is_some_and(|due| tokio::time::Instant::now() >= due) {
                    return Poll::Ready(Verdict::Park);
                }
                if let Some(verdict) = self.timed_out(header_ms, idle_ms) {
                    return Poll::Ready(verdict);
                }
                sleep.as_mut().reset(tokio::time::Instant::now() + tick);
            }
        })
        .await
    }

    fn timed_out(&self, header_ms: u64, idle_ms: u64) -> Option<Verdict> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = self.now_ms();
        let head = self.head_started.load(Ordering::Acquire);
        if head != 0 {
            (now.saturating_sub(head) > header_ms).then_some(Verdict::HeaderTimeout)
        } else {
            let idle_since = self.idle_since.load(Ordering::Acquire);
            (now.saturating_sub(idle_since) > idle_ms).then_some(Verdict::Idle)
        }
    }
}

/// Held while a request is in flight on the connection (until its response body is done).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client socket as hyper sees it: reports reads to [`Activity`], and on an idle HTTP/1.1
/// connection may end hyper's session while keeping the socket (see [`Activity::try_park`]).
struct Watched {
    /// `None` once handed back for a park.
    inner: Option<TcpStream>,
    activity: Arc<Activity>,
    /// An HTTP/1 connection (h2 ones are never parked, and have no heads to answer).
    may_park: bool,
    /// hyper flushed after its last write. It flushes only once its write buffer is all
    /// written, so until then the end of a response may still be in that buffer (a client
    /// that stops reading), and a park would lose it.
    flushed: bool,
    /// Repaired bytes that did not fit hyper's read buffer; handed out before reading more.
    held: Vec<u8>,
    /// Bytes of a replaced answer not written yet; written before anything else.
    owed: Vec<u8>,
}

impl Watched {
    fn new(inner: TcpStream, activity: Arc<Activity>, may_park: bool) -> Self {
        Watched {
            inner: Some(inner),
            activity,
            may_park,
            flushed: false,
            held: Vec::new(),
            owed: Vec::new(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.activity.is_parking()
            && let Some(stream) = self.inner.take()
        {
            self.activity.put_parked(stream);
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection parked")
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.is_parking() {
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let before = buf.filled().len();
        if !this.held.is_empty() {
            let n = this.held.len().min(buf.remaining());
            buf.put_slice(&this.held[..n]);
            this.held.drain(..n);
            this.activity.on_read(&buf.filled()[before..]);
            return Poll::Ready(Ok(()));
        }
        let mut polled = Pin::new(&mut *inner).poll_read(cx, buf);
        // A repair may drop every byte just read (the rest of an over-long target): read on,
        // as an empty read would tell hyper the client closed.
        while buf.filled().len() > before {
            if let Some(repaired) = this.activity.repair_line(&buf.filled()[before..]) {
                buf.set_filled(before);
                let n = repaired.len().min(buf.remaining());
                buf.put_slice(&repaired[..n]);
                this.held.extend_from_slice(&repaired[n..]);
                if n == 0 {
                    polled = Pin::new(&mut *inner).poll_read(cx, buf);
                    continue;
                }
            }
            this.activity.on_read(&buf.filled()[before..]);
            return polled;
        }
        if polled.is_pending() && this.may_park && this.flushed && this.activity.try_park() {
            // An end of stream for hyper; the socket itself stays open.
            return Poll::Ready(Ok(()));
        }
        polled
    }
}

impl Watched {
    /// Writes what is owed from a replaced answer ([`head_errors`]) before anything else.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.owed.is_empty() {
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(Err(gone()));
            };
            let n = ready!(Pin::new(inner).poll_write(cx, &self.owed))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.owed.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// hyper writing while a head is pending without a request is hyper answering a head it
    /// refused: that answer goes out with a JSON body instead. `Some(len)`: taken over.
    fn take_over_own_answer(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Option<usize> {
        if !self.may_park || !self.activity.head_without_request() {
            return None;
        }
        self.owed = head_errors::with_json_body(bytes)?;
        // Pending is fine: the rest goes out with the next write, flush or shutdown.
        let _ = self.poll_owed(cx);
        Some(bytes.len())
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        ready!(this.poll_owed(cx))?;
        if let Some(n) = this.take_over_own_answer(cx, buf) {
            return Poll::Ready(Ok(n));
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_owed(cx))?;
        let polled = match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        };
        this.flushed = matches!(polled, Poll::Ready(Ok(())));
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.is_parking() {
            // hyper closes its side of a parked session; the client's connection stays open.
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_owed(cx))?;
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        ready!(this.poll_owed(cx))?;
        if this.may_park && this.activity.head_without_request() {
            // Rare (an answer to a refused head): one contiguous copy to look at.
            let bytes: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(n) = this.take_over_own_answer(cx, &bytes) {
                return Poll::Ready(Ok(n));
            }
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(TcpStream::is_write_vectored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parkable(a: &Activity) -> bool {
        a.want_park();
        let yes = a.try_park();
        a.take_parked();
        yes
    }

    #[test]
    fn parks_only_when_every_byte_read_was_consumed() {
        let a = Arc::new(Activity::new(HeadLimits {
            max_head: 8192,
            max_uri: 8192,
        }));
        assert!(!parkable(&a), "before any request");

        a.on_read(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let (busy, _) = a.begin_request(Some(0));
        assert!(!parkable(&a), "while a request is in flight");
        drop(busy);
        assert!(parkable(&a));

        a.on_read(b"GET / HT");
        assert!(!parkable(&a), "part of the next head was read");
        a.on_read(b"TP/1.1\r\n\r\n");
        drop(a.begin_request(Some(0)).0);
        assert!(parkable(&a));

        // A body, partly read with its head: parkable once the rest is read, not before.
        a.on_read(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe");
        let (busy, _) = a.begin_request(Some(5));
        a.on_read(b"llo");
        drop(busy);
        assert!(parkable(&a));

        // More bytes than the body: a pipelined request is in hyper's buffer.
        a.on_read(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok");
        let (busy, _) = a.begin_request(Some(2));
        a.on_read(b"G");
        drop(busy);
        assert!(!parkable(&a));
    }

    #[test]
    fn never_parks_without_an_exact_account() {
        for (head, body_len) in [
            // A chunked body (no exact length).
            (
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                None,
            ),
            // Two requests in one read.
            (b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", Some(0)),
            // A head ended by bare line feeds, which the scan does not recognise.
            (b"GET / HTTP/1.1\nHost: a\n\n", Some(0)),
        ] {
            let a = Arc::new(Activity::new(HeadLimits {
                max_head: 8192,
                max_uri: 8192,
            }));
            a.on_read(head);
            drop(a.begin_request(body_len).0);
            assert!(!parkable(&a), "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn parks_only_when_asked() {
        let a = Arc::new(Activity::new(HeadLimits {
            max_head: 8192,
            max_uri: 8192,
        }));
        a.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(a.begin_request(Some(0)).0);
        assert!(!a.try_park(), "not asked");
        a.want_park();
        assert!(a.try_park());
        assert!(a.is_parking());
        assert!(a.take_parked().is_none(), "no socket was handed back");
        assert!(!a.is_parking());
        // A new request withdraws a park asked for earlier.
        a.want_park();
        a.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(a.begin_request(Some(0)).0);
        assert!(!a.try_park());
    }
}
