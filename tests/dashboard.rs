//! The live dashboard (`GET /dashboard`, fed by `GET /v1/events`) in a real headless Chromium
//! during a real sale, the event stream's rules (tokens, the subscriber cap, the end on
//! shutdown) and the page's headers. (The Grafana board: `tests/grafana_board.rs`.)
//!
//! The browser is Debian's `chromium` (`.ci/run` installs it), driven over the DevTools
//! protocol by `support::browser`. `FLASHGATE_UPDATE_SCREENSHOT=1` writes the screenshot taken
//! during the sale to `docs/dashboard.png` (the README shows it); otherwise it goes to a
//! temporary file and the repository is left alone.
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::Value;
use support::browser::{Browser, Page};
use support::shop::*;
use support::*;

const SKU: &str = "dash-tee";
/// The page's viewport (and so the screenshot's size).
const VIEWPORT: (u32, u32) = (1280, 680);
/// Bound on the page showing something the stream has sent (events come every second).
const SHOWS: Duration = Duration::from_secs(15);

/// The text of `selector` in the page, or `null`.
fn text_of(selector: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({}); return e ? e.textContent.trim() : null; }})()",
        Value::from(selector)
    )
}

fn stock_cell(sku: &str) -> String {
    text_of(&format!("#skus tr[data-sku=\"{sku}\"] td.stock"))
}

/// Waits until the SKU's stock cell shows `want`, noting every value it showed meanwhile.
async fn wait_for_stock(page: &Page<'_>, want: u64, seen: &mut Vec<u64>) {
    let deadline = Instant::now() + SHOWS;
    loop {
        let shown = page.eval(&stock_cell(SKU)).await;
        if let Some(n) = shown
            .as_str()
            .and_then(|s| s.replace(',', "").parse::<u64>().ok())
            && seen.last() != Some(&n)
        {
            seen.push(n);
        }
        if seen.last() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed stock {want} (showed {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` new buyers, each winning a unit.
async fn winners(fg: &Flashgate, client: &HttpClient, next_user: &mut usize, count: usize) {
    for _ in 0..count {
        let a = buy(client, fg, SKU, &format!("buyer-{next_user}")).await;
        assert_eq!(a.status, 200, "{}", a.text());
        *next_user += 1;
    }
}

fn dashboard_url(fg: &Flashgate, fragment: &str) -> String {
    format!("{}/dashboard{fragment}", fg.admin_url())
}

/// The sale an operator watches: 20 units sold in steps of 5 with pauses (so the page shows
/// the values in between), a few repeat buyers (409), then buyers finding it sold out (410).
/// The page's stock for the SKU must fall step by step to 0 and "sold out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_stock_falling_during_a_sale() {
    let store = redis();
    let backend = shop().await;
    let fg = start(&backend.url(), &store).await;
    set_stock(&fg, SKU, 20).await;
    set_stock(&fg, "dash-mug", 8).await;
    let browser = Browser::launch().await;
    let page = browser.page(VIEWPORT.0, VIEWPORT.1).await;
    page.goto(&dashboard_url(&fg, &format!("#token={ADMIN_READ_TOKEN}")))
        .await;
    page.wait_for(&format!("{} === 'live'", text_of("#conn")), SHOWS)
        .await;
    // The token left the address bar at once, and lives in this tab only.
    assert_eq!(page.eval("location.href").await, dashboard_url(&fg, ""));
    assert_eq!(
        page.eval("sessionStorage.getItem('flashgate.dashboard.token')")
            .await,
        ADMIN_READ_TOKEN
    );
    let mut seen = Vec::new();
    wait_for_stock(&page, 20, &mut seen).await;
    let client = client();
    let mut next_user = 0;
    let mut won_per_s = 0.0f64;
    let mut shot = None;
    for remaining in [15, 10, 5, 0] {
        winners(&fg, &client, &mut next_user, 5).await;
        // A buyer who already has one: 409, an `already_purchased` admission.
        assert_rejected(
            &buy(&client, &fg, SKU, "buyer-0").await,
            409,
            "already_purchased",
        );
        wait_for_stock(&page, remaining, &mut seen).await;
        let rate = page.eval(&text_of("#rate-won")).await;
        won_per_s = won_per_s.max(rate.as_str().and_then(|r| r.parse().ok()).unwrap_or(0.0));
        if remaining == 5 {
            // Mid-sale for the picture: a few mugs too, and the chart with a second's data.
            for user in ["mug-a", "mug-b", "mug-c"] {
                assert_eq!(buy(&client, &fg, "dash-mug", user).await.status, 200);
            }
            page.wait_for(
                &format!(
                    "{} === '5'",
                    text_of("#skus tr[data-sku=\"dash-mug\"] td.stock")
                ),
                SHOWS,
            )
            .await;
            shot = Some(page.screenshot().await);
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    for user in ["late-1", "late-2", "late-3"] {
        assert_rejected(&buy(&client, &fg, SKU, user).await, 410, "sold_out");
    }
    let row = format!("#skus tr[data-sku=\"{SKU}\"]");
    page.wait_for(
        &format!("{} === 'sold out'", text_of(&format!("{row} td.state"))),
        SHOWS,
    )
    .await;
    // Settles land off the response path: all 20 sold, none held.
    page.wait_for(
        &format!("{} === '20'", text_of(&format!("{row} td.sold"))),
        SHOWS,
    )
    .await;
    assert_eq!(page.eval(&text_of(&format!("{row} td.held"))).await, "0");
    page.wait_for(
        &format!(
            "{} === '23 total'",
            text_of("#legend li[data-outcome=won] span:last-child")
        ),
        SHOWS,
    )
    .await;
    page.wait_for(
        &format!(
            "{} === '3 total'",
            text_of("#legend li[data-outcome=sold_out] span:last-child")
        ),
        SHOWS,
    )
    .await;
    assert!(
        seen.len() >= 3 && seen.windows(2).all(|w| w[1] < w[0]) && seen.last() == Some(&0),
        "the stock shown must fall to 0: {seen:?}"
    );
    assert!(won_per_s > 0.0, "the page never showed a won rate");
    assert_eq!(page.eval(&text_of("#breaker")).await, "closed");
    assert_eq!(page.problems(), Vec::<String>::new(), "errors in the page");
    save_screenshot(&shot.expect("a screenshot mid-sale"));
    browser.close().await;
}

/// The screenshot is a PNG; it replaces `docs/dashboard.png` only when asked to.
fn save_screenshot(png: &[u8]) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "a suspiciously small screenshot");
    let path = if std::env::var_os("FLASHGATE_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png")
    } else {
        std::env::temp_dir().join(format!("flashgate-dashboard-{}.png", std::process::id()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("screenshot directory");
    }
    std::fs::write(&path, png).expect("write the screenshot");
    eprintln!("dashboard screenshot: {}", path.display());
}

/// Without a token the page asks for one; a wrong one is refused with a message (and not
/// kept); the right one opens the dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_token_and_refuses_a_wrong_one() {
    let backend = shop().await;
    let fg = start(&backend.url(), &memory()).await;
    set_stock(&fg, SKU, 3).await;
    let browser = Browser::launch().await;
    let page = browser.page(VIEWPORT.0, VIEWPORT.1).await;
    page.goto(&dashboard_url(&fg, "")).await;
    page.wait_for("!document.getElementById('login').hidden", SHOWS)
        .await;
    assert_eq!(
        page.eval("document.getElementById('live').hidden").await,
        true
    );
    assert_eq!(page.eval(&stock_cell(SKU)).await, Value::Null);
    let submit = |token: &str| {
        format!(
            "document.getElementById('token').value = {}; \
             document.getElementById('login-form').requestSubmit(); true",
            Value::from(token)
        )
    };
    page.eval(&submit("not-the-token")).await;
    let error = page
        .wait_for(
            "!document.getElementById('login-error').hidden && \
             document.getElementById('login-error').textContent",
            SHOWS,
        )
        .await;
    assert!(
        error.as_str().unwrap_or_default().contains("Wrong token"),
        "{error}"
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('flashgate.dashboard.token')")
            .await,
        Value::Null
    );
    assert_eq!(page.eval(&text_of("#conn")).await, "not signed in");
    // Not even a possible token: refused before any request.
    page.eval(&submit("tökén")).await;
    page.wait_for(
        &format!(
            "({} || '').includes('not a token')",
            text_of("#login-error")
        ),
        SHOWS,
    )
    .await;
    // A wrong token in the fragment: the same.
    page.goto(&dashboard_url(&fg, "#token=also-wrong")).await;
    page.wait_for(
        "!document.getElementById('login-error').hidden && location.hash === ''",
        SHOWS,
    )
    .await;
    page.eval(&submit(ADMIN_TOKEN)).await;
    page.wait_for(&format!("{} === '3'", stock_cell(SKU)), SHOWS)
        .await;
    assert_eq!(
        page.eval("document.getElementById('login').hidden").await,
        true
    );
    assert_eq!(page.problems(), Vec::<String>::new(), "errors in the page");
    browser.close().await;
}

/// A TCP relay between the browser and the admin API whose connections the test can cut, as a
/// network drop or a restarted flashgate would.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, links2) = (up.clone(), links.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                links2.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                }));
            }
        });
        Relay {
            addr,
            up,
            links,
            task,
        }
    }

    /// Closes every relayed connection and refuses new ones until [`Relay::restore`].
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// When the stream drops, the page says so and reconnects by itself, with backoff, once the
/// admin API can be reached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_when_the_stream_drops() {
    let backend = shop().await;
    let fg = start(&backend.url(), &memory()).await;
    set_stock(&fg, SKU, 9).await;
    let relay = Relay::start(fg.admin.expect("an admin API")).await;
    let browser = Browser::launch().await;
    let page = browser.page(VIEWPORT.0, VIEWPORT.1).await;
    page.goto(&format!(
        "http://{}/dashboard#token={ADMIN_READ_TOKEN}",
        relay.addr
    ))
    .await;
    page.wait_for(&format!("{} === '9'", stock_cell(SKU)), SHOWS)
        .await;
    relay.cut();
    page.wait_for(
        &format!("({} || '').startsWith('disconnected')", text_of("#conn")),
        SHOWS,
    )
    .await;
    set_stock(&fg, SKU, 7).await;
    // Still down: the page keeps its last values and keeps trying.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(page.eval(&stock_cell(SKU)).await, "9");
    relay.restore();
    page.wait_for(
        &format!("{} === '7'", stock_cell(SKU)),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(page.eval(&text_of("#conn")).await, "live");
    assert_eq!(page.problems(), Vec::<String>::new(), "errors in the page");
    browser.close().await;
}

/// `GET` on the admin listener with an optional bearer token; the response head and its body
/// still streaming.
async fn open(url: &str, token: Option<&str>) -> http::Response<Incoming> {
    let mut req = Request::get(url).header("origin", "http://elsewhere.example");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("no answer within 10 s")
        .expect("request failed")
}

/// The next `snapshot` event's JSON from a stream (bounded wait).
async fn next_snapshot(body: &mut Incoming, buf: &mut String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("a data line");
            assert!(event.starts_with("event: snapshot\n"), "{event}");
            return serde_json::from_str(data).expect("snapshot JSON");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await
            .expect("no event within 10 s")
            .expect("the stream ended")
            .expect("stream error");
        if let Ok(data) = frame.into_data() {
            buf.push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
        }
    }
}

fn assert_no_cors(headers: &http::HeaderMap) {
    assert!(
        !headers
            .keys()
            .any(|k| k.as_str().starts_with("access-control-")),
        "CORS headers: {headers:?}"
    );
    assert_eq!(headers["x-flashgate-admin"], "1");
}

/// The stream needs a token (read-only is enough), sends a snapshot at once and then every
/// second with rates, and takes only GET.
#[tokio::test]
async fn the_event_stream_needs_a_token_and_sends_a_snapshot_at_once() {
    let backend = shop().await;
    let fg = start(&backend.url(), &memory()).await;
    set_stock(&fg, SKU, 4).await;
    let url = format!("{}/v1/events", fg.admin_url());
    for token in [None, Some("wrong")] {
        let resp = open(&url, token).await;
        assert_eq!(resp.status(), 401);
        assert_no_cors(resp.headers());
    }
    let started = Instant::now();
    let resp = open(&url, Some(ADMIN_READ_TOKEN)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_no_cors(resp.headers());
    let mut body = resp.into_body();
    let mut buf = String::new();
    let first = next_snapshot(&mut body, &mut buf).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the first snapshot took {:?}",
        started.elapsed()
    );
    assert_eq!(first["skus"][0]["sku"], SKU, "{first}");
    assert_eq!(first["skus"][0]["stock"], 4);
    assert_eq!(first["interval_s"], Value::Null, "no rates yet: {first}");
    let c = client();
    for user in ["a", "b"] {
        assert_eq!(buy(&c, &fg, SKU, user).await.status, 200);
    }
    let next = next_snapshot(&mut body, &mut buf).await;
    assert!(next["interval_s"].as_f64().is_some(), "{next}");
    assert_eq!(next["admissions_total"]["won"], 2, "{next}");
    assert_eq!(next["skus"][0]["stock"], 2, "{next}");
    assert_eq!(next["breaker_open"], false);
    for (method, token, status) in [("POST", ADMIN_READ_TOKEN, 403), ("POST", ADMIN_TOKEN, 405)] {
        let auth = format!("Bearer {token}");
        let a = send(&c, method, &url, &[("authorization", &auth)], "").await;
        assert_eq!(a.status, status, "{}", a.text());
        assert!(a.json()["error"].is_string());
    }
}

/// At most 16 streams at once: the 17th gets 503 `too_many_subscribers`; a closed stream
/// frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped() {
    let backend = shop().await;
    let fg = start(&backend.url(), &memory()).await;
    let url = format!("{}/v1/events", fg.admin_url());
    let mut streams = Vec::new();
    for _ in 0..16 {
        let resp = open(&url, Some(ADMIN_READ_TOKEN)).await;
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    let auth = format!("Bearer {ADMIN_READ_TOKEN}");
    let refused = send(&client(), "GET", &url, &[("authorization", &auth)], "").await;
    assert_error(&refused, 503, "too_many_subscribers");
    assert_eq!(refused.headers["retry-after"], "5");
    drop(streams.pop());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = open(&url, Some(ADMIN_READ_TOKEN)).await;
        if resp.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream never freed its slot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// When the admin API stops, every event stream ends (it does not hold the process).
#[tokio::test]
async fn event_streams_end_when_the_admin_api_stops() {
    let backend = shop().await;
    let yaml = sale_config(&backend.url(), "", "5s", BUY_PATH, PATH_SALE);
    let cfg = flashgate::config::parse(&yaml, "test.yaml").expect("config");
    let app = flashgate::state::App::build(cfg).await.expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tokens = flashgate::admin::auth::Tokens::new(ADMIN_TOKEN.to_owned(), None);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(flashgate::admin::run(
        listener,
        Arc::clone(&app),
        tokens,
        async {
            let _ = stopped.await;
        },
    ));
    let resp = open(&format!("http://{addr}/v1/events"), Some(ADMIN_TOKEN)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    next_snapshot(&mut body, &mut String::new()).await;
    let _ = stop.send(());
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the stream did not end within 5 s of the stop");
    assert!(rest.is_ok(), "the stream ended cleanly");
    admin.await.unwrap();
}

/// The page and its assets need no token, carry a strict policy and no CORS headers, and a
/// page load does not count as a failed login (the throttle is for guessed tokens).
#[tokio::test]
async fn the_page_is_served_without_a_token_under_a_strict_policy() {
    let backend = shop().await;
    let fg = start(&backend.url(), &memory()).await;
    for (path, content_type) in [
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard.css", "text/css; charset=utf-8"),
        ("/dashboard.svg", "image/svg+xml"),
    ] {
        for _ in 0..6 {
            let resp = open(&format!("{}{path}", fg.admin_url()), None).await;
            assert_eq!(resp.status(), 200, "{path}");
            let h = resp.headers();
            assert_eq!(h["content-type"], content_type);
            let csp = h["content-security-policy"].to_str().unwrap();
            for directive in [
                "default-src 'none'",
                "script-src 'self'",
                "frame-ancestors 'none'",
            ] {
                assert!(csp.contains(directive), "{csp}");
            }
            assert_eq!(h["x-frame-options"], "DENY");
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_no_cors(h);
        }
    }
    // 24 loads without a token (more than the 10 failures that lock an address out), and the
    // admin API still takes a token from this address.
    set_stock(&fg, SKU, 1).await;
    let post = send(
        &client(),
        "POST",
        &format!("{}/dashboard", fg.admin_url()),
        &[],
        "",
    )
    .await;
    assert_error(&post, 405, "method_not_allowed");
    assert_eq!(post.headers["allow"], "GET, HEAD");
}

/// The policy holds in a real browser: a script or style injected into the page is blocked and
/// reported (which is how the other browser cases know the page itself breaks no rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_enforces_the_pages_policy() {
    let backend = shop().await;
    let fg = start(&backend.url(), &memory()).await;
    let browser = Browser::launch().await;
    let page = browser.page(VIEWPORT.0, VIEWPORT.1).await;
    page.goto(&dashboard_url(&fg, "")).await;
    page.wait_for("!document.getElementById('login').hidden", SHOWS)
        .await;
    assert_eq!(page.problems(), Vec::<String>::new(), "errors in the page");
    page.eval(
        "const s = document.createElement('script'); s.textContent = 'window.injected = 1'; \
         document.body.appendChild(s); \
         const d = document.createElement('div'); d.setAttribute('style', 'color: red'); \
         document.body.appendChild(d); true",
    )
    .await;
    assert_eq!(page.eval("window.injected === undefined").await, true);
    let problems = page.problems();
    for directive in ["script-src 'self'", "style-src 'self'"] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains("Content Security Policy") && p.contains(directive)),
            "no {directive} violation reported: {problems:?}"
        );
    }
    browser.close().await;
}
