//! The shop backend misbehaves under load: it refuses connections, answers too late, breaks a
//! response in the middle of its body, or closes every keep-alive connection after one answer.
//! Buyers must get the right status (502/504) quickly, never a hang; a won unit is released
//! only when the backend certainly never saw the order (refused), and kept as `uncertain`
//! otherwise; and no failure leaks a route's in-flight slot.
//!
//! Single-request versions of the refused / timeout / reset-before-answer cases, with their
//! release semantics, are in `sale.rs`; here they run as storms, and the checks are the slots
//! and the books afterwards.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use support::audit::assert_audit_clean;
use support::storm::{Storm, tally};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on one whole test.
const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// The route's in-flight cap in these tests.
const IN_FLIGHT: usize = 16;

async fn bounded(fut: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test did not finish within its deadline");
}

/// Route 0: a flash route `POST /api/flash/{sku}/buy` capped at [`IN_FLIGHT`]; route 1: an
/// ordinary catch-all, capped too. Embedded store.
fn config(upstream: &str, request_timeout: &str) -> String {
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
async fn assert_no_slot_leaked(fg: &Flashgate) {
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

fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Reads one request head from `conn` (and a `Content-Length` body, if any). `None` at EOF.
async fn read_request(conn: &mut TcpStream) -> Option<String> {
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
async fn raw_backend<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>)
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

/// The backend refuses every connection while 16 buyers fire at 50 units: every buyer gets
/// 502 `upstream_unavailable`, every unit is released (the backend never saw an order), and
/// no slot is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_releases_every_unit_and_leaks_no_slot() {
    bounded(async {
        let fg = Flashgate::start(&config(
            &format!("http://127.0.0.1:{}", refused_port()),
            "5s",
        ))
        .await;
        fg.app.store.set_stock(&sku("refused-1"), 50).await.unwrap();
        let storm = Storm::start(fg.url("/api/flash/refused-1/buy"), "buyer", IN_FLIGHT, 200);
        let shots = storm.finish().await;
        let t = tally(&shots);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(
            t.get(&(502, "upstream_unavailable".into())),
            Some(&200),
            "{t:?}"
        );
        assert!(shots.iter().all(|s| s.took < Duration::from_secs(2)));

        let status = fg.app.store.status(&sku("refused-1")).await.unwrap();
        assert_eq!(status.stock, Some(50), "{status:?}");
        assert_eq!(status.reservations.released, 200, "{status:?}");
        assert_eq!(
            status.units.held + status.units.sold + status.units.uncertain,
            0
        );
        assert_eq!(status.buyers, 0, "every user's slot came back: {status:?}");
        assert_no_slot_leaked(&fg).await;
        assert_audit_clean(&fg, "refused-1").await;
    })
    .await;
}

/// The backend takes every order but never answers within `request_timeout` (300ms): each of
/// 24 buyers gets 504 `upstream_timeout` at the timeout, each unit is kept as `uncertain`
/// (the backend has the order), and the slots come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_answers_504_keeps_units_uncertain_and_leaks_no_slot() {
    bounded(async {
        let (_keep, never) = tokio::sync::watch::channel(());
        let backend = Backend::start(move |_req| {
            let mut never = never.clone();
            async move {
                // Waits for a change that never comes (until the test ends).
                let _ = never.changed().await;
                json_response(StatusCode::OK, "{}")
            }
        })
        .await;
        let fg = Flashgate::start(&config(&backend.url(), "300ms")).await;
        fg.app.store.set_stock(&sku("slow-2"), 50).await.unwrap();

        let storm = Storm::start(fg.url("/api/flash/slow-2/buy"), "buyer", 8, 24);
        let shots = storm.finish().await;
        let t = tally(&shots);
        assert_eq!(t.get(&(504, "upstream_timeout".into())), Some(&24), "{t:?}");
        for s in &shots {
            assert!(
                s.took >= Duration::from_millis(290) && s.took < Duration::from_millis(1500),
                "{} answered after {:?}",
                s.user,
                s.took
            );
        }
        assert!(eventually(Duration::from_secs(5), || backend.count() == 24).await);
        let settled = {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let s = fg.app.store.status(&sku("slow-2")).await.unwrap();
                if s.units.uncertain == 24 || Instant::now() > deadline {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        assert_eq!(settled.units.uncertain, 24, "{settled:?}");
        assert_eq!(settled.stock, Some(26), "{settled:?}");
        assert_eq!(
            settled.units.held + settled.units.released,
            0,
            "{settled:?}"
        );
        assert_no_slot_leaked(&fg).await;
        assert_audit_clean(&fg, "slow-2").await;
    })
    .await;
}

/// A backend that sends a 200 head announcing 100,000 bytes, 1,000 bytes of body, then drops
/// the connection (`rst`: with an RST, else with a FIN).
async fn breaking_backend(rst: bool) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    raw_backend(move |mut conn, seen| async move {
        if read_request(&mut conn).await.is_none() {
            return;
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let mut answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n"
                .to_vec();
        answer.extend_from_slice(&[b' '; 1000]);
        let _ = conn.write_all(&answer).await;
        let _ = conn.flush().await;
        if rst {
            // A zero linger makes close send an RST at once; it never blocks (the lint is
            // about non-zero lingers).
            #[allow(deprecated)]
            let _ = conn.set_linger(Some(Duration::ZERO));
        }
        drop(conn);
    })
    .await
}

/// The backend breaks its answer after the head, mid-body (FIN, then RST): the client sees
/// the 200 head and then an error on the body — not a hang, not a silently short body. On a
/// flash route the order counts as sold (the backend answered 2xx: it has the order). No slot
/// is left held on either route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_breaking_mid_body_is_a_body_error_not_a_hang() {
    bounded(async {
        for rst in [false, true] {
            let (url, seen, task) = breaking_backend(rst).await;
            let fg = Flashgate::start(&config(&url, "5s")).await;
            fg.app.store.set_stock(&sku("mid-1"), 10).await.unwrap();
            let c = client();
            for (i, (method, path)) in [
                ("GET", "/catalog/big".to_owned()),
                ("POST", "/api/flash/mid-1/buy".to_owned()),
                ("GET", "/catalog/big".to_owned()),
                ("POST", "/api/flash/mid-1/buy".to_owned()),
            ]
            .into_iter()
            .enumerate()
            {
                let user = format!("user-{i}");
                let req = http::Request::builder()
                    .method(method)
                    .uri(fg.url(&path))
                    .header("x-user-id", &user)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
                    .await
                    .expect("no response head within 5s")
                    .expect("request failed before the head");
                assert_eq!(resp.status(), 200, "rst={rst} {method} {path}");
                assert_eq!(resp.headers()["content-length"], "100000");
                let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
                    .await
                    .unwrap_or_else(|_| panic!("rst={rst} {method} {path}: body hung"));
                assert!(
                    body.is_err(),
                    "rst={rst} {method} {path}: a broken body arrived as complete ({} bytes)",
                    body.map(|b| b.to_bytes().len()).unwrap_or(0)
                );
            }
            assert_eq!(seen.load(Ordering::SeqCst), 4);
            let sold = eventually(Duration::from_secs(5), || {
                // settle runs off the response path
                futures_util::FutureExt::now_or_never(fg.app.store.status(&sku("mid-1")))
                    .and_then(Result::ok)
                    .is_some_and(|s| s.units.sold == 2)
            })
            .await;
            let status = fg.app.store.status(&sku("mid-1")).await.unwrap();
            assert!(sold, "rst={rst}: {status:?}");
            assert_eq!(status.stock, Some(8));
            assert_no_slot_leaked(&fg).await;
            assert_audit_clean(&fg, "mid-1").await;
            task.abort();
        }
    })
    .await;
}

/// A backend that answers one request per connection, then closes it. `announce`: with
/// `Connection: close` (a polite backend); otherwise it just closes after a keep-alive answer,
/// racing flashgate's pool, which may already have picked that connection for the next
/// request.
async fn one_shot_backend(
    announce: bool,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    raw_backend(move |mut conn, seen| async move {
        if read_request(&mut conn).await.is_none() {
            return;
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let body = r#"{"ok":true}"#;
        let close = if announce { "connection: close\r\n" } else { "" };
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{close}content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(answer.as_bytes()).await;
        let _ = conn.flush().await;
        drop(conn);
    })
    .await
}

/// What a storm of 300 buyers and 300 readers got from a one-shot backend.
struct OneShotRun {
    flash: Vec<support::storm::Shot>,
    plain: Vec<support::storm::Shot>,
    /// Requests the backend read.
    answered: usize,
    status: flashgate::store::SaleStatus,
}

async fn one_shot_run(announce: bool) -> OneShotRun {
    let (url, seen, task) = one_shot_backend(announce).await;
    let fg = Flashgate::start(&config(&url, "5s")).await;
    fg.app
        .store
        .set_stock(&sku("close-1"), 10_000)
        .await
        .unwrap();
    let flash = Storm::start(fg.url("/api/flash/close-1/buy"), "buyer", 8, 300);
    let plain = Storm::start(fg.url("/catalog/item"), "reader", 8, 300);
    let (flash, plain) = (flash.finish().await, plain.finish().await);
    let won = flash.iter().filter(|s| s.status == 200).count() as u64;
    let failed = flash.iter().filter(|s| s.status == 502).count() as u64;
    // Settles run off the response path.
    let settled = eventually(Duration::from_secs(5), || {
        futures_util::FutureExt::now_or_never(fg.app.store.status(&sku("close-1")))
            .and_then(Result::ok)
            .is_some_and(|s| s.units.sold == won && s.units.uncertain == failed)
    })
    .await;
    let status = fg.app.store.status(&sku("close-1")).await.unwrap();
    assert!(settled, "won {won}, 502 {failed}: {status:?}");
    assert_no_slot_leaked(&fg).await;
    assert_audit_clean(&fg, "close-1").await;
    task.abort();
    OneShotRun {
        flash,
        plain,
        answered: seen.load(Ordering::SeqCst),
        status,
    }
}

/// Under load, the backend closes every connection after one answer, saying so
/// (`Connection: close`): every request reaches it exactly once and every client gets 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_every_connection_with_connection_close() {
    bounded(async {
        let run = one_shot_run(true).await;
        let (tf, tp) = (tally(&run.flash), tally(&run.plain));
        assert_eq!(tf.get(&(200, String::new())), Some(&300), "flash {tf:?}");
        assert_eq!(tp.get(&(200, String::new())), Some(&300), "plain {tp:?}");
        assert_eq!(run.answered, 600, "each request reached the backend once");
        assert_eq!(run.status.units.sold, 300, "{:?}", run.status);
    })
    .await;
}

/// The backend closes every keep-alive connection after one answer WITHOUT saying so. A
/// request flashgate's pool sends on such a connection just as it closes fails with no answer:
/// the backend may or may not have seen it, so flashgate answers 502 and, on a flash route,
/// keeps the unit `uncertain` (releasing it could sell it twice). What this test holds to:
/// every request reached the backend at most once, every client got 200 or 502 (never a hang),
/// each flash 502 is an `uncertain` unit and each 200 a `sold` one (the books balance), and no
/// slot leaks. How many 502s the race produced is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_keep_alive_connections_silently() {
    bounded(async {
        let run = one_shot_run(false).await;
        let (tf, tp) = (tally(&run.flash), tally(&run.plain));
        for (what, shots) in [("flash", &run.flash), ("plain", &run.plain)] {
            for s in shots {
                assert!(
                    s.status == 200 || (s.status == 502 && s.error == "upstream_unavailable"),
                    "{what}: {s:?}"
                );
                assert!(s.took < Duration::from_secs(2), "{what}: {s:?}");
            }
        }
        let ok = run
            .flash
            .iter()
            .chain(&run.plain)
            .filter(|s| s.status == 200)
            .count();
        assert!(
            run.answered >= ok && run.answered <= 600,
            "backend answered {} for {ok} 200s",
            run.answered
        );
        let s = &run.status;
        assert_eq!(
            s.stock,
            Some(10_000 - s.units.sold - s.units.uncertain),
            "{s:?}"
        );
        println!(
            "silent keep-alive close: flash {tf:?}, plain {tp:?}; backend read {} of 600 requests",
            run.answered
        );
    })
    .await;
}

/// The stricter promise: a request the backend never saw is never answered 502. flashgate
/// cannot keep it yet: hyper's pool may hand out a keep-alive connection the backend has just
/// closed, and the request fails with "connection closed before message completed" (seen: 0
/// to 2 of 600 requests per run, each one the backend never read). A reader's GET is now sent
/// again (see the keep-alive timeout tests below), but flashgate cannot tell an order the
/// backend never read from one it read before dying, so the unit stays `uncertain` and that
/// buyer is told 502 (then 409). The remedy is on the backend: send `Connection: close`, or
/// keep idle connections open longer than `upstream.order_idle_timeout`. (Checking the socket
/// for the backend's close just before sending was tried: it did not change these counts, as
/// the one-shot backend mostly closes after flashgate has already sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known gap: hyper's pool can reuse a keep-alive connection the backend is closing (spurious 502)"]
async fn no_spurious_502_when_the_backend_closes_keep_alive_connections_silently() {
    bounded(async {
        let run = one_shot_run(false).await;
        let (tf, tp) = (tally(&run.flash), tally(&run.plain));
        assert_eq!(
            (tf.get(&(200, String::new())), tp.get(&(200, String::new()))),
            (Some(&300), Some(&300)),
            "flash {tf:?}, plain {tp:?}, backend read {}",
            run.answered
        );
    })
    .await;
}

/// A backend with a short keep-alive timeout: it closes a connection idle for `idle` without a
/// word, as Node's `keepAliveTimeout` (5 s) or Go's `IdleTimeout` do, at a moment of its own.
async fn idle_closing_backend(
    idle: Duration,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    raw_backend(move |mut conn, seen| async move {
        // The timeout covers the wait for a request's first byte, as a server's keep-alive
        // timeout does; a request begun in time is read to its end.
        let mut first = [0u8; 1];
        while let Ok(Ok(1)) = tokio::time::timeout(idle, conn.peek(&mut first)).await {
            if read_request(&mut conn).await.is_none() {
                return;
            }
            seen.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"ok":true}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// What 8 clients, each sending `per_client` requests (buyers and readers in turn) with pauses
/// of 0 to twice `backend_idle` between them, got from a backend closing connections idle for
/// `backend_idle`: (orders sold, orders answered 502), after checking that every reader got 200
/// and the books balance.
async fn keep_alive_race(
    backend_idle: Duration,
    per_client: u64,
    order_idle_timeout: &str,
) -> (u64, u64) {
    let (url, seen, task) = idle_closing_backend(backend_idle).await;
    let yaml = config(&url, "5s").replace(
        "request_timeout: 5s",
        &format!("request_timeout: 5s, order_idle_timeout: {order_idle_timeout}"),
    );
    assert!(yaml.contains("order_idle_timeout"), "{yaml}");
    let fg = Flashgate::start(&yaml).await;
    fg.app
        .store
        .set_stock(&sku("idle-1"), 10_000)
        .await
        .unwrap();
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let (flash, plain) = (fg.url("/api/flash/idle-1/buy"), fg.url("/catalog/item"));
        clients.push(tokio::spawn(async move {
            let client = client();
            let (mut flash_statuses, mut plain_statuses) = (Vec::new(), Vec::new());
            let mut seed = c * 7919 + 1;
            let pause_us = 2 * backend_idle.as_micros() as u64;
            for i in 0..per_client {
                // A pause of 0 to 2 x backend_idle (a fixed pseudo-random sequence per client).
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                tokio::time::sleep(Duration::from_micros((seed >> 33) % pause_us)).await;
                if i % 2 == 0 {
                    let user = format!("u{c}-{i}");
                    let a = send(
                        &client,
                        "POST",
                        &flash,
                        &[("x-user-id", &user)],
                        Bytes::new(),
                    )
                    .await;
                    flash_statuses.push(a.status.as_u16());
                } else {
                    plain_statuses.push(
                        send(&client, "GET", &plain, &[], Bytes::new())
                            .await
                            .status
                            .as_u16(),
                    );
                }
            }
            (flash_statuses, plain_statuses)
        }));
    }
    let (mut flash, mut plain) = (Vec::new(), Vec::new());
    for c in clients {
        let (f, p) = c.await.unwrap();
        flash.extend(f);
        plain.extend(p);
    }
    let count = |v: &[u16], s: u16| v.iter().filter(|x| **x == s).count() as u64;
    let retried = fg
        .app
        .metrics
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix("flashgate_upstream_retries_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    println!(
        "backend keep-alive timeout: flash {} sold, {} 502; plain {} 200; {retried} retried; backend read {}",
        count(&flash, 200),
        count(&flash, 502),
        count(&plain, 200),
        seen.load(Ordering::SeqCst)
    );
    let half = 8 * per_client / 2;
    assert_eq!(count(&plain, 200), half, "plain: {plain:?}");
    assert_eq!(
        count(&flash, 200) + count(&flash, 502),
        half,
        "flash: {flash:?}"
    );
    let won = count(&flash, 200);
    let failed = count(&flash, 502);
    let settled = eventually(Duration::from_secs(5), || {
        futures_util::FutureExt::now_or_never(fg.app.store.status(&sku("idle-1")))
            .and_then(Result::ok)
            .is_some_and(|s| s.units.sold == won && s.units.uncertain == failed)
    })
    .await;
    let status = fg.app.store.status(&sku("idle-1")).await.unwrap();
    assert!(settled, "won {won}, 502 {failed}: {status:?}");
    assert_eq!(status.stock, Some(10_000 - won - failed), "{status:?}");
    // Every 200 was read once; a retried GET's first copy was never read, and an order
    // caught by the race may or may not have been.
    let read = seen.load(Ordering::SeqCst) as u64;
    assert!(
        read >= half + won && read <= 4 * half,
        "backend read {read}"
    );
    assert_no_slot_leaked(&fg).await;
    assert_audit_clean(&fg, "idle-1").await;
    task.abort();
    (won, failed)
}

/// The backend closes keep-alive connections idle for 3 ms, and 8 clients pause 0-6 ms between
/// requests, so flashgate often sends on a connection the backend is closing that very moment.
/// A pass-through GET the backend never answered is sent again (RFC 9112 §9.3.1.1): every one
/// gets 200. An order is never sent twice: a flash buyer caught by the race gets 502 and the
/// unit stays `uncertain` (the books balance), and the backend read each order at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_sent_again_when_the_backend_closes_an_idle_connection() {
    bounded(async {
        keep_alive_race(Duration::from_millis(3), 150, "1s").await;
    })
    .await;
}

/// What keeps orders out of the race (README, "Backend keep-alive"): orders ride their own
/// connections, closed after `upstream.order_idle_timeout` idle, shorter than the backend's
/// keep-alive timeout (1 s by default against backends' 2 s and up; here 4 ms against the
/// backend's 20 ms). No order meets a closing connection: all 400 are sold. (With the orders'
/// connections kept as long as the backend's, about every other run of this test lost an order
/// here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_order_is_lost_when_orders_leave_idle_connections_before_the_backend_does() {
    bounded(async {
        let (won, failed) = keep_alive_race(Duration::from_millis(20), 100, "4ms").await;
        assert_eq!((won, failed), (400, 0));
    })
    .await;
}
