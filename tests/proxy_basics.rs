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
