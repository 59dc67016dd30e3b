//! Stock operations, told as the operator's story: change stock only if nobody else did
//! (`stock set --expect`), close and reopen a sale, prove the audit
//! `added == stock + held + sold + uncertain`, and the 2^53 − 1 caps. Then the admin
//! listener's limits. (The CLI that must never silently do nothing is `tests/cli.rs`.)
//!
//! Store-level cases (`store_cases`) and end-to-end cases (`sale_cases`) run on the embedded
//! store AND on a real, private `redis-server`; `redis_only` adds what needs Redis itself
//! (several instances, keys written by hand). No mocks; waits poll a condition.
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flashgate::store::{
    MAX_UNITS, MemoryStore, RedisConfig, RedisStore, RedisTarget, ReleaseOutcome, ReservationId,
    ReserveOutcome, ReserveRequest, Settlement, StockSet, Store, StoreError, UserId,
};
use http::StatusCode;
use serde_json::{Value, json};
use support::raw;
use support::shop::{
    self, AdminApi, BUY_PATH, PATH_SALE, StoreFixture, assert_error, bounded, memory, redis,
    sale_config, shop, start, start_with_timeout,
};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// 2^53: the first value every cap refuses.
const TOO_BIG: u64 = MAX_UNITS + 1;

// ---------------------------------------------------------------------------
// The store under test

/// A store object for the store-level cases, plus the server it needs.
async fn store_of(f: &StoreFixture) -> Arc<dyn Store> {
    match &f.redis {
        None => Arc::new(MemoryStore::new()),
        Some(server) => Arc::new(
            RedisStore::connect(&RedisConfig {
                target: RedisTarget::Node(server.url()),
                connections: 2,
                connect_timeout: Duration::from_millis(500),
                response_timeout: Duration::from_secs(2),
                key_prefix: "fg".into(),
                tls: None,
                wait_replicas: None,
            })
            .await
            .unwrap(),
        ),
    }
}

fn req(sku: &str, user: &str) -> ReserveRequest {
    ReserveRequest {
        sku: support::sku(sku),
        user: UserId::parse(user).unwrap(),
        quantity: 1,
        per_user_limit: 1,
    }
}

async fn win(store: &dyn Store, sku: &str, user: &str) -> ReservationId {
    match store.reserve(&req(sku, user)).await.unwrap() {
        ReserveOutcome::Won { reservation, .. } => reservation,
        other => panic!("{sku}/{user}: expected Won, got {other:?}"),
    }
}

/// `added == stock + held + sold + uncertain`, from the store's own status.
async fn assert_audit(store: &dyn Store, sku: &str) {
    let s = store.status(&support::sku(sku)).await.unwrap();
    let stock = s.stock.unwrap_or(0);
    let u = &s.units;
    assert_eq!(
        s.added,
        Some(stock + u.held + u.sold + u.uncertain),
        "audit of {sku}: {s:?}"
    );
}

/// Store-level cases, each run on both stores.
mod store_cases {
    use super::*;

    pub async fn compare_and_set(store: Arc<dyn Store>) {
        store.set_stock(&sku("cas-1"), 5).await.unwrap();
        assert_eq!(
            store.set_stock_if(&sku("cas-1"), 7, Some(4)).await.unwrap(),
            StockSet::Changed { current: Some(5) }
        );
        assert_eq!(store.get_stock(&sku("cas-1")).await.unwrap(), Some(5));
        assert_eq!(
            store.set_stock_if(&sku("cas-1"), 7, Some(5)).await.unwrap(),
            StockSet::Set { stock: 7 }
        );
        assert_eq!(store.get_stock(&sku("cas-1")).await.unwrap(), Some(7));
        // A sale nobody configured is never "the expected stock".
        assert_eq!(
            store
                .set_stock_if(&sku("cas-none"), 1, Some(0))
                .await
                .unwrap(),
            StockSet::Changed { current: None }
        );
        assert_eq!(store.get_stock(&sku("cas-none")).await.unwrap(), None);
        assert!(matches!(
            store.set_stock_if(&sku("cas-1"), 1, Some(TOO_BIG)).await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.get_stock(&sku("cas-1")).await.unwrap(), Some(7));
    }

    pub async fn close_then_release_then_open(store: Arc<dyn Store>) {
        store.set_stock(&sku("close-1"), 3).await.unwrap();
        let alice = win(&*store, "close-1", "alice").await;
        store.set_closed(&sku("close-1"), true).await.unwrap();
        // Closed comes first: a new buyer and a repeat buyer alike, stock untouched.
        for user in ["bob", "alice"] {
            assert_eq!(
                store.reserve(&req("close-1", user)).await.unwrap(),
                ReserveOutcome::Closed,
                "{user}"
            );
        }
        assert_eq!(store.get_stock(&sku("close-1")).await.unwrap(), Some(2));
        // A release after the close puts the unit back; the sale stays closed.
        assert_eq!(
            store.release(&sku("close-1"), &alice).await.unwrap(),
            ReleaseOutcome::Released { remaining: 3 }
        );
        assert_eq!(
            store.reserve(&req("close-1", "carol")).await.unwrap(),
            ReserveOutcome::Closed
        );
        let s = store.status(&sku("close-1")).await.unwrap();
        assert!(s.closed);
        assert_eq!((s.stock, s.units.held, s.units.released), (Some(3), 0, 1));
        assert_audit(&*store, "close-1").await;

        store.set_closed(&sku("close-1"), false).await.unwrap();
        assert!(!store.status(&sku("close-1")).await.unwrap().closed);
        win(&*store, "close-1", "carol").await;

        // A sale can be closed before it is stocked: stocking it does not open it.
        store.set_closed(&sku("close-2"), true).await.unwrap();
        store.set_stock(&sku("close-2"), 5).await.unwrap();
        assert_eq!(
            store.reserve(&req("close-2", "dave")).await.unwrap(),
            ReserveOutcome::Closed
        );
        // Reopening a sale that was never closed is a no-op, not an error.
        store.set_closed(&sku("never-closed"), false).await.unwrap();
        assert!(!store.status(&sku("never-closed")).await.unwrap().closed);
    }

    pub async fn added_is_recorded_by_set_and_add(store: Arc<dyn Store>) {
        assert_eq!(store.status(&sku("add-1")).await.unwrap().added, None);
        store.set_stock(&sku("add-1"), 5).await.unwrap();
        assert_eq!(store.status(&sku("add-1")).await.unwrap().added, Some(5));
        store.add_stock(&sku("add-1"), 3).await.unwrap();
        assert_eq!(store.status(&sku("add-1")).await.unwrap().added, Some(8));
        // set: the difference from the previous stock.
        store.set_stock(&sku("add-1"), 4).await.unwrap();
        assert_eq!(store.status(&sku("add-1")).await.unwrap().added, Some(4));

        // A small sale: some sold, one released, one uncertain, one still held.
        let ids = [
            win(&*store, "add-1", "a").await,
            win(&*store, "add-1", "b").await,
            win(&*store, "add-1", "c").await,
            win(&*store, "add-1", "d").await,
        ];
        assert!(
            store
                .settle(&sku("add-1"), &ids[0], Settlement::Sold)
                .await
                .unwrap()
        );
        assert!(
            store
                .settle(&sku("add-1"), &ids[1], Settlement::Uncertain)
                .await
                .unwrap()
        );
        store.release(&sku("add-1"), &ids[2]).await.unwrap();
        assert_audit(&*store, "add-1").await;
        store.add_stock(&sku("add-1"), 10).await.unwrap();
        store.set_stock(&sku("add-1"), 2).await.unwrap();
        store.add_stock(&sku("add-1"), -1).await.unwrap();
        assert_audit(&*store, "add-1").await;
        let s = store.status(&sku("add-1")).await.unwrap();
        assert_eq!(
            (
                s.stock,
                s.added,
                s.units.held,
                s.units.sold,
                s.units.uncertain
            ),
            (Some(1), Some(4), 1, 1, 1)
        );
        // Refused changes record nothing.
        assert!(store.add_stock(&sku("add-1"), -2).await.is_err());
        assert!(store.set_stock_if(&sku("add-1"), 9, Some(0)).await.is_ok());
        assert_eq!(store.status(&sku("add-1")).await.unwrap().added, Some(4));
    }

    pub async fn caps(store: Arc<dyn Store>) {
        for bad in [TOO_BIG, i64::MAX as u64, u64::MAX] {
            assert!(matches!(
                store.set_stock(&sku("cap-1"), bad).await,
                Err(StoreError::Invalid(_))
            ));
        }
        let max = MAX_UNITS as i64;
        for bad in [max + 1, -max - 1, i64::MAX, i64::MIN] {
            assert!(matches!(
                store.add_stock(&sku("cap-1"), bad).await,
                Err(StoreError::Invalid(_))
            ));
        }
        assert_eq!(store.get_stock(&sku("cap-1")).await.unwrap(), None);

        // The largest stock works end to end: a buyer wins, nothing is left hanging.
        store.set_stock(&sku("cap-1"), MAX_UNITS).await.unwrap();
        assert!(matches!(
            store.add_stock(&sku("cap-1"), 1).await,
            Err(StoreError::Invalid(_))
        ));
        match store.reserve(&req("cap-1", "alice")).await.unwrap() {
            ReserveOutcome::Won { remaining, .. } => assert_eq!(remaining, MAX_UNITS - 1),
            other => panic!("{other:?}"),
        }
        // Stock has room for one more unit, but the held unit could come back: `added`
        // stays within the cap, so no release can ever push stock past it.
        assert!(matches!(
            store.add_stock(&sku("cap-1"), 1).await,
            Err(StoreError::Invalid(_))
        ));
        assert_audit(&*store, "cap-1").await;
        // Set-then-add can never leave a negative stock.
        assert_eq!(store.add_stock(&sku("cap-1"), -max + 1).await.unwrap(), 0);
        assert!(store.add_stock(&sku("cap-1"), -1).await.is_err());
        assert_eq!(store.get_stock(&sku("cap-1")).await.unwrap(), Some(0));
        assert_audit(&*store, "cap-1").await;
    }
}

macro_rules! store_tests {
    ($fixture:ident: $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                bounded(async {
                    let f = super::$fixture();
                    let store = store_of(&f).await;
                    super::store_cases::$case(store).await;
                })
                .await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// End to end: flashgate, a recording backend, the admin API over HTTP

/// Every admin call in this file goes through [`AdminApi::marked`]: besides what each case
/// asserts, every answer must say it comes from the admin API.
async fn admin_with(
    fg: &Flashgate,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    AdminApi::marked(fg)
        .call_with(method, path, headers, body)
        .await
}

async fn admin(fg: &Flashgate, method: &str, path: &str, body: Option<Value>) -> Answer {
    AdminApi::marked(fg).call(method, path, body).await
}

async fn set_stock(fg: &Flashgate, sku: &str, units: u64) {
    AdminApi::marked(fg).put_stock(sku, units).await;
}

async fn status(fg: &Flashgate, sku: &str) -> Value {
    AdminApi::marked(fg).sale_status(sku).await
}

/// Polls the sale status until no unit is `held` (settles run off the response path).
async fn settled(fg: &Flashgate, sku: &str) -> Value {
    AdminApi::marked(fg)
        .status_until(sku, |s| s["units"]["held"] == 0)
        .await
}

async fn buy(fg: &Flashgate, sku: &str, user: &str) -> Answer {
    shop::buy(&client(), fg, sku, user).await
}

fn audit_holds(s: &Value) -> bool {
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX / 8);
    let u = &s["units"];
    n(&s["added"]) == n(&s["stock"]) + n(&u["held"]) + n(&u["sold"]) + n(&u["uncertain"])
}

/// End-to-end cases, each run on both stores.
mod sale_cases {
    use super::*;

    pub async fn expect_mismatch_is_409_with_the_current_stock(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "cas-1", 5).await;

        let a = admin(
            &fg,
            "PUT",
            "/v1/stock/cas-1",
            Some(json!({"stock": 7, "expect": 4})),
        )
        .await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
        assert_eq!(a.json()["error"], "stock_changed");
        assert_eq!(a.json()["stock"], 5);
        // The same through If-Match (bare or quoted, like an ETag).
        for if_match in ["4", "\"4\""] {
            let a = admin_with(
                &fg,
                "PUT",
                "/v1/stock/cas-1",
                &[("if-match", if_match)],
                r#"{"stock": 7}"#,
            )
            .await;
            assert_error(&a, 409, "stock_changed");
            assert_eq!(a.json()["stock"], 5);
        }
        let a = admin(&fg, "GET", "/v1/stock/cas-1", None).await;
        assert_eq!(a.json()["stock"], 5, "a refused set changes nothing");

        let a = admin_with(
            &fg,
            "PUT",
            "/v1/stock/cas-1",
            &[("if-match", "\"5\"")],
            r#"{"stock": 7}"#,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json(), json!({"sku": "cas-1", "stock": 7}));
        let a = admin(
            &fg,
            "PUT",
            "/v1/stock/cas-1",
            Some(json!({"stock": 9, "expect": 7})),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());

        // Body and header disagreeing, a misspelt field: refused, naming the field.
        let a = admin_with(
            &fg,
            "PUT",
            "/v1/stock/cas-1",
            &[("if-match", "1")],
            r#"{"stock": 7, "expect": 9}"#,
        )
        .await;
        assert_error(&a, 400, "bad_request");
        assert_eq!(a.json()["field"], "expect");
        let a = admin(
            &fg,
            "PUT",
            "/v1/stock/cas-1",
            Some(json!({"stock": 7, "expct": 9})),
        )
        .await;
        assert_error(&a, 400, "bad_request");
        assert_eq!(a.json()["field"], "expct");
        let a = admin(&fg, "GET", "/v1/stock/cas-1", None).await;
        assert_eq!(a.json()["stock"], 9);

        // Not configured: 409 with `"stock": null`.
        let a = admin(
            &fg,
            "PUT",
            "/v1/stock/cas-none",
            Some(json!({"stock": 1, "expect": 0})),
        )
        .await;
        assert_error(&a, 409, "stock_changed");
        assert_eq!(a.json()["stock"], Value::Null);
    }

    pub async fn release_after_close_does_not_reopen(store: StoreFixture) {
        // The backend holds alice's order until told, then refuses it (503: released).
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let backend = Backend::start(move |_req| {
            let g = g.clone();
            async move {
                let _permit = g.acquire().await;
                json_response(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"busy"}"#)
            }
        })
        .await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "rc-1", 1).await;
        let fg = Arc::new(fg);
        let alice = {
            let fg = fg.clone();
            tokio::spawn(async move { buy(&fg, "rc-1", "alice").await })
        };
        assert!(eventually(Duration::from_secs(5), || backend.count() == 1).await);

        let a = admin(&fg, "POST", "/v1/sales/rc-1/close", None).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json(), json!({"sku": "rc-1", "closed": true}));
        gate.add_permits(1);
        assert_eq!(alice.await.unwrap().status, 503);

        let s = settled(&fg, "rc-1").await;
        assert_eq!(s["stock"], 1, "the released unit is back in stock: {s}");
        assert_eq!(s["closed"], true, "{s}");
        assert!(audit_holds(&s), "{s}");
        assert_error(&buy(&fg, "rc-1", "bob").await, 410, "closed");
        assert_eq!(backend.count(), 1, "a closed sale forwards nobody");

        let a = admin(&fg, "POST", "/v1/sales/rc-1/open", None).await;
        assert_eq!(a.json(), json!({"sku": "rc-1", "closed": false}));
        gate.add_permits(1);
        // Reopened: bob reaches the backend (which refuses again: the unit comes back).
        assert_eq!(buy(&fg, "rc-1", "bob").await.status, 503);
        assert_eq!(backend.count(), 2);
    }

    pub async fn audit_after_a_small_sale(store: StoreFixture) {
        // `fail-*` orders are refused (503: released), `slow-*` time out (uncertain).
        let backend = Backend::start(|req| async move {
            let user = req
                .headers()
                .get("x-flashgate-user")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            if user.starts_with("fail-") {
                json_response(StatusCode::SERVICE_UNAVAILABLE, "{}")
            } else if user.starts_with("slow-") {
                tokio::time::sleep(Duration::from_secs(3)).await;
                json_response(StatusCode::OK, "{}")
            } else {
                json_response(StatusCode::OK, "{}")
            }
        })
        .await;
        let fg = start_with_timeout(&backend.url(), &store, "500ms").await;
        set_stock(&fg, "audit-1", 8).await;
        let a = admin(
            &fg,
            "POST",
            "/v1/stock/audit-1/add",
            Some(json!({"delta": 4})),
        )
        .await;
        assert_eq!(a.json()["stock"], 12);
        set_stock(&fg, "audit-1", 10).await;

        let users = ["a", "b", "c", "fail-1", "fail-2", "slow-1", "d"];
        let outcomes = shop::fire(&[&fg], "audit-1", users.map(String::from).to_vec()).await;
        for o in &outcomes {
            let want = match o.user.as_str() {
                u if u.starts_with("fail-") => 503,
                u if u.starts_with("slow-") => 504,
                _ => 200,
            };
            assert_eq!(o.status, want, "{}", o.user);
        }
        let s = settled(&fg, "audit-1").await;
        assert_eq!(s["added"], 10, "{s}");
        assert_eq!(
            (
                &s["stock"],
                &s["units"]["sold"],
                &s["units"]["released"],
                &s["units"]["uncertain"]
            ),
            (&json!(5), &json!(4), &json!(2), &json!(1)),
            "{s}"
        );
        assert!(
            audit_holds(&s),
            "added == stock + held + sold + uncertain: {s}"
        );
    }

    pub async fn caps_over_http(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        for (method, path, body, field) in [
            ("PUT", "/v1/stock/cap-1", json!({"stock": TOO_BIG}), "stock"),
            (
                "PUT",
                "/v1/stock/cap-1",
                json!({"stock": u64::MAX}),
                "stock",
            ),
            ("PUT", "/v1/stock/cap-1", json!({"stock": -1}), "stock"),
            ("PUT", "/v1/stock/cap-1", json!({"stock": 1.5}), "stock"),
            ("PUT", "/v1/stock/cap-1", json!({"stock": "5"}), "stock"),
            (
                "PUT",
                "/v1/stock/cap-1",
                json!({"stock": 1, "expect": TOO_BIG}),
                "expect",
            ),
            (
                "POST",
                "/v1/stock/cap-1/add",
                json!({"delta": TOO_BIG}),
                "delta",
            ),
            (
                "POST",
                "/v1/stock/cap-1/add",
                json!({"delta": -(TOO_BIG as i64)}),
                "delta",
            ),
        ] {
            let a = admin(&fg, method, path, Some(body.clone())).await;
            assert_error(&a, 400, "bad_request");
            assert_eq!(a.json()["field"], field, "{body}: {}", a.text());
        }
        // 1e30 and 2^64 do not fit any integer type: still a 400 naming the field.
        let a = admin_with(&fg, "PUT", "/v1/stock/cap-1", &[], r#"{"stock": 1e30}"#).await;
        assert_eq!(a.json()["field"], "stock", "{}", a.text());
        let a = admin_with(
            &fg,
            "PUT",
            "/v1/stock/cap-1",
            &[],
            r#"{"stock": 18446744073709551616}"#,
        )
        .await;
        assert_eq!(a.json()["field"], "stock", "{}", a.text());

        // The largest stock: a buyer wins (no 503, nothing left held), `add` past the cap
        // or below zero is a clear 400, never a 503.
        set_stock(&fg, "cap-1", MAX_UNITS).await;
        let a = buy(&fg, "cap-1", "alice").await;
        assert_eq!(a.status, 200, "{}", a.text());
        let s = settled(&fg, "cap-1").await;
        assert_eq!(s["stock"], MAX_UNITS - 1, "{s}");
        assert_eq!(s["units"]["sold"], 1, "{s}");
        assert!(audit_holds(&s), "{s}");
        for delta in [2_i64, -(MAX_UNITS as i64)] {
            let a = admin(
                &fg,
                "POST",
                "/v1/stock/cap-1/add",
                Some(json!({"delta": delta})),
            )
            .await;
            assert_error(&a, 400, "bad_request");
        }
        let a = admin(&fg, "GET", "/v1/stock/cap-1", None).await;
        assert_eq!(a.json()["stock"], MAX_UNITS - 1);
    }

    pub async fn sku_is_percent_decoded_then_checked(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        let a = admin(&fg, "PUT", "/v1/stock/tee%2D42", Some(json!({"stock": 3}))).await;
        assert_eq!(a.json(), json!({"sku": "tee-42", "stock": 3}));
        let a = admin(&fg, "GET", "/v1/stock/tee-42", None).await;
        assert_eq!(a.json()["stock"], 3);
        for bad in ["a%2Fb", "a%20b", "%FF", "a%7Bb%7D"] {
            let a = admin(
                &fg,
                "PUT",
                &format!("/v1/stock/{bad}"),
                Some(json!({"stock": 3})),
            )
            .await;
            assert_error(&a, 400, "bad_request");
        }
        // Unknown calls and a missing token still say it is flashgate answering.
        let a = admin(&fg, "GET", "/v1/nothing", None).await;
        assert_eq!(a.status, 404);
        let a = send(
            &client(),
            "GET",
            &format!("{}/v1/stock/tee-42", fg.admin_url()),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, 401);
        assert_eq!(a.headers["x-flashgate-admin"], "1");
    }
}

macro_rules! sale_tests {
    ($fixture:ident: $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                bounded(super::sale_cases::$case(super::$fixture())).await;
            }
        )*
    };
}

macro_rules! both {
    ($fixture:ident) => {
        store_tests!($fixture:
            compare_and_set,
            close_then_release_then_open,
            added_is_recorded_by_set_and_add,
            caps,
        );
        sale_tests!($fixture:
            expect_mismatch_is_409_with_the_current_stock,
            release_after_close_does_not_reopen,
            audit_after_a_small_sale,
            caps_over_http,
            sku_is_percent_decoded_then_checked,
        );
    };
}

mod on_memory {
    use super::*;
    both!(memory);
}

mod on_redis {
    use super::*;
    both!(redis);
}

/// What needs Redis itself: several instances sharing it, keys written by hand.
mod redis_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_answers_410_on_every_instance() {
        bounded(async {
            let store = redis();
            let (shop_a, shop_b) = (shop().await, shop().await);
            let fg_a = start(&shop_a.url(), &store).await;
            let fg_b = start(&shop_b.url(), &store).await;
            set_stock(&fg_a, "multi-1", 5).await;
            assert_eq!(buy(&fg_b, "multi-1", "alice").await.status, 200);

            let a = admin(&fg_a, "POST", "/v1/sales/multi-1/close", None).await;
            assert_eq!(a.status, 200, "{}", a.text());
            for (fg, user) in [(&fg_a, "bob"), (&fg_b, "carol"), (&fg_b, "alice")] {
                assert_error(&buy(fg, "multi-1", user).await, 410, "closed");
            }
            assert_eq!(status(&fg_b, "multi-1").await["closed"], true);
            let s = settled(&fg_b, "multi-1").await;
            assert_eq!(s["stock"], 4, "closing touches no stock: {s}");
            assert_eq!(shop_a.count() + shop_b.count(), 1);

            // Closed is not sold out: reopening through B is seen by A at once.
            let a = admin(&fg_b, "POST", "/v1/sales/multi-1/open", None).await;
            assert_eq!(a.status, 200, "{}", a.text());
            assert_eq!(buy(&fg_a, "multi-1", "bob").await.status, 200);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stock_beyond_the_cap_written_by_hand_is_refused_not_miscounted() {
        bounded(async {
            let store = redis();
            let server = store.redis.as_ref().expect("redis");
            let backend = shop().await;
            let fg = start(&backend.url(), &store).await;
            // What an older flashgate let through: `stock set SKU 9223372036854775807`.
            server.cli(&["SET", "fg:{huge-1}:stock", "9223372036854775807"]);
            let a = buy(&fg, "huge-1", "alice").await;
            assert_error(&a, 503, "unavailable");
            assert_eq!(backend.count(), 0);
            let s = status(&fg, "huge-1").await;
            assert_eq!(s["units"]["held"], 0, "a refused batch holds nothing: {s}");
            assert_eq!(
                server.get("fg:{huge-1}:stock").as_deref(),
                Some("9223372036854775807")
            );
            // add says what is wrong (400, not 503); set repairs it, and the audit starts.
            let a = admin(
                &fg,
                "POST",
                "/v1/stock/huge-1/add",
                Some(json!({"delta": -1})),
            )
            .await;
            assert_error(&a, 400, "bad_request");
            set_stock(&fg, "huge-1", 5).await;
            assert_eq!(buy(&fg, "huge-1", "alice").await.status, 200);
            let s = settled(&fg, "huge-1").await;
            assert_eq!((&s["stock"], &s["added"]), (&json!(4), &json!(5)), "{s}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sale_stocked_before_added_was_recorded_starts_from_the_audit() {
        bounded(async {
            let store = redis();
            let server = store.redis.as_ref().expect("redis");
            let s = store_of(&store).await;
            // An older flashgate: stock 10 left, 3 sold, no `added` field.
            server.cli(&["SET", "fg:{old-1}:stock", "10"]);
            server.cli(&[
                "HSET",
                "fg:{old-1}:stats",
                "units:sold",
                "3",
                "res:sold",
                "3",
            ]);
            assert_eq!(s.status(&sku("old-1")).await.unwrap().added, None);
            s.add_stock(&sku("old-1"), 2).await.unwrap();
            assert_eq!(s.status(&sku("old-1")).await.unwrap().added, Some(15));
            assert_audit(&*s, "old-1").await;
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// The admin listener: the proxy's header timeout and size limits

/// A shop, flashgate with `server` (the `server:` line, whose limits the admin listener keeps
/// too), and a raw connection to its admin listener.
async fn admin_connection(server: &str) -> (Backend, Flashgate, TcpStream) {
    let backend = shop().await;
    let fg = Flashgate::start(&sale_config(
        &backend.url(),
        server,
        "5s",
        BUY_PATH,
        PATH_SALE,
    ))
    .await;
    let stream = TcpStream::connect(fg.admin.expect("admin")).await.unwrap();
    (backend, fg, stream)
}

/// What the admin listener sent before closing `stream`, as text; panics with `held_open` if
/// it is still open after 5 s.
async fn text_until_closed(stream: &mut TcpStream, held_open: &str) -> String {
    let got = tokio::time::timeout(Duration::from_secs(5), raw::read_to_close(stream))
        .await
        .expect(held_open);
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_closes_a_half_sent_header_within_the_timeout() {
    bounded(async {
        let (_backend, fg, mut stream) =
            admin_connection("server: { header_read_timeout: 300ms }\n").await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        let started = Instant::now();
        let text = text_until_closed(
            &mut stream,
            "a half-sent head held the admin connection open",
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // Closed without serving the request (hyper may say 408 first).
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
        // The listener still serves whole requests.
        let a = get(&format!("{}/healthz", fg.admin_url())).await;
        assert_eq!(a.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_an_oversized_header() {
    bounded(async {
        let (_backend, _fg, mut stream) =
            admin_connection("server: { max_header_bytes: 8KiB }\n").await;
        let big = "a".repeat(64 * 1024);
        let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        // The server may close while we are still writing: that is a refusal too.
        let _ = stream.write_all(head.as_bytes()).await;
        let text = text_until_closed(
            &mut stream,
            "an oversized head held the admin connection open",
        )
        .await;
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{text}"
        );
    })
    .await;
}

// Config: `quantity` / `per_user_limit` past 2^53 − 1 are refused at load with file, line and
// key: `tests/config_check.rs` (fixtures `bad_quantity_past_2_53.yaml`,
// `bad_per_user_limit_past_2_53.yaml`).
