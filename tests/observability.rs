//! Trace ids and the access log: W3C `traceparent` continued or started and passed to the
//! backend, the trace id in flashgate's own error bodies and in the log line; one JSON line per
//! request with user ids hashed unless asked otherwise; sampling by trace id; no colour codes
//! in a log that is not a terminal.
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::shop::*;
use support::*;

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A sale route and a catch-all, with `access_log` as given (a YAML flow mapping or "").
fn config(backend: &Backend, access_log: &str) -> String {
    format!(
        "upstream: {{ url: \"{}\", connect_timeout: 500ms, request_timeout: 5s }}\n\
         admin: {{ listen: \"127.0.0.1:0\" }}\n\
         {access_log}\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"{BUY_PATH}\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   sale: {PATH_SALE}\n\
         \x20 - name: pages\n\
         \x20   match: {{ path: \"/pages/{{*rest}}\" }}\n",
        backend.url()
    )
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The lines of the access log at `path` once there are `n` (the writer is asynchronous).
async fn log_lines(path: &Path, n: usize) -> Vec<Value> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect::<Vec<Value>>()
    };
    eventually(Duration::from_secs(5), || read().len() >= n).await;
    read()
}

#[tokio::test]
async fn a_trace_is_continued_or_started_and_reaches_the_backend_and_error_bodies() {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&config(&backend, "")).await;
    let c = client();
    let a = send(
        &c,
        "GET",
        &fg.url("/pages/a"),
        &[("traceparent", INCOMING)],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    let sent = backend.seen()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[..2], ["00", TRACE_ID], "{sent}");
    assert!(
        is_hex(parts[2], 16) && parts[2] != "00f067aa0ba902b7",
        "{sent}"
    );
    assert_eq!(parts[3], "01");

    let a = send(&c, "GET", &fg.url("/pages/b"), &[], "").await;
    assert_eq!(a.status, 200);
    let started = backend.seen()[1].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(is_hex(&started[3..35], 32), "{started}");

    // flashgate's own answer names the trace.
    let a = send(
        &c,
        "POST",
        &fg.url("/api/flash/tee/buy"),
        &[("traceparent", INCOMING)],
        "",
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert_eq!(a.json()["trace_id"], TRACE_ID);
    let a = send(&c, "POST", &fg.url("/api/flash/tee/buy"), &[], "").await;
    let id = a.json()["trace_id"].as_str().unwrap().to_owned();
    assert!(is_hex(&id, 32) && id != TRACE_ID, "{id}");
}

#[tokio::test]
async fn the_access_log_has_one_json_line_per_request_with_users_hashed() {
    let backend = shop().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let yaml = format!(
        "access_log: {{ enabled: true, path: \"{}\" }}\n",
        path.display()
    );
    let fg = Flashgate::start(&config(&backend, &yaml)).await;
    set_stock(&fg, "tee", 1).await;
    let c = client();
    assert_eq!(buy(&c, &fg, "tee", "alice").await.status, 200);
    let lost = send(
        &c,
        "POST",
        &fg.url("/api/flash/tee/buy"),
        &[("x-user-id", "bob"), ("traceparent", INCOMING)],
        "",
    )
    .await;
    assert_eq!(lost.status, 410);
    assert_eq!(get(&fg.url("/pages/home?token=secret")).await.status, 200);
    assert_eq!(get(&fg.url("/nowhere")).await.status, 200);

    let lines = log_lines(&path, 4).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (won, lost, page, unmatched) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    assert_eq!(won["route"], "flash-buy");
    assert_eq!(won["method"], "POST");
    assert_eq!(won["path"], "/api/flash/tee/buy");
    assert_eq!(won["status"], 200);
    assert_eq!(won["upstream_status"], 200);
    assert!(won["upstream_ms"].as_f64().unwrap() <= won["duration_ms"].as_f64().unwrap());
    assert!(won.get("reason").is_none());
    assert_eq!(won["client_ip"], "127.0.0.1");
    let user = won["user"].as_str().unwrap();
    assert!(user.starts_with("u:") && is_hex(&user[2..], 16), "{user}");
    assert!(!lines.iter().any(|l| l.to_string().contains("alice")));
    assert!(won["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lost["status"], 410);
    assert_eq!(lost["reason"], "sold_out");
    assert_eq!(lost["trace_id"], TRACE_ID);
    assert!(lost.get("upstream_status").is_none());
    assert_ne!(lost["user"], won["user"]);
    assert_eq!(page["route"], "pages");
    assert_eq!(
        page["path"], "/pages/home",
        "the query stays out of the log"
    );
    assert_eq!(unmatched["route"], "(unmatched)");
    assert_eq!(unmatched["upstream_status"], 200);

    // With `log_user_ids` the id itself.
    let path = dir.path().join("ids.log");
    let yaml = format!(
        "access_log: {{ enabled: true, log_user_ids: true, path: \"{}\" }}\n",
        path.display()
    );
    let fg = Flashgate::start(&config(&backend, &yaml)).await;
    buy(&c, &fg, "tee", "alice").await;
    assert_eq!(log_lines(&path, 1).await[0]["user"], "alice");
}

#[tokio::test]
async fn sampling_follows_the_trace_id() {
    let backend = Backend::start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sampled.log");
    let yaml = format!(
        "access_log: {{ enabled: true, sample: 0.5, path: \"{}\" }}\n",
        path.display()
    );
    let fg = Flashgate::start(&config(&backend, &yaml)).await;
    let c = client();
    for _ in 0..400 {
        send(&c, "GET", &fg.url("/pages/x"), &[], "").await;
    }
    // A trace is logged every time or never: 20 requests of one trace add 0 or 20 lines.
    for _ in 0..20 {
        send(
            &c,
            "GET",
            &fg.url("/pages/x"),
            &[("traceparent", INCOMING)],
            "",
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = log_lines(&path, 1).await;
    let of_trace = lines.iter().filter(|l| l["trace_id"] == TRACE_ID).count();
    assert!(of_trace == 0 || of_trace == 20, "{of_trace}");
    let random = lines.len() - of_trace;
    // Binomial(400, 0.5): 200 ± 10 standard deviation; 120..280 is 8 of them.
    assert!(
        (120..=280).contains(&random),
        "{random} of 400 logged at 0.5"
    );

    let path = dir.path().join("none.log");
    let yaml = format!(
        "access_log: {{ enabled: true, sample: 0.0, path: \"{}\" }}\n",
        path.display()
    );
    let fg = Flashgate::start(&config(&backend, &yaml)).await;
    for _ in 0..50 {
        send(&c, "GET", &fg.url("/pages/x"), &[], "").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap_or_default(), "");
}

#[tokio::test]
async fn a_log_that_is_not_a_terminal_has_no_colour_codes() {
    let backend = Backend::start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fg.yaml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nupstream: {{ url: \"{}\" }}\n",
            backend.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flashgate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening"))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(up, "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
}
