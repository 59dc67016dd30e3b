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
