//! What the listener enforces before a request reaches the gate: well-formed requests, header
//! and URI sizes, the header-read (slowloris) and keep-alive idle timeouts, the connection cap,
//! and a graceful shutdown that drains in-flight requests and refuses new connections.
//!
//! Where the point is what goes over the wire, the tests write raw bytes on a `TcpStream`.
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::raw;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Reads one answer off a connection the test holds open, within 5 s.
async fn read_response(s: &mut TcpStream) -> raw::RawResponse {
    raw::read_answer(s, Duration::from_secs(5)).await
}

/// Writes `request` on a fresh connection and reads the response, within 5 s.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> raw::RawResponse {
    raw::answer(addr, request, Duration::from_secs(5)).await
}

fn server(backend: &Backend, server: &str) -> String {
    config(backend, &format!("server:\n{server}"))
}

#[tokio::test]
async fn malformed_request_line_is_400() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    for request in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        b"GET /\x01bad HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let r = raw_exchange(fg.addr, request).await;
        assert_eq!(
            r.status,
            400,
            "{:?} -> {r:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn header_block_over_max_header_bytes_is_431() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(&backend, "  max_header_bytes: 8KiB\n")).await;
    let big = "a".repeat(20 * 1024);
    let r = raw_exchange(
        fg.addr,
        format!("GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 431, "{r:?}");
    // Just under the limit still passes.
    let fits = "a".repeat(6 * 1024);
    let r = raw_exchange(
        fg.addr,
        format!("GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {fits}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn uri_over_max_uri_bytes_is_414_json() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(&backend, "  max_uri_bytes: 1KiB\n")).await;
    let long = format!("/{}", "a".repeat(2048));
    let a = get(&fg.url(&long)).await;
    assert_eq!(a.status, StatusCode::URI_TOO_LONG, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.json()["error"], "uri_too_long");
    // The query counts too.
    let a = get(&fg.url(&format!("/x?q={}", "b".repeat(2048)))).await;
    assert_eq!(a.status, StatusCode::URI_TOO_LONG);
    assert_eq!(get(&fg.url("/short")).await.status, 200);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn slowloris_connection_is_closed_after_header_read_timeout() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(&backend, "  header_read_timeout: 300ms\n")).await;

    let mut slow = TcpStream::connect(fg.addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let (mut rd, mut wr) = slow.split();
    let trickle = async {
        // One byte of a header that never ends, every 100 ms: the attack, not a wait.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if wr.write_all(b"a").await.is_err() {
                return;
            }
        }
    };
    let watch_close = raw::read_to_close(&mut rd);
    // Meanwhile a well-behaved client on another connection is served.
    let normal = async {
        let a = get(&fg.url("/ok")).await;
        assert_eq!(a.status, 200);
    };
    let (got, ()) = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::join!(
            async {
                tokio::select! {
                    got = watch_close => got,
                    () = trickle => Vec::new(),
                }
            },
            normal
        )
    })
    .await
    .expect("the slow connection was still open after 2s");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "closed early: {took:?}");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "unexpected answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        backend.count(),
        1,
        "only the normal request reached the backend"
    );
}

/// Connects to flashgate started with `server_yaml`, sends `first` (if anything), and
/// returns how long flashgate took to close the connection and what it sent meanwhile (within
/// 3 s).
async fn closed_after(backend: &Backend, server_yaml: &str, first: &[u8]) -> (Duration, Vec<u8>) {
    let fg = Flashgate::start(&server(backend, server_yaml)).await;
    let mut s = TcpStream::connect(fg.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(first).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), raw::read_to_close(&mut s))
        .await
        .expect("the connection was still open after 3s");
    (started.elapsed(), got)
}

/// A client that starts the HTTP/2 preface and stops: flashgate waits for the rest of it
/// (a peek, before any hyper state exists) under the header timeout, not the idle one.
#[tokio::test]
async fn a_stalled_h2_preface_is_closed_after_header_read_timeout() {
    let backend = Backend::start_echo().await;
    let (took, got) = closed_after(
        &backend,
        "  header_read_timeout: 300ms\n  keep_alive_timeout: 30s\n",
        b"PRI * HTTP/2.0\r\n",
    )
    .await;
    assert!(took >= Duration::from_millis(300), "closed early: {took:?}");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(backend.count(), 0);
}

/// A connection that never sends a byte is closed after the idle timeout, not before.
#[tokio::test]
async fn a_silent_new_connection_is_closed_after_keep_alive_timeout() {
    let backend = Backend::start_echo().await;
    let (took, got) = closed_after(
        &backend,
        "  header_read_timeout: 100ms\n  keep_alive_timeout: 400ms\n",
        b"",
    )
    .await;
    assert!(took >= Duration::from_millis(400), "closed early: {took:?}");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

/// An HTTP/1.1 client connection whose closing by the server the test can observe.
async fn connect_h1(
    addr: SocketAddr,
) -> (
    http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    (sender, tokio::spawn(conn))
}

async fn get_on(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> u16 {
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(&backend, "  keep_alive_timeout: 300ms\n")).await;
    let (mut sender, conn) = connect_h1(fg.addr).await;
    assert_eq!(get_on(&mut sender, fg.addr, "/one").await, 200);
    let idle_from = Instant::now();
    // The connection future ends when flashgate closes the connection.
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("idle connection still open after 3s")
        .unwrap()
        .unwrap();
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}");
    assert!(sender.is_closed());
}

#[tokio::test]
async fn idle_keep_alive_is_not_cut_by_the_header_read_timeout() {
    // The two timeouts are separate: an idle connection waits `keep_alive_timeout`, not
    // `header_read_timeout` (hyper alone would apply its header timer to idle time too).
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(
        &backend,
        "  header_read_timeout: 200ms\n  keep_alive_timeout: 10s\n",
    ))
    .await;
    let (mut sender, conn) = connect_h1(fg.addr).await;
    assert_eq!(get_on(&mut sender, fg.addr, "/one").await, 200);
    // Idle for well over the header timeout: the stimulus under test, not a wait.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!conn.is_finished(), "closed while idle");
    assert_eq!(get_on(&mut sender, fg.addr, "/two").await, 200);
    assert_eq!(backend.count(), 2);
}

/// An idle HTTP/1.1 connection gives hyper's state back after a short pause (`PARK_AFTER` in
/// server.rs: 100 ms) and is served again as if nothing happened, whatever the client had
/// sent so far: a body after its head, a chunked body, a pipelined head cut short, a trickle.
#[tokio::test]
async fn keep_alive_connection_is_served_across_pauses() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let mut s = TcpStream::connect(fg.addr).await.unwrap();
    // Longer than the park delay: the stimulus under test, not a wait.
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    let answer = async |s: &mut TcpStream| {
        let r = read_response(s).await;
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };

    s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(answer(&mut s).await["request"], "GET /1");
    pause().await;

    s.write_all(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    pause().await;
    s.write_all(b"hello").await.unwrap();
    assert_eq!(answer(&mut s).await["body_bytes"], 5);
    pause().await;

    s.write_all(
        b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(answer(&mut s).await["body_bytes"], 5);
    pause().await;

    s.write_all(b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\nGET /5 HTTP/1.1\r\nHo")
        .await
        .unwrap();
    assert_eq!(answer(&mut s).await["request"], "GET /4");
    pause().await;
    s.write_all(b"st: a\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut s).await["request"], "GET /5");
    pause().await;

    s.write_all(b"GET /6 HTTP/1.1\r\n").await.unwrap();
    pause().await;
    s.write_all(b"Host: a\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut s).await["request"], "GET /6");
    pause().await;

    // A body longer than announced: the extra bytes are the start of the next request.
    s.write_all(b"POST /7 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokGET /8 HTT")
        .await
        .unwrap();
    assert_eq!(answer(&mut s).await["body_bytes"], 2);
    pause().await;
    s.write_all(b"P/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut s).await["request"], "GET /8");

    let paths: Vec<String> = backend.seen().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/1", "/2", "/3", "/4", "/5", "/6", "/7", "/8"]);
}

/// A client that stops reading a large response, for longer than the park delay: the
/// response's end may still be in flashgate's write buffer after the whole body was handed to
/// hyper, and parking then would drop it. Whatever the timing, the client gets every byte and
/// the connection serves the next request. (A small client receive buffer and the larger
/// sizes make flashgate's writes block.)
#[tokio::test]
async fn slow_reader_gets_the_whole_response_and_the_next_one() {
    let backend = Backend::start(|req| async move {
        let len: usize = req.uri().path()[1..].parse().unwrap_or(0);
        let mut r = Response::new(flashgate::body::full(vec![b'x'; len]));
        *r.status_mut() = StatusCode::OK;
        r
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    for len in [64 << 10, 1 << 20, 4 << 20, 16 << 20] {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(fg.addr).await.unwrap();
        s.write_all(format!("GET /{len} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // Not reading, for longer than the park delay: the stimulus under test, not a wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = read_response(&mut s).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), len);
        s.write_all(b"GET /0 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s).await;
        assert_eq!((r.status, r.body.len()), (200, 0), "after {len} bytes");
    }
}

/// A connection left idle past `keep_alive_timeout`, long after hyper let go of it, is closed
/// cleanly.
#[tokio::test]
async fn paused_connection_closes_cleanly() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(&backend, "  keep_alive_timeout: 500ms\n")).await;
    let mut s = TcpStream::connect(fg.addr).await.unwrap();
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.status, 200);
    let idle_from = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(3), raw::read_to_close(&mut s))
        .await
        .expect("idle connection still open after 3s");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(450), "closed after {idle:?}");
}

#[tokio::test]
async fn idle_keep_alive_outlives_hyper_default_header_timer() {
    // hyper arms its own 30 s header-read timer whenever an HTTP/1 connection waits for a
    // head, idle keep-alive time included; left on, it closed every idle connection at 30 s
    // whatever `keep_alive_timeout` said. The 31 s wait is the stimulus (and this test's cost).
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(
        &backend,
        "  header_read_timeout: 5s\n  keep_alive_timeout: 60s\n",
    ))
    .await;
    let (mut sender, conn) = connect_h1(fg.addr).await;
    assert_eq!(get_on(&mut sender, fg.addr, "/one").await, 200);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(
        !conn.is_finished(),
        "idle connection closed before keep_alive_timeout"
    );
    assert_eq!(get_on(&mut sender, fg.addr, "/two").await, 200);
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn connections_over_max_connections_wait_for_a_free_slot() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&server(&backend, "  max_connections: 2\n")).await;
    let request = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";

    let mut first = TcpStream::connect(fg.addr).await.unwrap();
    let mut second = TcpStream::connect(fg.addr).await.unwrap();
    for s in [&mut first, &mut second] {
        s.write_all(request).await.unwrap();
        assert_eq!(read_response(s).await.status, 200);
    }
    // Both stay open (keep-alive). The third connects (kernel backlog) but is not served.
    let mut third = TcpStream::connect(fg.addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte))
            .await
            .is_err(),
        "a third connection was served while two were open"
    );
    assert_eq!(backend.count(), 2);

    drop(first);
    let r = read_response(&mut third).await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echo["request"], "GET /x");
    assert_eq!(backend.count(), 3);
    // The second connection still works.
    second.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut second).await.status, 200);
}

/// Polls until connecting to `addr` is refused (the listener is gone), within 5 s.
async fn until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ if Instant::now() > deadline => panic!("{addr} still accepts connections"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let (release, released) = watch::channel(false);
    let backend = Backend::start(move |_req| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            json_response(StatusCode::OK, "{\"slow\":true}")
        }
    })
    .await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let addr = fg.addr;
    let url = fg.url("/slow");
    let in_flight = tokio::spawn(async move { send(&client(), "GET", &url, &[], "").await });
    assert!(eventually(Duration::from_secs(5), || backend.count() == 1).await);

    let stopping = tokio::spawn(fg.stop());
    // New connections are refused as soon as shutdown starts, while the drain goes on.
    until_refused(addr).await;
    assert!(!stopping.is_finished(), "stop() returned before the drain");

    release.send(true).unwrap();
    let a = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("in-flight request did not complete")
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["slow"], true);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stop() did not return after the drain")
        .unwrap()
        .expect("stop() failed");
    let refused = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn graceful_shutdown_gives_up_after_drain_timeout() {
    let backend = Backend::start(|_req| async {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let fg = Flashgate::start(&server(&backend, "  drain_timeout: 300ms\n")).await;
    let mut stuck = TcpStream::connect(fg.addr).await.unwrap();
    stuck
        .write_all(b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || backend.count() == 1).await);

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), fg.stop())
        .await
        .expect("stop() ignored drain_timeout")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "stopped after {took:?}");
    // The stuck connection is closed, not left dangling.
    let got = tokio::time::timeout(Duration::from_secs(2), raw::read_to_close(&mut stuck))
        .await
        .expect("stuck connection still open after stop()");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn graceful_shutdown_closes_idle_connections_at_once() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let mut idle = TcpStream::connect(fg.addr).await.unwrap();
    idle.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.status, 200);
    // Past the park delay (server.rs), then a fresh idle connection that never sent a byte.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut silent = TcpStream::connect(fg.addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), fg.stop())
        .await
        .expect("stop() waited on idle connections")
        .unwrap();
    for s in [&mut idle, &mut silent] {
        let got = tokio::time::timeout(Duration::from_secs(2), raw::read_to_close(s))
            .await
            .expect("idle connection still open after stop()");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
}
