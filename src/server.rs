//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, a cap on connections, a
//! header-read timeout against slowloris, a keep-alive idle timeout, and graceful shutdown
//! that stops accepting and drains in-flight requests within the drain timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
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
        let max_head = cfg.max_header_bytes;
        tracker.spawn(async move {
            serve_connection(protocols, stream, peer, app, stop, timeouts, max_head).await;
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

async fn serve_connection(
    protocols: Arc<Protocols>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
    timeouts: (Duration, Duration),
    max_head: usize,
) {
    let (header_timeout, idle_timeout) = timeouts;
    let activity = Arc::new(Activity::new(max_head));
    let waited = tokio::select! {
        w = wait_for_bytes(&stream, &activity) => w,
        _ = stop.changed() => return,
        verdict = activity.watch(header_timeout, idle_timeout) => {
            match verdict {
                Verdict::HeaderTimeout => debug!(%peer, "request head not received in time: closing"),
                Verdict::Idle => debug!(%peer, "idle: closing"),
            }
            return;
        }
    };
    let is_h2 = match waited {
        Ok(Some(is_h2)) => is_h2,
        Ok(None) => return,
        Err(e) => {
            debug!(%peer, error = %e, "connection failed before a request");
            return;
        }
    };
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let (busy, two_framings) = activity.begin_request();
            let mut req = req;
            if two_framings {
                req.extensions_mut().insert(gate::TwoFramings);
            }
            let app = app.clone();
            async move {
                let resp = gate::handle(app, peer, req).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| body::guarded(b, busy)))
            }
        })
    };
    if is_h2 {
        let conn = protocols.h2.serve_connection(io, service);
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &activity,
            &mut stop,
            peer,
            timeouts,
        )
        .await;
    } else {
        let conn = protocols.h1.serve_connection(io, service).with_upgrades();
        drive(
            conn,
            |c| c.graceful_shutdown(),
            &activity,
            &mut stop,
            peer,
            timeouts,
        )
        .await;
    }
}

/// Waits for the first bytes of a new connection (`None` if the client closed it instead) and
/// tells from them whether it speaks HTTP/2 with prior knowledge: `Some(true)` for the h2
/// preface, `Some(false)` for anything else. The bytes are peeked, not consumed, so hyper
/// reads the whole request head itself: a replayed prefix (hyper-util's auto builder reads
/// up to 24 bytes first) made hyper's first read come back short and regrow its 8 KiB read
/// buffer to 16 KiB, a copy per connection kept for the connection's life.
async fn wait_for_bytes(stream: &TcpStream, activity: &Activity) -> io::Result<Option<bool>> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        activity.head_begins();
        if first[..n] != H2_PREFACE[..n] {
            return Ok(Some(false));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        tokio::time::sleep(PREFACE_REPEEK).await;
    }
}

/// Serves one connection with hyper until it closes, applying the header and idle timeouts
/// and the graceful shutdown.
async fn drive<C>(
    conn: C,
    graceful_shutdown: fn(Pin<&mut C>),
    activity: &Activity,
    stop: &mut watch::Receiver<bool>,
    peer: std::net::SocketAddr,
    (header_timeout, idle_timeout): (Duration, Duration),
) where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    let mut graceful = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed() => {
                if changed.is_err() {
                    debug!(%peer, "drain timeout reached: closing");
                    return;
                }
                if !graceful {
                    graceful = true;
                    graceful_shutdown(conn.as_mut());
                }
            }
            verdict = activity.watch(header_timeout, idle_timeout), if !graceful => match verdict {
                Verdict::HeaderTimeout => {
                    debug!(%peer, "request head not received in time: closing");
                    return;
                }
                Verdict::Idle => {
                    graceful = true;
                    graceful_shutdown(conn.as_mut());
                }
            },
        }
    }
}

/// What one connection is doing, for the header and idle timeouts. hyper's own header timer
/// also runs while a keep-alive connection is idle, which would make the two timeouts one;
/// tracking activity here keeps them separate and works the same for HTTP/1 and h2.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the connection last became idle (ms since epoch).
    idle_since: AtomicU64,
    /// When bytes of a new request head started arriving on an idle connection; 0 = none.
    head_started: AtomicU64,
    head_scan: std::sync::Mutex<HeadScan>,
    max_head: usize,
}

enum Verdict {
    HeaderTimeout,
    Idle,
}

impl Activity {
    fn new(max_head: usize) -> Self {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            head_scan: std::sync::Mutex::new(HeadScan::default()),
            max_head,
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 can mean "not set".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Bytes of a request head have arrived (starts the header timeout).
    fn head_begins(&self) {
        let _ = self.head_started.compare_exchange(
            0,
            self.now_ms(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    fn on_read(&self, bytes: &[u8]) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.head_begins();
            self.scan().feed(bytes, self.max_head);
        }
    }

    fn scan(&self) -> std::sync::MutexGuard<'_, HeadScan> {
        // Held for a copy of the bytes just read, never across an await.
        self.head_scan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request head was parsed: the connection is busy until its response is sent. Also
    /// says whether that head declared two framings (see `framing.rs`).
    fn begin_request(self: &Arc<Self>) -> (Busy, bool) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        let two_framings = self.scan().take();
        (Busy(self.clone()), two_framings)
    }

    /// Resolves when the connection should be closed; polls at a coarse interval.
    async fn watch(&self, header_timeout: Duration, idle_timeout: Duration) -> Verdict {
        let tick = (header_timeout.min(idle_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let header_ms = u64::try_from(header_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(tick).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                continue;
            }
            let now = self.now_ms();
            let head = self.head_started.load(Ordering::Acquire);
            if head != 0 {
                if now.saturating_sub(head) > header_ms {
                    return Verdict::HeaderTimeout;
                }
            } else if now.saturating_sub(self.idle_since.load(Ordering::Acquire)) > idle_ms {
                return Verdict::Idle;
            }
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

/// The client socket, reporting reads to [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
