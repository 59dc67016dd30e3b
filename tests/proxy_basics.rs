//! Smoke tests of the proxy path: forwarding, health, unmatched policy, upstream errors.
mod support;

use support::*;

#[tokio::test]
async fn forwards_and_answers_health() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let a = get(&fg.url("/hello?x=1")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["request"], "GET /hello?x=1");
    let h = get(&fg.url("/healthz")).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(backend.count(), 1, "health is answered by flashgate itself");
}

#[tokio::test]
async fn unmatched_not_found_is_answered_locally() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        "unmatched: not_found\nroutes:\n  - name: api\n    match: { path: \"/api/{*rest}\" }\n",
    ))
    .await;
    assert_eq!(get(&fg.url("/api/x")).await.status, 200);
    let a = get(&fg.url("/other")).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"], "not_found");
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn unreachable_upstream_is_502_json() {
    // Bind then drop a listener: that port now refuses connections.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fg = Flashgate::start(&format!(
        "upstream: {{ url: \"http://127.0.0.1:{port}\" }}\n"
    ))
    .await;
    let a = get(&fg.url("/x")).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"], "upstream_unavailable");
}

#[tokio::test]
async fn body_over_the_route_limit_is_413() {
    use http_body_util::BodyExt;
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        "routes:\n  - name: up\n    match: { path: /upload }\n    max_body: 1KiB\n",
    ))
    .await;
    let c = client();
    // Declared too large: refused before anything is forwarded.
    let a = send(&c, "POST", &fg.url("/upload"), &[], vec![b'x'; 2048]).await;
    assert_eq!(a.status, 413, "{}", a.text());
    assert_eq!(a.json()["error"], "payload_too_large");
    assert_eq!(backend.count(), 0);
    // Within the limit: forwarded whole.
    let a = send(&c, "POST", &fg.url("/upload"), &[], vec![b'x'; 1024]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["body_bytes"], 1024);
    // Streamed (chunked, no length) past the limit: cut off and answered 413.
    let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> = (0..8)
        .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b'y'; 512]))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed();
    let streaming =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::post(fg.url("/upload")).body(body).unwrap();
    let resp = streaming.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn path_variants_cannot_bypass_a_sale_route() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        "routes:\n  - name: buy\n    match: { method: POST, path: \"/api/flash/{sku}/buy\" }\n    identity: { header: X-User-Id }\n    sale: { sku: { path_param: sku } }\n  - name: rest\n    match: { path: \"/{*rest}\" }\n",
    ))
    .await;
    fg.app.store.set_stock(&sku("tee"), 0).await.unwrap();
    let c = client();
    for (i, path) in [
        "/api/flash/tee/buy",
        "/api/flash/tee/buy/",
        "//api/flash/tee/buy",
        "/api/flash/tee/./buy",
        "/api/flash/x/../tee/buy",
        "/api/flash/tee/%62uy",
        "/api/flash/%74ee/buy",
    ]
    .iter()
    .enumerate()
    {
        let user = format!("u{i}");
        let a = send(&c, "POST", &fg.url(path), &[("x-user-id", &user)], "").await;
        assert_eq!(a.status, 410, "{path}: {}", a.text());
    }
    assert_eq!(
        backend.count(),
        0,
        "no variant may reach the backend without a reservation"
    );
}
