//! Prometheus metrics on the admin listener: who may read them, that `promtool` accepts the
//! exposition, that the counters match a scripted sale exactly, and that a real Prometheus
//! server scraping flashgate answers a query with the number of winners.
mod support;

use std::time::{Duration, Instant};

use support::shop::*;
use support::*;

const SKU: &str = "tee";

/// A sale route (SKU from the path, one request per user per minute), then a catch-all.
fn config(backend: &Backend, admin_extra: &str, store: &str) -> String {
    format!(
        "upstream: {{ url: \"{}\", connect_timeout: 500ms, request_timeout: 5s }}\n\
         admin: {{ listen: \"127.0.0.1:0\"{admin_extra} }}\n\
         {store}\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"{BUY_PATH}\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   limits: {{ per_user: {{ per_minute: 1, burst: 1 }} }}\n\
         \x20   sale: {PATH_SALE}\n\
         \x20 - name: pages\n\
         \x20   match: {{ path: \"/{{*rest}}\" }}\n",
        backend.url()
    )
}

/// `GET /metrics` with `token` (none: no `Authorization`).
async fn scrape(fg: &Flashgate, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    send(
        &client(),
        "GET",
        &format!("{}/metrics", fg.admin_url()),
        &headers,
        "",
    )
    .await
}

/// The value of the sample `name{labels}` (labels as they are printed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The scripted sale: 5 units, 8 buyers (5 win, 3 find it sold out), then 3 of them again
/// within the minute (rate-limited before any store call), and 4 page views.
async fn run_sale(fg: &Flashgate) {
    set_stock(fg, SKU, 5).await;
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(buy(&c, fg, SKU, &format!("u{i}")).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 410, 410, 410]);
    for user in ["u0", "u1", "u6"] {
        assert_rejected(&buy(&c, fg, SKU, user).await, 429, "rate_limited");
    }
    for _ in 0..4 {
        assert_eq!(get(&fg.url("/catalog")).await.status, 200);
    }
}

#[tokio::test]
async fn only_a_token_reads_metrics_unless_they_are_open() {
    let backend = shop().await;
    let fg = Flashgate::start(&config(&backend, "", "")).await;
    assert_eq!(scrape(&fg, None).await.status, 401);
    assert_eq!(scrape(&fg, Some("wrong")).await.status, 401);
    for token in [ADMIN_TOKEN, ADMIN_READ_TOKEN] {
        let a = scrape(&fg, Some(token)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(
            a.text()
                .contains("# TYPE flashgate_admissions_total counter")
        );
        assert_eq!(
            a.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }
    // What Prometheus asks for: OpenMetrics.
    let auth = format!("Bearer {ADMIN_READ_TOKEN}");
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let a = send(
        &client(),
        "GET",
        &format!("{}/metrics", fg.admin_url()),
        &[("authorization", auth.as_str()), ("accept", accept)],
        "",
    )
    .await;
    assert!(a.text().contains("# TYPE flashgate_admissions counter"));
    assert!(a.text().ends_with("# EOF\n"));
    assert!(
        a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let fg = Flashgate::start(&config(&backend, ", metrics_open: true", "")).await;
    assert_eq!(scrape(&fg, None).await.status, 200);
    // Open metrics open nothing else.
    let a = send(
        &client(),
        "GET",
        &format!("{}/v1/sales/{SKU}", fg.admin_url()),
        &[],
        "",
    )
    .await;
    assert_eq!(a.status, 401);
}

#[tokio::test]
async fn counters_match_a_scripted_sale_exactly() {
    for store in [memory(), redis()] {
        let backend = shop().await;
        let fg = Flashgate::start(&config(&backend, "", &store.yaml)).await;
        run_sale(&fg).await;
        // Settles are recorded off the response path: wait for the last one.
        status_until(&fg, SKU, |s| s["units"]["sold"] == 5).await;
        let text = scrape(&fg, Some(ADMIN_READ_TOKEN)).await.text();
        let at = |series: &str| sample(&text, series).unwrap_or(-1.0);
        let outcome = |o: &str| {
            at(&format!(
                "flashgate_admissions_total{{route=\"flash-buy\",outcome=\"{o}\"}}"
            ))
        };
        assert_eq!(outcome("won"), 5.0, "{text}");
        assert_eq!(outcome("sold_out"), 3.0, "{text}");
        assert_eq!(outcome("rate_limited"), 3.0, "{text}");
        assert_eq!(outcome("already_purchased"), 0.0, "{text}");
        let requests = |route: &str, status: u16| {
            at(&format!(
                "flashgate_requests_total{{route=\"{route}\",status=\"{status}\"}}"
            ))
        };
        assert_eq!(requests("flash-buy", 200), 5.0, "{text}");
        assert_eq!(requests("flash-buy", 410), 3.0, "{text}");
        assert_eq!(requests("flash-buy", 429), 3.0, "{text}");
        assert_eq!(requests("pages", 200), 4.0, "{text}");
        assert_eq!(
            at("flashgate_request_duration_seconds_count{route=\"flash-buy\"}"),
            11.0
        );
        assert_eq!(
            at("flashgate_reservations_total{outcome=\"sold\"}"),
            5.0,
            "{text}"
        );
        // 5 winners and 4 page views reached the backend; none failed.
        assert_eq!(
            at("flashgate_upstream_duration_seconds_count"),
            9.0,
            "{text}"
        );
        assert!(!text.contains("flashgate_upstream_errors_total{"), "{text}");
        // The store was asked for the first 5 + 1 (the sixth found it empty; then the local
        // sold-out flag answers): rate-limited buyers cost no store call.
        assert_eq!(
            at("flashgate_store_duration_seconds_count{op=\"reserve\"}"),
            6.0,
            "{text}"
        );
        assert_eq!(at(&format!("flashgate_sku_stock{{sku=\"{SKU}\"}}")), 0.0);
        assert_eq!(
            at(&format!(
                "flashgate_sku_units{{sku=\"{SKU}\",state=\"sold\"}}"
            )),
            5.0,
            "{text}"
        );
        assert_eq!(at("flashgate_breaker_open"), 0.0, "{text}");
        assert_eq!(
            at("flashgate_in_flight{route=\"flash-buy\"}"),
            0.0,
            "{text}"
        );
    }
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let backend = shop().await;
    let fg = Flashgate::start(&config(&backend, "", "")).await;
    run_sale(&fg).await;
    let text = scrape(&fg, Some(ADMIN_TOKEN)).await.text();
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed for this test");
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server of our own, on 127.0.0.1, killed on drop.
struct Prometheus {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{ scrape_interval: 1s, scrape_timeout: 1s }}\n\
                 scrape_configs:\n\
                 \x20 - job_name: flashgate\n\
                 \x20   authorization: {{ credentials: \"{ADMIN_READ_TOKEN}\" }}\n\
                 \x20   static_configs: [{{ targets: [\"{target}\"] }}]\n"
            ),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus (Debian package prometheus) is needed for this test");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query, when it has exactly one series.
    async fn query(&self, promql: &str) -> Option<f64> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            percent_encode(promql)
        );
        // Not `support::get`: Prometheus may not be listening yet.
        let req = http::Request::get(url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(2), client().request(req))
            .await
            .ok()?
            .ok()?;
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let result = json.get("data")?.get("result")?.as_array()?.clone();
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_real_prometheus_counts_the_winners() {
    let backend = shop().await;
    let fg = Flashgate::start(&config(&backend, "", "")).await;
    let prometheus = Prometheus::start(fg.admin.expect("admin listener")).await;
    run_sale(&fg).await;
    let query = "sum(flashgate_admissions_total{outcome=\"won\"})";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        last = prometheus.query(query).await;
        if last == Some(5.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(last, Some(5.0), "Prometheus never saw the 5 winners");
}
