//! The admin API as an attacker meets it: a read-only token that cannot write, guessing that
//! gets throttled, and no CORS headers for a browser page on another origin to lean on.
mod support;

use bytes::Bytes;
use http::StatusCode;
use support::*;

async fn admin_flashgate() -> (Backend, Flashgate) {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "admin: { listen: \"127.0.0.1:0\" }\n")).await;
    (backend, fg)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn the_read_only_token_reads_but_cannot_change_anything() {
    let (_backend, fg) = admin_flashgate().await;
    let c = client();
    let url = |path: &str| format!("{}{path}", fg.admin_url());
    let write = bearer(ADMIN_TOKEN);
    let read = bearer(ADMIN_READ_TOKEN);
    let a = send(
        &c,
        "PUT",
        &url("/v1/stock/tee"),
        &[("authorization", &write)],
        r#"{"stock": 5}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    for path in ["/v1/stock/tee", "/v1/sales/tee"] {
        let a = send(
            &c,
            "GET",
            &url(path),
            &[("authorization", &read)],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
    }
    for (method, path, body) in [
        ("PUT", "/v1/stock/tee", r#"{"stock": 500}"#),
        ("POST", "/v1/stock/tee/add", r#"{"delta": 1}"#),
        ("POST", "/v1/sales/tee/close", ""),
        ("POST", "/v1/sales/tee/open", ""),
    ] {
        let a = send(&c, method, &url(path), &[("authorization", &read)], body).await;
        assert_eq!(
            a.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            a.text()
        );
        assert_eq!(a.json()["error"], "forbidden");
    }
    let status = fg.app.store.status(&sku("tee")).await.unwrap();
    assert_eq!(
        (status.stock, status.closed),
        (Some(5), false),
        "nothing changed"
    );
}

#[tokio::test]
async fn wrong_tokens_are_throttled_per_address() {
    let (_backend, fg) = admin_flashgate().await;
    let c = client();
    let url = format!("{}/v1/stock/tee", fg.admin_url());
    let max = flashgate::admin::auth::MAX_FAILURES;
    for n in 0..max {
        let guess = bearer(&format!("guess-{n}"));
        let a = send(&c, "GET", &url, &[("authorization", &guess)], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "guess {n}");
    }
    let a = send(
        &c,
        "GET",
        &url,
        &[("authorization", "Bearer one-more")],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text());
    assert_eq!(a.json()["error"], "too_many_attempts");
    let wait: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // While blocked, even the right token waits: a guesser cannot test guesses at all.
    let right = bearer(ADMIN_TOKEN);
    let a = send(&c, "GET", &url, &[("authorization", &right)], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    // The health check needs no token and is never throttled.
    let a = send(
        &c,
        "GET",
        &format!("{}/healthz", fg.admin_url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);

    // Another flashgate (another admin API) is not affected by this one's count.
    let (_b2, fg2) = admin_flashgate().await;
    let url2 = format!("{}/v1/sales/tee", fg2.admin_url());
    let a = send(&c, "GET", &url2, &[("authorization", &right)], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

#[tokio::test]
async fn no_cors_headers_ever() {
    let (_backend, fg) = admin_flashgate().await;
    let c = client();
    let url = format!("{}/v1/stock/tee", fg.admin_url());
    let origin = ("origin", "https://evil.example");
    let write = bearer(ADMIN_TOKEN);
    for (method, headers) in [
        (
            "OPTIONS",
            vec![
                origin,
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "authorization"),
            ],
        ),
        ("GET", vec![origin]),
        ("GET", vec![origin, ("authorization", write.as_str())]),
        ("PUT", vec![origin, ("authorization", write.as_str())]),
    ] {
        let a = send(&c, method, &url, &headers, r#"{"stock": 1}"#).await;
        let cors: Vec<_> = a
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{method}: {cors:?}");
    }
}
