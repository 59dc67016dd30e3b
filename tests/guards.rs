//! The in-process guards, end to end: token buckets per route, per user and per client IP
//! (429 with the limiter's own wait), identity (401), the in-flight cap (503), and the rule
//! that a request rejected for its own excess spends no token other clients need.
//!
//! Every bucket here refills at one token per minute, so no token comes back during a test;
//! refill timing itself is unit-tested with a fake clock in `src/limit/mod.rs`.
mod support;

use std::time::Duration;

use bytes::Bytes;
use flashgate::body::BoxError;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::sync::{mpsc, watch};

/// One catch-all route called `sale` with `body` (identity, limits) under it.
fn sale_route(body: &str) -> String {
    format!("routes:\n  - name: sale\n    match: {{ path: \"/sale/{{*rest}}\" }}\n{body}")
}

fn retry_after(a: &Answer) -> u64 {
    a.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("Retry-After is not an integer ({e}): {:?}", a.headers))
}

#[tokio::test]
async fn route_bucket_answers_429_with_rate_limit_headers() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        &sale_route("    limits:\n      route: { per_minute: 1, burst: 2 }\n"),
    ))
    .await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            send(&c, "GET", &fg.url("/sale/x"), &[], "").await.status,
            200
        );
    }
    let a = send(&c, "GET", &fg.url("/sale/x"), &[], "").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    let body = a.json();
    assert_eq!(body["error"], "rate_limited");

    // The wait is the limiter's own (about a minute here), in whole seconds, never 0.
    let secs = retry_after(&a);
    assert!((1..=60).contains(&secs), "Retry-After: {secs}");
    assert_eq!(body["retry_after"], secs);
    // q = burst, w = seconds to refill a whole burst (2 tokens at 1/min).
    assert_eq!(a.headers["ratelimit-policy"], "\"route\";q=2;w=120");
    assert_eq!(
        a.headers["ratelimit"].to_str().unwrap(),
        format!("\"route\";r=0;t={secs}")
    );
    assert_eq!(
        backend.count(),
        2,
        "a rejected request never reaches the backend"
    );

    // Other paths are outside the route and unaffected.
    assert_eq!(get(&fg.url("/elsewhere")).await.status, 200);
}

const PER_USER: &str = "    identity: { header: X-User-Id }\n    limits:\n      per_user: { per_minute: 1, burst: 1 }\n";

#[tokio::test]
async fn per_user_buckets_are_isolated() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, &sale_route(PER_USER))).await;
    let c = client();
    let as_user = |u: &'static str| [("x-user-id", u)];

    assert_eq!(
        send(&c, "POST", &fg.url("/sale/buy"), &as_user("a"), "")
            .await
            .status,
        200
    );
    let a = send(&c, "POST", &fg.url("/sale/buy"), &as_user("a"), "").await;
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(a.json()["error"], "rate_limited");
    assert!(retry_after(&a) >= 1);
    assert_eq!(a.headers["ratelimit-policy"], "\"per_user\";q=1;w=60");

    let b = send(&c, "POST", &fg.url("/sale/buy"), &as_user("b"), "").await;
    assert_eq!(
        b.status,
        200,
        "user b has a bucket of its own: {}",
        b.text()
    );

    let seen: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.headers["x-user-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, ["a", "b"]);
}

#[tokio::test]
async fn missing_identity_is_401() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, &sale_route(PER_USER))).await;
    let c = client();
    for headers in [&[][..], &[("x-user-id", "  ")][..]] {
        let a = send(&c, "POST", &fg.url("/sale/buy"), headers, "").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text());
        assert_eq!(a.headers["content-type"], "application/json");
        assert_eq!(a.json()["error"], "unauthenticated");
        assert!(!a.headers.contains_key("retry-after"));
    }
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn per_ip_buckets_are_isolated_behind_a_trusted_proxy() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        &format!(
            "trusted_proxies: [127.0.0.1/32]\n{}",
            sale_route("    limits:\n      per_ip: { per_minute: 1, burst: 1 }\n")
        ),
    ))
    .await;
    let c = client();
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        let a = send(&c, "GET", &fg.url("/sale/x"), &from(ip), "").await;
        assert_eq!(a.status, 200, "{ip}: {}", a.text());
    }
    for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        let a = send(&c, "GET", &fg.url("/sale/x"), &from(ip), "").await;
        assert_eq!(a.status, 429, "{ip}: {}", a.text());
        assert_eq!(a.headers["ratelimit-policy"], "\"per_ip\";q=1;w=60");
    }
    // The rightmost untrusted hop is the client: a spoofed entry left of it changes nothing.
    let a = send(
        &c,
        "GET",
        &fg.url("/sale/x"),
        &from("6.6.6.6, 10.0.0.1"),
        "",
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(backend.count(), 3);
}

#[tokio::test]
async fn in_flight_cap_answers_503_and_gives_slots_back() {
    // `/sale/head` holds its answer until released; `/sale/body` answers at once but holds
    // its body: a slot covers the whole response, not just the wait for its head.
    let (release, released) = watch::channel(false);
    let backend = Backend::start(move |req| {
        let mut released = released.clone();
        async move {
            if req.uri().path() == "/sale/head" {
                let _ = released.wait_for(|r| *r).await;
                return json_response(StatusCode::OK, "{}");
            }
            let (tx, body) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            tokio::spawn(async move {
                let _ = released.wait_for(|r| *r).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"late")))).await;
            });
            let frames = futures_util::stream::unfold(body, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            Response::new(StreamBody::new(frames).boxed_unsync())
        }
    })
    .await;
    let fg = Flashgate::start(&config(
        &backend,
        &sale_route(
            "    limits:
      in_flight: 2
",
        ),
    ))
    .await;
    let c = client();

    let blocked: Vec<_> = ["/sale/head", "/sale/body"]
        .into_iter()
        .map(|path| {
            let (c, url) = (c.clone(), fg.url(path));
            tokio::spawn(async move { send(&c, "GET", &url, &[], "").await })
        })
        .collect();
    let guards = fg.app.snapshot().routes[0].guards.clone();
    assert!(
        eventually(Duration::from_secs(5), || backend.count() == 2
            && guards.in_flight() == 2)
        .await,
        "both requests should reach the backend and hold a slot"
    );

    let a = send(&c, "GET", &fg.url("/sale/head"), &[], "").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.json()["error"], "overloaded");
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(backend.count(), 2, "the third request was not forwarded");

    release.send(true).unwrap();
    let bodies: Vec<String> = futures_util::future::join_all(blocked)
        .await
        .into_iter()
        .map(|a| {
            let a = a.unwrap();
            assert_eq!(a.status, 200);
            a.text()
        })
        .collect();
    assert_eq!(bodies, ["{}", "late"]);
    // A slot is held until the response body is done, then given back.
    assert!(
        eventually(Duration::from_secs(5), || guards.in_flight() == 0).await,
        "in-flight slots leaked: {}",
        guards.in_flight()
    );
    for path in ["/sale/head", "/sale/body"] {
        let a = send(&c, "GET", &fg.url(path), &[], "").await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
    }
    assert_eq!(backend.count(), 4);
}

#[tokio::test]
async fn rejected_requests_do_not_drain_the_route_bucket() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        &sale_route(
            "    identity: { header: X-User-Id }\n    limits:\n      route: { per_minute: 1, burst: 3 }\n      per_user: { per_minute: 1, burst: 1 }\n      in_flight: 1\n",
        ),
    ))
    .await;
    let c = client();
    let buy = |user: &'static str| {
        let (c, url) = (c.clone(), fg.url("/sale/buy"));
        async move { send(&c, "POST", &url, &[("x-user-id", user)], "").await }
    };

    // User a hammers: one success, four rejections by its own bucket. (`in_flight: 1` also
    // proves each rejection gave its slot back, or b would get 503.)
    assert_eq!(buy("a").await.status, 200);
    for _ in 0..4 {
        let a = buy("a").await;
        assert_eq!(a.status, 429);
        assert_eq!(a.headers["ratelimit-policy"], "\"per_user\";q=1;w=60");
    }
    // The route bucket (3) still holds the two tokens a's rejections did not take.
    assert_eq!(
        buy("b").await.status,
        200,
        "user b was starved by a's rejects"
    );
    assert_eq!(
        buy("c").await.status,
        200,
        "user c was starved by a's rejects"
    );
    // ...and only those: the route bucket does count admitted requests.
    let d = buy("d").await;
    assert_eq!(d.status, 429, "{}", d.text());
    assert_eq!(d.headers["ratelimit-policy"], "\"route\";q=3;w=180");
    assert_eq!(backend.count(), 3);
}
