//! Flash-sale admission end to end, told as the operator's story: start Redis (or not), a
//! recording shop backend and flashgate; set stock through the admin API; fire buyers; then
//! count what the backend actually received and what the store says.
//!
//! Every case in `cases` runs twice: against the embedded store (no `store:` key) and against
//! a real, private `redis-server` (`store: { redis: … }`). Several instances sharing one Redis
//! are `tests/multi_instance.rs`; the `flashgate` CLI is `tests/cli.rs`; the operator's kit
//! (stores, sale config, shops, buyers, admin calls) is `tests/support/shop.rs`.
//!
//! No mocks, no fixed sleeps as waits (a condition is polled), every test bounded in time.
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};
use support::raw;
use support::redis::RedisServer;
use support::shop::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The headers flashgate stamps on an admitted order, one each: `user`, `sku`, quantity 1,
/// and a well-formed reservation id, which it returns.
fn assert_stamped<'a>(seen: &'a Seen, user: &str, sku: &str) -> &'a str {
    assert_eq!(one_header(seen, "x-flashgate-user"), user);
    assert_eq!(one_header(seen, "x-flashgate-sku"), sku);
    assert_eq!(one_header(seen, "x-flashgate-quantity"), "1");
    let id = one_header(seen, "x-flashgate-reservation");
    assert!(is_reservation_id(id), "{id}");
    id
}

/// A shop's refusal that `release_on` lists: the unit goes back.
const BUSY: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, r#"{"backend":"busy"}"#);

// ---------------------------------------------------------------------------
// The cases, each run against both stores

mod cases {
    use super::*;

    /// 2,000 distinct buyers race for 100 units: exactly 100 reach the backend, from 100
    /// distinct users, everyone else is told `sold_out`, and the books balance.
    pub async fn sells_exactly_the_stock(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "drop-1", 100).await;

        let users: Vec<String> = (0..2000).map(|i| format!("user-{i:04}")).collect();
        let outcomes = fire(&[&fg], "drop-1", users).await;

        let t = tally(&outcomes);
        assert_eq!(t.get(&(200, String::new())), Some(&100), "{t:?}");
        assert_eq!(t.get(&(410, "sold_out".into())), Some(&1900), "{t:?}");
        assert_eq!(t.len(), 2, "no other answers: {t:?}");

        // What the backend actually received: 100 flash requests, nothing else.
        let seen = flash_seen(&backend, "drop-1");
        assert_eq!(seen.len(), 100);
        assert_eq!(backend.count(), 100);
        let users: HashSet<&str> = seen
            .iter()
            .map(|s| one_header(s, "x-flashgate-user"))
            .collect();
        let winners: HashSet<&str> = outcomes
            .iter()
            .filter(|o| o.status == 200)
            .map(|o| o.user.as_str())
            .collect();
        assert_eq!(users.len(), 100, "100 distinct users");
        assert_eq!(
            users, winners,
            "the backend saw exactly the users told they won"
        );
        let ids: HashSet<&str> = seen
            .iter()
            .map(|s| one_header(s, "x-flashgate-reservation"))
            .collect();
        assert_eq!(ids.len(), 100, "one reservation id per winner");
        assert!(ids.iter().all(|id| is_reservation_id(id)), "{ids:?}");
        for s in &seen {
            assert_eq!(one_header(s, "x-flashgate-sku"), "drop-1");
            assert_eq!(one_header(s, "x-flashgate-quantity"), "1");
        }

        assert_eq!(stock(&fg, "drop-1").await, 0);
        let status = status_until(&fg, "drop-1", |s| s["units"]["sold"] == 100).await;
        assert_eq!(status["sku"], "drop-1");
        assert_eq!(status["stock"], 0);
        assert_eq!(status["buyers"], 100);
        assert_eq!(status["reservations"], counts(0, 100, 0, 0));
        assert_eq!(status["units"], counts(0, 100, 0, 0));
    }

    /// The backend refuses every third order with 503 (`release_on`), under the same race:
    /// each refused unit goes back and may be sold again, and the books still balance —
    /// accepted orders + stock left == 100, never more accepted than stocked.
    pub async fn backend_refusing_some_orders_never_oversells(store: StoreFixture) {
        let backend = shop_refusing(|n, _| (n % 3 == 2).then_some(BUSY)).await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "flaky-1", 100).await;

        let users: Vec<String> = (0..2000).map(|i| format!("user-{i:04}")).collect();
        let outcomes = fire(&[&fg], "flaky-1", users).await;

        let t = tally(&outcomes);
        let accepted = t.get(&(200, String::new())).copied().unwrap_or(0);
        let refused = t.get(&(503, String::new())).copied().unwrap_or(0);
        let sold_out = t.get(&(410, "sold_out".into())).copied().unwrap_or(0);
        assert_eq!(
            accepted + refused + sold_out,
            2000,
            "no other answers: {t:?}"
        );
        assert!(refused > 0, "the backend did refuse some: {t:?}");
        assert!(accepted <= 100, "oversold: {t:?}");

        // The backend saw exactly the accepted and the refused orders, one per user.
        let seen = flash_seen(&backend, "flaky-1");
        assert_eq!(seen.len(), accepted + refused);
        let users: HashSet<&str> = seen
            .iter()
            .map(|s| one_header(s, "x-flashgate-user"))
            .collect();
        assert_eq!(users.len(), seen.len(), "one order per user");

        let left = stock(&fg, "flaky-1").await as usize;
        assert_eq!(
            accepted + left,
            100,
            "accepted {accepted} + left {left}: {t:?}"
        );
        let status = status_until(&fg, "flaky-1", |s| s["units"]["sold"] == accepted).await;
        assert_eq!(
            status["reservations"],
            counts(0, accepted as u64, refused as u64, 0)
        );
        assert_eq!(status["buyers"], accepted);
    }

    /// 300 users each press "buy" five times at once, with plenty of stock: each user reaches
    /// the backend exactly once, the other four attempts are `already_purchased`.
    pub async fn one_purchase_per_user(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "dedupe-1", 1000).await;

        // User-major order: a user's five attempts are adjacent, so they are in flight together.
        let attempts: Vec<String> = (0..300)
            .flat_map(|u| std::iter::repeat_n(format!("user-{u:03}"), 5))
            .collect();
        let outcomes = fire(&[&fg], "dedupe-1", attempts).await;

        let t = tally(&outcomes);
        assert_eq!(t.get(&(200, String::new())), Some(&300), "{t:?}");
        assert_eq!(
            t.get(&(409, "already_purchased".into())),
            Some(&1200),
            "{t:?}"
        );
        assert_eq!(t.len(), 2, "no other answers: {t:?}");
        let mut wins_per_user: HashMap<&str, usize> = HashMap::new();
        for o in outcomes.iter().filter(|o| o.status == 200) {
            *wins_per_user.entry(&o.user).or_default() += 1;
        }
        assert_eq!(wins_per_user.len(), 300);
        assert!(wins_per_user.values().all(|&n| n == 1), "{wins_per_user:?}");

        let seen = flash_seen(&backend, "dedupe-1");
        assert_eq!(seen.len(), 300);
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for s in &seen {
            *per_user
                .entry(one_header(s, "x-flashgate-user"))
                .or_default() += 1;
        }
        assert_eq!(per_user.len(), 300, "every user reached the backend");
        assert!(per_user.values().all(|&n| n == 1), "{per_user:?}");

        assert_eq!(stock(&fg, "dedupe-1").await, 700);
        let status = status_until(&fg, "dedupe-1", |s| s["units"]["sold"] == 300).await;
        assert_eq!(status["buyers"], 300);
        assert_eq!(status["reservations"], counts(0, 300, 0, 0));
    }

    /// The backend is down (connection refused): the winner gets 502, the unit and the
    /// user's slot go back at once, and when the backend comes up on the same address the
    /// same user wins the unit again.
    pub async fn refused_connection_releases_the_unit(store: StoreFixture) {
        let port = refused_port();
        let fg = start(&format!("http://127.0.0.1:{port}"), &store).await;
        set_stock(&fg, "down-1", 1).await;

        let client = client();
        let a = buy(&client, &fg, "down-1", "alice").await;
        assert_rejected(&a, 502, "upstream_unavailable");
        // Release is awaited before the answer: no waiting needed.
        assert_eq!(stock(&fg, "down-1").await, 1, "the unit is back");
        let status = sale_status(&fg, "down-1").await;
        assert_eq!(status["reservations"], counts(0, 0, 1, 0));
        assert_eq!(status["buyers"], 0, "alice's slot is free again");

        // The backend comes up on the very address flashgate points at.
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("rebind 127.0.0.1:{port}: {e}"));
        let backend = shop_on(listener);
        let a = buy(&client, &fg, "down-1", "alice").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["order"], "accepted");
        let seen = flash_seen(&backend, "down-1");
        assert_eq!(seen.len(), 1);
        assert_eq!(one_header(&seen[0], "x-flashgate-user"), "alice");

        assert_rejected(&buy(&client, &fg, "down-1", "bob").await, 410, "sold_out");
        assert_eq!(stock(&fg, "down-1").await, 0);
        let status = status_until(&fg, "down-1", |s| s["units"]["sold"] == 1).await;
        assert_eq!(status["reservations"], counts(0, 1, 1, 0));
        assert_eq!(status["buyers"], 1);
        assert_eq!(backend.count(), 1);
    }

    /// A status in `release_on` means the backend did not take the order: the client sees
    /// the backend's answer, the unit goes back and the same user can win it again. A status
    /// not in the list (500) counts as sold.
    pub async fn release_on_status_returns_the_unit(store: StoreFixture) {
        // Refuses the first order with 503, takes the ones after; always 500 for `broken-1`.
        let backend = shop_refusing(|n, path| {
            if path.contains("broken-1") {
                Some((StatusCode::INTERNAL_SERVER_ERROR, r#"{"backend":"bug"}"#))
            } else {
                (n == 0).then_some(BUSY)
            }
        })
        .await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "busy-1", 1).await;

        let client = client();
        let a = buy(&client, &fg, "busy-1", "alice").await;
        assert_eq!(a.status, 503, "{}", a.text());
        assert_eq!(
            a.json(),
            json!({ "backend": "busy" }),
            "the backend's own answer"
        );
        assert_eq!(stock(&fg, "busy-1").await, 1, "released before the answer");
        let status = sale_status(&fg, "busy-1").await;
        assert_eq!(status["reservations"], counts(0, 0, 1, 0));
        assert_eq!(status["buyers"], 0);

        let a = buy(&client, &fg, "busy-1", "alice").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_rejected(
            &buy(&client, &fg, "busy-1", "alice").await,
            409,
            "already_purchased",
        );
        assert_eq!(stock(&fg, "busy-1").await, 0);
        let status = status_until(&fg, "busy-1", |s| s["units"]["sold"] == 1).await;
        assert_eq!(status["reservations"], counts(0, 1, 1, 0));

        let seen = flash_seen(&backend, "busy-1");
        assert_eq!(seen.len(), 2, "the refused order and the accepted one");
        let ids: HashSet<&str> = seen
            .iter()
            .map(|s| {
                assert_eq!(one_header(s, "x-flashgate-user"), "alice");
                one_header(s, "x-flashgate-reservation")
            })
            .collect();
        assert_eq!(ids.len(), 2, "the second win is a new reservation");

        // 500 is not in `release_on`: the backend may have taken the order, so it stays sold.
        set_stock(&fg, "broken-1", 1).await;
        let a = buy(&client, &fg, "broken-1", "carol").await;
        assert_eq!(a.status, 500, "{}", a.text());
        assert_eq!(stock(&fg, "broken-1").await, 0, "not released");
        status_until(&fg, "broken-1", |s| s["reservations"] == counts(0, 1, 0, 0)).await;
        assert_rejected(
            &buy(&client, &fg, "broken-1", "carol").await,
            409,
            "already_purchased",
        );
        assert_eq!(flash_seen(&backend, "broken-1").len(), 1);
    }

    /// The backend is slower than `request_timeout`: the client gets 504, but the backend
    /// may still take the order, so the unit is kept and the reservation marked `uncertain`.
    pub async fn timeout_keeps_the_unit_uncertain(store: StoreFixture) {
        let backend = slow_shop(Duration::from_secs(2)).await;
        let fg = start_with_timeout(&backend.url(), &store, "300ms").await;
        set_stock(&fg, "slow-1", 1).await;

        let client = client();
        let started = Instant::now();
        let a = buy(&client, &fg, "slow-1", "alice").await;
        assert_rejected(&a, 504, "upstream_timeout");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered at the timeout"
        );
        assert!(
            eventually(Duration::from_secs(5), || flash_seen(&backend, "slow-1")
                .len()
                == 1)
            .await,
            "the request did reach the backend"
        );

        let status = status_until(&fg, "slow-1", |s| s["reservations"]["uncertain"] == 1).await;
        assert_eq!(status["reservations"], counts(0, 0, 0, 1));
        assert_eq!(status["units"], counts(0, 0, 0, 1));
        assert_eq!(status["stock"], 0, "the unit is not restored");
        assert_eq!(status["buyers"], 1);
        assert_eq!(stock(&fg, "slow-1").await, 0);
        // Alice still holds it (the shop may have her order); nobody else can win it.
        assert_rejected(
            &buy(&client, &fg, "slow-1", "alice").await,
            409,
            "already_purchased",
        );
        assert_rejected(&buy(&client, &fg, "slow-1", "bob").await, 410, "sold_out");
        assert_eq!(flash_seen(&backend, "slow-1").len(), 1);
    }

    /// Client-supplied `X-Flashgate-*` headers never reach the backend: on a flash route it
    /// sees flashgate's values only, on an ordinary route none at all.
    pub async fn spoofed_flashgate_headers_never_reach_the_backend(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "real-1", 10).await;
        let client = client();
        let alice_spoofing: Vec<_> = [("x-user-id", "alice")]
            .into_iter()
            .chain(SPOOFED)
            .collect();

        // A flash route.
        let buy_path = "/api/flash/real-1/buy";
        served(&client, &fg, "POST", buy_path, &alice_spoofing).await;
        let seen = flash_seen(&backend, "real-1");
        assert_eq!(seen.len(), 1);
        let id = assert_stamped(&seen[0], "alice", "real-1");
        assert_ne!(id, SPOOFED[0].1, "{id}");
        assert!(!seen[0].headers.contains_key("x-flashgate-signature"));

        // Nominating flashgate's headers as hop-by-hop must not strip them either.
        let bob_nominating = [
            ("x-user-id", "bob"),
            ("connection", "x-flashgate-user, X-Flashgate-Reservation"),
            ("connection", "x-flashgate-sku,x-flashgate-quantity"),
        ];
        served(&client, &fg, "POST", buy_path, &bob_nominating).await;
        let seen = flash_seen(&backend, "real-1");
        assert_eq!(seen.len(), 2);
        assert_stamped(&seen[1], "bob", "real-1");

        // An ordinary route: flashgate adds nothing and passes none of them on.
        served(&client, &fg, "GET", "/catalog?page=2", &alice_spoofing).await;
        let all = backend.seen();
        assert_eq!(all.len(), 3);
        let s = &all[2];
        assert_eq!(s.uri.path(), "/catalog");
        let leaked: Vec<_> = s
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-flashgate-"))
            .collect();
        assert!(leaked.is_empty(), "leaked to an ordinary route: {leaked:?}");
        assert_eq!(s.headers["x-user-id"], "alice", "other headers pass");
        assert_eq!(stock(&fg, "real-1").await, 8);
    }

    /// `X-Flashgate-*` headers a client makes up, in mixed case.
    const SPOOFED: [(&str, &str); 5] = [
        (
            "x-flashgate-reservation",
            "ffffffffffffffffffffffffffffffff",
        ),
        ("X-Flashgate-User", "mallory"),
        ("x-flashgate-sku", "other-sku"),
        ("x-flashgate-quantity", "99"),
        ("x-flashgate-signature", "forged"),
    ];

    /// Sends `method path` with `headers` (no body); asserts the answer is a 200.
    async fn served(
        client: &HttpClient,
        fg: &Flashgate,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) {
        let a = send(client, method, &fg.url(path), headers, Bytes::new()).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }

    /// Missing identity → 401; a SKU without stock → 404 `not_configured`; neither is
    /// forwarded nor changes anything.
    pub async fn identity_and_unknown_sku(store: StoreFixture) {
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "known-1", 5).await;
        let client = client();

        let a = send(
            &client,
            "POST",
            &fg.url("/api/flash/known-1/buy"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_rejected(&a, 401, "unauthenticated");
        let a = send(
            &client,
            "POST",
            &fg.url("/api/flash/known-1/buy"),
            &[("x-user-id", "   ")],
            Bytes::new(),
        )
        .await;
        assert_rejected(&a, 401, "unauthenticated");

        let a = buy(&client, &fg, "nobody-set-me", "alice").await;
        assert_rejected(&a, 404, "not_configured");
        assert_eq!(a.json()["sku"], "nobody-set-me");
        let a = admin(&fg, "GET", "/v1/stock/nobody-set-me", None).await;
        assert_rejected(&a, 404, "not_configured");
        let a = buy(&client, &fg, "bad%7Bsku%7D", "alice").await;
        assert_rejected(&a, 400, "bad_request");

        assert_eq!(backend.count(), 0, "nothing forwarded");
        assert_eq!(stock(&fg, "known-1").await, 5);
        let status = sale_status(&fg, "nobody-set-me").await;
        assert_eq!(status["stock"], Value::Null);
        assert_eq!(status["buyers"], 0);
    }

    /// `quantity: { query: qty }` with `per_user_limit: 3`: only whole numbers 1..=3 pass, and
    /// the per-user limit counts units, not requests.
    pub async fn quantity_from_query(store: StoreFixture) {
        let backend = shop().await;
        let fg = start_with_sale(
            &backend.url(),
            &store,
            "{ sku: { path_param: sku }, quantity: { query: qty }, per_user_limit: 3 }",
        )
        .await;
        fg.app.store.set_stock(&sku("qty-1"), 10).await.unwrap();
        let client = client();
        let buy_qty = async |user: &str, qty: &str| {
            order(
                &client,
                &fg.url(&format!("/api/flash/qty-1/buy{qty}")),
                user,
            )
            .await
        };

        for bad in [
            "?qty=0", "?qty=-1", "?qty=abc", "?qty=4", "?qty=1.5", "?qty=", "",
        ] {
            let a = buy_qty("alice", bad).await;
            assert_rejected(&a, 400, "bad_request");
        }
        assert_eq!(backend.count(), 0);
        assert_eq!(store_stock(&fg, "qty-1").await, Some(10));

        let a = buy_qty("alice", "?qty=2").await;
        assert_eq!(a.status, 200, "{}", a.text());
        // 2 held + 2 more > 3.
        let a = buy_qty("alice", "?qty=2").await;
        assert_rejected(&a, 409, "already_purchased");
        assert_eq!(a.json()["held"], 2);
        let a = buy_qty("alice", "?qty=1").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_rejected(&buy_qty("alice", "?qty=1").await, 409, "already_purchased");

        let seen = flash_seen(&backend, "qty-1");
        assert_eq!(seen.len(), 2);
        assert_eq!(one_header(&seen[0], "x-flashgate-quantity"), "2");
        assert_eq!(one_header(&seen[1], "x-flashgate-quantity"), "1");
        assert_eq!(
            seen[0].uri.query(),
            Some("qty=2"),
            "the query is forwarded as sent"
        );
        assert_eq!(store_stock(&fg, "qty-1").await, Some(7));
        let status = status_until(&fg, "qty-1", |s| s["units"]["sold"] == 3).await;
        assert_eq!(status["buyers"], 1);
        assert_eq!(status["reservations"], counts(0, 2, 0, 0));
    }

    /// `sku: { json: sku }`: the body is read (bounded by `max_body`) to find the SKU, and a
    /// valid one is forwarded byte for byte.
    pub async fn sku_from_json_body(store: StoreFixture) {
        let (backend, bodies) = recording_shop().await;
        let fg = Flashgate::start(&sale_config(
            &backend.url(),
            &store.yaml,
            "5s",
            "/api/flash/buy",
            "{ sku: { json: sku }, max_body: 1KiB }",
        ))
        .await;
        fg.app.store.set_stock(&sku("json-1"), 5).await.unwrap();

        json_order_is_forwarded_byte_for_byte(&fg, &backend, &bodies).await;
        bodies_without_a_string_sku_are_400(&fg).await;
        let exact = bodies_up_to_max_body_are_read(&fg).await;
        chunked_bodies_are_read_and_bounded(&fg).await;

        assert_eq!(backend.count(), 3, "only the three valid orders");
        let bodies = bodies.lock().unwrap().clone();
        assert_eq!(bodies[1], exact.as_bytes());
        assert_eq!(bodies[2], &b"{\"sku\":\"json-1\", \"gift\": true}"[..]);
        assert_eq!(store_stock(&fg, "json-1").await, Some(2));
    }

    /// Alice's order, with odd spacing, unicode and nested values: the backend must get these
    /// exact bytes, stamped with the SKU from the body.
    async fn json_order_is_forwarded_byte_for_byte(
        fg: &Flashgate,
        backend: &Backend,
        bodies: &Mutex<Vec<Bytes>>,
    ) {
        let order = Bytes::from_static(
            "{ \"note\": \"gift wrap \u{2713}\",\n  \"sku\":\"json-1\", \"lines\": [1, {\"x\": null}] }"
                .as_bytes(),
        );
        let a = post_json(fg, "alice", order.clone()).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(*bodies.lock().unwrap(), vec![order.clone()]);
        let seen = backend.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(one_header(&seen[0], "x-flashgate-sku"), "json-1");
        assert_eq!(one_header(&seen[0], "x-flashgate-user"), "alice");
        assert_eq!(
            seen[0].headers["content-length"],
            order.len().to_string().as_str()
        );
    }

    /// Bob's bodies with no SKU to read: 400 `bad_request` each.
    async fn bodies_without_a_string_sku_are_400(fg: &Flashgate) {
        let bad: [(&str, &'static [u8]); 6] = [
            ("invalid JSON", b"{\"sku\": \"json-1\""),
            ("not an object", b"[\"json-1\"]"),
            ("a string", b"\"json-1\""),
            ("no sku field", b"{\"item\": \"json-1\"}"),
            ("sku not a string", b"{\"sku\": {\"id\": 1}}"),
            ("empty body", b""),
        ];
        for (what, body) in bad {
            let a = post_json(fg, "bob", Bytes::from_static(body)).await;
            assert_eq!(a.status, 400, "{what}: {}", a.text());
            assert_eq!(a.json()["error"], "bad_request", "{what}");
        }
    }

    /// Valid JSON past `max_body` (1 KiB) is 413; Carol's order right at the limit is taken.
    /// Returns Carol's order.
    async fn bodies_up_to_max_body_are_read(fg: &Flashgate) -> String {
        let big = format!("{{\"sku\":\"json-1\",\"pad\":\"{}\"}}", "x".repeat(1100));
        let a = post_json(fg, "bob", Bytes::from(big)).await;
        assert_rejected(&a, 413, "payload_too_large");
        let pad = 1024 - "{\"sku\":\"json-1\",\"pad\":\"\"}".len();
        let exact = format!("{{\"sku\":\"json-1\",\"pad\":\"{}\"}}", "y".repeat(pad));
        assert_eq!(exact.len(), 1024);
        let a = post_json(fg, "carol", Bytes::from(exact.clone())).await;
        assert_eq!(a.status, 200, "{}", a.text());
        exact
    }

    /// A chunked body (no length known up front) is read chunk by chunk, still bounded, and
    /// forwarded as the bytes the client sent: Dave's order is taken, Erin's (past 1 KiB) is
    /// 413.
    async fn chunked_bodies_are_read_and_bounded(fg: &Flashgate) {
        let head = "POST /api/flash/buy HTTP/1.1\r\nhost: shop\r\nx-user-id: dave\r\ncontent-type: application/json\r\n";
        let answer = send_chunked(
            fg,
            head,
            &[b"{\"sku\":", b"\"json-1\",", b" \"gift\": true}"],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let pad = "z".repeat(600);
        let answer = send_chunked(
            fg,
            &head.replace("dave", "erin"),
            &[
                b"{\"sku\":\"json-1\",",
                format!("\"a\":\"{pad}\",").as_bytes(),
                format!("\"b\":\"{pad}\"}}").as_bytes(),
            ],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }

    /// Before `start` → 403 `not_started`; after `end` → 403 `ended`; inside the window the
    /// sale runs. Neither rejection touches the stock.
    pub async fn sale_window(store: StoreFixture) {
        let backend = shop().await;
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let route = |name: &str, window: String| {
            format!(
                "  - name: {name}\n    match: {{ method: POST, path: \"/api/{name}/{{sku}}/buy\" }}\n    \
                 identity: {{ header: X-User-Id }}\n    sale: {{ sku: {{ path_param: sku }}, {window} }}\n"
            )
        };
        let yaml = format!(
            "upstream: {{ url: \"{}\", request_timeout: 5s }}\n{}routes:\n{}{}{}",
            backend.url(),
            store.yaml,
            route("early", format!("start: \"{}\"", rfc3339(now + hour))),
            route(
                "late",
                format!(
                    "start: \"{}\", end: \"{}\"",
                    rfc3339(now - 2 * hour),
                    rfc3339(now - hour)
                )
            ),
            route(
                "open",
                format!(
                    "start: \"{}\", end: \"{}\"",
                    rfc3339(now - hour),
                    rfc3339(now + hour)
                )
            ),
        );
        let fg = Flashgate::start(&yaml).await;
        fg.app.store.set_stock(&sku("win-1"), 3).await.unwrap();
        let client = client();
        let post = async |path: &str, user: &str| order(&client, &fg.url(path), user).await;

        assert_rejected(
            &post("/api/early/win-1/buy", "alice").await,
            403,
            "not_started",
        );
        assert_rejected(&post("/api/late/win-1/buy", "alice").await, 403, "ended");
        assert_eq!(backend.count(), 0);
        assert_eq!(store_stock(&fg, "win-1").await, Some(3));
        let a = post("/api/open/win-1/buy", "alice").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(backend.count(), 1);
        assert_eq!(store_stock(&fg, "win-1").await, Some(2));
    }

    /// The backend reads the order, then drops the connection without answering. It may
    /// have taken the order, so this is NOT a connect error: the client gets 502, but the
    /// unit stays with the buyer as `uncertain` (releasing it could sell it twice).
    pub async fn reset_after_send_keeps_the_unit_uncertain(store: StoreFixture) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let backend = tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let head = read_head(&mut conn).await;
                if head.starts_with("POST /api/flash/") {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                drop(conn); // no answer
            }
        });
        let fg = start(&upstream, &store).await;
        set_stock(&fg, "reset-1", 1).await;

        let client = client();
        let a = buy(&client, &fg, "reset-1", "alice").await;
        assert_rejected(&a, 502, "upstream_unavailable");
        assert_eq!(received.load(Ordering::SeqCst), 1, "sent once, not retried");
        let status = status_until(&fg, "reset-1", |s| s["reservations"]["uncertain"] == 1).await;
        assert_eq!(status["reservations"], counts(0, 0, 0, 1));
        assert_eq!(status["stock"], 0, "not released");
        assert_rejected(
            &buy(&client, &fg, "reset-1", "alice").await,
            409,
            "already_purchased",
        );
        assert_rejected(&buy(&client, &fg, "reset-1", "bob").await, 410, "sold_out");
        assert_eq!(received.load(Ordering::SeqCst), 1);
        backend.abort();
    }

    /// The buyer's connection drops while the backend is still working on the order.
    /// flashgate finishes the exchange with the backend anyway and records its real outcome:
    /// the backend took the order, so the unit is `sold` (not `uncertain`, not `held`).
    pub async fn client_gone_mid_order_is_not_left_held(store: StoreFixture) {
        let backend = slow_shop(Duration::from_millis(500)).await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "gone-1", 1).await;

        let mut conn = tokio::net::TcpStream::connect(fg.addr).await.unwrap();
        conn.write_all(
            b"POST /api/flash/gone-1/buy HTTP/1.1\r\nhost: shop\r\nx-user-id: alice\r\ncontent-length: 0\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || backend.count() == 1).await,
            "the order reached the backend"
        );
        drop(conn);

        let status = status_until(&fg, "gone-1", |s| s["reservations"]["held"] == 0).await;
        assert_eq!(status["reservations"], counts(0, 1, 0, 0), "{status}");
        assert_eq!(status["stock"], 0);
        assert_eq!(backend.count(), 1);
    }

    /// After a `sold_out` answer this instance answers 410 locally for `sold_out_recheck`,
    /// even if stock reappears in the store behind its back (and, with Redis, without running
    /// a single script); raising stock through the admin API ends that at once.
    pub async fn sold_out_fast_path(store: StoreFixture) {
        let backend = shop().await;
        let fg = start_with_sale(
            &backend.url(),
            &store,
            "{ sku: { path_param: sku }, sold_out_recheck: 60s }",
        )
        .await;
        set_stock(&fg, "fast-1", 1).await;
        let client = client();
        assert_eq!(buy(&client, &fg, "fast-1", "alice").await.status, 200);
        assert_rejected(&buy(&client, &fg, "fast-1", "bob").await, 410, "sold_out");
        // Alice's settle script runs off the response path: let it land before counting.
        status_until(&fg, "fast-1", |s| s["reservations"] == counts(0, 1, 0, 0)).await;
        let scripts_before = store.redis.as_ref().map(RedisServer::script_calls);

        for i in 0..50 {
            let a = buy(&client, &fg, "fast-1", &format!("late-{i}")).await;
            assert_rejected(&a, 410, "sold_out");
        }
        if let (Some(server), Some(before)) = (&store.redis, scripts_before) {
            assert_eq!(
                server.script_calls(),
                before,
                "no script ran for the 50 late buyers"
            );
        }

        // Stock raised in the store behind this instance's back (as another instance sharing
        // Redis would): Redis publishes the change and the flag goes at once; the embedded
        // store has nobody to tell, so it is still answered locally until the recheck time.
        fg.app.store.add_stock(&sku("fast-1"), 1).await.unwrap();
        if store.redis.is_some() {
            let deadline = std::time::Instant::now() + Duration::from_millis(200);
            while fg.app.sold_out.is_sold_out(&sku("fast-1")) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the stock event never came"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            assert_rejected(&buy(&client, &fg, "fast-1", "carol").await, 410, "sold_out");
        }
        assert_eq!(store_stock(&fg, "fast-1").await, Some(1));

        // Raised through the admin API: the very next buyer asks the store, and wins.
        assert_eq!(add_stock(&fg, "fast-1", 1).await, 2);
        let a = buy(&client, &fg, "fast-1", "dave").await;
        assert_eq!(a.status, 200, "{}", a.text());
        let a = buy(&client, &fg, "fast-1", "erin").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_rejected(&buy(&client, &fg, "fast-1", "frank").await, 410, "sold_out");

        let users: Vec<String> = flash_seen(&backend, "fast-1")
            .iter()
            .map(|s| one_header(s, "x-flashgate-user").to_owned())
            .collect();
        assert_eq!(users, ["alice", "dave", "erin"]);
        assert_eq!(stock(&fg, "fast-1").await, 0);
    }
}

/// Units left according to the store itself (behind the admin API's back).
async fn store_stock(fg: &Flashgate, sku: &str) -> Option<u64> {
    fg.app.store.get_stock(&support::sku(sku)).await.unwrap()
}

/// Reads an HTTP/1.1 request or response head (up to the blank line) from a raw stream.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A JSON order from `user` to the flash route that takes its SKU from the body.
async fn post_json(fg: &Flashgate, user: &str, body: Bytes) -> Answer {
    let headers = [("x-user-id", user), ("content-type", "application/json")];
    send(&client(), "POST", &fg.url("/api/flash/buy"), &headers, body).await
}

/// Sends `head` with a chunked body (`chunks` as the chunks, `connection: close`) on a raw
/// connection and returns the whole answer as text, within 10 s.
async fn send_chunked(fg: &Flashgate, head: &str, chunks: &[&[u8]]) -> String {
    raw::exchange_text(fg.addr, &chunked(head, chunks), Duration::from_secs(10)).await
}

/// A chunked request body, `chunks` as the chunks.
fn chunked(head: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut r =
        format!("{head}transfer-encoding: chunked\r\nconnection: close\r\n\r\n").into_bytes();
    for c in chunks {
        r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        r.extend_from_slice(c);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

// Every case above, as `memory_store::{case}` and `redis_store::{case}`.
on_each_store!(cases:
    sells_exactly_the_stock,
    backend_refusing_some_orders_never_oversells,
    one_purchase_per_user,
    refused_connection_releases_the_unit,
    release_on_status_returns_the_unit,
    timeout_keeps_the_unit_uncertain,
    spoofed_flashgate_headers_never_reach_the_backend,
    identity_and_unknown_sku,
    quantity_from_query,
    sku_from_json_body,
    sale_window,
    reset_after_send_keeps_the_unit_uncertain,
    client_gone_mid_order_is_not_left_held,
    sold_out_fast_path,
);
