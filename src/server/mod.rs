//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, a cap on connections, a
//! header-read timeout against slowloris, a keep-alive idle timeout, and graceful shutdown
//! that stops accepting and drains in-flight requests within the drain timeout.
//!
//! An HTTP/1.1 connection idle for `PARK_AFTER` (`conn.rs`) is parked: hyper's state for it
//! (read and write buffers, dispatcher) is dropped and only the socket waits for the next
//! request, which starts a fresh hyper connection on it. Idle keep-alive clients are most of a
//! sale's connections, and hyper's buffers were most of their cost.
//!
//! This file holds the accept loop and the drain; the rest, in the order a connection meets it:
//! - `per_core.rs`: one runtime and `SO_REUSEPORT` listener per core ([`run_per_core`]);
//! - `conn.rs`: serving one connection (h2c sniffing, hyper's builders, timeouts, parking);
//! - `activity.rs`: what a connection is doing (timeouts, head scan, in-flight requests,
//!   whether it can be parked);
//! - `watched.rs`: the socket as hyper sees it (request-line repair, hyper's own error answers
//!   replaced, the end of stream that parks).

mod activity;
mod conn;
mod detach;
mod per_core;
mod watched;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Server as ServerConfig;
use crate::state::App;
use activity::HeadLimits;

pub use detach::Detach;
pub use per_core::{bind_reuseport, run_per_core};

/// Serves `listener` until `shutdown` resolves, then drains. Used by tests (bind
/// `127.0.0.1:0`); holds no global state, so one process can run many instances. `main` runs
/// [`run_per_core`] instead.
///
/// On a runtime with several worker threads, hyper's pooled client can strand a request queued
/// on a backend connection that another thread is closing (hyper issue #4122: the request is
/// never sent, and waits for `upstream.request_timeout`). Measured with a backend closing idle
/// connections every 3 ms: about one request in 20,000. [`run_per_core`] keeps each request
/// and its connections on one thread, where that race cannot happen.
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
    let protocols = Arc::new(conn::protocols(&cfg));
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
        // Spawned as is, not inside an `async` block: a block would keep these arguments in
        // its own state beside the connection's (every parked connection holds this task).
        let conn = conn::Conn {
            peer,
            stop,
            timeouts,
            limits,
            permit,
        };
        tracker.spawn(conn::serve_connection(protocols, stream, app, conn));
    }

    drop(listener);
    drain(&app, &cfg, tracker, stop_tx).await;
    Ok(())
}

/// After the listener is closed: tells every connection to finish (`stop`), waits for them
/// within the drain timeout, then gives the store's bookkeeping what is left of it.
async fn drain(app: &App, cfg: &ServerConfig, tracker: TaskTracker, stop_tx: watch::Sender<bool>) {
    let drain_started = Instant::now();
    tracker.close();
    info!(connections = tracker.len(), drain_timeout = ?cfg.drain_timeout, "shutting down: draining");
    // Stock streams never finish by themselves: end them rather than wait out the drain.
    app.stock_events.shutdown();
    app.fleet.shutdown();
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
}
