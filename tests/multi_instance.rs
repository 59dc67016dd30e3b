//! Several flashgate instances sharing one Redis, told as the operator's story: one stock,
//! seen and sold through every instance; the script cache flushed mid-sale; stock raised
//! through one instance and found by another. Everything here needs a real, shared
//! `redis-server`, and the store's own command counters.
//!
//! No mocks, no fixed sleeps as waits (a condition is polled), every test bounded in time.
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::redis::RedisServer;
use support::shop::*;
use support::*;

/// `EVAL` calls the server has run so far (how the store recovers from NOSCRIPT: the call
/// again with the script's source).
fn script_loads(server: &RedisServer) -> u64 {
    server.command_calls(&["cmdstat_eval"])
}

/// Two instances, one Redis, 100 units, 1,000 buyers split between them: 100 orders in
/// total reach the backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_sell_exactly_the_stock() {
    bounded(async {
        let server = RedisServer::start();
        let store = redis_yaml(&server);
        let (shop_a, shop_b) = (shop().await, shop().await);
        let cfg = |b: &Backend| sale_config(&b.url(), &store, "5s", BUY_PATH, PATH_SALE);
        let fg_a = Flashgate::start(&cfg(&shop_a)).await;
        let fg_b = Flashgate::start(&cfg(&shop_b)).await;
        set_stock(&fg_a, "shared-1", 100).await;
        assert_eq!(
            stock(&fg_b, "shared-1").await,
            100,
            "one stock, seen by both"
        );

        let users: Vec<String> = (0..1000).map(|i| format!("user-{i:04}")).collect();
        let outcomes = fire(&[&fg_a, &fg_b], "shared-1", users).await;

        let t = tally(&outcomes);
        assert_eq!(t.get(&(200, String::new())), Some(&100), "{t:?}");
        assert_eq!(t.get(&(410, "sold_out".into())), Some(&900), "{t:?}");
        assert_eq!(t.len(), 2, "{t:?}");

        let (a, b) = (
            flash_seen(&shop_a, "shared-1"),
            flash_seen(&shop_b, "shared-1"),
        );
        assert_eq!(a.len() + b.len(), 100, "a: {}, b: {}", a.len(), b.len());
        assert!(
            !a.is_empty() && !b.is_empty(),
            "both instances sold: {} + {}",
            a.len(),
            b.len()
        );
        let users: HashSet<&str> = a
            .iter()
            .chain(&b)
            .map(|s| one_header(s, "x-flashgate-user"))
            .collect();
        assert_eq!(users.len(), 100, "100 distinct users");

        assert_eq!(stock(&fg_a, "shared-1").await, 0);
        let status = status_until(&fg_b, "shared-1", |s| s["units"]["sold"] == 100).await;
        assert_eq!(status["buyers"], 100);
        assert_eq!(status["reservations"], counts(0, 100, 0, 0));
    })
    .await;
}

/// `SCRIPT FLUSH` in the middle of a sale (as after a Redis restart or failover): 60
/// units sold, the script cache emptied, then 940 more buyers race for the last 40 — all
/// 128 in flight get NOSCRIPT at once, reload the script, and the count stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_cache_flushed_mid_sale_never_oversells() {
    bounded(async {
        let server = RedisServer::start();
        let backend = shop().await;
        let fg = Flashgate::start(&sale_config(
            &backend.url(),
            &redis_yaml(&server),
            "5s",
            BUY_PATH,
            PATH_SALE,
        ))
        .await;
        set_stock(&fg, "flush-1", 100).await;
        let users: Vec<String> = (0..1000).map(|i| format!("user-{i:04}")).collect();

        let first = fire(&[&fg], "flush-1", users[..60].to_vec()).await;
        assert!(first.iter().all(|o| o.status == 200), "{:?}", tally(&first));
        // Let the first wave's settles land, so the flush hits buyers, not bookkeeping.
        status_until(&fg, "flush-1", |s| s["units"]["sold"] == 60).await;
        server.script_flush();
        let loads_before = script_loads(&server);
        let rest = fire(&[&fg], "flush-1", users[60..].to_vec()).await;
        assert!(
            script_loads(&server) > loads_before,
            "NOSCRIPT was met and handled"
        );

        let t = tally(&rest);
        assert_eq!(t.get(&(200, String::new())), Some(&40), "{t:?}");
        assert_eq!(t.get(&(410, "sold_out".into())), Some(&900), "{t:?}");
        assert_eq!(t.len(), 2, "no 503: {t:?}");
        let seen = flash_seen(&backend, "flush-1");
        let users: HashSet<&str> = seen
            .iter()
            .map(|s| one_header(s, "x-flashgate-user"))
            .collect();
        assert_eq!((seen.len(), users.len()), (100, 100));
        assert_eq!(stock(&fg, "flush-1").await, 0);
        let status = status_until(&fg, "flush-1", |s| s["units"]["sold"] == 100).await;
        assert_eq!(status["reservations"], counts(0, 100, 0, 0));
    })
    .await;
}

// Two instances sharing Redis, each with its own local sold-out flag, kept in step by the
// store's stock events (Redis pub/sub on `fg:events`).

/// A sale whose local sold-out flag would last a minute: anything faster is the event.
const LONG_RECHECK_SALE: &str = "{ sku: { path_param: sku }, sold_out_recheck: 60s }";

/// Instance B learned the SKU is sold out; stock is then raised through instance A. B hears
/// it from the store at once (its own flag would last a minute) and admits within 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_raised_elsewhere_reaches_every_instance_at_once() {
    bounded(async {
        let server = RedisServer::start();
        let store = redis_yaml(&server);
        let (shop_a, shop_b) = (shop().await, shop().await);
        let cfg = |b: &Backend| sale_config(&b.url(), &store, "5s", BUY_PATH, LONG_RECHECK_SALE);
        let fg_a = Flashgate::start(&cfg(&shop_a)).await;
        let fg_b = Flashgate::start(&cfg(&shop_b)).await;
        set_stock(&fg_a, "ev-1", 1).await;
        let client = client();
        assert_eq!(buy(&client, &fg_b, "ev-1", "alice").await.status, 200);
        assert_rejected(&buy(&client, &fg_b, "ev-1", "bob").await, 410, "sold_out");

        assert_eq!(add_stock(&fg_a, "ev-1", 1).await, 1);
        let raised = Instant::now();
        let mut tries = 0;
        let won = async {
            loop {
                tries += 1;
                let a = buy(&client, &fg_b, "ev-1", &format!("retry-{tries}")).await;
                if a.status == 200 {
                    return;
                }
                assert_rejected(&a, 410, "sold_out");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_millis(200), won)
            .await
            .expect("B still answers sold_out from its local flag 200 ms after the raise");
        println!("B admitted {:?} after the raise", raised.elapsed());
        let users: Vec<String> = flash_seen(&shop_b, "ev-1")
            .iter()
            .map(|s| one_header(s, "x-flashgate-user").to_owned())
            .collect();
        assert_eq!(users, ["alice".to_owned(), format!("retry-{tries}")]);
        assert_eq!(shop_a.count(), 0);
        assert_eq!(stock(&fg_a, "ev-1").await, 0);
    })
    .await;
}

/// B learned the SKU is sold out (its own buyer got 410); the sale is closed through A and a
/// unit comes back: B's flag goes at once, B's buyers hear the sale is closed; reopened
/// through A, B sells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_reopened_elsewhere_reaches_every_instance_at_once() {
    bounded(async {
        let server = RedisServer::start();
        let store = redis_yaml(&server);
        let (shop_a, shop_b) = (shop().await, shop().await);
        let cfg = |b: &Backend| sale_config(&b.url(), &store, "5s", BUY_PATH, LONG_RECHECK_SALE);
        let fg_a = Flashgate::start(&cfg(&shop_a)).await;
        let fg_b = Flashgate::start(&cfg(&shop_b)).await;
        set_stock(&fg_a, "ev-2", 1).await;
        let client = client();
        let sku = flashgate::store::Sku::parse("ev-2").unwrap();
        assert_eq!(buy(&client, &fg_a, "ev-2", "alice").await.status, 200);
        assert_rejected(&buy(&client, &fg_b, "ev-2", "bob").await, 410, "sold_out");
        assert!(fg_b.app.sold_out.is_sold_out(&sku));

        // A unit back while the sale is closed through A: B's flag goes at once, B's buyers
        // are told the sale is closed; reopened through A, B sells.
        let api = AdminApi::of(&fg_a);
        assert_eq!(
            api.call("POST", "/v1/sales/ev-2/close", None).await.status,
            200
        );
        assert_eq!(add_stock(&fg_a, "ev-2", 1).await, 1);
        let deadline = Instant::now() + Duration::from_millis(200);
        while fg_b.app.sold_out.is_sold_out(&sku) {
            assert!(Instant::now() < deadline, "B kept its flag after the raise");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_rejected(&buy(&client, &fg_b, "ev-2", "carol").await, 410, "closed");
        let api = AdminApi::of(&fg_a);
        assert_eq!(
            api.call("POST", "/v1/sales/ev-2/open", None).await.status,
            200
        );
        assert_eq!(buy(&client, &fg_b, "ev-2", "carol").await.status, 200);
        assert_eq!(shop_b.count(), 1);
    })
    .await;
}
