//! Hostile or broken requests get a clear status and a JSON reason from flashgate, never a
//! panic and never a forward.
//!
//! Already covered elsewhere: a malformed request line (400), a header block over the limit
//! (431), a URI over the limit (414) and slowloris in `server_limits.rs`; a body over the
//! route's limit (413) in `proxy_basics.rs`; invalid / non-object JSON, a missing or empty user
//! id (401), quantities from the query, and an unknown SKU (404 `not_configured`) in
//! `sale.rs`. Here: the user id's length and characters, quantities from a header and from
//! JSON, a cookie identity, and requests framed two ways (`Content-Length` with
//! `Transfer-Encoding`), written as raw bytes on a TCP socket.
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use support::raw;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A flash route whose quantity comes from the `x-qty` header (per-user limit 3, user ids up
/// to 16 bytes), one whose SKU and quantity come from a JSON body, one whose user id is the
/// `uid` cookie, and a catch-all ordinary route.
fn config(backend: &Backend) -> String {
    support::config(
        backend,
        "routes:\n\
         \x20 - name: by-header\n\
         \x20   match: { method: POST, path: \"/api/flash/{sku}/buy\" }\n\
         \x20   identity: { header: X-User-Id, max_length: 16 }\n\
         \x20   sale: { sku: { path_param: sku }, quantity: { header: x-qty }, per_user_limit: 3 }\n\
         \x20 - name: by-json\n\
         \x20   match: { method: POST, path: \"/api/order\" }\n\
         \x20   identity: { header: X-User-Id }\n\
         \x20   sale: { sku: { json: sku }, quantity: { json: qty }, per_user_limit: 3 }\n\
         \x20 - name: by-cookie\n\
         \x20   match: { method: POST, path: \"/api/cookie/{sku}/buy\" }\n\
         \x20   identity: { cookie: uid }\n\
         \x20   sale: { sku: { path_param: sku } }\n\
         \x20 - name: rest\n\
         \x20   match: { path: \"/{*rest}\" }\n",
    )
}

fn assert_json_reason(a: &Answer, status: u16, reason: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.text());
    assert_eq!(a.headers["content-type"], "application/json", "{what}");
    assert_eq!(a.json()["error"], reason, "{what}: {}", a.text());
}

async fn buy(c: &HttpClient, fg: &Flashgate, headers: &[(&str, &str)]) -> Answer {
    send(
        c,
        "POST",
        &fg.url("/api/flash/bad-1/buy"),
        headers,
        Bytes::new(),
    )
    .await
}

#[tokio::test]
async fn user_ids_too_long_or_with_control_characters_are_400() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    fg.app.store.set_stock(&sku("bad-1"), 10).await.unwrap();
    let c = client();

    let a = buy(&c, &fg, &[("x-user-id", &"u".repeat(17)), ("x-qty", "1")]).await;
    assert_json_reason(&a, 400, "bad_request", "17-byte user id");
    let a = buy(&c, &fg, &[("x-user-id", "a\tb"), ("x-qty", "1")]).await;
    assert_json_reason(&a, 400, "bad_request", "a tab inside the user id");
    let a = buy(&c, &fg, &[("x-user-id", ""), ("x-qty", "1")]).await;
    assert_json_reason(&a, 401, "unauthenticated", "empty user id");
    // Exactly at the limit passes.
    let a = buy(&c, &fg, &[("x-user-id", &"u".repeat(16)), ("x-qty", "1")]).await;
    assert_eq!(a.status, 200, "{}", a.text());

    // Bytes a typed client will not send: obs-text (not UTF-8) and DEL.
    for (what, id) in [("non-UTF-8", &b"caf\xe9"[..]), ("DEL", b"a\x7fb")] {
        let mut req = b"POST /api/flash/bad-1/buy HTTP/1.1\r\nhost: shop\r\nx-qty: 1\r\ncontent-length: 0\r\nconnection: close\r\nx-user-id: ".to_vec();
        req.extend_from_slice(id);
        req.extend_from_slice(b"\r\n\r\n");
        let (status, body) = raw_exchange(fg.addr, &req).await;
        assert_eq!(status, 400, "{what}: {body}");
        if !body.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"], "bad_request", "{what}");
        }
    }
    assert_eq!(backend.count(), 1, "only the valid order was forwarded");
    assert_eq!(
        fg.app.store.get_stock(&sku("bad-1")).await.unwrap(),
        Some(9)
    );
}

#[tokio::test]
async fn cookie_identity_missing_or_empty_is_401() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    fg.app.store.set_stock(&sku("bad-2"), 10).await.unwrap();
    let c = client();
    let url = fg.url("/api/cookie/bad-2/buy");
    for (what, cookie) in [
        ("no cookie header", None),
        ("other cookies only", Some("theme=dark; uidx=bob")),
        ("empty uid", Some("uid=; theme=dark")),
        ("blank uid", Some("uid=   ")),
    ] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", *c)).collect();
        let a = send(&c, "POST", &url, &headers, Bytes::new()).await;
        assert_json_reason(&a, 401, "unauthenticated", what);
    }
    let a = send(
        &c,
        "POST",
        &url,
        &[("cookie", "theme=dark; uid=bob")],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(backend.count(), 1);
    assert_eq!(backend.seen()[0].headers["x-flashgate-user"], "bob");
}

#[tokio::test]
async fn bad_quantities_from_a_header_or_json_are_400() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    fg.app.store.set_stock(&sku("bad-3"), 10).await.unwrap();
    let c = client();

    for qty in [
        "0",
        "-1",
        "4",
        "abc",
        "",
        "1.5",
        "1e1",
        "0x2",
        "+",
        "99999999999999999999",
    ] {
        let a = send(
            &c,
            "POST",
            &fg.url("/api/flash/bad-3/buy"),
            &[("x-user-id", "alice"), ("x-qty", qty)],
            Bytes::new(),
        )
        .await;
        assert_json_reason(&a, 400, "bad_request", &format!("x-qty: {qty:?}"));
    }
    let a = send(
        &c,
        "POST",
        &fg.url("/api/flash/bad-3/buy"),
        &[("x-user-id", "alice")],
        Bytes::new(),
    )
    .await;
    assert_json_reason(&a, 400, "bad_request", "no x-qty header");

    for body in [
        r#"{"sku":"bad-3","qty":0}"#,
        r#"{"sku":"bad-3","qty":-2}"#,
        r#"{"sku":"bad-3","qty":4}"#,
        r#"{"sku":"bad-3","qty":2.5}"#,
        r#"{"sku":"bad-3","qty":"lots"}"#,
        r#"{"sku":"bad-3","qty":true}"#,
        r#"{"sku":"bad-3","qty":[1]}"#,
        r#"{"sku":"bad-3","qty":null}"#,
        r#"{"sku":"bad-3"}"#,
        r#"{"sku":"bad 3","qty":1}"#,
        r#"{"sku":"","qty":1}"#,
        r#"{"sku":12,"qty":1}"#,
        r#"{"sku":"bad-3","qty":1"#,
        r#"[{"sku":"bad-3","qty":1}]"#,
    ] {
        let a = send(
            &c,
            "POST",
            &fg.url("/api/order"),
            &[("x-user-id", "alice"), ("content-type", "application/json")],
            body,
        )
        .await;
        // A number SKU is refused too: a backend binding the SKU into a string field would
        // refuse it after flashgate had reserved a unit.
        assert_json_reason(&a, 400, "bad_request", body);
    }
    assert_eq!(backend.count(), 0, "nothing forwarded");
    assert_eq!(
        fg.app.store.get_stock(&sku("bad-3")).await.unwrap(),
        Some(10)
    );

    // The same routes take a good order.
    let a = send(
        &c,
        "POST",
        &fg.url("/api/order"),
        &[("x-user-id", "alice"), ("content-type", "application/json")],
        r#"{"sku":"bad-3","qty":3}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(backend.seen()[0].headers["x-flashgate-quantity"], "3");
}

/// Writes `request` on a fresh connection and reads one answer: (status, body as text),
/// within 5 s.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let r = raw::answer(addr, request, Duration::from_secs(5)).await;
    (r.status, r.text())
}

/// Reads until the peer closes; false if it is still open after 5 s.
async fn closes(s: &mut TcpStream) -> bool {
    tokio::time::timeout(Duration::from_secs(5), raw::read_to_close(s))
        .await
        .is_ok()
}

/// Sends a request framed two ways (`Content-Length` and `Transfer-Encoding: chunked`, an
/// empty chunked body of 5 bytes `0\r\n\r\n`) followed by a second request hidden after it,
/// the classic smuggling shape; returns the response and whether the connection closed after
/// it.
async fn two_framings(
    fg: &Flashgate,
    path: &str,
    framing: &str,
    extra: &str,
) -> (u16, String, bool) {
    let hidden = "GET /smuggled HTTP/1.1\r\nhost: shop\r\n\r\n";
    let request =
        format!("POST {path} HTTP/1.1\r\nhost: shop\r\n{extra}{framing}\r\n0\r\n\r\n{hidden}");
    let mut s = TcpStream::connect(fg.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let r = raw::read_answer(&mut s, Duration::from_secs(5)).await;
    (r.status, r.text(), closes(&mut s).await)
}

const CL_FIRST: &str = "content-length: 5\r\ntransfer-encoding: chunked\r\n";
const TE_FIRST: &str = "transfer-encoding: chunked\r\ncontent-length: 44\r\n";

/// A request with both `Content-Length` and `Transfer-Encoding` (the classic smuggling shape,
/// with a second request hidden after the chunked body) is refused with 400 and the connection
/// is closed: nothing reaches the backend, on an ordinary route and a flash route (no unit
/// taken), headers in either order. hyper drops `Content-Length` while parsing, so flashgate
/// tells from the raw head (`src/framing.rs`).
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_with_400() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    fg.app.store.set_stock(&sku("bad-4"), 10).await.unwrap();
    for (path, framing, extra) in [
        ("/catalog", CL_FIRST, ""),
        ("/catalog", TE_FIRST, ""),
        (
            "/api/flash/bad-4/buy",
            CL_FIRST,
            "x-user-id: alice\r\nx-qty: 1\r\n",
        ),
        (
            "/api/flash/bad-4/buy",
            TE_FIRST,
            "x-user-id: bob\r\nx-qty: 1\r\n",
        ),
    ] {
        let (status, body, closed) = two_framings(&fg, path, framing, extra).await;
        assert_eq!(status, 400, "{path} {framing:?}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "bad_request", "{path} {framing:?}");
        assert!(
            closed,
            "{path} {framing:?}: connection left open after two framings"
        );
    }
    assert_eq!(
        backend.count(),
        0,
        "nothing, hidden request included, reached the backend"
    );
    assert_eq!(
        fg.app.store.get_stock(&sku("bad-4")).await.unwrap(),
        Some(10)
    );
}

/// A two-framings request pipelined behind an ordinary one in the same packet is refused too:
/// the scanner reads the bytes past the first request's (known) body as the next head.
#[tokio::test]
async fn pipelined_request_with_two_framings_is_refused_too() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    let request = format!(
        "GET /catalog HTTP/1.1\r\nhost: shop\r\n\r\n\
         POST /catalog HTTP/1.1\r\nhost: shop\r\n{CL_FIRST}\r\n0\r\n\r\n"
    );
    // Both answers may arrive in one read: take everything up to the close.
    let all = raw::exchange_text(fg.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let statuses: Vec<&str> = all
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &all[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400"], "{all}");
    assert!(all.contains("\"error\":\"bad_request\""), "{all}");
    assert_eq!(
        backend.count(),
        1,
        "only the ordinary request reached the backend"
    );
}

/// The same connection keeps working for a well-framed request after a well-framed one: the
/// scanner resets per request and only flags the head that declared both.
#[tokio::test]
async fn one_framing_per_request_is_served_on_a_keep_alive_connection() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    let mut s = TcpStream::connect(fg.addr).await.unwrap();
    for req in [
        "POST /catalog HTTP/1.1\r\nhost: shop\r\ncontent-length: 5\r\n\r\nhello",
        "POST /catalog HTTP/1.1\r\nhost: shop\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        s.write_all(req.as_bytes()).await.unwrap();
        let r = raw::read_answer(&mut s, Duration::from_secs(5)).await;
        assert_eq!(r.status, 200, "{req:?}: {}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["body_bytes"], 5);
    }
    assert_eq!(backend.count(), 2);
}

/// Two `Content-Length` values that disagree, and a `Transfer-Encoding` that does not end in
/// `chunked`, are refused by the HTTP parser: 400, nothing forwarded.
#[tokio::test]
async fn conflicting_framing_headers_are_400() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend)).await;
    for framing in [
        "content-length: 3\r\ncontent-length: 4\r\n",
        "content-length: 3, 4\r\n",
        "transfer-encoding: gzip\r\n",
        "content-length: -1\r\n",
    ] {
        let request = format!(
            "POST /catalog HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n{framing}\r\nabcd"
        );
        let (status, body) = raw_exchange(fg.addr, request.as_bytes()).await;
        assert_eq!(status, 400, "{framing:?}: {body}");
    }
    assert_eq!(backend.count(), 0);
}
