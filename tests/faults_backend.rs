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
use support::faulty::*;
use support::storm::{Storm, tally};
use support::*;
use tokio::io::AsyncWriteExt;

/// The backend refuses every connection while 16 buyers fire at 50 units: every buyer gets
/// 502 `upstream_unavailable`, every unit is released (the backend never saw an order), and
/// no slot is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_releases_every_unit_and_leaks_no_slot() {
    bounded(async {
        let fg = Flashgate::start(&faults_config(
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
        let fg = Flashgate::start(&faults_config(&backend.url(), "300ms")).await;
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
            let fg = Flashgate::start(&faults_config(&url, "5s")).await;
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
    let fg = Flashgate::start(&faults_config(&url, "5s")).await;
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
    let status = assert_settled(&fg, "close-1", won, failed).await;
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
