//! What the backend-fault tests (`faults_backend.rs`, `backend_keep_alive.rs`) share: a
//! deadline, the config (a flash route and a catch-all, both capped in flight), a check that no
//! in-flight slot leaked, and a backend on raw TCP whose every byte the test writes.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::{Flashgate, eventually, sku};

/// Bound on one whole test.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// The route's in-flight cap in these tests.
pub const IN_FLIGHT: usize = 16;

pub async fn bounded(fut: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test did not finish within its deadline");
}

/// Route 0: a flash route `POST /api/flash/{sku}/buy` capped at [`IN_FLIGHT`]; route 1: an
/// ordinary catch-all, capped too. Embedded store.
pub fn faults_config(upstream: &str, request_timeout: &str) -> String {
    format!(
        "upstream: {{ url: \"{upstream}\", connect_timeout: 500ms, request_timeout: {request_timeout} }}\n\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   limits: {{ in_flight: {IN_FLIGHT} }}\n\
         \x20   sale: {{ sku: {{ path_param: sku }} }}\n\
         \x20 - name: everything-else\n\
         \x20   match: {{ path: \"/{{*rest}}\" }}\n\
         \x20   limits: {{ in_flight: {IN_FLIGHT} }}\n"
    )
}

/// Waits until no request holds an in-flight slot on any route; fails with the counts.
pub async fn assert_no_slot_leaked(fg: &Flashgate) {
    let snap = fg.app.snapshot();
    let all_free = eventually(Duration::from_secs(5), || {
        snap.routes.iter().all(|r| r.guards.in_flight() == 0)
    })
    .await;
    let held: Vec<(String, usize)> = snap
        .routes
        .iter()
        .map(|r| (r.route.name.clone(), r.guards.in_flight()))
        .collect();
    assert!(
        all_free,
        "in-flight slots still held after the storm: {held:?}"
    );
}

/// Reads one request head from `conn` (and a `Content-Length` body, if any). `None` at EOF.
pub async fn read_request(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await.ok()?;
    Some(head)
}

/// A backend on raw TCP: for each connection, `serve` gets the stream and a counter of the
/// requests it has read.
pub async fn raw_backend<F, Fut>(
    serve: F,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream, Arc<AtomicUsize>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(conn, counter.clone()));
        }
    });
    (url, seen, task)
}

/// Waits until the SKU's books show `won` units sold and `failed` uncertain (settles run off the
/// response path), fails with the status if they never do, and returns it.
pub async fn assert_settled(
    fg: &Flashgate,
    name: &str,
    won: u64,
    failed: u64,
) -> flashgate::store::SaleStatus {
    let settled = eventually(Duration::from_secs(5), || {
        futures_util::FutureExt::now_or_never(fg.app.store.status(&sku(name)))
            .and_then(Result::ok)
            .is_some_and(|s| s.units.sold == won && s.units.uncertain == failed)
    })
    .await;
    let status = fg.app.store.status(&sku(name)).await.unwrap();
    assert!(settled, "won {won}, 502 {failed}: {status:?}");
    status
}
