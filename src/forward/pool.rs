//! The keep-alive connections to the backend: one idle list per thread, and each connection
//! driven by the request that uses it. hyper's pooled client runs every connection in a task of
//! its own, so a proxied request crossed two tasks and two channels; here the request's own
//! task polls the connection while it waits for the answer, and the response body polls it
//! while the body streams (pingora's model). When the body has ended, the connection goes back
//! to the thread's idle list; a body dropped early closes it.
//!
//! **Stale connections.** A backend may close a keep-alive connection without saying so, just
//! as flashgate picks it for the next request; on a flash route that request's order would be
//! `uncertain` (the backend may have read it). Two checks keep a buyer from meeting such a
//! connection:
//! - an idle connection is polled once before it is reused: a close that has arrived is seen
//!   then, and the connection is dropped;
//! - a request the connection refused before any byte of it was written (hyper hands it back)
//!   is sent again on another connection. A request that was written is never resent: the
//!   backend may have read it.
//!
//! Idle connections are bounded by `upstream.pool_max_idle` per thread and dropped once idle for
//! `upstream.pool_idle_timeout` (checked when the thread's list is used; a thread that serves
//! nothing keeps at most `pool_max_idle` idle sockets). `Upgrade` requests (WebSocket) get a
//! connection of their own, driven by a task, never pooled.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use thread_local::ThreadLocal;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::Body;

type Io = TokioIo<TcpStream>;

/// Why a request got no response from the pool.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection to the backend could be made: it never saw the request.
    Connect(String),
    /// The exchange failed after the request was handed to a connection.
    Http(hyper::Error),
}

/// The backend's connections (see the module docs).
pub(crate) struct Pool {
    /// `host:port` to connect to.
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    builder: http1::Builder,
    idle: ThreadLocal<RefCell<VecDeque<Idle>>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection: the handle requests are sent through and the connection itself, polled by
/// whoever waits on it. `None` once the connection has ended.
struct Conn {
    sender: SendRequest<Body>,
    io: Option<Connection<Io, Body>>,
}

pub(crate) struct PoolConfig {
    pub address: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub max_headers: usize,
    pub max_head_bytes: usize,
}

impl Pool {
    pub(crate) fn new(cfg: PoolConfig) -> Pool {
        let mut builder = http1::Builder::new();
        builder
            .max_headers(cfg.max_headers)
            // hyper's floor (it panics below); the config refuses less.
            .max_buf_size(cfg.max_head_bytes.max(8192));
        Pool {
            address: cfg.address,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_idle: cfg.max_idle,
            builder,
            idle: ThreadLocal::new(),
        }
    }

    /// Sends `req` (origin-form target, `Host` set) on a pooled or new connection; the response
    /// body keeps driving the connection and returns it to the pool once it has ended.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let sent = conn.sender.try_send_request(req);
            match conn.drive(sent).await {
                Ok(resp) => {
                    let pool = Arc::clone(self);
                    return Ok(resp.map(|body| PooledBody {
                        body,
                        conn: Some(conn),
                        pool,
                        failed: None,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Refused before a byte was written (the connection had closed): the
                    // backend never saw it. Try the next connection (the idle list is finite;
                    // a new connection's refusal is final).
                    Some(back) if reused => {
                        debug!(error = %e.error(), "pooled upstream connection closed: request sent on another");
                        req = back;
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// An `Upgrade` request (WebSocket): a connection of its own, run by a task so that the
    /// upgraded stream can be handed over; never pooled.
    pub(crate) async fn send_upgrade(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let stream = self.open().await?;
        let (mut sender, io) = self
            .builder
            .handshake(stream)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = io.with_upgrades().await {
                debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        sender.send_request(req).await.map_err(SendError::Http)
    }

    async fn open(&self) -> Result<Io, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| {
                SendError::Connect(format!(
                    "connect to {} timed out after {:?}",
                    self.address, self.connect_timeout
                ))
            })?
            .map_err(|e| SendError::Connect(format!("connect to {}: {e}", self.address)))?;
        // Small requests and answers go out at once.
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let stream = self.open().await?;
        let (sender, io) = self
            .builder
            .handshake(stream)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        Ok(Conn {
            sender,
            io: Some(io),
        })
    }

    fn list(&self) -> &RefCell<VecDeque<Idle>> {
        self.idle.get_or(|| RefCell::new(VecDeque::new()))
    }

    /// The most recently used idle connection that is still open and ready.
    fn checkout(&self) -> Option<Conn> {
        let mut list = self.list().borrow_mut();
        while let Some(Idle { mut conn, since }) = list.pop_back() {
            if since.elapsed() < self.idle_timeout && conn.usable() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        let mut list = self.list().borrow_mut();
        while list
            .front()
            .is_some_and(|i| i.since.elapsed() >= self.idle_timeout)
        {
            list.pop_front();
        }
        if self.max_idle == 0 {
            return;
        }
        if list.len() >= self.max_idle {
            list.pop_front();
        }
        list.push_back(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

impl Conn {
    /// Polls the connection once without waiting: an idle connection reads what has arrived
    /// (the backend's close, or bytes it should not have sent, which end it too) and finishes
    /// the previous exchange's bookkeeping. Usable if it is still open and ready for a request.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_io(&mut cx);
        self.io.is_some() && matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Some(io) = self.io.as_mut()
            && let Poll::Ready(result) = Pin::new(io).poll(cx)
        {
            if let Err(e) = result {
                debug!(error = %e, "upstream connection ended");
            }
            self.io = None;
        }
    }

    /// Waits for `fut` while driving the connection.
    async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            self.poll_io(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }
}

/// A response body from a pooled connection: polling it drives the connection; once it has
/// ended, dropping it returns the connection to its pool.
pub(crate) struct PooledBody {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// An error held back for one turn (see `poll_frame`).
    failed: Option<hyper::Error>,
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(conn) = this.conn.as_mut() {
            conn.poll_io(cx);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            // The backend broke off mid-body. Driven in this task, the break can show up in
            // the same turn as the data before it, while the server still holds the response
            // head unsent, and a body error makes it drop the connection unflushed: the client
            // would never see the backend's answer. Yield once first, so what is buffered goes
            // out, then report the error.
            Poll::Ready(Some(Err(e))) => {
                this.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a body read to its end leaves the connection at a message boundary.
        if http_body::Body::is_end_stream(&self.body)
            && let Some(conn) = self.conn.take()
            && conn.io.is_some()
        {
            self.pool.checkin(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn pool(address: String, max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool::new(PoolConfig {
            address,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            max_idle,
            max_headers: 100,
            max_head_bytes: 16 * 1024,
        }))
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header("host", "backend")
            .body(crate::body::empty())
            .unwrap()
    }

    async fn read_to_end(resp: Response<PooledBody>) -> Bytes {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// A backend that answers each request on a connection with `answer`, counting
    /// connections; `close_after_one` closes each connection after one answer, silently.
    async fn backend(close_after_one: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after_one {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_is_reused_once_its_body_has_ended() {
        let (address, accepted) = backend(false).await;
        let pool = pool(address, 4);
        for _ in 0..5 {
            let resp = pool.send(get("/")).await.unwrap();
            assert_eq!(read_to_end(resp).await, "ok");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_dropped_early_closes_its_connection() {
        let (address, accepted) = backend(false).await;
        let pool = pool(address, 4);
        let resp = pool.send(get("/")).await.unwrap();
        drop(resp);
        let resp = pool.send(get("/")).await.unwrap();
        assert_eq!(read_to_end(resp).await, "ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_backend_closed_while_idle_is_not_reused() {
        let (address, accepted) = backend(true).await;
        let pool = pool(address, 4);
        for _ in 0..20 {
            let resp = pool.send(get("/")).await.unwrap();
            assert_eq!(read_to_end(resp).await, "ok");
            // Let the backend's close arrive (it may come just after the answer).
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 20);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_are_capped() {
        let (address, _) = backend(false).await;
        let pool = pool(address, 2);
        let resps = [
            pool.send(get("/")).await.unwrap(),
            pool.send(get("/")).await.unwrap(),
            pool.send(get("/")).await.unwrap(),
        ];
        for r in resps {
            read_to_end(r).await;
        }
        assert_eq!(pool.list().borrow().len(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_backend_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = pool(address, 2);
        assert!(matches!(
            pool.send(get("/")).await,
            Err(SendError::Connect(_))
        ));
    }
}
