//! One canonical request, end to end: what flashgate checks is what the backend receives.
//!
//! The story of each test: a hostile client spells a request the way some framework behind
//! flashgate would still route to the buy handler, or repeats a value the backend might read
//! differently from flashgate. flashgate either forwards one canonical form (and the backend
//! receives exactly that) or answers itself — never forwards a spelling it did not gate.
//! The framework-by-framework matrix is `bypass_matrix.rs`; these are the rules one by one.
mod support;

use bytes::Bytes;
use http::StatusCode;
use support::redis::RedisServer;
use support::*;

/// A flash route `POST /api/flash/{sku}/buy` (SKU from the path, stock 0 unless set), a
/// flash route `POST /api/order` (SKU and quantity from the JSON body, up to 3 per user), and a
/// catch-all ordinary route; `extra` is added at the top level.
fn shop_config(backend: &Backend, store_yaml: &str, extra: &str) -> String {
    config(
        backend,
        &format!(
            "{store_yaml}{extra}\
             routes:\n\
             \x20 - name: flash-buy\n\
             \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   sale: {{ sku: {{ path_param: sku }} }}\n\
             \x20 - name: flash-order\n\
             \x20   match: {{ method: POST, path: \"/api/order\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   sale: {{ sku: {{ json: sku }}, quantity: {{ json: quantity }}, per_user_limit: 3 }}\n\
             \x20 - name: flash-query\n\
             \x20   match: {{ method: POST, path: \"/api/q/buy\" }}\n\
             \x20   identity: {{ cookie: uid }}\n\
             \x20   sale: {{ sku: {{ query: sku }} }}\n\
             \x20 - name: flash-header\n\
             \x20   match: {{ method: POST, path: \"/api/h/buy\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   sale: {{ sku: {{ header: X-Sku }} }}\n\
             \x20 - name: everything-else\n\
             \x20   match: {{ path: \"/{{*rest}}\" }}\n"
        ),
    )
}

async fn started(extra: &str) -> (Backend, Flashgate) {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&shop_config(&backend, "", extra)).await;
    (backend, fg)
}

/// Asserts flashgate answered `status` with JSON `{"error": reason}` itself.
fn assert_refused(a: &Answer, status: u16, reason: &str, what: &str) {
    assert_eq!(a.status.as_u16(), status, "{what}: {}", a.text());
    assert_eq!(a.json()["error"], reason, "{what}: {}", a.text());
}

#[tokio::test]
async fn the_backend_receives_the_canonical_path_that_was_matched() {
    let (backend, fg) = started("").await;
    let c = client();
    for (sent, received) in [
        ("/a/./b//c/%7Euser/../d?x=%2F&y=..", "/a/b/c/d?x=%2F&y=.."),
        ("/shop/%41bc/%2e%2e/list", "/shop/list"),
        ("/shop/items/", "/shop/items/"),
        // Escapes of reserved or non-ASCII bytes stay as sent.
        ("/shop/%e2%82%ac", "/shop/%e2%82%ac"),
    ] {
        let a = send(&c, "GET", &fg.url(sent), &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{sent}: {}", a.text());
        let seen = backend.seen();
        let last = seen.last().expect("forwarded");
        assert_eq!(last.uri.to_string(), received, "{sent}");
    }
}

#[tokio::test]
async fn ambiguous_paths_are_refused_unless_a_setting_allows_them() {
    let (backend, fg) = started("").await;
    let c = client();
    for path in [
        "/files/a%2Fb",
        "/files/a%5cb",
        "/files/a%00",
        "/files/a%0a",
        "/files/a;v=1",
        "/files/%zz",
    ] {
        let a = send(&c, "GET", &fg.url(path), &[], Bytes::new()).await;
        assert_refused(&a, 400, "bad_request", path);
    }
    assert_eq!(backend.count(), 0);

    let (backend, fg) =
        started("paths: { allow_encoded_slash: true, allow_semicolon: true }\n").await;
    for (path, received) in [
        ("/files/a%2Fb", "/files/a%2Fb"),
        ("/files/a;v=1", "/files/a;v=1"),
    ] {
        let a = send(&c, "GET", &fg.url(path), &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
        assert_eq!(backend.seen()[backend.count() - 1].uri, received);
    }
    // Allowed where a backend needs them, but never into a sale route's fence.
    let a = send(
        &c,
        "POST",
        &fg.url("/api/flash/tee%2Fbuy"),
        &[("x-user-id", "eve")],
        Bytes::new(),
    )
    .await;
    assert_refused(&a, 400, "bad_request", "encoded slash onto a sale path");
}

#[tokio::test]
async fn a_sale_request_is_forwarded_in_the_exact_form_it_matched() {
    let (backend, fg) = started("").await;
    fg.app.store.set_stock(&sku("tee"), 3).await.unwrap();
    let c = client();
    for (n, path) in ["/api/flash/tee/buy/", "/api//flash/./tee/%62uy"]
        .iter()
        .enumerate()
    {
        let user = format!("u{n}");
        let a = send(
            &c,
            "POST",
            &fg.url(path),
            &[("x-user-id", &user)],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
        assert_eq!(backend.seen()[n].uri, "/api/flash/tee/buy", "{path}");
    }
}

#[tokio::test]
async fn other_spellings_of_a_sale_path_are_fenced() {
    let (backend, fg) = started("").await;
    let c = client();
    let user = [("x-user-id", "eve")];
    for path in [
        "/API/flash/tee/buy",
        "/api/flash/tee/BUY",
        "/api/flash/tee/buy.",
        "/api/flash/tee/buy%20",
        "/api/flash/tee/buy%09",
        "/Api/Order",
    ] {
        let a = send(&c, "POST", &fg.url(path), &user, Bytes::new()).await;
        assert_refused(&a, 400, "bad_request", path);
    }
    for method in ["GET", "PUT", "DELETE", "PATCH", "post", "Post"] {
        let a = send(
            &c,
            method,
            &fg.url("/api/flash/tee/buy"),
            &user,
            Bytes::new(),
        )
        .await;
        assert_refused(&a, 405, "method_not_allowed", method);
        assert_eq!(a.headers["allow"], "POST", "{method}");
    }
    assert_eq!(backend.count(), 0, "nothing reached the backend");
}

#[tokio::test]
async fn method_overrides_never_reach_a_sale_route_and_are_stripped_elsewhere() {
    let (backend, fg) = started("").await;
    let c = client();
    let user = ("x-user-id", "eve");
    for (path, header) in [
        (
            "/api/flash/tee/buy",
            Some(("X-HTTP-Method-Override", "PUT")),
        ),
        ("/api/flash/tee/buy", Some(("x-http-method", "PUT"))),
        ("/api/flash/tee/buy", Some(("X-Method-Override", "PUT"))),
        ("/api/flash/tee/buy?_method=PUT", None),
        ("/api/flash/tee/buy?%5F%4Dethod=PUT", None),
    ] {
        let headers: Vec<_> = [user].into_iter().chain(header).collect();
        let a = send(&c, "POST", &fg.url(path), &headers, Bytes::new()).await;
        assert_refused(&a, 400, "bad_request", path);
    }
    let a = send(
        &c,
        "POST",
        &fg.url("/api/order"),
        &[user, ("content-type", "application/x-www-form-urlencoded")],
        "_method=PUT&sku=tee",
    )
    .await;
    assert_refused(&a, 400, "bad_request", "_method form field");
    assert_eq!(backend.count(), 0);

    // On an ordinary route the request goes through without the override headers...
    let seen = profile_with_overrides(&c, &fg, &backend).await;
    assert!(!seen.headers.contains_key("x-http-method-override"));
    assert!(!seen.headers.contains_key("x-method-override"));

    // ...unless the operator lets a named one through for a backend that needs it.
    let (backend, fg) = started("pass_method_override: [X-HTTP-Method-Override]\n").await;
    let seen = profile_with_overrides(&c, &fg, &backend).await;
    assert_eq!(seen.headers["x-http-method-override"], "DELETE");
    assert!(!seen.headers.contains_key("x-method-override"));
}

/// `POST /profile` (an ordinary route) with two method-override headers: asserts a 200 and
/// returns the backend's first request.
async fn profile_with_overrides(c: &HttpClient, fg: &Flashgate, backend: &Backend) -> Seen {
    let overrides = [
        ("X-HTTP-Method-Override", "DELETE"),
        ("x-method-override", "PUT"),
    ];
    let a = send(c, "POST", &fg.url("/profile"), &overrides, Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK);
    backend.seen()[0].clone()
}

#[tokio::test]
async fn flashgate_header_spellings_with_underscores_are_stripped() {
    let (backend, fg) = started("").await;
    fg.app.store.set_stock(&sku("tee"), 1).await.unwrap();
    let c = client();
    let spoofed = [
        ("X_Flashgate_Reservation", "fake"),
        ("x-flashgate_sku", "other"),
        ("X-FLASHGATE-USER", "mallory"),
        ("x_flashgate_quantity", "9"),
    ];
    let a = send(&c, "GET", &fg.url("/profile"), &spoofed, Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK);
    let mut headers: Vec<_> = spoofed.to_vec();
    headers.push(("x-user-id", "alice"));
    let a = send(
        &c,
        "POST",
        &fg.url("/api/flash/tee/buy"),
        &headers,
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    let seen = backend.seen();
    for name in seen[0].headers.keys() {
        let dashed = name.as_str().replace('_', "-");
        assert!(
            !dashed.starts_with("x-flashgate-"),
            "{name} reached the backend"
        );
    }
    let winner = &seen[1].headers;
    assert_eq!(winner.get_all("x-flashgate-sku").iter().count(), 1);
    assert_eq!(winner["x-flashgate-sku"], "tee");
    assert_eq!(winner["x-flashgate-user"], "alice");
    assert_eq!(winner["x-flashgate-quantity"], "1");
    assert_ne!(winner["x-flashgate-reservation"], "fake");
    let underscored = winner.keys().filter(|n| n.as_str().contains('_')).count();
    assert_eq!(underscored, 0, "{winner:?}");
}

#[tokio::test]
async fn a_sku_or_quantity_the_backend_could_read_differently_is_refused() {
    let (backend, fg) = started("").await;
    for sku in ["a", "b", "tee"] {
        fg.app
            .store
            .set_stock(&support::sku(sku), 10)
            .await
            .unwrap();
    }
    let c = client();
    let json = [("x-user-id", "eve"), ("content-type", "application/json")];
    for body in [
        r#"{"sku":"a","SKU":"b"}"#,
        r#"{"sku":"a","sku":"b"}"#,
        "{\"sku\":\"a\",\"\u{17f}ku\":\"b\"}",
        r#"{"sku":"a","quantity":1,"Quantity":3}"#,
        r#"{"sku":"a","quantity":"1"}"#,
        r#"{"sku":"a","quantity":1.0}"#,
        r#"{"sku":"a","quantity":-1}"#,
        r#"{"sku":7}"#,
    ] {
        let a = send(&c, "POST", &fg.url("/api/order"), &json, body).await;
        assert_refused(&a, 400, "bad_request", body);
    }
    let cookie = |v: &'static str| [("cookie", v)];
    for (query, cookies) in [
        ("sku=a&sku=b", cookie("uid=eve")),
        ("sku=a&%73ku=b", cookie("uid=eve")),
        ("sku=a&SKU=b", cookie("uid=eve")),
        ("sku=a&sku[]=b", cookie("uid=eve")),
        ("sku=a", cookie("uid=\"carol\"")),
        ("sku=a", cookie("uid=car%6Fl")),
        ("sku=a", cookie("uid=zed; uid=carol")),
    ] {
        let url = fg.url(&format!("/api/q/buy?{query}"));
        let a = send(&c, "POST", &url, &cookies, Bytes::new()).await;
        assert_refused(&a, 400, "bad_request", &format!("{query} {cookies:?}"));
    }
    for (query, content_type, body) in [
        // Go's r.FormValue, PHP's $_REQUEST, Flask's request.values read the body's `sku`.
        ("sku=a", "application/x-www-form-urlencoded", "sku=b"),
        ("sku=a", "application/x-www-form-urlencoded", "note=1&SKU=b"),
        (
            "sku=a",
            "multipart/form-data; boundary=x",
            "--x\r\nContent-Disposition: form-data; name=\"sku\"\r\n\r\nb\r\n--x--\r\n",
        ),
        // Go drops a pair with `;`, others keep it in the value, old parsers split on it.
        ("sku=a;x=1", "text/plain", ""),
        ("x=1;sku=a", "text/plain", ""),
    ] {
        let url = fg.url(&format!("/api/q/buy?{query}"));
        let headers = [("cookie", "uid=eve"), ("content-type", content_type)];
        let a = send(&c, "POST", &url, &headers, body).await;
        assert_refused(&a, 400, "bad_request", &format!("{query} {body}"));
    }
    // A JSON order in a body the backend would not parse as JSON.
    for content_type in [
        "text/plain",
        "application/vnd.api+json",
        "application/x-www-form-urlencoded",
    ] {
        let a = send(
            &c,
            "POST",
            &fg.url("/api/order"),
            &[("x-user-id", "eve"), ("content-type", content_type)],
            r#"{"sku":"a","quantity":1}"#,
        )
        .await;
        assert_refused(&a, 400, "bad_request", content_type);
    }
    let a = send(
        &c,
        "POST",
        &fg.url("/api/h/buy"),
        &[("x-user-id", "eve"), ("x-sku", "a"), ("x-sku", "b")],
        Bytes::new(),
    )
    .await;
    assert_refused(&a, 400, "bad_request", "repeated SKU header");
    let a = send(
        &c,
        "POST",
        &fg.url("/api/h/buy"),
        &[("x-user-id", "eve"), ("x-user-id", "carol"), ("x-sku", "a")],
        Bytes::new(),
    )
    .await;
    assert_refused(&a, 400, "bad_request", "repeated identity header");

    assert_eq!(backend.count(), 0, "nothing reached the backend");
    for sku in ["a", "b"] {
        let status = fg.app.store.status(&support::sku(sku)).await.unwrap();
        assert_eq!(status.stock, Some(10), "{sku}: nothing reserved");
    }

    // The honest spellings still buy.
    let a = send(
        &c,
        "POST",
        &fg.url("/api/order"),
        &json,
        r#"{"sku":"a","quantity":2}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = send(
        &c,
        "POST",
        &fg.url("/api/q/buy?sku=b"),
        &cookie("uid=carol"),
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

/// One buyer asking for more units than are left is refused alone; the SKU is not marked
/// sold out for everybody (or one request could close the sale on this instance).
async fn a_too_large_order_does_not_close_the_sale(store_yaml: &str) {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&shop_config(&backend, store_yaml, "")).await;
    fg.app.store.set_stock(&sku("mug"), 2).await.unwrap();
    let c = client();
    let order = |user: &'static str, quantity: u32| {
        let url = fg.url("/api/order");
        let c = c.clone();
        async move {
            send(
                &c,
                "POST",
                &url,
                &[("x-user-id", user), ("content-type", "application/json")],
                format!(r#"{{"sku":"mug","quantity":{quantity}}}"#),
            )
            .await
        }
    };
    for _ in 0..3 {
        let a = order("mallory", 3).await;
        assert_refused(&a, 410, "sold_out", "3 units of 2");
    }
    assert_eq!(order("bob", 1).await.status, StatusCode::OK);
    assert_eq!(order("carol", 1).await.status, StatusCode::OK);
    assert_refused(&order("dave", 1).await, 410, "sold_out", "now empty");
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn a_too_large_order_does_not_close_the_sale_on_the_embedded_store() {
    a_too_large_order_does_not_close_the_sale("").await;
}

#[tokio::test]
async fn a_too_large_order_does_not_close_the_sale_on_redis() {
    let redis = RedisServer::start();
    let yaml = format!("store: {{ redis: \"{}\" }}\n", redis.url());
    a_too_large_order_does_not_close_the_sale(&yaml).await;
}
