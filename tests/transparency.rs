//! What the backend sees is what the client sent, and what the client gets is what the backend
//! answered: methods, paths, queries, repeated headers, bodies streamed both ways, trailers,
//! upstream errors, WebSocket and h2c. Only hop-by-hop headers are removed and `X-Forwarded-*`
//! is set; flashgate answers by itself only when the upstream is down or too slow.
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flashgate::body::{Body, BoxError};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// A body fed frame by frame through a channel: the test decides when each frame exists.
fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Body) {
    let (tx, rx) = mpsc::channel(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    (tx, StreamBody::new(frames).boxed_unsync())
}

fn data(bytes: impl Into<Bytes>) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(bytes.into()))
}

/// A client whose request bodies can stream.
fn streaming_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Upstream config with a custom tail (routes, trusted proxies...).
fn upstream(url: &str, extra: &str) -> String {
    format!("upstream: {{ url: \"{url}\", connect_timeout: 500ms, request_timeout: 2s }}\n{extra}")
}

#[tokio::test]
async fn methods_and_query_strings_arrive_unchanged() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let c = client();
    let target = "/items/a%20b/42?x=1&y=two%20words&y=2&flag&enc=%2F%3F%26";
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    for m in methods {
        let body: &[u8] = if matches!(m, "POST" | "PUT" | "PATCH") {
            b"payload"
        } else {
            b""
        };
        let a = send(&c, m, &fg.url(target), &[], body).await;
        assert_eq!(a.status, 200, "{m}: {}", a.text());
        if m == "HEAD" {
            assert!(a.body.is_empty(), "HEAD answered with a body");
        } else {
            assert_eq!(a.json()["request"], format!("{m} {target}"));
            assert_eq!(a.json()["body_bytes"], body.len(), "{m}");
        }
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), methods.len());
    for (s, m) in seen.iter().zip(methods) {
        assert_eq!(s.method, m);
        assert_eq!(s.uri.to_string(), target, "{m}");
        assert_eq!(s.version, Version::HTTP_11);
    }
}

#[tokio::test]
async fn repeated_headers_arrive_as_separate_values_in_order() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let a = send(
        &client(),
        "GET",
        &fg.url("/multi"),
        &[
            ("x-multi", "first"),
            ("x-other", "o"),
            ("x-multi", "second"),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = &backend.seen()[0];
    assert_eq!(values(&seen.headers, "x-multi"), ["first", "second"]);
    assert_eq!(values(&seen.headers, "x-other"), ["o"]);
}

#[tokio::test]
async fn upstream_path_prefix_is_prepended() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&upstream(&format!("{}/prefix", backend.url()), "")).await;
    let a = get(&fg.url("/a/b?q=1")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["request"], "GET /prefix/a/b?q=1");
    let a = get(&fg.url("/")).await;
    assert_eq!(a.json()["request"], "GET /prefix/");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let backend = Backend::start(|_req| async {
        let mut r = json_response(StatusCode::OK, "{}");
        let h = r.headers_mut();
        h.insert("connection", HeaderValue::from_static("x-resp-secret"));
        h.insert("x-resp-secret", HeaderValue::from_static("leak"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        h.insert("x-resp-kept", HeaderValue::from_static("1"));
        r
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let c = client();

    let a = send(
        &c,
        "GET",
        &fg.url("/hop"),
        &[
            ("connection", "x-secret"),
            ("x-secret", "leak"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = &backend.seen()[0].headers;
    for name in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "te",
    ] {
        assert!(!seen.contains_key(name), "{name} reached the backend");
    }
    assert_eq!(seen["x-kept"], "1");
    for name in [
        "connection",
        "x-resp-secret",
        "keep-alive",
        "proxy-authenticate",
    ] {
        assert!(!a.headers.contains_key(name), "{name} reached the client");
    }
    assert_eq!(a.headers["x-resp-kept"], "1");

    // `TE: trailers` is the one TE value that means something end to end.
    let a = send(&c, "GET", &fg.url("/te"), &[("te", "trailers")], "").await;
    assert_eq!(a.status, 200);
    assert_eq!(values(&backend.seen()[1].headers, "te"), ["trailers"]);
}

#[tokio::test]
async fn x_forwarded_for_is_replaced_from_an_untrusted_peer() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let a = send(
        &client(),
        "GET",
        &fg.url("/xff"),
        &[
            ("host", "shop.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    let h = &backend.seen()[0].headers;
    assert_eq!(values(h, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(h, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(h, "x-forwarded-host"), ["shop.example"]);
    assert_eq!(
        values(h, "host"),
        ["shop.example"],
        "Host is passed through"
    );
}

#[tokio::test]
async fn x_forwarded_for_is_appended_from_a_trusted_proxy() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "trusted_proxies: [127.0.0.1/32]\n")).await;
    let c = client();
    let a = send(
        &c,
        "GET",
        &fg.url("/xff"),
        &[("host", "shop.example"), ("x-forwarded-for", "1.2.3.4")],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    let h = &backend.seen()[0].headers;
    assert_eq!(values(h, "x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    assert_eq!(values(h, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(h, "x-forwarded-host"), ["shop.example"]);

    // Without a prior chain, the peer starts one.
    send(&c, "GET", &fg.url("/xff"), &[], "").await;
    assert_eq!(
        values(&backend.seen()[1].headers, "x-forwarded-for"),
        ["127.0.0.1"]
    );
}

const PER_IP_ROUTE: &str = "routes:\n  - name: ip-limited\n    match: { path: \"/{*rest}\" }\n    limits:\n      per_ip: { per_minute: 1, burst: 1 }\n";

#[tokio::test]
async fn per_ip_limit_keys_on_the_forwarded_client_behind_a_trusted_proxy() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(
        &backend,
        &format!("trusted_proxies: [127.0.0.1/32]\n{PER_IP_ROUTE}"),
    ))
    .await;
    let c = client();
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(
        send(&c, "GET", &fg.url("/x"), &from("10.0.0.1"), "")
            .await
            .status,
        200
    );
    let a = send(&c, "GET", &fg.url("/x"), &from("10.0.0.1"), "").await;
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(a.json()["error"], "rate_limited");
    assert!(
        a.headers["ratelimit-policy"]
            .to_str()
            .unwrap()
            .starts_with("\"per_ip\";")
    );
    assert_eq!(
        send(&c, "GET", &fg.url("/x"), &from("10.0.0.2"), "")
            .await
            .status,
        200,
        "another client behind the same proxy has its own bucket"
    );
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn per_ip_limit_ignores_x_forwarded_for_from_an_untrusted_peer() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, PER_IP_ROUTE)).await;
    let c = client();
    assert_eq!(
        send(
            &c,
            "GET",
            &fg.url("/x"),
            &[("x-forwarded-for", "10.0.0.1")],
            ""
        )
        .await
        .status,
        200
    );
    // A spoofed, fresh-looking address does not buy a fresh bucket: both are 127.0.0.1.
    let a = send(
        &c,
        "GET",
        &fg.url("/x"),
        &[("x-forwarded-for", "10.0.0.2")],
        "",
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn large_download_is_streamed() {
    let total = 5 * MIB;
    let go = Arc::new(Notify::new());
    let backend = Backend::start({
        let go = go.clone();
        move |_req| {
            let go = go.clone();
            async move {
                let (tx, body) = channel_body();
                tokio::spawn(async move {
                    tx.send(data(vec![b'x'; CHUNK])).await.unwrap();
                    // The rest exists only once the client has seen the first bytes.
                    go.notified().await;
                    for _ in 1..total / CHUNK {
                        tx.send(data(vec![b'x'; CHUNK])).await.unwrap();
                    }
                });
                let mut r = Response::new(body);
                r.headers_mut()
                    .insert("content-length", HeaderValue::from(total));
                r
            }
        }
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;

    let run = async {
        let resp = client()
            .request(
                Request::get(fg.url("/big"))
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], total.to_string().as_str());
        let mut body = resp.into_body();
        let mut received = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(bytes) = frame.unwrap().into_data() {
                if received == 0 {
                    go.notify_one();
                }
                received += bytes.len();
            }
        }
        received
    };
    let received = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the first bytes never arrived: flashgate buffers response bodies");
    assert_eq!(received, total);
}

#[tokio::test]
async fn large_upload_is_streamed() {
    let total = 5 * MIB;
    let first_bytes = Arc::new(Notify::new());
    let backend = Backend::start({
        let first_bytes = first_bytes.clone();
        move |req| {
            let first_bytes = first_bytes.clone();
            async move {
                let mut body = req.into_body();
                let mut n = 0;
                while let Some(frame) = body.frame().await {
                    if let Ok(bytes) = frame.unwrap().into_data() {
                        if n == 0 {
                            first_bytes.notify_one();
                        }
                        n += bytes.len();
                    }
                }
                json_response(StatusCode::OK, &format!("{{\"bytes\":{n}}}"))
            }
        }
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;

    let (tx, body) = channel_body();
    let req = Request::post(fg.url("/upload")).body(body).unwrap();
    let response = tokio::spawn(streaming_client().request(req));
    tx.send(data(vec![b'u'; CHUNK])).await.unwrap();
    // The client holds back the rest until the backend has seen the first bytes.
    tokio::time::timeout(Duration::from_secs(5), first_bytes.notified())
        .await
        .expect(
            "the backend saw nothing before the upload finished: flashgate buffers request bodies",
        );
    for _ in 1..total / CHUNK {
        tx.send(data(vec![b'u'; CHUNK])).await.unwrap();
    }
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("upload timed out")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["bytes"], total);
}

#[tokio::test]
async fn chunked_response_arrives_intact() {
    let backend = Backend::start(|_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for part in ["hello ", "chunked ", "world"] {
                tx.send(data(part)).await.unwrap();
            }
        });
        Response::new(body)
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let a = get(&fg.url("/chunked")).await;
    assert_eq!(a.status, 200);
    assert!(!a.headers.contains_key("content-length"));
    assert_eq!(a.headers["transfer-encoding"], "chunked");
    assert_eq!(a.text(), "hello chunked world");
}

#[tokio::test]
async fn trailers_reach_a_client_that_accepts_them() {
    let backend = Backend::start(|_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            tx.send(data("body")).await.unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
            tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        });
        let mut r = Response::new(body);
        // hyper's HTTP/1.1 encoder only writes trailer fields that the response declares in
        // `Trailer`, and only when the request said `TE: trailers` (RFC 9110 §6.5.1).
        r.headers_mut()
            .insert("trailer", HeaderValue::from_static("x-checksum"));
        r
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let req = Request::get(fg.url("/trailers"))
        .header("te", "trailers")
        .body(Default::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["trailer"], "x-checksum");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("no trailers arrived");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(collected.to_bytes(), "body");
    assert_eq!(values(&backend.seen()[0].headers, "te"), ["trailers"]);
}

#[tokio::test]
async fn upstream_error_statuses_are_passed_through() {
    let backend = Backend::start(|req| async move {
        let (status, text) = match req.uri().path() {
            "/missing" => (StatusCode::NOT_FOUND, "no such thing"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "backend broke"),
        };
        let mut r = Response::new(flashgate::body::full(text));
        *r.status_mut() = status;
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        r.headers_mut()
            .insert("x-backend", HeaderValue::from_static("shop"));
        r
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    for (path, status, text) in [
        ("/missing", 404, "no such thing"),
        ("/boom", 500, "backend broke"),
    ] {
        let a = get(&fg.url(path)).await;
        assert_eq!(a.status, status);
        assert_eq!(a.text(), text);
        assert_eq!(a.headers["content-type"], "text/plain");
        assert_eq!(a.headers["x-backend"], "shop");
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let c = client();
    for i in 0..50 {
        let a = send(&c, "GET", &fg.url(&format!("/r/{i}")), &[], "").await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(backend.count(), 50);
    let conns = backend
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        conns <= 2,
        "50 sequential requests used {conns} upstream connections"
    );
}

/// A tokio-tungstenite echo server on its own listener; sends each handshake's path to `paths`.
async fn websocket_echo() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request as WsReq, Response as WsResp};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (paths_tx, paths) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let paths_tx = paths_tx.clone();
            tokio::spawn(async move {
                // The callback's signature is tungstenite's, large error type and all.
                #[allow(clippy::result_large_err)]
                let record = |req: &WsReq, resp: WsResp| {
                    let _ = paths_tx.send(req.uri().to_string());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, paths)
}

#[tokio::test]
async fn websocket_upgrade_is_passed_through() {
    let (ws_addr, mut paths) = websocket_echo().await;
    let fg = Flashgate::start(&upstream(&format!("http://{ws_addr}"), "")).await;
    let run = async {
        let (mut ws, resp) =
            tokio_tungstenite::connect_async(format!("ws://{}/chat?room=1", fg.addr))
                .await
                .expect("websocket handshake through flashgate");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(paths.recv().await.unwrap(), "/chat?room=1");
        // Quiet for longer than an idle HTTP/1.1 connection takes to be parked (server.rs):
        // an upgraded connection must not be.
        tokio::time::sleep(Duration::from_millis(300)).await;

        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let bin = vec![0u8, 1, 2, 254, 255];
        ws.send(Message::binary(bin.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(bin));
        ws.close(None).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("websocket echo timed out");
}

#[tokio::test]
async fn h2c_client_reaches_an_http1_backend() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let a = send(&h2c_client(), "POST", &fg.url("/h2?x=1"), &[], "abc").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["request"], "POST /h2?x=1");
    assert_eq!(a.json()["body_bytes"], 3);
    let seen = &backend.seen()[0];
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(values(&seen.headers, "host"), [fg.addr.to_string()]);
    assert_eq!(
        values(&seen.headers, "x-forwarded-host"),
        [fg.addr.to_string()]
    );
}

#[tokio::test]
async fn refused_upstream_is_502_json() {
    // Bind then drop a listener: that port now refuses connections.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fg = Flashgate::start(&upstream(&format!("http://127.0.0.1:{port}"), "")).await;
    let a = get(&fg.url("/x")).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.json()["error"], "upstream_unavailable");
}

#[tokio::test]
async fn slow_upstream_is_504_json_after_request_timeout() {
    let backend = Backend::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        json_response(StatusCode::OK, "{}")
    })
    .await;
    let fg = Flashgate::start(&format!(
        "upstream: {{ url: \"{}\", request_timeout: 300ms }}\n",
        backend.url()
    ))
    .await;
    let started = Instant::now();
    let a = get(&fg.url("/slow")).await;
    let took = started.elapsed();
    assert_eq!(a.status, 504, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.json()["error"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    assert_eq!(backend.count(), 1, "the request did reach the backend");
}
