//! One single-threaded runtime per core, each with its own `SO_REUSEPORT` listener, sharing
//! one connection cap: what `main` runs. Each listener is served by [`super::run_shared`].

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::run_shared;
use crate::state::App;

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
