//! Redis fails in the middle of a sale, and flashgate must fail closed and heal by itself.
//!
//! The story of each test: a real `redis-server`, a recording shop backend and flashgate; a
//! storm of buyers (each a fresh user) fires at a flash route; Redis is killed (SIGKILL) or its
//! script cache flushed underneath them; then Redis comes back. Every answer is judged: it is
//! 200 (the buyer won and the backend answered), 410 `sold_out`, or 503 `unavailable` with a
//! `Retry-After`, and it came back within a bound — never a hang. At the end the backend has
//! received exactly one order per unit of stock, each carrying a reservation the store
//! recorded as sold.
//!
//! The stalled-Redis case (SIGSTOP) and the circuit breaker are in `faults_breaker.rs`, a test
//! binary of their own because they read flashgate's log lines.
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::redis::RedisServer;
use support::storm::{Shot, Storm, tally};
use support::*;

/// Bound on one whole test.
const TEST_DEADLINE: Duration = Duration::from_secs(90);
/// `store.response_timeout` in these tests.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// Every answer, even one that waited for a dead store, comes back within this: the store
/// timeout plus room for a loaded debug build on two cores.
const ANSWER_BOUND: Duration = Duration::from_millis(2000);
const BUY: &str = "/api/flash/{sku}/buy";

async fn bounded(fut: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test did not finish within its deadline");
}

/// One flash route (SKU from the path, one unit per user) and a catch-all ordinary route,
/// with a short store timeout and a quick circuit breaker.
fn sale_config(backend: &Backend, redis: &RedisServer, store_timeout: Duration) -> String {
    format!(
        "upstream: {{ url: \"{}\", connect_timeout: 500ms, request_timeout: 5s }}\n\
         store: {{ redis: \"{}\", connect_timeout: 300ms, response_timeout: {}ms, \
         breaker_failures: 5, breaker_cooldown: 200ms }}\n\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"{BUY}\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   sale: {{ sku: {{ path_param: sku }}, sold_out_recheck: 50ms }}\n\
         \x20 - name: everything-else\n\
         \x20   match: {{ path: \"/{{*rest}}\" }}\n",
        backend.url(),
        redis.url(),
        store_timeout.as_millis()
    )
}

async fn shop() -> Backend {
    Backend::start(|_req| async { json_response(StatusCode::OK, r#"{"order":"accepted"}"#) }).await
}

fn buy_url(fg: &Flashgate, sku: &str) -> String {
    fg.url(&BUY.replace("{sku}", sku))
}

/// Every answer is one a buyer may get during an outage, each within [`ANSWER_BOUND`].
fn assert_fail_closed_answers(shots: &[Shot]) {
    for s in shots {
        assert!(
            s.took < ANSWER_BOUND,
            "{} waited {:?} for {} {:?}",
            s.user,
            s.took,
            s.status,
            s.error
        );
        match (s.status.as_u16(), s.error.as_str()) {
            (200, "") | (410, "sold_out") => {}
            (503, "unavailable") => assert_eq!(
                s.retry_after.as_deref(),
                Some("1"),
                "503 without Retry-After for {}",
                s.user
            ),
            _ => panic!("unexpected answer {s:?}; all: {:?}", tally(shots)),
        }
    }
}

/// The orders the backend received for `sku`: (user, reservation id), in arrival order. Each
/// carries exactly one of flashgate's headers, or the test fails.
fn orders(backend: &Backend, sku: &str) -> Vec<(String, String)> {
    let path = BUY.replace("{sku}", sku);
    backend
        .seen()
        .into_iter()
        .filter(|s| s.uri.path() == path)
        .map(|s| {
            let one = |name: &str| {
                let v: Vec<_> = s.headers.get_all(name).iter().collect();
                assert_eq!(v.len(), 1, "{name} on a forwarded order: {:?}", s.headers);
                v[0].to_str().unwrap().to_owned()
            };
            (one("x-flashgate-user"), one("x-flashgate-reservation"))
        })
        .collect()
}

/// The store's record of reservation `id` (`state|qty|unix_ms|user`).
fn record(redis: &RedisServer, sku: &str, id: &str) -> Option<String> {
    redis.hget(&format!("fg:{{{sku}}}:res"), id)
}

/// Checks the end of a sale of `stock` units: the backend got exactly `stock` orders, from
/// distinct users, each told 200; each order's reservation is recorded `sold` for its user;
/// the store's books balance with nothing left held or uncertain.
async fn assert_sold_exactly(
    fg: &Flashgate,
    redis: &RedisServer,
    backend: &Backend,
    sku: &str,
    stock: u64,
    shots: &[Shot],
) {
    let orders = orders(backend, sku);
    let winners: HashSet<&str> = shots
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| s.user.as_str())
        .collect();
    let users: HashSet<&str> = orders.iter().map(|(u, _)| u.as_str()).collect();
    let ids: HashSet<&str> = orders.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        orders.len() as u64,
        stock,
        "orders forwarded vs stock; answers: {:?}",
        tally(shots)
    );
    assert_eq!(users.len(), orders.len(), "one order per user");
    assert_eq!(ids.len(), orders.len(), "one reservation per order");
    assert_eq!(
        users, winners,
        "the backend saw exactly the buyers told 200"
    );

    // Settles run off the response path: wait for them to land.
    let settled = eventually(Duration::from_secs(10), || {
        orders
            .iter()
            .all(|(_, id)| record(redis, sku, id).is_some_and(|r| r.starts_with("sold|")))
    })
    .await;
    let mut not_sold = Vec::new();
    for (user, id) in &orders {
        let rec = record(redis, sku, id)
            .unwrap_or_else(|| panic!("order of {user} forwarded with unknown reservation {id}"));
        assert!(rec.ends_with(&format!("|{user}")), "{rec} is not {user}'s");
        if !rec.starts_with("sold|") {
            not_sold.push(rec);
        }
    }
    assert!(
        settled && not_sold.is_empty(),
        "{} forwarded orders are not recorded as sold: {not_sold:?}",
        not_sold.len()
    );
    let status = fg.app.store.status(&support::sku(sku)).await.unwrap();
    assert_eq!(status.stock, Some(0), "{status:?}");
    assert_eq!(status.units.sold, stock, "{status:?}");
    assert_eq!(
        (status.units.held, status.units.uncertain),
        (0, 0),
        "no unit may be stuck: {status:?}"
    );
    // Released units went back on sale: only reservations cancelled because their reply
    // was lost (each buyer told 503) are released here.
    let told_503 = shots.iter().filter(|s| s.status == 503).count() as u64;
    assert!(
        status.units.released <= told_503,
        "{status:?}; 503 answers: {told_503}"
    );
    assert_eq!(status.buyers, stock, "{status:?}");
    support::audit::assert_audit_clean(fg, sku).await;
}

/// Runs `f` on a blocking thread (the Redis helpers wait with std sleeps) and hands the server
/// back.
async fn blocking(
    mut redis: RedisServer,
    f: impl FnOnce(&mut RedisServer) + Send + 'static,
) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        f(&mut redis);
        redis
    })
    .await
    .unwrap()
}

/// SIGKILL Redis while 32 buyers are firing at 300 units; keep firing at the dead store;
/// restart it from its AOF (data kept, script cache empty). Flash answers are 503 + Retry-After
/// within the bound while it is down, ordinary routes keep answering 200, and once it is
/// back admission resumes by itself and the sale ends with exactly 300 orders forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_sale_fails_closed_and_recovers_from_its_aof() {
    bounded(async {
        let redis = RedisServer::start_persistent();
        let backend = shop().await;
        let fg = Flashgate::start(&sale_config(&backend, &redis, STORE_TIMEOUT)).await;
        const STOCK: u64 = 300;
        fg.app.store.set_stock(&sku("kill-1"), STOCK).await.unwrap();

        // Before: buyers win.
        let storm = Storm::start(buy_url(&fg, "kill-1"), "before", 32, 5_000);
        assert!(
            storm
                .wait_for(60, Duration::from_secs(20), |s| s.status == 200)
                .await,
            "no sale before the kill: {:?}",
            tally(&storm.shots())
        );

        // Redis dies under the storm.
        let mut redis = redis;
        redis.kill();
        let killed_at = storm.elapsed();
        assert!(
            storm
                .wait_for(200, Duration::from_secs(20), |s| s.sent_at > killed_at
                    && s.status == 503)
                .await,
            "flash routes did not answer 503 after the kill: {:?}",
            tally(&storm.shots())
        );
        // Ordinary routes do not need the store.
        let c = client();
        for i in 0..20 {
            let a = send(&c, "GET", &fg.url(&format!("/catalog/{i}")), &[], "").await;
            assert_eq!(
                a.status,
                200,
                "ordinary route during the outage: {}",
                a.text()
            );
        }
        let before = storm.stop().await;
        assert_fail_closed_answers(&before);
        let down: Vec<&Shot> = before.iter().filter(|s| s.sent_at > killed_at).collect();
        // Nothing sent after the kill can have won a unit: it fails closed.
        assert!(
            down.iter().all(|s| s.status == 503),
            "after the kill: {:?}",
            tally(&down.iter().map(|s| (*s).clone()).collect::<Vec<_>>())
        );

        // Redis comes back from its AOF, with an empty script cache. No flashgate restart.
        let redis = blocking(redis, RedisServer::restart).await;
        let stock_left: u64 = redis.get("fg:{kill-1}:stock").unwrap().parse().unwrap();
        assert!(stock_left < STOCK, "the AOF kept the sales: {stock_left}");
        let after = Storm::start(buy_url(&fg, "kill-1"), "after", 32, 5_000);
        assert!(
            after
                .wait_for(1, Duration::from_secs(20), |s| s.error == "sold_out")
                .await,
            "the sale never finished after the restart: {:?}",
            tally(&after.shots())
        );
        let after = after.stop().await;
        assert_fail_closed_answers(&after);
        assert!(
            after.iter().any(|s| s.status == 200),
            "admission never resumed: {:?}",
            tally(&after)
        );

        // A reserve that ran just before the kill, but whose reply was lost, held a unit for
        // a buyer who was told 503; flashgate cancels it once Redis answers again, and the
        // unit goes back on sale. Wait for that, then sell what came back.
        let no_orphan = async {
            loop {
                let s = fg.app.store.status(&sku("kill-1")).await.unwrap();
                let forwarded = orders(&backend, "kill-1").len() as u64;
                if s.units.held + s.units.sold + s.units.uncertain == forwarded {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let s = tokio::time::timeout(Duration::from_secs(15), no_orphan)
            .await
            .expect("units stay held with no order behind them");
        let mut all: Vec<Shot> = before.into_iter().chain(after).collect();
        if s.stock != Some(0) {
            // Until the store says it is all gone (a 410 may still come from this instance's
            // local sold-out flag, set before the units came back).
            let last = Storm::start(buy_url(&fg, "kill-1"), "last", 8, 50_000);
            assert!(
                eventually(Duration::from_secs(10), || redis
                    .get("fg:{kill-1}:stock")
                    .as_deref()
                    == Some("0"))
                .await,
                "the units that came back were never sold: {:?}",
                tally(&last.shots())
            );
            all.extend(last.stop().await);
        }
        assert_fail_closed_answers(&all);
        assert_sold_exactly(&fg, &redis, &backend, "kill-1", STOCK, &all).await;
    })
    .await;
}

/// `SCRIPT FLUSH`, again and again, while 32 buyers fire at 200 units (a failover to a replica
/// without the scripts looks like this): every NOSCRIPT is met by loading the script again, no
/// buyer sees an error, and exactly 200 orders reach the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_cache_flushed_while_buyers_fire_sells_exactly_the_stock() {
    bounded(async {
        let redis = RedisServer::start();
        let backend = shop().await;
        // A generous store timeout: this test is about NOSCRIPT, and on a loaded machine a
        // timed-out reserve would (rightly) be a 503.
        let fg = Flashgate::start(&sale_config(&backend, &redis, Duration::from_secs(5))).await;
        const STOCK: u64 = 200;
        fg.app
            .store
            .set_stock(&sku("flush-2"), STOCK)
            .await
            .unwrap();

        let storm = Storm::start(buy_url(&fg, "flush-2"), "buyer", 32, 3_000);
        let mut flushes = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Flush each time 10 more units are gone, until the sale is over.
        while storm.count(|s| s.error == "sold_out") == 0 {
            assert!(
                Instant::now() < deadline,
                "sale never ended: {:?}",
                tally(&storm.shots())
            );
            let won = storm.count(|s| s.status == 200);
            redis.script_flush();
            flushes += 1;
            eventually(Duration::from_secs(5), || {
                storm.count(|s| s.status == 200) >= won + 10
                    || storm.count(|s| s.error == "sold_out") > 0
            })
            .await;
        }
        let shots = storm.stop().await;
        assert!(flushes >= 5, "only {flushes} flushes during the sale");
        let t = tally(&shots);
        assert_eq!(
            t.get(&(200, String::new())),
            Some(&(STOCK as usize)),
            "{t:?}"
        );
        assert!(
            shots
                .iter()
                .all(|s| s.status == 200 || s.error == "sold_out"),
            "a flush leaked to a buyer: {t:?}"
        );
        assert_sold_exactly(&fg, &redis, &backend, "flush-2", STOCK, &shots).await;
    })
    .await;
}
