//! HTTP conformance against a third-party backend: what a real server reads of what flashgate
//! forwards, and what flashgate refuses. The backend is Python's standard-library HTTP server
//! (`tests/conformance/backend.py`), started by each test on 127.0.0.1; the clients are hyper
//! (HTTP/1.1 and h2c) and raw bytes on a socket.
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use support::raw::exchange;
use support::*;

/// The Python backend, killed (it is ours: we started it) on drop.
struct PyBackend {
    child: Child,
    port: u16,
}

impl PyBackend {
    fn start() -> PyBackend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is needed for the conformance tests");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("backend prints its port");
        let port = line.trim().parse().expect("a port number");
        PyBackend { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PyBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn flashgate(backend: &PyBackend, upstream_extra: &str) -> Flashgate {
    Flashgate::start(&format!(
        "upstream: {{ url: \"{}\", connect_timeout: 1s, request_timeout: 5s{upstream_extra} }}\n",
        backend.url()
    ))
    .await
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn h2_split_cookies_reach_an_http1_backend_as_one_line() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    let headers = [("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")];
    for (client, name) in [(h2c_client(), "h2c"), (client(), "HTTP/1.1")] {
        let a = send(&client, "GET", &fg.url("/cookies"), &headers, Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{name}: {}", a.text());
        assert_eq!(
            a.json(),
            serde_json::json!({"a": "1", "b": "2", "c": "3"}),
            "{name}: the backend must read three cookies"
        );
    }
    // Direct, the same backend reads the split lines as one cookie: the test can fail.
    let direct = send(
        &client(),
        "GET",
        &format!("{}/cookies", backend.url()),
        &headers,
        Bytes::new(),
    )
    .await;
    assert_ne!(direct.json()["b"], "2", "{}", direct.text());
}

#[tokio::test]
async fn host_is_required_once_and_an_absolute_target_wins() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    for (what, request) in [
        ("no Host", "GET /echo HTTP/1.1\r\n\r\n".to_owned()),
        (
            "two Host lines",
            "GET /echo HTTP/1.1\r\nHost: shop\r\nHost: evil\r\n\r\n".to_owned(),
        ),
        (
            "absolute form, no Host",
            format!(
                "GET http://127.0.0.1:{}/echo HTTP/1.1\r\n\r\n",
                fg.addr.port()
            ),
        ),
    ] {
        let a = exchange(fg.addr, request.as_bytes(), false, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.status, 400, "{what}: {}", a.text());
        let body: serde_json::Value = serde_json::from_slice(&a.body).expect("a JSON body");
        assert_eq!(body["error"], "bad_request", "{what}");
        assert!(body["message"].as_str().unwrap().contains("Host"), "{what}");
    }

    // HTTP/1.0 needs no Host.
    let a = exchange(fg.addr, b"GET /echo HTTP/1.0\r\n\r\n", false, WAIT)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());

    // The absolute-form target's authority is the Host the backend gets.
    let request =
        "GET http://shop.example/echo HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n";
    let a = exchange(fg.addr, request.as_bytes(), false, WAIT)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let seen: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    let hosts: Vec<&str> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("host"))
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["shop.example"]);
}

#[tokio::test]
async fn large_backend_heads_pass_up_to_the_limit_then_get_a_clear_502() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    let c = client();
    // Beyond hyper's default of 100 header lines, within flashgate's default of 1000 (read
    // raw: the test's own hyper client stops at 100).
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
    let a = exchange(fg.addr, get("/many?n=150").as_bytes(), false, WAIT)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-line-149"), Some("149"));
    let a = send(&c, "GET", &fg.url("/big?kb=100"), &[], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.headers["x-big"].len(), 100 * 1024);

    let fg = flashgate(
        &backend,
        ", max_response_headers: 100, max_response_head_bytes: 64KiB",
    )
    .await;
    // (hyper enforces the byte limit per read, so a head may pass up to about twice it.)
    for path in ["/many?n=150", "/big?kb=512"] {
        let a = send(&c, "GET", &fg.url(path), &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(a.json()["error"], "bad_upstream_response", "{path}");
    }
    // And the connection pool is still good for the next request.
    let a = send(&c, "GET", &fg.url("/many?n=10"), &[], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK);
}

/// Sends `request` raw on its own connection and returns every answer read until the close.
async fn answers(fg: &Flashgate, request: &[u8]) -> Vec<support::raw::RawResponse> {
    let all = support::raw::exchange_text(fg.addr, request, WAIT).await;
    support::raw::parse_all(all.as_bytes())
}

async fn backend_count(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    backend: &PyBackend,
) -> u64 {
    let a = send(
        c,
        "GET",
        &format!("{}/count", backend.url()),
        &[],
        Bytes::new(),
    )
    .await;
    a.json()["count"].as_u64().unwrap()
}

/// The request-smuggling classics: each one either refused with a 400 and a JSON body, or
/// forwarded re-framed, so that the backend reads exactly the one request and the body that
/// flashgate read.
#[tokio::test]
async fn smuggling_classics_are_refused_with_json_or_forwarded_unambiguously() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    let c = client();
    const H: &str = "POST /echo HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n";
    // A body that reads as a second request to a parser using the other framing.
    const HIDDEN: &str = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n";
    let refused = [
        (
            "CL.TE",
            format!(
                "{H}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{HIDDEN}",
                HIDDEN.len()
            ),
        ),
        (
            "TE.CL",
            format!("{H}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE xchunked + CL",
            format!(
                "{H}Transfer-Encoding: xchunked\r\nContent-Length: {}\r\n\r\n{HIDDEN}",
                HIDDEN.len()
            ),
        ),
        (
            "TE xchunked",
            format!("{H}Transfer-Encoding: xchunked\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE with a space before the name",
            format!("{H} Transfer-Encoding: chunked\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE chunked, identity",
            format!("{H}Transfer-Encoding: chunked, identity\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE twice",
            format!("{H}Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE in HTTP/1.0",
            format!(
                "POST /echo HTTP/1.0\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n{HIDDEN}"
            ),
        ),
        (
            "two Content-Lengths",
            format!("{H}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        (
            "Content-Length list",
            format!("{H}Content-Length: 5, 6\r\n\r\nhello!"),
        ),
        (
            "Content-Length +5",
            format!("{H}Content-Length: +5\r\n\r\nhello"),
        ),
        (
            "space before the colon",
            format!("{H}Content-Length : 5\r\n\r\nhello"),
        ),
        (
            "obs-fold",
            format!("{H}X-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "chunk size overflow",
            format!("{H}Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n"),
        ),
        (
            "chunk lines ended by bare LF",
            format!("{H}Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"),
        ),
    ];
    let before = backend_count(&c, &backend).await;
    for (what, request) in &refused {
        let got = answers(&fg, request.as_bytes()).await;
        assert_eq!(got.len(), 1, "{what}: {got:?}");
        assert_eq!(got[0].status, 400, "{what}: {}", got[0].text());
        let body: serde_json::Value = serde_json::from_slice(&got[0].body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", got[0].text()));
        assert_eq!(body["error"], "bad_request", "{what}");
    }
    // The body-level ones reached the backend in part (the head was fine); none of the
    // head-level ones did, and nothing hidden was ever read as a request.
    let reached = backend_count(&c, &backend).await - before;
    assert!(
        reached <= 2,
        "{reached} refused requests reached the backend"
    );

    let accepted = [
        (
            "TE with extra spaces",
            format!("{H}Transfer-Encoding:   chunked  \r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "TE identity, chunked",
            format!("{H}Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "two equal Content-Lengths",
            format!("{H}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        (
            "chunk extensions",
            format!("{H}Transfer-Encoding: chunked\r\n\r\n5;ext=\"a b\"\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "head lines ended by bare LF",
            "POST /echo HTTP/1.1\nHost: shop\nConnection: close\nContent-Length: 5\n\nhello"
                .to_owned(),
        ),
    ];
    for (what, request) in &accepted {
        let before = backend_count(&c, &backend).await;
        let got = answers(&fg, request.as_bytes()).await;
        assert_eq!(got.len(), 1, "{what}: {got:?}");
        assert_eq!(got[0].status, 200, "{what}: {}", got[0].text());
        let echo: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
        assert_eq!(echo["body"], "hello", "{what}");
        assert_eq!(
            backend_count(&c, &backend).await - before,
            1,
            "{what}: one request"
        );
    }
}

/// What curl and scripts send unencoded in a target is accepted and reaches the backend as the
/// same values; a 30 KB URI is a 414 (not 431), with a JSON body.
#[tokio::test]
async fn unencoded_targets_are_accepted_and_long_ones_get_414() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    for target in ["/query?filter={\"a\":1}", "/query?q=<b>&tick=`x`&pipe=|"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
        let through = exchange(fg.addr, request.as_bytes(), false, WAIT)
            .await
            .unwrap();
        let direct_addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", backend.port).parse().unwrap();
        let direct = exchange(direct_addr, request.as_bytes(), false, WAIT)
            .await
            .unwrap();
        assert_eq!(through.status, 200, "{target}: {}", through.text());
        assert_eq!(direct.status, 200, "{target}: {}", direct.text());
        let (t, d): (serde_json::Value, serde_json::Value) = (
            serde_json::from_slice(&through.body).unwrap(),
            serde_json::from_slice(&direct.body).unwrap(),
        );
        assert_eq!(
            t["query"], d["query"],
            "{target}: the backend reads the same values"
        );
    }
    // Raw UTF-8 goes on as a browser would send it (percent-encoded): the backend reads the
    // characters (Python's server, sent the raw bytes, would read them as Latin-1).
    let request = "GET /query?name=caf\u{e9} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
    let a = exchange(fg.addr, request.as_bytes(), false, WAIT)
        .await
        .unwrap();
    let t: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(t["query"]["name"][0], "caf\u{e9}");

    let long = format!("GET /{} HTTP/1.1\r\nHost: shop\r\n\r\n", "a".repeat(30_000));
    let a = exchange(fg.addr, long.as_bytes(), false, WAIT)
        .await
        .unwrap();
    assert_eq!(a.status, 414, "{}", a.text());
    let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(body["error"], "uri_too_long");
    // A head over max_header_bytes is still 431, now with a JSON body.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: shop\r\nX-Big: {}\r\n\r\n",
        "b".repeat(30_000)
    );
    let a = exchange(fg.addr, big.as_bytes(), false, WAIT)
        .await
        .unwrap();
    assert_eq!(a.status, 431, "{}", a.text());
    let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(body["error"], "headers_too_large");
}

/// The statuses of every head curl read (`< HTTP/1.1 103 Early Hints` …), and its stderr.
/// (Run as a child process the test awaits: flashgate serves on this test's runtime.)
async fn curl_heads(args: &[&str]) -> (Vec<String>, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sv", "--max-time", "10", "-o", "/dev/null"])
        .args(args)
        .output()
        .await
        .expect("curl is needed for the conformance tests");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let heads = log
        .lines()
        .filter_map(|l| l.strip_prefix("< HTTP/"))
        .map(|l| l.trim().to_owned())
        .collect();
    (heads, log)
}

/// `103 Early Hints` from the backend reach an HTTP/1.1 client (curl) ahead of the answer —
/// also on a sale route, where the winner is forwarded from a task of its own — and never an
/// HTTP/1.0 client; an h2 client gets the answer (hyper's server cannot send it a 1xx).
#[tokio::test]
async fn early_hints_reach_http1_clients_ahead_of_the_answer() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    let (heads, log) = curl_heads(&[&fg.url("/hints?n=2")]).await;
    assert_eq!(
        heads,
        ["1.1 103 Early Hints", "1.1 103 Early Hints", "1.1 200 OK"],
        "{log}"
    );
    assert!(
        log.to_ascii_lowercase()
            .contains("< link: </style1.css>; rel=preload; as=style"),
        "{log}"
    );
    // Two requests sent at once on one connection: each answer after its own hints.
    let two = b"GET /hints?n=1 HTTP/1.1\r\nHost: shop\r\n\r\n\
                GET /echo HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
    let statuses: Vec<u16> = answers(&fg, two).await.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [103, 200, 200]);
    let old = answers(&fg, b"GET /hints?n=2 HTTP/1.0\r\nHost: shop\r\n\r\n").await;
    assert_eq!(old.iter().map(|a| a.status).collect::<Vec<_>>(), [200]);
    let a = send(
        &h2c_client(),
        "GET",
        &fg.url("/hints?n=2"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    let sale = support::shop::sale_config(
        &backend.url(),
        "",
        "5s",
        "/hints/{sku}",
        support::shop::PATH_SALE,
    );
    let fg = Flashgate::start(&sale).await;
    support::shop::set_stock(&fg, "tee", 1).await;
    let (heads, log) = curl_heads(&[
        "-X",
        "POST",
        "-H",
        "X-User-Id: ada",
        &fg.url("/hints/tee?n=1"),
    ])
    .await;
    assert_eq!(heads, ["1.1 103 Early Hints", "1.1 200 OK"], "{log}");
}

/// A backend that sends a bare `100` or `102` and nothing after it gets its client a 502
/// within `upstream.interim_timeout`, not after `request_timeout`; raised, the backend's own
/// close decides.
#[tokio::test]
async fn a_bare_interim_answer_is_a_prompt_502() {
    let backend = PyBackend::start();
    let fg = flashgate(&backend, "").await;
    let c = client();
    for path in [
        "/interim?status=100&then=hang",
        "/interim?status=102&then=hang",
        "/interim?status=100&then=close",
    ] {
        let started = std::time::Instant::now();
        let a = send(&c, "GET", &fg.url(path), &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{path}: {}", a.text());
        assert_eq!(a.json()["error"], "bad_upstream_response", "{path}");
        // The backend stays silent for 3 s; request_timeout is 5 s; interim_timeout 1 s.
        assert!(started.elapsed() < Duration::from_millis(2500), "{path}");
    }
    let fg = flashgate(&backend, ", interim_timeout: 4s").await;
    let started = std::time::Instant::now();
    let a = send(
        &c,
        "GET",
        &fg.url("/interim?status=102&then=hang"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert!(started.elapsed() >= Duration::from_millis(2900));
}
