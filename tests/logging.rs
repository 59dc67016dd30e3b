//! Logging must never stall the request path: when the store is down every flash request logs a
//! warning, and a stderr nobody reads (a full pipe) must not block the server.
mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_full_stderr_pipe_does_not_block_requests() {
    let backend = Backend::start_echo().await;
    let (port, dead_redis) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\n\
             upstream: {{ url: \"{}\" }}\n\
             store: {{ redis: \"redis://127.0.0.1:{dead_redis}\", connect_timeout: 50ms, response_timeout: 50ms }}\n\
             routes:\n\
             \x20 - name: buy\n\
             \x20   match: {{ method: POST, path: \"/buy/{{sku}}\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   sale: {{ sku: {{ path_param: sku }} }}\n",
            backend.url()
        ),
    )
    .unwrap();
    // stderr is a pipe this test never reads: it fills after ~64 KiB of log lines.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashgate"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/buy/tee");
    let c = client();
    let up = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(up, "flashgate did not start");

    // ~2,000 warnings (one per failed-closed buyer) is several times the pipe's capacity.
    let all = async {
        for i in 0..2000 {
            let user = format!("u{i}");
            let a = send(&c, "POST", &url, &[("x-user-id", &user)], "").await;
            assert_eq!(a.status, 503, "{}", a.text());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("requests stalled behind a full log pipe");
    assert_eq!(backend.count(), 0);
    let _ = child.kill().await;
}
